"""Feature ranking: chance-corrected MI, 3MR redundancy, pair interactions, data-quality notes, CLI and selection."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml

from ctrlab.cli import main
from ctrlab.config.features import FeaturesConfig
from ctrlab.datasets.synthetic import SyntheticConfig, SyntheticData, generate
from ctrlab.errors import DataError, RecipeError
from ctrlab.ranking.encode import encode_column, quantile_codes
from ctrlab.ranking.information import (
    LabelShuffles,
    adjusted_redundancy,
    codes_entropy,
    joint_codes,
    mutual_information,
)
from ctrlab.ranking.rank import FeatureRanking, RankingOptions, rank_features
from ctrlab.ranking.select import apply_selection

# Main effects on 4 of 12 categorical fields (vocabularies 5 .. 100,000) and 2 of 4 numeric fields, two planted
# interactions between main-effect fields, two noisy relabelled copies of informative fields, the rest noise.
PLANTED = SyntheticConfig(rows=300_000, categorical_fields=12, numeric_fields=4, informative_fields=4,
                          numeric_informative=2, interaction_pairs=2, interactions_among="main_effects",
                          redundant_fields=2)


@pytest.fixture(scope="module")
def planted() -> SyntheticData:
    return generate(PLANTED, 3)


def _kinds(data: SyntheticData) -> dict[str, Any]:
    return {c: None for c in data.frame.columns if c not in ("label", "ts")}


@pytest.fixture(scope="module")
def rankings(planted: SyntheticData) -> dict[str, FeatureRanking]:
    return {h: rank_features(planted.frame, "label", _kinds(planted), RankingOptions(heuristic=h))
            for h in ("mi", "normalized_mi", "3mr")}


def _precision(ranked: list[str], relevant: set[str]) -> float:
    return len(set(ranked[: len(relevant)]) & relevant) / len(relevant)


# --------------------------------------------------------------------------------------------- scores
def test_mutual_information_matches_a_hand_computed_table() -> None:
    # x=0: labels 1,1,1,0 ; x=1: labels 0,0,0,1  ->  p(x,y) = 3/8 on the diagonal, 1/8 off it
    x = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    expected = 2 * (3 / 8) * math.log((3 / 8) / (1 / 4)) + 2 * (1 / 8) * math.log((1 / 8) / (1 / 4))
    assert mutual_information(x, y, 2) == pytest.approx(expected, abs=1e-12)
    assert mutual_information(np.zeros(8, dtype=np.int64), y, 2) == 0.0
    assert mutual_information(x, x, 2) == pytest.approx(math.log(2))


def test_chance_correction_removes_the_cardinality_bias_of_a_random_feature() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(200_000) < 0.25).astype(np.int64)
    shuffles = LabelShuffles(labels, repeats=3, seed=1)
    for k in (10, 1_000, 50_000):
        codes = rng.integers(0, k, labels.shape[0])
        plain, normalized = shuffles.scores(codes)
        bias = (k - 1) / (2 * labels.shape[0])  # the Miller-Madow approximation of the plug-in bias
        assert plain == pytest.approx(bias, rel=0.25) if k >= 1_000 else plain < 1e-4
        # under independence 2n * MI is chi-squared with k-1 degrees of freedom: its spread is sqrt(2(k-1)) / 2n
        spread = math.sqrt(2 * (k - 1)) / (2 * labels.shape[0])
        assert abs(normalized) < 4 * spread
        assert k < 1_000 or plain > 20 * spread  # the uncorrected score is far outside the noise


def test_redundancy_is_the_chance_corrected_share_one_feature_carries_of_the_other() -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    city = rng.integers(0, 400, n)
    country = city // 40  # 10 countries, each a function of the city
    copy = (city * 7 + 3) % 401  # a relabelling
    other = rng.integers(0, 400, n)

    def shares(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        pair = joint_codes(a, b, int(b.max()) + 1)
        return adjusted_redundancy(a, pair, rng.permutation(b), codes_entropy(a), codes_entropy(b))

    assert shares(city, copy) == pytest.approx((1.0, 1.0), abs=1e-9)
    country_by_city, city_by_country = shares(country, city)
    assert country_by_city == pytest.approx(1.0, abs=1e-9)
    # the city carries log(10) of its log(400) nats through its country
    assert city_by_country == pytest.approx(math.log(10) / math.log(400), abs=0.02)
    assert max(shares(city, other)) < 0.01


def test_numeric_values_are_cut_at_quantiles_with_missing_as_its_own_code() -> None:
    values = np.array([np.nan, 1.0, 2.0, 3.0, 4.0, np.nan, 100.0, 5.0])
    codes = quantile_codes(values, 2)
    assert codes[0] == codes[5] == 0 and set(codes[[1, 2, 3]]) == {1} and set(codes[[4, 6, 7]]) == {2}
    column = encode_column(pl.Series("x", [None, 1.5, 1.5, 7.0]), "numeric", 4)
    assert column.missing_share == 0.25 and column.distinct_values == 2 and column.cardinality == 3


# --------------------------------------------------------------------------------------- the planted data
def test_normalised_score_finds_every_informative_field_and_plain_mi_does_not(planted, rankings) -> None:
    informative = set(planted.informative)
    assert informative == {"C2", "C5", "C6", "C10", "I2", "I4"}  # 4 main effects (+2 pairs among them), 2 numeric
    # the copies carry their source's information; precision counts fields that are informative or noise
    normalized = [f for f in rankings["normalized_mi"].top() if f not in planted.redundant]
    assert _precision(normalized, informative) == 1.0
    # plain MI puts a high-cardinality noise field above an informative one: why the normalisation matters
    plain = rankings["mi"].top()
    table = rankings["mi"].table
    cardinality = dict(zip(table["feature"], table["cardinality"]))
    worst_informative = max(plain.index(f) for f in informative)
    lifted = [f for f in plain[:worst_informative] if f in planted.noise]
    assert lifted and all(cardinality[f] >= 5_000 for f in lifted)
    assert _precision([f for f in plain if f not in planted.redundant], informative) < 1.0


def test_3mr_places_each_redundant_copy_below_its_source_and_keeps_all_informative_on_top(planted, rankings) -> None:
    order = rankings["3mr"].top()
    assert planted.redundant == {"R1": "C2", "R2": "C5"}
    for copy, source in planted.redundant.items():
        assert order.index(copy) > order.index(source)
    assert _precision(order, set(planted.informative)) == 1.0
    notes = dict(zip(rankings["3mr"].table["feature"], rankings["3mr"].table["notes"]))
    assert "redundant with C2" in notes["R1"] and "redundant with C5" in notes["R2"]
    # by the normalised score alone a copy sits right next to its source, above informative fields
    normalized = rankings["normalized_mi"].top()
    assert any(normalized.index(copy) < normalized.index(f) for copy in planted.redundant for f in planted.informative)


def test_planted_interactions_have_the_largest_pair_scores(planted, rankings) -> None:
    pairs = rankings["3mr"].pairs
    copies = {**{k: k for k in planted.redundant}, **{v: k for k, v in planted.redundant.items()}}
    top = [tuple(sorted(p)) for p in zip(pairs["feature_a"], pairs["feature_b"])
           if not (set(p) & set(planted.redundant))][:2]
    assert sorted(top) == sorted(tuple(sorted(p)) for p in planted.interactions)
    assert copies  # the pair table also scores pairs with the copies; they are left out of the comparison above


def test_3mr_lifts_fields_that_only_matter_in_a_pair() -> None:
    # interactions drawn among all fields: two fields have no main effect, only a joint one
    data = generate(SyntheticConfig(rows=300_000, categorical_fields=12, numeric_fields=4, informative_fields=4,
                                    numeric_informative=2, interaction_pairs=2, redundant_fields=2), 5)
    only_joint = set(data.informative) - set(data.main_effects) - {"I2", "I3"}
    assert only_joint == {"C1", "C3", "C9"}
    normalized = rank_features(data.frame, "label", _kinds(data), RankingOptions(heuristic="normalized_mi")).top()
    three_mr = rank_features(data.frame, "label", _kinds(data), RankingOptions(heuristic="3mr")).top()
    informative = set(data.informative)
    assert _precision([f for f in normalized if f not in data.redundant], informative) < 1.0
    assert _precision(three_mr, informative) == 1.0


def test_ranking_is_deterministic(planted) -> None:
    first = rank_features(planted.frame.head(50_000), "label", _kinds(planted))
    second = rank_features(planted.frame.head(50_000), "label", _kinds(planted))
    assert first.table.equals(second.table) and first.pairs.equals(second.pairs)


# ---------------------------------------------------------------------------------------- data quality
def test_data_quality_notes() -> None:
    rng = np.random.default_rng(0)
    n = 5_000
    base = rng.integers(0, 50, n)
    frame = pl.DataFrame({
        "label": (rng.random(n) < 0.3).astype(np.int8),
        "constant": ["a"] * n,
        "almost": ["x"] * (n - 10) + ["y"] * 10,
        "sparse": [None if i % 10 < 7 else "v" for i in range(n)],
        "row_id": [f"r{i}" for i in range(n)],
        "city": [f"c{v}" for v in base],
        "city_copy": [f"copy_{v * 7}" for v in base],
    })
    result = rank_features(frame, "label", {c: None for c in frame.columns if c != "label"})
    notes = dict(zip(result.table["feature"], result.table["notes"]))
    assert "constant" in notes["constant"]
    assert "near-constant (99.8% one value)" in notes["almost"]
    assert "missing 70%" in notes["sparse"]
    assert "id-like" in notes["row_id"]
    assert "duplicate of city" in notes["city_copy"] and "duplicate" not in notes["city"]
    assert dict(zip(result.table["feature"], result.table["cardinality"]))["row_id"] == n


def test_label_problems_are_one_line_errors() -> None:
    frame = pl.DataFrame({"label": [1, 1, 1], "x": ["a", "b", "c"]})
    with pytest.raises(DataError, match="label column 'label' has a single value"):
        rank_features(frame, "label", {"x": None}, source="f.csv")
    with pytest.raises(DataError, match="no label column 'click'"):
        rank_features(frame, "click", {"x": None}, source="f.csv")


# -------------------------------------------------------------------------------------------- the CLI
def test_cli_writes_ranking_files_and_errors_are_one_line(tmp_path: Path, capsys, planted) -> None:
    data = tmp_path / "rows.parquet"
    planted.frame.head(40_000).write_parquet(data)
    out = tmp_path / "rank"
    assert main(["rank", str(data), "--output", str(out), "--sample", "30000"]) == 0
    rows = list(csv.DictReader(open(out / "ranking.csv")))
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert set(rows[0]) == {"feature", "rank", "score", "mi", "normalized_mi", "cardinality", "kind",
                            "missing_share", "notes"}
    assert {r["feature"] for r in rows} == set(planted.frame.columns) - {"label"}
    assert (out / "ranking.png").stat().st_size > 10_000 and (out / "pairs.csv").exists()
    assert yaml.safe_load((out / "ranking.json").read_text())["rows"] == 30_000
    capsys.readouterr()
    assert main(["rank", str(data), "--target", "clicked", "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {data}: no label column 'clicked'; name it with --target"
    assert not (tmp_path / "bad").exists()
    assert main(["rank", str(data), "--heuristic", "gini"]) == 2
    assert "--heuristic: must be one of mi, normalized_mi, 3mr" in capsys.readouterr().err
    assert main(["rank", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err


def _recipe(tmp_path: Path, **features: Any) -> Path:
    recipe = {
        "name": "ranked", "output_dir": str(tmp_path / "run"),
        "dataset": {"synthetic": {"rows": 20_000, "categorical_fields": 6, "numeric_fields": 2,
                                  "informative_fields": 2, "interaction_pairs": 0, "numeric_informative": 1}},
        "features": {"categorical": [f"C{i}" for i in range(1, 7)], "numeric": ["I1", "I2"], **features},
        "model": {"block": "lr"}, "train": {"epochs": 1, "batch_size": 2048},
        "tracking": {"enabled": True, "experiment": "ranking-test"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_ranks_a_recipes_training_split_and_logs_to_mlflow(tmp_path: Path, capsys, cache_dir) -> None:
    import mlflow

    path = _recipe(tmp_path)
    assert main(["rank", str(path), "dataset.synthetic.rows=30000"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rows"] == 24_000  # the training split only (80%)
    assert Path(printed["output_dir"]) == tmp_path / "run" / "ranking"
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(printed["mlflow_run_id"])
    assert run.data.params["rank.heuristic"] == "3mr" and run.data.tags["ctrlab.kind"] == "ranking"
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "ranking")}
    assert {"ranking/ranking.csv", "ranking/ranking.png", "ranking/pairs.csv"} <= logged


# ---------------------------------------------------------------------------------------- features.select
def _write_ranking(path: Path, order: list[str]) -> Path:
    pl.DataFrame({"feature": order, "rank": list(range(1, len(order) + 1))}).write_csv(path)
    return path


def test_select_keeps_the_top_k_of_a_ranking(tmp_path: Path) -> None:
    ranking = _write_ranking(tmp_path / "ranking.csv", ["I2", "C3", "C1", "C2", "I1"])
    features = FeaturesConfig.model_validate({
        "categorical": ["C1", "C2", "C3"], "numeric": ["I1", "I2"],
        "sequence": [{"name": "hist", "share_vocab_with": "C2"}],
        "select": {"ranking": str(ranking), "top_k": 2}})
    chosen = apply_selection(features)
    assert [f.name for f in chosen.categorical] == ["C2", "C3"]  # C3 ranked, C2 kept for the history's vocabulary
    assert [f.name for f in chosen.numeric] == ["I2"] and [f.name for f in chosen.sequence] == ["hist"]
    assert chosen.select is None
    too_many = features.model_copy(update={"select": features.select.model_copy(update={"top_k": 9})})
    with pytest.raises(RecipeError, match="top_k: 9 is more than the 5 ranked features"):
        apply_selection(too_many)
    partial = _write_ranking(tmp_path / "partial.csv", ["C1", "C2"])
    with pytest.raises(RecipeError, match="feature 'C3' is not in the ranking"):
        apply_selection(features.model_copy(update={"select": features.select.model_copy(
            update={"ranking": str(partial)})}))
    with pytest.raises(DataError, match="no ranking file"):
        apply_selection(features.model_copy(update={"select": features.select.model_copy(
            update={"ranking": str(tmp_path / "nope.csv")})}))


def test_training_with_select_uses_only_the_top_k_features(tmp_path: Path, capsys, cache_dir) -> None:
    path = _recipe(tmp_path)
    assert main(["rank", str(path), "--no-track", "--output", str(tmp_path / "rk")]) == 0
    capsys.readouterr()
    ranked = [r["feature"] for r in csv.DictReader(open(tmp_path / "rk" / "ranking.csv"))]
    assert main(["train", str(path), f"features.select.ranking={tmp_path / 'rk' / 'ranking.csv'}",
                 "features.select.top_k=3", "tracking.enabled=false"]) == 0
    processor = yaml.safe_load((tmp_path / "run" / "processor.json").read_text())
    used = [f["name"] for kind in ("categorical", "numeric") for f in processor["features"][kind]]
    assert sorted(used) == sorted(ranked[:3])
    assert main(["validate", str(path), "features.select.top_k=0"]) == 2
    assert "features.select" in capsys.readouterr().err


def test_a_sweep_searches_top_k_and_each_trial_trains_on_that_many_features(tmp_path: Path, capsys,
                                                                             cache_dir) -> None:
    from rich.console import Console

    from ctrlab.sweep.study import run_sweep

    path = _recipe(tmp_path)
    assert main(["rank", str(path), "--no-track", "--output", str(tmp_path / "rk")]) == 0
    raw = yaml.safe_load(path.read_text())
    raw["features"]["select"] = {"ranking": str(tmp_path / "rk" / "ranking.csv"), "top_k": 8}
    raw["tracking"] = {"enabled": False}
    raw["sweep"] = {"n_trials": 3, "sampler": "random", "pruner": "none",
                    "space": {"features.select.top_k": {"type": "int", "low": 1, "high": 8}}}
    path.write_text(yaml.safe_dump(raw))
    result = run_sweep(path, console=Console(quiet=True))
    assert result.counts.get("COMPLETE") == 3
    for row in csv.DictReader(open(result.trials_csv)):
        k = yaml.safe_load(row["params"])["features.select.top_k"]
        processor = yaml.safe_load((Path(row["output_dir"]) / "processor.json").read_text())
        assert sum(len(processor["features"][kind]) for kind in ("categorical", "numeric")) == k

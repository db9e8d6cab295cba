"""Tests for the synthetic click-data generator and the Bayes-optimal AUC."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from ctrlab.datasets.synthetic import SyntheticConfig, SyntheticData, bayes_optimal_auc, generate

REPO = Path(__file__).resolve().parents[1]

SMALL = SyntheticConfig(rows=20_000, redundant_fields=2, sequence=True, max_history=8)


@pytest.fixture(scope="module")
def small() -> SyntheticData:
    return generate(SMALL, seed=7)


@pytest.fixture(scope="module")
def default_100k() -> SyntheticData:
    return generate(SyntheticConfig(rows=100_000), seed=3)


def _brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


# ------------------------------------------------------------------------------------------------------------ config


def test_config_rejects_unknown_and_inconsistent_fields() -> None:
    with pytest.raises(ValidationError):
        SyntheticConfig(rowz=10)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="cardinalities"):
        SyntheticConfig(categorical_fields=3, cardinalities=[10, 10])
    with pytest.raises(ValidationError, match="informative_fields"):
        SyntheticConfig(categorical_fields=3, informative_fields=4)
    with pytest.raises(ValidationError, match="numeric_informative"):
        SyntheticConfig(numeric_fields=1, numeric_informative=2)
    with pytest.raises(ValidationError):
        SyntheticConfig(base_rate=1.5)


def test_default_cardinalities_span_orders_of_magnitude() -> None:
    cards = SyntheticConfig().resolved_cardinalities()
    assert len(cards) == 12
    assert cards[0] == 5 and cards[-1] == 100_000
    assert cards == sorted(cards)
    custom = SyntheticConfig(categorical_fields=2, cardinalities=[3, 7], informative_fields=1, interaction_pairs=1)
    assert custom.resolved_cardinalities() == [3, 7]
    data = generate(custom.model_copy(update={"rows": 2_000}), seed=0)
    assert data.frame["C1"].n_unique() == 3 and data.frame["C2"].n_unique() == 7


# ------------------------------------------------------------------------------------------------------- shape, dtype


def test_columns_and_dtypes(small: SyntheticData) -> None:
    frame = small.frame
    expected = (
        ["label", "ts"]
        + [f"I{i}" for i in range(1, 5)]
        + [f"C{i}" for i in range(1, 13)]
        + ["R1", "R2", "item", "hist"]
    )
    assert frame.columns == expected
    assert frame.height == SMALL.rows
    assert frame.schema["label"] == pl.Int8
    assert frame.schema["ts"] == pl.Int64
    for name in expected[2:6]:
        assert frame.schema[name] == pl.Float64
    for name in expected[6:]:
        assert frame.schema[name] == pl.String
    assert set(frame["label"].unique().to_list()) == {0, 1}
    assert frame["ts"].diff().drop_nulls().min() > 0  # strictly increasing

    p = small.click_probability
    assert p.dtype == np.float64 and p.shape == (SMALL.rows,)
    assert np.all((p > 0) & (p < 1))
    assert np.allclose(p, 1 / (1 + np.exp(-(small.intercept + sum(small.logit_parts.values())))))


def test_value_formats_and_cardinalities(small: SyntheticData) -> None:
    frame = small.frame
    cards = SMALL.resolved_cardinalities()
    for j, card in enumerate(cards, start=1):
        column = frame[f"C{j}"]
        assert column.null_count() == 0
        assert column.str.contains(rf"^C{j}_\d{{6}}$").all()
        assert column.n_unique() <= card
    # Zipf-like: the largest field has far more distinct values than the smallest, and a dominant head value.
    assert frame["C12"].n_unique() > 100 * frame["C1"].n_unique()
    assert frame["C12"].value_counts(sort=True)["count"][0] > 0.05 * frame.height
    assert frame["R1"].str.contains(r"^R1_\d{6}$").all()
    assert frame["item"].str.contains(r"^item_\d{6}$").all()


def test_numeric_columns_are_counts_with_missing_values(small: SyntheticData) -> None:
    for name in ("I1", "I2", "I3", "I4"):
        column = small.frame[name]
        missing = column.null_count() / column.len()
        assert abs(missing - SMALL.missing_rate) < 0.01
        values = column.drop_nulls().to_numpy()
        assert values.min() >= 0
        assert np.all(values == np.floor(values))
        assert values.max() > 20 * max(np.median(values), 1.0)  # heavy tail


def test_column_roles_partition_the_features(small: SyntheticData) -> None:
    spec = small.feature_spec()
    assert spec["categorical"] == [f"C{i}" for i in range(1, 13)] + ["R1", "R2", "item"]
    assert spec["numeric"] == ["I1", "I2", "I3", "I4"]
    assert spec["sequence"] == [{"name": "hist", "share_vocab_with": "item", "max_len": 8}]

    features = set(small.frame.columns) - {"label", "ts"}
    informative, redundant, noise = set(small.informative), set(small.redundant), set(small.noise)
    assert informative | redundant | noise == features
    assert not (informative & redundant) and not (informative & noise) and not (redundant & noise)
    assert {"item", "hist"} <= informative
    assert len(small.main_effects) == SMALL.informative_fields
    assert len(small.interactions) == SMALL.interaction_pairs
    members = set(small.main_effects) | {f for pair in small.interactions for f in pair}
    assert {c for c in informative if c.startswith("C")} == members
    assert len([c for c in informative if c.startswith("I")]) == SMALL.numeric_informative
    assert set(small.redundant.values()) <= members


def test_plain_config_has_no_optional_columns() -> None:
    data = generate(SyntheticConfig(rows=500, time_column=False, numeric_fields=0, numeric_informative=0), seed=1)
    assert data.frame.columns == ["label"] + [f"C{i}" for i in range(1, 13)]
    assert data.feature_spec()["sequence"] == []
    assert data.redundant == {}


# -------------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_data_different_seed_different_data() -> None:
    config = SyntheticConfig(rows=3_000, redundant_fields=1, sequence=True)
    a, b, c = generate(config, 5), generate(config, 5), generate(config, 6)
    assert a.frame.equals(b.frame)
    assert np.array_equal(a.click_probability, b.click_probability)
    assert a.informative == b.informative and a.interactions == b.interactions
    assert not a.frame.equals(c.frame)
    assert not np.array_equal(a.click_probability, c.click_probability)


_CHILD = """
import sys
import numpy as np
from ctrlab.datasets.synthetic import SyntheticConfig, generate
data = generate(SyntheticConfig(rows=2_000, redundant_fields=1, sequence=True), 11)
data.frame.write_parquet(sys.argv[1])
np.save(sys.argv[2], data.click_probability)
print(",".join(data.informative))
"""


def test_determinism_across_processes(tmp_path: Path) -> None:
    results = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        frame_path, prob_path = tmp_path / f"{hash_seed}.parquet", tmp_path / f"{hash_seed}.npy"
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(frame_path), str(prob_path)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        results.append((pl.read_parquet(frame_path), np.load(prob_path), done.stdout.strip()))
    here = generate(SyntheticConfig(rows=2_000, redundant_fields=1, sequence=True), 11)
    for frame, prob, informative in results:
        assert frame.equals(here.frame)
        assert np.array_equal(prob, here.click_probability)
        assert informative == ",".join(here.informative)


def test_turning_on_options_keeps_other_columns() -> None:
    base = generate(SyntheticConfig(rows=2_000), 4)
    more = generate(SyntheticConfig(rows=2_000, sequence=True, redundant_fields=2), 4)
    shared = base.frame.drop("label").columns
    assert more.frame.select(shared).equals(base.frame.select(shared))


# ------------------------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("base_rate", [0.25, 0.05])
def test_label_mean_close_to_base_rate(base_rate: float) -> None:
    rows = 50_000
    data = generate(SyntheticConfig(rows=rows, base_rate=base_rate), seed=2)
    assert abs(data.click_probability.mean() - base_rate) < 1e-6
    sd = np.sqrt(base_rate * (1 - base_rate) / rows)
    assert abs(data.frame["label"].mean() - base_rate) < 5 * sd


def test_labels_follow_the_probabilities(default_100k: SyntheticData) -> None:
    """Calibration: within probability deciles the click rate matches the mean probability."""
    p = default_100k.click_probability
    y = default_100k.frame["label"].to_numpy()
    edges = np.quantile(p, np.linspace(0, 1, 11))
    bucket = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    for b in range(10):
        inside = bucket == b
        sd = np.sqrt(p[inside].mean() * (1 - p[inside].mean()) / inside.sum())
        assert abs(y[inside].mean() - p[inside].mean()) < 5 * sd + 1e-3


# ---------------------------------------------------------------------------------------------------------------- AUC


def test_auc_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 400
        scores = np.round(rng.random(n), 1)  # many ties
        labels = (rng.random(n) < 0.3).astype(np.int8)
        assert bayes_optimal_auc(labels, scores) == pytest.approx(_brute_force_auc(labels, scores), abs=1e-12)
    scores = rng.random(300)
    labels = (rng.random(300) < scores).astype(np.int64)
    assert bayes_optimal_auc(labels, scores) == pytest.approx(_brute_force_auc(labels, scores), abs=1e-12)


def test_auc_edge_cases() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    assert bayes_optimal_auc(labels, np.full(5, 0.3)) == 0.5
    assert bayes_optimal_auc(labels, labels.astype(float)) == 1.0
    assert bayes_optimal_auc(labels, -labels.astype(float)) == 0.0
    with pytest.raises(ValueError):
        bayes_optimal_auc(np.zeros(4), np.arange(4.0))
    with pytest.raises(ValueError):
        bayes_optimal_auc(np.array([0, 1]), np.arange(3.0))


def test_zero_signal_gives_constant_probability() -> None:
    data = generate(SyntheticConfig(rows=5_000, signal_scale=0.0), seed=1)
    assert np.allclose(data.click_probability, 0.25)
    assert bayes_optimal_auc(data.frame["label"].to_numpy(), data.click_probability) == 0.5


def test_default_task_is_learnable_but_not_trivial(default_100k: SyntheticData) -> None:
    auc = bayes_optimal_auc(default_100k.frame["label"].to_numpy(), default_100k.click_probability)
    assert 0.75 < auc < 0.85


def test_signal_scale_orders_difficulty() -> None:
    aucs = []
    for scale in (0.5, 1.0, 2.0):
        data = generate(SyntheticConfig(rows=30_000, signal_scale=scale), seed=9)
        aucs.append(bayes_optimal_auc(data.frame["label"].to_numpy(), data.click_probability))
    assert aucs[0] < aucs[1] < aucs[2]


# ------------------------------------------------------------------------------------------------------------ effects


def test_main_effects_oracle_falls_short_of_bayes(default_100k: SyntheticData) -> None:
    y = default_100k.frame["label"].to_numpy()
    parts = default_100k.logit_parts
    bayes = bayes_optimal_auc(y, default_100k.click_probability)
    additive = bayes_optimal_auc(y, default_100k.intercept + parts["main"] + parts["numeric"])
    assert bayes - additive > 0.03


def test_interactions_have_no_marginal_effect(default_100k: SyntheticData) -> None:
    """The interaction term averages to ~0 for every frequent value of each member field: it is purely pairwise."""
    frame = default_100k.frame.with_columns(inter=pl.Series(default_100k.logit_parts["interaction"]))
    assert frame["inter"].std() > 0.5
    for a, b in default_100k.interactions:
        for name in (a, b):
            stats = frame.group_by(name).agg(pl.col("inter").mean(), pl.len()).filter(pl.col("len") >= 5_000)
            assert stats.height >= 1
            assert stats["inter"].abs().max() < 0.06
        # ...but jointly the pair explains it: the per-(a, b) mean varies a lot.
        joint = frame.group_by(a, b).agg(pl.col("inter").mean(), pl.len()).filter(pl.col("len") >= 500)
        assert joint["inter"].std() > 0.3


def test_noise_columns_are_independent_of_the_label(default_100k: SyntheticData) -> None:
    frame = default_100k.frame
    rate = frame["label"].mean()
    noise_categorical = [c for c in default_100k.noise if c.startswith("C")]
    assert noise_categorical
    for name in noise_categorical:
        top = (
            frame.group_by(name)
            .agg(pl.col("label").mean().alias("rate"), pl.len())
            .sort("len", descending=True)
            .head(3)
        )
        for row in top.iter_rows(named=True):
            sd = np.sqrt(rate * (1 - rate) / row["len"])
            assert abs(row["rate"] - rate) < 5 * sd, (name, row)
    # The same check is sensitive: a main-effect field has a frequent value whose click rate clearly differs.
    deviations = []
    for name in default_100k.main_effects:
        top = frame.group_by(name).agg(pl.col("label").mean().alias("rate"), pl.len()).filter(pl.col("len") >= 2_000)
        deviations.append(float((top["rate"] - rate).abs().max()))
    assert max(deviations) > 0.05


def test_redundant_columns_track_their_source(small: SyntheticData) -> None:
    frame = small.frame
    assert small.redundant
    for copy, source in small.redundant.items():
        pairs = frame.group_by(source, copy).len()
        best = pairs.group_by(source).agg(pl.col("len").max())["len"].sum()
        agreement = best / frame.height
        assert agreement > 1 - SMALL.redundant_noise - 0.02
        assert agreement < 1.0  # noisy, not an exact copy
        # a relabelling: the copy's values are not the source's strings
        assert not frame[copy].str.replace(r"^R\d+_", "").equals(frame[source].str.replace(r"^C\d+_", ""))


def test_sequence_columns(small: SyntheticData) -> None:
    frame = small.frame
    hist = frame["hist"]
    assert hist.null_count() == 0
    lengths = np.where(hist.to_numpy() == "", 0, hist.str.split("|").list.len().to_numpy())
    assert lengths.max() == SMALL.max_history
    assert (lengths == 0).any()
    tokens = hist.filter(hist != "").str.split("|").explode()
    assert tokens.str.contains(r"^item_\d{6}$").all()
    item_pattern = re.compile(r"^item_\d{6}$")
    assert all(item_pattern.match(v) for v in frame["item"].head(100).to_list())
    # the history-candidate affinity carries signal beyond the other terms
    y = frame["label"].to_numpy()
    parts = small.logit_parts
    without = small.intercept + parts["main"] + parts["interaction"] + parts["numeric"]
    assert bayes_optimal_auc(y, small.click_probability) > bayes_optimal_auc(y, without) + 0.01


def test_history_items_share_the_candidate_cluster_more_when_clicked() -> None:
    """Clicked rows have histories that contain the candidate item itself more often (same cluster is likelier)."""
    data = generate(SyntheticConfig(rows=40_000, sequence=True, num_items=200, item_clusters=10), seed=3)
    frame = data.frame.with_columns(hit=pl.col("hist").str.contains(pl.col("item"), literal=True))
    rates = frame.group_by("label").agg(pl.col("hit").mean()).sort("label")["hit"].to_list()
    assert rates[1] > rates[0] + 0.02

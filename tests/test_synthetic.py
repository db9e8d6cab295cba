"""Tests for the synthetic click-data generator and the Bayes-optimal AUC."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------- memorise / factorise pairs
# OptInter's pair kinds (Lyu et al., ICDE 2022): full-rank effects on small vocabularies, low-rank ones on large.


def _digest(data: SyntheticData) -> str:
    """sha256 of every column's values (nulls marked), the probabilities, the logit parts and the metadata."""
    h = hashlib.sha256()
    for name in data.frame.columns:
        column = data.frame[name]
        h.update(f"{name}:{column.dtype}:".encode())
        h.update(column.is_null().to_numpy().tobytes())
        if column.dtype == pl.String:
            h.update("\x00".join(column.fill_null("").to_list()).encode())
        else:
            h.update(np.ascontiguousarray(column.fill_null(0).to_numpy()).tobytes())
    h.update(np.ascontiguousarray(data.click_probability).tobytes())
    for key, part in data.logit_parts.items():
        h.update(key.encode())
        h.update(np.ascontiguousarray(part).tobytes())
    meta = [data.informative, data.noise, sorted(data.redundant.items()), data.main_effects,
            data.interactions, data.max_history, float(data.intercept).hex()]
    h.update(json.dumps(meta).encode())
    return h.hexdigest()


_RECORDED = [
    (dict(rows=3_000), 0, "e0d5c2daf9da27de517914fa336ca4dac5329a76c4638b88928ca56aaa83a60f"),
    (dict(rows=2_000, sequence=True, redundant_fields=2, max_history=6), 7,
     "7e3cbdeb299aa2ebedea8f8809e37717787f727f895e5fd08cc52f048d422268"),
    (dict(rows=2_000, categorical_fields=5, cardinalities=[3, 50, 2_000, 7, 100_000], informative_fields=3,
          interaction_pairs=2, interactions_among="main_effects", numeric_fields=0, numeric_informative=0,
          time_column=False), 123,
     "4d41f614611b8ae01fa2ee77f22fc97f1ae9ca038e5f8d129a93acb5da2d94bc"),
]


_DIGEST_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[3])
from test_synthetic import _digest
from ctrlab.datasets.synthetic import SyntheticConfig, generate
print(_digest(generate(SyntheticConfig(**json.loads(sys.argv[1])), int(sys.argv[2]))))
"""


@pytest.mark.parametrize(("overrides", "seed", "expected"), _RECORDED)
def test_defaults_reproduce_the_recorded_tables(overrides: dict[str, Any], seed: int, expected: str) -> None:
    """With no memorise/factorise pairs (the default) ``generate`` is bit-for-bit what it was before they existed.

    The expected hashes were recorded from the generator BEFORE the memorise/factorise pairs were added (frame
    columns, click probabilities, logit parts, roles, intercept), so existing seeds and streams are unchanged. They
    were recorded with one BLAS thread: the generator's weighted means (``np.dot``) go through OpenBLAS, whose
    thread count changes the last bits of the probabilities, so the digest is computed in a fresh interpreter with
    ``OPENBLAS_NUM_THREADS=1`` (BLAS reads it at start-up). They assume the same numpy/polars floating-point
    results; rerecord only after checking a library upgrade is the cause.
    """
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _DIGEST_CHILD, json.dumps(overrides), str(seed),
                           str(Path(__file__).parent)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
    data = generate(SyntheticConfig(**overrides), seed)
    assert "memorize" not in data.logit_parts and "factorize" not in data.logit_parts
    assert data.pair_kinds == {pair: "group" for pair in data.interactions}


# Default 12 fields: C1..C4 have <= 100 values (6 pairs), C7..C12 >= 1000 (15 pairs).
KINDS = SyntheticConfig(rows=40_000, memorize_pairs=2, factorize_pairs=3, numeric_fields=0, numeric_informative=0)


@pytest.fixture(scope="module")
def kinds() -> SyntheticData:
    return generate(KINDS, seed=1)


def test_pair_kinds_are_planted_on_the_right_fields(kinds: SyntheticData) -> None:
    cards = dict(zip([f"C{j}" for j in range(1, 13)], KINDS.resolved_cardinalities()))
    counts = {kind: list(kinds.pair_kinds.values()).count(kind) for kind in ("group", "memorize", "factorize")}
    assert counts == {"group": KINDS.interaction_pairs, "memorize": 2, "factorize": 3}
    assert [p for p, k in kinds.pair_kinds.items() if k == "group"] == kinds.interactions
    pairs = list(kinds.pair_kinds)
    assert len({frozenset(p) for p in pairs}) == len(pairs)  # no pair planted twice, in either order
    for (a, b), kind in kinds.pair_kinds.items():
        assert int(a[1:]) < int(b[1:])  # column order
        if kind == "memorize":
            assert cards[a] <= KINDS.memorize_max_cardinality and cards[b] <= KINDS.memorize_max_cardinality
        elif kind == "factorize":
            assert cards[a] >= KINDS.factorize_min_cardinality and cards[b] >= KINDS.factorize_min_cardinality
    members = {f for pair in pairs for f in pair} | set(kinds.main_effects)
    assert {c for c in kinds.informative if c.startswith("C")} == members
    assert not members & set(kinds.noise)
    assert set(kinds.logit_parts) == {"main", "interaction", "memorize", "factorize", "numeric"}
    for kind in ("memorize", "factorize"):
        assert kinds.logit_parts[kind].std() > 0.5


def test_new_pairs_avoid_the_group_pairs() -> None:
    """Four small fields, six pairs: three go to group interactions, so the memorise pairs must be the other three."""
    config = SyntheticConfig(rows=500, categorical_fields=4, cardinalities=[5, 6, 7, 8], informative_fields=0,
                             interaction_pairs=3, memorize_pairs=3)
    for seed in range(3):
        data = generate(config, seed)
        assert sorted(data.pair_kinds.values()) == ["group"] * 3 + ["memorize"] * 3
        assert {frozenset(p) for p in data.pair_kinds} == {frozenset((f"C{a}", f"C{b}")) for a in range(1, 5)
                                                           for b in range(a + 1, 5)}


def test_planted_pairs_have_no_main_effect(kinds: SyntheticData) -> None:
    """Given one field's value, a memorise or factorise term averages to ~0: only crossing the pair reveals it."""
    for (a, b), kind in kinds.pair_kinds.items():
        if kind == "group":
            continue
        frame = kinds.frame.with_columns(t=pl.Series(kinds.logit_parts[kind]))
        std = float(frame["t"].std())
        for name in (a, b):
            stats = frame.group_by(name).agg(pl.col("t").mean().alias("mean"), pl.col("t").std().alias("sd"),
                                             pl.len()).filter(pl.col("len") >= 100)
            assert stats.height >= 5
            # Count-weighted mean |conditional mean| is small next to the term's std, and within sampling noise.
            weighted = float((stats["mean"].abs() * stats["len"]).sum() / stats["len"].sum())
            assert weighted < 0.05 * std, (kind, name, weighted, std)
            assert float((stats["mean"].abs() / (stats["sd"] / stats["len"].sqrt())).max()) < 5
        joint = frame.group_by(a, b).agg(pl.col("t").mean(), pl.len()).filter(pl.col("len") >= 100)
        scale = KINDS.memorize_scale if kind == "memorize" else KINDS.factorize_scale  # std of this pair's term
        assert float(joint["t"].std()) > 0.3 * scale  # ...yet the pair's combinations differ a lot


def _effect_table(data: SyntheticData, kind: str, a: str, b: str) -> np.ndarray:
    """The ``kind`` term per observed (value of a, value of b): one pair of that kind, so a function of the pair."""
    frame = data.frame.with_columns(t=pl.Series(data.logit_parts[kind]))
    cells = frame.group_by(a, b).agg(pl.col("t").first(), pl.col("t").n_unique().alias("distinct"))
    assert cells["distinct"].max() == 1
    table = cells.pivot(on=b, index=a, values="t").drop(a).to_numpy()
    assert not np.isnan(table).any()  # every combination observed
    return table


def test_memorize_effect_is_full_rank_and_factorize_effect_is_low_rank() -> None:
    config = SyntheticConfig(
        rows=20_000, categorical_fields=4, cardinalities=[6, 7, 12, 15], zipf_exponent=0.0, informative_fields=0,
        interaction_pairs=0, numeric_fields=0, numeric_informative=0, memorize_pairs=1, factorize_pairs=1,
        memorize_max_cardinality=8, factorize_min_cardinality=10, factorize_rank=3,
    )
    data = generate(config, seed=0)
    assert data.pair_kinds == {("C1", "C2"): "memorize", ("C3", "C4"): "factorize"}
    memorize = _effect_table(data, "memorize", "C1", "C2")
    factorize = _effect_table(data, "factorize", "C3", "C4")
    assert memorize.shape == (6, 7) and factorize.shape == (12, 15)
    # Double-centring removes one dimension; nothing else does.
    assert np.linalg.matrix_rank(memorize) == 6 - 1
    assert np.linalg.matrix_rank(factorize) == config.factorize_rank
    # Uniform values here, so centred means plain row and column means.
    for table in (memorize, factorize):
        assert np.allclose(table.mean(axis=0), 0, atol=1e-12) and np.allclose(table.mean(axis=1), 0, atol=1e-12)


def test_too_many_pairs_is_a_validation_error() -> None:
    SyntheticConfig(memorize_pairs=3, factorize_pairs=12)  # the most that fit beside 3 group pairs
    with pytest.raises(ValidationError, match=r"memorize_pairs \(4\) > the 3 pairs free among the 4 fields with "
                                              r"cardinality <= 100 \(6 pairs, up to 3 taken by interaction_pairs\)"):
        SyntheticConfig(memorize_pairs=4)
    with pytest.raises(ValidationError, match=r"factorize_pairs \(13\) > the 12 pairs free among the 6 fields"):
        SyntheticConfig(factorize_pairs=13)
    SyntheticConfig(memorize_pairs=6, interaction_pairs=0)
    with pytest.raises(ValidationError, match=r"memorize_pairs \(7\) > the 6 pairs free"):
        SyntheticConfig(memorize_pairs=7, interaction_pairs=0)
    # Group pairs among 2 main-effect fields can take at most 1 pair.
    SyntheticConfig(memorize_pairs=5, interactions_among="main_effects", informative_fields=2, interaction_pairs=1)
    with pytest.raises(ValidationError, match="factorize_min_cardinality"):
        SyntheticConfig(memorize_pairs=1, factorize_pairs=1, memorize_max_cardinality=500,
                        factorize_min_cardinality=500)
    with pytest.raises(ValidationError, match=r"factorize_pairs \(1\) > the 0 pairs"):
        SyntheticConfig(categorical_fields=2, cardinalities=[5, 5], informative_fields=0, interaction_pairs=0,
                        factorize_pairs=1)


def test_pair_kinds_are_deterministic_and_seed_dependent() -> None:
    config = KINDS.model_copy(update={"rows": 2_000, "interaction_pairs": 0})
    a, b, c = generate(config, 5), generate(config, 5), generate(config, 6)
    assert a.frame.equals(b.frame) and np.array_equal(a.click_probability, b.click_probability)
    assert a.pair_kinds == b.pair_kinds
    for kind in ("memorize", "factorize"):
        assert np.array_equal(a.logit_parts[kind], b.logit_parts[kind])
    assert a.pair_kinds != c.pair_kinds


def test_planting_new_pairs_keeps_everything_else() -> None:
    """The new pairs draw from their own streams: the other columns, terms and group pairs stay as they were."""
    base_config = SyntheticConfig(rows=3_000, redundant_fields=2, sequence=True)
    base = generate(base_config, 4)
    more = generate(base_config.model_copy(update={"memorize_pairs": 3, "factorize_pairs": 4}), 4)
    assert more.frame.drop("label").equals(base.frame.drop("label"))
    for key, part in base.logit_parts.items():
        assert np.array_equal(more.logit_parts[key], part)
    assert more.interactions == base.interactions and more.redundant == base.redundant
    assert {p: k for p, k in more.pair_kinds.items() if k == "group"} == base.pair_kinds
    assert not np.array_equal(more.click_probability, base.click_probability)

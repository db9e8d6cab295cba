"""Cross features (``features.crosses``, the input of OptInter's pair layer): vocabularies fitted on the training
rows only (min_count, ids by count, per-pair OOV), the hashed path past the row budget (ids in range, the same after
a round trip and in another interpreter), the small- and large-batch encodings, candidate pairs from ``all`` / a list
/ an OptFS kept set / a ranking's top pairs, the recorded pair methods, and the recipe's errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from ctrlab.config.features import FeaturesConfig
from ctrlab.config.loader import validate_recipe
from ctrlab.data.crosses import CROSS_HASH_SALT, CrossVocabulary, resolve_crosses
from ctrlab.data.layout import OOV_ID, FeatureLayout
from ctrlab.data.pipeline import load_raw_splits, prepare_data
from ctrlab.data.processor import FeatureProcessor
from ctrlab.errors import DataError, RecipeError
from ctrlab.utils.hashing import MERSENNE_PRIME, hash_constants

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _features(crosses: dict[str, Any], categorical: list[str] | None = None,
              numeric: list[dict[str, Any]] | None = None) -> FeaturesConfig:
    return FeaturesConfig.model_validate({"categorical": categorical or ["a", "b"], "numeric": numeric or [],
                                          "crosses": crosses})


# ------------------------------------------------------------------------------------------------ vocabularies
# a: p x4, r x4, q x2 -> p 2, r 3, q 4 (5 ids); b: w x4, u x3, v x3 -> w 2, u 3, v 4 (5 ids)
# crosses (key = id_a * 5 + id_b): (r,w) 17 x4, (p,u) 13 x3, (q,v) 24 x2, (p,v) 14 x1
TRAIN = pl.DataFrame({
    "label": ["1", "0", "1", "0", "1", "0", "0", "1", "0", "1"],
    "a": ["r", "p", "p", "q", "r", "p", "q", "r", "p", "r"],
    "b": ["w", "u", "u", "v", "w", "u", "v", "w", "v", "w"],
})
# (q,u) only here, five times; (p,v) three more times: neither counts, the vocabulary is the training split's
VALID = pl.DataFrame({
    "label": ["0"] * 13,
    "a": ["q"] * 5 + ["p"] * 3 + ["r", "p", "q", "zz", "p"],
    "b": ["u"] * 5 + ["v"] * 3 + ["w", "u", "v", "u", None],
})


def test_cross_vocabularies_count_the_training_rows_only_and_order_ids_by_count() -> None:
    processor = FeatureProcessor(_features({"pairs": [["a", "b"]]}), "label").fit(TRAIN)
    assert processor.vocabularies["a"].values == ["p", "r", "q"]
    assert processor.vocabularies["b"].values == ["w", "u", "v"]
    (cross,) = processor.crosses
    assert (cross.name, cross.first, cross.second, cross.second_size) == ("a:b", "a", "b", 5)
    # default min_count 2: (p,v), seen once, has no id of its own; the others by count: 17 (x4), 13 (x3), 24 (x2)
    assert cross.keys is not None and cross.keys.tolist() == [17, 13, 24]
    assert (cross.seen, cross.kept, cross.rows, cross.hashed) == (4, 3, 5, False)
    assert processor.layout.crosses[0].rows == 5 and processor.layout.crosses[0].method is None
    out = processor.transform(VALID)
    assert out.crosses is not None and out.crosses.dtype == np.int32
    # (q,u) x5: both values known, the cross never seen in train -> OOV; (p,v) x3 seen once -> OOV;
    # then (r,w) 2, (p,u) 3, (q,v) 4, an unseen value of a -> OOV, a missing value of b (unseen) -> OOV
    assert out.crosses[:, 0].tolist() == [OOV_ID] * 8 + [2, 3, 4, OOV_ID, OOV_ID]
    # min_count 1: the single (p,v) gets the last id; min_count 3: only (r,w) and (p,u)
    once = FeatureProcessor(_features({"pairs": [["a", "b"]], "min_count": 1}), "label").fit(TRAIN)
    assert once.crosses[0].keys.tolist() == [17, 13, 24, 14] and once.crosses[0].rows == 6
    assert once.transform(VALID).crosses[:, 0].tolist() == [OOV_ID] * 5 + [5] * 3 + [2, 3, 4, OOV_ID, OOV_ID]
    thrice = FeatureProcessor(_features({"pairs": [["a", "b"]], "min_count": 3}), "label").fit(TRAIN)
    assert thrice.crosses[0].keys.tolist() == [17, 13] and thrice.crosses[0].rows == 4
    # the row budget: 3 kept crosses + padding + OOV fit 5 rows; 4 rows hash every cross into ids 2..3
    fits = FeatureProcessor(_features({"pairs": [["a", "b"]], "max_rows": 5}), "label").fit(TRAIN)
    assert not fits.crosses[0].hashed and fits.crosses[0].rows == 5
    over = FeatureProcessor(_features({"pairs": [["a", "b"]], "max_rows": 4}), "label").fit(TRAIN)
    assert over.crosses[0].hashed and over.crosses[0].rows == 4 and over.crosses[0].kept == 3
    assert set(over.transform(VALID).crosses[:, 0].tolist()) <= {2, 3}
    # the same fit on train + valid would have given (q,u) an id: the training split alone decides
    both = FeatureProcessor(_features({"pairs": [["a", "b"]]}), "label").fit(pl.concat([TRAIN, VALID]))
    assert both.transform(VALID).crosses[0, 0] != OOV_ID


def test_equal_counts_order_by_key_and_a_field_min_count_makes_its_rare_values_oov_in_crosses() -> None:
    frame = pl.DataFrame({"label": ["0", "1"] * 4, "a": ["p", "p", "q", "q", "q", "q", "s", "t"],
                          "b": ["v", "v", "u", "u", "v", "v", "u", "u"]})
    features = FeaturesConfig.model_validate({"categorical": [{"name": "a", "min_count": 2}, "b"],
                                              "crosses": {"pairs": [["a", "b"]]}})
    processor = FeatureProcessor(features, "label").fit(frame)
    # a: q 2, p 3 (s and t once: OOV 1); b: u 2, v 3 (4 ids each)
    assert processor.vocabularies["a"].values == ["q", "p"] and processor.vocabularies["b"].values == ["u", "v"]
    # keys: (q,u) 10, (q,v) 11, (p,v) 15 twice each; (s,u) and (t,u) both are (OOV, u) = 6, twice
    assert processor.crosses[0].keys.tolist() == [6, 10, 11, 15]
    ids = processor.transform(frame).crosses[:, 0].tolist()
    assert ids == [5, 5, 3, 3, 4, 4, 2, 2]


def test_prepared_data_fits_the_crosses_on_the_training_split_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTRLAB_CACHE_DIR", str(tmp_path / "cache"))
    recipe = validate_recipe({
        "name": "crosses", "seed": 4,
        "dataset": {"synthetic": {"rows": 3000, "categorical_fields": 3, "numeric_fields": 1,
                                  "cardinalities": [20, 40, 60], "interaction_pairs": 0, "informative_fields": 2,
                                  "numeric_informative": 1}},
        "features": {"categorical": ["C1", "C2", "C3"], "numeric": [{"name": "I1", "transform": "bucketize",
                                                                     "buckets": 4}],
                     "crosses": {"pairs": "all"}},
        "model": {"block": "mlp"},
    })
    data = prepare_data(recipe.dataset, recipe.features, recipe.seed, console=None)
    frames = load_raw_splits(recipe.dataset, recipe.seed).frames
    assert [c.name for c in data.processor.crosses] == ["C1:C2", "C1:C3", "C1:I1", "C2:C3", "C2:I1", "C3:I1"]
    train_only = FeatureProcessor(data.features, "label").fit(frames["train"])
    everything = FeatureProcessor(data.features, "label").fit(pl.concat([frames["train"], frames["valid"],
                                                                          frames["test"]]))
    for got, want, more in zip(data.processor.crosses, train_only.crosses, everything.crosses):
        assert got.keys is not None and np.array_equal(got.keys, want.keys), got.name
        assert (got.seen, got.kept, got.rows) == (want.seen, want.kept, want.rows)
    # more rows, more distinct crosses: the other splits' were not counted
    assert any(more.seen > got.seen for got, more in zip(data.processor.crosses, everything.crosses))
    assert np.array_equal(data.splits["test"].crosses, train_only.transform(frames["test"]).crosses)
    # the validation split holds crosses the vocabulary never saw, and they are OOV
    assert (data.splits["valid"].crosses == OOV_ID).any()


# ------------------------------------------------------------------------------------------------ hashed pairs
HASHED = {"pairs": "all", "min_count": 1, "max_rows": 600}
HASHED_NUMERIC = [{"name": "x", "transform": "bucketize", "buckets": 4}, {"name": "y", "transform": "log"}]


def _random_frame(rows: int, seed: int) -> pl.DataFrame:
    """a and b of 60 values each (3,600 combinations), c of 3, x bucketised (with missing values), y scaled."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows)
    return pl.DataFrame({
        "label": rng.integers(0, 2, rows).astype(str),
        "a": [f"a{k}" for k in rng.integers(0, 60, rows)],
        "b": [f"b{k}" for k in rng.integers(0, 60, rows)],
        "c": [f"c{k}" for k in rng.integers(0, 3, rows)],
        "x": [None if k % 17 == 0 else float(v) for k, v in enumerate(x)],
        "y": rng.exponential(size=rows),
    })


def _hashed_processor() -> FeatureProcessor:
    features = _features(HASHED, ["a", "b", "c"], HASHED_NUMERIC)
    return FeatureProcessor(features, "label").fit(_random_frame(4000, seed=1))


def _fingerprint() -> np.ndarray:
    """The cross ids a freshly fitted processor gives other rows (for the cross-process test)."""
    return _hashed_processor().transform(_random_frame(500, seed=2)).crosses


def test_a_pair_over_the_row_budget_is_hashed_into_it() -> None:
    processor = _hashed_processor()
    crosses = processor.crosses
    assert [c.name for c in crosses] == ["a:b", "a:c", "a:x", "b:c", "b:x", "c:x"]
    assert [c.hashed for c in crosses] == [True, False, False, False, False, False]
    hashed = crosses[0]
    assert hashed.keys is None and hashed.rows == 600 and hashed.kept + 2 > 600  # ~2,400 distinct crosses
    assert hashed.to_dict()["keys"] is None  # no vocabulary stored: the processor file stays bounded
    assert [c.hashed for c in processor.layout.crosses] == [True] + [False] * 5
    assert all(c.rows <= 600 for c in crosses)
    frame = _random_frame(500, seed=2)
    encoded = processor.transform(frame)
    ids = encoded.crosses[:, 0]
    assert ids.min() >= 2 and ids.max() < 600  # never padding, never OOV: every cross hashes to a row
    assert len(np.unique(ids)) > 250  # 500 rows spread over the 598 rows
    # by hand: key = id_a * size_b + id_b, ((A key + B) mod P) mod (rows - 2) + 2 with the pair's own constants
    size_b = processor.layout.categorical[1].vocab_size
    a, b = hash_constants(0, 0, CROSS_HASH_SALT)
    keys = encoded.categorical[:, 0].astype(np.int64) * size_b + encoded.categorical[:, 1]
    assert ids.tolist() == [2 + ((a * (k % MERSENNE_PRIME) + b) % MERSENNE_PRIME) % 598 for k in keys.tolist()]
    # the bucketised numeric pair: x's bucket ids (missing -> its OOV) in the key
    ax = crosses[2]
    assert processor.layout.categorical[3].name == "x"
    assert ax.second_size == processor.layout.categorical[3].vocab_size == 4 + 2  # 4 buckets, padding, OOV
    assert (encoded.crosses[:, 2] >= 2).all()  # min_count 1: every training cross has an id, missing x included


def test_hashed_ids_survive_the_processor_round_trip(tmp_path: Path) -> None:
    processor = _hashed_processor()
    frame = _random_frame(500, seed=2)
    expected = processor.transform(frame)
    state = processor.to_dict()
    again = FeatureProcessor.from_dict(json.loads(json.dumps(state)))
    processor.save(tmp_path / "processor.json")
    loaded = FeatureProcessor.load(tmp_path / "processor.json")
    for other in (again, loaded):
        assert other.layout == processor.layout
        assert other.to_dict() == state
        out = other.transform(frame)
        assert np.array_equal(out.crosses, expected.crosses)
        assert np.array_equal(out.categorical, expected.categorical)
    vocabulary, fitted = CrossVocabulary.from_dict(state["crosses"][1]), processor.crosses[1]
    assert vocabulary.keys is not None and np.array_equal(vocabulary.keys, fitted.keys)
    assert vocabulary.keys.dtype == np.int64
    assert (vocabulary.name, vocabulary.rows, vocabulary.index, vocabulary.seen, vocabulary.kept) == (
        fitted.name, fitted.rows, 1, fitted.seen, fitted.kept)


def test_hashed_ids_are_the_same_in_another_interpreter(tmp_path: Path) -> None:
    here = _fingerprint()
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np; import test_crosses as t; "
              "np.save(sys.argv[2], t._fingerprint())")
    for hash_seed in ("1", "4242"):  # Python's hash() of strings differs under these; the crosses must not
        path = tmp_path / f"fingerprint_{hash_seed}.npy"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", script, str(TESTS), str(path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        there = np.load(path)
        assert there.dtype == here.dtype and np.array_equal(there, here)


# ------------------------------------------------------------------------------------------------ encodings
def test_one_row_at_a_time_and_many_rows_at_once_give_the_same_cross_ids(tmp_path: Path) -> None:
    processor = _hashed_processor()
    # unseen values in some rows (a value of a, a bucket-less x) besides the known ones
    frame = _random_frame(600, seed=3).with_columns(
        pl.when(pl.int_range(pl.len()) % 7 == 0).then(pl.lit("never")).otherwise(pl.col("a")).alias("a"))
    whole = processor.transform(frame)  # > 256 rows: the vocabularies' join path
    assert whole.crosses.shape == (600, 6)
    assert (whole.crosses[:, 1:] == OOV_ID).any()  # the unseen value of a makes OOV crosses
    chunks = np.concatenate([processor.transform(frame.slice(start, 100)).crosses for start in range(0, 600, 100)])
    assert np.array_equal(chunks, whole.crosses)  # <= 256 rows: the dict path
    for row in range(0, 600, 23):
        single = processor.transform(frame.slice(row, 1))
        assert single.crosses.shape == (1, 6)
        assert np.array_equal(single.crosses[0], whole.crosses[row]), row
    processor.save(tmp_path / "processor.json")
    loaded = FeatureProcessor.load(tmp_path / "processor.json")
    assert np.array_equal(loaded.transform(frame).crosses, whole.crosses)
    assert np.array_equal(loaded.transform(frame.slice(5, 1)).crosses, whole.crosses[5:6])


def test_a_processor_without_crosses_encodes_none() -> None:
    processor = FeatureProcessor(FeaturesConfig.model_validate({"categorical": ["a", "b"]}), "label").fit(TRAIN)
    assert processor.crosses == [] and processor.layout.crosses == ()
    assert processor.transform(VALID).crosses is None
    assert "crosses" not in processor.to_dict() and "crosses" not in processor.to_dict()["layout"]


# ------------------------------------------------------------------------------------------------ candidates
PAIRABLE = {"categorical": ["a", "b", "c"],
            "numeric": [{"name": "y", "transform": "log"}, {"name": "x", "transform": "bucketize"}]}
ALL_PAIRS = [["a", "b"], ["a", "c"], ["a", "x"], ["b", "c"], ["b", "x"], ["c", "x"]]


def _resolved(crosses: dict[str, Any]) -> list[list[str]]:
    features = FeaturesConfig.model_validate({**PAIRABLE, "crosses": crosses})
    resolved = resolve_crosses(features).crosses
    assert resolved is not None and resolved.kept_features is None and resolved.ranking is None
    return resolved.pairs  # type: ignore[return-value]


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_all_pairs_are_the_pairable_fields_in_model_order_and_a_list_is_put_in_that_order() -> None:
    features = FeaturesConfig.model_validate(PAIRABLE)
    assert features.pairable() == ["a", "b", "c", "x"]  # y is scaled by its value: no vocabulary, no cross
    assert resolve_crosses(features) is features  # without crosses: unchanged
    assert _resolved({"pairs": "all"}) == ALL_PAIRS
    resolved = resolve_crosses(FeaturesConfig.model_validate({**PAIRABLE, "crosses": {"min_count": 5,
                                                                                        "max_rows": 77}}))
    assert resolved.crosses.min_count == 5 and resolved.crosses.max_rows == 77
    # each pair in model order, the list sorted in model order
    assert _resolved({"pairs": [["x", "c"], ["c", "a"], ["b", "a"]]}) == [["a", "b"], ["a", "c"], ["c", "x"]]
    for pair, name in ((["a", "y"], "y"), (["zz", "b"], "zz")):
        with pytest.raises(RecipeError) as error:
            _resolved({"pairs": [["a", "b"], pair]})
        assert str(error.value) == (f"features.crosses.pairs: [{pair[0]}, {pair[1]}]: '{name}' is not a categorical "
                                    "feature (or a bucketised numeric one); pairable: a, b, c, x")
    with pytest.raises(RecipeError, match="no candidate pair is left"):
        resolve_crosses(FeaturesConfig.model_validate({"categorical": ["a"], "crosses": {}}))
    # the processor's layout lists the resolved pairs, with the fields' order
    processor = FeatureProcessor(FeaturesConfig.model_validate({**PAIRABLE, "crosses": {"min_count": 1}}),
                                 "label").fit(_random_frame(200, seed=4))
    assert [(c.first, c.second) for c in processor.layout.crosses] == [tuple(p) for p in ALL_PAIRS]


RANKING = [["a", "b", 0.10], ["x", "c", 0.50], ["b", "c", 0.30], ["a", "c", -0.20], ["a", "y", 0.90],
           ["b", "x", 0.05]]


def test_a_ranking_keeps_its_top_scored_candidate_pairs(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "pairs.csv", ["feature_a", "feature_b", "mutual_information", "interaction"],
                      [[a, b, 0.0, s] for a, b, s in RANKING])
    # a:y scores best but is no candidate (y is not pairable); x:c is c:x
    assert _resolved({"ranking": {"path": str(path), "top": 2}}) == [["b", "c"], ["c", "x"]]
    assert _resolved({"ranking": {"path": str(path), "top": 3}}) == [["a", "b"], ["b", "c"], ["c", "x"]]
    # unscored candidates (a:x) never make the top; more than there are -> every scored candidate
    assert _resolved({"ranking": {"path": str(path), "top": 50}}) == [p for p in ALL_PAIRS if p != ["a", "x"]]
    # the ranking narrows the listed pairs
    assert _resolved({"pairs": [["a", "b"], ["a", "c"]], "ranking": {"path": str(path), "top": 1}}) == [["a", "b"]]
    with pytest.raises(RecipeError, match="scores none of the 1 candidate pairs"):
        _resolved({"pairs": [["a", "x"]], "ranking": {"path": str(path), "top": 1}})
    bad = _write_csv(tmp_path / "bad.csv", ["feature_a", "feature_b", "interaction"], [["a", "b", "0.1"],
                                                                                         ["b", "c", "high"]])
    with pytest.raises(DataError, match=r"bad\.csv: row 3: column interaction holds 'high', not a number"):
        _resolved({"ranking": {"path": str(bad), "top": 1}})
    other = _write_csv(tmp_path / "ranking.csv", ["feature", "score"], [["a", 1.0]])
    with pytest.raises(DataError, match=r"not a pairs\.csv of ctrlab rank \(needs columns feature_a, feature_b, "
                                        r"interaction\)"):
        _resolved({"ranking": {"path": str(other), "top": 1}})
    with pytest.raises(DataError, match="features.crosses.ranking: no pairs.csv of ctrlab rank"):
        _resolved({"ranking": {"path": str(tmp_path / "missing.csv"), "top": 1}})


def test_a_kept_feature_set_keeps_the_pairs_of_fields_that_keep_values(tmp_path: Path) -> None:
    header = ["field", "kind", "values_total", "values_kept", "kept_share", "kept_occurrence_share"]
    kept = _write_csv(tmp_path / "kept_features.csv", header, [
        ["a", "categorical", 10, 3, 0.3, 0.5], ["b", "categorical", 8, 0, 0.0, 0.0],
        ["c", "categorical", 3, 2, 0.67, 0.9], ["x", "categorical", 5, 1, 0.2, 0.3], ["y", "numeric", 1, 1, 1, 1]])
    assert _resolved({"kept_features": str(kept)}) == [["a", "c"], ["a", "x"], ["c", "x"]]
    ranking = _write_csv(tmp_path / "pairs.csv", ["feature_a", "feature_b", "interaction"], RANKING)
    # kept first, then the ranking's top among what is left (b:c scores 0.3 but b keeps nothing)
    assert _resolved({"kept_features": str(kept), "ranking": {"path": str(ranking), "top": 2}}) == [
        ["a", "c"], ["c", "x"]]
    only_one = _write_csv(tmp_path / "one.csv", header, [["a", "categorical", 10, 3, 0.3, 0.5]])
    with pytest.raises(RecipeError, match="no candidate pair is left"):
        _resolved({"kept_features": str(only_one)})
    with pytest.raises(DataError, match="features.crosses.kept_features: no kept_features.csv of an OptFS run"):
        _resolved({"kept_features": str(tmp_path / "nowhere.csv")})


def test_a_pair_listed_twice_or_a_field_paired_with_itself_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"cross pair \['b', 'a'\] is listed twice"):
        _features({"pairs": [["a", "b"], ["b", "a"]]})
    with pytest.raises(ValidationError, match=r"a cross pair names two different fields, got \['a', 'a'\]"):
        _features({"pairs": [["a", "a"]]})
    base = {"name": "v", "dataset": {"synthetic": {"rows": 100}}, "model": {"block": "mlp"}}
    cases = [([["C1", "C2"], ["C2", "C1"]], "features.crosses.pairs: cross pair ['C2', 'C1'] is listed twice"),
             ([["C1", "C1"]], "features.crosses.pairs: a cross pair names two different fields, got ['C1', 'C1']"),
             ([["C1", "C2", "C3"]], "a cross pair names two different fields, got ['C1', 'C2', 'C3']")]
    for pairs, words in cases:
        with pytest.raises(RecipeError) as error:
            validate_recipe({**base, "features": {"categorical": ["C1", "C2", "C3"], "crosses": {"pairs": pairs}}})
        assert words in str(error.value) and "\n" not in str(error.value), str(error.value)


# ------------------------------------------------------------------------------------------------ pair methods
def _three_pairs() -> FeatureProcessor:
    frame = _random_frame(300, seed=5)
    return FeatureProcessor(_features({"min_count": 1}, ["a", "b", "c"]), "label").fit(frame)


def test_choose_pairs_drops_naive_pairs_and_records_the_methods_through_a_round_trip(tmp_path: Path) -> None:
    processor = _three_pairs()
    probe = _random_frame(50, seed=6)
    before = processor.transform(probe).crosses
    rows = [c.rows for c in processor.layout.crosses]
    assert [c.name for c in processor.layout.crosses] == ["a:b", "a:c", "b:c"]
    processor.choose_pairs({"b:c": "factorize", "a:b": "memorize", "a:c": "naive"})
    layout = processor.layout
    assert [(c.name, c.method, c.rows) for c in layout.crosses] == [("a:b", "memorize", rows[0]),
                                                                     ("b:c", "factorize", rows[2])]
    after = processor.transform(probe).crosses
    assert after.shape == (50, 2) and np.array_equal(after, before[:, [0, 2]])
    state = processor.to_dict()
    assert [c["method"] for c in state["crosses"]] == ["memorize", "factorize"]
    assert [c["method"] for c in state["layout"]["crosses"]] == ["memorize", "factorize"]
    assert FeatureLayout.from_dict(state["layout"]) == layout
    processor.save(tmp_path / "processor.json")
    for other in (FeatureProcessor.from_dict(json.loads(json.dumps(state))),
                  FeatureProcessor.load(tmp_path / "processor.json")):
        assert other.layout == layout and other.to_dict() == state
        assert np.array_equal(other.transform(probe).crosses, after)
        with pytest.raises(ValueError, match="already decided"):
            other.choose_pairs({"a:b": "memorize", "b:c": "factorize"})
    with pytest.raises(ValueError, match="the processor's pairs are already decided"):
        processor.choose_pairs({"a:b": "memorize", "a:c": "naive", "b:c": "factorize"})


def test_a_choice_for_an_unknown_pair_or_a_missing_one_is_a_value_error_naming_it() -> None:
    processor = _three_pairs()
    with pytest.raises(ValueError) as error:
        processor.choose_pairs({"a:b": "memorize", "a:c": "naive", "b:c": "factorize", "a:zz": "memorize"})
    assert str(error.value) == ("pair choices name a:zz and miss no pair (the features' crosses: a:b, a:c, b:c)")
    with pytest.raises(ValueError) as error:
        processor.choose_pairs({"a:b": "memorize", "a:c": "naive"})
    assert str(error.value) == "pair choices name no unknown pair and miss b:c (the features' crosses: a:b, a:c, b:c)"
    with pytest.raises(ValueError, match="pair choices name c:a and miss a:c"):
        processor.choose_pairs({"a:b": "memorize", "c:a": "naive", "b:c": "factorize"})
    with pytest.raises(ValueError, match="pair method 'hash' is not one of memorize, factorize, naive"):
        processor.choose_pairs({"a:b": "memorize", "a:c": "hash", "b:c": "factorize"})
    # a refused decision leaves the processor undecided
    assert [(c.name, c.method) for c in processor.layout.crosses] == [("a:b", None), ("a:c", None), ("b:c", None)]
    processor.choose_pairs({"a:b": "naive", "a:c": "naive", "b:c": "naive"})
    assert processor.layout.crosses == () and processor.transform(_random_frame(5, seed=7)).crosses is None


# ------------------------------------------------------------------------------------------------ the recipe
def test_an_interaction_without_crosses_is_a_recipe_error() -> None:
    base = {"name": "v", "dataset": {"synthetic": {"rows": 100}}, "model": {"block": "mlp"},
            "features": {"categorical": ["C1", "C2", "C3"]}}
    for interaction in ({"kind": "pairs", "method": "memorize"}, {"kind": "optinter"}):
        with pytest.raises(RecipeError) as error:
            validate_recipe({**base, "interaction": interaction})
        assert str(error.value) == ("recipe: interaction: the pair layer needs candidate pairs; add "
                                    "features.crosses (e.g. crosses: {pairs: all})")
    ok = validate_recipe({**base, "features": {**base["features"], "crosses": {}},
                          "interaction": {"kind": "pairs", "method": "factorize"}})
    assert ok.interaction.method == "factorize" and ok.features.crosses.pairs == "all"

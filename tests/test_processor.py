"""Feature processor: vocabularies, OOV, numeric transforms, sequences, JSON round trip."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ctrlab.config.features import FeaturesConfig
from ctrlab.data.layout import OOV_ID
from ctrlab.data.processor import FeatureProcessor
from ctrlab.errors import DataError


def _frame() -> pl.DataFrame:
    return pl.DataFrame({
        "label": ["1", "0", "0", "1", "0", "1"],
        "city": ["a", "a", "b", "a", "c", None],
        "price": ["1", "10", "", "100", "1000", "3"],
        "hist": ["x|y", "", "y|y|z|x", "z", None, "q"],
        "item": ["y", "x", "z", "y", "y", "x"],
    })


def _features(**extra: object) -> FeaturesConfig:
    spec = {"categorical": ["city", "item"], "numeric": [{"name": "price", "transform": "log"}],
            "sequence": [{"name": "hist", "share_vocab_with": "item", "max_len": 3}]}
    spec.update(extra)
    return FeaturesConfig.model_validate(spec)


def test_vocabulary_is_ordered_by_frequency_with_padding_and_oov_reserved() -> None:
    proc = FeatureProcessor(_features(), "label").fit(_frame())
    # "a" x3, then "__null__", "b", "c" once each (ties broken by value).
    assert proc.vocabularies["city"].values == ["a", "__null__", "b", "c"]
    encoded = proc.transform(pl.DataFrame({"label": ["0"], "city": ["unseen"], "price": ["2"], "hist": ["x"],
                                           "item": ["x"]}))
    assert encoded.categorical[0, 0] == OOV_ID
    assert proc.layout.tables()["city"] == 4 + 2


def test_min_count_sends_rare_values_to_oov() -> None:
    proc = FeatureProcessor(_features(defaults={"min_count": 2}), "label").fit(_frame())
    assert proc.vocabularies["city"].values == ["a"]
    encoded = proc.transform(_frame())
    assert encoded.categorical[:, 0].tolist() == [2, 2, OOV_ID, 2, OOV_ID, OOV_ID]


def test_numeric_fill_and_signed_log() -> None:
    proc = FeatureProcessor(_features(), "label").fit(_frame())
    fill = np.mean([1, 10, 100, 1000, 3])
    encoded = proc.transform(_frame())
    expected = np.log1p(np.array([1, 10, fill, 100, 1000, 3], dtype=np.float64))
    np.testing.assert_allclose(encoded.numeric[:, 0], expected, rtol=1e-6)
    negative = proc.transform(_frame().with_columns(pl.lit("-9").alias("price")))
    np.testing.assert_allclose(negative.numeric[:, 0], -np.log1p(9.0), rtol=1e-6)


def test_standardize_uses_training_statistics_only() -> None:
    features = _features(numeric=[{"name": "price", "transform": "standardize", "fill": "zero"}])
    proc = FeatureProcessor(features, "label").fit(_frame())
    train = proc.transform(_frame()).numeric[:, 0]
    assert abs(train.mean()) < 1e-6 and abs(train.std() - 1) < 1e-5
    other = proc.transform(_frame().with_columns(pl.lit("5000").alias("price"))).numeric[:, 0]
    raw = np.array([1, 10, 0, 100, 1000, 3], dtype=np.float64)
    np.testing.assert_allclose(other, (5000 - raw.mean()) / raw.std(), rtol=1e-5)


def test_bucketize_makes_a_categorical_field_and_missing_gets_its_own_id() -> None:
    features = _features(numeric=[{"name": "price", "transform": "bucketize", "buckets": 2}])
    proc = FeatureProcessor(features, "label").fit(_frame())
    layout = proc.layout
    assert [f.name for f in layout.categorical] == ["city", "item", "price"]
    assert layout.numeric == []
    ids = proc.transform(_frame()).categorical[:, 2]
    # One edge at the median of [1, 3, 10, 100, 1000] = 10: below -> 2, at/above -> 3, missing -> OOV.
    assert ids.tolist() == [2, 3, OOV_ID, 3, 3, 2]


def test_sequences_share_vocabulary_keep_most_recent_and_pad() -> None:
    proc = FeatureProcessor(_features(), "label").fit(_frame())
    vocab = proc.vocabularies["item"].values
    # counts over item column + history tokens (last 3 kept): y: 3+1+2=... built from both columns
    assert set(vocab) == {"x", "y", "z", "q"}
    ids = {v: i + 2 for i, v in enumerate(vocab)}
    seq = proc.transform(_frame()).sequences["hist"]
    assert seq.shape == (6, 3)
    assert seq[0].tolist() == [ids["x"], ids["y"], 0]
    assert seq[1].tolist() == [0, 0, 0]
    assert seq[2].tolist() == [ids["y"], ids["z"], ids["x"]]  # "y|y|z|x" truncated to the 3 most recent
    assert seq[4].tolist() == [0, 0, 0]
    layout = proc.layout
    assert layout.sequence[0].table == "item" and layout.sequence[0].vocab_size == layout.tables()["item"]


def test_json_round_trip_gives_identical_encodings(tmp_path) -> None:
    proc = FeatureProcessor(_features(), "label").fit(_frame())
    proc.save(tmp_path / "p.json")
    again = FeatureProcessor.load(tmp_path / "p.json")
    a, b = proc.transform(_frame()), again.transform(_frame())
    for name in ("categorical", "numeric", "label"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.sequences["hist"], b.sequences["hist"])
    assert again.layout == proc.layout


def test_transform_without_label_for_serving() -> None:
    proc = FeatureProcessor(_features(), "label").fit(_frame())
    encoded = proc.transform(_frame().drop("label"), with_label=False)
    assert encoded.label is None and encoded.categorical.shape == (6, 2)


@pytest.mark.parametrize("value", ["2", "-1", "yes"])
def test_bad_label_names_column_and_row(value: str) -> None:
    frame = _frame().with_columns(pl.Series("label", ["1", "0", value, "1", "0", "1"]))
    with pytest.raises(DataError, match=rf"train\.csv: column 'label' row 3: label '{value}' is not 0 or 1"):
        FeatureProcessor(_features(), "label").fit(frame, "train.csv")


def test_small_and_large_batches_encode_identically() -> None:
    # Small batches (serving) take a dict lookup, large ones a hash join: they must agree value for value.
    rng = np.random.default_rng(3)
    values = [f"v{i}" for i in rng.integers(0, 50, 600)] + ["never-seen"]
    frame = pl.DataFrame({"label": ["0"] * len(values), "c": values})
    proc = FeatureProcessor(FeaturesConfig(categorical=["c"]), "label").fit(frame.head(300))
    whole = proc.transform(frame).categorical[:, 0]
    pieces = np.concatenate([proc.transform(frame.slice(i, 7)).categorical[:, 0] for i in range(0, frame.height, 7)])
    assert len(frame) > 256 and np.array_equal(whole, pieces)
    assert whole[-1] == OOV_ID

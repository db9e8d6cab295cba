"""Data pipeline: sources, splits, and the parquet cache keyed by data + schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from rich.console import Console

from ctrlab.config.dataset import DatasetConfig, SplitConfig
from ctrlab.config.features import FeaturesConfig
from ctrlab.data.pipeline import prepare_data
from ctrlab.data.splits import split_frame

QUIET = Console(quiet=True)


def _write(tmp_path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "all.csv"
    pl.DataFrame({
        "label": rng.integers(0, 2, n), "ts": rng.permutation(n) * 10, "c": rng.choice(["a", "b", "c"], n),
        "x": rng.random(n).round(3),
    }).write_csv(path)
    return path


FEATURES = FeaturesConfig.model_validate({"categorical": ["c"], "numeric": ["x"]})


def test_random_split_is_seeded_and_disjoint() -> None:
    frame = pl.DataFrame({"i": np.arange(1000)})
    a = split_frame(frame, SplitConfig(kind="random"), seed=1, source="t")
    b = split_frame(frame, SplitConfig(kind="random"), seed=1, source="t")
    c = split_frame(frame, SplitConfig(kind="random"), seed=2, source="t")
    assert [len(a[s]) for s in ("train", "valid", "test")] == [800, 100, 100]
    assert all(a[s]["i"].to_list() == b[s]["i"].to_list() for s in a)
    assert a["test"]["i"].to_list() != c["test"]["i"].to_list()
    assert len(set().union(*(set(a[s]["i"]) for s in a))) == 1000


def test_time_split_orders_numerically() -> None:
    frame = pl.DataFrame({"t": ["999999999", "1000000000", "5", "20"]})  # 9 vs 10 digits: not string order
    parts = split_frame(frame, SplitConfig(kind="time", time_column="t", fractions=(0.5, 0.25, 0.25)), 0, "t")
    assert parts["train"]["t"].to_list() == ["5", "20"]
    assert parts["test"]["t"].to_list() == ["1000000000"]


def test_cache_hit_returns_identical_encodings_and_schema_change_misses(tmp_path: Path, cache_dir: Path) -> None:
    path = _write(tmp_path)
    config = DatasetConfig(path=str(path), split=SplitConfig(kind="time", time_column="ts"))
    first = prepare_data(config, FEATURES, 0, console=QUIET)
    second = prepare_data(config, FEATURES, 0, console=QUIET)
    assert not first.cache_hit and second.cache_hit
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(first.splits[s].categorical, second.splits[s].categorical)
        np.testing.assert_array_equal(first.splits[s].numeric, second.splits[s].numeric)
        np.testing.assert_array_equal(first.splits[s].label, second.splits[s].label)
    assert len(list(cache_dir.iterdir())) == 1
    other = FeaturesConfig.model_validate({"categorical": ["c"], "numeric": [{"name": "x", "transform": "log"}]})
    assert not prepare_data(config, other, 0, console=QUIET).cache_hit
    path.write_text(path.read_text() + "1,5,a,0.5\n")  # data change -> new key
    assert not prepare_data(config, FEATURES, 0, console=QUIET).cache_hit
    assert len(list(cache_dir.iterdir())) == 3
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]


def test_processor_is_fitted_on_train_only(tmp_path: Path, cache_dir: Path) -> None:
    path = _write(tmp_path)
    frame = pl.read_csv(path)
    # A category that appears only in the last rows (time-ordered test split) must be OOV.
    frame = frame.with_columns(pl.when(pl.col("ts") >= 1900).then(pl.lit("late")).otherwise(pl.col("c")).alias("c"))
    frame.write_csv(path)
    config = DatasetConfig(path=str(path), split=SplitConfig(kind="time", time_column="ts"))
    data = prepare_data(config, FEATURES, 0, console=QUIET)
    assert "late" not in data.processor.vocabularies["c"].values
    assert (data.splits["test"].categorical[:, 0] == 1).sum() == 10


def test_given_files_and_features_from_synthetic_defaults(tmp_path: Path, cache_dir: Path) -> None:
    config = DatasetConfig(synthetic={"rows": 3000, "categorical_fields": 3, "numeric_fields": 1,
                                      "informative_fields": 2, "interaction_pairs": 1, "numeric_informative": 1})
    data = prepare_data(config, FeaturesConfig(), 0, console=QUIET)
    assert [f.name for f in data.features.categorical] == ["C1", "C2", "C3"]
    assert sum(len(s) for s in data.splits.values()) == 3000
    with pytest.raises(Exception, match="give exactly one data source"):
        DatasetConfig(path="x.csv", card="frappe_x1")

"""The out-of-core data path: streamed fitting and encoding (``dataset.loading: stream``) and the streamed split
reader. The streamed results are compared with the in-memory ones value for value."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from ctrlab.config.dataset import DatasetConfig
from ctrlab.config.features import FeaturesConfig
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.layout import FeatureLayout, FieldSpec
from ctrlab.data.pipeline import loading_mode, prepare_data
from ctrlab.data.processor import FeatureProcessor
from ctrlab.data.splits import SPLITS, split_code_expr, split_codes
from ctrlab.data.stream import SplitWriter, StreamedSplit
from ctrlab.errors import DataError, RecipeError

QUIET = Console(quiet=True)


def _table(n: int, seed: int = 0) -> pl.DataFrame:
    """Rows with what a fit must get right: nulls and empty text in categorical and numeric columns, a rare-value
    tail for min_count, heavy-tailed and negative numbers, zeros of both signs, a behaviour history."""
    rng = np.random.default_rng(seed)
    city = rng.choice(["a", "b", "c", "d", ""], n, p=[0.5, 0.2, 0.15, 0.1, 0.05]).astype(object)
    city[rng.random(n) < 0.05] = None
    price = np.round(rng.lognormal(2.0, 2.0, n) * rng.choice([-1, 1], n, p=[0.1, 0.9]), 2)
    price[rng.random(n) < 0.01] = -0.0
    price_text = [None if m else f"{v}" for v, m in zip(price, rng.random(n) < 0.1)]
    count = rng.poisson(3.0, n).astype(float)
    count[rng.random(n) < 0.2] = np.nan
    items = np.array([f"i{k}" for k in range(60)])
    user = rng.zipf(1.5, n) % 5000
    return pl.DataFrame({
        "label": rng.integers(0, 2, n).astype(str),
        "city": pl.Series(city, dtype=pl.String),
        "user": [f"u{u}" for u in user],
        "item": items[rng.integers(0, 60, n)],
        "price": pl.Series(price_text, dtype=pl.String),
        "count": count,
        "hist": ["|".join(items[rng.integers(0, 60, k)]) for k in rng.integers(0, 5, n)],
    })


FEATURES = FeaturesConfig.model_validate({
    "defaults": {"min_count": 2},
    "categorical": ["city", {"name": "user", "min_count": 3}, "item"],
    "numeric": [{"name": "price", "transform": "log_standardize", "fill": "median"},
                {"name": "count", "transform": "bucketize", "buckets": 7, "fill": "mean"}],
    "sequence": [{"name": "hist", "share_vocab_with": "item", "max_len": 3}],
})
CROSSED = FEATURES.model_copy(update={"crosses": FeaturesConfig.model_validate(
    {"crosses": {"pairs": [["city", "item"], ["item", "count"], ["user", "item"]], "min_count": 2,
                 "max_rows": 400}}).crosses})


def _state(processor: FeatureProcessor) -> str:
    return json.dumps(processor.to_dict(), sort_keys=True)


def _assert_same(a: EncodedSplit, b: EncodedSplit) -> None:
    for name in ("categorical", "numeric", "label", "group", "crosses"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.sequences.keys() == b.sequences.keys()
    for name in a.sequences:
        np.testing.assert_array_equal(a.sequences[name], b.sequences[name], err_msg=name)


# ------------------------------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("features", [FEATURES, CROSSED], ids=["plain", "crosses"])
def test_streamed_fit_gives_the_identical_state(tmp_path: Path, features: FeaturesConfig) -> None:
    frame = _table(300_000)  # several of the streaming engine's morsels and parquet row groups
    path = tmp_path / "train.parquet"
    frame.write_parquet(path, row_group_size=40_000)
    in_memory = FeatureProcessor(features, "label").fit(frame)
    streamed = FeatureProcessor(features, "label").fit_lazy(pl.scan_parquet(path), workdir=tmp_path)
    assert _state(streamed) == _state(in_memory)
    # ... and a frame in another row order (another partition of the same rows) too
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=5)
    assert _state(FeatureProcessor(features, "label").fit(shuffled)) == _state(in_memory)


def test_fitted_statistics_are_numpys(tmp_path: Path) -> None:
    frame = _table(50_000, seed=3)
    stats = FeatureProcessor(FEATURES, "label").fit(frame).numeric_stats
    count = frame["count"].to_numpy()
    present = count[~np.isnan(count)]
    quantiles = np.quantile(present, np.linspace(0, 1, 8)[1:-1])
    assert stats["count"]["edges"] == sorted({float(q) for q in quantiles})  # numpy's interpolation, bit for bit
    np.testing.assert_allclose(stats["count"]["fill"], present.mean(), rtol=1e-12)
    price = frame["price"].cast(pl.Float64).to_numpy()
    fill = float(np.median(price[~np.isnan(price)]))
    assert stats["price"]["fill"] == fill
    logged = np.sign(np.where(np.isnan(price), fill, price)) * np.log1p(np.abs(np.where(np.isnan(price), fill, price)))
    np.testing.assert_allclose([stats["price"]["mean"], stats["price"]["std"]], [logged.mean(), logged.std()],
                               rtol=1e-10)


def test_streamed_fit_names_the_file_row_of_a_bad_value(tmp_path: Path) -> None:
    frame = _table(2_000).with_columns(pl.Series("price", ["1.5"] * 1_999 + [" abc "]))
    path = tmp_path / "train.parquet"
    frame.write_parquet(path)
    with pytest.raises(DataError, match=r"train\.parquet: column 'price' row 2000: value 'abc' is not a number"):
        FeatureProcessor(FEATURES, "label").fit_lazy(pl.scan_parquet(path), str(path))
    with pytest.raises(DataError, match=r"column 'label' row 7: label '2' is not 0 or 1"):
        FeatureProcessor(FEATURES, "label").fit(frame.with_columns(pl.Series("label", ["1"] * 6 + ["2"] * 1_994)))


# ------------------------------------------------------------------------------------------------ encoding
def _given_files(tmp_path: Path, fmt: str) -> DatasetConfig:
    frames = {"train": _table(3_000, 1), "valid": _table(700, 2), "test": _table(701, 3)}
    for name, frame in frames.items():
        if fmt == "csv":
            frame.write_csv(tmp_path / f"{name}.csv")
        else:
            frame.write_parquet(tmp_path / f"{name}.parquet", row_group_size=500)
    return DatasetConfig(train=f"train.{fmt}", valid=f"valid.{fmt}", test=f"test.{fmt}", data_dir=str(tmp_path),
                         group_by="user", chunk_rows=333)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_streamed_splits_equal_the_in_memory_ones(tmp_path: Path, cache_dir: Path, fmt: str) -> None:
    config = _given_files(tmp_path, fmt)
    memory = prepare_data(config.model_copy(update={"loading": "memory"}), CROSSED, 0, console=QUIET)
    streamed = prepare_data(config.model_copy(update={"loading": "stream"}), CROSSED, 0, console=QUIET)
    assert memory.streams is None and not memory.streamed
    assert streamed.streamed and streamed.splits == {} and streamed.streams is not None
    assert _state(streamed.processor) == _state(memory.processor)
    for split in SPLITS:
        stream = streamed.streams[split]
        _assert_same(stream.read_all(), memory.splits[split])
        # chunk_rows (333) divides none of the row counts: every row group but the last holds 333 rows
        rows = len(memory.splits[split])
        assert stream.row_group_rows == [333] * (rows // 333) + [rows % 333]
        assert pq.ParquetFile(stream.path).metadata.num_row_groups == stream.num_row_groups
        np.testing.assert_array_equal(stream.labels(), memory.splits[split].label)
        np.testing.assert_array_equal(stream.groups(), memory.splits[split].group)


def test_the_second_run_is_served_from_the_cache(tmp_path: Path, cache_dir: Path) -> None:
    config = _given_files(tmp_path, "parquet").model_copy(update={"loading": "stream"})
    first = prepare_data(config, FEATURES, 0, console=QUIET)
    second = prepare_data(config, FEATURES, 0, console=QUIET)
    assert not first.cache_hit and second.cache_hit
    assert first.streams is not None and second.streams is not None
    assert first.streams["train"].path == second.streams["train"].path
    assert _state(first.processor) == _state(second.processor)
    [entry] = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "processor.json", "test.parquet",
                                                       "train.parquet", "valid.parquet"]
    # A damaged file is noticed (manifest checksums) and the entry rebuilt.
    with open(entry / "valid.parquet", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 8)
    third = prepare_data(config, FEATURES, 0, console=QUIET)
    assert not third.cache_hit
    _assert_same(third.streams["valid"].read_all(), second.streams["valid"].read_all())  # type: ignore[index]
    # the in-memory path keeps its own entries
    assert not prepare_data(config.model_copy(update={"loading": "memory"}), FEATURES, 0, console=QUIET).cache_hit


def test_without_a_cache_the_splits_live_in_a_temporary_folder(tmp_path: Path) -> None:
    config = _given_files(tmp_path, "parquet").model_copy(update={"loading": "stream", "cache": False})
    data = prepare_data(config, FEATURES, 0, console=QUIET)
    assert data.workdir is not None and data.streams is not None
    folder = Path(data.workdir.name)
    assert data.streams["test"].path.parent == folder and len(data.streams["test"]) == 701
    test = data.streams["test"]
    del data
    gc.collect()
    assert len(test.read_all()) == 701  # a split still in use keeps its folder
    del test
    gc.collect()
    assert not folder.exists()


# --------------------------------------------------------------------------------------- the random split
def test_streamed_random_split_is_deterministic_and_close_to_its_fractions() -> None:
    rows = np.arange(1, 200_001)
    codes = split_codes(rows, (0.7, 0.2, 0.1), seed=11)
    assert np.array_equal(codes, split_codes(rows, (0.7, 0.2, 0.1), seed=11))
    assert not np.array_equal(codes, split_codes(rows, (0.7, 0.2, 0.1), seed=12))
    shares = np.bincount(codes, minlength=3) / len(rows)
    assert np.all(np.abs(shares - [0.7, 0.2, 0.1]) < 4 * np.sqrt(0.25 / len(rows))), shares
    lazy = pl.DataFrame({"r": rows}).lazy().select(split_code_expr(pl.col("r"), (0.7, 0.2, 0.1), 11))
    assert np.array_equal(lazy.collect(engine="streaming").to_series().to_numpy(), codes)
    # any chunking of the file gives the same split: a row's split depends on its row number only
    assert np.array_equal(split_codes(rows[5_000:9_000], (0.7, 0.2, 0.1), 11), codes[5_000:9_000])


def test_one_file_is_split_at_random_while_streaming(tmp_path: Path, cache_dir: Path) -> None:
    n = 20_000
    frame = _table(n, 4).with_columns(pl.Series("row", np.arange(1, n + 1)))
    frame.write_csv(tmp_path / "all.csv")
    features = FEATURES.model_copy(update={"numeric": [*FEATURES.numeric,
                                                       FeaturesConfig.model_validate({"numeric": ["row"]}).numeric[0]]})
    config = DatasetConfig(path=str(tmp_path / "all.csv"), loading="stream", chunk_rows=1_000,
                           split={"kind": "random", "fractions": [0.8, 0.1, 0.1], "seed": 3})
    data = prepare_data(config, features, 0, console=QUIET)
    assert data.streams is not None
    codes = split_codes(np.arange(1, n + 1), (0.8, 0.1, 0.1), 3)
    for code, split in enumerate(SPLITS):
        encoded = data.streams[split].read_all()
        # the value of column "row" (numeric, untransformed) is each row's file row: the rows of the split, in order
        np.testing.assert_array_equal(encoded.numeric[:, -1], np.flatnonzero(codes == code) + 1)
    assert abs(len(data.streams["train"]) / n - 0.8) < 0.02
    # fitted on the training rows only: the same as fitting the in-memory frame of those rows
    train = frame.filter(pl.Series(codes == 0))
    assert _state(data.processor) == _state(FeatureProcessor(features, "label").fit(train))


def test_streamed_errors_name_the_file_row(tmp_path: Path, cache_dir: Path) -> None:
    n = 3_000
    codes = split_codes(np.arange(1, n + 1), (0.8, 0.1, 0.1), 0)
    test_row = int(np.flatnonzero(codes == 2)[-1]) + 1  # a row of the test split, far into the file
    frame = _table(n, 5)
    frame = frame.with_columns(pl.Series("count", [str(v) for v in frame["count"]]))
    frame.with_columns(pl.when(pl.int_range(1, n + 1) == test_row).then(pl.lit("x7")).otherwise(pl.col("count"))
                       .alias("count")).write_csv(tmp_path / "all.csv")
    config = DatasetConfig(path=str(tmp_path / "all.csv"), loading="stream", chunk_rows=256)
    with pytest.raises(DataError, match=rf"all\.csv \(test split\): column 'count' row {test_row}: value 'x7' is not a "
                                        "number"):
        prepare_data(config, FEATURES, 0, console=QUIET)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())  # nothing half-written stays behind


def test_a_split_that_would_be_empty_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    _table(50).write_parquet(tmp_path / "all.parquet")
    config = DatasetConfig(path=str(tmp_path / "all.parquet"), loading="stream",
                           split={"kind": "random", "fractions": [0.9, 0.1, 0.0]})
    with pytest.raises(DataError, match=r"all\.parquet: the test split is empty \(50 rows"):
        prepare_data(config, FEATURES, 0, console=QUIET)


# ------------------------------------------------------------------------------------------------- config
def test_loading_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="loading: stream reads data files"):
        DatasetConfig(synthetic={"rows": 100}, loading="stream")
    with pytest.raises(ValueError, match="a time split sorts the whole file"):
        DatasetConfig(path="x.csv", loading="stream", split={"kind": "time", "time_column": "t"})
    with pytest.raises(ValueError, match="libFM files are parsed whole"):
        DatasetConfig(path="x.libfm", format="libfm", loading="stream")
    with pytest.raises(ValueError, match="chunk_rows"):
        DatasetConfig(path="x.csv", chunk_rows=0)


def test_auto_streams_files_large_for_the_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _given_files(tmp_path, "parquet")
    assert config.loading == "auto"
    monkeypatch.setenv("CTRLAB_MEMORY_LIMIT_BYTES", str(10**12))
    assert loading_mode(config) == "memory"
    monkeypatch.setenv("CTRLAB_MEMORY_LIMIT_BYTES", str(10_000))
    assert loading_mode(config) == "stream"
    assert loading_mode(config.model_copy(update={"loading": "memory"})) == "memory"
    assert loading_mode(DatasetConfig(synthetic={"rows": 100})) == "memory"  # generated data stays in memory
    assert loading_mode(DatasetConfig(path=str(tmp_path / "missing.csv"))) == "memory"  # its reader names it


# ------------------------------------------------------------------------------------------ the split reader
def _numbered_split(tmp_path: Path, rows: int, chunk_rows: int) -> StreamedSplit:
    """A split whose categorical column 0 holds each row's number (0-based), written in row groups."""
    layout = FeatureLayout((FieldSpec("id", "categorical", rows + 2, "id"), FieldSpec("x", "numeric")))
    writer = SplitWriter(tmp_path / "split.parquet", layout, chunk_rows)
    for start in range(0, rows, 77):  # pieces of another size than the row groups
        ids = np.arange(start, min(start + 77, rows), dtype=np.int32)
        writer.write(EncodedSplit(ids[:, None], ids[:, None].astype(np.float32) / 2, label=(ids % 2).astype(np.float32),
                                  group=(ids // 10).astype(np.int64)))
    assert writer.close() == rows
    return StreamedSplit(tmp_path / "split.parquet", seed=7, shuffle_buffer_rows=150)


def _ids(batches: list) -> np.ndarray:
    return np.concatenate([b.categorical[:, 0].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def test_every_row_once_per_epoch_in_an_order_of_seed_and_epoch(tmp_path: Path) -> None:
    split = _numbered_split(tmp_path, 1_030, 100)
    assert len(split) == 1_030 and split.num_row_groups == 11 and split.row_group_rows[-1] == 30
    epoch0 = list(split.batches(0, 64))
    assert [len(b) for b in epoch0] == [64] * 16 + [6]
    ids = _ids(epoch0)
    assert np.array_equal(np.sort(ids), np.arange(1_030))
    assert np.array_equal(ids, _ids(list(split.batches(0, 64))))  # same (seed, epoch): same order
    assert not np.array_equal(ids, _ids(list(split.batches(1, 64))))  # another epoch: another order
    other_seed = StreamedSplit(split.path, seed=8, shuffle_buffer_rows=150)
    assert not np.array_equal(ids, _ids(list(other_seed.batches(0, 64))))
    batch = epoch0[0]
    assert batch.label is not None and batch.group is not None
    np.testing.assert_array_equal(batch.label.numpy(), batch.categorical[:, 0].numpy() % 2)
    np.testing.assert_array_equal(batch.numeric[:, 0].numpy(), batch.categorical[:, 0].numpy() / 2)
    assert [len(b) for b in split.batches(0, 64, drop_last=True)] == [64] * 16
    assert split.num_batches(64) == 17 and split.num_batches(64, drop_last=True) == 16


def test_the_shuffle_buffer_bounds_how_far_rows_travel(tmp_path: Path) -> None:
    split = _numbered_split(tmp_path, 1_030, 100)
    # The first batch is drawn once the buffer (150 rows) plus one batch (64) is exceeded: from the first three row
    # groups the epoch reads, never a later one.
    order = np.random.default_rng([7, 0, 0]).permutation(np.arange(11))
    first = _ids([next(iter(split.batches(0, 64)))])
    assert set(first // 100) <= set(order[:3].tolist())
    # with no buffer, each batch comes from the row group just read (and the rest held over from the one before)
    unbuffered = StreamedSplit(split.path, seed=7, shuffle_buffer_rows=0)
    assert set(_ids([next(iter(unbuffered.batches(0, 64)))]) // 100) == {order[0]}


def test_ranks_read_disjoint_row_groups_that_cover_the_split(tmp_path: Path) -> None:
    split = _numbered_split(tmp_path, 1_030, 100)
    seen = [_ids(list(split.batches(2, 50, rank=r, world_size=3))) for r in range(3)]
    for rank, ids in enumerate(seen):
        assert set(np.unique(ids // 100)) == set(split.row_groups_of(rank, 3)) == set(range(rank, 11, 3))
        assert len(ids) == len(np.unique(ids)) == split.rows_of(rank, 3)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(1_030))
    assert not np.array_equal(seen[0], _ids(list(split.batches(2, 50, rank=0, world_size=2))))
    with pytest.raises(RecipeError, match=r"dataset\.chunk_rows: the split split has 11 row group\(s\), fewer than the "
                                          "12 ranks"):
        split.row_groups_of(0, 12)


def test_ordered_batches_follow_the_file(tmp_path: Path) -> None:
    split = _numbered_split(tmp_path, 1_030, 100)
    ids = _ids(list(split.ordered_batches(64)))
    assert np.array_equal(ids, np.arange(1_030))
    labels = split.labels()
    assert labels is not None and np.array_equal(labels, (np.arange(1_030) % 2).astype(np.float32))
    groups = split.groups()
    assert groups is not None and np.array_equal(groups, np.arange(1_030) // 10)
    parts = []
    for rank in range(4):
        start, stop = split.ordered_rows(rank, 4)
        part = _ids(list(split.ordered_batches(64, rank, 4)))
        assert np.array_equal(part, np.arange(start, stop))
        parts.append(part)
    assert np.array_equal(np.concatenate(parts), np.arange(1_030))  # rank order is file order


def test_the_fit_counts_crosses_of_the_ids_transform_gives() -> None:
    frame = _table(5_000, seed=9)
    processor = FeatureProcessor(CROSSED, "label").fit(frame)
    names = CROSSED.pairable()
    # the join does not keep the row order (counting does not need it): compare the rows as a multiset
    lazy = processor._id_columns(frame.lazy(), frame.schema, names).collect(engine="streaming").to_numpy()
    expected = processor.transform(frame).categorical
    assert lazy.shape == expected.shape
    np.testing.assert_array_equal(lazy[np.lexsort(lazy.T)], expected[np.lexsort(expected.T)])

"""From a recipe's ``dataset`` and ``features`` sections to encoded, cached train/valid/test splits (the cache itself:
:mod:`ctrlab.data.cache`).

Two ways, chosen by ``dataset.loading`` (:func:`loading_mode`):

* in memory: every split is read as a polars frame, the processor is fitted on the training frame, and the encoded
  splits are held as arrays (:attr:`PreparedData.splits`);
* streamed (out of core): the files are scanned lazily, the processor is fitted with streaming aggregations
  (:meth:`FeatureProcessor.fit_lazy`), each split is encoded chunk by chunk straight into a cache entry as parquet,
  one row group per ``dataset.chunk_rows`` rows, and training reads them back a row group at a time
  (:attr:`PreparedData.streams`, :class:`~ctrlab.data.stream.StreamedSplit`). Memory holds the fitted statistics
  and a few chunks, never a split.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow.parquet as pq
from rich.console import Console

from ctrlab.config.dataset import DatasetConfig, SplitConfig
from ctrlab.config.features import FeaturesConfig
from ctrlab.data.cache import PROCESSOR_FILE, EncodedCache, cache_key, default_cache_dir, key_payload
from ctrlab.data.chunks import RawChunks
from ctrlab.data.crosses import resolve_crosses
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.processor import ROW_COLUMN, FeatureProcessor, GroupIds
from ctrlab.data.readers import check_data_file, infer_format, read_table
from ctrlab.data.splits import SPLITS, split_code_expr, split_codes, split_frame
from ctrlab.data.stream import SplitWriter, StreamedSplit
from ctrlab.errors import DataError, RecipeError
from ctrlab.ranking.select import apply_selection

TRUE_PROBABILITY_COLUMN = "__true_click_probability"


@dataclass
class RawSplits:
    """Raw train/valid/test frames plus what the source says about them (label, group column, default
    features, and a fingerprint that changes whenever the data does)."""

    frames: dict[str, pl.DataFrame]
    label: str
    group_by: str | None
    default_features: FeaturesConfig | None
    fingerprint: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class PreparedData:
    """The fitted processor and the encoded splits; ``features`` is what was actually used.

    In memory, ``splits`` holds every split as arrays and ``raw.frames`` the raw frames. Streamed, ``splits`` and
    ``raw.frames`` are empty and ``streams`` holds every split as a :class:`StreamedSplit` over its parquet file
    (in the cache entry, or, when there is no cache, in ``workdir``: a temporary folder removed once neither this
    object nor any of its streams is left)."""

    processor: FeatureProcessor
    splits: dict[str, EncodedSplit]
    features: FeaturesConfig
    label: str
    group_by: str | None
    raw: RawSplits
    cache_hit: bool = False
    streams: dict[str, StreamedSplit] | None = None
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def streamed(self) -> bool:
        """Whether the splits are streamed from disk (:attr:`streams`) rather than held (:attr:`splits`)."""
        return self.streams is not None

    def rows(self) -> dict[str, int]:
        """Rows per split, either way."""
        if self.streams is not None:
            return {s: len(v) for s, v in self.streams.items()}
        return {s: len(v) for s, v in self.splits.items()}


# ----------------------------------------------------------------------------------------- fingerprints
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes, memoised per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def resolve_data_dir(config: DatasetConfig, explicit: str | Path | None = None) -> Path | None:
    """``--data-dir`` option > ``dataset.data_dir`` > ``$CTRLAB_DATA_DIR``."""
    for candidate in (explicit, config.data_dir, os.environ.get("CTRLAB_DATA_DIR")):
        if candidate:
            return Path(candidate).expanduser()
    return None


def _resolve_file(name: str, data_dir: Path | None) -> Path:
    path = Path(name).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = data_dir / path
    return path


# ---------------------------------------------------------------------------------------------- sources
def data_seed(config: DatasetConfig, recipe_seed: int) -> int:
    """The seed that draws synthetic rows and random splits: ``dataset.seed``, else the recipe's."""
    return config.seed if config.seed is not None else recipe_seed


def load_raw_splits(config: DatasetConfig, seed: int, data_dir: str | Path | None = None) -> RawSplits:
    """Read (or generate) the data a ``dataset`` section names and split it (``seed``: the recipe's, which
    ``dataset.seed`` replaces when set)."""
    seed = data_seed(config, seed)
    base = resolve_data_dir(config, data_dir)
    if config.synthetic is not None:
        return _synthetic_splits(config, seed)
    if config.card is not None:
        return _card_splits(config, seed, base)
    return _file_splits(config, seed, base)


def _synthetic_splits(config: DatasetConfig, seed: int) -> RawSplits:
    from ctrlab.datasets.synthetic import generate

    assert config.synthetic is not None
    data = generate(config.synthetic, seed)
    frame = data.frame.with_columns(pl.Series(TRUE_PROBABILITY_COLUMN, data.click_probability))
    split = config.split or SplitConfig(kind="random")
    frames = split_frame(frame, split, seed, "synthetic data")
    spec = data.feature_spec()
    return RawSplits(
        frames=frames, label="label", group_by=config.group_by, default_features=FeaturesConfig.model_validate(spec),
        fingerprint={"synthetic": config.synthetic.model_dump(mode="json"), "seed": seed,
                     "split": split.model_dump(mode="json")},
        sources={s: f"synthetic {s} split" for s in SPLITS},
    )


def _card_splits(config: DatasetConfig, seed: int, base: Path | None) -> RawSplits:
    from ctrlab.datasets.cards import load_card

    assert config.card is not None
    card = load_card(config.card)
    if base is None:
        raise DataError(f"dataset card '{card.name}' needs a data directory: set CTRLAB_DATA_DIR or pass --data-dir")
    loaded = card.load(base, verify=config.verify_checksums)
    split = config.split or card.split
    if split.kind == "given":
        if "all" in loaded and set(SPLITS) - set(loaded):
            raise RecipeError(f"dataset.split: card '{card.name}' has one table; choose a random or time split")
        frames = {s: loaded[s] for s in SPLITS}
    else:
        table = loaded["all"] if "all" in loaded else pl.concat([loaded[s] for s in SPLITS], how="vertical")
        frames = split_frame(table, split, seed, f"dataset card '{card.name}'")
    if card.drop_columns:
        frames = {s: f.drop([c for c in card.drop_columns if c in f.columns]) for s, f in frames.items()}
    files = {role: file_digest(_resolve_file(spec.path, base)) for role, spec in card.files.items()}
    return RawSplits(
        frames=frames, label=card.label, group_by=config.group_by or card.group_by, default_features=card.features,
        fingerprint={"card": card.model_dump(mode="json"), "files": files, "split": split.model_dump(mode="json"),
                     "seed": seed},
        sources={s: f"{card.name}:{s}" for s in SPLITS},
    )


def _read(config: DatasetConfig, name: str, base: Path | None) -> tuple[pl.DataFrame, Path]:
    path = _resolve_file(name, base)
    frame = read_table(path, config.format, separator=config.separator, header=config.header, columns=config.columns)
    return frame, path


def _file_splits(config: DatasetConfig, seed: int, base: Path | None) -> RawSplits:
    if config.train is not None:
        frames, paths = {}, {}
        for split_name in SPLITS:
            frames[split_name], paths[split_name] = _read(config, getattr(config, split_name), base)
        split = SplitConfig(kind="given")
    else:
        assert config.path is not None
        table, path = _read(config, config.path, base)
        if ROW_COLUMN in table.columns:
            raise DataError(f"{path}: column name '{ROW_COLUMN}' is reserved by ctrlab (it numbers the file's rows); "
                            "rename that column")
        split = config.split or SplitConfig(kind="random")
        if split.kind == "given":
            raise RecipeError("dataset.split: one data file needs a random or time split")
        # Remember each row's place in the file so that errors in a split name the file's row, not the split's.
        table = table.with_row_index(ROW_COLUMN, offset=1)
        frames = split_frame(table, split, seed, str(path))
        paths = {s: path for s in SPLITS}
    fingerprint = {
        "files": {s: file_digest(p) for s, p in paths.items()},
        "read": config.model_dump(mode="json", include={"format", "separator", "header", "columns"}),
        "split": split.model_dump(mode="json"), "seed": seed,
    }
    sources = {s: str(p) if split.kind == "given" else f"{p} ({s} split)" for s, p in paths.items()}
    return RawSplits(frames, config.label, config.group_by, None, fingerprint, sources)


# ----------------------------------------------------------------------------------------------- encode
def resolve_features(features: FeaturesConfig, raw: RawSplits) -> FeaturesConfig:
    """The recipe's features, or the data source's defaults (keeping the recipe's ``select`` and ``crosses``) when it
    names none."""
    if not features.is_empty:
        return features
    if raw.default_features is None:
        raise RecipeError("features: the recipe names no features and the data source has no defaults")
    return raw.default_features.model_copy(update={"select": features.select, "crosses": features.crosses})


def prepare_data(config: DatasetConfig, features: FeaturesConfig, seed: int, data_dir: str | Path | None = None,
                 console: Console | None = None) -> PreparedData:
    """Load, split, fit the processor on train, encode all splits; reuse the cache when data and schema match.
    In memory or streamed as :func:`loading_mode` decides (see :class:`PreparedData`)."""
    console = console or Console(stderr=True)
    seed = data_seed(config, seed)
    if loading_mode(config, data_dir) == "stream":
        return _prepare_streamed(config, features, seed, resolve_data_dir(config, data_dir), console)
    raw = load_raw_splits(config, seed, data_dir)
    features = resolve_crosses(apply_selection(resolve_features(features, raw)))
    label, group_by = raw.label, raw.group_by
    store = EncodedCache(default_cache_dir(config), console) if config.cache else None
    if store is not None:
        payload = key_payload(raw.fingerprint, features, label, group_by)
        key = cache_key(raw.fingerprint, features, label, group_by)
        cached = store.read(key, payload)
        if cached is not None:
            console.print(f"data: encoded splits from cache {store.entry(key)}", highlight=False, markup=False,
                          soft_wrap=True)
            return PreparedData(cached.processor, cached.splits, features, label, group_by, raw, cache_hit=True)

    processor = FeatureProcessor(features, label, group_by).fit(raw.frames["train"], raw.sources["train"])
    splits = {s: processor.transform(raw.frames[s], raw.sources[s]) for s in SPLITS}
    if store is not None:
        store.write(key, payload, processor, splits)
    return PreparedData(processor, splits, features, label, group_by, raw)


# ------------------------------------------------------------------------------------------ loading mode
AUTO_STREAM_MEMORY_SHARE = 0.25
"""``dataset.loading: auto`` streams when the input files' in-memory size exceeds this share of the memory available
to the process (``MemAvailable``, a cgroup limit, or ``$CTRLAB_MEMORY_LIMIT_BYTES``). A quarter, because the
in-memory path holds the raw frames, the split copies, the encoded arrays and their tensors at once: three to four
times the table."""
GZIP_EXPANSION = 4
"""How much larger than on disk a gzipped text file is taken to be (CSV of ids and counts compresses 3-5x)."""


def _recipe_files(config: DatasetConfig, base: Path | None) -> list[Path]:
    names = [config.path] if config.path is not None else [config.train, config.valid, config.test]
    return [_resolve_file(name, base) for name in names if name is not None]


def _in_memory_bytes(path: Path, fmt: str | None) -> int:
    """What ``path`` takes as a table: the uncompressed size for parquet, the text's size otherwise."""
    if (fmt or infer_format(path)) == "parquet":
        try:
            metadata = pq.ParquetFile(path).metadata
            return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader, in either mode
            return path.stat().st_size
    size = path.stat().st_size
    return size * GZIP_EXPANSION if path.suffix.lower() == ".gz" else size


def loading_mode(config: DatasetConfig, data_dir: str | Path | None = None) -> Literal["memory", "stream"]:
    """``memory`` or ``stream`` for ``config`` (see :class:`~ctrlab.config.dataset.DatasetConfig`: ``auto`` streams
    files that can be streamed once their in-memory size exceeds :data:`AUTO_STREAM_MEMORY_SHARE` of the available
    memory)."""
    if config.loading != "auto":
        return config.loading
    if config.synthetic is not None or config.card is not None:
        return "memory"
    if config.path is not None and config.split is not None and config.split.kind == "time":
        return "memory"
    files = _recipe_files(config, resolve_data_dir(config, data_dir))
    try:
        if not all(path.is_file() for path in files) or any(not _streamable(path, config) for path in files):
            return "memory"  # the in-memory reader names a missing or unreadable file
        size = sum(_in_memory_bytes(path, config.format) for path in files)
    except (OSError, DataError):
        return "memory"
    from ctrlab.train.footprint import available_memory  # the trainer's notion of "available", one definition

    limit = available_memory("cpu")
    return "stream" if limit is not None and size > AUTO_STREAM_MEMORY_SHARE * limit.bytes else "memory"


# ------------------------------------------------------------------------------------------- streaming
SPLIT_COLUMN = "__ctrlab_split"


@dataclass
class _StreamPlan:
    """The files of a streamed recipe: one per split (``given``), or one file split at random."""

    files: dict[str, Path]
    split: SplitConfig
    split_seed: int
    fingerprint: dict[str, Any]
    sources: dict[str, str]


def _stream_plan(config: DatasetConfig, seed: int, base: Path | None, chunk_rows: int) -> _StreamPlan:
    if config.synthetic is not None or config.card is not None:
        raise RecipeError("dataset.loading: stream reads data files (train/valid/test or path); synthetic data and "
                          "dataset cards are held in memory (use loading: auto or memory)")
    if config.train is not None:
        files = {s: _resolve_file(getattr(config, s), base) for s in SPLITS}
        split = SplitConfig(kind="given")
    else:
        assert config.path is not None
        path = _resolve_file(config.path, base)
        files = {s: path for s in SPLITS}
        split = config.split or SplitConfig(kind="random")
        if split.kind != "random":
            raise RecipeError(f"dataset.split: one data file is streamed with a random split, not a {split.kind} "
                              "split (use dataset.loading: memory, or give train/valid/test files)")
    for path in set(files.values()):
        if path.is_file() and not _streamable(path, config):
            raise RecipeError(f"dataset.loading: {path} is a libFM file, which is parsed whole; use loading: memory")
    fingerprint = {
        "files": {s: file_digest(p) if p.is_file() else str(p) for s, p in files.items()},
        "read": config.model_dump(mode="json", include={"format", "separator", "header", "columns"}),
        "split": split.model_dump(mode="json"), "seed": seed,
        # The streamed random split differs from the in-memory one, and readers depend on the row groups.
        "loading": {"mode": "stream", "chunk_rows": chunk_rows},
    }
    sources = {s: str(p) if split.kind == "given" else f"{p} ({s} split)" for s, p in files.items()}
    split_seed = split.seed if split.seed is not None else seed
    return _StreamPlan(files, split, split_seed, fingerprint, sources)


def _streamable(path: Path, config: DatasetConfig) -> bool:
    """CSV/TSV (any separator, plain or gzip) and parquet stream; libFM is parsed whole."""
    return (config.format or infer_format(path)) != "libfm"


@dataclass
class _Source:
    """One input file of the streamed pipeline: ``rows``, a lazy scan with :data:`ROW_COLUMN` for the fit's
    aggregations, and ``parquet``, the parquet file that :meth:`chunks` reads for encoding (the file itself, or its
    staged copy for text, which already numbers its rows)."""

    rows: pl.LazyFrame
    parquet: Path
    numbered: bool

    def chunks(self, chunk_rows: int) -> RawChunks:
        # pyarrow reads one row group at a time: polars' batch iterators read ahead of a slower consumer (the
        # encoding), buffering up to the whole file.
        return RawChunks(self.parquet, "parquet", chunk_rows=chunk_rows, row_numbers=not self.numbered)


def _scan_source(config: DatasetConfig, path: Path, staging: Path, chunk_rows: int) -> _Source:
    """``path`` as a :class:`_Source`. Text is first read chunk by chunk (:mod:`ctrlab.data.chunks`) into a parquet
    file under ``staging``, with its row numbers: parsed once, it is then read one column per query by the fit and
    in chunks by the encoding, like a parquet source."""
    check_data_file(path)
    if (config.format or infer_format(path)) != "parquet":
        staged = staging / f"{file_digest(path)}.parquet"
        if not staged.exists():  # one file split three ways is staged once
            chunks = RawChunks(path, config.format, chunk_rows=chunk_rows, separator=config.separator,
                               header=config.header, columns=config.columns, row_numbers=True)
            writer: pq.ParquetWriter | None = None
            try:
                for frame in chunks:
                    table = frame.to_arrow()
                    if writer is None:
                        writer = pq.ParquetWriter(staged, table.schema, compression="lz4")
                    writer.write_table(table, row_group_size=chunk_rows)
            finally:
                if writer is not None:
                    writer.close()
        return _Source(pl.scan_parquet(staged), staged, numbered=True)
    scan = pl.scan_parquet(path)
    try:
        names = scan.collect_schema().names()
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # polars and pyarrow raise several error types for damaged files
        raise DataError(f"{path}: cannot read parquet file ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if rows == 0:
        raise DataError(f"{path}: file has no data rows")
    if ROW_COLUMN in names:
        raise DataError(f"{path}: column name '{ROW_COLUMN}' is reserved by ctrlab (it numbers the file's rows); "
                        "rename that column")
    return _Source(scan.with_row_index(ROW_COLUMN, offset=1), path, numbered=False)


def _encode_streamed(config: DatasetConfig, plan: _StreamPlan, features: FeaturesConfig, label: str,
                     group_by: str | None, folder: Path) -> tuple[FeatureProcessor, dict[str, int]]:
    """Fit the processor on the training split and encode every split chunk by chunk into ``folder``
    (``processor.json``, ``<split>.parquet``); returns the processor and the rows per split."""
    chunk_rows = config.chunk_rows
    staging = folder / "staging"
    staging.mkdir()
    writers: dict[str, SplitWriter] = {}
    try:
        # passes: (source, {split code -> split}); one pass over a randomly split file feeds all three writers.
        passes: list[tuple[_Source, dict[int, str]]] = []
        splits: dict[str, pl.LazyFrame] = {}
        if plan.split.kind == "given":
            for s in SPLITS:
                source = _scan_source(config, plan.files[s], staging, chunk_rows)
                splits[s] = source.rows
                passes.append((source, {0: s}))
        else:
            path = plan.files["train"]
            source = _scan_source(config, path, staging, chunk_rows)
            code = split_code_expr(pl.col(ROW_COLUMN), plan.split.fractions, plan.split_seed)
            counts = dict(source.rows.group_by(code.alias(SPLIT_COLUMN)).agg(pl.len())
                          .collect(engine="streaming").iter_rows())
            total = sum(counts.values())
            for index, s in enumerate(SPLITS):
                if not counts.get(index):
                    raise DataError(f"{path}: the {s} split is empty ({total} rows, fractions "
                                    f"{list(plan.split.fractions)})")
                splits[s] = source.rows.filter(code == index)
            passes.append((source, dict(enumerate(SPLITS))))
        processor = FeatureProcessor(features, label, group_by).fit_lazy(splits["train"], plan.sources["train"],
                                                                         workdir=staging)
        processor.save(folder / PROCESSOR_FILE)
        groups: dict[str, GroupIds] = {}
        if group_by is not None:
            for s in SPLITS:
                if group_by in splits[s].collect_schema():
                    groups[s] = GroupIds.of(splits[s], group_by)
        layout = processor.layout
        writers = {s: SplitWriter(folder / f"{s}.parquet", layout, chunk_rows) for s in SPLITS}
        for source, routes in passes:
            for batch in source.chunks(chunk_rows):
                if len(routes) == 1:
                    parts = {routes[0]: batch}
                else:  # the same split as the lazy filter above, row by row (split_codes == split_code_expr)
                    codes = split_codes(batch.get_column(ROW_COLUMN).to_numpy(), plan.split.fractions,
                                        plan.split_seed)
                    parts = {s: batch.filter(pl.Series(codes == index)) for index, s in routes.items()}
                for s, part in parts.items():
                    if part.height:
                        writers[s].write(processor.transform(part, plan.sources[s], groups=groups.get(s)))
        return processor, {s: writer.close() for s, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)


def _prepare_streamed(config: DatasetConfig, features: FeaturesConfig, seed: int, base: Path | None,
                      console: Console) -> PreparedData:
    plan = _stream_plan(config, seed, base, config.chunk_rows)
    label, group_by = config.label, config.group_by
    raw = RawSplits({}, label, group_by, None, plan.fingerprint, plan.sources)
    features = resolve_crosses(apply_selection(resolve_features(features, raw)))

    def opened(processor: FeatureProcessor, paths: dict[str, Path], cache_hit: bool,
               workdir: tempfile.TemporaryDirectory[str] | None = None) -> PreparedData:
        streams = {s: StreamedSplit(paths[s], seed=seed, shuffle_buffer_rows=config.shuffle_buffer_rows, name=s,
                                    keep_alive=workdir) for s in SPLITS}
        return PreparedData(processor, {}, features, label, group_by, raw, cache_hit, streams, workdir)

    store = EncodedCache(default_cache_dir(config), console) if config.cache else None
    payload = key_payload(raw.fingerprint, features, label, group_by)
    key = cache_key(raw.fingerprint, features, label, group_by)
    if store is not None:
        cached = store.read_streamed(key, payload)
        if cached is not None:
            console.print(f"data: encoded splits from cache {store.entry(key)} (streamed)", highlight=False,
                          markup=False, soft_wrap=True)
            return opened(cached.processor, cached.paths, cache_hit=True)

    fitted: list[FeatureProcessor] = []
    started = time.perf_counter()

    def fill(folder: Path) -> dict[str, int]:
        processor, rows = _encode_streamed(config, plan, features, label, group_by, folder)
        fitted.append(processor)
        return rows

    entry = store.build(key, payload, fill) if store is not None else None
    workdir = None
    if entry is None:
        # No cache, or one that cannot be written: the splits live in a temporary folder as long as the data does.
        workdir = tempfile.TemporaryDirectory(prefix="ctrlab-stream-")
        entry = Path(workdir.name)
        fitted.clear()
        fill(entry)
    seconds = time.perf_counter() - started
    data = opened(fitted[-1], {s: entry / f"{s}.parquet" for s in SPLITS}, cache_hit=False, workdir=workdir)
    rows = sum(data.rows().values())
    console.print(f"data: streamed {rows:,} rows in {seconds:.1f}s ({rows / max(seconds, 1e-9):,.0f} rows/s) into "
                  f"{entry}", highlight=False, markup=False, soft_wrap=True)
    return data

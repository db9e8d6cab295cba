"""Recipe section ``dataset``: where the rows come from and how they are split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ctrlab.config.base import MAX_BATCH, MAX_FIELDS, MAX_SEED, Int, Section
from ctrlab.datasets.synthetic import SyntheticConfig


class SplitConfig(Section):
    """How one table becomes train/valid/test. ``given`` means separate files (or a card's own split)."""

    kind: Literal["given", "random", "time"] = "given"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    time_column: str | None = None
    seed: Int | None = Field(None, ge=0, le=MAX_SEED, description="defaults to the recipe seed")

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if abs(sum(self.fractions) - 1.0) > 1e-6 or min(self.fractions) < 0:
            raise ValueError(f"fractions must be non-negative and sum to 1, got {list(self.fractions)}")
        if self.kind == "time" and not self.time_column:
            raise ValueError("a time split needs time_column")
        return self


class DatasetConfig(Section):
    """One of: a dataset ``card`` (see ``ctrlab datasets list``), ``synthetic`` data, or files.

    Files: ``train`` + ``valid`` + ``test`` (split ``given``), or one ``path`` split randomly or by time. Relative
    paths are resolved against ``data_dir`` when set, else the working directory.

    ``loading`` says whether the splits are held in memory or streamed (:mod:`ctrlab.data.pipeline`):

    * ``memory``: every split is read, encoded and held as arrays;
    * ``stream``: the files are read in chunks of ``chunk_rows`` rows by polars' streaming engine, the processor is
      fitted with streaming aggregations, and each split is encoded chunk by chunk into the cache as parquet (one
      row group per chunk), from which training reads it back a row group at a time through a shuffle buffer of
      ``shuffle_buffer_rows`` rows. Files only (CSV/TSV, plain or gzip, or parquet; not libFM), with a given or
      ``random`` split; the streamed random split assigns rows by a hash of (seed, row), not by the in-memory
      permutation, so it is a different split of the same fractions;
    * ``auto`` (the default): ``stream`` when the recipe names files that can be streamed and their in-memory size
      (bytes on disk for text, four times that when gzipped, the uncompressed size for parquet) exceeds
      ``AUTO_STREAM_MEMORY_SHARE`` (a quarter) of the memory available to the process; otherwise ``memory``.
      Synthetic data and dataset cards are always held in memory.
    """

    card: str | None = None
    synthetic: SyntheticConfig | None = None
    seed: Int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the data: synthetic rows and random "
                             "splits (default: the recipe seed), so that runs of several seeds can share one data set")
    data_dir: str | None = Field(None, description="defaults to $CTRLAB_DATA_DIR or the --data-dir option")
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    path: str | None = None
    format: Literal["csv", "tsv", "parquet", "libfm"] | None = None
    separator: str | None = None
    header: bool = True
    columns: list[str] | None = Field(None, max_length=MAX_FIELDS)
    label: str = "label"
    group_by: str | None = Field(None, description="column whose values group rows for gAUC (e.g. a user id)")
    split: SplitConfig | None = None
    cache: bool = True
    cache_dir: str | None = Field(None, description="defaults to $CTRLAB_CACHE_DIR or ~/.cache/ctrlab")
    verify_checksums: bool = True
    loading: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory, stream (out of core, from files), or auto: stream when the files are large "
                            "for the available memory")
    chunk_rows: Int = Field(262_144, ge=1, le=MAX_BATCH,
                            description="streamed loading: rows read and encoded at a time, and rows per row group of "
                                        "the encoded splits")
    shuffle_buffer_rows: Int = Field(1_048_576, ge=0, le=2**31,
                                     description="streamed loading: rows a training epoch holds back to mix row "
                                                 "groups (0: rows are shuffled within each row group only)")

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetConfig":
        files = self.train is not None or self.path is not None
        sources = [n for n, present in (("card", self.card), ("synthetic", self.synthetic), ("files", files))
                   if present]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one data source: card, synthetic, or files (train/valid/test or path); "
                f"got {', '.join(sources) or 'none'}"
            )
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            twice = sorted({c for c in self.columns if self.columns.count(c) > 1})
            raise ValueError(f"columns: {', '.join(twice)} named more than once")
        if self.train is not None and self.path is not None:
            raise ValueError("give either train/valid/test or path, not both")
        if self.train is not None and (self.valid is None or self.test is None):
            raise ValueError("train needs valid and test files too (or use path with a split)")
        if self.loading == "stream":
            if not files:
                raise ValueError("loading: stream reads data files (train/valid/test or path); synthetic data and "
                                 "dataset cards are held in memory (use loading: auto or memory)")
            if self.format == "libfm":
                raise ValueError("loading: stream reads CSV/TSV or parquet; libFM files are parsed whole "
                                 "(use loading: memory)")
            if self.path is not None and self.split is not None and self.split.kind == "time":
                raise ValueError("loading: stream splits one file at random; a time split sorts the whole file "
                                 "(use loading: memory, or give train/valid/test files)")
        return self

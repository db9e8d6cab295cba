"""What ``ctrlab rank`` ranks: a recipe's training split and features, or every column of one data file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrlab.errors import DataError
from ctrlab.ranking.encode import Kind

RECIPE_SUFFIXES = (".yaml", ".yml")


class ParquetColumns:
    """A parquet file read one column at a time (optionally a fixed sample of its rows), so that ranking holds only
    the integer codes of the columns done so far, never the whole table. Quacks like the parts of a polars
    DataFrame that ranking uses: ``height``, ``columns`` and ``frame[name]``."""

    def __init__(self, path: Path, source: Path | None = None) -> None:
        self.path = path
        try:
            self.columns = list(pl.read_parquet_schema(path))
            self.height = int(pl.scan_parquet(path).select(pl.len()).collect().item())
        except Exception as exc:  # polars raises several error types for corrupt files
            raise DataError(f"{source or path}: cannot read parquet file ({str(exc).splitlines()[0]})") from None
        self.rows: np.ndarray | None = None

    def sample(self, n: int, seed: int) -> None:
        self.rows = np.sort(np.random.default_rng(seed).choice(self.height, n, replace=False))
        self.height = n

    def __getitem__(self, name: str) -> pl.Series:
        column = pl.read_parquet(self.path, columns=[name])[name]
        return column if self.rows is None else column.gather(self.rows)


@dataclass
class RankInput:
    """The rows to rank, the label column, the features and their kinds (None = infer), and where they came from."""

    frame: pl.DataFrame | ParquetColumns
    target: str
    kinds: dict[str, Kind | None]
    source: str
    recipe: Any = None


def is_recipe(path: Path) -> bool:
    return path.suffix.lower() in RECIPE_SUFFIXES


def load_rank_input(path: Path, overrides: list[str], target: str | None, sample: int | None, seed: int,
                    data_dir: str | Path | None = None) -> RankInput:
    """Read ``path`` (a recipe or a csv/tsv/parquet/libfm file), optionally keeping a uniform sample of rows."""
    if is_recipe(path):
        loaded = _from_recipe(path, overrides, target, data_dir)
    else:
        if overrides:
            raise DataError(f"{path}: overrides ({overrides[0]}) apply to recipes, not to data files")
        loaded = _from_file(path, target or "label")
    if sample is not None:
        if sample < 1:
            raise DataError(f"--sample must be a positive number of rows, got {sample}")
        if sample < loaded.frame.height:
            if isinstance(loaded.frame, ParquetColumns):
                loaded.frame.sample(sample, seed)
            else:
                loaded.frame = loaded.frame.sample(n=sample, seed=seed)
    return loaded


def _from_recipe(path: Path, overrides: list[str], target: str | None, data_dir: str | Path | None) -> RankInput:
    from ctrlab.config.loader import load_recipe
    from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, load_raw_splits, resolve_features

    recipe = load_recipe(path, overrides)
    raw = load_raw_splits(recipe.dataset, recipe.seed, data_dir)
    # Rank on the training split only: choosing features on test rows would leak into the test score.
    frame = raw.frames["train"].drop(TRUE_PROBABILITY_COLUMN, strict=False)
    features = resolve_features(recipe.features, raw)  # its select is not applied: every feature gets ranked
    kinds: dict[str, Kind | None] = {f.name: "categorical" for f in features.categorical}
    kinds.update({f.name: "numeric" for f in features.numeric})
    # Sequence features (lists of ids) are not ranked: their information is in the set, not in one value.
    return RankInput(frame, target or raw.label, kinds, raw.sources.get("train", str(path)), recipe)


def _csv_as_parquet(path: Path, separator: str) -> Path:
    """Stream a delimited file into a temporary parquet file (polars' streaming engine, bounded memory), so that it
    can then be read one column at a time. The schema is inferred (unlike training's all-strings read) so that
    numeric columns are cut into quantiles. The file is removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ctrlab-rank-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = folder / "data.parquet"
    pl.scan_csv(path, separator=separator, infer_schema_length=10_000).sink_parquet(target)
    return target


def _from_file(path: Path, target: str) -> RankInput:
    from ctrlab.data.readers import infer_format, read_table

    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():  # a FIFO or a device would block the reader forever
        raise DataError(f"{path}: is not a regular file (a pipe or a device?), expected a data file")
    fmt = infer_format(path)
    frame: pl.DataFrame | ParquetColumns
    try:
        if fmt == "parquet":
            frame = ParquetColumns(path)
        elif fmt in ("csv", "tsv") and not str(path).lower().endswith(".gz"):
            frame = ParquetColumns(_csv_as_parquet(path, "," if fmt == "csv" else "\t"), source=path)
        else:
            frame = read_table(path, fmt)
    except DataError:
        raise
    except Exception as exc:  # polars raises several error types for malformed files
        raise DataError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    if frame.height == 0:
        raise DataError(f"{path}: file has no data rows")
    if target not in frame.columns:
        raise DataError(f"{path}: no label column '{target}'; name it with --target")
    kinds: dict[str, Kind | None] = {c: None for c in frame.columns if c != target}
    return RankInput(frame, target, kinds, str(path))

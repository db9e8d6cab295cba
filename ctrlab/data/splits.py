"""Turning one table into train / valid / test."""

from __future__ import annotations

import numpy as np
import polars as pl

from ctrlab.config.dataset import SplitConfig
from ctrlab.errors import DataError

SPLITS = ("train", "valid", "test")


def _cut_points(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    first = int(round(n * fractions[0]))
    second = first + int(round(n * fractions[1]))
    return first, min(second, n)


def split_frame(frame: pl.DataFrame, config: SplitConfig, seed: int, source: str) -> dict[str, pl.DataFrame]:
    """Random split (seeded permutation) or time-ordered split (stable sort on ``time_column``)."""
    n = frame.height
    if config.kind == "random":
        order = np.random.default_rng(config.seed if config.seed is not None else seed).permutation(n)
    elif config.kind == "time":
        column = config.time_column
        if column not in frame.columns:
            raise DataError(f"{source}: time column '{column}' (dataset.split.time_column) is not in the data")
        times = frame.get_column(column)
        if not times.dtype.is_numeric() and not times.dtype.is_temporal():
            if times.dtype != pl.String:
                raise DataError(f"{source}: time column '{column}' holds {times.dtype} values; it needs numbers, "
                                "dates or date-times")
            numeric = times.cast(pl.Float64, strict=False)
            try:
                times = numeric if numeric.null_count() == times.null_count() else times.str.to_datetime(strict=False)
            except pl.exceptions.PolarsError:  # no single date format fits the column's text
                raise DataError(f"{source}: time column '{column}' holds text that is neither numbers nor dates in "
                                "one format") from None
        if times.null_count():
            row = int(times.is_null().arg_true()[0])
            raise DataError(f"{source}: column '{column}' row {row + 1}: time value is missing or unparseable")
        order = np.argsort(times.to_physical().to_numpy(), kind="stable")
    else:
        raise ValueError("a 'given' split needs separate files")
    first, second = _cut_points(n, config.fractions)
    parts = {"train": order[:first], "valid": order[first:second], "test": order[second:]}
    for name, index in parts.items():
        if len(index) == 0:
            raise DataError(f"{source}: the {name} split is empty ({n} rows, fractions {list(config.fractions)})")
    return {name: frame[np.sort(index) if config.kind == "random" else index] for name, index in parts.items()}

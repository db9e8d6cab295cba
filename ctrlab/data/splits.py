"""Turning one table into train / valid / test."""

from __future__ import annotations

import numpy as np
import polars as pl

from ctrlab.config.dataset import SplitConfig
from ctrlab.errors import DataError
from ctrlab.utils.hashing import splitmix64

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


# ------------------------------------------------------------------------------------- streamed random split
# SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer whose output passes BigCrush. Written twice, as
# polars expressions (the streamed pipeline filters lazily) and in numpy (the reference the tests compare with);
# both wrap modulo 2**64, polars' UInt64 multiplication included.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_SPLIT_SALT = 0x73706C6974  # "split": a stream of its own, apart from the hash constants of ctrlab.utils.hashing


def _seed_state(seed: int) -> int:
    return splitmix64(seed ^ _SPLIT_SALT)


def split_codes(rows: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """The streamed random split of file rows ``rows`` (1-based): 0 train, 1 valid, 2 test (int8).

    Row ``r`` goes to the split its uniform number ``u = SplitMix64(seed, r) / 2**64`` falls in (train below
    ``fractions[0]``, valid below ``fractions[0] + fractions[1]``, test above), so a row's split depends on the seed
    and its own row number only: no split has to be materialised, any chunking of the file gives the same split, and
    the split sizes are binomial around the fractions (not the exact rounded counts of :func:`split_frame`, whose
    permutation needs every row at once). The two random splits therefore differ; the loading mode is part of the
    cache key."""
    with np.errstate(over="ignore"):
        z = np.uint64(_seed_state(seed)) + rows.astype(np.uint64) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    first, second = _thresholds(fractions)
    return np.where(u < first, 0, np.where(u < second, 1, 2)).astype(np.int8)


def split_code_expr(rows: pl.Expr, fractions: tuple[float, float, float], seed: int) -> pl.Expr:
    """:func:`split_codes` as a polars expression over the 1-based row-number column ``rows`` (Int8)."""
    def u64(value: int) -> pl.Expr:
        return pl.lit(value, dtype=pl.UInt64)

    def shifted(z: pl.Expr, bits: int) -> pl.Expr:
        return z // u64(1 << bits)

    z = u64(_seed_state(seed)) + rows.cast(pl.UInt64) * u64(_GOLDEN)
    z = z.xor(shifted(z, 30)) * u64(_MIX1)
    z = z.xor(shifted(z, 27)) * u64(_MIX2)
    z = z.xor(shifted(z, 31))
    u = shifted(z, 11).cast(pl.Float64) * 2.0**-53
    first, second = _thresholds(fractions)
    return pl.when(u < first).then(0).when(u < second).then(1).otherwise(2).cast(pl.Int8)


def _thresholds(fractions: tuple[float, float, float]) -> tuple[float, float]:
    # A fraction of 0 gets no row at all (u < 0 never holds); the last split takes everything above the second cut.
    return float(fractions[0]), float(fractions[0] + fractions[1])

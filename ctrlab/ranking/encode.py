"""Columns to integer codes for counting: categorical values hashed and factorised, numbers cut at quantiles.

Every later score is a function of contingency counts, so a column only has to become an array of small integer
codes once. Strings go through polars' 64-bit hash and a hash-table factorisation (no sorting, no Python loop over
rows); numbers are cut at the quantiles of their non-missing values. Missing values get a code of their own, so
"missing" can carry signal like any other value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import polars as pl

Kind = Literal["categorical", "numeric"]

#: integer columns with more distinct values than this are treated as numbers (counts, prices), not ids
MAX_INTEGER_CATEGORIES = 1000


@dataclass
class EncodedColumn:
    """One feature as integer codes ``0..cardinality-1`` plus the facts the data-quality checks need.

    ``codes`` are numbered in order of first appearance, so two columns that are relabellings of each other have
    byte-identical codes and the same ``fingerprint``.
    """

    name: str
    kind: Kind
    codes: np.ndarray
    cardinality: int
    distinct_values: int
    missing_share: float
    top_share: float
    fingerprint: str


def infer_kind(series: pl.Series) -> Kind:
    """Floats are numeric; integers are categorical ids unless they have many distinct values; the rest categorical."""
    if series.dtype.is_float():
        return "numeric"
    if series.dtype.is_integer():
        return "numeric" if series.n_unique() > MAX_INTEGER_CATEGORIES else "categorical"
    return "categorical"


def quantile_codes(values: np.ndarray, bins: int) -> np.ndarray:
    """Codes ``1..bins`` for the quantile bin of each finite value (ties share a bin) and ``0`` for missing."""
    finite = np.isfinite(values)
    codes = np.zeros(values.shape[0], dtype=np.int64)
    if finite.any():
        present = values[finite]
        edges = np.unique(np.quantile(present, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
        codes[finite] = np.searchsorted(edges, present, side="right") + 1
    return codes


def factorize(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes ``0..k-1`` in order of first appearance (hash table, O(rows)) and ``k``."""
    codes, uniques = pd.factorize(values, sort=False)
    # int32 halves the memory held per feature; products of codes are formed in int64 where they are needed
    return codes.astype(np.int32 if len(uniques) < 2**31 else np.int64, copy=False), len(uniques)


def encode_column(series: pl.Series, kind: Kind | None = None, bins: int = 32) -> EncodedColumn:
    """Encode one column. ``kind`` defaults to :func:`infer_kind`; numeric columns are cut into ``bins`` quantiles."""
    kind = kind or infer_kind(series)
    rows = series.len()
    if kind == "numeric":
        try:
            numbers = series.cast(pl.Float64, strict=False).fill_null(float("nan")).to_numpy()
        except pl.exceptions.InvalidOperationError:
            numbers = np.full(rows, np.nan)
        missing = int((~np.isfinite(numbers)).sum())
        codes, cardinality = factorize(quantile_codes(numbers, bins))
        distinct = int(series.drop_nulls().n_unique())
    else:
        # nulls hash to one fixed value, so "missing" becomes a category of its own
        missing = series.null_count()
        codes, cardinality = factorize(series.hash(seed=0).to_numpy())
        distinct = cardinality - (1 if missing else 0)
    top_share = float(np.bincount(codes).max() / rows) if rows else 0.0
    fingerprint = hashlib.blake2b(codes.tobytes(), digest_size=16).hexdigest()
    return EncodedColumn(series.name, kind, codes, cardinality, distinct, missing / rows if rows else 0.0, top_share,
                         fingerprint)


def encode_target(series: pl.Series, source: str) -> np.ndarray:
    """The label as class codes; a 0/1 label keeps its values. Missing labels or a single class are errors."""
    from ctrlab.errors import DataError

    if series.null_count():
        raise DataError(f"{source}: label column '{series.name}' has {series.null_count()} missing values")
    codes, classes = factorize(series.hash(seed=0).to_numpy())
    if classes < 2:
        raise DataError(f"{source}: label column '{series.name}' has a single value; nothing to rank against")
    if series.dtype.is_numeric() and classes == 2 and set(series.unique().to_list()) <= {0, 1}:
        return series.cast(pl.Int64).to_numpy()
    return codes

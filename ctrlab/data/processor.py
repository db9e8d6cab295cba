"""The feature processor: fitted on the training split only, then applied unchanged to every other split and
at serving time. Its whole state is JSON, so a reloaded processor gives identical encodings.

Fitting reads the training split as a polars ``LazyFrame`` and computes every statistic with the streaming engine
(:meth:`FeatureProcessor.fit_lazy`); an in-memory frame goes through the same queries (:meth:`FeatureProcessor.fit`
passes ``frame.lazy()``), so a split fitted from a file on disk and the same rows held in memory give identical
JSON states.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrlab.config.features import CategoricalFeature, FeaturesConfig, NumericFeature, SequenceFeature
from ctrlab.data.crosses import CrossVocabulary, choose_methods, encode_crosses, fit_crosses_lazy, resolve_crosses
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.kept_values import KeptValues
from ctrlab.data.layout import FIRST_VALUE_ID, OOV_ID, FeatureLayout, FieldSpec
from ctrlab.errors import DataError
from ctrlab.utils.io import write_json_atomic

NULL_TOKEN = "__null__"
_SMALL_BATCH = 256
FORMAT_VERSION = 1
_FIT_INDEX = "__ctrlab_fit_row"  # numbers the rows of a split that carries no ROW_COLUMN, for messages
ROW_COLUMN = "__ctrlab_source_row"
"""Optional column holding each row's 1-based data row in its source file. The pipeline adds it before it splits one
file into train/valid/test, so that error messages name the row of the file rather than the row of the split."""


def _excerpt(value: object, limit: int = 40) -> str:
    """``repr`` of a value from the data, cut to ``limit`` characters: a message never quotes a whole input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raw_text(frame: pl.DataFrame, name: str, row: int) -> str:
    """The value of ``name`` at ``row`` as the data wrote it (stripped), for a message."""
    value = frame.get_column(name)[row]
    return _excerpt(value.strip() if isinstance(value, str) else str(value))


def _label_missing(source: str, label: str, row: int) -> str:
    return f"{source}: column '{label}' row {row}: label is missing"


def _bad_label(source: str, label: str, row: int, quoted: str) -> str:
    return f"{source}: column '{label}' row {row}: label {quoted} is not 0 or 1"


def _not_a_number(source: str, name: str, row: int, quoted: str) -> str:
    return (f"{source}: column '{name}' row {row}: value {quoted} is not a number (numeric feature; declare it "
            "categorical if it is not numeric)")


def _not_finite(source: str, name: str, row: int, quoted: str) -> str:
    return (f"{source}: column '{name}' row {row}: value {quoted} is not a finite number (numeric feature; remove "
            "the row or replace the value)")


def _row_number(frame: pl.DataFrame, index: int) -> int:
    """The 1-based data row (header excluded) of the frame's row ``index`` in the file it was read from."""
    if ROW_COLUMN in frame.columns:
        return int(frame.get_column(ROW_COLUMN)[index])
    return index + 1


def _collect(query: pl.LazyFrame) -> pl.DataFrame:
    """Run a query with polars' streaming engine: memory bounded by the query's state (a group-by's groups), not by
    the rows it reads."""
    return query.collect(engine="streaming")


_STRING_HASH_SEED = 0  # polars' string hash; only compared within one process, never stored


class _HashIndex:
    """An open-addressing hash table (linear probing, load at most 1/2) from 64-bit hashes to positions, in numpy.

    Why not a polars join per batch: a join hashes the whole vocabulary again on every call, which for a streamed
    split of many chunks against a million-value vocabulary costs ten times the lookups themselves; this table is
    built once and each lookup is a few vectorised gathers."""

    def __init__(self, hashes: np.ndarray) -> None:
        n = len(hashes)
        size = 1 << max(4, (2 * n).bit_length())
        self.mask = size - 1
        self.table = np.full(size, -1, dtype=np.int64)
        self.keys = np.zeros(size, dtype=np.uint64)
        pending = np.arange(n)
        slots = (hashes & np.uint64(self.mask)).astype(np.int64)
        while len(pending):
            wanted = slots[pending]
            free = self.table[wanted] == -1
            candidates = pending[free]
            taken, first = np.unique(wanted[free], return_index=True)  # one winner per free slot
            winners = candidates[first]
            self.table[taken] = winners
            self.keys[taken] = hashes[winners]
            placed = np.zeros(n, dtype=bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            slots[pending] = (slots[pending] + 1) & self.mask

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The position stored under each hash, -1 where none is."""
        slots = (hashes & np.uint64(self.mask)).astype(np.int64)
        found = np.full(len(hashes), -1, dtype=np.int64)
        todo = np.arange(len(hashes))
        while len(todo):
            position = self.table[slots[todo]]
            hit = (position >= 0) & (self.keys[slots[todo]] == hashes[todo])
            found[todo[hit]] = position[hit]
            todo = todo[(position >= 0) & ~hit]
            slots[todo] = (slots[todo] + 1) & self.mask
        return found


@dataclass
class _Vocabulary:
    values: list[str]
    _series: pl.Series | None = field(default=None, init=False, repr=False, compare=False)
    _hashed: _HashIndex | None = field(default=None, init=False, repr=False, compare=False)
    _mapping: pl.DataFrame | None = field(default=None, init=False, repr=False, compare=False)
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def ids(self, strings: pl.Series) -> np.ndarray:
        """Map strings to ids (value i -> i + 2; unseen -> OOV)."""
        if len(strings) <= _SMALL_BATCH:
            # A hash join costs ~0.1 ms of fixed overhead per field; a dict lookup makes single-row serving fast.
            if self._index is None:
                self._index = {v: i + FIRST_VALUE_ID for i, v in enumerate(self.values)}
            index = self._index
            return np.fromiter((index.get(v, OOV_ID) for v in strings.to_list()), dtype=np.int32,
                               count=len(strings))
        strings = strings.cast(pl.String)
        if self._series is None:  # built once: a streamed split calls this once per chunk and field
            self._series = pl.Series("value", self.values, dtype=pl.String)
            hashes = self._series.hash(seed=_STRING_HASH_SEED).to_numpy()
            # Two values of one hash (about n²/2^65: never seen, but possible) would shadow each other: join instead.
            if len(np.unique(hashes)) == len(hashes):
                self._hashed = _HashIndex(hashes)
        if self._hashed is None:
            return self._joined_ids(strings)
        position = self._hashed.lookup(strings.hash(seed=_STRING_HASH_SEED).to_numpy())
        # A string of another value's hash is caught here: the value at the position must be the string itself.
        same = (self._series.gather(np.maximum(position, 0)) == strings).fill_null(False).to_numpy()
        return np.where((position >= 0) & same, position + FIRST_VALUE_ID, OOV_ID).astype(np.int32)

    def _joined_ids(self, strings: pl.Series) -> np.ndarray:
        if self._mapping is None:
            self._mapping = pl.DataFrame(
                {"value": self.values,
                 "id": np.arange(FIRST_VALUE_ID, FIRST_VALUE_ID + len(self.values), dtype=np.int32)},
                schema={"value": pl.String, "id": pl.Int32},
            )
        joined = (
            pl.DataFrame({"value": strings}).with_row_index("row").join(self._mapping, on="value", how="left")
            .sort("row").get_column("id").fill_null(OOV_ID)
        )
        return joined.to_numpy().astype(np.int32)

    @property
    def size(self) -> int:
        return len(self.values) + FIRST_VALUE_ID


def _fit_vocabulary(counts: pl.DataFrame, min_count: int) -> _Vocabulary:
    kept = counts.filter(pl.col("count") >= min_count).sort(["count", "value"], descending=[True, False])
    return _Vocabulary(kept.get_column("value").to_list())


def _count_values(values: pl.LazyFrame) -> pl.DataFrame:
    """``value`` -> ``count`` of a one-column query, by a streaming group-by (memory: one entry per distinct value)."""
    return _collect(values.group_by("value").agg(pl.len().alias("count")))


class GroupIds:
    """The group ids of one split: the split's distinct group values (``NULL_TOKEN`` for a missing one) in sorted
    order get ids 1, 2, ..., which is what ``rank("dense")`` over the whole split gives. A streamed split is encoded
    chunk by chunk with one such index, so a group keeps one id across chunks."""

    def __init__(self, values: pl.Series) -> None:
        self._vocabulary = _Vocabulary(values.cast(pl.String).unique().sort().to_list())

    @classmethod
    def of(cls, data: pl.LazyFrame, column: str) -> GroupIds:
        """The index of ``column`` of ``data`` (one streaming pass, one entry per distinct value)."""
        values = _collect(data.select(pl.col(column).cast(pl.String).fill_null(NULL_TOKEN).unique()))
        return cls(values.to_series())

    def ids(self, strings: pl.Series) -> np.ndarray:
        ids = self._vocabulary.ids(strings).astype(np.int64) - (FIRST_VALUE_ID - 1)
        if (ids < 1).any():
            raise ValueError("a group value is not in the split's group index")
        return ids


def _quantiles(values: np.ndarray, counts: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """``np.quantile`` (method ``linear``) of the sorted distinct ``values`` repeated ``counts`` times, with
    numpy's own interpolation arithmetic, without expanding them."""
    n = int(counts.sum())
    cumulative = np.cumsum(counts)
    virtual = (n - 1) * quantiles
    previous = np.floor(virtual).astype(np.int64)
    following = np.minimum(previous + 1, n - 1)
    gamma = virtual - previous
    below = values[np.searchsorted(cumulative, previous, side="right")]
    above = values[np.searchsorted(cumulative, following, side="right")]
    difference = above - below
    return np.where(gamma >= 0.5, above - difference * (1 - gamma), below + difference * gamma)


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _numeric_statistics(spec: NumericFeature, counts: pl.DataFrame) -> dict[str, Any]:
    """Fill value and transform statistics of one numeric training column from its distinct values and their
    counts (NaN or null = missing). Computed over the values in sorted order, so they depend on the data only, not
    on how a streaming engine happened to cut it into pieces."""
    raw = counts.get_column("value").cast(pl.Float64).to_numpy() + 0.0  # + 0.0: -0.0 and 0.0 are one value
    number = counts.get_column("count").to_numpy().astype(np.int64)
    present = ~np.isnan(raw)
    missing = int(number[~present].sum())
    order = np.argsort(raw[present], kind="stable")
    values, weights = raw[present][order], number[present][order]
    n_present = int(weights.sum())
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as a non-finite statistic, as before
        if isinstance(spec.fill, float | int) and not isinstance(spec.fill, bool):
            fill = float(spec.fill)
        elif spec.fill == "zero" or n_present == 0:
            fill = 0.0
        elif spec.fill == "median":
            fill = float(_quantiles(values, weights, np.array([0.5]))[0])
        else:
            fill = float(np.sum(values * weights) / n_present)
        stats: dict[str, Any] = {"fill": fill, "mean": 0.0, "std": 1.0, "edges": None}
        if spec.transform in ("standardize", "log_standardize"):
            x, x_fill = values, np.array([fill])
            if spec.transform == "log_standardize":
                x, x_fill = _signed_log(x), _signed_log(x_fill)
            total = n_present + missing
            mean = float((np.sum(x * weights) + missing * x_fill[0]) / total)
            variance = (np.sum(weights * (x - mean) ** 2) + missing * (x_fill[0] - mean) ** 2) / total
            std = float(np.sqrt(variance))
            stats["mean"] = mean
            stats["std"] = std if std > 0 and math.isfinite(std) else 1.0
    if spec.transform == "bucketize":
        quantiles = (_quantiles(values, weights, np.linspace(0, 1, spec.buckets + 1)[1:-1]) if n_present
                     else np.zeros(0))
        stats["edges"] = sorted({float(q) for q in quantiles})
    return stats


class FeatureProcessor:
    """Turns raw rows into model inputs.

    Categorical: per-field vocabulary of training values seen at least ``min_count`` times (ordered by frequency),
    id 0 = padding, 1 = out-of-vocabulary (and anything unseen), values from 2. Missing values are the category
    ``__null__``. Numeric: missing filled (mean / median / zero / constant from the training split), then
    ``none`` / ``log`` (sign(x)·log1p|x|) / ``standardize`` / ``log_standardize`` / ``bucketize`` (quantile bins
    fitted on train; missing goes to id 1). Sequences: tokens mapped with their own or a shared vocabulary, the most
    recent ``max_len`` kept, right-padded with 0. Crosses (``features.crosses``): one id per candidate pair of
    categorical fields, from a cross vocabulary fitted on train or hashed (:mod:`ctrlab.data.crosses`).
    """

    def __init__(self, features: FeaturesConfig, label: str, group_by: str | None = None) -> None:
        self.features = features
        self.label = label
        self.group_by = group_by
        self.vocabularies: dict[str, _Vocabulary] = {}
        self.numeric_stats: dict[str, dict[str, Any]] = {}
        self.kept: KeptValues | None = None
        self.crosses: list[CrossVocabulary] = []
        self.fitted = False

    # ------------------------------------------------------------------------------------------ helpers
    def _min_count(self, value: int | None) -> int:
        return value if value is not None else self.features.defaults.min_count

    @staticmethod
    def _sequence_expression(spec: SequenceFeature, dtype: pl.DataType) -> pl.Expr:
        """The column's tokens as a list of strings: split, empty tokens dropped, the most recent ``max_len`` kept."""
        column = pl.col(spec.name)
        if dtype == pl.String:
            column = column.fill_null("").str.split(spec.separator)
        elif isinstance(dtype, (pl.List, pl.Array)):
            column = column.cast(pl.List(pl.String)).fill_null(pl.lit([], dtype=pl.List(pl.String)))
        else:
            column = column.cast(pl.String).fill_null("").str.split(spec.separator)
        return column.list.eval(pl.element().filter(pl.element() != "")).list.tail(spec.max_len)

    def _sequence_tokens(self, frame: pl.DataFrame, spec: SequenceFeature) -> pl.Series:
        return frame.select(self._sequence_expression(spec, frame.schema[spec.name])).to_series()

    @staticmethod
    def _categorical_strings(name: str) -> pl.Expr:
        return pl.col(name).cast(pl.String).fill_null(NULL_TOKEN)

    def _check_columns(self, schema: pl.Schema, source: str, with_label: bool) -> None:
        """Every feature column (and the label, the group column) present, holding values of a usable type."""
        sections: list[tuple[str, Sequence[CategoricalFeature | NumericFeature | SequenceFeature]]] = [
            ("features.categorical", self.features.categorical), ("features.numeric", self.features.numeric),
            ("features.sequence", self.features.sequence)]
        columns = schema.names()
        for section, specs in sections:
            for spec in specs:
                if spec.name not in schema:
                    present = [c for c in columns if c != ROW_COLUMN]
                    raise DataError(
                        f"{source}: column '{spec.name}' named in {section} is not in the data "
                        f"(columns: {', '.join(present[:30])}{'...' if len(present) > 30 else ''})"
                    )
        for section, specs in sections:
            for spec in specs:
                dtype = schema[spec.name]
                nested = isinstance(dtype, (pl.List, pl.Array))
                if (isinstance(dtype, (pl.Struct, pl.Object, pl.Binary, pl.Duration, pl.Time))
                        or (nested and section != "features.sequence")):
                    raise DataError(f"{source}: column '{spec.name}' named in {section} holds {dtype} values; a "
                                    f"{section.split('.')[1]} feature needs "
                                    f"{'a list or a separated string' if section.endswith('sequence') else 'one value'}"
                                    " per row")
        if with_label and self.label not in schema:
            raise DataError(f"{source}: label column '{self.label}' is not in the data (set dataset.label)")
        for role, name in (("label", self.label if with_label else None), ("group", self.group_by)):
            role_dtype = schema.get(name) if name is not None else None
            if role_dtype is not None and (role_dtype.is_nested()
                                           or isinstance(role_dtype, (pl.Object, pl.Binary, pl.Duration))):
                raise DataError(f"{source}: {role} column '{name}' holds {role_dtype} values; it needs one plain value "
                                "per row")
        if self.group_by is not None and with_label and self.group_by not in schema:
            raise DataError(f"{source}: group column '{self.group_by}' (dataset.group_by) is not in the data")

    @staticmethod
    def _numeric_expressions(schema: pl.Schema, names: list[str]) -> list[tuple[pl.Expr, pl.Expr | None]]:
        """Per named column: its value as float64 (null where missing), and for a text column the condition "text
        that is not a number" (None for a numeric column). Text is stripped; empty text is missing."""
        expressions: list[tuple[pl.Expr, pl.Expr | None]] = []
        for name in names:
            dtype = schema[name]
            if dtype.is_numeric() or dtype == pl.Boolean:
                expressions.append((pl.col(name).cast(pl.Float64), None))
                continue
            stripped = pl.col(name).cast(pl.String).str.strip_chars()
            text = pl.when(stripped == "").then(None).otherwise(stripped)
            value = text.cast(pl.Float64, strict=False)
            expressions.append((value, value.is_null() & text.is_not_null()))
        return expressions

    @classmethod
    def _numeric_columns(cls, frame: pl.DataFrame, names: list[str], source: str) -> list[np.ndarray]:
        """Each named column as float64 (NaN where missing), parsed in ONE polars pass: at serving a request is one
        row, and a pass per column costs more than the model (~0.1 ms each).

        Text is stripped and parsed; text that is not a number, an infinity or a number beyond float64 (``1e400``)
        is a :class:`DataError` naming column and row. NaN stays a missing value (pandas writes missing numbers as
        NaN); an infinity has no place on any scale and would turn the loss into NaN several steps later."""
        selected: list[pl.Expr] = []
        for i, (value, bad) in enumerate(cls._numeric_expressions(frame.schema, names)):
            selected.append(value.alias(f"value{i}"))
            if bad is not None:
                selected.append(bad.alias(f"bad{i}"))
        parsed = frame.select(selected) if selected else pl.DataFrame()
        columns: list[np.ndarray] = []
        for i, name in enumerate(names):
            if f"bad{i}" in parsed.columns and parsed[f"bad{i}"].any():
                row = int(parsed[f"bad{i}"].arg_true()[0])
                raise DataError(_not_a_number(source, name, _row_number(frame, row), _raw_text(frame, name, row)))
            values = parsed[f"value{i}"].to_numpy().astype(np.float64, copy=False)
            infinite = np.isinf(values)
            if infinite.any():
                row = int(np.flatnonzero(infinite)[0])
                raise DataError(_not_finite(source, name, _row_number(frame, row), _raw_text(frame, name, row)))
            columns.append(values)
        return columns

    def _label_expressions(self, schema: pl.Schema) -> tuple[pl.Expr, pl.Expr]:
        """The label as float64 (null where it is no number) and as the text a message quotes."""
        column = pl.col(self.label)
        dtype = schema[self.label]
        if dtype.is_numeric() or dtype == pl.Boolean:
            return column.cast(pl.Float64), column.cast(pl.String)
        text = column.cast(pl.String).str.strip_chars()
        return text.cast(pl.Float64, strict=False), text

    def _labels(self, frame: pl.DataFrame, source: str) -> np.ndarray:
        column = frame.get_column(self.label)
        if column.null_count():
            row = int(column.is_null().arg_true()[0])
            raise DataError(_label_missing(source, self.label, _row_number(frame, row)))
        value, text_expression = self._label_expressions(frame.schema)
        parsed = frame.select(value.alias("value"), text_expression.alias("text"))
        values, text = parsed.get_column("value"), parsed.get_column("text")
        bad = ~(values.is_in([0.0, 1.0]).fill_null(False))
        if bad.any():
            row = int(bad.arg_true()[0])
            raise DataError(_bad_label(source, self.label, _row_number(frame, row), _excerpt(text[row])))
        return values.to_numpy().astype(np.float32)

    # --------------------------------------------------------------------------------------------- fit
    def fit(self, frame: pl.DataFrame, source: str = "train", workdir: Path | None = None) -> "FeatureProcessor":
        """Fit vocabularies and numeric statistics on the training split held in memory: :meth:`fit_lazy` of
        ``frame.lazy()``, so the state is the one a streamed fit of the same rows gives."""
        return self.fit_lazy(frame.lazy(), source, workdir)

    def fit_lazy(self, data: pl.LazyFrame, source: str = "train", workdir: Path | None = None) -> "FeatureProcessor":
        """Fit vocabularies, numeric statistics and crosses on the training split given as a lazy query (a scan of
        a file, a filtered scan, or an in-memory frame's ``.lazy()``), with bounded memory: every statistic is a
        streaming aggregation, one query per vocabulary table and per numeric column, holding one entry per
        distinct value (categorical values, numeric values, cross keys), never the rows.

        Checked first, in one pass, each a :class:`DataError` naming ``source``, column and row (the file's row
        where the data carries :data:`ROW_COLUMN`): a missing or non-0/1 label, text that is not a number or an
        infinity in a numeric column. Crosses first sink the training split's ids of the crossed fields into a
        temporary parquet file under ``workdir`` (default: the system's temporary folder).

        Numeric statistics (mean, median, quantile edges, standardisation) are computed from each column's distinct
        values and their counts, in sorted order, so the state does not depend on how the rows were cut into
        pieces; memory is one entry per distinct value (Criteo-like integer counts: thousands; a continuous column:
        up to one per row, 16 bytes each)."""
        if _collect(data.select(pl.len())).item() == 0:
            raise DataError(f"{source}: no rows to fit the feature processor on")
        schema = data.collect_schema()
        self._check_columns(schema, source, with_label=True)
        if ROW_COLUMN in schema:
            index, indexed = ROW_COLUMN, data
        else:
            index, indexed = _FIT_INDEX, data.with_row_index(_FIT_INDEX, offset=1)
        self._check_values(indexed, index, schema, source)

        shared_tokens: dict[str, list[pl.LazyFrame]] = {}
        for seq in self.features.sequence:
            tokens = (data.select(self._sequence_expression(seq, schema[seq.name]).alias("value"))
                      .explode("value").drop_nulls().select(pl.col("value").cast(pl.String)))
            if seq.share_vocab_with is not None:
                shared_tokens.setdefault(seq.share_vocab_with, []).append(tokens)
            else:
                self.vocabularies[seq.name] = _fit_vocabulary(_count_values(tokens), self._min_count(seq.min_count))
        for cat in self.features.categorical:
            parts = [data.select(self._categorical_strings(cat.name).alias("value")), *shared_tokens.get(cat.name, [])]
            values = pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]
            self.vocabularies[cat.name] = _fit_vocabulary(_count_values(values), self._min_count(cat.min_count))
        names = [num.name for num in self.features.numeric]
        for num, (value, _) in zip(self.features.numeric, self._numeric_expressions(schema, names)):
            self.numeric_stats[num.name] = _numeric_statistics(num, _count_values(data.select(value.alias("value"))))
        self.fitted = True
        if self.features.crosses is not None:
            self.crosses = self._fit_crosses(data, schema, workdir)
        return self

    def _check_values(self, data: pl.LazyFrame, index: str, schema: pl.Schema, source: str) -> None:
        """The first bad value of the training split, in the order the in-memory checks report them (labels, then
        each numeric column: text, then infinities), found by one streaming pass of ``min(row)`` aggregations."""
        checks: list[tuple[pl.Expr, str, Callable[[int, str], str]]] = []
        label = self.label
        value, _ = self._label_expressions(schema)
        checks.append((pl.col(label).is_null(), label, lambda row, _quoted: _label_missing(source, label, row)))
        checks.append((~value.is_in([0.0, 1.0]).fill_null(False), label, partial(_bad_label, source, label)))
        names = [num.name for num in self.features.numeric]
        for name, (number, bad) in zip(names, self._numeric_expressions(schema, names)):
            if bad is not None:
                checks.append((bad, name, partial(_not_a_number, source, name)))
            checks.append((number.is_infinite(), name, partial(_not_finite, source, name)))
        found = _collect(data.select(pl.col(index).filter(condition).min().alias(f"check{i}")
                                     for i, (condition, _, _) in enumerate(checks))).row(0)
        for (_, column, message), row in zip(checks, found):
            if row is not None:
                raw = _collect(data.filter(pl.col(index) == row).select(pl.col(column).cast(pl.String)).head(1))
                quoted = raw.item()
                raise DataError(message(int(row), _excerpt(quoted.strip() if isinstance(quoted, str) else quoted)))

    def _id_columns(self, data: pl.LazyFrame, schema: pl.Schema, names: list[str]) -> pl.LazyFrame:
        """The categorical ids (:meth:`transform`'s, as Int32) of the pairable fields ``names``, as a lazy query:
        vocabulary ids by a join with each vocabulary (built once per query, probed by every chunk), bucket ids by
        a search among the edges; one column per name."""
        categorical = {c.name for c in self.features.categorical}
        numeric = {n.name: expression for n, (expression, _) in zip(
            self.features.numeric, self._numeric_expressions(schema, [n.name for n in self.features.numeric]))}
        ids: list[pl.Expr] = []
        for i, name in enumerate(names):
            if name in categorical:
                values = self.vocabularies[name].values
                mapping = pl.LazyFrame({f"__value{i}": pl.Series(values, dtype=pl.String),
                                        f"__id{i}": pl.int_range(FIRST_VALUE_ID, FIRST_VALUE_ID + len(values),
                                                                 dtype=pl.Int32, eager=True)})
                data = data.join(mapping, left_on=self._categorical_strings(name), right_on=f"__value{i}",
                                 how="left")
                ids.append(pl.col(f"__id{i}").fill_null(OOV_ID).alias(name))
            else:
                value = numeric[name]
                edges = pl.Series(self.numeric_stats[name]["edges"], dtype=pl.Float64)
                bucket = pl.lit(edges).search_sorted(value, side="right").cast(pl.Int32) + FIRST_VALUE_ID
                ids.append(pl.when(value.is_null() | value.is_nan()).then(pl.lit(OOV_ID, dtype=pl.Int32))
                           .otherwise(bucket).alias(name))
        return data.select(ids)

    def _fit_crosses(self, data: pl.LazyFrame, schema: pl.Schema, workdir: Path | None) -> list[CrossVocabulary]:
        """Fit the cross vocabularies: the training split's ids of the crossed fields are written once to a
        temporary parquet file by a streaming sink (a pass over the raw rows for all pairs, not one per pair), then
        each pair's keys are counted by a streaming group-by over two of its integer columns."""
        names = self.features.pairable()
        sizes = [f.vocab_size for f in self.full_layout.categorical]
        resolved = resolve_crosses(self.features).crosses
        assert resolved is not None and isinstance(resolved.pairs, list)
        crossed = {name for pair in resolved.pairs for name in pair}
        needed = [name for name in names if name in crossed]
        with tempfile.TemporaryDirectory(prefix="ctrlab-cross-ids-", dir=workdir) as folder:
            path = Path(folder) / "ids.parquet"
            self._id_columns(data, schema, needed).sink_parquet(path, compression="lz4", maintain_order=False,
                                                                engine="streaming")
            return fit_crosses_lazy(self.features, pl.scan_parquet(path), names, sizes)

    # ------------------------------------------------------------------------------------------ layout
    def restrict(self, kept: KeptValues) -> None:
        """Keep only ``kept``'s values (a feature-set search's result): from now on a dropped value encodes as
        out-of-vocabulary, kept ids are renumbered densely and :attr:`layout` reports the smaller tables (see
        :mod:`ctrlab.data.kept_values`). Saved with the processor, so serving applies it too."""
        self._require_fitted()
        if self.kept is not None:
            raise ValueError("the processor already keeps a restricted feature set")
        kept.restrict_layout(self.full_layout)  # checks that the masks fit the tables
        self.kept = kept

    def choose_pairs(self, choices: dict[str, str]) -> None:
        """Record an interaction search's decision (every cross's name -> ``memorize``, ``factorize`` or ``naive``):
        naive pairs are no longer encoded, the others carry their method in :attr:`layout` (and so in the saved
        processor, from which serving builds the model's pair layer)."""
        self._require_fitted()
        if any(cross.method is not None for cross in self.crosses):
            raise ValueError("the processor's pairs are already decided")
        self.crosses = choose_methods(self.crosses, choices)

    @property
    def layout(self) -> FeatureLayout:
        """The model input's shape (after :meth:`restrict`, the restricted tables' sizes)."""
        layout = self.full_layout
        return self.kept.restrict_layout(layout) if self.kept is not None else layout

    @property
    def full_layout(self) -> FeatureLayout:
        """The layout of the fitted vocabularies, before any :meth:`restrict`."""
        self._require_fitted()
        fields: list[FieldSpec] = []
        for cat in self.features.categorical:
            fields.append(FieldSpec(cat.name, "categorical", self.vocabularies[cat.name].size, cat.name))
        for num in self.features.numeric:
            if num.transform == "bucketize":
                size = len(self.numeric_stats[num.name]["edges"]) + 1 + FIRST_VALUE_ID
                fields.append(FieldSpec(num.name, "categorical", size, num.name))
        for num in self.features.numeric:
            if num.transform != "bucketize":
                fields.append(FieldSpec(num.name, "numeric"))
        for seq in self.features.sequence:
            table = seq.share_vocab_with or seq.name
            fields.append(FieldSpec(seq.name, "sequence", self.vocabularies[table].size, table, seq.max_len,
                                    seq.pooling))
        return FeatureLayout(tuple(fields), tuple(cross.spec() for cross in self.crosses))

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the feature processor is not fitted")

    # --------------------------------------------------------------------------------------- transform
    def transform(self, frame: pl.DataFrame, source: str = "data", with_label: bool = True,
                  groups: GroupIds | None = None) -> EncodedSplit:
        """Encode rows. ``with_label=False`` for serving, where rows carry no label. Group ids are the dense rank of
        the group values within ``frame``, or, for a split encoded chunk by chunk, their ids in ``groups`` (the
        whole split's index, :meth:`GroupIds.of`). Every other output of a row depends on that row alone, so a split
        encoded in chunks equals the split encoded at once."""
        self._require_fitted()
        if frame.height == 0:
            raise DataError(f"{source}: no rows")
        self._check_columns(frame.schema, source, with_label)
        n = frame.height
        columns = self._numeric_columns(frame, [num.name for num in self.features.numeric], source)
        categorical = self._categorical_ids(frame, columns)
        numeric: list[np.ndarray] = []
        for num, values in zip(self.features.numeric, columns):
            stats = self.numeric_stats[num.name]
            if num.transform == "bucketize":
                continue
            x = np.where(np.isnan(values), stats["fill"], values)
            if num.transform in ("log", "log_standardize"):
                x = np.sign(x) * np.log1p(np.abs(x))
            if num.transform in ("standardize", "log_standardize"):
                x = (x - stats["mean"]) / stats["std"]
            with np.errstate(over="ignore"):  # overflow is checked right below and reported with its row
                x32 = x.astype(np.float32)
            overflow = ~np.isfinite(x32)
            if overflow.any():
                row = int(np.flatnonzero(overflow)[0])
                raise DataError(
                    f"{source}: column '{num.name}' row {_row_number(frame, row)}: value "
                    f"{_raw_text(frame, num.name, row)} is too large for the model's float32 inputs after transform "
                    f"'{num.transform}' (use transform: log or log_standardize, or bucketize)"
                )
            numeric.append(x32)
        sequences = {s.name: self._encode_sequence(frame, s) for s in self.features.sequence}
        group = None
        if self.group_by is not None and self.group_by in frame.columns:
            strings = frame.get_column(self.group_by).cast(pl.String).fill_null(NULL_TOKEN)
            group = (groups.ids(strings) if groups is not None else strings.rank("dense").to_numpy()).astype(np.int64)
        encoded = EncodedSplit(
            categorical=categorical,
            numeric=np.ascontiguousarray(np.stack(numeric, axis=1) if numeric else np.zeros((n, 0), np.float32)),
            sequences=sequences,
            label=self._labels(frame, source) if with_label else None,
            group=group,
            # the categorical columns are the pairable fields, in that order
            crosses=encode_crosses(self.crosses, categorical, self.features.pairable()) if self.crosses else None,
        )
        return self.kept.apply(encoded, self.full_layout) if self.kept is not None else encoded

    def _categorical_ids(self, frame: pl.DataFrame, numeric: list[np.ndarray]) -> np.ndarray:
        """``[N, Fc]`` int32 ids of the categorical fields in layout order: vocabulary ids, then the bucket ids of
        the bucketised numeric fields (``numeric``: every numeric column as parsed, NaN = missing)."""
        names = [c.name for c in self.features.categorical]
        strings = frame.select(self._categorical_strings(name) for name in names) if names else None
        ids: list[np.ndarray] = [
            self.vocabularies[name].ids(strings.get_column(name)) for name in names  # type: ignore[union-attr]
        ]
        for num, values in zip(self.features.numeric, numeric):
            if num.transform == "bucketize":
                edges = np.asarray(self.numeric_stats[num.name]["edges"], dtype=np.float64)
                buckets = np.searchsorted(edges, values, side="right")
                ids.append(np.where(np.isnan(values), OOV_ID, buckets + FIRST_VALUE_ID).astype(np.int32))
        if not ids:
            return np.zeros((frame.height, 0), np.int32)
        return np.ascontiguousarray(np.stack(ids, axis=1))

    def _encode_sequence(self, frame: pl.DataFrame, spec: SequenceFeature) -> np.ndarray:
        tokens = self._sequence_tokens(frame, spec)
        lengths = tokens.list.len().to_numpy().astype(np.int64)
        flat = tokens.explode().drop_nulls().cast(pl.String)
        vocab = self.vocabularies[spec.share_vocab_with or spec.name]
        ids = vocab.ids(flat) if len(flat) else np.zeros(0, np.int32)
        matrix = np.zeros((frame.height, spec.max_len), dtype=np.int32)
        rows = np.repeat(np.arange(frame.height), lengths)
        starts = np.cumsum(lengths) - lengths
        positions = np.arange(len(ids)) - np.repeat(starts, lengths)
        matrix[rows, positions] = ids
        return matrix

    # ----------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        self._require_fitted()
        return {
            "format_version": FORMAT_VERSION,
            "label": self.label,
            "group_by": self.group_by,
            "features": self.features.model_dump(mode="json"),
            "vocabularies": {name: vocab.values for name, vocab in self.vocabularies.items()},
            "numeric_stats": self.numeric_stats,
            "layout": self.layout.to_dict(),
            **({"kept": self.kept.to_dict()} if self.kept is not None else {}),
            **({"crosses": [cross.to_dict() for cross in self.crosses]} if self.crosses else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureProcessor":
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"processor state has format version {data.get('format_version')}, "
                            f"expected {FORMAT_VERSION}")
        processor = cls(FeaturesConfig.model_validate(data["features"]), data["label"], data.get("group_by"))
        processor.vocabularies = {name: _Vocabulary(list(values)) for name, values in data["vocabularies"].items()}
        processor.numeric_stats = data["numeric_stats"]
        processor.crosses = [CrossVocabulary.from_dict(cross) for cross in data.get("crosses", [])]
        processor.fitted = True
        if "kept" in data:
            processor.restrict(KeptValues.from_dict(data["kept"]))
        return processor

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "FeatureProcessor":
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: processor file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: processor file is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        try:
            return cls.from_dict(data)
        except DataError as error:
            raise DataError(f"{path}: {error.message}") from None
        except Exception as error:  # a hand-edited or damaged file: any shape at all
            raise DataError(f"{path}: not a ctrlab processor state ({type(error).__name__}: "
                            f"{' '.join(str(error).split())[:120]})") from None

"""The feature processor: fitted on the training split only, then applied unchanged to every other split and
at serving time. Its whole state is JSON, so a reloaded processor gives identical encodings."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrlab.config.features import CategoricalFeature, FeaturesConfig, NumericFeature, SequenceFeature
from ctrlab.data.crosses import CrossVocabulary, choose_methods, encode_crosses, fit_crosses
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.kept_values import KeptValues
from ctrlab.data.layout import FIRST_VALUE_ID, OOV_ID, FeatureLayout, FieldSpec
from ctrlab.errors import DataError
from ctrlab.utils.io import write_json_atomic

NULL_TOKEN = "__null__"
_SMALL_BATCH = 256
FORMAT_VERSION = 1
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


def _row_number(frame: pl.DataFrame, index: int) -> int:
    """The 1-based data row (header excluded) of the frame's row ``index`` in the file it was read from."""
    if ROW_COLUMN in frame.columns:
        return int(frame.get_column(ROW_COLUMN)[index])
    return index + 1


@dataclass
class _Vocabulary:
    values: list[str]
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
        if self._mapping is None:  # built once: serving calls this per request
            self._mapping = pl.DataFrame(
                {"value": self.values,
                 "id": np.arange(FIRST_VALUE_ID, FIRST_VALUE_ID + len(self.values), dtype=np.int32)},
                schema={"value": pl.String, "id": pl.Int32},
            )
        mapping = self._mapping
        joined = (
            pl.DataFrame({"value": strings}).with_row_index("row").join(mapping, on="value", how="left")
            .sort("row").get_column("id").fill_null(OOV_ID)
        )
        return joined.to_numpy().astype(np.int32)

    @property
    def size(self) -> int:
        return len(self.values) + FIRST_VALUE_ID


def _fit_vocabulary(counts: pl.DataFrame, min_count: int) -> _Vocabulary:
    kept = counts.filter(pl.col("count") >= min_count).sort(["count", "value"], descending=[True, False])
    return _Vocabulary(kept.get_column("value").to_list())


def _value_counts(values: pl.Series) -> pl.DataFrame:
    return values.value_counts(name="count").rename({values.name: "value"})


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
    def _sequence_tokens(frame: pl.DataFrame, spec: SequenceFeature) -> pl.Series:
        column = frame.get_column(spec.name)
        if column.dtype == pl.String:
            column = column.fill_null("").str.split(spec.separator)
        elif isinstance(column.dtype, (pl.List, pl.Array)):
            column = column.cast(pl.List(pl.String)).fill_null([])
        else:
            column = column.cast(pl.String).fill_null("").str.split(spec.separator)
        return column.list.eval(pl.element().filter(pl.element() != "")).list.tail(spec.max_len)

    @staticmethod
    def _categorical_strings(frame: pl.DataFrame, name: str) -> pl.Series:
        return frame.get_column(name).cast(pl.String).fill_null(NULL_TOKEN)

    def _check_columns(self, frame: pl.DataFrame, source: str, with_label: bool) -> None:
        sections: list[tuple[str, Sequence[CategoricalFeature | NumericFeature | SequenceFeature]]] = [
            ("features.categorical", self.features.categorical), ("features.numeric", self.features.numeric),
            ("features.sequence", self.features.sequence)]
        for section, specs in sections:
            for spec in specs:
                if spec.name not in frame.columns:
                    present = [c for c in frame.columns if c != ROW_COLUMN]
                    raise DataError(
                        f"{source}: column '{spec.name}' named in {section} is not in the data "
                        f"(columns: {', '.join(present[:30])}{'...' if len(present) > 30 else ''})"
                    )
        for section, specs in sections:
            for spec in specs:
                dtype = frame.schema[spec.name]
                nested = isinstance(dtype, (pl.List, pl.Array))
                if (isinstance(dtype, (pl.Struct, pl.Object, pl.Binary, pl.Duration, pl.Time))
                        or (nested and section != "features.sequence")):
                    raise DataError(f"{source}: column '{spec.name}' named in {section} holds {dtype} values; a "
                                    f"{section.split('.')[1]} feature needs "
                                    f"{'a list or a separated string' if section.endswith('sequence') else 'one value'}"
                                    " per row")
        if with_label and self.label not in frame.columns:
            raise DataError(f"{source}: label column '{self.label}' is not in the data (set dataset.label)")
        for role, name in (("label", self.label if with_label else None), ("group", self.group_by)):
            role_dtype = frame.schema.get(name) if name is not None else None
            if role_dtype is not None and (role_dtype.is_nested()
                                           or isinstance(role_dtype, (pl.Object, pl.Binary, pl.Duration))):
                raise DataError(f"{source}: {role} column '{name}' holds {role_dtype} values; it needs one plain value "
                                "per row")
        if self.group_by is not None and with_label and self.group_by not in frame.columns:
            raise DataError(f"{source}: group column '{self.group_by}' (dataset.group_by) is not in the data")

    @staticmethod
    def _numeric_columns(frame: pl.DataFrame, names: list[str], source: str) -> list[np.ndarray]:
        """Each named column as float64 (NaN where missing), parsed in ONE polars pass: at serving a request is one
        row, and a pass per column costs more than the model (~0.1 ms each).

        Text is stripped and parsed; text that is not a number, an infinity or a number beyond float64 (``1e400``)
        is a :class:`DataError` naming column and row. NaN stays a missing value (pandas writes missing numbers as
        NaN); an infinity has no place on any scale and would turn the loss into NaN several steps later."""
        expressions: list[pl.Expr] = []
        for i, name in enumerate(names):
            dtype = frame.schema[name]
            if dtype.is_numeric() or dtype == pl.Boolean:
                expressions.append(pl.col(name).cast(pl.Float64).alias(f"value{i}"))
                continue
            stripped = pl.col(name).cast(pl.String).str.strip_chars()
            text = pl.when(stripped == "").then(None).otherwise(stripped)
            value = text.cast(pl.Float64, strict=False)
            expressions += [value.alias(f"value{i}"), (value.is_null() & text.is_not_null()).alias(f"bad{i}")]
        parsed = frame.select(expressions) if expressions else pl.DataFrame()
        columns: list[np.ndarray] = []
        for i, name in enumerate(names):
            if f"bad{i}" in parsed.columns and parsed[f"bad{i}"].any():
                row = int(parsed[f"bad{i}"].arg_true()[0])
                raise DataError(
                    f"{source}: column '{name}' row {_row_number(frame, row)}: value {_raw_text(frame, name, row)} is "
                    "not a number (numeric feature; declare it categorical if it is not numeric)"
                )
            values = parsed[f"value{i}"].to_numpy().astype(np.float64, copy=False)
            infinite = np.isinf(values)
            if infinite.any():
                row = int(np.flatnonzero(infinite)[0])
                raise DataError(
                    f"{source}: column '{name}' row {_row_number(frame, row)}: value {_raw_text(frame, name, row)} is "
                    "not a finite number (numeric feature; remove the row or replace the value)"
                )
            columns.append(values)
        return columns

    def _labels(self, frame: pl.DataFrame, source: str) -> np.ndarray:
        column = frame.get_column(self.label)
        if column.null_count():
            row = int(column.is_null().arg_true()[0])
            raise DataError(f"{source}: column '{self.label}' row {_row_number(frame, row)}: label is missing")
        if column.dtype.is_numeric() or column.dtype == pl.Boolean:
            values = column.cast(pl.Float64)
            text = column.cast(pl.String)
        else:
            text = column.cast(pl.String).str.strip_chars()
            values = text.cast(pl.Float64, strict=False)
        bad = ~(values.is_in([0.0, 1.0]).fill_null(False))
        if bad.any():
            row = int(bad.arg_true()[0])
            raise DataError(
                f"{source}: column '{self.label}' row {_row_number(frame, row)}: label {_excerpt(text[row])} "
                "is not 0 or 1"
            )
        return values.to_numpy().astype(np.float32)

    # --------------------------------------------------------------------------------------------- fit
    def fit(self, frame: pl.DataFrame, source: str = "train") -> "FeatureProcessor":
        """Fit vocabularies and numeric statistics on the training split."""
        if frame.height == 0:
            raise DataError(f"{source}: no rows to fit the feature processor on")
        self._check_columns(frame, source, with_label=True)
        self._labels(frame, source)
        shared_tokens: dict[str, list[pl.Series]] = {}
        for seq in self.features.sequence:
            tokens = self._sequence_tokens(frame, seq).explode().drop_nulls().rename("value")
            if seq.share_vocab_with is not None:
                shared_tokens.setdefault(seq.share_vocab_with, []).append(tokens)
            else:
                counts = _value_counts(tokens) if len(tokens) else pl.DataFrame(
                    {"value": [], "count": []}, schema={"value": pl.String, "count": pl.UInt32})
                self.vocabularies[seq.name] = _fit_vocabulary(counts, self._min_count(seq.min_count))
        for cat in self.features.categorical:
            values = self._categorical_strings(frame, cat.name).rename("value")
            for extra in shared_tokens.get(cat.name, []):
                values = pl.concat([values, extra.cast(pl.String)])
            self.vocabularies[cat.name] = _fit_vocabulary(_value_counts(values), self._min_count(cat.min_count))
        numeric = self._numeric_columns(frame, [num.name for num in self.features.numeric], source)
        for num, numeric_values in zip(self.features.numeric, numeric):
            self.numeric_stats[num.name] = self._fit_numeric(num, numeric_values)
        self.fitted = True
        if self.features.crosses is not None:
            sizes = [f.vocab_size for f in self.full_layout.categorical]
            self.crosses = fit_crosses(self.features, self._categorical_ids(frame, numeric), self.features.pairable(),
                                       sizes)
        return self

    @staticmethod
    def _fit_numeric(spec: NumericFeature, values: np.ndarray) -> dict[str, Any]:
        """Fill value and transform statistics from the training values (NaN = missing, as everywhere)."""
        present = pl.Series(values[~np.isnan(values)], dtype=pl.Float64)
        if isinstance(spec.fill, float | int) and not isinstance(spec.fill, bool):
            fill = float(spec.fill)
        elif spec.fill == "zero" or len(present) == 0:
            fill = 0.0
        elif spec.fill == "median":
            fill = float(present.median())  # type: ignore[arg-type]
        else:
            fill = float(present.mean())  # type: ignore[arg-type]
        stats: dict[str, Any] = {"fill": fill, "mean": 0.0, "std": 1.0, "edges": None}
        filled = np.where(np.isnan(values), fill, values)
        if spec.transform in ("log", "log_standardize"):
            filled = np.sign(filled) * np.log1p(np.abs(filled))
        if spec.transform in ("standardize", "log_standardize"):
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as a non-finite std: 1.0 below
                std = float(filled.std()) if len(filled) else 1.0
            stats["mean"] = float(filled.mean()) if len(filled) else 0.0
            stats["std"] = std if std > 0 and math.isfinite(std) else 1.0
        if spec.transform == "bucketize":
            quantiles = (np.quantile(present.to_numpy(), np.linspace(0, 1, spec.buckets + 1)[1:-1]) if len(present)
                         else [])
            stats["edges"] = sorted({float(q) for q in quantiles})
        return stats

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
    def transform(self, frame: pl.DataFrame, source: str = "data", with_label: bool = True) -> EncodedSplit:
        """Encode rows. ``with_label=False`` for serving, where rows carry no label."""
        self._require_fitted()
        if frame.height == 0:
            raise DataError(f"{source}: no rows")
        self._check_columns(frame, source, with_label)
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
            group = frame.get_column(self.group_by).cast(pl.String).fill_null(NULL_TOKEN).rank("dense").to_numpy()
            group = group.astype(np.int64)
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
        strings = frame.select(pl.col(name).cast(pl.String).fill_null(NULL_TOKEN) for name in names) if names else None
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

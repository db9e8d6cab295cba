"""Cross features: one id per row for each candidate pair of categorical fields, the input of an interaction layer
that memorises pairs (OptInter, Lyu et al. 2022, "Memorize, Factorize, or be Naive", Section III-B: the
"cross-product transformation" of a field pair).

A cross value is the pair of the two fields' values as their vocabularies encode them, so a value rarer than its
field's ``min_count`` is the field's out-of-vocabulary value inside a cross too (every cross holding it is at least as
rare). Its key is ``id_a · size_b + id_b`` (int64). :func:`fit_cross` counts the keys of the training split only (a
polars ``value_counts``, no Python loop over rows) and keeps those seen at least ``min_count`` times, most frequent
first: id 0 is padding (never used), 1 the pair's out-of-vocabulary id, 2.. the kept crosses. When the kept crosses
would need more than ``max_rows`` ids, no vocabulary is stored: every key is hashed into ids ``2 .. max_rows - 1``
with the deterministic universal hash of :mod:`ctrlab.utils.hashing` (a per-pair function), so Criteo-sized cross
vocabularies (tens of millions of crosses) cost a bounded table and a bounded processor file.

:func:`resolve_crosses` turns a recipe's ``features.crosses`` into the explicit candidate list (reading a ranking's
``pairs.csv`` or an OptFS ``kept_features.csv`` once), which is what the processor fits and the cache key holds.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrlab.config.features import CrossesConfig, FeaturesConfig
from ctrlab.data.layout import FIRST_VALUE_ID, OOV_ID, CrossSpec
from ctrlab.errors import DataError, RecipeError
from ctrlab.utils.hashing import hash_constants, universal_hash_array

CROSS_HASH_SALT = 0x63726F7373  # "cross": hash functions of their own, apart from the embedding layers'


def cross_name(first: str, second: str) -> str:
    """The name of the cross of ``first`` and ``second`` (in model order), e.g. ``user:item``."""
    return f"{first}:{second}"


@dataclass
class CrossVocabulary:
    """The fitted cross feature of one pair (see the module docstring): ``keys[i]`` has id ``i + 2``; ``keys`` is
    None for a hashed pair, whose ids come from hash function ``index``. ``seen`` counts the distinct crosses of
    the training split, ``kept`` those with an id of their own (``min_count`` and over); ``method`` is set once an
    interaction search has decided how the model uses the pair (see :class:`~ctrlab.data.layout.CrossSpec`)."""

    first: str
    second: str
    second_size: int
    rows: int
    keys: np.ndarray | None
    index: int
    seen: int
    kept: int
    method: str | None = None
    _lookup: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return cross_name(self.first, self.second)

    @property
    def hashed(self) -> bool:
        return self.keys is None

    def spec(self) -> CrossSpec:
        return CrossSpec(self.name, self.first, self.second, self.rows, self.hashed, self.method)

    def ids(self, first_ids: np.ndarray, second_ids: np.ndarray) -> np.ndarray:
        """The cross ids (int32) of rows whose fields have ids ``first_ids`` and ``second_ids``."""
        keys = first_ids.astype(np.int64) * self.second_size + second_ids
        if self.keys is None:
            a, b = hash_constants(self.index, 0, CROSS_HASH_SALT)
            return (FIRST_VALUE_ID + universal_hash_array(keys, a, b, self.rows - FIRST_VALUE_ID)).astype(np.int32)
        if self._lookup is None:  # built once: serving calls this per request
            order = np.argsort(self.keys, kind="stable")
            self._lookup = (self.keys[order], (order + FIRST_VALUE_ID).astype(np.int32))
        sorted_keys, sorted_ids = self._lookup
        if len(sorted_keys) == 0:
            return np.full(len(keys), OOV_ID, dtype=np.int32)
        position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        return np.where(sorted_keys[position] == keys, sorted_ids[position], OOV_ID).astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "second": self.second, "second_size": self.second_size, "rows": self.rows,
                "index": self.index, "seen": self.seen, "kept": self.kept, "method": self.method,
                "keys": None if self.keys is None else [int(k) for k in self.keys]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossVocabulary:
        keys = data["keys"]
        return cls(str(data["first"]), str(data["second"]), int(data["second_size"]), int(data["rows"]),
                   None if keys is None else np.asarray(keys, dtype=np.int64), int(data["index"]), int(data["seen"]),
                   int(data["kept"]), data.get("method"))


def fit_cross(first: str, second: str, first_ids: np.ndarray, second_ids: np.ndarray, second_size: int,
              config: CrossesConfig, index: int) -> CrossVocabulary:
    """Fit the cross of ``first`` and ``second`` on their training ids (``second_size``: ids of ``second``)."""
    keys = pl.Series("key", first_ids.astype(np.int64) * second_size + second_ids)
    return fit_cross_counts(first, second, keys.value_counts(name="count"), second_size, config, index)


def fit_cross_counts(first: str, second: str, counts: pl.DataFrame, second_size: int, config: CrossesConfig,
                     index: int) -> CrossVocabulary:
    """:func:`fit_cross` from the training split's key counts (columns ``key``, ``count``, one row per distinct
    key, in any order): kept keys are sorted by count, then key, so any way of counting gives the same vocabulary."""
    kept = counts.filter(pl.col("count") >= config.min_count).sort(["count", "key"], descending=[True, False])
    seen, size = counts.height, kept.height
    if size + FIRST_VALUE_ID > config.max_rows:
        return CrossVocabulary(first, second, second_size, config.max_rows, None, index, seen, size)
    return CrossVocabulary(first, second, second_size, size + FIRST_VALUE_ID,
                           kept.get_column("key").to_numpy().astype(np.int64), index, seen, size)


# ------------------------------------------------------------------------------------------ candidate pairs
def _read_rows(path: Path, needed: set[str], what: str, key: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"features.crosses.{key}: no {what} {path}")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not needed <= set(reader.fieldnames):
                raise DataError(f"{path}: not a {what} (needs columns {', '.join(sorted(needed))})")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a {what} ({type(error).__name__})") from None


def _number(path: Path, row: dict[str, str], column: str, line: int) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):
        raise DataError(f"{path}: row {line}: column {column} holds {row[column]!r}, not a number") from None


def resolve_crosses(features: FeaturesConfig) -> FeaturesConfig:
    """``features`` with ``crosses`` resolved to the explicit candidate list, in model order of the pairs (see
    :class:`~ctrlab.config.features.CrossesConfig`); unchanged without crosses."""
    crosses = features.crosses
    if crosses is None:
        return features
    fields = features.pairable()
    position = {name: i for i, name in enumerate(fields)}
    if crosses.pairs == "all":
        pairs = list(itertools.combinations(fields, 2))
    else:
        pairs = []
        for a, b in crosses.pairs:
            unknown = [name for name in (a, b) if name not in position]
            if unknown:
                raise RecipeError(f"features.crosses.pairs: [{a}, {b}]: {unknown[0]!r} is not a categorical feature "
                                  f"(or a bucketised numeric one); pairable: {', '.join(fields)}")
            pairs.append((a, b) if position[a] < position[b] else (b, a))
    if crosses.kept_features is not None:
        path = Path(crosses.kept_features).expanduser()
        rows = _read_rows(path, {"field", "values_kept"}, "kept_features.csv of an OptFS run", "kept_features")
        keeping = {row["field"] for i, row in enumerate(rows, start=2)
                   if _number(path, row, "values_kept", i) > 0}
        pairs = [(a, b) for a, b in pairs if a in keeping and b in keeping]
    if crosses.ranking is not None:
        path = Path(crosses.ranking.path).expanduser()
        rows = _read_rows(path, {"feature_a", "feature_b", "interaction"}, "pairs.csv of ctrlab rank", "ranking")
        score = {frozenset((row["feature_a"], row["feature_b"])): _number(path, row, "interaction", i)
                 for i, row in enumerate(rows, start=2)}
        scored = [pair for pair in pairs if frozenset(pair) in score]
        if not scored:
            raise RecipeError(f"features.crosses.ranking: {path} scores none of the {len(pairs)} candidate pairs; "
                              "rank the same features (ctrlab rank writes pairs among its top pair_candidates)")
        best = sorted(scored, key=lambda pair: -score[frozenset(pair)])[: crosses.ranking.top]
        pairs = [pair for pair in pairs if pair in best]
    if not pairs:
        raise RecipeError("features.crosses: no candidate pair is left (at least two categorical fields needed)")
    pairs.sort(key=lambda pair: (position[pair[0]], position[pair[1]]))
    resolved = crosses.model_copy(update={"pairs": [list(pair) for pair in pairs], "kept_features": None,
                                          "ranking": None})
    return features.model_copy(update={"crosses": resolved})


def fit_crosses(features: FeaturesConfig, categorical: np.ndarray, names: list[str],
                sizes: list[int]) -> list[CrossVocabulary]:
    """Fit every candidate pair of ``features.crosses`` (resolved here if it is not yet) on the training split's
    categorical ids ``[N, Fc]`` (columns ``names``, vocabulary sizes ``sizes``)."""
    resolved = resolve_crosses(features).crosses
    assert resolved is not None and isinstance(resolved.pairs, list)
    column = {name: i for i, name in enumerate(names)}
    return [fit_cross(a, b, categorical[:, column[a]], categorical[:, column[b]], sizes[column[b]], resolved, index)
            for index, (a, b) in enumerate(resolved.pairs)]


def fit_crosses_lazy(features: FeaturesConfig, ids: pl.LazyFrame, names: list[str],
                     sizes: list[int]) -> list[CrossVocabulary]:
    """:func:`fit_crosses` from a lazy query of the training split's categorical ids (one int column per name of
    ``names`` it pairs): each pair's keys are counted by a streaming group-by, so memory holds one entry per
    distinct cross of one pair at a time, never the rows."""
    resolved = resolve_crosses(features).crosses
    assert resolved is not None and isinstance(resolved.pairs, list)
    column = {name: i for i, name in enumerate(names)}
    crosses = []
    for index, (a, b) in enumerate(resolved.pairs):
        size = sizes[column[b]]
        key = pl.col(a).cast(pl.Int64) * size + pl.col(b).cast(pl.Int64)
        counts = ids.select(key.alias("key")).group_by("key").agg(pl.len().alias("count")).collect(engine="streaming")
        crosses.append(fit_cross_counts(a, b, counts, size, resolved, index))
    return crosses


PAIR_METHODS = ("memorize", "factorize", "naive")
"""How the model may use a pair (OptInter's three methods): the one list every part that names them reads."""


def check_methods(methods: Iterable[object]) -> None:
    """A ``ValueError`` naming the first method (sorted) that is not one of :data:`PAIR_METHODS`."""
    bad = sorted({str(m) for m in methods if m not in PAIR_METHODS})
    if bad:
        raise ValueError(f"pair method {bad[0]!r} is not one of {', '.join(PAIR_METHODS)}")


def check_choices(names: list[str], choices: dict[str, object]) -> None:
    """``choices`` must decide exactly the crosses ``names`` (in layout order), each with a method of
    :data:`PAIR_METHODS`; otherwise a ``ValueError`` naming the unknown, missing or wrong entries."""
    unknown = sorted(set(choices) - set(names))
    missing = [name for name in names if name not in choices]
    if unknown or missing:
        raise ValueError(f"pair choices name {', '.join(unknown) or 'no unknown pair'} and miss "
                         f"{', '.join(missing) or 'no pair'} (the features' crosses: {', '.join(names)})")
    check_methods(choices.values())


def choose_methods(crosses: list[CrossVocabulary], choices: dict[str, str]) -> list[CrossVocabulary]:
    """The crosses with their decided methods (``choices``: every cross's name -> ``memorize``, ``factorize`` or
    ``naive``); naive pairs are left out. Choices that :func:`check_choices` refuses are a ``ValueError``."""
    check_choices([cross.name for cross in crosses], dict(choices))
    return [replace(cross, method=choices[cross.name]) for cross in crosses if choices[cross.name] != "naive"]


def encode_crosses(crosses: list[CrossVocabulary], categorical: np.ndarray, names: list[str]) -> np.ndarray:
    """The cross ids ``[N, P]`` (int32) of rows with categorical ids ``[N, Fc]`` (columns ``names``)."""
    column = {name: i for i, name in enumerate(names)}
    out = np.empty((categorical.shape[0], len(crosses)), dtype=np.int32)
    for p, cross in enumerate(crosses):
        out[:, p] = cross.ids(categorical[:, column[cross.first]], categorical[:, column[cross.second]])
    return out

"""A kept feature set: which values of every vocabulary table, and which value-scaled numeric fields, a model uses.

A feature-set search (OptFS) finds one; the fitted processor then carries it
(:meth:`~ctrlab.data.processor.FeatureProcessor.restrict`), so the run's training data, ``processor.json`` and
therefore every scorer of the run (``Predictor``, the registered pyfunc model, ``ctrlab serve``) encode a dropped
value exactly as an unseen one: out-of-vocabulary (id 1). Kept ids are renumbered densely in their old order, so a
table has one row per kept value (plus padding and OOV) and the stored embedding shrinks with the kept set. A dropped
numeric field encodes as 0 (its learned vector then contributes nothing). Cross features
(:mod:`ctrlab.data.crosses`) are built from the values before the restriction and pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.layout import FIRST_VALUE_ID, OOV_ID, PADDING_ID, FeatureLayout


@dataclass
class KeptValues:
    """``tables``: per vocabulary table a bool mask over its ids (``True`` = kept; padding and OOV are always
    kept). ``numeric``: per value-scaled numeric field whether it is kept. Tables and fields not named are kept
    whole."""

    tables: dict[str, np.ndarray] = field(default_factory=dict)
    numeric: dict[str, bool] = field(default_factory=dict)
    _maps: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, mask in self.tables.items():
            mask = np.asarray(mask, dtype=bool).copy()
            if mask.ndim != 1 or len(mask) < FIRST_VALUE_ID:
                raise ValueError(f"kept values of table {name!r}: a mask over at least {FIRST_VALUE_ID} ids")
            mask[[PADDING_ID, OOV_ID]] = True
            self.tables[name] = mask

    def kept_rows(self, table: str, rows: int) -> int:
        """Rows of ``table`` (``rows`` ids before) after the restriction."""
        return int(self.tables[table].sum()) if table in self.tables else rows

    def id_map(self, table: str) -> np.ndarray:
        """Old id -> new id for ``table``: kept ids numbered densely in their old order, dropped ones OOV (computed
        once: serving calls this per request)."""
        if table not in self._maps:
            mask = self.tables[table]
            self._maps[table] = np.where(mask, np.cumsum(mask) - 1, OOV_ID).astype(np.int32)
        return self._maps[table]

    def restrict_layout(self, layout: FeatureLayout) -> FeatureLayout:
        """``layout`` with every restricted table's vocabulary size reduced to its kept rows. A kept set naming a
        table or numeric field ``layout`` lacks, or whose mask does not cover a table, is a ``ValueError``."""
        unknown = sorted(set(self.tables) - set(layout.tables()))
        unknown += sorted(set(self.numeric) - {spec.name for spec in layout.numeric})
        if unknown:
            raise ValueError(f"kept values name {', '.join(map(repr, unknown))}, which the features do not have "
                             f"(tables {', '.join(layout.tables())}; numeric fields "
                             f"{', '.join(s.name for s in layout.numeric) or 'none'})")
        fields = []
        for spec in layout.fields:
            if spec.kind != "numeric" and spec.table in self.tables:
                if len(self.tables[spec.table]) != spec.vocab_size:
                    raise ValueError(f"kept values of table {spec.table!r} cover {len(self.tables[spec.table])} ids, "
                                     f"the table has {spec.vocab_size}")
                spec = replace(spec, vocab_size=self.kept_rows(spec.table, spec.vocab_size))
            fields.append(spec)
        return layout.with_fields(tuple(fields))

    def apply(self, split: EncodedSplit, layout: FeatureLayout) -> EncodedSplit:
        """``split`` (encoded with the unrestricted ``layout``) as the restricted processor encodes it."""
        maps = {name: self.id_map(name) for name in self.tables}
        categorical = split.categorical.copy()
        for i, spec in enumerate(layout.categorical):
            if spec.table in maps:
                categorical[:, i] = maps[spec.table][categorical[:, i]]
        numeric = split.numeric.copy()
        for i, spec in enumerate(layout.numeric):
            if not self.numeric.get(spec.name, True):
                numeric[:, i] = 0.0
        sequences = {}
        for spec in layout.sequence:
            ids = split.sequences[spec.name]
            sequences[spec.name] = maps[spec.table][ids] if spec.table in maps else ids
        return replace(split, categorical=categorical, numeric=numeric, sequences=sequences)

    def apply_to_batch(self, batch: FeatureBatch, layout: FeatureLayout) -> FeatureBatch:
        """:meth:`apply` for a split already held as tensors (same devices and dtypes out as in)."""
        encoded = self.apply(EncodedSplit(batch.categorical.cpu().numpy(), batch.numeric.cpu().numpy(),
                                          {k: v.cpu().numpy() for k, v in batch.sequences.items()}), layout)

        def back(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(array).to(device=like.device, dtype=like.dtype)

        return replace(batch, categorical=back(encoded.categorical, batch.categorical),
                       numeric=back(encoded.numeric, batch.numeric),
                       sequences={k: back(encoded.sequences[k], v) for k, v in batch.sequences.items()})

    # ----------------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-able: per table its size and the kept value ids (padding and OOV left out)."""
        return {"tables": {name: {"ids": int(len(mask)),
                                  "kept": [int(i) for i in np.flatnonzero(mask) if i >= FIRST_VALUE_ID]}
                           for name, mask in self.tables.items()},
                "numeric": dict(self.numeric)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeptValues:
        tables = {}
        for name, entry in data.get("tables", {}).items():
            mask = np.zeros(int(entry["ids"]), dtype=bool)
            kept = np.asarray(entry["kept"], dtype=np.int64)
            if len(kept) and (kept.min() < FIRST_VALUE_ID or kept.max() >= len(mask)):
                raise ValueError(f"kept ids of table {name!r} outside 2..{len(mask) - 1}")
            mask[kept] = True
            tables[str(name)] = mask
        return cls(tables, {str(k): bool(v) for k, v in data.get("numeric", {}).items()})

"""The shape of the model input, as the fitted processor defines it and every embedding layer consumes it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

FieldKind = Literal["categorical", "numeric", "sequence"]

PADDING_ID = 0
OOV_ID = 1
FIRST_VALUE_ID = 2


@dataclass(frozen=True)
class FieldSpec:
    """One model input field.

    ``table`` names the vocabulary (and so the embedding table) the field's ids index: a sequence that shares the
    vocabulary of a categorical field has that field's name here. ``vocab_size`` counts the padding and OOV ids.
    """

    name: str
    kind: FieldKind
    vocab_size: int = 0
    table: str | None = None
    max_len: int = 0
    pooling: str = "mean"


@dataclass(frozen=True)
class CrossSpec:
    """One cross feature: the pair ``(first, second)`` of categorical fields (``first`` earlier in model order),
    its id space of ``rows`` ids (padding and OOV included), whether its ids are hashed (a vocabulary over the
    row budget) rather than looked up, and ``method``: how the model uses the pair once an interaction search (or a
    fixed architecture from one) has decided, ``memorize`` (a vector per cross id) or ``factorize`` (a product of
    the two fields' vectors); None while undecided. A pair decided *naive* is no cross at all."""

    name: str
    first: str
    second: str
    rows: int
    hashed: bool = False
    method: str | None = None


@dataclass(frozen=True)
class FeatureLayout:
    """All fields in model order: categorical (incl. bucketised numerics), then numeric, then sequences; and the
    cross features (``crosses``, one id column each in :attr:`FeatureBatch.crosses`), which only an interaction
    layer reads."""

    fields: tuple[FieldSpec, ...]
    crosses: tuple[CrossSpec, ...] = ()

    def of_kind(self, kind: FieldKind) -> list[FieldSpec]:
        return [f for f in self.fields if f.kind == kind]

    @property
    def categorical(self) -> list[FieldSpec]:
        return self.of_kind("categorical")

    @property
    def numeric(self) -> list[FieldSpec]:
        return self.of_kind("numeric")

    @property
    def sequence(self) -> list[FieldSpec]:
        return self.of_kind("sequence")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    def tables(self) -> dict[str, int]:
        """Vocabulary tables in first-use order, name -> rows (padding and OOV included)."""
        tables: dict[str, int] = {}
        for f in self.fields:
            if f.kind != "numeric" and f.table is not None and f.table not in tables:
                tables[f.table] = f.vocab_size
        return tables

    def categorical_position(self, name: str) -> int:
        """The column of categorical field ``name`` in :attr:`FeatureBatch.categorical`."""
        return [f.name for f in self.categorical].index(name)

    def with_fields(self, fields: tuple[FieldSpec, ...]) -> "FeatureLayout":
        """The same layout with other field specs (e.g. restricted table sizes); the crosses stay."""
        return FeatureLayout(fields, self.crosses)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"fields": [asdict(f) for f in self.fields]}
        if self.crosses:
            data["crosses"] = [asdict(c) for c in self.crosses]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureLayout":
        return cls(tuple(FieldSpec(**f) for f in data["fields"]),
                   tuple(CrossSpec(**c) for c in data.get("crosses", [])))

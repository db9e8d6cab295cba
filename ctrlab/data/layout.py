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
class FeatureLayout:
    """All fields in model order: categorical (incl. bucketised numerics), then numeric, then sequences."""

    fields: tuple[FieldSpec, ...]

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

    def to_dict(self) -> dict[str, Any]:
        return {"fields": [asdict(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureLayout":
        return cls(tuple(FieldSpec(**f) for f in data["fields"]))

"""The hashing trick per vocabulary: each table shrunk to a row budget, ids mapped to rows by a universal hash."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from ctrlab.config.base import MAX_SEED, MAX_TABLE_ROWS, Int
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import PADDING_ID, FeatureLayout
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.base import EmbeddingConfigBase
from ctrlab.embeddings.hashing import (
    PADDING_ROW,
    HashedTableEmbedding,
    budget_rows,
    check_one_size,
    hash_parameters,
    proportional_rows,
    universal_hash,
)


class HashedConfig(EmbeddingConfigBase):
    """The hashing trick (Weinberger et al. 2009) per vocabulary table: each table keeps ``ceil(rows · budget)``
    rows, or an explicit total ``rows`` is split over the tables in proportion to their vocabulary sizes. With
    neither, every table keeps its full row count (budget 1, but hashed: values collide)."""

    kind: Literal["hashed"] = "hashed"
    budget: float | None = Field(None, gt=0, le=1,
                                 description="fraction of each vocabulary table's rows to keep (alternative to rows)")
    rows: Int | None = Field(None, ge=1, le=MAX_TABLE_ROWS,
                             description="total hashed rows over all tables, split in proportion to "
                                                     "vocabulary size (alternative to budget)")
    salt: Int = Field(0, ge=0, le=MAX_SEED,
                      description="seed of the hash functions (another salt: other hash functions)")

    @field_validator("rows")
    @classmethod
    def _rows_or_budget(cls, rows: int | None, info: ValidationInfo) -> int | None:
        check_one_size(info.data.get("budget"), rows)  # reported at the key 'rows'
        return rows

    @model_validator(mode="after")
    def _one_size(self) -> HashedConfig:
        check_one_size(self.budget, self.rows)  # also on assignment
        return self


@EMBEDDINGS.register("hashed", HashedConfig)
class HashedEmbedding(HashedTableEmbedding):
    """The hashing trick (Weinberger et al. 2009, "Feature Hashing for Large Scale Multitask Learning"): every
    vocabulary table ``t`` (a sequence sharing a vocabulary shares its table and its hash function) gets ``R_t``
    rows and id ``x`` is embedded as row ``h_t(x) = ((a_t · x + b_t) mod P) mod R_t`` of it, a universal hash
    (see :mod:`ctrlab.embeddings.hashing`; Coleman et al. 2023 use this as the per-field hashing baseline of
    Unified Embedding). Distinct ids may share a row.

    Numeric fields get a learned vector scaled by their value (``e = x · v``) and sequences are mean- or
    sum-pooled over their real items, as in :class:`~ctrlab.embeddings.per_field.PerFieldEmbedding`.

    All tables live in one ``[1 + Σ R_t, D]`` parameter with per-table offsets. Row 0 is a zero row that every
    padding id (0) looks up; it is the lookup's ``padding_idx``, so it never receives a gradient and stays zero.
    ``R_t = ceil(V_t · budget)`` for a vocabulary of ``V_t`` ids (padding and OOV included), or ``rows`` split in
    proportion to ``V_t``. The width-1 first-order term (``dim=1``) uses the same rows and hash functions.
    """

    # Buffers, declared for the type checker (``nn.Module.__getattr__`` is typed ``Tensor | Module``).
    categorical_hash: torch.Tensor
    table_hash: torch.Tensor

    def __init__(self, config: HashedConfig, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.dim = dim if dim is not None else config.dim
        self.sparse = config.sparse
        tables = layout.tables()
        vocab = list(tables.values())
        if config.rows is not None:
            sizes = proportional_rows(config.rows, vocab)
        else:
            budget = 1.0 if config.budget is None else config.budget
            sizes = [budget_rows(v, budget) for v in vocab]
        self.table_rows = dict(zip(tables, sizes))  # hashed rows per vocabulary table, name -> R_t
        starts: dict[str, int] = {}
        total = 1  # row 0: padding
        for name, rows in self.table_rows.items():
            starts[name] = total
            total += rows
        self.table_offsets = starts
        weight = torch.randn(total, self.dim) * config.init_std
        weight[PADDING_ROW] = 0.0
        self.weight = nn.Parameter(weight)

        a, b = hash_parameters(len(tables), 1, config.salt)
        index = {name: i for i, name in enumerate(tables)}
        # one column per table: a, b, R_t, start_t (derived from the config, so not part of the state dict)
        params = torch.stack([a[:, 0], b[:, 0], torch.tensor(sizes, dtype=torch.long),
                              torch.tensor([starts[n] for n in tables], dtype=torch.long)]).reshape(4, len(tables))
        categorical = [index[f.table] for f in layout.categorical]  # type: ignore[index]
        self.register_buffer("categorical_hash", params[:, categorical].clone(), persistent=False)  # [4, Fc]
        self.sequence_tables = {f.name: index[f.table] for f in layout.sequence}  # type: ignore[index]
        self.register_buffer("table_hash", params.clone(), persistent=False)  # [4, T]
        self.numeric_weight = nn.Parameter(torch.randn(len(layout.numeric), self.dim) * config.init_std)

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]} (1 padding + {self.table_rows}), dim={self.dim}, sparse={self.sparse}"

    @staticmethod
    def _rows(ids: torch.Tensor, hash_: torch.Tensor) -> torch.Tensor:
        """Global rows of ``ids`` under the per-table constants ``hash_`` (``[4, ...]``, broadcast against ids);
        padding ids go to the zero row."""
        rows = universal_hash(ids, hash_[0], hash_[1], hash_[2]) + hash_[3]
        return rows.masked_fill(ids == PADDING_ID, PADDING_ROW)

    def _categorical_rows(self, batch: FeatureBatch) -> torch.Tensor:
        return self._rows(batch.categorical, self.categorical_hash)

    def _sequence_rows(self, batch: FeatureBatch, name: str) -> torch.Tensor:
        return self._rows(batch.sequences[name], self.table_hash[:, self.sequence_tables[name]])

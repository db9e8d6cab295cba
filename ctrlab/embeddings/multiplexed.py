"""Unified Embedding (feature multiplexing): one shared hashed table for all fields, k hashed chunks per value."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from ctrlab.config.base import MAX_EMBEDDING_DIM, MAX_SEED, MAX_TABLE_ROWS, Int
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
    universal_hash,
)


class MultiplexedConfig(EmbeddingConfigBase):
    """Unified Embedding (Coleman et al. 2023): one table of ``R × chunk_dim`` shared by all fields; a value is
    ``dim / chunk_dim`` chunks, each looked up with its own field-specific hash function. ``budget`` is the fraction
    of the parameters of full per-field tables, ``rows`` an explicit ``R``; with neither, budget 1."""

    kind: Literal["multiplexed"] = "multiplexed"
    chunk_dim: Int | None = Field(None, ge=1, le=MAX_EMBEDDING_DIM,
                                  description="width of one chunk; dim must be a multiple of it "
                                                          "(k = dim / chunk_dim probes per value); default: dim (k=1)")
    budget: float | None = Field(None, gt=0, le=1, description="fraction of the parameters of full per-field tables "
                                                               "(alternative to rows)")
    rows: Int | None = Field(None, ge=1, le=MAX_TABLE_ROWS,
                             description="rows of the shared table (alternative to budget)")
    salt: Int = Field(0, ge=0, le=MAX_SEED,
                      description="seed of the hash functions (another salt: other hash functions)")

    # The field validators report the error at the key that breaks the rule; the model validator also checks
    # assignments (e.g. a new dim).
    @field_validator("chunk_dim")
    @classmethod
    def _chunk_divides_dim(cls, chunk_dim: int | None, info: ValidationInfo) -> int | None:
        _check_chunk(info.data.get("dim"), chunk_dim)
        return chunk_dim

    @field_validator("rows")
    @classmethod
    def _rows_or_budget(cls, rows: int | None, info: ValidationInfo) -> int | None:
        check_one_size(info.data.get("budget"), rows)
        return rows

    @model_validator(mode="after")
    def _valid_sizes(self) -> MultiplexedConfig:
        _check_chunk(self.dim, self.chunk_dim)
        check_one_size(self.budget, self.rows)
        return self


def _check_chunk(dim: int | None, chunk_dim: int | None) -> None:
    if dim is not None and chunk_dim is not None and dim % chunk_dim:
        raise ValueError(f"dim ({dim}) must be a multiple of chunk_dim ({chunk_dim}): each value is "
                         "dim / chunk_dim hashed chunks of width chunk_dim")


@EMBEDDINGS.register("multiplexed", MultiplexedConfig)
class MultiplexedEmbedding(HashedTableEmbedding):
    """Unified Embedding / feature multiplexing (Coleman et al. 2023, "Unified Embedding: Battle-Tested Feature
    Representations for Web-Scale ML Systems"): all fields share ONE table ``W`` of ``R`` rows and ``c = chunk_dim``
    columns. Value ``x`` of a field whose vocabulary is table ``t`` is embedded as the concatenation of ``k = D / c``
    chunks ``W[h_{t,j}(x)]``, ``j = 0..k-1``, each with its own universal hash
    ``h_{t,j}(x) = ((a_{t,j} · x + b_{t,j}) mod P) mod R`` (see :mod:`ctrlab.embeddings.hashing`). Hash functions
    are per vocabulary table, so a sequence sharing a field's vocabulary embeds an id as that field does. Values of
    different fields collide in the shared rows at random; the paper argues such inter-feature collisions hurt
    less than collisions within one field (each field enters the model at its own position), and with ``k``
    probes two values share their whole vector only if all ``k`` hashes collide.

    ``R = ceil(budget · Σ_t V_t · D / c)``: the parameters of full per-field tables (``Σ_t V_t`` rows of width
    ``D``, padding and OOV included) times ``budget``; or ``R = rows``. Row 0 is an extra all-zero row that every
    padding id (0) looks up (the lookup's ``padding_idx``: it never gets a gradient).

    The width-1 first-order term (built with ``dim=1``) uses chunk width 1 and ``k = 1`` (probe 0's hash
    functions) with the same parameter fraction: ``R = ceil(budget · Σ_t V_t)``, or with ``rows``
    ``ceil(rows · c / D_config)`` of the main table's ``rows``. Numeric fields get a learned vector scaled by their
    value and sequences are mean- or sum-pooled over their real items, as in ``per_field``.
    """

    # Buffers, declared for the type checker (``nn.Module.__getattr__`` is typed ``Tensor | Module``).
    categorical_a: torch.Tensor
    categorical_b: torch.Tensor
    table_a: torch.Tensor
    table_b: torch.Tensor

    def __init__(self, config: MultiplexedConfig, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.dim = dim if dim is not None else config.dim
        self.sparse = config.sparse
        config_chunk = config.chunk_dim or config.dim
        if self.dim == 1:
            chunk = 1  # the first-order term: one probe of width 1
        else:
            chunk = config.chunk_dim or self.dim
            if self.dim % chunk:
                raise ValueError(f"embedding width {self.dim} is not a multiple of chunk_dim {chunk}")
        self.chunk_dim = chunk
        self.probes = self.dim // chunk
        tables = layout.tables()
        full = sum(tables.values())
        if config.rows is not None and self.dim == config.dim and chunk == config_chunk:
            rows = config.rows
        else:
            fraction = (config.rows * config_chunk / (max(full, 1) * config.dim) if config.rows is not None
                        else 1.0 if config.budget is None else config.budget)
            rows = budget_rows(full * self.dim / chunk, fraction)
        self.rows = rows
        weight = torch.randn(1 + rows, chunk) * config.init_std
        weight[PADDING_ROW] = 0.0
        self.weight = nn.Parameter(weight)

        a, b = hash_parameters(len(tables), self.probes, config.salt)  # [T, k]
        index = {name: i for i, name in enumerate(tables)}
        categorical = [index[f.table] for f in layout.categorical]  # type: ignore[index]
        self.register_buffer("categorical_a", a[categorical].clone(), persistent=False)  # [Fc, k]
        self.register_buffer("categorical_b", b[categorical].clone(), persistent=False)
        self.register_buffer("table_a", a, persistent=False)  # [T, k]
        self.register_buffer("table_b", b, persistent=False)
        self.sequence_tables = {f.name: index[f.table] for f in layout.sequence}  # type: ignore[index]
        self.numeric_weight = nn.Parameter(torch.randn(len(layout.numeric), self.dim) * config.init_std)

    def extra_repr(self) -> str:
        return (f"rows={self.rows} (+1 padding), chunk_dim={self.chunk_dim}, probes={self.probes}, dim={self.dim}, "
                f"sparse={self.sparse}")

    def _rows(self, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Rows of the k probes of ``ids`` (``[..., k]``); ``a``, ``b`` broadcast against ``ids[..., None]``."""
        x = ids.unsqueeze(-1)
        rows = universal_hash(x, a, b, self.rows) + 1
        return rows.masked_fill(x == PADDING_ID, PADDING_ROW)

    def _categorical_rows(self, batch: FeatureBatch) -> torch.Tensor:
        return self._rows(batch.categorical, self.categorical_a, self.categorical_b)  # [B, Fc, k]

    def _sequence_rows(self, batch: FeatureBatch, name: str) -> torch.Tensor:
        t = self.sequence_tables[name]
        return self._rows(batch.sequences[name], self.table_a[t], self.table_b[t])  # [B, L, k]

    def _lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., k]`` rows -> ``[..., k · c]``: the k chunks side by side."""
        return self._rows_embedding(rows).reshape(*rows.shape[:-1], self.dim)

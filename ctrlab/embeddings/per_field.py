"""Per-field embedding tables, stored as one concatenated table with field offsets (the fast path): the field-wise
embedding layer of DeepFM (Guo et al. 2017) and AutoInt (Song et al. 2019)."""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.base import EmbeddingConfigBase, EmbeddingOutput, FeatureEmbedding, concatenated_row_ids


class PerFieldConfig(EmbeddingConfigBase):
    """One table per vocabulary (a sequence sharing a vocabulary shares the table)."""

    kind: Literal["per_field"] = "per_field"
    backend: Literal["plain", "torchrec"] = Field(
        "plain",
        description="plain: one concatenated table with field offsets (PerFieldEmbedding); torchrec: one "
                    "torchrec EmbeddingBagCollection fed a KeyedJaggedTensor (TorchrecEmbedding; needs torchrec)",
    )

    @field_validator("backend")
    @classmethod
    def _torchrec_installed(cls, value: str) -> str:
        # Checked without importing torchrec (slow): a recipe naming an absent backend fails before data loads.
        if value == "torchrec" and importlib.util.find_spec("torchrec") is None:
            raise ValueError("backend 'torchrec' needs the torchrec package (see README, Installing); "
                             "use backend 'plain' or install torchrec")
        return value


@EMBEDDINGS.register("per_field", PerFieldConfig)
def build_per_field(config: PerFieldConfig, layout: FeatureLayout, dim: int | None = None) -> FeatureEmbedding:
    """The per-field embedding of ``config.backend``: :class:`PerFieldEmbedding` (``plain``) or
    :class:`~ctrlab.embeddings.torchrec_backend.TorchrecEmbedding` (``torchrec``, imported only when asked for)."""
    if config.backend == "torchrec":
        from ctrlab.embeddings.torchrec_backend import TorchrecEmbedding

        return TorchrecEmbedding(config, layout, dim=dim)
    return PerFieldEmbedding(config, layout, dim=dim)


class PerFieldEmbedding(FeatureEmbedding):
    """Looks each field's id up in its own table; numeric fields get a learned vector scaled by their value
    (``e = x · v``, as in AutoInt, Song et al. 2019, eq. 6); sequences are mean- or sum-pooled over real items.

    All tables live in one ``[Σ rows, D]`` parameter, indexed with per-field offsets: one lookup kernel for all
    fields instead of one per table, which is several times faster on CPU.
    """

    # Buffers, declared for the type checker (``nn.Module.__getattr__`` is typed ``Tensor | Module``).
    categorical_offsets: torch.Tensor

    def __init__(self, config: PerFieldConfig, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.dim = dim if dim is not None else config.dim
        self.sparse = config.sparse
        tables = layout.tables()
        starts: dict[str, int] = {}
        total = 0
        for name, rows in tables.items():
            starts[name] = total
            total += rows
        self.table_offsets = starts
        self.weight = nn.Parameter(torch.randn(max(total, 1), self.dim) * config.init_std)
        self.register_buffer(
            "categorical_offsets",
            torch.tensor([starts[f.table] for f in layout.categorical], dtype=torch.long),  # type: ignore[index]
            persistent=False,
        )
        self.sequence_offsets = {f.name: starts[f.table] for f in layout.sequence}  # type: ignore[index]
        self.numeric_weight = nn.Parameter(torch.randn(len(layout.numeric), self.dim) * config.init_std)

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def value_tables(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        tables = {name: self.weight[start:start + rows]
                  for (name, rows), start in zip(self.layout.tables().items(), self.table_offsets.values())}
        return tables, self.numeric_weight if self.layout.numeric else None

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, sparse=self.sparse)

    def forward(self, batch: FeatureBatch) -> EmbeddingOutput:
        parts: list[torch.Tensor] = []
        if self.layout.categorical:
            parts.append(self._lookup(batch.categorical + self.categorical_offsets))
        if self.layout.numeric:
            parts.append(batch.numeric.unsqueeze(-1) * self.numeric_weight)
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for spec in self.layout.sequence:
            ids = batch.sequences[spec.name]
            mask = ids > 0
            vectors = self._lookup(ids + self.sequence_offsets[spec.name]) * mask.unsqueeze(-1)
            sequences[spec.name] = (vectors, mask)
        return EmbeddingOutput.assemble(self.layout, parts, sequences)

    def row_ids(self, batch: FeatureBatch) -> torch.Tensor:
        """The global rows of :attr:`weight` the batch looks up, one entry per lookup (repeats kept): every
        categorical id and every non-padding sequence id."""
        return concatenated_row_ids(self.layout, batch, self.categorical_offsets, self.sequence_offsets)

    def lazy_l2(self, batch: FeatureBatch) -> torch.Tensor:
        rows = torch.unique(self.row_ids(batch))
        return 0.5 * self._lookup(rows).pow(2).sum()

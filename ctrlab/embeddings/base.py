"""The interface every embedding layer implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from pydantic import Field
from torch import nn

from ctrlab.config.base import MAX_EMBEDDING_DIM, Int, Section
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.kept_values import KeptValues
from ctrlab.data.layout import FeatureLayout
from ctrlab.layers.regularizers import mini_batch_aware_l2


class EmbeddingConfigBase(Section):
    """Settings shared by every embedding layer; each layer's config adds a ``kind`` literal."""

    dim: Int = Field(16, ge=1, le=MAX_EMBEDDING_DIM, description="embedding width of every field")
    init_std: float = Field(1e-4, gt=0, description="std of the normal initialisation")
    sparse: bool = Field(False, description="sparse gradients for the tables (fast for large vocabularies)")


@dataclass
class EmbeddingOutput:
    """``fields``: one vector per field, ``[B, F, D]`` in layout order (sequences pooled).
    ``sequences``: the unpooled sequence vectors ``[B, L, D]`` with their padding masks ``[B, L]`` (True = real)."""

    fields: torch.Tensor
    sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def assemble(cls, layout: FeatureLayout, parts: list[torch.Tensor],
                 sequences: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> EmbeddingOutput:
        """The output of any embedding layer: ``parts`` (the categorical then numeric field vectors, each
        ``[B, F_k, D]``) followed by every sequence of ``layout`` pooled over its real items as its spec says (sum or
        mean; the unpooled ``vectors`` must already be zero at padding)."""
        fields = list(parts)
        for spec in layout.sequence:
            vectors, mask = sequences[spec.name]
            pooled = vectors.sum(dim=1)
            if spec.pooling == "mean":
                pooled = pooled / mask.sum(dim=1, keepdim=True).clamp(min=1)
            fields.append(pooled.unsqueeze(1))
        # one kind of field: no copy
        return cls(fields[0] if len(fields) == 1 else torch.cat(fields, dim=1), sequences)


class FeatureEmbedding(nn.Module):
    """Maps a batch to per-field vectors.

    Implementations keep their lookup tables in :meth:`table_parameters` so the trainer can give them their own
    weight decay (and a sparse optimiser when ``sparse``), and implement :meth:`lazy_l2` for the sparse case.
    """

    layout: FeatureLayout
    dim: int
    sparse: bool

    def forward(self, batch: FeatureBatch) -> EmbeddingOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def table_parameters(self) -> list[nn.Parameter]:  # pragma: no cover - interface
        raise NotImplementedError

    def row_ids(self, batch: FeatureBatch) -> torch.Tensor:  # pragma: no cover - interface
        """The table rows this batch looks up, one entry per lookup (padding excluded)."""
        raise NotImplementedError

    def lazy_l2(self, batch: FeatureBatch) -> torch.Tensor:  # pragma: no cover - interface
        """0.5 · Σ‖row‖² over the distinct table rows this batch touches (sparse-gradient weight decay)."""
        raise NotImplementedError

    @property
    def num_rows(self) -> int:
        """Size of the row space :meth:`row_ids` numbers (all tables together). The default reads ``weight``, the
        one concatenated table of layers that have one; layers that keep their tables apart override it."""
        return int(cast(torch.Tensor, self.weight).shape[0])

    def mini_batch_aware_l2(self, batch: FeatureBatch, counts: torch.Tensor, coefficient: float) -> torch.Tensor:
        """DIN's mini-batch aware L2 on the rows this batch looks up; ``counts`` holds ``n_j`` for every row of
        :attr:`num_rows` (see :func:`~ctrlab.layers.regularizers.mini_batch_aware_l2`). The default looks the rows
        up in ``weight``; layers that keep their tables apart override it."""
        return mini_batch_aware_l2(cast(torch.Tensor, self.weight), self.row_ids(batch), counts, coefficient,
                                   sparse=self.sparse)

    @property
    def num_fields(self) -> int:
        return self.layout.num_fields

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def architecture_parameters(self) -> list[nn.Parameter]:
        """Parameters of an architecture search (pruning thresholds, significance weights) that the search
        optimises with its own optimiser: :func:`~ctrlab.train.optim.build_optimizers` leaves them out."""
        return []

    def value_tables(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | None:
        """Views of the stored vectors with one row per value: per vocabulary table ``[rows, D]`` (row = id), and
        the numeric fields' vectors ``[Fn, D]`` (or None without numeric fields); None for a kind whose rows are
        not one per value (hashing shares rows). :meth:`load_kept_rows` copies through these views."""
        return None

    @torch.no_grad()
    def load_kept_rows(self, source: FeatureEmbedding, kept: KeptValues) -> bool:
        """Copy into this embedding (built for a layout ``kept`` restricted) the vectors ``source`` (the same kind,
        built for the layout before the restriction) holds for the kept values: a feature-set search's rewind.
        Returns False, copying nothing, when either side has no :meth:`value_tables` (this embedding then keeps its
        own initial values)."""
        mine, theirs = self.value_tables(), source.value_tables()
        if mine is None or theirs is None:
            return False
        (tables, numeric), (source_tables, source_numeric) = mine, theirs
        for name, table in tables.items():
            rows = source_tables[name]
            if name in kept.tables:
                rows = rows[torch.from_numpy(kept.tables[name].nonzero()[0]).to(rows.device)]
            table.copy_(rows)
        if numeric is not None and source_numeric is not None:
            numeric.copy_(source_numeric)
        return True


def concatenated_row_ids(layout: FeatureLayout, batch: FeatureBatch, categorical_offsets: torch.Tensor,
                         sequence_offsets: Mapping[str, int | torch.Tensor]) -> torch.Tensor:
    """Rows of a table that holds the vocabulary tables one after another (``per_field``, plain or torchrec, and
    the full table of the mixed-dimension and search layers) that ``batch`` looks up, one entry per lookup (repeats
    kept): every categorical id and every non-padding sequence id. ``categorical_offsets``: each categorical field's
    first row; ``sequence_offsets``: each sequence's."""
    ids = [(batch.categorical + categorical_offsets).reshape(-1)] if layout.categorical else []
    for spec in layout.sequence:
        seq = batch.sequences[spec.name]
        ids.append((seq + sequence_offsets[spec.name])[seq > 0])
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=categorical_offsets.device)
    return torch.cat([i.long() for i in ids])

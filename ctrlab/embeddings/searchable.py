"""What the embedding kinds that search their table's architecture share: the recipe keys that pick stages and
an earlier run to start from, and the full-table embedding their search stages train.

A searching kind (``optembed``, ``dnis``) registers the table its final model holds, a
:class:`~ctrlab.embeddings.mixed_dim.MixedDimEmbedding`; its stages (the search methods ``ctrlab.search.optembed``,
``ctrlab.search.dnis`` on :mod:`ctrlab.search.framework`) run inside ``ctrlab train`` before the final training and
prune that table.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ctrlab.config.stages import check_stages
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings.base import EmbeddingConfigBase, EmbeddingOutput, FeatureEmbedding
from ctrlab.embeddings.mixed_dim import EmbeddingUnits, flat_row_ids, full_table_row_ids, init_table


class SearchableEmbeddingConfig(EmbeddingConfigBase):
    """Settings of every searching embedding kind. Subclasses define ``stages`` (a list of their
    :attr:`STAGES`, in that order) and the search's own settings.

    ``stages`` picks what this run does; the last stage, ``retrain``, is the run's final training. Stages left
    out at the front are read from ``from_run``, an earlier run directory that ran them (its
    ``embedding_search/`` outputs); without ``retrain`` the run's model is the searched network itself (pruned to
    the found architecture where its blocks allow) and is only evaluated.
    """

    STAGES: ClassVar[tuple[str, ...]] = ()

    from_run: str | None = Field(None, description="an earlier run directory whose embedding_search/ outputs "
                                                   "the first listed stage starts from")

    @model_validator(mode="after")
    def _check_stages(self) -> SearchableEmbeddingConfig:
        check_stages("embedding", getattr(self, "stages"), self.STAGES, self.from_run)
        return self


class BinaryStep(torch.autograd.Function):
    """The unit step ``S(x) = 1 if x > 0 else 0`` with a straight-through surrogate gradient (OptEmbed, Lyu et
    al. 2022, Section 3.2, the learnable-threshold mask): backward passes ``g · S'(x)`` with the piecewise surrogate

    ``S'(x) = 2 - 4|x|`` for ``|x| ≤ 0.4``, ``0.4`` for ``0.4 < |x| ≤ 1``, ``0`` for ``|x| > 1``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        a = x.abs()
        surrogate = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return grad * surrogate


def binary_step(x: torch.Tensor) -> torch.Tensor:
    """:class:`BinaryStep` applied to ``x``."""
    return BinaryStep.apply(x)


class FullTableSearchEmbedding(FeatureEmbedding):
    """The full ``[Σ rows, D]`` table a search trains, laid out unit by unit as
    :class:`~ctrlab.embeddings.mixed_dim.MixedDimEmbedding` lays out its full table (and drawn by the same call,
    so the same seed gives the same initial values); subclasses transform the looked-up vectors in :meth:`select`
    (row and dimension masks, significance weights) before numeric scaling and pooling.

    :meth:`architecture_parameters` (thresholds, significance weights) are left out of the trainer's optimisers;
    the search stages optimise them with their own.
    """

    flat_units: torch.Tensor
    flat_offsets: torch.Tensor
    unit_starts: torch.Tensor

    def __init__(self, config: EmbeddingConfigBase, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.dim = dim if dim is not None else config.dim
        self.sparse = config.sparse
        self.units = EmbeddingUnits.from_layout(layout)
        self.weight = nn.Parameter(init_table(self.units.total_rows, self.dim, config.init_std))
        self.units.register_offsets(self)
        self.register_buffer("flat_units", torch.tensor(self.units.flat_units, dtype=torch.long), persistent=False)

    def select(self, vectors: torch.Tensor, units: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Transform looked-up vectors ``[B, P, D]``; ``units`` (``[P]``, or ``[1]`` for one sequence's items)
        names each position's unit, ``rows`` (``[B, P]``) each vector's global row. The default keeps them."""
        return vectors

    def unit_table(self, unit: int) -> torch.Tensor:
        """The rows of one unit, ``[rows, D]`` (a view of :attr:`weight`)."""
        start = self.units.offsets[unit]
        return self.weight[start:start + self.units.rows[unit]]

    def effective_table(self) -> torch.Tensor:
        """The full table as the trained network uses it (after any fixed per-unit transform), ``[Σ rows, D]``;
        what a mixed-dimension table inherits when the searched network is kept without re-training."""
        return self.weight.detach()

    def forward(self, batch: FeatureBatch) -> EmbeddingOutput:
        parts: list[torch.Tensor] = []
        num_cat, num_num = len(self.layout.categorical), len(self.layout.numeric)
        if num_cat + num_num:
            flat_ids = flat_row_ids(self.layout, batch, self.flat_offsets)
            vectors = self.select(F.embedding(flat_ids, self.weight, sparse=self.sparse), self.flat_units, flat_ids)
            if num_num:
                vectors = torch.cat([vectors[:, :num_cat], vectors[:, num_cat:] * batch.numeric.unsqueeze(-1)], 1)
            parts.append(vectors)
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for spec, unit in zip(self.layout.sequence, self.units.sequence_units):
            ids = batch.sequences[spec.name]
            mask = ids > 0
            rows = ids + self.unit_starts[unit]
            vectors = F.embedding(rows, self.weight, sparse=self.sparse)
            vectors = self.select(vectors, self.flat_units.new_tensor([unit]), rows) * mask.unsqueeze(-1).to(
                vectors.dtype)
            sequences[spec.name] = (vectors, mask)
        return EmbeddingOutput.assemble(self.layout, parts, sequences)

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def row_ids(self, batch: FeatureBatch) -> torch.Tensor:
        return full_table_row_ids(self.layout, self.units, batch, self.flat_offsets, self.unit_starts)

    def lazy_l2(self, batch: FeatureBatch) -> torch.Tensor:
        rows = torch.unique(self.row_ids(batch))
        return 0.5 * F.embedding(rows, self.weight, sparse=self.sparse).pow(2).sum()

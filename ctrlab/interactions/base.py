"""The interface of a pair layer, and the one that computes a fixed architecture's pair vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.crosses import PAIR_METHODS, check_methods
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.tables import ConcatenatedTables

METHODS = PAIR_METHODS
MEMORIZE, FACTORIZE, NAIVE = METHODS


def decided(config: Any | None, layout: FeatureLayout) -> bool:
    """Whether the pair layer ``config`` describes can be built for ``layout``: a fixed kind always, a searching
    kind (one that lists ``stages``) once every cross of the layout has its method."""
    return config is not None and (not hasattr(config, "stages") or all(c.method for c in layout.crosses))


class PairInteraction(nn.Module):
    """Maps an embedding's output (``fields [B, F, D]``) to one with :attr:`extra_fields` pair vectors appended
    (``[B, F + extra_fields, D]``), given the batch (its cross ids and field ids).

    :meth:`table_parameters` are lookup tables (the trainer gives them the embedding weight decay);
    :meth:`architecture_parameters` are what a search trains with its own optimiser."""

    extra_fields: int

    def pair_vectors(self, batch: FeatureBatch) -> torch.Tensor:  # pragma: no cover - interface
        """``[B, extra_fields, D]``."""
        raise NotImplementedError

    def forward(self, output: EmbeddingOutput, batch: FeatureBatch) -> EmbeddingOutput:
        if self.extra_fields == 0:
            return output
        pairs = self.pair_vectors(batch).to(output.fields.dtype)
        return EmbeddingOutput(torch.cat([output.fields, pairs], dim=1), output.sequences)

    def table_parameters(self) -> list[nn.Parameter]:
        return []

    def architecture_parameters(self) -> list[nn.Parameter]:
        return []

    def stored_parameters(self) -> int:
        """Floats the layer stores (a memorised pair's table counts its rows, a factorised one its fields'
        factor rows, a naive one nothing)."""
        return sum(p.numel() for p in self.parameters() if all(p is not a for a in self.architecture_parameters()))


class PairVectors(PairInteraction):
    """The pair vectors of a fixed architecture (OptInter, Lyu et al. 2022, Section III-B, eq. 4-6): for each cross
    of ``layout`` with method ``memorize``, the cross id's own vector ``e_(a,b)`` from the pair's table (tables
    are allocated for memorised pairs only, one row per cross id); for ``factorize``, the element-wise product
    ``v_a ⊙ v_b`` of the two fields' vectors from a factor table separate from the main embedding (the paper's
    choice: the main embedding stays free to serve the block); a naive pair has no vector (it is not passed in).

    ``methods`` gives each cross's method, in layout order. Vectors come out memorised pairs first, then factorised
    ones, each in layout order."""

    memorized_columns: torch.Tensor
    factor_columns: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor

    def __init__(self, layout: FeatureLayout, dim: int, init_std: float, methods: Sequence[str]) -> None:
        super().__init__()
        if len(methods) != len(layout.crosses):
            raise ValueError(f"{len(methods)} pair methods for {len(layout.crosses)} crosses")
        check_methods(methods)
        self.dim = dim
        self.methods = list(methods)
        memorized = [i for i, m in enumerate(methods) if m == MEMORIZE]
        factorized = [i for i, m in enumerate(methods) if m == FACTORIZE]
        self.pair_names = [layout.crosses[i].name for i in memorized + factorized]
        self.register_buffer("memorized_columns", torch.tensor(memorized, dtype=torch.long), persistent=False)
        self.memorized = (ConcatenatedTables([layout.crosses[i].rows for i in memorized], dim, init_std)
                          if memorized else None)
        fields = sorted({layout.categorical_position(name) for i in factorized
                         for name in (layout.crosses[i].first, layout.crosses[i].second)})
        local = {column: k for k, column in enumerate(fields)}
        self.register_buffer("factor_columns", torch.tensor(fields, dtype=torch.long), persistent=False)
        self.register_buffer("first", torch.tensor(
            [local[layout.categorical_position(layout.crosses[i].first)] for i in factorized], dtype=torch.long),
            persistent=False)
        self.register_buffer("second", torch.tensor(
            [local[layout.categorical_position(layout.crosses[i].second)] for i in factorized], dtype=torch.long),
            persistent=False)
        categorical = layout.categorical
        self.factors = (ConcatenatedTables([categorical[c].vocab_size for c in fields], dim, init_std)
                        if factorized else None)
        self.extra_fields = len(memorized) + len(factorized)

    def memorized_vectors(self, batch: FeatureBatch) -> torch.Tensor | None:
        if self.memorized is None:
            return None
        assert batch.crosses is not None, "the batch has no cross ids (features.crosses)"
        return self.memorized(batch.crosses[:, self.memorized_columns])

    def factorized_vectors(self, batch: FeatureBatch) -> torch.Tensor | None:
        if self.factors is None:
            return None
        vectors = self.factors(batch.categorical[:, self.factor_columns])
        return vectors[:, self.first] * vectors[:, self.second]

    def pair_vectors(self, batch: FeatureBatch) -> torch.Tensor:
        parts = [v for v in (self.memorized_vectors(batch), self.factorized_vectors(batch)) if v is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def table_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in (self.memorized, self.factors) if t is not None]

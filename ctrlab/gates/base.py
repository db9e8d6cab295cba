"""The interface of a feature gate (the model slot between the embedding and the block)."""

from __future__ import annotations

from torch import nn

from ctrlab.data.batches import FeatureBatch
from ctrlab.embeddings.base import EmbeddingOutput


class FeatureGate(nn.Module):
    """Maps an embedding's output to a gated one of the same shapes, given the batch whose ids it embedded.

    :meth:`architecture_parameters` are what a search trains with its own optimiser (the trainer's optimisers
    leave them out)."""

    def forward(self, output: EmbeddingOutput, batch: FeatureBatch) -> EmbeddingOutput:  # pragma: no cover
        raise NotImplementedError

    def architecture_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

"""Embedding layers: turn a :class:`~ctrlab.data.batches.FeatureBatch` into one vector per field.

Each layer is one module that registers itself in :data:`EMBEDDINGS` with its config class; recipes select it
with ``embedding.kind``.
"""

from ctrlab.registry import Registry

EMBEDDINGS: Registry = Registry("embedding layer", "kind", "ctrlab.embeddings")

from ctrlab.embeddings.base import EmbeddingConfigBase, EmbeddingOutput, FeatureEmbedding  # noqa: E402

__all__ = ["EMBEDDINGS", "EmbeddingConfigBase", "EmbeddingOutput", "FeatureEmbedding"]

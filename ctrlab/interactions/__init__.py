"""Pair interactions: the model slot after the embedding (and its gate) where vectors of chosen field pairs join the
field vectors before the block (OptInter, Lyu et al. 2022: memorise a pair, factorise it, or leave it to the
network). A pair layer adds ``extra_fields`` vectors of the block's width to :class:`EmbeddingOutput.fields`, so an
MLP, DeepFM, DCNv2 or AutoInt block reads ``[field vectors, pair vectors]`` unchanged.

Each kind is one module that registers its config in :data:`INTERACTIONS`; recipes select it with
``interaction.kind``: ``pairs`` (one method for every candidate pair: the uniform architectures) or ``optinter``
(searched per pair, :mod:`ctrlab.search.optinter`).
"""

from ctrlab.registry import Registry

INTERACTIONS: Registry = Registry("interaction", "kind", "ctrlab.interactions")

from ctrlab.interactions.base import PairInteraction  # noqa: E402

__all__ = ["INTERACTIONS", "PairInteraction"]

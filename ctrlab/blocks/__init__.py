"""Interaction blocks: each maps per-field embeddings to a logit contribution.

Each block is one module that registers itself in :data:`BLOCKS` with its config class; recipes select it with
``model.block``.
"""

from ctrlab.registry import Registry

BLOCKS: Registry = Registry("block", "block", "ctrlab.blocks")

from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock  # noqa: E402

__all__ = ["BLOCKS", "BlockConfigBase", "BlockInput", "InteractionBlock"]

"""Factorization machine."""

from __future__ import annotations

from typing import Literal

import torch

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.fm import FMInteraction


class FMConfig(BlockConfigBase):
    """FM: first-order term plus all pairwise inner products of field embeddings."""

    block: Literal["fm"] = "fm"
    linear: bool = True


@BLOCKS.register("fm", FMConfig)
class FMBlock(InteractionBlock):
    """logit = b + Σ w_i x_i + Σ_{i<j} ⟨v_i, v_j⟩ (Rendle 2010, eq. 1)."""

    def __init__(self, config: FMConfig, shape: BlockInput) -> None:
        super().__init__()
        self.fm = FMInteraction()

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        return self.fm(embedded.fields)

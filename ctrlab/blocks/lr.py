"""Logistic regression: no interactions, the first-order term only (the CTR baseline of Richardson et al. 2007,
"Predicting Clicks", and the LR row of the BARS benchmark, Zhu et al. 2022)."""

from __future__ import annotations

from typing import Literal

import torch

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.embeddings.base import EmbeddingOutput


class LRConfig(BlockConfigBase):
    """Logistic regression over all features."""

    block: Literal["lr"] = "lr"
    linear: bool = True


@BLOCKS.register("lr", LRConfig)
class LRBlock(InteractionBlock):
    """logit = b + Σ w_i x_i: the model uses only its bias and first-order term, so this block (and the main
    embedding) is never built; it exists to name the model and validate its config."""

    needs_embedding = False

    def __init__(self, config: LRConfig, shape: BlockInput) -> None:
        super().__init__()
        if not config.linear:
            raise ValueError("model.linear must be true for the lr block (it is the whole model)")

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        return embedded.fields.new_zeros(embedded.fields.shape[0])

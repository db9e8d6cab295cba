"""DeepFM."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.fm import FMInteraction
from ctrlab.layers.mlp import MLP, MLPConfig


class DeepFMConfig(BlockConfigBase):
    """DeepFM: an FM and an MLP sharing the same field embeddings."""

    block: Literal["deepfm"] = "deepfm"
    linear: bool = True
    mlp: MLPConfig = Field(default_factory=MLPConfig)


@BLOCKS.register("deepfm", DeepFMConfig)
class DeepFMBlock(InteractionBlock):
    """logit = b + Σ w_i x_i + Σ_{i<j} ⟨v_i, v_j⟩ + MLP([v_1; …; v_F]) (Guo et al. 2017, eq. 1)."""

    def __init__(self, config: DeepFMConfig, shape: BlockInput) -> None:
        super().__init__()
        self.fm = FMInteraction()
        self.mlp = MLP(shape.num_fields * shape.dim, config.mlp, out_dim=1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        fields = embedded.fields
        return self.fm(fields) + self.mlp(fields.flatten(1)).squeeze(-1)

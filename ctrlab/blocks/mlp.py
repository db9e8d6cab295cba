"""Plain deep network over the concatenated field embeddings (the embedding-and-MLP model of Covington et al.
2016, "Deep Neural Networks for YouTube Recommendations", and the DNN row of the BARS benchmark, Zhu et al.
2022)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.mlp import MLP, MLPConfig


class MLPBlockConfig(BlockConfigBase):
    """An MLP over all field embeddings, concatenated."""

    block: Literal["mlp"] = "mlp"
    mlp: MLPConfig = Field(default_factory=MLPConfig)


@BLOCKS.register("mlp", MLPBlockConfig)
class MLPBlock(InteractionBlock):
    """logit = MLP([v_1; …; v_F]): implicit interactions of any order."""

    def __init__(self, config: MLPBlockConfig, shape: BlockInput) -> None:
        super().__init__()
        self.mlp = MLP(shape.num_fields * shape.dim, config.mlp, out_dim=1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        return self.mlp(embedded.fields.flatten(1)).squeeze(-1)

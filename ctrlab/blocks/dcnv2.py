"""DCN-V2."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.config.base import MAX_DEPTH, Int
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.cross import CrossNetworkV2
from ctrlab.layers.mlp import MLP, MLPConfig


class DCNv2Config(BlockConfigBase):
    """DCN-V2: a full-rank cross network combined with an MLP, stacked or in parallel."""

    block: Literal["dcnv2"] = "dcnv2"
    cross_layers: Int = Field(3, ge=1, le=MAX_DEPTH, description="cross layers (eq. 1)")
    structure: Literal["stacked", "parallel"] = Field(
        "parallel", description="stacked: MLP on the cross output; parallel: cross and MLP side by side")
    mlp: MLPConfig = Field(default_factory=MLPConfig)


@BLOCKS.register("dcnv2", DCNv2Config)
class DCNv2Block(InteractionBlock):
    """Wang et al. 2021, Fig. 2 over x_0 = [e_1; …; e_F]: the cross network (eq. 1,
    :class:`~ctrlab.layers.cross.CrossNetworkV2`) then

    * stacked: logit = w^T MLP(x_L) + b;
    * parallel: logit = w^T [x_L ; MLP(x_0)] + b.
    """

    def __init__(self, config: DCNv2Config, shape: BlockInput) -> None:
        super().__init__()
        width = shape.num_fields * shape.dim
        self.parallel = config.structure == "parallel"
        self.cross = CrossNetworkV2(width, config.cross_layers)
        self.mlp = MLP(width, config.mlp, out_dim=None)
        self.output = nn.Linear(self.mlp.out_dim + (width if self.parallel else 0), 1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        x0 = embedded.fields.flatten(1)
        crossed = self.cross(x0)
        if self.parallel:
            hidden = torch.cat([crossed, self.mlp(x0)], dim=1)
        else:
            hidden = self.mlp(crossed)
        return self.output(hidden).squeeze(-1)

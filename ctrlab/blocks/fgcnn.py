"""FGCNN: feature generation by a CNN, then an IPNN-style deep classifier."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.feature_generation import FeatureGeneration
from ctrlab.layers.mlp import MLP, MLPConfig

_Positive = Annotated[int, Field(ge=1)]
_LISTS = ("channels", "kernel_heights", "pooling_sizes", "recombined_maps")


class FGCNNConfig(BlockConfigBase):
    """FGCNN: ``len(channels)`` convolution/pooling/recombination blocks generate new fields; an MLP reads the
    original and generated fields and all their pairwise inner products. The four lists give one entry per block."""

    block: Literal["fgcnn"] = "fgcnn"
    channels: list[_Positive] = Field(default_factory=lambda: [14, 16, 18, 20], min_length=1,
                                      description="convolution kernels per block")
    kernel_heights: list[_Positive] = Field(default_factory=lambda: [7, 7, 7, 7], min_length=1,
                                            description="kernel height (along the field axis) per block")
    pooling_sizes: list[_Positive] = Field(default_factory=lambda: [2, 2, 2, 2], min_length=1,
                                           description="max-pooling height per block")
    recombined_maps: list[_Positive] = Field(default_factory=lambda: [3, 3, 3, 3], min_length=1,
                                             description="new feature maps per block (each h_i fields of width D)")
    mlp: MLPConfig = Field(default_factory=MLPConfig)

    @model_validator(mode="after")
    def _same_lengths(self) -> FGCNNConfig:
        lengths = {name: len(getattr(self, name)) for name in _LISTS}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name} has {n}" for name, n in lengths.items())
            raise ValueError(f"{', '.join(_LISTS)} need one entry per block each; {shown}")
        return self


def pairwise_inner_products(fields: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """⟨e_i, e_j⟩ for the index pairs ``(rows[k], cols[k])`` of ``fields`` ``[B, N, D]`` -> ``[B, P]``."""
    return torch.bmm(fields, fields.transpose(1, 2))[:, rows, cols]


@BLOCKS.register("fgcnn", FGCNNConfig)
class FGCNNBlock(InteractionBlock):
    """logit = MLP([e_1; …; e_N; ⟨e_i, e_j⟩ for i<j]) over the N = F + F_new original and generated fields
    (Liu et al. 2019, Sec. 3.2, an IPNN classifier on the augmented feature space).

    The paper gives the feature-generation CNN its own embedding tables; a ctrlab model has one embedding layer,
    so the new fields are generated from the same field embeddings the classifier reads (the "shared embedding"
    variant of reference implementations).
    """

    def __init__(self, config: FGCNNConfig, shape: BlockInput) -> None:
        super().__init__()
        self.generation = FeatureGeneration(shape.num_fields, shape.dim, config.channels, config.kernel_heights,
                                            config.pooling_sizes, config.recombined_maps)
        total = shape.num_fields + self.generation.num_generated
        rows, cols = torch.triu_indices(total, total, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.mlp = MLP(total * shape.dim + rows.numel(), config.mlp, out_dim=1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        fields = embedded.fields
        augmented = torch.cat([fields, self.generation(fields)], dim=1)  # [B, F + F_new, D]
        products = pairwise_inner_products(augmented, self.rows, self.cols)
        return self.mlp(torch.cat([augmented.flatten(1), products], dim=1)).squeeze(-1)

"""FGCNN: feature generation by a CNN, then an IPNN-style deep classifier."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.config.base import MAX_DEPTH, MAX_KERNEL, MAX_WIDTH, Int
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.feature_generation import FeatureGeneration
from ctrlab.layers.mlp import MLP, MLPConfig

_Channels = Annotated[Int, Field(ge=1, le=MAX_WIDTH)]
_Height = Annotated[Int, Field(ge=1, le=MAX_KERNEL)]
_LISTS = ("channels", "kernel_heights", "pooling_sizes", "recombined_maps")


class FGCNNConfig(BlockConfigBase):
    """FGCNN: ``len(channels)`` convolution/pooling/recombination blocks generate new fields; an MLP reads the
    original and generated fields and all their pairwise inner products. The four lists give one entry per block."""

    block: Literal["fgcnn"] = "fgcnn"
    channels: list[_Channels] = Field(default_factory=lambda: [14, 16, 18, 20], min_length=1, max_length=MAX_DEPTH,
                                      description="convolution kernels per block")
    kernel_heights: list[_Height] = Field(default_factory=lambda: [7, 7, 7, 7], min_length=1, max_length=MAX_DEPTH,
                                            description="kernel height (along the field axis) per block")
    pooling_sizes: list[_Height] = Field(default_factory=lambda: [2, 2, 2, 2], min_length=1, max_length=MAX_DEPTH,
                                           description="max-pooling height per block")
    recombined_maps: list[_Height] = Field(default_factory=lambda: [3, 3, 3, 3], min_length=1, max_length=MAX_DEPTH,
                                             description="new feature maps per block (each h_i fields of width D)")
    generation_embedding: Literal["separate", "shared"] = Field(
        "separate", description="separate: feature generation reads its own embedding of width embedding.dim, "
        "as in the paper (the table stores 2 x embedding.dim per row); shared: it reads the classifier's")
    generation_batch_norm: bool = Field(
        True, description="batch-normalise each convolution's maps before tanh (as reference implementations do; "
        "without it, generated fields are as small as the embeddings and interactions are slow to emerge)")
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

    As in the paper (Fig. 2, Sec. 3.1), feature generation has its own embeddings by default
    (``generation_embedding: separate``): the model's one table stores both side by side, each row
    ``[classifier half; generation half]`` of width 2·D, so the classifier reads the first D columns and the CNN
    the last D. With ``shared`` both read the same D columns (the "shared embedding" variant of reference
    implementations: half the embedding parameters). Under OptEmbed's dimension search the pruned trailing columns
    are the generation half's.
    """

    takes_pair_vectors = False

    # Buffers, declared for the type checker (``nn.Module.__getattr__`` is typed ``Tensor | Module``).
    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, config: FGCNNConfig, shape: BlockInput) -> None:
        super().__init__()
        self.separate = config.generation_embedding == "separate"
        if self.separate and shape.dim % 2:
            raise ValueError(f"FGCNN with a separate generation embedding reads an even embedding width, got "
                             f"{shape.dim}")
        self.dim = shape.dim // 2 if self.separate else shape.dim
        self.generation = FeatureGeneration(shape.num_fields, self.dim, config.channels, config.kernel_heights,
                                            config.pooling_sizes, config.recombined_maps,
                                            batch_norm=config.generation_batch_norm)
        total = shape.num_fields + self.generation.num_generated
        rows, cols = torch.triu_indices(total, total, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.mlp = MLP(total * self.dim + rows.numel(), config.mlp, out_dim=1)

    @classmethod
    def embedding_width(cls, config: BlockConfigBase, dim: int) -> int:
        return 2 * dim if getattr(config, "generation_embedding", "shared") == "separate" else dim

    def augmented(self, fields: torch.Tensor) -> torch.Tensor:
        """The classifier's fields: the original ones then the generated ones, ``[B, F + F_new, D]``."""
        if self.separate:
            original, source = fields[..., : self.dim], fields[..., self.dim:]
        else:
            original = source = fields
        return torch.cat([original, self.generation(source)], dim=1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        augmented = self.augmented(embedded.fields)
        products = pairwise_inner_products(augmented, self.rows, self.cols)
        return self.mlp(torch.cat([augmented.flatten(1), products], dim=1)).squeeze(-1)

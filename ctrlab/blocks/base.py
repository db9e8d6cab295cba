"""The interface every interaction block implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ctrlab.config.base import Section
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings.base import EmbeddingOutput


class BlockConfigBase(Section):
    """Settings shared by every block; each block's config adds a ``block`` literal.

    ``linear`` adds the first-order term Σ w_i x_i (a width-1 embedding of every feature) to the logit.
    """

    linear: bool = Field(False, description="add a first-order (logistic-regression) term")
    dense_init: Literal["torch_default", "xavier_normal"] = Field(
        "torch_default", description="initial weights of the block's linear layers: PyTorch's default "
        "(Kaiming-uniform), or Xavier-normal weights with zero biases (FuxiCTR's, the BARS benchmark runs')")


@dataclass(frozen=True)
class BlockInput:
    """What a block is built for: the field layout, the embedding width and the pair vectors a pair layer appends
    to the field vectors (``extra_fields``, see :mod:`ctrlab.interactions`)."""

    layout: FeatureLayout
    dim: int
    extra_fields: int = 0

    @property
    def num_fields(self) -> int:
        """Vectors per row the block reads: the layout's fields and the pair vectors."""
        return self.layout.num_fields + self.extra_fields


class InteractionBlock(nn.Module):
    """Maps :class:`EmbeddingOutput` to a logit contribution ``[B]``. The model adds the bias and the optional
    first-order term; the block never owns an optimiser, device or loss.

    ``takes_pair_vectors``: whether the block reads any number of field vectors alike, so that a pair layer's
    vectors can join them (blocks that give fields roles, such as DIN's candidate and history, or that split the
    embedding width, such as FGCNN's, do not)."""

    takes_pair_vectors: ClassVar[bool] = True

    @classmethod
    def embedding_width(cls, config: BlockConfigBase, dim: int) -> int:
        """The embedding width the block reads for a recipe's ``embedding.dim``: ``dim`` unless the block keeps
        several embeddings of that width side by side in one table (FGCNN's separate generation embedding)."""
        return dim

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def reset_dense_parameters(self, scheme: str) -> None:
        """Re-initialise every ``nn.Linear`` of the block by ``scheme`` (a ``dense_init`` value). Blocks that set
        a deliberate initial value (DIN's attention output bias) override this to restore it afterwards."""
        if scheme == "torch_default":
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

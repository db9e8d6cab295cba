"""AutoInt and AutoInt+."""

from __future__ import annotations

from typing import Literal, cast

import torch
from pydantic import Field, model_validator
from torch import nn

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.config.base import MAX_DEPTH, MAX_HEADS, MAX_WIDTH, Int
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.attention import InteractingLayer
from ctrlab.layers.mlp import MLP, MLPConfig


class _AttentionSettings(BlockConfigBase):
    """The interacting layers shared by AutoInt and AutoInt+ (not a block by itself: it has no ``block``)."""

    layers: Int = Field(3, ge=1, le=MAX_DEPTH, description="stacked interacting layers")
    heads: Int = Field(2, ge=1, le=MAX_HEADS, description="attention heads per layer")
    attention_dim: Int = Field(40, ge=1, le=MAX_WIDTH, description="output width of a layer, summed over its heads")
    residual: bool = Field(True, description="residual connection with its own projection W_Res (eq. 8)")
    residual_projection: Literal["every_layer", "width_change"] = Field(
        "every_layer", description="every_layer: W_Res in every layer (the paper, eq. 8); width_change: only in "
        "layers that change the width, an identity skip elsewhere (FuxiCTR's layer, as in the BARS runs)")
    layer_norm: bool = Field(False, description="layer norm before each layer's ReLU")
    scaled: bool = Field(False, description="divide <q, k> by sqrt(head width); the paper uses the plain product")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> _AttentionSettings:
        if self.attention_dim % self.heads:
            raise ValueError(f"attention_dim ({self.attention_dim}) must be divisible by heads ({self.heads})")
        return self


class AutoIntConfig(_AttentionSettings):
    """AutoInt: stacked multi-head self-attention over the fields, then a linear logit."""

    block: Literal["autoint"] = "autoint"


class AutoIntPlusConfig(_AttentionSettings):
    """AutoInt+: AutoInt plus an MLP over the raw field embeddings, summed at the logit."""

    block: Literal["autoint_plus"] = "autoint_plus"
    mlp: MLPConfig = Field(default_factory=MLPConfig)


@BLOCKS.register("autoint", AutoIntConfig)
class AutoIntBlock(InteractionBlock):
    """logit = w^T (e^Res_1 ⊕ … ⊕ e^Res_F) + b (Song et al. 2019, eq. 9), with e^Res the output of ``layers``
    stacked interacting layers (eq. 5–8, :class:`~ctrlab.layers.attention.InteractingLayer`)."""

    def __init__(self, config: _AttentionSettings, shape: BlockInput) -> None:
        super().__init__()
        layers: list[InteractingLayer] = []
        width = shape.dim
        for _ in range(config.layers):
            layers.append(InteractingLayer(width, config.attention_dim, config.heads, residual=config.residual,
                                           layer_norm=config.layer_norm, scaled=config.scaled,
                                           residual_projection=config.residual_projection))
            width = config.attention_dim
        self.attention = nn.ModuleList(layers)
        self.output = nn.Linear(shape.num_fields * width, 1)

    def _layers(self) -> list[InteractingLayer]:
        return [cast(InteractingLayer, layer) for layer in self.attention]

    def attend(self, fields: torch.Tensor) -> torch.Tensor:
        """The stacked interacting layers: ``[B, F, D]`` -> ``[B, F, attention_dim]``."""
        for layer in self.attention:
            fields = layer(fields)
        return fields

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        return self.output(self.attend(embedded.fields).flatten(1)).squeeze(-1)

    def record_attention(self, on: bool = True) -> None:
        """Keep (or stop keeping) each layer's attention weights on every forward; off by default so training
        carries no extra tensors."""
        for layer in self._layers():
            layer.keep_attention = on
            if not on:
                layer.last_attention = None

    def attention_maps(self) -> list[torch.Tensor]:
        """Per layer, the attention weights ``[B, heads, F, F]`` of the last forward pass (rows sum to 1 over the
        attended fields); needs :meth:`record_attention` before that pass."""
        maps = [layer.last_attention for layer in self._layers()]
        kept = [m for m in maps if m is not None]
        if len(kept) != len(maps):
            raise RuntimeError("no attention kept: call record_attention() before the forward pass")
        return kept


@BLOCKS.register("autoint_plus", AutoIntPlusConfig)
class AutoIntPlusBlock(AutoIntBlock):
    """AutoInt+ (Song et al. 2019, §5.5): the AutoInt logit plus MLP([e_1; …; e_F]) over the raw embeddings."""

    def __init__(self, config: AutoIntPlusConfig, shape: BlockInput) -> None:
        super().__init__(config, shape)
        self.mlp = MLP(shape.num_fields * shape.dim, config.mlp, out_dim=1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        return super().forward(embedded) + self.mlp(embedded.fields.flatten(1)).squeeze(-1)

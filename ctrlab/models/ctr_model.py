"""The CTR model: a composition of an embedding layer, an optional first-order term and one block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ctrlab.blocks import BLOCKS, InteractionBlock
from ctrlab.blocks.base import BlockInput
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings import EMBEDDINGS, FeatureEmbedding
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.errors import RecipeError
from ctrlab.gates.base import FeatureGate
from ctrlab.interactions import INTERACTIONS, PairInteraction


class CTRModel(nn.Module):
    """logit(x) = b + [Σ_i w_i x_i] + block(pairs(gate(embedding(x)))).

    The first-order term is a width-1 embedding of the same kind as the main one. ``gate`` (optional, e.g. OptFS's
    per-value gates during a feature-set search) scales both embeddings' vectors before they are used.
    ``interaction`` (optional, a pair layer such as OptInter's) appends pair vectors to the field vectors the block
    reads. The model returns logits only; the trainer owns the loss, the optimiser and the device.
    """

    def __init__(
        self, embedding: FeatureEmbedding | None, block: InteractionBlock | None, linear: FeatureEmbedding | None,
        gate: FeatureGate | None = None, interaction: PairInteraction | None = None,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.block = block
        self.linear = linear
        self.gate = gate
        self.interaction = interaction
        self.bias = nn.Parameter(torch.zeros(1))

    def _gated(self, output: EmbeddingOutput, batch: FeatureBatch) -> EmbeddingOutput:
        return self.gate(output, batch) if self.gate is not None else output

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        logit = self.bias.expand(len(batch))
        if self.block is not None and self.embedding is not None:
            embedded = self._gated(self.embedding(batch), batch)
            if self.interaction is not None:
                embedded = self.interaction(embedded, batch)
            logit = logit + self.block(embedded)
        if self.linear is not None:
            logit = logit + self._gated(self.linear(batch), batch).fields.sum(dim=(1, 2))
        return logit

    def embedding_modules(self) -> list[FeatureEmbedding]:
        return [m for m in (self.embedding, self.linear) if m is not None]

    def architecture_parameters(self) -> list[nn.Parameter]:
        """Every part's search parameters (thresholds, significance weights, gates, a block's choices): the
        trainer's own optimisers leave them out, a search gives them theirs."""
        parts: list[nn.Module] = [*self.embedding_modules(),
                                  *(m for m in (self.gate, self.interaction, self.block) if m is not None)]
        found: list[nn.Parameter] = []
        for part in parts:
            method = getattr(part, "architecture_parameters", None)
            if method is not None:
                found.extend(p for p in method() if all(p is not q for q in found))
        return found


def build_model(embedding_config: Any, model_config: Any, layout: FeatureLayout,
                main_embedding: Callable[[Any, FeatureLayout], FeatureEmbedding] | None = None,
                gate: FeatureGate | None = None, interaction_config: Any | None = None,
                interaction: Callable[[FeatureLayout, int, float], PairInteraction] | None = None) -> CTRModel:
    """Build the model a recipe's ``embedding``, ``model`` and ``interaction`` sections describe, for a fitted
    layout.

    ``main_embedding(embedding_config, layout)`` builds the main embedding instead of the registry (an embedding
    search's supernet); the first-order term stays the registry's. ``gate`` goes into the gate slot (built after
    everything else, so the rest of the model draws the same initial values with or without it). The pair layer is
    ``interaction(layout, width, init_std)`` when given (a search's mixture), else the registry's for
    ``interaction_config`` (None: no pair layer); it is built after the embedding and before the block."""
    if layout.num_fields == 0:
        raise ValueError("the recipe selects no features")
    linear = EMBEDDINGS.build(embedding_config, layout, dim=1) if model_config.linear else None
    block_type = BLOCKS.get(model_config.block).impl
    wants_pairs = interaction is not None or interaction_config is not None
    if wants_pairs and not (getattr(block_type, "needs_embedding", True) and block_type.takes_pair_vectors):
        raise RecipeError(f"interaction: model.block {model_config.block} does not read pair vectors; use a block "
                          "that reads any number of field vectors (mlp, deepfm, dcnv2, autoint, fm)")
    # A layout without crosses under a pair layer is a decision of every pair naive (the recipe schema already
    # refuses a pair layer without features.crosses): the layer then adds no vectors.
    if not getattr(block_type, "needs_embedding", True):
        return CTRModel(None, None, linear, gate)
    width = block_type.embedding_width(model_config, embedding_config.dim)
    if width != embedding_config.dim:
        embedding_config = embedding_config.model_copy(update={"dim": width})
    embedding = (main_embedding or EMBEDDINGS.build)(embedding_config, layout)
    pairs: PairInteraction | None = None
    if interaction is not None:
        pairs = interaction(layout, embedding.dim, embedding_config.init_std)
    elif interaction_config is not None:
        pairs = INTERACTIONS.build(interaction_config, layout, embedding.dim, embedding_config.init_std)
    extra = pairs.extra_fields if pairs is not None else 0
    block = BLOCKS.build(model_config, BlockInput(layout, embedding.dim, extra))
    block.reset_dense_parameters(model_config.dense_init)
    return CTRModel(embedding, block, linear, gate, pairs)


def build_recipe_model(recipe: Any, layout: FeatureLayout, **parts: Any) -> CTRModel:
    """:func:`build_model` for a recipe's ``embedding``, ``model`` and ``interaction`` sections (``parts``: the
    other keyword arguments of :func:`build_model`)."""
    return build_model(recipe.embedding, recipe.model, layout, interaction_config=recipe.interaction, **parts)

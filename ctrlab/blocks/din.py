"""DIN (Deep Interest Network, Zhou et al. 2018) and its baseline with a plain sum/mean-pooled history.

Both feed every field vector ``[B, F, D]``, flattened, to one MLP. They differ only in the history's slot: DIN puts
the candidate-dependent attention pooling ``Σ_j a(e_j, e_cand)·e_j`` there, the baseline keeps the embedding's own
sum/mean pooling (the paper's "Base Model").
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.din import AttentionPooling, deep_mlp
from ctrlab.layers.mlp import MLPConfig


class _HistoryConfig(BlockConfigBase):
    """What DIN and its baseline share: the candidate and history fields and the MLP."""

    candidate: str = Field(description="the candidate item: a categorical field")
    history: str = Field(description="the behaviour history: a sequence field sharing the candidate's vocabulary")
    mlp: MLPConfig = Field(default_factory=lambda: MLPConfig(hidden=[200, 80]))
    mlp_activation: Literal["dice"] | None = Field(None, description="'dice' overrides mlp.activation with Dice")


class HistoryPoolingConfig(_HistoryConfig):
    """Embedding & MLP baseline: the history enters the MLP sum- or mean-pooled over its real items."""

    block: Literal["history_pooling"] = "history_pooling"
    pooling: Literal["sum", "mean"] | None = Field(
        None, description="pool the history by sum or mean; default: as the sequence feature's own pooling")


class DINConfig(_HistoryConfig):
    """DIN: the history enters the MLP attention-pooled with respect to the candidate (weights not normalised)."""

    block: Literal["din"] = "din"
    attention_hidden: list[int] = Field(default_factory=lambda: [80, 40])
    attention_activation: Literal["dice", "prelu"] = "dice"
    attention_reduce: Literal["sum", "mean"] = Field(
        "sum", description="sum: Σ_j a_j·e_j as in the paper (eq. 3); mean: that sum divided by the number of real "
                           "behaviours (not in the paper; the weights are still not softmax-normalised)")


def _locate(config: _HistoryConfig, shape: BlockInput) -> tuple[int, int]:
    """The candidate's and the history's slots in ``EmbeddingOutput.fields`` (categorical, numeric, sequence)."""
    layout = shape.layout
    ordered = [*layout.categorical, *layout.numeric, *layout.sequence]
    fields = {f.name: (i, f) for i, f in enumerate(ordered)}
    candidate = fields.get(config.candidate)
    history = fields.get(config.history)
    if candidate is None or candidate[1].kind != "categorical":
        raise ValueError(f"block {config.block}: candidate {config.candidate!r} is not a categorical feature")
    if history is None or history[1].kind != "sequence":
        raise ValueError(f"block {config.block}: history {config.history!r} is not a sequence feature")
    if history[1].table != candidate[1].table:
        raise ValueError(f"block {config.block}: history {config.history!r} must share the vocabulary of "
                         f"{config.candidate!r} (share_vocab_with: {config.candidate})")
    return candidate[0], history[0]


class HistoryMLPBlock(InteractionBlock):
    """MLP([v_1; …; v_F]) where the history's slot holds either its pooled vector or, with ``attention``, the
    DIN interest vector for the row's candidate."""

    attention_pooling = False

    def __init__(self, config: _HistoryConfig, shape: BlockInput) -> None:
        super().__init__()
        self.candidate_index, self.history_index = _locate(config, shape)
        self.history = config.history
        self.pooling: str | None = getattr(config, "pooling", None)
        self.attention: AttentionPooling | None = None
        if self.attention_pooling:
            assert isinstance(config, DINConfig)
            self.attention = AttentionPooling(shape.dim, config.attention_hidden, config.attention_activation,
                                              config.attention_reduce)
        self.mlp = deep_mlp(shape.num_fields * shape.dim, config.mlp, out_dim=1, activation=config.mlp_activation)

    def mlp_input(self, embedded: EmbeddingOutput) -> torch.Tensor:
        fields = embedded.fields
        if self.attention is not None:
            behaviours, mask = embedded.sequences[self.history]
            pooled = self.attention(behaviours, fields[:, self.candidate_index], mask)
            fields = self._replace_history(fields, pooled)
        elif self.pooling is not None:
            behaviours, mask = embedded.sequences[self.history]
            pooled = behaviours.sum(dim=1)  # padded positions are zero vectors
            if self.pooling == "mean":
                pooled = pooled / mask.sum(dim=1, keepdim=True).clamp(min=1)
            fields = self._replace_history(fields, pooled)
        return fields.flatten(1)

    def _replace_history(self, fields: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = self.history_index
        return torch.cat([fields[:, :h], pooled.unsqueeze(1).to(fields.dtype), fields[:, h + 1:]], dim=1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        return self.mlp(self.mlp_input(embedded)).squeeze(-1)


@BLOCKS.register("history_pooling", HistoryPoolingConfig)
class HistoryPoolingBlock(HistoryMLPBlock):
    """Base model of DIN §4: sum/mean pooling of the history, then the MLP."""


@BLOCKS.register("din", DINConfig)
class DINBlock(HistoryMLPBlock):
    """DIN (Zhou et al. 2018, §4.3): local activation unit + weighted sum pooling of the history, then the MLP."""

    attention_pooling = True

"""DIN (Deep Interest Network, Zhou et al. 2018) and its baseline with a plain sum/mean-pooled history.

Both feed every field vector ``[B, F, D]``, flattened, to one MLP. They differ only in the history's slot: DIN puts
the candidate-dependent attention pooling ``Σ_j a(e_j, e_cand)·e_j`` there, the baseline keeps the embedding's own
sum/mean pooling (the paper's "Base Model").

A behaviour can be described by several features, as in the paper (§4, Fig. 2: each behaviour is the
concatenation of its goods_id, shop_id and cate_id embeddings, and the candidate ad likewise; on MovieLens, movie_id
and genre). ``candidate`` and ``history`` then name equally long lists of fields, paired: ``history[i]`` is a
sequence sharing the vocabulary of the categorical ``candidate[i]``, and all histories are aligned (position ``j``
of each describes the same behaviour, so they have the same ``max_len``). DIN's behaviour vector is
``e_j = [h_1,j; …; h_k,j]`` (``k·D`` wide) and the candidate's ``[c_1; …; c_k]``; the ``k·D`` interest vector is cut
back into ``k`` chunks of ``D``, chunk ``i`` taking history ``i``'s slot, so the MLP input keeps its size. Which
positions are real comes from the FIRST history's padding mask: the histories must be padded alike.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase, BlockInput, InteractionBlock
from ctrlab.config.base import MAX_DEPTH, MAX_FIELDS, MAX_WIDTH, Int
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.din import AttentionPooling, deep_mlp
from ctrlab.layers.mlp import MLPConfig


def _names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class _HistoryConfig(BlockConfigBase):
    """What DIN and its baseline share: the candidate and history fields and the MLP."""

    candidate: str | list[str] = Field(
        max_length=MAX_FIELDS,
        description="the candidate item: a categorical field, or a list of them (one per feature of an item)")
    history: str | list[str] = Field(
        max_length=MAX_FIELDS,
        description="the behaviour history: a sequence field sharing the candidate's vocabulary, or a list as long "
                    "as candidate's, history[i] sharing the vocabulary of candidate[i] and all aligned position by "
                    "position (same max_len; the padding mask is the first history's)")
    mlp: MLPConfig = Field(default_factory=lambda: MLPConfig(hidden=[200, 80]))
    mlp_activation: Literal["dice"] | None = Field(None, description="'dice' overrides mlp.activation with Dice")

    @model_validator(mode="after")
    def _paired(self) -> _HistoryConfig:
        candidates, histories = self.candidates, self.histories
        block = getattr(self, "block", "din")
        if not candidates or not histories:
            raise ValueError(f"block {block}: candidate and history must each name at least one field")
        if len(candidates) != len(histories):
            raise ValueError(
                f"block {block}: candidate names {len(candidates)} field(s) ({', '.join(candidates)}) but "
                f"history names {len(histories)} ({', '.join(histories)}); they pair up: history[i] holds the "
                f"behaviours' values of candidate[i]")
        for what, names in (("candidate", candidates), ("history", histories)):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"block {block}: {what} names {', '.join(map(repr, repeated))} more than once")
        return self

    @property
    def candidates(self) -> list[str]:
        """``candidate`` as a list of field names."""
        return _names(self.candidate)

    @property
    def histories(self) -> list[str]:
        """``history`` as a list of field names, aligned with :attr:`candidates`."""
        return _names(self.history)


class HistoryPoolingConfig(_HistoryConfig):
    """Embedding & MLP baseline: each history enters the MLP sum- or mean-pooled over its real items."""

    block: Literal["history_pooling"] = "history_pooling"
    pooling: Literal["sum", "mean"] | None = Field(
        None, description="pool each history by sum or mean; default: as the sequence feature's own pooling")


class DINConfig(_HistoryConfig):
    """DIN: the histories enter the MLP attention-pooled with respect to the candidate (weights not normalised)."""

    block: Literal["din"] = "din"
    attention_hidden: list[Annotated[Int, Field(ge=1, le=MAX_WIDTH)]] = Field(default_factory=lambda: [80, 40],
                                                                             max_length=MAX_DEPTH)
    attention_activation: Literal["dice", "prelu"] = "dice"
    attention_reduce: Literal["sum", "mean"] = Field(
        "sum", description="sum: Σ_j a_j·e_j as in the paper (eq. 3); mean: that sum divided by the number of real "
                           "behaviours (not in the paper; the weights are still not softmax-normalised)")
    attention_output_bias: float = Field(
        0.0, description="initial output bias of the activation unit: 1 starts every behaviour near weight 1, i.e. "
                         "from plain pooling, and learns the candidate-dependent deviations")


def _locate(config: _HistoryConfig, shape: BlockInput) -> tuple[list[int], list[int]]:
    """The candidates' and the histories' slots in ``EmbeddingOutput.fields`` (categorical, numeric, sequence),
    pairwise; checks kinds, shared vocabularies and that the histories have one ``max_len``."""
    layout = shape.layout
    ordered = [*layout.categorical, *layout.numeric, *layout.sequence]
    fields = {f.name: (i, f) for i, f in enumerate(ordered)}
    block = getattr(config, "block", "din")
    candidate_slots, history_slots = [], []
    first = None
    for candidate_name, history_name in zip(config.candidates, config.histories):
        candidate = fields.get(candidate_name)
        history = fields.get(history_name)
        if candidate is None or candidate[1].kind != "categorical":
            raise ValueError(f"block {block}: candidate {candidate_name!r} is not a categorical feature")
        if history is None or history[1].kind != "sequence":
            raise ValueError(f"block {block}: history {history_name!r} is not a sequence feature")
        if history[1].table != candidate[1].table:
            raise ValueError(f"block {block}: history {history_name!r} must share the vocabulary of its "
                             f"candidate {candidate_name!r} (share_vocab_with: {candidate_name})")
        if first is None:
            first = history[1]
        elif history[1].max_len != first.max_len:
            raise ValueError(
                f"block {block}: history {history_name!r} has max_len {history[1].max_len} but "
                f"{first.name!r} has {first.max_len}; the histories are aligned (position j of each is the same "
                f"behaviour), so they need the same max_len")
        candidate_slots.append(candidate[0])
        history_slots.append(history[0])
    return candidate_slots, history_slots


class HistoryMLPBlock(InteractionBlock):
    """MLP([v_1; …; v_F]) where each history's slot holds either its pooled vector or, with ``attention``, its
    chunk of the DIN interest vector for the row's candidate."""

    takes_pair_vectors = False

    attention_pooling = False

    def __init__(self, config: _HistoryConfig, shape: BlockInput) -> None:
        super().__init__()
        self.candidate_slots, self.history_slots = _locate(config, shape)
        self.histories = config.histories
        self.dim = shape.dim
        # slots in increasing order with the history (chunk) that fills each, for one concatenation
        self._slot_order = sorted(range(len(self.history_slots)), key=self.history_slots.__getitem__)
        self.pooling: str | None = getattr(config, "pooling", None)
        self.attention: AttentionPooling | None = None
        if self.attention_pooling:
            assert isinstance(config, DINConfig)
            self.attention = AttentionPooling(len(self.histories) * shape.dim, config.attention_hidden,
                                              config.attention_activation, config.attention_reduce,
                                              config.attention_output_bias)
        self.mlp = deep_mlp(shape.num_fields * shape.dim, config.mlp, out_dim=1, activation=config.mlp_activation)

    def reset_dense_parameters(self, scheme: str) -> None:
        super().reset_dense_parameters(scheme)
        if self.attention is not None:
            self.attention.unit.reset_output_bias()

    def behaviours(self, embedded: EmbeddingOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The behaviour vectors ``e_j = [h_1,j; …; h_k,j]`` ``[B, L, k·D]`` and the first history's mask ``[B, L]``."""
        vectors = [embedded.sequences[name][0] for name in self.histories]
        mask = embedded.sequences[self.histories[0]][1]
        return (vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)), mask

    def candidate(self, embedded: EmbeddingOutput) -> torch.Tensor:
        """The candidate vector ``[c_1; …; c_k]`` ``[B, k·D]``."""
        return embedded.fields[:, self.candidate_slots].flatten(1)

    def mlp_input(self, embedded: EmbeddingOutput) -> torch.Tensor:
        fields = embedded.fields
        if self.attention is not None:
            behaviours, mask = self.behaviours(embedded)
            pooled = self.attention(behaviours, self.candidate(embedded), mask)  # [B, k·D]
            fields = self._replace_histories(fields, pooled.unflatten(1, (len(self.histories), self.dim)))
        elif self.pooling is not None:
            chunks = []
            for name in self.histories:
                vectors, mask = embedded.sequences[name]
                pooled = vectors.sum(dim=1)  # padded positions are zero vectors
                if self.pooling == "mean":
                    pooled = pooled / mask.sum(dim=1, keepdim=True).clamp(min=1)
                chunks.append(pooled)
            fields = self._replace_histories(fields, torch.stack(chunks, dim=1))
        return fields.flatten(1)

    def _replace_histories(self, fields: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """``fields [B, F, D]`` with history ``i``'s slot replaced by ``chunks[:, i]`` (``chunks [B, k, D]``)."""
        chunks = chunks.to(fields.dtype)
        pieces, start = [], 0
        for i in self._slot_order:
            slot = self.history_slots[i]
            pieces += [fields[:, start:slot], chunks[:, i:i + 1]]
            start = slot + 1
        pieces.append(fields[:, start:])
        return torch.cat(pieces, dim=1)

    def forward(self, embedded: EmbeddingOutput) -> torch.Tensor:
        return self.mlp(self.mlp_input(embedded)).squeeze(-1)


@BLOCKS.register("history_pooling", HistoryPoolingConfig)
class HistoryPoolingBlock(HistoryMLPBlock):
    """Base model of DIN (§4.2, Fig. 2 left): each history sum/mean-pooled over its real items into its own slot
    (as pooling the concatenated behaviour vectors and cutting the result per feature), then the MLP."""


@BLOCKS.register("din", DINConfig)
class DINBlock(HistoryMLPBlock):
    """DIN (Zhou et al. 2018, §4.3, Fig. 2 right): local activation unit + weighted sum pooling of the behaviours
    (each the concatenation of its history features' vectors, scored against the concatenated candidate), then the
    MLP with each history's slot holding its chunk of the interest vector."""

    attention_pooling = True

"""DNIS (Cheng, Shen, Huang 2020, "Differentiable Neural Input Search for Recommender Systems"): a soft
selection layer weighs every embedding dimension of every field; the weights are learnt against the validation
loss, then each field keeps its most significant dimensions (stages in :mod:`ctrlab.search.dnis`).

``embedding.kind: dnis`` registers the table the final model holds (:class:`DNISEmbedding`, a mixed-dimension
table); the search stage trains :class:`DNISSearchEmbedding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ctrlab.config.base import MAX_COUNT, MAX_EMBEDDING_DIM, MAX_EPOCHS, Int
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.mixed_dim import EmbeddingUnits, MixedDimEmbedding, full_table_row_ids
from ctrlab.embeddings.searchable import FullTableSearchEmbedding, SearchableEmbeddingConfig

DNISStage = Literal["search", "retrain"]
#: the budgets a run with neither ``threshold`` nor ``budget`` tries, smallest first (fractions of the full table)
BUDGET_STEPS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def _every_stage() -> list[DNISStage]:
    return ["search", "retrain"]


class DNISConfig(SearchableEmbeddingConfig):
    """DNIS (Cheng et al. 2020): ``search`` trains the model with a soft selection layer ``ẽ = e ⊙ α_f`` whose
    significance weights ``α`` follow the validation loss (first-order bi-level optimisation, alternating a
    training step on the weights with a validation step on ``α``); the dimensions of each field are then ranked by
    ``|α|`` and pruned by a relative ``threshold`` or a parameter ``budget`` (by default one chosen on validation,
    see below); ``retrain`` trains a fresh model
    (same seed, same initial values) whose table keeps only those dimensions, with the recipe's ``train`` settings.

    ``blocks`` splits every vocabulary table into that many frequency blocks (Section 3.1: the values of a field
    sorted by their training frequency and cut into blocks of equal size, most frequent first), each with its own
    significance weights and so its own kept dimensions: rare values can keep fewer dimensions than frequent ones.
    With 1 (the default) a table is one block and every value of a field keeps the same dimensions.

    Under a ``budget`` the (block, dimension) pairs are kept greedily by decreasing significance; with
    ``budget_order: per_parameter`` by significance per float they cost (significance / the block's rows), the
    greedy rule for keeping the most significance within the budget, under which a field of ten values keeps its
    dimensions for almost nothing (not in the paper, which prunes by a threshold on ``|α|``).

    ``significance: effective`` ranks by ``|α_bk| · RMS_{rows r of b}(e_rk)`` instead of ``|α_bk|``: in ``e ⊙ α``
    the weights and ``α`` can trade scale, and an embedding L2 shrinks rows of rare values towards 0 whatever their
    ``α``, so ``|α|`` alone can rank a dimension the network barely receives above one it uses (not in the paper).

    ``min_dim`` keeps at least that many of every block's most significant dimensions whatever the rule (under a
    budget they are paid for first): the paper's pruning can drop a field entirely, and a field of a few values
    costs almost nothing to keep (not in the paper).

    Every block whose largest significance is above ``nil_significance`` times the largest of all keeps at least
    one dimension (under a budget as far as it allows, most significant blocks first): the paper's pruning can
    drop a field whose weights are merely smaller than the others', e.g. a 300-value field whose ``|α|`` all end
    between 0.55 and 0.73 against a largest of 1.43 on the quickstart (not in the paper; 1 restores its pruning).

    Set ``threshold`` or ``budget``, or neither (the default): then the budget is chosen on validation, the
    smallest of 0.05, 0.10, ..., 0.95 under which the searched network, with the pruned dimensions' ``α`` set to 0
    (no re-training), scores a validation AUC at most ``tolerance`` below its own unpruned; none: every dimension is
    kept (not in the paper, which prunes by a threshold on ``|α|``). A fixed budget (0.5 was this kind's default)
    halves a table whatever it costs: on the quickstart at 200,000 rows it pruned a 300-value field to 0 dimensions
    and lost 0.018 test AUC against the full table; the budget chosen on validation there is 0.75.
    """

    STAGES: ClassVar[tuple[str, ...]] = ("search", "retrain")

    kind: Literal["dnis"] = "dnis"
    stages: list[DNISStage] = Field(default_factory=_every_stage,
                                    description="stages this run does, in order: search, retrain")
    search_epochs: Int = Field(10, ge=1, le=MAX_EPOCHS, description="epochs of the bi-level search (early stopping and "
                                                     "lr_on_plateau as in train)")
    arch_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the significance weights alpha, "
                                                   "stepped on a validation batch after every training step")
    alpha_init: float = Field(1.0, description="initial value of every significance weight")
    blocks: Int = Field(1, ge=1, le=MAX_COUNT, description="frequency blocks per vocabulary table, each with its own "
                                             "significance weights and kept dimensions (1: one per table)")
    block_min_rows: Int = Field(100, ge=1, le=MAX_COUNT,
                                description="fewest rows in a frequency block: a table is cut into at "
                                                       "most rows // block_min_rows blocks, so a field of a few "
                                                       "values is never split value by value")
    significance: Literal["alpha", "effective"] = Field(
        "alpha", description="what ranks a (block, dimension): |alpha| (the paper), or |alpha| times the "
                             "root-mean-square of that dimension's weights over the block's rows (the magnitude the "
                             "network actually receives)")
    budget_order: Literal["significance", "per_parameter"] = Field(
        "significance", description="with a budget, keep (block, dimension) pairs by decreasing significance, or "
                                    "by significance per stored float (a block of few rows is cheap to keep)")
    min_dim: Int = Field(0, ge=0, le=MAX_EMBEDDING_DIM,
                         description="dimensions every block keeps whatever the rule (its most "
                                              "significant ones; under a budget they are paid for first)")
    threshold: float | None = Field(None, gt=0, le=1, description="keep the (field, dimension) units whose |alpha| "
                                                                  "is at least this fraction of the largest |alpha|")
    budget: float | None = Field(None, gt=0, le=1, description="fraction of the full table's parameters to keep: "
                                                               "the most significant (field, dimension) units, each "
                                                               "costing its field's rows (with neither budget nor "
                                                               "threshold: the smallest budget within tolerance on "
                                                               "validation)")
    tolerance: float = Field(0.001, ge=0, le=1, description="with neither threshold nor budget: the validation AUC the "
                                                            "pruned searched network may lose against the unpruned "
                                                            "one (the smallest budget of 0.05, 0.10, ..., 0.95 "
                                                            "within it is kept)")
    nil_significance: float = Field(1e-3, ge=0, le=1,
                                    description="a block keeps at least one dimension unless its largest "
                                                "significance is at most this fraction of the largest of all "
                                                "(1: the paper's pruning, which can drop a field)")

    @model_validator(mode="after")
    def _one_rule(self) -> DNISConfig:
        if self.threshold is not None and self.budget is not None:
            raise ValueError("embedding.threshold and embedding.budget are alternatives: set one and make the "
                             "other null")
        return self


def training_row_counts(layout: FeatureLayout, batch: FeatureBatch) -> torch.Tensor:
    """How often every row of the full table (units laid out as :class:`EmbeddingUnits` does) is looked up in
    ``batch``: categorical ids and non-padding sequence ids; numeric units count 0. Long ``[Σ rows]``."""
    units = EmbeddingUnits.from_layout(layout)
    starts = torch.tensor(units.offsets, dtype=torch.long, device=batch.categorical.device)
    rows = full_table_row_ids(layout, units, batch, starts[list(units.flat_units)], starts)
    return torch.bincount(rows, minlength=units.total_rows).cpu()


@dataclass(frozen=True)
class FrequencyBlocks:
    """DNIS's feature blocks (Cheng et al. 2020, Section 3.1): every unit's rows split into blocks; blocks are
    numbered globally, unit by unit. ``row_block``: the block of every row of the full table (long ``[Σ rows]``);
    ``block_unit``: the unit of every block."""

    row_block: torch.Tensor
    block_unit: tuple[int, ...]

    @classmethod
    def one_per_unit(cls, units: EmbeddingUnits) -> "FrequencyBlocks":
        rows = torch.tensor(units.rows, dtype=torch.long)
        return cls(torch.repeat_interleave(torch.arange(len(units)), rows), tuple(range(len(units))))

    @classmethod
    def from_counts(cls, units: EmbeddingUnits, counts: torch.Tensor, blocks: int, min_rows: int = 1
                    ) -> "FrequencyBlocks":
        """Each vocabulary table's rows sorted by ``counts`` (descending; ties by row) and cut into ``blocks``
        blocks of equal size (sizes differ by at most one), or fewer so that a block has at least ``min_rows``
        rows (a table of fewer than ``2 · min_rows`` rows stays one block); numeric units are one block each."""
        row_block = torch.empty(units.total_rows, dtype=torch.long)
        block_unit: list[int] = []
        for u, (start, rows) in enumerate(zip(units.offsets, units.rows)):
            k = max(1, min(blocks, rows // max(min_rows, 1))) if units.is_table(u) else 1
            unit_counts = counts[start:start + rows]
            # stable sort of -count: equal counts keep row order
            order = torch.sort(-unit_counts, stable=True).indices
            local = torch.empty(rows, dtype=torch.long)
            local[order] = torch.arange(rows) * k // rows
            row_block[start:start + rows] = local + len(block_unit)
            block_unit += [u] * k
        return cls(row_block, tuple(block_unit))

    def __len__(self) -> int:
        return len(self.block_unit)

    @property
    def rows_per_block(self) -> list[int]:
        return torch.bincount(self.row_block, minlength=len(self)).tolist()

    def names(self, units: EmbeddingUnits) -> list[str]:
        """``<unit>`` for a unit of one block, else ``<unit>#<b>`` (b = 0: its most frequent values)."""
        per_unit = [self.block_unit.count(u) for u in range(len(units))]
        first = {u: self.block_unit.index(u) for u in set(self.block_unit)}
        return [units.names[u] if per_unit[u] == 1 else f"{units.names[u]}#{b - first[u]}"
                for b, u in enumerate(self.block_unit)]

    def unit_blocks(self, units: EmbeddingUnits, unit: int) -> torch.Tensor:
        """The local block (0 = most frequent) of every row of ``unit``."""
        start, rows = units.offsets[unit], units.rows[unit]
        return self.row_block[start:start + rows] - self.block_unit.index(unit)


class DNISSearchEmbedding(FullTableSearchEmbedding):
    """DNIS's soft selection layer over the full table (Cheng et al. 2020, Section 3.2): the vector of a row in
    block ``b`` is ``ẽ = e ⊙ α_b``, with one learnable significance weight per (block, dimension), ``α: K × D``
    (one block per unit unless frequency blocks are given, see :class:`FrequencyBlocks`).

    ``α`` is an architecture parameter: the trainer's optimisers leave it out and the search stage steps it on
    validation batches only (Section 3.3, the first-order approximation of the bi-level problem). During the
    weights' step it is excluded from autograd (``requires_grad`` off), so training batches give it no gradient.
    """

    row_block: torch.Tensor

    def __init__(self, config: DNISConfig, layout: FeatureLayout, dim: int | None = None,
                 blocks: FrequencyBlocks | None = None) -> None:
        super().__init__(config, layout, dim)
        self.blocks = blocks if blocks is not None else FrequencyBlocks.one_per_unit(self.units)
        if self.blocks.row_block.shape != (self.units.total_rows,):
            raise ValueError(f"frequency blocks for {self.blocks.row_block.shape[0]} rows, the table has "
                             f"{self.units.total_rows}")
        self.alpha = nn.Parameter(torch.full((len(self.blocks), self.dim), float(config.alpha_init)))
        self.register_buffer("row_block", self.blocks.row_block.clone(), persistent=False)

    def architecture_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def select(self, vectors: torch.Tensor, units: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return vectors * self.alpha[self.row_block[rows]]

    def effective_table(self) -> torch.Tensor:
        """``e ⊙ α_b`` for every row: the table the searched network effectively uses."""
        return (self.weight * self.alpha[self.row_block]).detach()

    def significance(self, kind: str = "alpha") -> torch.Tensor:
        """The significance of every (block, dimension), ``[blocks, D]`` (detached, on CPU); see
        :func:`block_significance`."""
        return block_significance(self.weight.detach().cpu(), self.alpha.detach().cpu(), self.blocks, kind)


def block_significance(weight: torch.Tensor, alpha: torch.Tensor, blocks: FrequencyBlocks, kind: str = "alpha"
                       ) -> torch.Tensor:
    """``|α|`` (``kind="alpha"``), or ``|α_bk| · sqrt(mean over the rows r of block b of e_rk²)``
    (``kind="effective"``), ``[blocks, D]``; ``weight`` is the full ``[Σ rows, D]`` table."""
    if kind == "alpha":
        return alpha.abs()
    if kind != "effective":
        raise ValueError(f"unknown significance {kind!r}: alpha or effective")
    squares = torch.zeros_like(alpha).index_add_(0, blocks.row_block, weight.pow(2))
    rows = torch.tensor(blocks.rows_per_block, dtype=weight.dtype).clamp(min=1).unsqueeze(1)
    return alpha.abs() * (squares / rows).sqrt()


@EMBEDDINGS.register("dnis", DNISConfig)
class DNISEmbedding(MixedDimEmbedding):
    """The table of a model trained with ``embedding.kind: dnis``: DNIS's mixed-dimension table (Cheng et al.
    2020, Section 3.3, pruning the least significant dimensions), a
    :class:`~ctrlab.embeddings.mixed_dim.MixedDimEmbedding` that keeps per field the dimensions with the largest
    ``|α|``, most significant first. Built from the recipe alone it has full shapes; the search stages prune it,
    and loading a run's weights re-shapes it."""

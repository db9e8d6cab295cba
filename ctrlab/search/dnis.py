"""DNIS's stages (Cheng, Shen, Huang 2020, "Differentiable Neural Input Search for Recommender Systems"):
``search`` (Section 3: the soft selection layer trained by first-order bi-level optimisation, then the dimensions
ranked by significance and pruned) and ``retrain`` (the run's own final training of the mixed-dimension table),
on the search framework (:mod:`ctrlab.search.framework`; the table artefact and its files:
:mod:`ctrlab.search.tables`).

Outputs under ``<run>/embedding_search/``:

``search_model.safetensors``
    the searched model (weights and significance weights ``embedding.alpha``); a later run's ``retrain`` reads it.
``significance.csv``
    one row per (block, dimension): the block's rows, ``alpha``, ``|alpha|``, the ``significance`` that ranks it
    (``|alpha|``, or the effective magnitude, see ``embedding.significance``), its rank within the block and whether
    it is kept (a block is a unit, or ``<unit>#<b>`` with frequency blocks, b = 0 the most frequent values).
``dims.json``
    the kept dimensions per unit and their order (source dimensions, most significant first).

Pruning uses this recipe's ``threshold`` or ``budget``, or with neither (the default) the smallest budget the
searched network passes on validation (:func:`validation_budget`; not in the paper): a run with ``stages: [retrain]``
and ``from_run`` re-prunes an earlier search's significance weights with other settings. A run with
``stages: [search]`` keeps the searched network itself (``α`` folded into the full table: its blocks were trained on
every dimension in place, and the kept dimensions are not a field's leading ones) and saves the dims for a later
``retrain``.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file

from ctrlab.data.batches import FeatureBatch
from ctrlab.embeddings.dnis import (
    BUDGET_STEPS,
    DNISConfig,
    DNISSearchEmbedding,
    FrequencyBlocks,
    block_significance,
    training_row_counts,
)
from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture, EmbeddingUnits
from ctrlab.errors import DataError, RecipeError
from ctrlab.models.ctr_model import CTRModel
from ctrlab.run_dir import EMBEDDING_SEARCH_DIR
from ctrlab.search.framework import SearchContext, SearchMethod, register
from ctrlab.search.tables import (
    TableArchitecture,
    TableOutcome,
    check_has_table,
    report_architecture,
    table_units,
    valid_auc,
)
from ctrlab.train.hooks import ParameterGroup, TrainingHooks
from ctrlab.train.trainer import EpochRecord, Trainer
from ctrlab.utils.checkpoint import save_weights
from ctrlab.utils.io import atomic_path

SEARCH_MODEL_FILE = "search_model.safetensors"
SIGNIFICANCE_FILE = "significance.csv"
ALPHA_KEY = "embedding.alpha"
WEIGHT_KEY = "embedding.weight"


# ------------------------------------------------------------------------------------------ bi-level steps
def bilevel_hooks(embedding: DNISSearchEmbedding, arch_lr: float) -> TrainingHooks:
    """DNIS's first-order bi-level optimisation (Cheng et al. 2020, Section 3.3) as trainer hooks: the significance
    weights ``α`` form a validation-step group (Adam, learning rate ``arch_lr``, no weight decay), so every training
    step on the weights (``α`` fixed) is followed by a step on ``α`` on the next validation batch (see
    :class:`~ctrlab.train.hooks.ValidationStep`). ``train.lr_on_plateau`` leaves ``arch_lr`` as it is."""
    return TrainingHooks(parameter_groups=[ParameterGroup("alpha", [embedding.alpha], lr=arch_lr, on_plateau=False,
                                                          step="validation")])


# ------------------------------------------------------------------------------------------------- pruning
def rank_dimensions(significance: torch.Tensor) -> list[list[int]]:
    """Per unit, its dimensions by decreasing ``|α|`` (ties: lower dimension first)."""
    out = []
    for row in significance.abs().tolist():
        out.append(sorted(range(len(row)), key=lambda k: (-row[k], k)))
    return out


def guarded_blocks(significance: torch.Tensor, nil: float | None) -> list[bool]:
    """Per block, whether it keeps at least one dimension: its largest significance is above ``nil`` times the
    largest of all (``None`` or 1: no block is guarded, the paper's pruning)."""
    values = significance.abs()
    if nil is None or not values.numel():
        return [False] * int(values.shape[0])
    top = float(values.max())
    return [m > nil * top and m > 0 for m in values.max(dim=1).values.tolist()]


def prune_by_threshold(significance: torch.Tensor, threshold: float, min_dim: int = 0,
                       nil: float | None = None) -> list[int]:
    """Kept dimensions per unit: the (unit, dimension) pairs with ``|α| ≥ threshold · max |α|``, at least
    ``min_dim`` (capped at the width) per unit, and at least one per unit :func:`guarded_blocks` guards."""
    values = significance.abs()
    cut = threshold * float(values.max()) if values.numel() else 0.0
    floor = min(min_dim, int(values.shape[1]))
    guarded = guarded_blocks(values, nil)
    return [max(int(n), floor, int(g)) for n, g in zip((values >= cut).sum(dim=1).tolist(), guarded)]


def prune_by_budget(significance: torch.Tensor, rows: list[int], budget: float, per_parameter: bool = False,
                    min_dim: int = 0, nil: float | None = None) -> tuple[list[int], int]:
    """Kept dimensions per unit (or block) under a parameter budget: ``floor(budget · Σ rows · D)`` floats. Every
    unit first gets ``min_dim`` dimensions (capped at the width; a budget too small for them is a ``ValueError``).
    Then every unit :func:`guarded_blocks` guards (``nil``) that still has none gets its most significant
    dimension, units in order of their largest significance, as far as the budget allows. The remaining (unit,
    dimension) pairs are taken greedily by decreasing significance, or with ``per_parameter`` by decreasing
    significance per float (significance / the unit's rows: the greedy rule for the knapsack of keeping the most
    significance within the budget), each costing its unit's rows; a pair that does not fit is skipped (and so is
    every less significant pair of its unit, which costs as much). Returns the dims and the floats they use, which
    never exceed the budget."""
    values = significance.abs()
    num_units, dim = values.shape
    allowed = math.floor(budget * sum(rows) * dim + 1e-9)
    floor = min(min_dim, dim)
    dims = [floor] * num_units
    spent = floor * sum(rows)
    if spent > allowed:
        raise ValueError(f"min_dim {min_dim} needs {spent:,} floats, more than the budget's {allowed:,}")
    guarded = guarded_blocks(values, nil)
    tops = values.max(dim=1).values.tolist() if dim else [0.0] * num_units
    for unit in sorted(range(num_units), key=lambda u: (-tops[u], u)):
        if guarded[unit] and dims[unit] == 0 and dim and spent + rows[unit] <= allowed:
            dims[unit] = 1
            spent += rows[unit]
    cost = [max(r, 1) if per_parameter else 1 for r in rows]
    # a unit's pairs come out of the sort in its own order of significance, so its first dims[unit] are already paid
    pairs = sorted(((float(values[u, k]) / cost[u], u, k) for u in range(num_units) for k in range(dim)),
                   key=lambda p: (-p[0], p[1], p[2]))
    reserved = list(dims)
    for _, unit, _ in pairs:
        if reserved[unit]:
            reserved[unit] -= 1
        elif spent + rows[unit] <= allowed:
            dims[unit] += 1
            spent += rows[unit]
    return dims, spent


def block_dims(significance: torch.Tensor, blocks: FrequencyBlocks, config: DNISConfig,
               budget: float | None = None) -> list[int]:
    """Kept dimensions per block by ``threshold`` or a budget (``budget``, else the recipe's; a block costs its rows
    per dimension)."""
    if config.threshold is not None:
        return prune_by_threshold(significance, config.threshold, config.min_dim, config.nil_significance)
    budget = budget if budget is not None else config.budget
    if budget is None:
        raise ValueError("no budget: with neither threshold nor budget, choose one with validation_budget")
    try:
        dims, _ = prune_by_budget(significance, blocks.rows_per_block, float(budget),
                                  per_parameter=config.budget_order == "per_parameter", min_dim=config.min_dim,
                                  nil=config.nil_significance)
    except ValueError as error:
        raise RecipeError(f"embedding.min_dim: {error}") from None
    return dims


def pruned_alpha(alpha: torch.Tensor, significance: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``alpha`` with every block's dimensions beyond its ``dims`` most significant set to 0: the searched network
    as the pruned table would make it, without re-training."""
    out = alpha.clone()
    for b, ranks in enumerate(rank_dimensions(significance)):
        out[b, ranks[dims[b]:]] = 0
    return out


@dataclass
class BudgetChoice:
    """What :func:`validation_budget` found: the chosen budget (``None``: none within tolerance, every dimension
    kept), the searched network's validation AUC unpruned, and the AUC under every budget tried."""

    budget: float | None
    full_auc: float
    tried: dict[float, float]


def validation_budget(network: CTRModel, significance: torch.Tensor, blocks: FrequencyBlocks, config: DNISConfig,
                      valid: FeatureBatch, batch_size: int, device: torch.device, precision: str = "fp32",
                      steps: Sequence[float] = BUDGET_STEPS) -> BudgetChoice:
    """The smallest of ``steps`` under which the searched ``network`` (a :class:`DNISSearchEmbedding` model), its
    pruned dimensions' ``α`` set to 0, scores a validation AUC at most ``config.tolerance`` below its unpruned one
    (budgets whose ``min_dim`` does not fit are skipped). ``network``'s ``α`` is left as it was."""
    embedding = network.embedding
    assert isinstance(embedding, DNISSearchEmbedding)
    alpha = embedding.alpha.detach().clone()
    full = valid_auc(network, valid, batch_size, device, precision)
    tried: dict[float, float] = {}
    try:
        for budget in sorted(steps):
            try:
                dims = block_dims(significance, blocks, config, budget)
            except RecipeError:
                continue
            with torch.no_grad():
                embedding.alpha.copy_(pruned_alpha(alpha, significance, dims).to(embedding.alpha.device))
            tried[budget] = score = valid_auc(network, valid, batch_size, device, precision)
            if score >= full - config.tolerance:
                return BudgetChoice(budget, full, tried)
    finally:
        with torch.no_grad():
            embedding.alpha.copy_(alpha)
    return BudgetChoice(None, full, tried)


def architecture_from_significance(significance: torch.Tensor, units: EmbeddingUnits, config: DNISConfig,
                                   blocks: FrequencyBlocks | None = None,
                                   budget: float | None = None) -> EmbeddingArchitecture:
    """Rank each block's dimensions by ``|α|`` and keep the most significant ones by ``threshold`` or a budget
    (``budget``, else the recipe's); ``blocks`` defaults to one block per unit (then ``significance`` has one row
    per unit)."""
    blocks = blocks or FrequencyBlocks.one_per_unit(units)
    if significance.shape[0] != len(blocks):
        raise ValueError(f"significance for {significance.shape[0]} blocks, the table has {len(blocks)}")
    return architecture_from_dims(significance, block_dims(significance, blocks, config, budget), units, blocks)


def architecture_from_dims(significance: torch.Tensor, dims: list[int], units: EmbeddingUnits,
                           blocks: FrequencyBlocks) -> EmbeddingArchitecture:
    """Each block keeps its ``dims`` most significant dimensions, most significant first."""
    ranks = rank_dimensions(significance)
    architecture = EmbeddingArchitecture(int(significance.shape[1]))
    for u, name in enumerate(units.names):
        own = [b for b, unit in enumerate(blocks.block_unit) if unit == u]
        if len(own) == 1:
            architecture.dims[name] = dims[own[0]]
            architecture.order[name] = ranks[own[0]][:dims[own[0]]]
        else:
            architecture.blocks[name] = blocks.unit_blocks(units, u)
            architecture.block_dims[name] = [dims[b] for b in own]
            architecture.block_order[name] = [ranks[b][:dims[b]] for b in own]
    return architecture


def write_significance(context: SearchContext, alpha: torch.Tensor, significance: torch.Tensor,
                       blocks: FrequencyBlocks, kept: list[int]) -> None:
    """One row per (block, dimension); a block is named ``<unit>#<b>`` when its unit has several."""
    ranks = rank_dimensions(significance)
    rows = blocks.rows_per_block
    with atomic_path(context.directory / SIGNIFICANCE_FILE) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["unit", "rows", "dimension", "alpha", "abs_alpha", "significance", "rank", "kept"])
            for b, name in enumerate(blocks.names(table_units(context))):
                position = {k: r for r, k in enumerate(ranks[b])}
                for k in range(alpha.shape[1]):
                    value = float(alpha[b, k])
                    writer.writerow([name, rows[b], k, f"{value:.6g}", f"{abs(value):.6g}",
                                     f"{float(significance[b, k]):.6g}", position[k] + 1, int(position[k] < kept[b])])


def frequency_blocks(context: SearchContext) -> FrequencyBlocks:
    """The recipe's frequency blocks, from the training split's row counts (the same data gives the same blocks,
    so a later ``retrain`` recomputes them)."""
    config: DNISConfig = context.config
    if config.blocks == 1:
        return FrequencyBlocks.one_per_unit(table_units(context))
    counts = training_row_counts(context.layout, context.batches["train"])
    return FrequencyBlocks.from_counts(table_units(context), counts, config.blocks, config.block_min_rows)


# ---------------------------------------------------------------------------------------------- the stages
def search(context: SearchContext) -> tuple[CTRModel, dict[str, Any]]:
    """Stage ``search``: train the model with the soft selection layer, alternating weight and ``α`` steps, for
    up to ``search_epochs`` epochs (the best validation epoch's weights and ``α`` are kept), and save it."""
    config: DNISConfig = context.config
    model = context.build_network(functools.partial(DNISSearchEmbedding, blocks=frequency_blocks(context)))
    embedding = model.embedding
    assert isinstance(embedding, DNISSearchEmbedding)

    def log_epoch(record: EpochRecord) -> None:
        context.log_metrics({"search.train_loss": record.train_loss,
                             **{f"search.valid_{k}": v for k, v in record.valid.items()}}, step=record.epoch)

    train_config = context.recipe.train.model_copy(update={"epochs": config.search_epochs})
    trainer = Trainer(model, train_config, context.device, seed=context.recipe.seed, console=context.console,
                      callbacks=[log_epoch], hooks=bilevel_hooks(embedding, config.arch_lr))
    context.say(f"stage search: up to {config.search_epochs} epochs, alpha lr {config.arch_lr:g} on validation "
                f"batches after every training step, {len(embedding.blocks)} blocks")
    fit = trainer.fit(context.batches["train"], context.batches["valid"])
    steps = trainer.validation_steps
    save_weights(model, context.directory / SEARCH_MODEL_FILE)
    summary = {"epochs_run": len(fit.history), "best_epoch": fit.best_epoch, "best_valid": fit.best_valid,
               "architecture_steps": steps,
               "history": [r.as_dict() for r in fit.history]}
    context.say(f"search: best epoch {fit.best_epoch}, valid "
                + "  ".join(f"{k} {v:.5f}" for k, v in fit.best_valid.items()))
    return model, summary


def load_search(context: SearchContext, blocks: FrequencyBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """The significance weights and the full table of an earlier run's search (``embedding.from_run``), copied
    into this run."""
    path = context.copy_earlier(SEARCH_MODEL_FILE)
    state = load_file(str(path))
    alpha, weight = state.get(ALPHA_KEY), state.get(WEIGHT_KEY)
    expected = (len(blocks), context.dim)
    if alpha is None or tuple(alpha.shape) != expected:
        raise DataError(f"{path}: no significance weights {ALPHA_KEY} of shape {expected} (the earlier run has other "
                        "features, another embedding.dim or other embedding.blocks)")
    if weight is None or tuple(weight.shape) != (table_units(context).total_rows, context.dim):
        raise DataError(f"{path}: no table {WEIGHT_KEY} of shape {(table_units(context).total_rows, context.dim)}")
    return alpha, weight


def load_searched_network(context: SearchContext, blocks: FrequencyBlocks) -> CTRModel:
    """The searched network an earlier run saved (``embedding.from_run``; already copied by :func:`load_search`)."""
    model = context.build_network(functools.partial(DNISSearchEmbedding, blocks=blocks))
    context.load_network(model, context.directory / SEARCH_MODEL_FILE)
    return model.to(context.device)


@register
class DNISSearch(SearchMethod):
    """DNIS (Cheng et al. 2020): stages ``search`` and ``retrain`` of ``embedding.kind: dnis``."""

    name = "dnis"
    directory = EMBEDDING_SEARCH_DIR

    def run(self, context: SearchContext) -> TableOutcome:
        """Run the listed stages; without ``search``, the significance weights come from ``embedding.from_run``."""
        check_has_table(context.recipe, context.section)
        config: DNISConfig = context.config
        summary: dict[str, Any] = {}
        network: CTRModel | None = None
        units = table_units(context)
        if "search" in config.stages:
            network, summary["search"] = search(context)
            embedding = network.embedding
            assert isinstance(embedding, DNISSearchEmbedding)
            alpha, weight, blocks = embedding.alpha.detach().cpu(), embedding.weight.detach().cpu(), embedding.blocks
        else:
            blocks = frequency_blocks(context)
            alpha, weight = load_search(context, blocks)
        significance = block_significance(weight, alpha, blocks, config.significance)
        budget: float | None = None
        pruning: dict[str, Any] = {"blocks": len(blocks)}
        if config.threshold is not None:
            pruning["rule"] = f"threshold {config.threshold:g}"
        elif config.budget is not None:
            pruning["rule"] = f"budget {config.budget:g}"
        else:
            searched = network if network is not None else load_searched_network(context, blocks)
            train = context.recipe.train
            choice = validation_budget(searched, significance, blocks, config, context.batches["valid"].to(
                context.device), train.eval_batch_size, context.device, train.precision)
            budget = choice.budget if choice.budget is not None else 1.0
            pruning.update(rule=f"budget {budget:g} (chosen on validation, tolerance {config.tolerance:g})",
                           budget=budget, searched_valid_auc=choice.full_auc,
                           budget_valid_auc={f"{b:g}": a for b, a in choice.tried.items()})
            tried = ", ".join(f"{b:g}: {a:.5f}" for b, a in choice.tried.items())
            context.say((f"budget {budget:g}: the smallest whose" if choice.budget is not None else
                         "every dimension kept: no budget whose")
                        + f" pruned searched network is within {config.tolerance:g} of its validation auc "
                        f"{choice.full_auc:.5f} ({tried})")
        kept = block_dims(significance, blocks, config, budget)
        artefact = TableArchitecture(architecture_from_dims(significance, kept, units, blocks), units)
        write_significance(context, alpha, significance, blocks, kept)
        summary["pruning"] = pruning
        if len(blocks) > len(units):
            summary["pruning"]["block_dims"] = dict(zip(blocks.names(units), kept))
        report_architecture(context, artefact)
        # Without re-training, the run's model is the searched network itself: its blocks were trained on every
        # dimension in place, so it keeps the full table (alpha folded in); the dims are saved for a later retrain.
        return TableOutcome(artefact, retrain="retrain" in config.stages, summary=summary, network=network,
                            network_architecture=EmbeddingArchitecture(context.dim))

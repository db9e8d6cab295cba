"""OptEmbed's stages (Lyu et al. 2022, "OptEmbed: Learning Optimal Embedding Table for Click-through Rate
Prediction", CIKM): ``supernet`` (Sections 3.2-3.3, after a warm-up at all dimensions that the paper does not have,
see :class:`~ctrlab.embeddings.optembed.OptEmbedConfig`), ``search`` (Section 3.3, evolutionary search, with a
fallback to all dimensions the paper does not have) and ``retrain`` (Section 3.4; the run's own final training), on
the search framework (:mod:`ctrlab.search.framework`; the table artefact and its files: :mod:`ctrlab.search.tables`).

Outputs under ``<run>/embedding_search/``:

``supernet.safetensors``
    the trained supernet (the whole model, thresholds included); stage ``search`` of a later run reads it.
``row_mask.safetensors``
    per vocabulary table the rows whose L1 norm exceeds the table's threshold.
``dims.json``
    the dimensions per unit the search found (all ``D`` when the run does no search, or when the search falls
    back to them: ``fallback_tolerance``).
``search_history.csv``, ``search_progress.png``
    every evaluated candidate per generation (validation AUC, kept parameters, dims), and the best and mean AUC
    per generation (the PNG needs matplotlib).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture
from ctrlab.embeddings.optembed import OptEmbedConfig, OptEmbedSupernet
from ctrlab.errors import RecipeError
from ctrlab.models.ctr_model import CTRModel
from ctrlab.run_dir import EMBEDDING_SEARCH_DIR
from ctrlab.search.framework import SearchContext, SearchMethod, register
from ctrlab.search.tables import (
    DIMS_FILE,
    ROW_MASK_FILE,
    TableArchitecture,
    TableOutcome,
    check_has_table,
    load_dims,
    load_row_mask,
    report_architecture,
    table_units,
    valid_auc,
)
from ctrlab.train.hooks import ParameterGroup, TrainingHooks
from ctrlab.train.trainer import EpochRecord, Trainer
from ctrlab.utils.checkpoint import save_weights
from ctrlab.utils.io import atomic_path

SUPERNET_FILE = "supernet.safetensors"
HISTORY_FILE = "search_history.csv"
PROGRESS_FILE = "search_progress.png"


# ---------------------------------------------------------------------------------------------- supernet
def supernet_hooks(supernet: OptEmbedSupernet, threshold_lr: float) -> TrainingHooks:
    """What OptEmbed's supernet adds to training (Lyu et al. 2022, Section 3.2): the threshold regulariser
    ``α · Σ_f exp(-t_f)`` in the loss, and the thresholds in a group of their own (Adam, learning rate
    ``threshold_lr``, no weight decay), whose learning rate ``train.lr_on_plateau`` lowers with the model's."""
    return TrainingHooks(
        loss_terms=[lambda batch: supernet.sparsity_loss()],
        parameter_groups=[ParameterGroup("thresholds", supernet.architecture_parameters(), lr=threshold_lr,
                                         on_plateau=True)],
    )


def kept_row_fraction(supernet: OptEmbedSupernet) -> float:
    masks = supernet.row_mask()
    total = sum(int(m.numel()) for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def train_supernet(context: SearchContext) -> tuple[CTRModel, dict[str, Any]]:
    """Stage ``supernet``: a warm-up of up to ``warmup_epochs`` epochs at all dimensions, then up to
    ``supernet_epochs`` epochs of uniform dimension sampling, validated at sampled dimensions (the same draws every
    epoch; without a warm-up at all dimensions, as the paper); each phase keeps its best validation epoch's
    weights. The thresholds learn in both. The supernet is saved."""
    config: OptEmbedConfig = context.config
    model = context.build_network(OptEmbedSupernet)
    supernet = model.embedding
    assert isinstance(supernet, OptEmbedSupernet)
    summary: dict[str, Any] = {}
    offset = 0

    def log_epoch(prefix: str) -> Callable[[EpochRecord], None]:
        def log(record: EpochRecord) -> None:
            context.log_metrics({f"{prefix}.train_loss": record.train_loss,
                                 **{f"{prefix}.valid_{k}": v for k, v in record.valid.items()},
                                 f"{prefix}.kept_row_fraction": kept_row_fraction(supernet)},
                                step=offset + record.epoch)
        return log

    def phase(epochs: int, prefix: str, hooks: TrainingHooks) -> dict[str, Any]:
        train_config = context.recipe.train.model_copy(update={"epochs": epochs})
        trainer = Trainer(model, train_config, context.device, seed=context.recipe.seed, console=context.console,
                          callbacks=[log_epoch(prefix)], hooks=hooks)
        fit = trainer.fit(context.batches["train"], context.batches["valid"])
        return {"epochs_run": len(fit.history), "best_epoch": fit.best_epoch, "best_valid": fit.best_valid,
                "history": [r.as_dict() for r in fit.history]}

    if config.warmup_epochs:
        context.say(f"stage supernet, warm-up: up to {config.warmup_epochs} epochs at all {context.dim} dimensions, "
                    f"thresholds lr {config.threshold_lr:g}, sparsity weight {config.sparsity_weight:g}")
        supernet.sampling = False
        try:
            summary["warmup"] = phase(config.warmup_epochs, "supernet.warmup",
                                      supernet_hooks(supernet, config.threshold_lr))
        finally:
            supernet.sampling = True
        offset = summary["warmup"]["epochs_run"]
        context.say("supernet warm-up: best epoch {best_epoch}, valid ".format(**summary["warmup"])
                    + "  ".join(f"{k} {v:.5f}" for k, v in summary["warmup"]["best_valid"].items()))
    validated = "sampled" if config.warmup_epochs else "all"
    context.say(f"stage supernet: up to {config.supernet_epochs} epochs of uniform dimension sampling (validated at "
                f"{validated} dimensions), thresholds lr {config.threshold_lr:g}, sparsity weight "
                f"{config.sparsity_weight:g}")
    hooks = supernet_hooks(supernet, config.threshold_lr)
    if config.warmup_epochs:
        # Validate on what this phase trains and the search scores, the sub-networks, rather than all dimensions
        # (trained least here), with the same draws every epoch: the generator is re-seeded before each epoch.
        hooks.before_epoch.append(lambda epoch: supernet.sample_in_evaluation(context.recipe.seed))
    try:
        summary.update(phase(config.supernet_epochs, "supernet", hooks))
    finally:
        supernet.sample_in_evaluation(None)
    save_weights(model, context.directory / SUPERNET_FILE)
    thresholds = supernet.thresholds.detach().cpu().tolist()
    summary.update({"kept_row_fraction": kept_row_fraction(supernet),
                    "thresholds": dict(zip(supernet.units.names, thresholds))})
    context.say(f"supernet: best epoch {summary['best_epoch']}, valid at sampled dimensions "
                + "  ".join(f"{k} {v:.5f}" for k, v in summary["best_valid"].items())
                + f", rows kept {summary['kept_row_fraction']:.1%}")
    return model, summary


def load_supernet(context: SearchContext) -> CTRModel:
    """The supernet an earlier run saved (``embedding.from_run``), copied into this run."""
    model = context.build_network(OptEmbedSupernet)
    context.load_network(model, context.copy_earlier(SUPERNET_FILE))
    return model.to(context.device)


# --------------------------------------------------------------------------------------------- evolution
@dataclass
class EvolutionResult:
    """The best candidate (dims per unit), its score, and one history row per candidate evaluated in each
    generation (``generation``, ``rank``, ``score``, ``cost``, ``best_score`` so far, ``dims``)."""

    best: tuple[int, ...]
    best_score: float
    best_cost: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0


def evolutionary_search(evaluate: Callable[[tuple[int, ...]], float], num_units: int, max_dim: int,
                        cost: Callable[[tuple[int, ...]], int], *, generations: int, keep: int, mutation: int,
                        crossover: int, parents: int, mutation_prob: float, seed: int,
                        feasible: Callable[[tuple[int, ...]], bool] | None = None,
                        on_candidate: Callable[[], None] | None = None,
                        on_generation: Callable[[int, EvolutionResult, list[float]], None] | None = None,
                        ) -> EvolutionResult:
    """Evolve per-unit dimensions in ``1..max_dim`` to maximise ``evaluate`` (Lyu et al. 2022, Section 3.3,
    evolutionary search; after the one-shot NAS search of Guo et al. 2020).

    The first generation is ``keep + mutation + crossover`` random candidates (each redrawn, up to 1,000 times,
    until ``feasible`` accepts it, when given; later generations may hold infeasible candidates, which ``evaluate``
    is expected to score ``-inf``). Every generation is scored and
    ranked (higher score first; ties: lower ``cost``, then earlier candidate); the next one holds the best ``keep``
    unchanged, ``mutation`` mutants (each unit's dimension redrawn with probability ``mutation_prob``) and
    ``crossover`` children (each unit from one of two distinct parents, with equal chance), their parents drawn
    uniformly from the best ``parents`` candidates. The best candidate ever scored is returned. Scores are cached
    per candidate, and all randomness comes from ``numpy.random.default_rng(seed)``: the search is deterministic
    for a seed and a deterministic ``evaluate``.
    """
    rng = np.random.default_rng(seed)
    size = keep + mutation + crossover
    if size < 1 or num_units < 1:
        raise ValueError("the search needs at least one candidate and one unit")
    population = [_draw(rng, num_units, max_dim, feasible) for _ in range(size)]
    cache: dict[tuple[int, ...], float] = {}
    result = EvolutionResult(best=population[0], best_score=-math.inf, best_cost=0)
    for generation in range(generations):
        scores = []
        for candidate in population:
            if candidate not in cache:
                cache[candidate] = float(evaluate(candidate))
                result.evaluations += 1
            scores.append(cache[candidate])
            if on_candidate is not None:
                on_candidate()
        costs = [cost(c) for c in population]
        ranked = sorted(range(size), key=lambda i: (-_finite(scores[i]), costs[i], i))
        top = ranked[0]
        if generation == 0 or (_finite(scores[top]), -costs[top]) > (_finite(result.best_score), -result.best_cost):
            result.best, result.best_score, result.best_cost = population[top], scores[top], costs[top]
        for rank, i in enumerate(ranked):
            result.history.append({"generation": generation, "rank": rank, "score": scores[i], "cost": costs[i],
                                   "best_score": result.best_score, "dims": population[i]})
        if on_generation is not None:
            on_generation(generation, result, scores)
        if generation == generations - 1:
            break
        pool = [population[i] for i in ranked[:max(1, min(parents, size))]]
        children = [population[i] for i in ranked[:keep]]
        for _ in range(mutation):
            parent = pool[int(rng.integers(len(pool)))]
            redraw = rng.random(num_units) < mutation_prob
            fresh = rng.integers(1, max_dim + 1, size=num_units)
            children.append(tuple(int(f) if r else d for d, r, f in zip(parent, redraw, fresh)))
        for _ in range(crossover):
            if len(pool) > 1:
                a, b = (int(i) for i in rng.choice(len(pool), size=2, replace=False))
            else:
                a = b = 0
            take = rng.random(num_units) < 0.5
            children.append(tuple(x if t else y for x, y, t in zip(pool[a], pool[b], take)))
        population = children
    return result


def _draw(rng: np.random.Generator, num_units: int, max_dim: int,
          feasible: Callable[[tuple[int, ...]], bool] | None) -> tuple[int, ...]:
    for _ in range(1000):
        candidate = tuple(int(d) for d in rng.integers(1, max_dim + 1, size=num_units))
        if feasible is None or feasible(candidate):
            break
    return candidate


def _finite(value: float) -> float:
    return value if not math.isnan(value) else -math.inf


def candidate_cost(dims: Sequence[int], kept_rows: Sequence[int]) -> int:
    """Floats a mixed-dimension table stores with these dims: Σ kept rows × dims."""
    return int(sum(d * r for d, r in zip(dims, kept_rows)))


def search_dims(context: SearchContext, model: CTRModel, rows: dict[str, torch.Tensor]
                ) -> tuple[dict[str, int], dict[str, Any]]:
    """Stage ``search``: evolve per-unit dims scored by the supernet's validation AUC with the row mask; with a
    ``fallback_tolerance``, keep all dims when the best candidate scores more than it below all dims (scored on
    the same rows; only when all dims are within ``max_parameters``)."""
    config: OptEmbedConfig = context.config
    supernet = model.embedding
    assert isinstance(supernet, OptEmbedSupernet)
    units = table_units(context)
    kept_rows = [int(rows[n].sum()) if n in rows else r for n, r in zip(units.names, units.rows)]
    valid = context.batches["valid"]
    if config.search_rows is not None and len(valid) > config.search_rows:
        # Hundreds of candidates are scored: a fixed sample bounds the cost, the same rows for every candidate.
        sample = torch.randperm(len(valid), generator=torch.Generator().manual_seed(context.recipe.seed))
        valid = valid.select(sample[:config.search_rows])
    valid = valid.to(context.device)
    train = context.recipe.train
    size = config.keep + config.mutation + config.crossover
    context.say(f"stage search: {config.generations} generations of {size} candidates (keep {config.keep}, "
                f"mutation {config.mutation}, crossover {config.crossover}, parents {config.parents}, "
                f"mutation probability {config.mutation_prob:g})")

    full_cost = EmbeddingArchitecture.full_parameters(units, context.dim)
    allowed = None if config.max_parameters is None else math.floor(config.max_parameters * full_cost + 1e-9)
    within_budget = None if allowed is None else (lambda d: candidate_cost(d, kept_rows) <= allowed)
    if allowed is not None:
        context.say(f"candidates limited to {allowed:,} of {full_cost:,} parameters "
                    f"(max_parameters {config.max_parameters:g})")
        smallest = candidate_cost([1] * len(units), kept_rows)
        if smallest > allowed:
            raise RecipeError(f"embedding.max_parameters {config.max_parameters:g} is below the smallest candidate "
                              f"(one dimension per field: {smallest:,} of {full_cost:,} parameters)")

    def evaluate(dims: tuple[int, ...]) -> float:
        if within_budget is not None and not within_budget(dims):
            return -math.inf  # over the budget: never chosen, and not worth scoring
        supernet.use_dims(dims)
        try:
            return valid_auc(model, valid, train.eval_batch_size, context.device, train.precision)
        finally:
            supernet.use_dims(None)

    progress = context.progress()
    task = progress.add_task("search", total=config.generations * size) if progress is not None else None

    def advance() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    def report(generation: int, result: EvolutionResult, scores: list[float]) -> None:
        finite = [s for s in scores if math.isfinite(s)]
        mean = sum(finite) / len(finite) if finite else math.nan
        context.console.print(
            f"generation {generation + 1:3d}/{config.generations}  best auc {max(finite, default=math.nan):.5f}  "
            f"mean {mean:.5f}  best so far {result.best_score:.5f} ({result.best_cost:,} parameters)",
            highlight=False, soft_wrap=True)
        context.log_metrics({"search.generation_best_auc": max(finite, default=math.nan),
                             "search.generation_mean_auc": mean, "search.best_auc": result.best_score,
                             "search.best_kept_parameters": result.best_cost}, step=generation + 1)

    if progress is not None:
        progress.start()
    try:
        result = evolutionary_search(
            evaluate, len(units), context.dim, lambda d: candidate_cost(d, kept_rows),
            generations=config.generations, keep=config.keep, mutation=config.mutation,
            crossover=config.crossover, parents=config.parents, mutation_prob=config.mutation_prob,
            seed=context.recipe.seed, on_candidate=advance, on_generation=report,
            feasible=within_budget)
    finally:
        if progress is not None:
            progress.stop()
    write_history(context, result)
    best = result.best
    summary: dict[str, Any] = {"generations": config.generations, "evaluations": result.evaluations,
                               "best_valid_auc": result.best_score, "best_kept_parameters": result.best_cost}
    full = (context.dim,) * len(units)
    if config.fallback_tolerance is not None and (within_budget is None or within_budget(full)):
        full_score = evaluate(full)
        summary["full_dims_valid_auc"] = full_score
        summary["fallback"] = fallback = bool(keep_full_dims(result.best_score, full_score,
                                                             config.fallback_tolerance))
        if fallback:
            best = full
            context.say(f"search: the best candidate's valid auc {result.best_score:.5f} is more than "
                        f"{config.fallback_tolerance:g} below the supernet's at all dimensions ({full_score:.5f}): "
                        "every field keeps all its dimensions")
        else:
            context.say(f"search: best candidate valid auc {result.best_score:.5f}, all dimensions {full_score:.5f}")
    return dict(zip(units.names, best)), summary


def keep_full_dims(best_score: float, full_score: float, tolerance: float) -> bool:
    """Whether the search falls back to all dimensions: its best candidate scores more than ``tolerance`` below the
    supernet at all dimensions (a NaN or ``-inf`` best always does; a NaN full score never makes it)."""
    if math.isnan(full_score):
        return False
    return not best_score >= full_score - tolerance


def write_history(context: SearchContext, result: EvolutionResult) -> None:
    """``search_history.csv`` and, with matplotlib, ``search_progress.png``."""
    names = table_units(context).names
    with atomic_path(context.directory / HISTORY_FILE) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["generation", "rank", "valid_auc", "kept_parameters", "best_valid_auc"]
                            + [f"dim.{n}" for n in names])
            for row in result.history:
                writer.writerow([row["generation"] + 1, row["rank"] + 1, f"{row['score']:.6f}", row["cost"],
                                 f"{row['best_score']:.6f}", *row["dims"]])
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # pragma: no cover - matplotlib comes with the tracking extra
        return
    generations = sorted({r["generation"] for r in result.history})
    best = [max(r["score"] for r in result.history if r["generation"] == g) for g in generations]
    mean = [float(np.nanmean([r["score"] for r in result.history if r["generation"] == g])) for g in generations]
    so_far = [max(r["best_score"] for r in result.history if r["generation"] == g) for g in generations]
    figure = Figure(figsize=(5.0, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    x = [g + 1 for g in generations]
    ax.plot(x, so_far, marker="o", markersize=3, label="best so far")
    ax.plot(x, best, marker=".", linestyle="--", label="generation best")
    ax.plot(x, mean, marker=".", linestyle=":", label="generation mean")
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("supernet validation AUC")
    ax.set_title("OptEmbed evolutionary search")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    with atomic_path(context.directory / PROGRESS_FILE) as tmp:
        figure.savefig(tmp, dpi=100, format="png")


# ---------------------------------------------------------------------------------------------- the stages
@register
class OptEmbedSearch(SearchMethod):
    """OptEmbed (Lyu et al. 2022): stages ``supernet``, ``search``, ``retrain`` of ``embedding.kind: optembed``."""

    name = "optembed"
    directory = EMBEDDING_SEARCH_DIR

    def run(self, context: SearchContext) -> TableOutcome:
        """Run the listed stages; stages left out at the front are read from ``embedding.from_run``."""
        check_has_table(context.recipe, context.section)
        config: OptEmbedConfig = context.config
        stages = list(config.stages)
        units = table_units(context)
        summary: dict[str, Any] = {}
        network: CTRModel | None = None
        if "supernet" in stages:
            network, summary["supernet"] = train_supernet(context)
        elif "search" in stages or "retrain" not in stages:
            network = load_supernet(context)
        if network is not None:
            supernet = network.embedding
            assert isinstance(supernet, OptEmbedSupernet)
            rows = supernet.row_mask()
        elif units.num_tables:
            rows = load_row_mask(context.copy_earlier(ROW_MASK_FILE), units)
        else:
            rows = {}
        if "search" in stages:
            assert network is not None
            dims, summary["search"] = search_dims(context, network, rows)
            order: dict[str, list[int]] = {}
        elif "supernet" in stages:
            dims, order = {n: context.dim for n in units.names}, {}
        else:  # read the earlier run's dims (all D when it ran no search)
            path = context.earlier(DIMS_FILE)
            saved = load_dims(path, units, context.dim)
            dims, order = saved.dims, saved.order
        artefact = TableArchitecture(EmbeddingArchitecture(context.dim, dims, rows, order), units)
        report_architecture(context, artefact)
        return TableOutcome(artefact, retrain="retrain" in stages, summary=summary, network=network)

"""One training run from a recipe: data -> model -> fit -> test -> artefacts in the output directory.

The output directory is checked before any work (a folder ctrlab did not make is never touched; an earlier run of
another recipe is replaced only with ``--overwrite``: see :mod:`ctrlab.utils.output_dir`), built under a temporary
name and renamed into place only when the run succeeds, so a failed or interrupted run never leaves a half-written
directory behind. It holds:

``recipe.yaml`` (the resolved recipe, which ``ctrlab train`` accepts again), ``processor.json``,
``model.safetensors`` (best weights), ``metrics.json`` (valid/test metrics, history, and the stored size of the
main embedding: ``embedding_parameters``, ``embedding_bytes``) and ``test_predictions.parquet``; with tracking on and
``tracking.log_artifacts``, also ``learning_curve.png``.

A searching section (``gate.kind: optfs``, ``embedding.kind: optembed`` or ``dnis``) runs its search stages first
(see :mod:`ctrlab.search.framework`): each writes its folder (``feature_search/``, ``embedding_search/``; its
figures are the ``metrics.json`` key of that name), may restrict the data (a kept feature set: ``processor.json`` is
written after the searches, so serving applies it) and prepares the final model (pruning, rewinding), which the
final training then re-trains.

With ``tracking.enabled`` (the default) the run is also logged to MLflow (see :mod:`ctrlab.tracking`): the
flattened resolved recipe as params, system facts as tags, per-epoch metrics, final test and best validation
metrics, and the artefact files, which are uploaded once the output directory is in place. A failed run leaves no
output directory and its MLflow run is marked FAILED.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from rich.console import Console

from ctrlab.config.loader import flatten, recipe_to_dict
from ctrlab.config.schema import Recipe
from ctrlab.config.train import TrainConfig
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, PreparedData, prepare_data
from ctrlab.data.stream import StreamedSplit
from ctrlab.distributed.parallel import check_sharding, parallelize, sharding_plan
from ctrlab.distributed.processes import SINGLE, Processes, process_group
from ctrlab.distributed.shards import check_shards, shard_sizes
from ctrlab.errors import CtrlabError, DataError, RecipeError, StoppedByRankZero, TrainingDiverged
from ctrlab.models import CTRModel, build_recipe_model
from ctrlab.run_dir import (
    EMBEDDING_SEARCH_DIR,
    FEATURE_SEARCH_DIR,
    LEARNING_CURVE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    PROCESSOR_FILE,
    RECIPE_FILE,
    RUN_ENTRIES,
    SEARCH_DIRS,
    TRACKED_FILES,
    WEIGHTS_FILE,
    seed_everything,
)
from ctrlab.search.framework import SearchData, run_searches, searching_sections
from ctrlab.tracking import RunLogger, connect, learning_curve_figure, mlflow_run, system_tags
from ctrlab.tracking.mlflow_tracker import redact_uri
from ctrlab.train.device import resolve_device
from ctrlab.train.footprint import check_data_footprint, check_model_footprint
from ctrlab.train.metrics import auc
from ctrlab.train.state import TrainingStateFile, recipe_digest, state_path
from ctrlab.train.trainer import EpochCallback, FitResult, Trainer
from ctrlab.utils.checkpoint import save_state_dict
from ctrlab.utils.io import atomic_path, remove_stale, write_json_atomic, write_text_atomic
from ctrlab.utils.output_dir import OutputFolder

__all__ = ["EMBEDDING_SEARCH_DIR", "FEATURE_SEARCH_DIR", "LEARNING_CURVE_FILE", "METRICS_FILE", "PREDICTIONS_FILE",
           "PROCESSOR_FILE", "RECIPE_FILE", "RUN_ENTRIES", "TRACKED_FILES", "WEIGHTS_FILE", "RunResult",
           "seed_everything", "train_recipe"]


@dataclass
class RunResult:
    """Where the run's artefacts are and what it measured."""

    output_dir: Path
    metrics: dict[str, Any]
    fit: FitResult
    recipe: Recipe
    mlflow_run_id: str | None = None


def resolved_recipe(recipe: Recipe, data: PreparedData) -> Recipe:
    """The recipe with everything the data source filled in (features, label, group column) written out."""
    dataset = recipe.dataset.model_copy(update={"label": data.label, "group_by": data.group_by})
    return recipe.model_copy(update={"features": data.features, "dataset": dataset})


def output_folder(recipe: Recipe, overwrite: bool = False) -> OutputFolder:
    """The run's output folder with the rules of :mod:`ctrlab.utils.output_dir` (same recipe, or ``overwrite``)."""
    return OutputFolder(recipe.output_dir, "train", recipe.name, recipe_digest(recipe_to_dict(recipe)), overwrite,
                        own_entries=RUN_ENTRIES)


def train_recipe(recipe: Recipe, data_dir: str | Path | None = None, console: Console | None = None,
                 callbacks: list[EpochCallback] | None = None, parent_run_id: str | None = None,
                 overwrite: bool = False) -> RunResult:
    """Train, evaluate and save one run as the recipe describes; with tracking on, log it to MLflow as well
    (nested under ``parent_run_id`` when given, e.g. a sweep's run).

    The output folder is checked before any work (:class:`~ctrlab.utils.output_dir.OutputFolder`): a folder that
    ctrlab did not make is never touched, and an earlier run of another recipe is replaced only with
    ``overwrite``.

    Under torchrun (``WORLD_SIZE`` > 1) this runs on every process: see :mod:`ctrlab.distributed`. Rank 0 alone
    checks and writes the output folder, prints and logs to MLflow; it prepares the data first (filling the cache),
    then the other ranks read it."""
    device = resolve_device(recipe.train.device)
    with process_group(recipe.distributed, device) as processes:
        if not processes.is_main:
            console = Console(stderr=True, quiet=True)
            recipe = recipe.model_copy(update={"tracking": recipe.tracking.model_copy(update={"enabled": False})})
        return _train_recipe(recipe, processes, processes.device(device), data_dir,
                             console or Console(stderr=True), callbacks, parent_run_id, overwrite)


def check_distributed(recipe: Recipe, processes: Processes, device: torch.device) -> None:
    """What a run on several processes (or with sharded tables) cannot do yet, as one-line errors naming the key;
    from the recipe alone, so before any data is read."""
    sharded = recipe.distributed.sharding != "none"
    if not (processes.distributed or sharded):
        return
    if sharded:
        check_sharding(recipe.distributed, recipe.train, recipe.embedding, device)
    what = f"{processes.world_size} processes" if processes.distributed else "distributed.sharding"
    for section, _ in searching_sections(recipe):
        raise RecipeError(f"{section}: searches run in one process (their architecture steps are not synchronised "
                          f"across ranks), not with {what}; run the search alone, then retrain its outcome with "
                          f"{section}.from_run and more processes")
    if processes.distributed and not sharded and getattr(recipe.embedding, "sparse", False):
        raise RecipeError("embedding.sparse: DistributedDataParallel averages dense gradients only; set "
                          "embedding.sparse: false (or shard torchrec tables with distributed.sharding)")
    if recipe.train.batch_size % processes.world_size:
        raise RecipeError(f"train.batch_size: the global batch of {recipe.train.batch_size} rows does not split "
                          f"evenly over {processes.world_size} processes; make it a multiple of {processes.world_size}")
    if sharded and recipe.train.resume:
        raise RecipeError("train.resume: the training state of sharded tables (and their fused optimiser) is not "
                          "saved yet; set train.resume: false with distributed.sharding")


def check_streamed(recipe: Recipe, data: PreparedData) -> None:
    """What a run cannot do on streamed splits (``dataset.loading``), as one-line errors naming the key."""
    if not data.streamed:
        return
    for section, _ in searching_sections(recipe):
        raise RecipeError(f"{section}: searches hold the splits in memory, and this run streams them "
                          "(dataset.loading); set dataset.loading: memory, or search on a sample first")
    if recipe.train.optimizer.embedding_regularizer == "mini_batch_aware":
        raise RecipeError("train.optimizer.embedding_regularizer: mini_batch_aware counts every training row's ids "
                          "before training, which a streamed split does not allow; use weight_decay")


def check_data_shards(recipe: Recipe, data: PreparedData, world_size: int) -> None:
    """Every process must get rows at every step of every split (one line naming the key otherwise)."""
    local_batch = recipe.train.batch_size // world_size
    if data.streams is not None:
        for split, stream in data.streams.items():
            training = split == "train"
            check_shards(split, stream.shares(world_size, ordered=not training),
                         local_batch if training else recipe.train.eval_batch_size, key="dataset.chunk_rows")
        return
    for split, encoded in data.splits.items():
        check_shards(split, shard_sizes(len(encoded), world_size),
                     local_batch if split == "train" else recipe.train.eval_batch_size)


def _train_recipe(recipe: Recipe, processes: Processes, device: torch.device, data_dir: str | Path | None,
                  console: Console, callbacks: list[EpochCallback] | None, parent_run_id: str | None,
                  overwrite: bool) -> RunResult:
    started = time.perf_counter()
    check_distributed(recipe, processes, device)
    folder = output_folder(recipe, overwrite)
    if processes.is_main:
        folder.check()
        connect(recipe.tracking)
        if recipe.train.resume:
            state_file = state_path(folder.target)
            remove_stale(state_file.parent, state_file.name)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    check_data_footprint(recipe.dataset)  # before generating data whose size the recipe fixes
    seed_everything(recipe.seed)
    # Rank 0 prepares (and caches) the data first and checks it can feed every process; the others then read the
    # cache, or stop quietly when rank 0 met an error (which it reports, once).
    if processes.is_main:
        try:
            data = prepare_data(recipe.dataset, recipe.features, recipe.seed, data_dir, console)
            check_streamed(recipe, data)
            check_data_shards(recipe, data, processes.world_size)
        except CtrlabError:
            processes.broadcast(False)
            raise
        processes.broadcast(True)
    else:
        if not processes.broadcast(None):
            # Rank 0 reports the error; it exits first, since the launcher stops all workers once one has ended.
            time.sleep(1.0)
            raise StoppedByRankZero()
        data = prepare_data(recipe.dataset, recipe.features, recipe.seed, data_dir, console)
    if data.group_by is None and ("gauc" in recipe.train.metrics or
                                  (recipe.train.early_stopping and recipe.train.early_stopping.monitor == "gauc")):
        raise RecipeError("train.metrics: gauc needs dataset.group_by (the column that groups rows, e.g. a user id)")
    check_labels(data, recipe.train)
    recipe = resolved_recipe(recipe, data)
    check_model_footprint(recipe, data.processor.layout, device)  # before allocating it, and before MLflow logs it
    sizes = data.rows()
    console.print(f"data: train {sizes['train']:,}  valid {sizes['valid']:,}  test {sizes['test']:,} rows; "
                  f"{data.processor.layout.num_fields} fields; device {device}"
                  + (f"; {processes.world_size} processes" if processes.distributed else "")
                  + ("; streamed from disk" if data.streamed else ""),
                  highlight=False, soft_wrap=True)

    with mlflow_run(recipe.tracking, experiment=recipe.tracking.experiment or recipe.name,
                    run_name=recipe.tracking.run_name or recipe.name, parent_run_id=parent_run_id) as tracker:
        if tracker is not None:
            console.print(f"mlflow: run {tracker.run_id} ({redact_uri(tracker.tracking_uri)})", highlight=False,
                          soft_wrap=True)
            tracker.set_tags({**system_tags(), "system.device": str(device)})
            tracker.log_params(flatten(recipe_to_dict(recipe)))
        try:
            metrics, fit, output_dir = _train_and_save(recipe, data, device, console, callbacks, tracker, started,
                                                       folder, processes)
        except TrainingDiverged as error:
            culprit = large_numeric_input(data)
            if culprit is None:
                raise
            raise TrainingDiverged(f"{error.message}; {culprit}") from None
        if tracker is not None:
            _log_results(tracker, metrics, fit, output_dir, recipe.tracking.log_artifacts)
    if processes.is_main:
        _print_result(console, metrics, output_dir)
    return RunResult(output_dir, metrics, fit, recipe, tracker.run_id if tracker is not None else None)


@contextlib.contextmanager
def _build_folder(folder: OutputFolder, processes: Processes) -> Iterator[Path]:
    """Rank 0 builds the output folder; the other ranks write what they must into a scratch folder, dropped."""
    if processes.is_main:
        with folder.build() as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix=f"ctrlab-rank{processes.rank}-") as scratch:
            yield Path(scratch)


def _train_and_save(recipe: Recipe, data: PreparedData, device: torch.device, console: Console,
                    callbacks: list[EpochCallback] | None, tracker: RunLogger | None,
                    started: float, folder: OutputFolder, processes: Processes = SINGLE
                    ) -> tuple[dict[str, Any], FitResult, Path]:
    """Build the model, fit, test and write the output directory (atomically; on rank 0)."""
    sizes = data.rows()
    searched = SearchData(data.processor, {s: FeatureBatch.from_encoded(v) for s, v in data.splits.items()})
    streams = data.streams  # streamed runs have no searches (check_streamed): their splits stay on disk
    # The tracker logs each epoch before the caller's callbacks run (one of them may raise, e.g. a pruner).
    all_callbacks = ([tracker.log_epoch] if tracker is not None else []) + list(callbacks or [])

    output_dir = folder.target
    with _build_folder(folder, processes) as tmp:
        write_text_atomic(tmp / RECIPE_FILE, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        search = run_searches(recipe, searched, device, console, tracker, tmp)
        searched.processor.save(tmp / PROCESSOR_FILE)  # as the searches left it (a kept feature set)
        batches: dict[str, FeatureBatch | StreamedSplit] = dict(streams if streams is not None else searched.batches)
        seed_everything(recipe.seed)
        model = build_recipe_model(recipe, searched.layout)
        search.prepare_model(model)  # pruned, rewound
        parallel = parallelize(model.to(device), processes, recipe.distributed, recipe.train, device)
        if processes.distributed:
            torch.manual_seed(recipe.seed + processes.rank)  # each rank its own dropout masks, after the shared init
        trainer = Trainer(model, recipe.train, device, seed=recipe.seed, console=console, callbacks=all_callbacks,
                          parallel=parallel)
        state = (TrainingStateFile(state_path(output_dir), recipe_digest(recipe_to_dict(recipe)))
                 if recipe.train.resume else None)
        if search.retrain:
            fit = trainer.fit(batches["train"], batches["valid"], checkpoint=tmp / WEIGHTS_FILE, state=state)
        else:  # the searched network, pruned, is the final model: evaluate only
            fit = FitResult()
        weights = parallel.full_state_dict()  # a sharded model's tables gathered: serving loads it unsharded
        if weights is not None:
            save_state_dict(weights, tmp / WEIGHTS_FILE)
        valid_metrics, _ = trainer.evaluate(batches["valid"])
        test_metrics, test_probabilities = trainer.evaluate(batches["test"])
        metrics: dict[str, Any] = {
            "valid": valid_metrics, "test": test_metrics, "best_epoch": fit.best_epoch,
            "epochs_run": len(fit.history), "stopped_early": fit.stopped_early,
            "rows": sizes, "device": str(device), "seconds": time.perf_counter() - started,
            "history": [r.as_dict() for r in fit.history],
            "mlflow_run_id": tracker.run_id if tracker is not None else None,
            **embedding_size(trainer.model),
            **({"processes": processes.world_size} if processes.distributed else {}),
            **({"sharding": sharding_plan(parallel)} if parallel.sharded else {}),
        }
        metrics.update(search.summaries)
        test_frame = data.raw.frames.get("test")
        if test_frame is not None and TRUE_PROBABILITY_COLUMN in test_frame.columns:
            truth = test_frame.get_column(TRUE_PROBABILITY_COLUMN).to_numpy()
            metrics["bayes_optimal_test_auc"] = auc(split_labels(data, "test")[0], truth)  # type: ignore[arg-type]
        with atomic_path(tmp / PREDICTIONS_FILE) as predictions:
            pl.DataFrame({"probability": test_probabilities}).write_parquet(predictions)
        if tracker is not None and recipe.tracking.log_artifacts and fit.history:
            with atomic_path(tmp / LEARNING_CURVE_FILE) as curve:
                learning_curve_figure(fit.history).savefig(curve, dpi=100, format="png")
        write_json_atomic(tmp / METRICS_FILE, metrics)
    if state is not None and processes.is_main:
        state.remove()  # the run is complete and in place: nothing left to resume
    return metrics, fit, output_dir


def large_numeric_input(data: PreparedData, limit: float = 1e4) -> str | None:
    """The numeric input most likely to have made the loss NaN: the column whose encoded training values reach the
    largest magnitude, when that exceeds ``limit`` (values this large times a learned vector overflow float32)."""
    if "train" not in data.splits:  # streamed: the message stays without its culprit rather than read the split
        return None
    numeric = data.splits["train"].numeric
    specs = data.processor.layout.numeric
    if numeric.shape[1] == 0:
        return None
    magnitude = np.abs(numeric).max(axis=0)
    column = int(np.argmax(magnitude))
    if not magnitude[column] > limit:
        return None
    name = specs[column].name
    transform = next(f.transform for f in data.processor.features.numeric if f.name == name)
    row = int(np.argmax(np.abs(numeric[:, column]))) + 1
    return (f"numeric column '{name}' reaches {float(numeric[row - 1, column]):.3g} after transform '{transform}' "
            f"(row {row} of the training split); use transform: log or log_standardize, or bucketize")


def split_labels(data: PreparedData, split: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A split's labels and group ids, held or read from its stream (one column each)."""
    if data.streams is not None:
        return data.streams[split].labels(), data.streams[split].groups()
    encoded = data.splits[split]
    return encoded.label, encoded.group


def check_labels(data: PreparedData, train: TrainConfig) -> None:
    """Refuse splits on which training or the requested metrics mean nothing, before any training: a training split
    of one class (nothing to learn), and a validation or test split of one class when AUC is asked for (it is
    undefined there, so early stopping would watch NaN and the run would report NaN as a result). For gAUC at least
    one group of the split must hold both classes."""
    monitor = train.early_stopping.monitor if train.early_stopping is not None else None
    wanted = set(train.metrics) | ({monitor} if monitor else set())
    for split in data.rows():
        labels, groups = split_labels(data, split)
        if labels is None or len(labels) == 0:
            continue
        positives = int(np.count_nonzero(labels))
        source = data.raw.sources.get(split, f"{split} split")
        if positives in (0, len(labels)) and (split == "train" or "auc" in wanted or "gauc" in wanted):
            value = int(labels[0])
            why = ("a click model needs both clicks (1) and non-clicks (0) to learn from" if split == "train" else
                   "AUC is undefined on one class; give the split rows of both classes")
            raise DataError(f"{source}: every label in the {split} split is {value} ({len(labels):,} rows); {why}")
        if split != "train" and "gauc" in wanted and groups is not None:
            size = np.bincount(groups)
            clicks = np.bincount(groups, weights=labels, minlength=len(size))
            if not np.any((clicks > 0) & (clicks < size)):
                raise DataError(f"{source}: no group of dataset.group_by holds both labels in the {split} split, so "
                                "gAUC is undefined; choose another group column or drop gauc from train.metrics")


def embedding_size(model: CTRModel) -> dict[str, int]:
    """Stored floats and bytes of the main embedding (after any pruning; 0 for a model without one), the floats of
    the pair layer (memorised pairs' rows and factor tables; 0 without one) and of the whole model."""
    embedding = model.embedding
    return {"embedding_parameters": embedding.parameter_count() if embedding is not None else 0,
            "embedding_bytes": embedding.parameter_bytes() if embedding is not None else 0,
            "interaction_parameters": model.interaction.stored_parameters() if model.interaction is not None else 0,
            "model_parameters": sum(p.numel() for p in model.parameters())}


def _log_results(tracker: RunLogger, metrics: dict[str, Any], fit: FitResult, output_dir: Path,
                 log_artifacts: bool) -> None:
    """Final metrics, then (the output directory being in place) the artefact files."""
    final: dict[str, float] = {f"test_{k}": v for k, v in metrics["test"].items()}
    final.update({f"best_valid_{k}": v for k, v in fit.best_valid.items()})
    final.update({"best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "seconds": metrics["seconds"],
                  "embedding_parameters": metrics["embedding_parameters"],
                  "embedding_bytes": metrics["embedding_bytes"],
                  "interaction_parameters": metrics["interaction_parameters"],
                  "model_parameters": metrics["model_parameters"]})
    if "bayes_optimal_test_auc" in metrics:
        final["bayes_optimal_test_auc"] = metrics["bayes_optimal_test_auc"]
    tracker.log_metrics(final)
    if log_artifacts:
        for name in TRACKED_FILES:
            if (output_dir / name).is_file():
                tracker.log_artifact(output_dir / name)
        for folder in SEARCH_DIRS:
            if (output_dir / folder).is_dir():
                tracker.log_artifact(output_dir / folder, folder)


def _print_result(console: Console, metrics: dict[str, Any], output_dir: Path) -> None:
    test = "  ".join(f"{k} {v:.5f}" for k, v in metrics["test"].items())
    console.print(f"[bold]test[/bold]  {test}  (best epoch {metrics['best_epoch']}, {metrics['seconds']:.0f}s)")
    if "bayes_optimal_test_auc" in metrics:
        gap = metrics["bayes_optimal_test_auc"] - metrics["test"].get("auc", float("nan"))
        console.print(f"bayes-optimal test auc {metrics['bayes_optimal_test_auc']:.5f}  (gap {gap:+.5f})")
    console.print(f"artefacts: {os.fspath(output_dir)}")

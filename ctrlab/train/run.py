"""One training run from a recipe: data -> model -> fit -> test -> artefacts in the output directory.

The output directory is built under a temporary name and renamed into place only when the run succeeds, so a
failed or interrupted run never leaves a half-written directory behind. It holds:

``recipe.yaml`` (the resolved recipe, which ``ctrlab train`` accepts again), ``processor.json``,
``model.safetensors`` (best weights), ``metrics.json`` (valid/test metrics, history) and
``test_predictions.parquet``.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from rich.console import Console

from ctrlab.config.loader import recipe_to_dict
from ctrlab.config.schema import Recipe
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, PreparedData, prepare_data
from ctrlab.errors import RecipeError
from ctrlab.models import build_model
from ctrlab.train.device import resolve_device
from ctrlab.train.metrics import auc
from ctrlab.train.trainer import EpochCallback, FitResult, Trainer
from ctrlab.utils.checkpoint import save_weights
from ctrlab.utils.io import atomic_directory, write_json_atomic, write_text_atomic

RECIPE_FILE = "recipe.yaml"
PROCESSOR_FILE = "processor.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "test_predictions.parquet"


@dataclass
class RunResult:
    """Where the run's artefacts are and what it measured."""

    output_dir: Path
    metrics: dict[str, Any]
    fit: FitResult
    recipe: Recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolved_recipe(recipe: Recipe, data: PreparedData) -> Recipe:
    """The recipe with everything the data source filled in (features, label, group column) written out."""
    dataset = recipe.dataset.model_copy(update={"label": data.label, "group_by": data.group_by})
    return recipe.model_copy(update={"features": data.features, "dataset": dataset})


def train_recipe(recipe: Recipe, data_dir: str | Path | None = None, console: Console | None = None,
                 callbacks: list[EpochCallback] | None = None) -> RunResult:
    """Train, evaluate and save one run as the recipe describes."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    device = resolve_device(recipe.train.device)
    seed_everything(recipe.seed)
    data = prepare_data(recipe.dataset, recipe.features, recipe.seed, data_dir, console)
    if data.group_by is None and ("gauc" in recipe.train.metrics or
                                  (recipe.train.early_stopping and recipe.train.early_stopping.monitor == "gauc")):
        raise RecipeError("train.metrics: gauc needs dataset.group_by (the column that groups rows, e.g. a user id)")
    recipe = resolved_recipe(recipe, data)
    layout = data.processor.layout
    sizes = {s: len(v) for s, v in data.splits.items()}
    console.print(f"data: train {sizes['train']:,}  valid {sizes['valid']:,}  test {sizes['test']:,} rows; "
                  f"{layout.num_fields} fields; device {device}", highlight=False, soft_wrap=True)

    seed_everything(recipe.seed)
    model = build_model(recipe.embedding, recipe.model, layout)
    batches = {s: FeatureBatch.from_encoded(v) for s, v in data.splits.items()}
    trainer = Trainer(model, recipe.train, device, seed=recipe.seed, console=console, callbacks=callbacks)

    output_dir = Path(recipe.output_dir)
    with atomic_directory(output_dir) as tmp:
        write_text_atomic(tmp / RECIPE_FILE, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        data.processor.save(tmp / PROCESSOR_FILE)
        fit = trainer.fit(batches["train"], batches["valid"], checkpoint=tmp / WEIGHTS_FILE)
        save_weights(trainer.model, tmp / WEIGHTS_FILE)
        valid_metrics, _ = trainer.evaluate(batches["valid"])
        test_metrics, test_probabilities = trainer.evaluate(batches["test"])
        metrics: dict[str, Any] = {
            "valid": valid_metrics, "test": test_metrics, "best_epoch": fit.best_epoch,
            "epochs_run": len(fit.history), "stopped_early": fit.stopped_early,
            "rows": sizes, "device": str(device), "seconds": time.perf_counter() - started,
            "history": [r.as_dict() for r in fit.history],
        }
        test_frame = data.raw.frames["test"]
        if TRUE_PROBABILITY_COLUMN in test_frame.columns:
            truth = test_frame.get_column(TRUE_PROBABILITY_COLUMN).to_numpy()
            metrics["bayes_optimal_test_auc"] = auc(batches["test"].label.numpy(), truth)  # type: ignore[union-attr]
        pl.DataFrame({"probability": test_probabilities}).write_parquet(tmp / PREDICTIONS_FILE)
        write_json_atomic(tmp / METRICS_FILE, metrics)
    _print_result(console, metrics, output_dir)
    return RunResult(output_dir, metrics, fit, recipe)


def _print_result(console: Console, metrics: dict[str, Any], output_dir: Path) -> None:
    test = "  ".join(f"{k} {v:.5f}" for k, v in metrics["test"].items())
    console.print(f"[bold]test[/bold]  {test}  (best epoch {metrics['best_epoch']}, {metrics['seconds']:.0f}s)")
    if "bayes_optimal_test_auc" in metrics:
        gap = metrics["bayes_optimal_test_auc"] - metrics["test"].get("auc", float("nan"))
        console.print(f"bayes-optimal test auc {metrics['bayes_optimal_test_auc']:.5f}  (gap {gap:+.5f})")
    console.print(f"artefacts: {os.fspath(output_dir)}")

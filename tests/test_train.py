"""End to end on synthetic data: training learns, artefacts are complete, reload reproduces predictions bit for
bit, runs are deterministic, caching reuses encodings, failures leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console

from ctrlab.config.loader import validate_recipe
from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, load_raw_splits
from ctrlab.serve import Predictor
from ctrlab.train.run import train_recipe

QUIET = Console(quiet=True)


def _recipe(out: Path, **train: object) -> dict:
    return {
        "name": "t", "seed": 3, "output_dir": str(out),
        "dataset": {"synthetic": {"rows": 30000, "categorical_fields": 6, "numeric_fields": 2,
                                   "informative_fields": 3, "interaction_pairs": 1, "numeric_informative": 1,
                                   "cardinalities": [5, 20, 50, 200, 1000, 3000]}},
        "features": {"categorical": ["C1", "C2", "C3", "C4", "C5", "C6"],
                     "numeric": [{"name": "I1", "transform": "log"}, {"name": "I2", "transform": "bucketize"}]},
        "embedding": {"dim": 8},
        "model": {"block": "deepfm", "mlp": {"hidden": [32, 16]}},
        "train": {"epochs": 4, "batch_size": 1024, "progress": False, "device": "cpu",
                  "optimizer": {"lr": 3e-3}, **train},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("run")
    import os

    os.environ["CTRLAB_CACHE_DIR"] = str(root / "cache")
    recipe = validate_recipe(_recipe(root / "out"))
    result = train_recipe(recipe, console=QUIET)
    return recipe, result


def test_training_learns_towards_bayes_optimal(trained) -> None:
    _, result = trained
    test_auc = result.metrics["test"]["auc"]
    bayes = result.metrics["bayes_optimal_test_auc"]
    assert 0.6 < bayes < 0.95
    assert test_auc > 0.5 + 0.6 * (bayes - 0.5), (test_auc, bayes)
    assert test_auc <= bayes + 0.01


def test_artefacts_are_complete(trained) -> None:
    _, result = trained
    out = result.output_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["recipe.yaml", "processor.json", "model.safetensors", "metrics.json", "test_predictions.parquet",
         "learning_curve.png", ".ctrlab.json"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == result.metrics["test"]
    assert len(metrics["history"]) == metrics["epochs_run"] >= 1
    assert not list(out.parent.glob(".*partial*"))


def test_reload_reproduces_test_predictions_bit_for_bit(trained) -> None:
    recipe, result = trained
    predictor = Predictor.from_run(result.output_dir)
    raw_test = load_raw_splits(recipe.dataset, recipe.seed).frames["test"]
    again = predictor.predict(raw_test.drop(["label", TRUE_PROBABILITY_COLUMN]))
    saved = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert again.dtype == saved.dtype == np.float64
    assert np.array_equal(again, saved)


def test_runs_are_deterministic_and_second_run_uses_the_cache(trained, tmp_path: Path) -> None:
    recipe, result = trained
    again = train_recipe(recipe.model_copy(update={"output_dir": str(tmp_path / "again")}), console=QUIET)
    assert again.metrics["test"] == result.metrics["test"]
    assert [r.train_loss for r in again.fit.history] == [r.train_loss for r in result.fit.history]


def test_unseen_categories_are_scored_as_oov(trained) -> None:
    recipe, result = trained
    predictor = Predictor.from_run(result.output_dir)
    rows = load_raw_splits(recipe.dataset, recipe.seed).frames["test"].head(3)
    rows = rows.with_columns(pl.lit("never-seen").alias("C4"))
    p = predictor.predict(rows)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))


def test_early_stopping_and_lr_reduction(tmp_path: Path, cache_dir: Path) -> None:
    # A huge learning rate overfits at once: validation AUC stops improving, lr drops x0.1, then training stops.
    recipe = validate_recipe(_recipe(tmp_path / "out", epochs=30, optimizer={"lr": 0.05},
                                     early_stopping={"patience": 2}, lr_on_plateau={"factor": 0.1}))
    result = train_recipe(recipe, console=QUIET)
    history = result.fit.history
    assert result.fit.stopped_early and len(history) < 30
    assert not history[-1].improved and not history[-2].improved
    lrs = [r.lr for r in history]
    assert lrs[0] == 0.05 and min(lrs) < 0.05
    assert result.metrics["best_epoch"] == max(r.epoch for r in history if r.improved)
    # The best epoch's weights are restored before testing.
    assert result.metrics["valid"]["auc"] == pytest.approx(history[result.fit.best_epoch - 1].valid["auc"], abs=1e-12)


def test_failed_run_leaves_no_output(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrlab.train import trainer as trainer_module

    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", boom)
    recipe = validate_recipe(_recipe(tmp_path / "out"))
    with pytest.raises(RuntimeError):
        train_recipe(recipe, console=QUIET)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p != cache_dir] == []


def test_diverging_loss_is_a_one_line_user_error(tmp_path: Path, cache_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from ctrlab.errors import TrainingDiverged
    from ctrlab.models.ctr_model import CTRModel

    def nan_forward(self, batch):
        return torch.full((len(batch),), float("nan"), requires_grad=True)

    monkeypatch.setattr(CTRModel, "forward", nan_forward)
    recipe = validate_recipe(_recipe(tmp_path / "out"))
    with pytest.raises(TrainingDiverged, match="training loss became nan; lower train.optimizer.lr"):
        train_recipe(recipe, console=QUIET)
    assert not (tmp_path / "out").exists()


def test_api_recipe_without_output_dir_is_interpolated() -> None:
    data = _recipe(Path("unused"))
    del data["output_dir"]
    assert validate_recipe(data).output_dir == "runs/t"


class _Interrupted(Exception):
    pass


def test_an_interrupted_resumable_run_continues_to_the_same_result(tmp_path: Path, cache_dir: Path) -> None:
    from ctrlab.train.state import state_path

    # lr 0.05 with patience 3 reduces the lr and stops early within a few epochs; dropout draws from torch's RNG.
    data = _recipe(tmp_path / "whole", epochs=30, optimizer={"lr": 0.05}, early_stopping={"patience": 3},
                   lr_on_plateau={"factor": 0.1})
    data["model"]["mlp"]["dropout"] = 0.2
    whole = train_recipe(validate_recipe(data), console=QUIET)
    assert whole.fit.stopped_early and whole.metrics["epochs_run"] >= 4

    data = {**data, "output_dir": str(tmp_path / "resumed")}
    data["train"] = {**data["train"], "resume": True}
    seen: list[int] = []

    def interrupt(record) -> None:
        seen.append(record.epoch)
        if record.epoch == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train_recipe(validate_recipe(data), console=QUIET, callbacks=[interrupt])
    state = state_path(tmp_path / "resumed")
    assert state.exists() and not (tmp_path / "resumed").exists()

    seen.clear()
    data["train"] = {**data["train"], "num_threads": 1}  # how fast it runs does not invalidate the state
    resumed = train_recipe(validate_recipe(data), console=QUIET, callbacks=[seen.append])
    assert [r.epoch for r in seen] == list(range(1, whole.metrics["epochs_run"] + 1))  # restored epochs replayed
    assert resumed.metrics["test"] == whole.metrics["test"]
    assert resumed.metrics["best_epoch"] == whole.metrics["best_epoch"]
    assert [r.train_loss for r in resumed.fit.history] == [r.train_loss for r in whole.fit.history]
    assert [r.lr for r in resumed.fit.history] == [r.lr for r in whole.fit.history]
    assert pl.read_parquet(resumed.output_dir / "test_predictions.parquet").equals(
        pl.read_parquet(whole.output_dir / "test_predictions.parquet"))
    assert not state.exists()  # a completed run leaves nothing to resume


def test_a_saved_state_of_another_recipe_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    from ctrlab.errors import RecipeError
    from ctrlab.train.state import state_path

    data = _recipe(tmp_path / "out", epochs=3, resume=True)

    def interrupt(record) -> None:
        raise _Interrupted

    with pytest.raises(_Interrupted):
        train_recipe(validate_recipe(data), console=QUIET, callbacks=[interrupt])
    data["train"]["optimizer"] = {"lr": 1e-3}
    with pytest.raises(RecipeError, match=r"\.out\.train_state\.pt: the saved training state belongs to a "
                                          r"different recipe"):
        train_recipe(validate_recipe(data), console=QUIET)
    assert state_path(tmp_path / "out").exists()  # kept: the user decides whether to delete it


def test_sigterm_ends_a_cli_run_cleanly_keeping_its_resumable_state(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) mid-run: exit code 143, one line on stderr, no half-built output directory left beside
    the output path, and the resumable state of the finished epochs intact (resuming from it is tested above)."""
    import os
    import subprocess
    import sys

    import yaml

    from ctrlab.train.state import state_path
    from tiny import terminate_once_saved

    out = tmp_path / "out"
    data = _recipe(out, epochs=200, resume=True, early_stopping={"patience": 200})
    data["tracking"] = {"enabled": False}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    env = {**os.environ, "CTRLAB_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "ctrlab.cli", "train", str(recipe_file)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = terminate_once_saved(process, state_path(out))
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated; nothing half-written was left behind"
    assert "Traceback" not in stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    assert len(torch.load(state_path(out), weights_only=True)["history"]) >= 1  # whole and readable

"""MLflow tracking: a tiny synthetic run logs params, per-epoch and final metrics, tags and artefacts; tracking can
be turned off; the tracking URI's precedence; nested runs; failed and interrupted runs get the right status.

Every test writes to the per-session SQLite store that ``conftest.mlflow_tracking_store`` points
``MLFLOW_TRACKING_URI`` at.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from ctrlab.config.loader import validate_recipe
from ctrlab.config.tracking import TrackingConfig
from ctrlab.tracking import learning_curve_figure, mlflow_run, resolve_tracking_uri, system_tags
from ctrlab.train.run import LEARNING_CURVE_FILE, METRICS_FILE, TRACKED_FILES, train_recipe
from ctrlab.train.trainer import EpochRecord

mlflow = pytest.importorskip("mlflow")

QUIET = Console(quiet=True)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recipe(out: Path, name: str = "tracked", **tracking: object) -> dict:
    return {
        "name": name, "seed": 5, "output_dir": str(out),
        "dataset": {"synthetic": {"rows": 5000, "categorical_fields": 4, "numeric_fields": 1,
                                   "informative_fields": 2, "interaction_pairs": 1, "numeric_informative": 1,
                                   "cardinalities": [5, 20, 50, 200]}},
        "features": {"categorical": ["C1", "C2", "C3", "C4"], "numeric": [{"name": "I1", "transform": "log"}]},
        "embedding": {"dim": 8},
        "model": {"block": "deepfm", "mlp": {"hidden": [16]}},
        "train": {"epochs": 2, "batch_size": 512, "progress": False, "device": "cpu", "optimizer": {"lr": 3e-3}},
        "tracking": tracking,
    }


def _client():
    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        recipe = validate_recipe(_recipe(root / "out", run_name="tiny"))
        result = train_recipe(recipe, console=QUIET)
    return root, result


def test_run_logs_params_metrics_tags_and_artefacts(tracked) -> None:
    root, result = tracked
    assert result.mlflow_run_id
    client = _client()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"  # defaults to the recipe name

    params = run.data.params
    assert params["model.block"] == "deepfm"
    assert params["embedding.dim"] == "8"
    assert float(params["train.optimizer.lr"]) == pytest.approx(3e-3)
    assert params["train.epochs"] == "2"
    assert params["model.mlp.hidden"] == "[16]"
    assert params["dataset.label"] == result.recipe.dataset.label  # the resolved recipe, filled in by the data

    # Per-epoch metrics at step = epoch, one point per epoch run.
    history = result.fit.history
    assert len(history) == 2
    for key, values in [("train_loss", [r.train_loss for r in history]),
                        ("valid_auc", [r.valid["auc"] for r in history]), ("lr", [r.lr for r in history])]:
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == [r.epoch for r in history], key
        assert [m.value for m in points] == pytest.approx(values), key
    assert len(client.get_metric_history(run.info.run_id, "samples_per_second")) == len(history)

    # Final metrics equal metrics.json.
    saved = json.loads((result.output_dir / METRICS_FILE).read_text())
    assert saved["mlflow_run_id"] == result.mlflow_run_id
    for key, value in saved["test"].items():
        assert run.data.metrics[f"test_{key}"] == pytest.approx(value, abs=1e-12)
    assert run.data.metrics["best_valid_auc"] == pytest.approx(result.fit.best_valid["auc"])
    assert run.data.metrics["best_epoch"] == result.fit.best_epoch
    assert run.data.metrics["bayes_optimal_test_auc"] == pytest.approx(saved["bayes_optimal_test_auc"])

    tags = run.data.tags
    for key in ("version.ctrlab", "version.torch", "version.python", "version.mlflow", "system.hostname",
                "system.cpu_count"):
        assert tags[key], key
    assert tags["system.device"] == "cpu"
    assert tags["version.mlflow"] == mlflow.__version__

    # Artefacts: the listed files of the output directory, uploaded beside the SQLite database (not into ./mlruns).
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == set(TRACKED_FILES)
    store_dir = Path(os.environ["MLFLOW_TRACKING_URI"][len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith(store_dir.as_uri())
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=LEARNING_CURVE_FILE,
                                                     dst_path=str(root / "download"),
                                                     tracking_uri=os.environ["MLFLOW_TRACKING_URI"]))
    assert local.read_bytes()[:8] == PNG_MAGIC
    assert (result.output_dir / LEARNING_CURVE_FILE).read_bytes()[:8] == PNG_MAGIC


def test_tracking_disabled_creates_no_run(tracked, tmp_path: Path) -> None:
    root, _ = tracked
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        recipe = validate_recipe(_recipe(tmp_path / "out", name="untracked", enabled=False))
        result = train_recipe(recipe, console=QUIET)
    assert result.mlflow_run_id is None
    assert json.loads((result.output_dir / METRICS_FILE).read_text())["mlflow_run_id"] is None
    assert not (result.output_dir / LEARNING_CURVE_FILE).exists()
    assert _client().get_experiment_by_name("untracked") is None
    with mlflow_run(TrackingConfig(enabled=False), experiment="untracked") as run:
        assert run is None


def test_importing_ctrlab_does_not_import_mlflow() -> None:
    code = ("import sys, ctrlab.train.run, ctrlab.tracking; "
            "print(sorted(m for m in ('mlflow', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_failed_run_is_marked_failed_and_leaves_no_output(tracked, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrlab.train import trainer as trainer_module

    root, _ = tracked
    monkeypatch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))

    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", boom)
    client = _client()
    with mlflow_run(TrackingConfig(), experiment="failing") as parent:
        recipe = validate_recipe(_recipe(tmp_path / "out", name="failing"))
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_recipe(recipe, console=QUIET, parent_run_id=parent.run_id)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    experiment = client.get_experiment_by_name("failing")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert len(children) == 1
    assert children[0].info.status == "FAILED"
    assert children[0].data.params["model.block"] == "deepfm"  # logged before training started
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_nested_runs_and_end_status() -> None:
    client = _client()
    tracking = TrackingConfig()
    with mlflow_run(tracking, experiment="nesting", run_name="parent", tags={"kind": "sweep"}) as parent:
        assert parent is not None
        with mlflow_run(tracking, experiment="nesting", run_name="child", parent_run_id=parent.run_id) as child:
            child.log_metrics({"x": 1.0, "nan": math.nan}, step=3)
        with pytest.raises(ValueError), mlflow_run(tracking, experiment="nesting",
                                                   parent_run_id=parent.run_id) as failed:
            raise ValueError("boom")
        with pytest.raises(KeyboardInterrupt), mlflow_run(tracking, experiment="nesting") as killed:
            raise KeyboardInterrupt
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["kind"] == "sweep"
    child_run = client.get_run(child.run_id)
    assert child_run.info.status == "FINISHED" and child_run.info.run_name == "child"
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child_run.data.metrics == {"x": 1.0}  # NaN skipped
    assert client.get_metric_history(child.run_id, "x")[0].step == 3
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(failed.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert "mlflow.parentRunId" not in parent_run.data.tags


def test_params_are_batched_and_truncated() -> None:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    with mlflow_run(TrackingConfig(), experiment="params") as run:
        run.log_params({f"p{i}": i for i in range(250)} | {"long": "x" * (MAX_PARAM_VAL_LENGTH + 50),
                                                           "none": None, "list": [1, 2]})
    params = _client().get_run(run.run_id).data.params
    assert len(params) == 253 and params["p249"] == "249"
    assert params["long"] == "x" * MAX_PARAM_VAL_LENGTH
    assert params["none"] == "None" and params["list"] == "[1, 2]"


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig(uri="postgresql://u@db/mlflow")) == "postgresql://u@db/mlflow"
    assert resolve_tracking_uri(TrackingConfig()) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = tmp_path / "home" / ".ctrlab" / "mlflow.db"
    assert resolve_tracking_uri(TrackingConfig()) == "sqlite:///" + str(default)
    assert default.parent.is_dir()
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///~/x.db")) == "sqlite:///" + str(tmp_path / "home/x.db")


def test_system_tags_and_learning_curve_figure(tmp_path: Path) -> None:
    tags = system_tags()
    assert all(isinstance(v, str) and v for v in tags.values())
    history = [EpochRecord(e, 0.6 - 0.05 * e, {"auc": 0.6 + 0.05 * e, "logloss": 0.6}, 1e-3, 1.0, 1e4, e < 3)
               for e in range(1, 5)]
    figure = learning_curve_figure(history)
    assert len(figure.axes) == 3  # train_loss, valid_auc, valid_logloss
    figure.savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG_MAGIC

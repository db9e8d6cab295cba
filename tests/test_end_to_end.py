"""The whole user journey against real services (PostgreSQL, an `mlflow server` process on loopback):

train -> sweep (6 trials, median pruner, some pruned, Optuna study in PostgreSQL) -> retrain the best recipe ->
register it in the PostgreSQL-backed MLflow server -> serve it -> HTTP predictions equal ctrlab's in-process
predictions for the same raw rows. Plus two sweep workers sharing one PostgreSQL-backed study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from ctrlab.cli import main
from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.data.pipeline import load_raw_splits
from ctrlab.serve import Predictor
from ctrlab.serve.server import serve_registered


def _recipe(tmp_path: Path, tracking_uri: str, storage: str, study: str, n_trials: int = 6) -> Path:
    recipe = {
        "name": study, "seed": 5, "output_dir": str(tmp_path / "base"),
        "dataset": {"synthetic": {"rows": 6000, "categorical_fields": 4, "numeric_fields": 2,
                                   "informative_fields": 2, "interaction_pairs": 1, "numeric_informative": 1,
                                   "cardinalities": [5, 10, 20, 40]}},
        "model": {"block": "deepfm", "mlp": {"hidden": [16]}}, "embedding": {"dim": 4},
        "train": {"epochs": 3, "batch_size": 512, "progress": False, "device": "cpu",
                  "early_stopping": {"patience": 1}},
        "tracking": {"uri": tracking_uri, "experiment": study},
        "sweep": {
            "n_trials": n_trials, "sampler": "random", "pruner": "median", "pruner_startup_trials": 1,
            "pruner_warmup_epochs": 0, "storage": storage, "study_name": study,
            # A learning rate of 1e-6 barely moves the model: those trials fall below the median and are pruned.
            "space": {"train.optimizer.lr": {"type": "categorical", "choices": [0.01, 1.0e-6]},
                      "model.mlp.dropout": {"type": "float", "low": 0.0, "high": 0.3}},
        },
    }
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_train_sweep_register_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str], cache_dir: Path,
                                    postgres_url: str, mlflow_server_uri: str) -> None:
    recipe_path = _recipe(tmp_path, mlflow_server_uri, f"{postgres_url}/optuna", "e2e")
    base = _cli_json(capsys, "train", str(recipe_path))
    assert base["test"]["auc"] > 0.5

    sweep = _cli_json(capsys, "sweep", str(recipe_path), f"output_dir={tmp_path / 'sweep'}")
    states = sweep["counts"] if "counts" in sweep else sweep["states"]
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 6
    assert states.get("PRUNED", 0) >= 1
    study = optuna.load_study(study_name="e2e", storage=f"{postgres_url}/optuna")
    assert len([t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]) == 6

    best_recipe = Path(sweep["best_recipe"])
    best = _cli_json(capsys, "train", str(best_recipe), f"output_dir={tmp_path / 'best'}")
    run_dir = Path(best["output_dir"])

    registered = _cli_json(capsys, "register", str(run_dir), "--name", "e2e_model", "--alias", "champion",
                           "--tracking-uri", mlflow_server_uri)
    assert registered["version"] == "1"

    recipe = validate_recipe(read_recipe_file(run_dir / "recipe.yaml"))
    predictor = Predictor.from_run(run_dir)
    rows = load_raw_splits(recipe.dataset, recipe.seed).frames["test"].select(predictor.input_columns).head(300)
    with serve_registered("e2e_model", "champion", tracking_uri=mlflow_server_uri) as server:
        status, body = server.predict_records(rows.to_dicts())
    assert status == 200
    served = np.array([p["probability"] for p in body["predictions"]])
    np.testing.assert_allclose(served, predictor.predict(rows), rtol=0, atol=1e-6)


def test_two_sweep_workers_share_a_postgres_study(tmp_path: Path, cache_dir: Path, postgres_url: str) -> None:
    storage = f"{postgres_url}/optuna"
    recipe_path = _recipe(tmp_path, "", storage, "two_workers", n_trials=6)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "ctrlab", "sweep", str(recipe_path), "tracking.enabled=false",
               f"output_dir={tmp_path / 'sweep'}"]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err.decode()[-2000:]
    study = optuna.load_study(study_name="two_workers", storage=storage)
    finished = [t.number for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 and len(set(finished)) == 6
    ran = [err.decode().count("trial ") for _, err in outputs]
    assert all(n > 0 for n in ran), "both workers must have run trials"

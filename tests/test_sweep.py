"""``ctrlab sweep``: sampling the space, up-front key checks, pruning, budget across reruns and workers, failed
and killed trials, the best recipe, and the MLflow parent/nested runs. Tiny synthetic data throughout."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from rich.console import Console

from ctrlab.cli import main
from ctrlab.config.loader import load_recipe, recipe_to_dict, validate_recipe
from ctrlab.config.sweep import ParamSpace
from ctrlab.errors import RecipeError
from ctrlab.sweep import study as sweep_module
from ctrlab.sweep.space import check_space, sample_order, sample_params
from ctrlab.sweep.study import run_sweep

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
REPO = Path(__file__).resolve().parents[1]


def _recipe(out: Path, space: dict[str, Any], **sweep: Any) -> dict[str, Any]:
    """4,000 synthetic rows, batch 128, 2 epochs: a trial takes well under a second after the first."""
    return {
        "name": "sw", "seed": 1, "output_dir": str(out),
        "dataset": {"synthetic": {"rows": 4000, "numeric_fields": 2, "categorical_fields": 4,
                                  "cardinalities": [5, 10, 20, 50], "informative_fields": 3,
                                  "interaction_pairs": 1}},
        "features": {"categorical": ["C1", "C2", "C3", "C4"],
                     "numeric": [{"name": "I1", "transform": "log"}, {"name": "I2", "transform": "log"}]},
        "embedding": {"dim": 4},
        "model": {"block": "deepfm", "mlp": {"hidden": [16]}},
        "train": {"epochs": 2, "batch_size": 128, "progress": False, "device": "cpu", "num_threads": 1,
                  "optimizer": {"lr": 0.01}},
        "tracking": {"enabled": False},
        "sweep": {"n_trials": 6, "pruner": "median", "pruner_startup_trials": 1, "pruner_warmup_epochs": 0,
                   "sampler": "random", **sweep, "space": space},
    }


# A learning rate of 1e-6 leaves the model near its initialisation: far below the median at epoch 1.
PRUNABLE_SPACE = {"train.optimizer.lr": {"type": "categorical", "choices": [0.01, 1.0e-6]},
                  "model.mlp.dropout": {"type": "float", "low": 0.0, "high": 0.3}}


def _write(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _study(out: Path, name: str = "sw") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _finished_numbers(study: optuna.Study) -> list[int]:
    return [t.number for t in study.get_trials(deepcopy=False, states=FINISHED)]


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=300, color_system=None), buffer


# ------------------------------------------------------------------------------------------------ space
def _space(**specs: dict[str, Any]) -> dict[str, ParamSpace]:
    return {k.replace("__", "."): ParamSpace.model_validate(v) for k, v in specs.items()}


def test_sampling_respects_types_ranges_steps_and_log() -> None:
    space = _space(train__batch_size={"type": "int", "low": 64, "high": 512, "step": 64},
                   train__optimizer__lr={"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                   model__mlp__dropout={"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
                   model__mlp__hidden={"type": "categorical", "choices": [[32], [64, 32]]},
                   embedding__dim={"type": "categorical", "choices": [4, 8, 16]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lrs = []
    for _ in range(60):
        trial = study.ask()
        params = sample_params(trial, space, {})
        study.tell(trial, 0.5)
        assert params["train.batch_size"] in range(64, 513, 64)
        assert 1e-4 <= params["train.optimizer.lr"] <= 1e-1
        assert any(math.isclose(params["model.mlp.dropout"], k / 10) for k in range(6))
        assert params["model.mlp.hidden"] in ([32], [64, 32])  # a list choice comes back as the list
        assert params["embedding.dim"] in (4, 8, 16)
        lrs.append(params["train.optimizer.lr"])
    # log scale: about a third of the draws in each decade
    assert sum(lr < 1e-3 for lr in lrs) >= 10 and sum(lr > 1e-2 for lr in lrs) >= 10
    fixed = optuna.trial.FixedTrial({"train.batch_size": 128, "train.optimizer.lr": 0.003,
                                     "model.mlp.dropout": 0.2, "model.mlp.hidden": "[64, 32]", "embedding.dim": 8})
    assert sample_params(fixed, space, {}) == {"train.batch_size": 128, "train.optimizer.lr": 0.003,
                                               "model.mlp.dropout": 0.2, "model.mlp.hidden": [64, 32],
                                               "embedding.dim": 8}


def test_when_conditions_and_sampling_order() -> None:
    space = _space(train__optimizer__embedding_weight_decay={"type": "float", "low": 1e-6, "high": 1e-3,
                                                              "log": True, "when": {"train.optimizer.name": "adam"}},
                   model__mlp__dropout={"type": "float", "low": 0.1, "high": 0.3, "when": {"model.block": "deepfm"}},
                   train__optimizer__name={"type": "categorical", "choices": ["adam", "adagrad"]})
    order = sample_order(space)
    assert order.index("train.optimizer.name") < order.index("train.optimizer.embedding_weight_decay")
    base = {"model": {"block": "deepfm"}}
    adam = optuna.trial.FixedTrial({"train.optimizer.name": "adam", "model.mlp.dropout": 0.2,
                                    "train.optimizer.embedding_weight_decay": 1e-5})
    assert sample_params(adam, space, base) == {"train.optimizer.name": "adam", "model.mlp.dropout": 0.2,
                                                "train.optimizer.embedding_weight_decay": 1e-5}
    adagrad = optuna.trial.FixedTrial({"train.optimizer.name": "adagrad", "model.mlp.dropout": 0.2})
    assert sample_params(adagrad, space, base) == {"train.optimizer.name": "adagrad", "model.mlp.dropout": 0.2}
    # a condition on a base-recipe value that does not hold: never sampled
    assert "model.mlp.dropout" not in sample_params(adagrad, space, {"model": {"block": "lr"}})
    cyclic = _space(a__x={"type": "int", "low": 0, "high": 1, "when": {"b.y": 1}},
                    b__y={"type": "int", "low": 0, "high": 1, "when": {"a.x": 1}})
    with pytest.raises(RecipeError, match="cycle"):
        sample_order(cyclic)


def test_unknown_or_invalid_key_in_the_space_is_one_line_naming_it(tmp_path: Path, cache_dir: Path) -> None:
    recipe = _recipe(tmp_path / "out", {"model.mlp.dropot": {"type": "float", "low": 0.0, "high": 0.3}})
    path = _write(tmp_path / "r.yaml", recipe)
    with pytest.raises(RecipeError) as info:
        run_sweep(path, console=Console(quiet=True))
    assert "model.mlp.dropot" in info.value.message and "model.mlp.dropout" in info.value.message
    assert "\n" not in info.value.message
    assert not (tmp_path / "out" / "study.db").exists()  # checked before any study or trial
    # a range the schema rejects (dropout must be < 1) is caught up front too
    raw = _recipe(tmp_path / "out", {"model.mlp.dropout": {"type": "float", "low": 0.0, "high": 1.5}})
    with pytest.raises(RecipeError, match=r"sweep.space key 'model.mlp.dropout' \(value 1.5\)"):
        check_space(raw, validate_recipe(raw).sweep.space)
    # through the CLI: one line, exit 2; a recipe without a sweep section says so
    assert main(["sweep", str(path)]) == 2
    plain = {k: v for k, v in recipe.items() if k != "sweep"}
    assert main(["sweep", str(_write(tmp_path / "plain.yaml", plain))]) == 2
    with pytest.raises(RecipeError, match="has no sweep section"):
        run_sweep(tmp_path / "plain.yaml", console=Console(quiet=True))


# ----------------------------------------------------------------------------------- sweep end to end
def test_sweep_prunes_writes_best_recipe_and_resumes(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "out"
    path = _write(tmp_path / "r.yaml", _recipe(out, PRUNABLE_SPACE))
    console, printed = _console()
    result = run_sweep(path, console=console)

    study = _study(out)
    states = _states(study)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 6 and states.get("FAIL", 0) == 0
    assert states.get("PRUNED", 0) >= 1, printed.getvalue()  # bad learning rates stopped at epoch 1
    for t in study.get_trials(states=(TrialState.PRUNED,)):
        assert t.params["train.optimizer.lr"] == 1e-6 and t.user_attrs["pruned_at_epoch"] == 1
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("trial ")]
    assert len(lines) == 6 and any("PRUNED" in line for line in lines) and all("best" in line for line in lines)
    assert result.counts == states and result.best_params["train.optimizer.lr"] == 0.01

    # best_recipe.yaml: the best trial's resolved recipe, no sweep section, trains as is
    best_file = out / "best_recipe.yaml"
    assert result.best_recipe == best_file
    best = yaml.safe_load(best_file.read_text())
    assert "sweep" not in best or best["sweep"] is None
    assert best["output_dir"] == str(out / "best")
    assert best["train"]["optimizer"]["lr"] == 0.01
    assert best["model"]["mlp"]["dropout"] == pytest.approx(result.best_params["model.mlp.dropout"])
    assert best == yaml.safe_load((out / "trials" / str(result.best_trial) / "recipe.yaml").read_text()) | {
        "output_dir": str(out / "best"), "sweep": None}
    assert main(["train", str(best_file), "train.epochs=1"]) == 0
    assert (out / "best" / "model.safetensors").exists()

    # trials.csv and plots
    csv_lines = (out / "trials.csv").read_text().splitlines()
    assert csv_lines[0].startswith("number,state,value,params,duration_seconds") and len(csv_lines) == 7
    assert (out / "optimization_history.png").stat().st_size > 1000
    assert (out / "param_importances.png").stat().st_size > 1000

    # rerun: the budget is reached, nothing new runs
    again = run_sweep(path, console=Console(quiet=True))
    assert again.trials_run == 0 and len(_study(out).trials) == len(study.trials)
    # a higher n_trials resumes the same study
    more = run_sweep(path, ["sweep.n_trials=8"], console=Console(quiet=True))
    numbers = _finished_numbers(_study(out))
    assert more.trials_run == 2 and len(numbers) == 8 and len(set(numbers)) == 8


def test_failed_and_nan_trials_are_recorded_and_the_sweep_completes(tmp_path: Path, cache_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrlab.train import run as run_module

    real = run_module.train_recipe

    def flaky(recipe, *args, **kwargs):  # dim 2 crashes, dim 6 yields a NaN objective
        if recipe.embedding.dim == 2:
            raise RuntimeError("simulated crash in a trial")
        result = real(recipe, *args, **kwargs)
        if recipe.embedding.dim == 6:
            result.metrics["valid"]["auc"] = float("nan")
        return result

    monkeypatch.setattr(run_module, "train_recipe", flaky)
    out = tmp_path / "out"
    space = {"embedding.dim": {"type": "categorical", "choices": [2, 4, 6]}}
    path = _write(tmp_path / "r.yaml", _recipe(out, space, n_trials=4, pruner="none"))
    console, printed = _console()
    result = run_sweep(path, console=console)
    study = _study(out)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(_finished_numbers(study)) == 4  # failures do not use up the budget
    assert {t.params["embedding.dim"] for t in failed} == {2, 6}
    assert any("simulated crash" in t.user_attrs.get("error", "") for t in failed)
    assert all(t.params["embedding.dim"] == 4 for t in study.get_trials(states=FINISHED))
    assert "FAIL" in printed.getvalue() and "RuntimeError: simulated crash in a trial" in printed.getvalue()
    assert result.counts["FAIL"] == len(failed) and result.best_params == {"embedding.dim": 4}

    # a sweep whose every trial fails with the same user error stops with that error (one line)
    from ctrlab.errors import DataError

    def broken(recipe, *args, **kwargs):
        raise DataError("data.csv: file not found")

    monkeypatch.setattr(run_module, "train_recipe", broken)
    path = _write(tmp_path / "r2.yaml", _recipe(tmp_path / "out2", space, n_trials=3))
    with pytest.raises(DataError, match="every trial failed: data.csv: file not found"):
        run_sweep(path, console=Console(quiet=True))


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CTRLAB_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_two_workers_share_one_study(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "out"
    path = _write(tmp_path / "r.yaml", _recipe(out, PRUNABLE_SPACE, n_trials=6))
    command = [sys.executable, "-m", "ctrlab", "sweep", str(path)]
    workers = [subprocess.Popen(command, env=_env(cache_dir), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=180) for w in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
    summaries = [json.loads(stdout) for stdout, _ in outputs]
    study = _study(out)
    numbers = _finished_numbers(study)
    assert len(numbers) == 6 and len(set(numbers)) == 6
    assert {s["study"] for s in summaries} == {"sw"}
    assert sum(s["trials_run_by_this_worker"] for s in summaries) >= 6
    assert all(s["counts"].get("COMPLETE", 0) + s["counts"].get("PRUNED", 0) == 6 for s in summaries)
    validate_recipe(yaml.safe_load((out / "best_recipe.yaml").read_text()))


def test_a_killed_workers_running_trial_is_failed_and_the_study_completes(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    recipe = _recipe(out, PRUNABLE_SPACE, n_trials=40, pruner="none")
    epochs = 8
    recipe["train"].update(epochs=epochs, early_stopping=None)  # slow enough trials to be killed inside one
    path = _write(tmp_path / "r.yaml", recipe)
    worker = subprocess.Popen([sys.executable, "-m", "ctrlab", "sweep", str(path)], cwd=tmp_path,
                              env=_env(cache_dir, CTRLAB_SWEEP_HEARTBEAT_INTERVAL="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if not (out / "study.db").exists():
                continue
            try:
                trials = _study(out).get_trials(deepcopy=False)
            except Exception:  # the study is not created yet
                continue
            # Kill inside a trial that has reported an epoch and has at least half its epochs left: a trial merely
            # seen RUNNING may finish before the signal lands, leaving nothing running to recover.
            inside = [t for t in trials if t.state == TrialState.RUNNING
                      and 1 <= len(t.intermediate_values) <= epochs // 2]
            if any(t.state in FINISHED for t in trials) and inside:
                worker.send_signal(signal.SIGKILL)
                break
    finally:
        worker.kill()
        worker.wait()
    study = _study(out)
    running = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    assert len(running) == 1, _states(study)  # left behind by the killed worker
    done = len(_finished_numbers(study))

    monkeypatch.setattr(sweep_module, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(sweep_module, "HEARTBEAT_GRACE", 2)
    time.sleep(2.5)  # the killed worker's heartbeat is now older than the grace period
    result = run_sweep(path, [f"sweep.n_trials={done + 2}", "train.epochs=2"], console=Console(quiet=True))
    study = _study(out)
    assert study.trials[running[0]].state == TrialState.FAIL
    numbers = _finished_numbers(study)
    assert len(numbers) == done + 2 and len(set(numbers)) == len(numbers)
    assert running[0] not in numbers and result.trials_run == 2
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_sweep_is_a_parent_run_with_nested_trial_runs(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("mlflow")
    tracking = pytest.importorskip("ctrlab.tracking")
    if not hasattr(tracking, "mlflow_run"):
        pytest.skip("ctrlab.tracking.mlflow_run is not available")
    out = tmp_path / "out"
    recipe = _recipe(out, PRUNABLE_SPACE, n_trials=3, pruner="none")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe["tracking"] = {"enabled": True, "uri": uri, "experiment": "sweeps"}
    result = run_sweep(_write(tmp_path / "r.yaml", recipe), console=Console(quiet=True))
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "sw-sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"sw-trial-{n}" for n in range(3)]
    assert "space.train.optimizer.lr" in parent.data.params
    assert parent.data.metrics["best_auc"] == pytest.approx(result.best_value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_recipe.yaml"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} >= {"plots/optimization_history.png"}


def test_quickstart_sweep_recipe_is_valid() -> None:
    recipe = load_recipe(REPO / "recipes" / "quickstart_sweep.yaml")
    assert recipe.sweep is not None and recipe.sweep.n_trials == 8 and recipe.sweep.pruner == "median"
    assert set(recipe.sweep.space) == {"embedding.dim", "train.optimizer.lr", "model.mlp.dropout"}
    check_space({k: v for k, v in recipe_to_dict(recipe).items()}, recipe.sweep.space, "quickstart_sweep")


def test_a_running_trial_that_never_wrote_a_heartbeat_is_failed(tmp_path: Path) -> None:
    # A worker killed between creating a trial and its first heartbeat leaves a RUNNING trial Optuna's own
    # stale check never fails; the sweep must not wait on it forever.
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(storage=storage, study_name="s")
    orphan = study.ask()  # RUNNING, no heartbeat
    time.sleep(0.05)
    sweep_module._fail_trials_without_heartbeat(study, grace_seconds=3600)
    assert study.trials[orphan.number].state == TrialState.RUNNING  # still within the grace period
    sweep_module._fail_trials_without_heartbeat(study, grace_seconds=0)
    assert study.trials[orphan.number].state == TrialState.FAIL

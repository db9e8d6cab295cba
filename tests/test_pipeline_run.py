"""``ctrlab pipeline``: one recipe from the plain model through ranking, OptFS, OptInter, an embedding search, a
sweep and a multi-seed retrain to a registered model. Each stage is judged on validation and rolled back when it
costs more than the tolerance; the pipeline resumes after a kill with no stage repeated and no trial lost or run
twice; it is tracked as one MLflow parent run with a nested run per stage; its registered model serves raw rows over
HTTP as it scores them in process; bad stage lists are one-line errors naming the key."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from rich.console import Console

from ctrlab.cli import main
from ctrlab.config.loader import validate_recipe
from ctrlab.pipeline.base import Candidate
from ctrlab.pipeline.budget import judge, shares
from ctrlab.pipeline.recipes import carried_over, settle_searches
from ctrlab.pipeline.runner import run_pipeline
from ctrlab.pipeline.stages.rank import chance_spread, uninformative
from ctrlab.pipeline.state import STATE_FILE
from tiny import one_line_error

QUIET = Console(quiet=True)
REPO = Path(__file__).resolve().parents[1]


def small_recipe(root: Path, stages: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """A pipeline over small synthetic data (3 informative fields, 2 planted pairs, 4 noise fields), two epochs a
    training."""
    recipe: dict[str, Any] = {
        "name": "pipe", "seed": 2021, "output_dir": str(root / "out"),
        "dataset": {"synthetic": {"rows": 6000, "numeric_fields": 2, "categorical_fields": 6,
                                   "cardinalities": [3, 5, 8, 12, 20, 30], "informative_fields": 3,
                                   "interaction_pairs": 2},
                    "split": {"kind": "random", "fractions": [0.8, 0.1, 0.1]}, "cache_dir": str(root / "cache")},
        "features": {"categorical": ["C1", "C2", "C3", "C4", "C5", "C6"],
                     "numeric": [{"name": "I1", "transform": "bucketize", "buckets": 8},
                                 {"name": "I2", "transform": "bucketize", "buckets": 8}]},
        "embedding": {"kind": "per_field", "dim": 4},
        "model": {"block": "deepfm", "mlp": {"hidden": [16]}},
        "train": {"batch_size": 512, "epochs": 2, "num_threads": 1, "progress": False, "device": "cpu",
                  "early_stopping": {"monitor": "auc", "patience": 1}},
        "tracking": {"enabled": False},
        "pipeline": {"stages": stages},
    }
    recipe.update(top)
    return recipe


def write_recipe(root: Path, recipe: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


SWEEP = {"stage": "sweep", "n_trials": 3, "pruner": "none",
         "space": {"train.optimizer.lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True}}}
EVERY_STAGE = [
    {"stage": "rank"},
    {"stage": "optfs", "gate": {"kind": "optfs", "search_epochs": 1, "rewind_epoch": 0}},
    {"stage": "optinter", "interaction": {"kind": "optinter", "search_epochs": 1}},
    {"stage": "embedding", "embedding": {"kind": "dnis", "search_epochs": 1}},
    {**SWEEP, "n_trials": 2},
    {"stage": "retrain", "seeds": [1, 2]},
    {"stage": "register", "name": "pipeline-test", "alias": "champion"},
]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every stage, tracked in a store of its own, the model registered there."""
    root = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    recipe = small_recipe(root, copy.deepcopy(EVERY_STAGE), tracking={"enabled": True, "uri": uri})
    recipe["pipeline"]["stages"][-1]["tracking_uri"] = uri
    path = write_recipe(root, recipe)
    result = run_pipeline(path, console=QUIET)
    return {"root": root, "uri": uri, "path": path, "result": result, "out": root / "out"}


# ------------------------------------------------------------------------------------------- a whole run
def test_every_stage_runs_in_order_and_the_report_says_what_each_decided(ran) -> None:
    result, out = ran["result"], ran["out"]
    stages = [r.stage for r in result.records]
    assert stages == ["plain", "rank", "optfs", "optinter", "embedding", "sweep", "retrain", "register"]
    outcomes = {r.stage: r.outcome for r in result.records}
    assert outcomes["plain"] == "kept" and outcomes["retrain"] == "final" and outcomes["register"] == "registered"
    for stage in ("optfs", "optinter", "embedding"):
        assert outcomes[stage] in ("kept", "rolled_back"), outcomes
    sweep = next(r for r in result.records if r.stage == "sweep")
    # its first trial retrains the model before it: a sweep that finds nothing better proposes nothing
    assert sweep.outcome == ("nothing_proposed" if sweep.decision["best_is_baseline"] else "kept"), sweep
    first = pl.read_csv(out / "stages" / "05-sweep" / "study" / "trials.csv").row(0, named=True)
    assert first["number"] == 0 and json.loads(first["params"]) == {"train.optimizer.lr": 0.001}
    rank = next(r for r in result.records if r.stage == "rank")
    assert rank.decision["dropped"] and set(rank.decision["dropped"]) | set(rank.decision["kept"]) == {
        "C1", "C2", "C3", "C4", "C5", "C6", "I1", "I2"}
    state = json.loads((out / STATE_FILE).read_text())
    assert [r["stage"] for r in state["records"]] == stages
    report = (out / "report.md").read_text()
    for record in result.records:
        assert f"| {record.index} | {record.stage} | {record.outcome.replace('_', ' ')} |" in report
    assert "drop " in report and "pairs: memorise" in report and "dnis: embedding parameters" in report
    assert "best trial" in report and "seeds [1, 2]" in report
    for picture in ("pipeline_valid.png", "pipeline_cost.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{picture}]({picture})" in report
    final = result.summary()["final"]
    assert len(final["test_auc"]["by_seed"]) == 2
    assert final["test_auc"]["mean"] == pytest.approx(np.mean(final["test_auc"]["by_seed"]))


def test_a_stage_is_kept_only_within_the_tolerance_of_the_model_before_it_and_of_the_plain_model_and_if_smaller(
        ran) -> None:
    records = ran["result"].records
    plain = records[0].candidate["valid"]["auc"]
    held, held_size = plain, records[0].candidate["parameters"]
    for record in records[1:]:
        if record.outcome in ("kept", "rolled_back"):
            value, size = record.candidate["valid"]["auc"], record.candidate["parameters"]
            kept = value >= held - 0.0005 and value >= plain - 0.0005 and (value >= held or size <= 0.99 * held_size)
            assert (record.outcome == "kept") == kept, (record.stage, value, held, plain)
            if kept:
                held, held_size = value, size
    final = next(r for r in records if r.stage == "retrain")
    assert final.incumbent_run == final.decision["chosen_run"]


def test_a_kept_stage_is_fixed_for_the_stages_after_it(ran) -> None:
    records = {r.stage: r for r in ran["result"].records}
    recipe = records["retrain"].incumbent_recipe
    for stage, section in (("optfs", "gate"), ("optinter", "interaction"), ("embedding", "embedding")):
        if records[stage].outcome == "kept":
            assert recipe[section]["stages"] == ["retrain"]
            assert Path(recipe[section]["from_run"]).is_dir()
    if records["rank"].outcome == "kept":
        features = recipe["features"]
        names = {f["name"] for f in features["categorical"]} | {f["name"] for f in features["numeric"]}
        assert names == set(records["rank"].decision["kept"])


def test_the_pipeline_is_one_mlflow_parent_run_with_a_nested_run_per_stage(ran) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(ran["uri"])
    experiment = client.get_experiment_by_name("pipe")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ctrlab.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["ctrlab.stage"] for r in stage_runs) == sorted(
        ["plain", "rank", "optfs", "optinter", "embedding", "sweep", "retrain", "register"])
    by_stage = {r.data.tags["ctrlab.stage"]: r for r in stage_runs}
    trainings = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_stage["retrain"].info.run_id]
    assert len(trainings) == 2  # one per seed, nested under the stage
    assert "valid_auc" in by_stage["optfs"].data.metrics and "kept" in by_stage["optfs"].data.metrics
    artefacts = [a.path for a in client.list_artifacts(parent, "report")]
    assert "report/report.md" in artefacts and "report/pipeline_valid.png" in artefacts


def test_rerunning_a_finished_pipeline_reads_every_stage_back_and_trains_nothing(ran) -> None:
    out = ran["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("stages/*/**/metrics.json")}
    again = run_pipeline(ran["path"], console=QUIET)
    assert [(r.stage, r.outcome) for r in again.records] == [(r.stage, r.outcome) for r in ran["result"].records]
    assert {p: p.stat().st_mtime_ns for p in out.glob("stages/*/**/metrics.json")} == stamps


def test_the_registered_pipeline_model_serves_raw_rows_over_http_as_in_process(ran, tmp_path: Path) -> None:
    """Served with --tracking-uri while $MLFLOW_TRACKING_URI names another store, and with the pipeline's folder
    moved away: the registered model carries everything it needs."""
    from ctrlab.data.pipeline import load_raw_splits
    from ctrlab.serve import Predictor
    from ctrlab.serve.server import ServedModel, free_port, running_process, venv_env

    register = next(r for r in ran["result"].records if r.stage == "register")
    run_dir = Path(register.decision["run"])
    predictor = Predictor.from_run(run_dir)
    recipe = validate_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    rows = load_raw_splits(recipe.dataset, recipe.seed).frames["test"].head(200).select(predictor.input_columns)
    expected = predictor.predict(rows)
    moved = tmp_path / "moved"
    shutil.move(str(ran["out"]), moved)
    try:
        port = free_port()
        command = [sys.executable, "-m", "ctrlab", "serve", "pipeline-test", "--alias", "champion", "--port",
                   str(port), "--tracking-uri", ran["uri"]]
        env = venv_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'another.db'}")
        with running_process(command, env, f"http://127.0.0.1:{port}/ping", "ctrlab serve"):
            status, body = ServedModel(port).predict_records(rows.to_dicts())
    finally:
        shutil.move(str(moved), ran["out"])
    assert status == 200, body
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- roll back
def test_a_stage_that_costs_validation_auc_is_rolled_back_and_the_next_stage_builds_on_the_model_before_it(
        tmp_path: Path) -> None:
    # A multiplexed table of 2% of the parameters loses AUC on any data: tolerance 0 makes the cost certain.
    stages = [{"stage": "embedding", "embedding": {"kind": "multiplexed", "budget": 0.02}},
              {"stage": "retrain", "seeds": [7]}]
    recipe = small_recipe(tmp_path, stages)
    recipe["pipeline"]["tolerance"] = 0.0
    result = run_pipeline(write_recipe(tmp_path, recipe), console=QUIET)
    embedding = result.records[1]
    assert embedding.outcome == "rolled_back", embedding.reason
    assert "worse than the model before it" in embedding.reason
    assert embedding.candidate["valid"]["auc"] < result.records[0].candidate["valid"]["auc"]
    final = result.records[2]
    assert final.incumbent_recipe["embedding"]["kind"] == "per_field"
    trained = yaml.safe_load((Path(final.incumbent_run) / "recipe.yaml").read_text())
    assert trained["embedding"]["kind"] == "per_field" and trained["seed"] == 7
    assert trained["dataset"]["seed"] == 2021  # the seeds vary the model, not the data
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 1 | embedding | rolled back |" in report


# ------------------------------------------------------------------------------------------- kill, resume
def _trials(out: Path) -> list[tuple[str, tuple[tuple[str, Any], ...], float | None]]:
    import optuna

    study_dir = next(out.glob("stages/*-sweep/study"))
    study = optuna.load_study(study_name="pipe-pipeline", storage=f"sqlite:///{study_dir / 'study.db'}")
    return sorted((t.state.name, tuple(sorted(t.params.items())), t.value) for t in study.get_trials()
                  if t.state.name in ("COMPLETE", "PRUNED"))


def test_a_pipeline_killed_during_its_sweep_resumes_with_no_stage_repeated_and_no_trial_lost_or_run_twice(
        tmp_path: Path) -> None:
    stages = [{"stage": "rank"}, {**SWEEP, "n_trials": 4}, {"stage": "retrain", "seeds": [5]}]
    whole = tmp_path / "whole"
    run_pipeline(write_recipe(whole, small_recipe(whole, stages)), console=QUIET)

    cut = tmp_path / "cut"
    path = write_recipe(cut, small_recipe(cut, stages))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "ctrlab", "pipeline", str(path)], cwd=cut, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # trial 2's run folder is built under a temporary name while it trains: the kill lands inside trial 2
    trials = cut / "out" / "stages" / "02-sweep" / "study" / "trials"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and not (
            trials.is_dir() and any(p.name.startswith(".2.") for p in trials.iterdir())):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    state = json.loads((cut / "out" / STATE_FILE).read_text())
    assert [r["stage"] for r in state["records"]] == ["plain", "rank"]
    plain_metrics = cut / "out" / "stages" / "00-plain" / "model" / "metrics.json"
    stamp = plain_metrics.stat().st_mtime_ns

    resumed = subprocess.run([sys.executable, "-m", "ctrlab", "pipeline", str(path)], cwd=cut, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "plain finished earlier" in resumed.stderr and "rank finished earlier" in resumed.stderr
    assert plain_metrics.stat().st_mtime_ns == stamp
    done = json.loads((cut / "out" / STATE_FILE).read_text())["records"]
    expected = json.loads((whole / "out" / STATE_FILE).read_text())["records"]
    assert [(r["stage"], r["outcome"]) for r in done] == [(r["stage"], r["outcome"]) for r in expected]
    assert _trials(cut / "out") == _trials(whole / "out")
    assert len(_trials(cut / "out")) == 4
    import optuna

    study = optuna.load_study(study_name="pipe-pipeline", storage=f"sqlite:///{trials.parent / 'study.db'}")
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [2] and failed[0].user_attrs["interrupted"]
    retry = next(t for t in study.get_trials() if t.user_attrs.get("retry_of") == 2)
    assert retry.params == failed[0].params and retry.state.name == "COMPLETE"
    assert done[-1]["decision"]["test_auc"]["by_seed"] == pytest.approx(expected[-1]["decision"]["test_auc"]["by_seed"])


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("stages, key, words", [
    ([{"stage": "optfs"}, {"stage": "optfs"}], "pipeline.stages[1].stage", "listed twice"),
    ([{"stage": "optinter"}, {"stage": "rank"}], "pipeline.stages[1].stage", "must come before optinter"),
    ([{"stage": "register", "name": "m"}], "pipeline.stages[0].stage", "needs the final model"),
    ([{**SWEEP, "space": {"gate.sparsity_weight": {"type": "float", "low": 1e-9, "high": 1e-6, "log": True}}}],
     "pipeline.stages[0].space.gate.sparsity_weight", "needs the feature set that the optfs stage produces"),
    ([{"stage": "retrain", "minutes": 0}], "pipeline.stages[0].minutes", "greater than 0"),
    ([{**SWEEP, "n_trials": 0}], "pipeline.stages[0].n_trials", "greater than or equal to 1"),
    ([], "pipeline.stages", "at least 1 item"),
    ([{"stage": "ranking"}], "pipeline.stages[0].stage", "unknown value 'ranking'"),
])
def test_a_bad_stage_list_is_one_line_naming_the_key(tmp_path: Path, capsys, stages, key: str, words: str) -> None:
    path = write_recipe(tmp_path, small_recipe(tmp_path, stages))
    code = main(["pipeline", str(path)])
    one_line_error(code, capsys.readouterr().err, f"{path}: {key}: ", words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, key", [
    ("pipeline.hours=0", "pipeline.hours"),
    ("pipeline.hours=-1", "pipeline.hours"),
    ("pipeline.tolerance=-0.1", "pipeline.tolerance"),
])
def test_a_zero_or_negative_budget_is_one_line_naming_the_key(tmp_path: Path, capsys, override: str,
                                                                key: str) -> None:
    path = write_recipe(tmp_path, small_recipe(tmp_path, [{"stage": "retrain"}]))
    code = main(["pipeline", str(path), override])
    one_line_error(code, capsys.readouterr().err, f"{key}: ")


def test_a_recipe_without_a_pipeline_or_with_a_sweep_section_is_refused(tmp_path: Path, capsys) -> None:
    recipe = small_recipe(tmp_path, [{"stage": "retrain"}])
    del recipe["pipeline"]
    code = main(["pipeline", str(write_recipe(tmp_path, recipe))])
    one_line_error(code, capsys.readouterr().err, "pipeline: the recipe has no pipeline section")
    recipe = small_recipe(tmp_path, [{"stage": "retrain"}], sweep={"space": SWEEP["space"]})
    code = main(["pipeline", str(write_recipe(tmp_path, recipe))])
    one_line_error(code, capsys.readouterr().err, "sweep: a pipeline sweeps in its sweep stage")


def test_a_changed_recipe_does_not_resume_another_pipeline_without_overwrite(tmp_path: Path, capsys) -> None:
    stages = [{"stage": "retrain", "seeds": [3]}]
    path = write_recipe(tmp_path, small_recipe(tmp_path, stages))
    assert main(["pipeline", str(path)]) == 0
    capsys.readouterr()
    code = main(["pipeline", str(path), "pipeline.tolerance=0.01"])
    one_line_error(code, capsys.readouterr().err, "output_dir: ", "holds a pipeline of another recipe", "--overwrite")
    assert main(["pipeline", str(path), "pipeline.hours=2"]) == 0  # a new budget resumes the same pipeline
    assert main(["pipeline", str(path), "pipeline.tolerance=0.01", "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------- the parts
def _candidate(auc: float, parameters: int = 1000) -> Candidate:
    return Candidate({}, Path("."), {"valid": {"auc": auc, "logloss": 1 - auc}, "model_parameters": parameters})


def test_judge_keeps_a_stage_within_the_tolerance_of_both_the_model_before_it_and_the_plain_model() -> None:
    plain = _candidate(0.80)
    assert judge(_candidate(0.8004, 900), _candidate(0.8006), plain, "auc", 0.0005)[0]
    # the tolerance buys a smaller model, never a worse one of the same size
    kept, reason = judge(_candidate(0.8004), _candidate(0.8006), plain, "auc", 0.0005)
    assert not kept and "and not 1% smaller (1,000 parameters against 1,000)" in reason
    assert not judge(_candidate(0.8004, 995), _candidate(0.8006), plain, "auc", 0.0005)[0]  # 0.5%: too little
    assert judge(_candidate(0.8004, 995), _candidate(0.8006), plain, "auc", 0.0005, min_saving=0.005)[0]
    assert judge(_candidate(0.8007, 5000), _candidate(0.8006), plain, "auc", 0.0005)[0]  # better: size is free
    kept, reason = judge(_candidate(0.7990), _candidate(0.8000), plain, "auc", 0.0005)
    assert not kept and "0.00100 worse than the model before it" in reason
    # within the tolerance of the model before it, but the costs would add up below the plain model
    kept, reason = judge(_candidate(0.7992, 900), _candidate(0.7996), plain, "auc", 0.0005)
    assert not kept and "worse than the plain recipe's model" in reason
    assert not judge(_candidate(math.nan), plain, plain, "auc", 0.0005)[0]
    # logloss: lower is better
    assert judge(_candidate(0.81), plain, plain, "logloss", 0.0)[0]
    assert not judge(_candidate(0.79, 900), plain, plain, "logloss", 0.0)[0]


def test_shares_split_the_time_left_by_estimate_after_the_stages_own_minutes() -> None:
    assert shares(100.0, [1.0, 3.0, 5.0], [None, None, 20.0]) == [20.0, 60.0, 20.0]
    assert shares(None, [1.0, 2.0], [None, 60.0]) == [None, 60.0]
    assert shares(10.0, [1.0], [30.0]) == [30.0]
    assert shares(10.0, [0.0, 0.0], [None, None]) == [5.0, 5.0]


def test_ranking_drops_noise_but_keeps_fields_that_only_matter_in_a_pair() -> None:
    rows = 20_000
    table = pl.DataFrame({"feature": ["strong", "pairA", "pairB", "noise", "weak"],
                          "normalized_mi": [0.02, 0.0001, 0.0, 0.0004, 0.002],
                          "cardinality": [10, 3, 50, 80, 5]})
    pairs = pl.DataFrame({"feature_a": ["pairA", "noise"], "feature_b": ["pairB", "strong"],
                          "interaction": [0.01, 0.002]})
    dropped, _ = uninformative(table, pairs, rows, 0.01, 4.0, True)
    assert dropped == ["noise"]  # its pair scores below the pair's own chance level
    assert uninformative(table, pairs, rows, 0.01, 4.0, False)[0] == ["pairA", "pairB", "noise"]
    assert chance_spread(80, rows) == pytest.approx(math.sqrt(2 * 79) / (2 * rows))
    # no more cells than rows can be observed: a pair of two large fields is judged by what it can show
    assert chance_spread(10**7, rows) == pytest.approx(math.sqrt(2 * (rows - 1)) / (2 * rows))


def test_a_kept_search_is_fixed_and_a_new_kind_keeps_the_settings_it_shares(tmp_path: Path) -> None:
    from ctrlab.embeddings import EMBEDDINGS

    recipe = {"gate": {"kind": "optfs", "stages": ["search", "retrain"], "from_run": None},
              "embedding": {"kind": "per_field", "dim": 8, "init_std": 0.01, "sparse": True}}
    settled = settle_searches(copy.deepcopy(recipe), tmp_path)
    assert settled["gate"] == {"kind": "optfs", "stages": ["retrain"], "from_run": str(tmp_path.resolve())}
    assert settled["embedding"] == recipe["embedding"]
    dnis = EMBEDDINGS.get("dnis").config.model_validate({"kind": "dnis", "search_epochs": 3})
    merged = carried_over(recipe["embedding"], dnis)
    assert merged["kind"] == "dnis" and merged["dim"] == 8 and merged["search_epochs"] == 3
    assert merged["init_std"] == 0.01


def test_a_data_seed_keeps_the_data_when_the_training_seed_changes() -> None:
    from ctrlab.data.pipeline import load_raw_splits

    dataset = validate_recipe({"name": "d", "dataset": {"synthetic": {"rows": 500}, "seed": 11},
                               "model": {"block": "lr"}}).dataset
    first = load_raw_splits(dataset, 1).frames["test"]
    assert first.equals(load_raw_splits(dataset, 2).frames["test"])
    other = dataset.model_copy(update={"seed": None})
    assert not load_raw_splits(other, 1).frames["test"].equals(load_raw_splits(other, 2).frames["test"])


def test_a_sweep_over_a_search_knob_searches_again_in_each_trial_and_so_do_the_searches_after_it(
        tmp_path: Path) -> None:
    from ctrlab.config.sweep import ParamSpace
    from ctrlab.pipeline.stages.sweep import researched

    recipe = small_recipe(tmp_path, [{"stage": "retrain"}])
    del recipe["pipeline"]
    recipe["features"]["crosses"] = {"pairs": "all"}
    recipe["gate"] = {"kind": "optfs", "stages": ["retrain"], "from_run": str(tmp_path)}
    recipe["interaction"] = {"kind": "optinter", "stages": ["retrain"], "from_run": str(tmp_path)}
    recipe["embedding"] = {"kind": "dnis", "dim": 4, "stages": ["retrain"], "from_run": str(tmp_path)}
    lr = {"train.optimizer.lr": ParamSpace(type="float", low=1e-4, high=1e-2)}
    assert researched(copy.deepcopy(recipe), lr) == recipe  # nothing searched again
    knob = {"interaction.arch_lr": ParamSpace(type="float", low=1e-3, high=1e-1)}
    again = researched(copy.deepcopy(recipe), knob)
    assert again["gate"] == recipe["gate"]  # before the knob's section: fixed
    assert again["interaction"]["stages"] == ["search", "retrain"] and again["interaction"]["from_run"] is None
    assert again["embedding"]["stages"] == ["search", "retrain"] and again["embedding"]["from_run"] is None


def test_the_plan_is_printed_up_front_in_plain_trainings_then_in_minutes_with_each_stage_s_share(
        tmp_path: Path, capsys) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stages = [{"stage": "rank"}, {"stage": "retrain", "seeds": [3, 4]},
              {"stage": "register", "name": "plan-test", "tracking_uri": store}]
    path = write_recipe(tmp_path, small_recipe(tmp_path, stages, tracking={"enabled": True, "uri": store}))
    assert main(["pipeline", str(path), "pipeline.hours=0.5"]) == 0
    err = capsys.readouterr().err
    plans = [block for block in err.split("pipeline pipe: ")[1:]]
    assert len(plans) == 2 and "before the plain model has run" in plans[0] and "measured" in plans[1]
    first = {line.split()[1]: line for line in plans[0].splitlines()[1:5]}
    assert "1.00 x plain" in first["plain"] and "2.00 x plain" in first["retrain"]
    shares = [float(line.split("budget")[1].split("%")[0]) for line in first.values()]
    assert sum(shares) == pytest.approx(100.0, abs=0.5) and max(shares) == shares[2]  # the retrain, two trainings
    assert " min   budget " in plans[1].splitlines()[1]


def test_once_the_hours_are_spent_the_optional_stages_are_skipped_and_the_retrain_still_runs(tmp_path: Path) -> None:
    stages = [{"stage": "rank"}, SWEEP, {"stage": "retrain", "seeds": [9]}]
    recipe = small_recipe(tmp_path, stages)
    recipe["pipeline"]["hours"] = 1e-5  # 0.036 s: spent by the plain model
    result = run_pipeline(write_recipe(tmp_path, recipe), console=QUIET)
    assert [(r.stage, r.outcome) for r in result.records] == [
        ("plain", "kept"), ("rank", "skipped"), ("sweep", "skipped"), ("retrain", "final")]
    assert result.records[1].reason == "the time budget was spent"
    assert not (tmp_path / "out" / "stages" / "02-sweep").exists()

"""`ctrlab register` never registers a run that cannot be served: the run is loaded and scored before anything is
logged, and a model name or alias MLflow would refuse is refused first. Each failure is checked through a real
`python -m ctrlab register` process: exit status 2, one `error:` line on stderr naming the file or option, and a
tracking store with no new run, no logged model and no registered model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ctrlab.errors import CtrlabError
from ctrlab.serve.registry import check_alias, check_model_name
from tiny import train_small_synthetic_run

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished run tracked in a fresh SQLite store: (run directory, tracking URI)."""
    root = tmp_path_factory.mktemp("register")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _, result = train_small_synthetic_run(root, "register_t", {"uri": uri})
    return result.output_dir, uri


def _register(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "ctrlab", "register", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def _store(uri: str) -> dict[str, Any]:
    """What the tracking store holds: run ids, logged models, registered models."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {r.info.run_id for r in client.search_runs(experiments)} if experiments else set()
    logged = client.search_logged_models(experiment_ids=experiments) if experiments else []
    return {"runs": runs, "logged_models": len(logged),
            "registered": sorted(m.name for m in client.search_registered_models())}


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error:") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def _copy_run(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target)
    return target


def test_truncated_weights_are_refused_before_anything_is_logged(trained, tmp_path: Path) -> None:
    run_dir, uri = trained
    broken = _copy_run(run_dir, tmp_path / "run")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _store(uri)
    result = _register(uri, str(broken), "--name", "broken", "--alias", "champion")
    _assert_one_line_error(result, "model.safetensors", "truncated")
    assert _store(uri) == before and "broken" not in before["registered"]


@pytest.mark.parametrize("damage", ["empty", "not_safetensors", "wrong_shape", "nan"])
def test_damaged_weights_name_the_file(trained, tmp_path: Path, damage: str) -> None:
    run_dir, uri = trained
    broken = _copy_run(run_dir, tmp_path / "run")
    weights = broken / "model.safetensors"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "not_safetensors":
        weights.write_bytes(b"\x00" * 8 + b"PK\x03\x04 this is a zip file, not weights" * 10)
    else:
        state = load_file(str(weights))
        key = next(k for k, v in state.items() if v.dim() == 2)
        if damage == "wrong_shape":
            state[key] = torch.zeros(state[key].shape[0] + 3, state[key].shape[1])
        else:
            state[key] = torch.full_like(state[key], float("nan"))
        save_file(state, str(weights))
    # In process (fast): the same loader `ctrlab register` and `ctrlab serve` use.
    from ctrlab.serve import Predictor

    with pytest.raises(CtrlabError, match="model.safetensors"):
        Predictor.from_run(broken)
    if damage == "wrong_shape":  # and once through the CLI
        before = _store(uri)
        _assert_one_line_error(_register(uri, str(broken), "--name", "broken"), "model.safetensors", "shape")
        assert _store(uri) == before


def test_invalid_metrics_json_is_one_line(trained, tmp_path: Path) -> None:
    run_dir, uri = trained
    broken = _copy_run(run_dir, tmp_path / "run")
    (broken / "metrics.json").write_text('{"mlflow_run_id": "abc", "test": {"auc": 0.6')
    before = _store(uri)
    _assert_one_line_error(_register(uri, str(broken), "--name", "broken"), "metrics.json")
    assert _store(uri) == before
    (broken / "metrics.json").write_text("[1, 2]")
    from ctrlab.serve.registry import _run_id_from_metrics

    with pytest.raises(CtrlabError, match="metrics.json"):
        _run_id_from_metrics(broken / "metrics.json")


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--name", "team/ctr", "--name:"),
    ("--alias", "v2", "--alias:"),
])
def test_names_mlflow_would_refuse_are_refused_first(trained, option: str, value: str, fragment: str) -> None:
    run_dir, uri = trained
    before = _store(uri)
    args = ["--name", "good_name", "--alias", "champion"]
    args[args.index(option) + 1] = value
    _assert_one_line_error(_register(uri, str(run_dir), *args), fragment)
    assert _store(uri) == before


def test_a_good_run_registers(trained) -> None:
    run_dir, uri = trained
    before = _store(uri)
    result = _register(uri, str(run_dir), "--name", "register_ok", "--alias", "champion")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["name"] == "register_ok" and out["version"] == "1" and out["alias"] == "champion"
    after = _store(uri)
    assert after["registered"] == sorted([*before["registered"], "register_ok"])
    assert after["runs"] == before["runs"]  # logged into the run that trained it
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("register_ok", "champion").version) == "1"


# ----------------------------------------------------------------- the name rules against MLflow's own validators
def _mlflow_accepts_name(name: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name as file_store_rule
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        file_store_rule(name)
    except MlflowException:
        return False
    return len(name) <= 256


def _mlflow_accepts_alias(alias: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException:
        return False
    return True


def _accepts(check: Any, value: str) -> bool:
    try:
        check(value)
    except CtrlabError as error:
        assert "\n" not in error.message
        return False
    return True


NAME_TEXT = st.text(alphabet=st.sampled_from(list("ab_-. /:%\\?@#xyzV19") + ["\n", "\u00e9", "\u4e2d"]), max_size=12)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(NAME_TEXT)
def test_name_rule_is_at_least_as_strict_as_mlflow(name: str) -> None:
    if _accepts(check_model_name, name):
        assert _mlflow_accepts_name(name), name


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(NAME_TEXT, st.from_regex(r"[vV]\d{1,3}", fullmatch=True), st.sampled_from(["latest", "LATEST"])))
def test_alias_rule_is_mlflows(alias: str) -> None:
    assert _accepts(check_alias, alias) == _mlflow_accepts_alias(alias), alias


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a:b", "a%b", "..", ".", "../x", "a\\b", "a?b", "x" * 257])
def test_bad_names(name: str) -> None:
    assert not _accepts(check_model_name, name)


@pytest.mark.parametrize("name", ["ctr-model", "CTR model v2", "a.b", "team@ctr", "x" * 256])
def test_good_names(name: str) -> None:
    assert _accepts(check_model_name, name) and _mlflow_accepts_name(name)

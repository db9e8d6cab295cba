"""Exit statuses tell the truth: every command's failure path through a real ``python -m ctrlab`` process exits
non-zero with one stderr line and no traceback; Ctrl-C exits 130 and SIGTERM 143, each with one line, and leave no
output folder or leftover behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import ctrlab.cli as cli
from tiny import tiny_recipe, write_tiny_splits


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CTRLAB_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ctrlab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


@pytest.fixture()
def workdir(tmp_path: Path, cache_dir: Path) -> Path:
    data = write_tiny_splits(tmp_path / "data")
    recipe = tiny_recipe(tmp_path, data, tracking={"enabled": False})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    (tmp_path / "nosweep.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    os.mkfifo(tmp_path / "pipe.yaml")  # a reader of a FIFO nobody writes would wait forever
    os.mkfifo(tmp_path / "pipe.csv")
    return tmp_path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FAILURES = {
    "train: missing recipe": (["train", "missing.yaml"], "missing.yaml: recipe file not found"),
    "train: unknown override": (["train", "recipe.yaml", "train.epoch=3"], "unknown key 'train.epoch'"),
    "validate: bad value": (["validate", "recipe.yaml", "train.batch_size=-1"], "train.batch_size"),
    "validate: a name that is no folder name": (["validate", "recipe.yaml", "name=.."], "name: String should match"),
    "sweep: no sweep section": (["sweep", "nosweep.yaml"], "recipe has no sweep section"),
    "rank: missing data file": (["rank", "nowhere.csv", "--no-track"], "nowhere.csv"),
    "explain: missing run": (["explain", "no-such-run"], "no-such-run"),
    "register: missing run": (["register", "no/such/run", "--name", "m"], "run directory not found"),
    "train: nobody at the tracking server": (["train", "recipe.yaml", "tracking.enabled=true",
                                              f"tracking.uri=http://127.0.0.1:{_closed_port()}"],
                                             "tracking.uri: cannot reach"),
    "train: not a tracking store": (["train", "recipe.yaml", "tracking.enabled=true", "tracking.uri=garbage://x"],
                                    "tracking.uri: cannot use garbage://x"),
    "serve: nobody at the tracking server": (["serve", "m", "--tracking-uri", f"http://127.0.0.1:{_closed_port()}"],
                                             "--tracking-uri: cannot reach"),
    "serve: absurd worker count": (["serve", "m", "--workers", "100000"], "--workers: must be between 1 and"),
    "validate: the recipe is a pipe": (["validate", "pipe.yaml"], "pipe.yaml: is not a regular file"),
    "rank: the data is a pipe": (["rank", "pipe.csv", "--no-track"], "pipe.csv: is not a regular file"),
    "rank: absurd bins": (["rank", "data/train.csv", "--bins", "99999999999", "--no-track"], "--bins must be"),
    "train: a learning rate beyond float32": (["train", "recipe.yaml", "train.optimizer.lr=1e39"],
                                              "train.optimizer.lr: Input should be less than or equal to 1000"),
    "train: output under /proc": (["train", "recipe.yaml", "output_dir=/proc/ctrlab-out"], "cannot be written"),
    "serve: not a tracking store": (["serve", "m", "--tracking-uri", "foo://bar"],
                                    "--tracking-uri: cannot use foo://bar"),
    "explain: negative rows": (["explain", "no-run", "--rows", "-1"], "--rows: must be at least 1"),
    "datasets: unknown option": (["datasets", "list", "--colour"], "No such option: --colour"),
    "unknown command": (["trian", "recipe.yaml"], "No such command 'trian'"),
    "missing argument": (["train"], "Missing argument"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_every_commands_failure_exits_2_with_one_line(workdir: Path, case: str) -> None:
    args, needle = FAILURES[case]
    done = _run(args, workdir)
    line = _one_line(done.stderr)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert line.startswith("error: ") and needle in line, line
    assert done.stdout == ""
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143,
                                                                                       "terminated")])
def test_a_signal_during_training_exits_with_its_status_and_one_line(workdir: Path, sig: int, code: int,
                                                                     word: str) -> None:
    env = {**os.environ}
    args = [sys.executable, "-m", "ctrlab", "train", "recipe.yaml", "train.epochs=500", "train.batch_size=8",
            "train.early_stopping=null", "train.progress=true"]
    process = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(workdir.glob(".out.*.partial")):  # the run folder is being built: training has started
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith(word), err
    assert not any(line.startswith(("error", "interrupted", "terminated")) for line in lines[:-1]), err
    assert out == ""
    assert not (workdir / "out").exists()
    assert not [p.name for p in workdir.iterdir() if p.name.startswith(".out.")]


def test_an_internal_error_is_one_line_and_exit_1_unless_debugging(capsys, monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr("ctrlab.config.loader.load_recipe", broken)
    monkeypatch.delenv("CTRLAB_DEBUG", raising=False)
    assert cli.main(["validate", "any.yaml"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "internal error (ZeroDivisionError: a bug, not a user error)" in line and "CTRLAB_DEBUG=1" in line
    monkeypatch.setenv("CTRLAB_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["validate", "any.yaml"])


def test_a_commands_own_exit_status_is_the_process_status(monkeypatch) -> None:
    """typer returns an Exit raised inside a command as a plain value in non-standalone mode; it once got lost."""
    import typer

    def exits(*args: object, **kwargs: object) -> None:
        raise typer.Exit(7)

    monkeypatch.setattr("ctrlab.config.loader.load_recipe", exits)
    assert cli.main(["validate", "any.yaml"]) == 7


def test_results_on_stdout_are_strict_json(capsys, tmp_path, cache_dir) -> None:
    """A metric that is undefined reaches stdout (and metrics.json) as null, never as a bare NaN."""
    import json

    from ctrlab.utils.io import json_text

    text = json_text({"test": {"auc": float("nan"), "logloss": float("inf")}, "n": [1.5, float("-inf")]})
    assert json.loads(text) == {"test": {"auc": None, "logloss": None}, "n": [1.5, None]}
    cli._print_json({"auc": float("nan")})
    assert json.loads(capsys.readouterr().out) == {"auc": None}

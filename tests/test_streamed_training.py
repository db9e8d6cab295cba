"""Training on streamed splits (``dataset.loading: stream``): the trainer reads row groups through the shuffle
buffer, on one process and on two (each rank its own row groups, the same number of steps on every rank), and what
a streamed run cannot do is a one-line error naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from rich.console import Console

from ctrlab.cli import main
from ctrlab.config.loader import validate_recipe
from ctrlab.train.run import train_recipe
from tiny import one_line_error

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def clicks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40,000 rows: a click probability from two categorical fields' effects, their interaction and a count."""
    rng = np.random.default_rng(5)
    n = 40_000
    a, b = rng.integers(0, 30, n), rng.integers(0, 50, n)
    x = rng.poisson(4.0, n)
    effect_a, effect_b, pair = rng.normal(0, 1, 30), rng.normal(0, 1, 50), rng.normal(0, 1, (30, 50))
    logit = -1.2 + effect_a[a] + effect_b[b] + 0.8 * pair[a, b] + 0.2 * (x - 4)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    path = tmp_path_factory.mktemp("stream") / "clicks.parquet"
    pl.DataFrame({"label": label, "a": [f"a{v}" for v in a], "b": [f"b{v}" for v in b],
                  "x": x.astype(np.float64)}).write_parquet(path)
    return path


def _recipe(data: Path, out: Path, **train: Any) -> dict[str, Any]:
    return {
        "name": "streamed", "seed": 3, "output_dir": str(out),
        "dataset": {"path": str(data), "label": "label", "split": {"kind": "random"}, "loading": "stream",
                    "chunk_rows": 1024, "shuffle_buffer_rows": 8192},
        "features": {"categorical": ["a", "b"], "numeric": [{"name": "x", "transform": "log"}]},
        "embedding": {"dim": 8},
        "model": {"block": "deepfm", "mlp": {"hidden": [32]}},
        "train": {"epochs": 3, "batch_size": 1024, "progress": False, "device": "cpu", "num_threads": 1,
                  "optimizer": {"lr": 3e-3}, **train},
        "tracking": {"enabled": False},
    }


def test_a_streamed_run_trains_reproducibly(clicks: Path, tmp_path: Path, cache_dir: Path) -> None:
    first = train_recipe(validate_recipe(_recipe(clicks, tmp_path / "one")), console=QUIET)
    again = train_recipe(validate_recipe(_recipe(clicks, tmp_path / "two")), console=QUIET)
    assert first.metrics["test"]["auc"] > 0.7
    assert first.metrics["test"] == again.metrics["test"]  # the epochs' orders follow (seed, epoch) alone
    rows = first.metrics["rows"]
    assert sum(rows.values()) == 40_000 and rows["train"] > 30_000
    predictions = pl.read_parquet(first.output_dir / "test_predictions.parquet")
    assert predictions.height == rows["test"]


def test_a_streamed_run_on_two_processes_matches_one(clicks: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CTRLAB_CACHE_DIR": str(tmp_path / "cache")}
    metrics = []
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        path = tmp_path / f"p{nproc}.yaml"
        path.write_text(yaml.safe_dump(_recipe(clicks, out, epochs=6)))
        done = subprocess.run([sys.executable, "-m", "ctrlab", "train", str(path), "--nproc", str(nproc)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics.append(json.loads((out / "metrics.json").read_text()))
    one, two = metrics
    assert two["processes"] == 2 and two["rows"] == one["rows"]
    assert abs(one["test"]["auc"] - two["test"]["auc"]) < 0.01, (one["test"], two["test"])


def _fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: dict[str, Any], *args: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path), *args])
    return one_line_error(code, capsys.readouterr().err, progress_before=True)


def test_searches_on_streamed_splits_are_refused(clicks: Path, tmp_path: Path, cache_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(clicks, tmp_path / "out")
    recipe["gate"] = {"kind": "optfs"}
    line = _fails(tmp_path, capsys, recipe)
    assert "gate: searches hold the splits in memory, and this run streams them (dataset.loading)" in line
    assert not (tmp_path / "out").exists()


def test_fewer_row_groups_than_processes_names_chunk_rows(clicks: Path, tmp_path: Path) -> None:
    recipe = _recipe(clicks, tmp_path / "out")
    recipe["dataset"]["chunk_rows"] = 100_000  # one row group a split
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "CTRLAB_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "ctrlab", "train", str(path), "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: dataset.chunk_rows: the train split has 1 row group(s), "
                                                     "fewer than the 2 ranks"), done.stderr

"""Tiny made-up data and recipes shared by the CLI-level tests (imported by test modules; not a test file)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

HEADER = "label,a,b,x,t"


def tiny_rows(n: int, seed: int) -> list[str]:
    """CSV rows: label 0/1, categorical a (5 values), b (7 values), numeric x, time t."""
    rng = random.Random(seed)
    return [f"{rng.randint(0, 1)},a{rng.randint(0, 4)},b{rng.randint(0, 6)},{rng.random() * 10:.3f},{i}"
            for i in range(n)]


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def write_tiny_splits(path: Path) -> Path:
    """train/valid/test CSVs plus all.csv (for single-file splits) under ``path``."""
    for name, n, seed in (("train", 200, 1), ("valid", 60, 2), ("test", 60, 3), ("all", 300, 4)):
        write_csv(path / f"{name}.csv", tiny_rows(n, seed))
    return path


def tiny_recipe(tmp_path: Path, data_dir: Path, **sections: Any) -> dict[str, Any]:
    """A recipe over the tiny splits that trains one small epoch; ``sections`` replace whole sections."""
    recipe: dict[str, Any] = {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "dataset": {"train": "train.csv", "valid": "valid.csv", "test": "test.csv", "data_dir": str(data_dir),
                    "label": "label"},
        "features": {"categorical": ["a", "b"], "numeric": [{"name": "x", "transform": "log"}]},
        "model": {"block": "deepfm", "mlp": {"hidden": [8]}},
        "embedding": {"dim": 4},
        "train": {"epochs": 1, "batch_size": 256, "progress": False, "device": "cpu"},
    }
    recipe.update(sections)
    return recipe


def one_line_error(code: int, err: str, *needles: str, progress_before: bool = False) -> str:
    """Exit status 2 and exactly one non-empty stderr line, ``error: ...``, containing every needle.

    ``progress_before``: the failure comes after the run has started, so progress lines may precede the error;
    the error is still the single last line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if progress_before:
        assert not any(line.startswith("error") for line in lines[:-1]), err
        lines = lines[-1:]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert code == 2, (code, line)
    return line


def train_small_synthetic_run(root: Path, name: str, tracking: dict[str, Any]) -> tuple[Any, Any]:
    """Train the small synthetic DeepFM the registry and serving tests share (4 categorical and 2 numeric fields,
    one epoch) into ``root / "run"``, with its cache under ``root``; returns (recipe, run result)."""
    import os

    from rich.console import Console

    from ctrlab.config.loader import validate_recipe
    from ctrlab.train.run import train_recipe

    previous = os.environ.get("CTRLAB_CACHE_DIR")
    os.environ["CTRLAB_CACHE_DIR"] = str(root / "cache")
    try:
        recipe = validate_recipe({
            "name": name, "output_dir": str(root / "run"),
            "dataset": {"synthetic": {"rows": 6000, "categorical_fields": 4, "numeric_fields": 2,
                                       "informative_fields": 2, "interaction_pairs": 1, "numeric_informative": 1}},
            "model": {"block": "deepfm", "mlp": {"hidden": [16]}}, "embedding": {"dim": 4},
            "train": {"epochs": 1, "progress": False, "device": "cpu"}, "tracking": tracking,
        })
        return recipe, train_recipe(recipe, console=Console(quiet=True))
    finally:
        if previous is None:
            os.environ.pop("CTRLAB_CACHE_DIR", None)
        else:
            os.environ["CTRLAB_CACHE_DIR"] = previous


def terminate_once_saved(process: subprocess.Popen[str], state: Path, wait: float = 300) -> str:
    """SIGTERM ``process`` (a resumable ``ctrlab train``) once its training state exists at ``state``, i.e. once
    an epoch has finished; its stderr after it ended. Fails when no epoch finishes within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), f"no epoch finished within {wait:.0f} s"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    return stderr

"""Tiny made-up data and recipes shared by the CLI-level tests (imported by test modules; not a test file)."""

from __future__ import annotations

import random
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

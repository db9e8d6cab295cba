"""Record what OptEmbed and DNIS find and predict on a small synthetic recipe, so that a test can check that moving
them onto the architecture-search framework changed nothing (run with the code *before* a change; not a test file).

    .venv/bin/python tests/record_search_outcomes.py

writes ``tests/recorded/search_outcomes.json``: per method the recipe's embedding section, the saved dims, the row
mask (kept rows per table, and their ids) and the test predictions.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from ctrlab.config.loader import validate_recipe  # noqa: E402
from ctrlab.train.run import train_recipe  # noqa: E402
from embedding_search_recipe import synthetic_recipe  # noqa: E402

RECORDED = Path(__file__).parent / "recorded" / "search_outcomes.json"

#: method -> embedding section of the recorded recipe (small: seconds on one thread)
EMBEDDINGS: dict[str, dict[str, Any]] = {
    # warmup_epochs 0 and fallback_tolerance null: the paper's supernet and search, as recorded (both settings were
    # added, with other defaults, after the recording)
    "optembed": {"kind": "optembed", "stages": ["supernet", "search", "retrain"], "supernet_epochs": 2,
                 "threshold_init": 0.0, "threshold_lr": 1e-2, "sparsity_weight": 1e-3, "generations": 2, "keep": 2,
                 "mutation": 2, "crossover": 2, "parents": 3, "warmup_epochs": 0, "fallback_tolerance": None},
    "dnis": {"kind": "dnis", "stages": ["search", "retrain"], "search_epochs": 2, "arch_lr": 1e-2, "budget": 0.5},
}


def outcome(run_dir: Path) -> dict[str, Any]:
    search_dir = run_dir / "embedding_search"
    dims = json.loads((search_dir / "dims.json").read_text())
    rows: dict[str, list[int]] = {}
    if (search_dir / "row_mask.safetensors").is_file():
        for name, mask in load_file(str(search_dir / "row_mask.safetensors")).items():
            rows[name] = [int(i) for i in mask.nonzero().flatten().tolist()]
    predictions = pl.read_parquet(run_dir / "test_predictions.parquet")["probability"].to_list()
    return {"dims": dims, "kept_rows": rows, "test_predictions": predictions}


def record(cache_dir: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, embedding in EMBEDDINGS.items():
        raw = synthetic_recipe(work / method, embedding, epochs=2)
        raw["dataset"]["cache_dir"] = str(cache_dir)
        recipe = validate_recipe(raw)
        result = train_recipe(recipe)
        out[method] = {"embedding": embedding, **outcome(result.output_dir)}
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        data = record(Path(tmp) / "cache", Path(tmp))
    RECORDED.parent.mkdir(exist_ok=True)
    RECORDED.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RECORDED}")

"""`ctrlab explain`: attention heat maps of a trained AutoInt run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from ctrlab.cli import main
from ctrlab.config.loader import validate_recipe
from ctrlab.train.run import train_recipe


def _run(tmp_path: Path, block: str) -> Path:
    model = {"block": block, "layers": 2, "heads": 2, "attention_dim": 8} if block == "autoint" else {"block": block}
    recipe = validate_recipe({
        "name": "ex", "output_dir": str(tmp_path / block),
        "dataset": {"synthetic": {"rows": 3000, "categorical_fields": 4, "numeric_fields": 1, "informative_fields": 2,
                                   "interaction_pairs": 1, "numeric_informative": 1}},
        "model": model, "embedding": {"dim": 4},
        "train": {"epochs": 1, "progress": False, "device": "cpu"}, "tracking": {"enabled": False},
    })
    return train_recipe(recipe, console=Console(quiet=True)).output_dir


def test_explain_writes_one_heat_map_per_layer(tmp_path: Path, cache_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ctrlab.serve.explain import attention_maps
    from ctrlab.serve.predictor import Predictor

    run = _run(tmp_path, "autoint")
    assert main(["explain", str(run), "--rows", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    png = Path(result["output"])
    assert result["layers"] == 2 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predictor = Predictor.from_run(run)
    from ctrlab.data.pipeline import load_raw_splits

    rows = load_raw_splits(predictor.recipe.dataset, predictor.recipe.seed).frames["test"].head(50)
    maps = attention_maps(predictor, rows)
    assert [m.shape for m in maps] == [(5, 5), (5, 5)]
    np.testing.assert_allclose(maps[0].sum(axis=1), 1.0, atol=1e-5)  # each query field's attention sums to 1


def test_explain_refuses_models_without_attention(tmp_path: Path, cache_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path, "fm")
    assert main(["explain", str(run)]) == 2
    assert "model.block 'fm' has no attention to explain" in capsys.readouterr().err

"""The shipped recipes on the real data in ../shared/datasets (skipped without it, failing under CI).

These are short versions of the recipes (few epochs) that check the whole path works on real files and learns;
the full-length numbers are measured with `ctrlab train recipes/...` and reported in the README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from ctrlab.config.loader import load_recipe
from ctrlab.data.pipeline import load_raw_splits
from ctrlab.serve import Predictor
from ctrlab.train.run import train_recipe

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)


def _train(recipe: str, tmp_path: Path, data_dir: Path, *overrides: str):
    loaded = load_recipe(REPO / "recipes" / recipe, [f"output_dir={tmp_path / 'run'}", "train.progress=false",
                                                    "train.device=cpu", *overrides])
    return loaded, train_recipe(loaded, data_dir=data_dir, console=QUIET)


def test_frappe_deepfm_learns_in_three_epochs(tmp_path: Path, shared_data_dir: Path, cache_dir: Path) -> None:
    recipe, result = _train("frappe_deepfm.yaml", tmp_path, shared_data_dir, "train.epochs=3")
    assert result.metrics["rows"] == {"train": 202027, "valid": 57722, "test": 28860}
    assert result.metrics["test"]["auc"] > 0.96
    assert 0.9 < result.metrics["test"]["gauc"] < result.metrics["test"]["auc"] + 0.02
    # Reload from the artefacts and score the raw test file: identical to the run's own predictions.
    predictor = Predictor.from_run(result.output_dir)
    raw = load_raw_splits(recipe.dataset, recipe.seed, shared_data_dir).frames["test"]
    import polars as pl

    saved = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert np.array_equal(predictor.predict(raw.drop("label")), saved)


@pytest.mark.parametrize("recipe",
                         ["criteo_sample_deepfm.yaml", "criteo_sample_dcnv2.yaml", "avazu_sample_deepfm.yaml"])
def test_sample_recipes_train(recipe: str, tmp_path: Path, shared_data_dir: Path, cache_dir: Path) -> None:
    _, result = _train(recipe, tmp_path, shared_data_dir, "train.epochs=3")
    assert result.metrics["test"]["auc"] > 0.6


def test_ml100k_time_split_with_sequences_and_gauc(tmp_path: Path, shared_data_dir: Path, cache_dir: Path) -> None:
    from ctrlab.config.loader import validate_recipe

    recipe = validate_recipe({
        "name": "ml100k", "output_dir": str(tmp_path / "run"), "dataset": {"card": "ml100k"},
        "embedding": {"dim": 8}, "model": {"block": "deepfm", "mlp": {"hidden": [64]}},
        "train": {"epochs": 2, "progress": False, "device": "cpu", "metrics": ["auc", "logloss", "gauc"]},
    })
    result = train_recipe(recipe, data_dir=shared_data_dir, console=QUIET)
    assert sum(result.metrics["rows"].values()) == 100000
    assert result.metrics["test"]["auc"] > 0.6 and result.metrics["test"]["gauc"] > 0.5


def test_criteo_sample_optinter_runs_end_to_end_on_a_ranked_pair_list(tmp_path: Path, shared_data_dir: Path,
                                                                       cache_dir: Path) -> None:
    """The Criteo sample's 39 fields make 741 pairs; the recipe searches the 20 best of a ranking's pairs.csv."""
    import csv

    from ctrlab.ranking.rank import RankingOptions
    from ctrlab.ranking.run import run_rank

    recipe_path = REPO / "recipes" / "criteo_sample_mlp_optinter.yaml"
    ranked = run_rank(recipe_path, [], RankingOptions(), output_dir=tmp_path / "rank", data_dir=shared_data_dir,
                      track=False, console=QUIET)
    pairs = tmp_path / "rank" / "pairs.csv"
    assert pairs in ranked.files
    recipe, result = _train("criteo_sample_mlp_optinter.yaml", tmp_path, shared_data_dir,
                            f"features.crosses.ranking.path={pairs}", "train.epochs=2", "interaction.search_epochs=2")
    layout_pairs = recipe.features.crosses.ranking.top
    with open(result.output_dir / "interaction_search" / "pairs.csv", newline="") as handle:
        chosen = list(csv.DictReader(handle))
    assert len(chosen) == layout_pairs == 20
    summary = result.metrics["interaction_search"]
    assert summary["pairs"] == 20 and summary["pairs_memorize"] + summary["pairs_factorize"] + \
        summary["pairs_naive"] == 20
    assert result.metrics["test"]["auc"] > 0.6
    predictor = Predictor.from_run(result.output_dir)
    raw = load_raw_splits(recipe.dataset, recipe.seed, shared_data_dir).frames["test"]
    import polars as pl

    saved = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert np.array_equal(predictor.predict(raw.drop("label")), saved)

"""Every shipped recipe validates, and its resolved form round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrlab.cli import main
from ctrlab.config.loader import load_recipe, recipe_to_dict, validate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_the_required_recipes_are_shipped() -> None:
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "frappe_deepfm.yaml", "criteo_sample_deepfm.yaml",
            "avazu_sample_deepfm.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_round_trips(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe(path)
    assert validate_recipe(recipe_to_dict(recipe), "round trip") == recipe
    assert main(["validate", str(path)]) == 0
    assert f"name: {recipe.name}" in capsys.readouterr().out

"""What the stages that add a searching section (OptFS, OptInter, an embedding search) share: the proposal (the
model before the stage with the stage's section, carrying over the settings the new kind shares with the old) and
the estimate of a search's time."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ctrlab.pipeline.base import StageContext
from ctrlab.pipeline.recipes import carried_over


def with_section(context: StageContext, section: str, config: BaseModel) -> dict[str, Any]:
    """The model before the stage, with ``section`` replaced by the stage's ``config`` (see
    :func:`~ctrlab.pipeline.recipes.carried_over`)."""
    recipe = context.base_recipe()
    recipe[section] = carried_over(recipe.get(section), config)
    return recipe


def search_seconds(search_epochs: int, plain_seconds: float, epoch_seconds: float, slowdown: float) -> float:
    """A search of ``search_epochs`` epochs, each ``slowdown`` times a plain epoch, then the final training."""
    return search_epochs * epoch_seconds * slowdown + plain_seconds


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV a search wrote, as rows (empty when it is missing)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))

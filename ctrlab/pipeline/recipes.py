"""Recipe edits the stages share: fixing what a kept stage searched, and carrying a section's settings over to a
new kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

SEARCHABLE_SECTIONS = ("gate", "interaction", "embedding")


def settle_searches(recipe: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``recipe`` with every searching section (one that lists ``stages``) set to re-train what ``run_dir`` found:
    ``stages: [<its last stage>]`` and ``from_run: run_dir``. A kept stage's findings are fixed this way, so later
    stages build on them instead of searching again (every run directory holds the outputs of all its searches,
    those it read from an earlier run included)."""
    for section in SEARCHABLE_SECTIONS:
        config = recipe.get(section)
        if isinstance(config, dict) and isinstance(config.get("stages"), list) and config["stages"]:
            config["stages"] = [config["stages"][-1]]
            config["from_run"] = str(run_dir.resolve())
    return recipe


def carried_over(before: dict[str, Any] | None, after: BaseModel) -> dict[str, Any]:
    """The section ``after`` (a stage's proposal) as a mapping, with the settings of ``before`` (the recipe's
    section of another kind) that ``after``'s kind also has and the stage did not set: e.g. an embedding search
    keeps the recipe's ``dim`` and ``init_std`` unless the stage names its own."""
    proposal = after.model_dump(mode="json", exclude_unset=True)
    fields = type(after).model_fields
    inherited = {key: value for key, value in (before or {}).items()
                 if key in fields and key not in proposal and key not in ("stages", "from_run")}
    discriminator = next((key for key in ("kind", "block") if key in fields), None)
    if discriminator is not None:
        proposal[discriminator] = getattr(after, discriminator)
    return {**inherited, **proposal}

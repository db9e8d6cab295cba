"""Stage ``optinter``: search how to model each pair of the kept fields, memorised, factorised or naive, with
OptInter (Lyu et al. 2022, "Memorize, Factorize, or be Naive"), run as the recipe's ``interaction``
(:mod:`ctrlab.search.optinter`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from pydantic import Field

from ctrlab.config.features import CrossesConfig
from ctrlab.config.parts import InteractionConfig
from ctrlab.interactions import INTERACTIONS
from ctrlab.pipeline.base import PipelineStage, StageContext, StageResult, register_stage
from ctrlab.pipeline.searching import read_csv_rows, search_seconds, with_section
from ctrlab.pipeline.stage_config import StageConfigBase


def _optinter() -> InteractionConfig:
    return cast(InteractionConfig, INTERACTIONS.get("optinter").config(kind="optinter"))


class OptInterStageConfig(StageConfigBase):
    """Propose the model before this stage with the pair layer ``interaction`` (default: OptInter with its
    defaults) over ``crosses`` (default: every pair of categorical fields; the recipe's own crosses when it has
    some and the stage names none). After a kept OptFS stage the candidates are narrowed to the pairs of fields
    that keep values (``crosses.kept_features``)."""

    stage: Literal["optinter"]
    interaction: InteractionConfig = Field(default_factory=_optinter, description="the pair layer to search with")
    crosses: CrossesConfig = Field(default_factory=CrossesConfig, description="candidate pairs (features.crosses)")

    ORDER: ClassVar[int] = 30
    PRODUCES: ClassVar[frozenset[str]] = frozenset({"pair_methods"})


def _kept_features_file(recipe: dict[str, Any]) -> str | None:
    gate = recipe.get("gate")
    if isinstance(gate, dict) and gate.get("from_run"):
        path = Path(gate["from_run"]) / "feature_search" / "kept_features.csv"
        return str(path) if path.is_file() else None
    return None


@register_stage(OptInterStageConfig)
class OptInterStage(PipelineStage):
    """Propose the model with an OptInter pair layer (Lyu et al. 2022: per pair, a softmax over memorise / factorise /
    naive, searched bi-level, then re-trained with the argmax method), narrowed to the kept feature set."""

    name = "optinter"

    def estimate(self, config: Any, plain_seconds: float, epoch_seconds: float) -> float:
        return search_seconds(int(getattr(config.interaction, "search_epochs", 10)), 1.5 * plain_seconds,
                              epoch_seconds, 2.0)

    def run(self, context: StageContext) -> StageResult:
        config: OptInterStageConfig = context.config
        recipe = with_section(context, "interaction", config.interaction)
        features = recipe["features"]
        if features.get("crosses") is None or "crosses" in config.model_fields_set:
            features["crosses"] = config.crosses.model_dump(mode="json")
        kept = _kept_features_file(recipe)
        if kept is not None and features["crosses"].get("kept_features") is None:
            features["crosses"]["kept_features"] = kept
        candidate = context.train(recipe, "search")
        rows = read_csv_rows(candidate.run_dir / "interaction_search" / "pairs.csv")
        by_method: dict[str, list[str]] = {}
        for row in rows:
            by_method.setdefault(row["method"], []).append(f"{row['field_a']} x {row['field_b']}")
        found = candidate.metrics.get("interaction_search", {})
        decision = {"pairs": found.get("pairs", len(rows)), "memorized_rows": found.get("memorized_rows"),
                    **{f"pairs_{method}": pairs for method, pairs in sorted(by_method.items())}}
        return StageResult(candidate, decision)

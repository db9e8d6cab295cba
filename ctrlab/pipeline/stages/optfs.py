"""Stage ``optfs``: search which feature values to keep with OptFS (Lyu et al. 2023, "Optimizing Feature Set for
Click-Through Rate Prediction"), run as the recipe's ``gate`` (:mod:`ctrlab.search.optfs`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

from pydantic import Field

from ctrlab.config.parts import GateConfig
from ctrlab.gates import GATES
from ctrlab.pipeline.base import PipelineStage, StageContext, StageResult, register_stage
from ctrlab.pipeline.searching import search_seconds, with_section
from ctrlab.pipeline.stage_config import StageConfigBase


def _optfs() -> GateConfig:
    return cast(GateConfig, GATES.get("optfs").config(kind="optfs"))


class OptFSStageConfig(StageConfigBase):
    """Propose the model before this stage with ``gate`` (default: OptFS with its defaults), searched and
    re-trained in one run; kept, its kept feature set is fixed for the later stages."""

    stage: Literal["optfs"]
    gate: GateConfig = Field(default_factory=_optfs, description="the gate section to search with")

    ORDER: ClassVar[int] = 20
    PRODUCES: ClassVar[frozenset[str]] = frozenset({"feature_set"})


@register_stage(OptFSStageConfig)
class OptFSStage(PipelineStage):
    """Propose the model with an OptFS gate (Lyu et al. 2023, Sec. 3: gates per feature value learnt by
    continuation, then a re-training on the kept values), searched and re-trained in one run."""

    name = "optfs"

    def estimate(self, config: Any, plain_seconds: float, epoch_seconds: float) -> float:
        return search_seconds(int(getattr(config.gate, "search_epochs", 10)), plain_seconds, epoch_seconds, 1.3)

    def run(self, context: StageContext) -> StageResult:
        candidate = context.train(with_section(context, "gate", context.config.gate), "search")
        found = candidate.metrics.get("feature_search", {})
        fields = found.get("fields", {})
        decision = {"values_kept": found.get("values_kept"), "values_total": found.get("values_total"),
                    "kept_share": found.get("kept_share"),
                    "features_dropped": sorted(name for name, row in fields.items() if not row.get("kept_share")),
                    "kept_share_by_feature": {name: row.get("kept_share") for name, row in fields.items()}}
        return StageResult(candidate, decision)

"""Recipe section ``pipeline``: the stages ``ctrlab pipeline`` runs, in order, from the plain recipe to a served
model, with a total time budget and the tolerance by which a stage may cost validation AUC before it is rolled
back (see :mod:`ctrlab.pipeline`).

The stage configs come from :data:`ctrlab.pipeline.PIPELINE_STAGES` (one module per stage registers its own), so
a new stage needs no change here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from ctrlab.config.base import Section
from ctrlab.config.parts import union_of
from ctrlab.pipeline import PIPELINE_STAGES
from ctrlab.pipeline.stage_config import PLAIN_PRODUCTS, StageConfigBase

if TYPE_CHECKING:  # pragma: no cover
    StageConfig = StageConfigBase
else:
    StageConfig = union_of(PIPELINE_STAGES)

MAX_STAGES = 64


class PipelineConfig(Section):
    """The stages to run (each at most once, in the canonical order: rank, optfs, optinter, embedding, sweep,
    retrain, register), ``hours`` (the whole pipeline's time budget, split over the stages in proportion to their
    estimates; none: unbounded), ``tolerance`` (how much validation AUC, or logloss, a stage may cost against the
    model before it and against the plain recipe's model and still be kept) and ``min_saving`` (the share of the
    parameters such a costly stage must save)."""

    hours: float | None = Field(None, gt=0, le=10_000, description="time budget of the whole pipeline")
    tolerance: float = Field(0.0005, ge=0, le=1, description="validation AUC (or logloss) a stage may cost before "
                             "it is rolled back")
    min_saving: float = Field(0.01, ge=0, le=1, description="share of the parameters a stage that costs validation "
                              "AUC must save to be kept")
    stages: list[StageConfig] = Field(min_length=1, max_length=MAX_STAGES)

    @model_validator(mode="after")
    def _check_stage_list(self) -> PipelineConfig:
        check_stage_list(self.stages)
        return self


def _position(name: str) -> int:
    config: type[StageConfigBase] = PIPELINE_STAGES.get(name).config  # type: ignore[assignment]
    return config.ORDER


def _order() -> list[str]:
    return sorted(PIPELINE_STAGES.names(), key=_position)


def check_stage_list(stages: list[Any]) -> None:
    """Each stage once, in the canonical order: a ``ValueError`` naming the key (``stages[i].stage``) otherwise."""
    seen: dict[str, int] = {}
    for index, config in enumerate(stages):
        name = config.stage
        if name in seen:
            raise ValueError(f"stages[{index}].stage: {name} is listed twice (first as stages[{seen[name]}]); each "
                             "stage runs once")
        later = [other for other in seen if _position(other) > config.ORDER]
        if later:
            raise ValueError(f"stages[{index}].stage: {name} must come before {later[0]} (stages[{seen[later[0]]}]); "
                             f"stages run in the order {', '.join(_order())}")
        seen[name] = index


def check_stage_inputs(stages: list[Any], given: set[str]) -> None:
    """Each stage after the stages whose outputs it needs (``given``: what the plain recipe itself provides, e.g. a
    feature set when it has a gate): a ``ValueError`` naming the key otherwise."""
    products = set(PLAIN_PRODUCTS) | given
    for index, config in enumerate(stages):
        for product, (key, maker) in config.needs().items():
            if product not in products:
                what = product.replace("_", " ")
                raise ValueError(f"pipeline.stages[{index}].{key}: needs the {what} that the {maker} stage "
                                 f"produces; list {maker} before {config.stage}")
        products |= type(config).PRODUCES

"""Stage ``register``: the pipeline's model registered as an MLflow pyfunc model (raw rows in, click
probabilities out; :mod:`ctrlab.serve.registry`), under ``name`` with ``alias``."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from ctrlab.pipeline.base import PipelineStage, StageContext, StageResult, register_stage
from ctrlab.pipeline.stage_config import StageConfigBase


class RegisterStageConfig(StageConfigBase):
    """Register the model the retrain stage chose (best seed on validation) as ``name``, pointing ``alias`` at the
    new version; ``tracking_uri`` defaults to the recipe's tracking store."""

    stage: Literal["register"]
    name: str = Field(description="registered model name")
    alias: str | None = Field("champion", description="alias to point at the new version (none: no alias)")
    tracking_uri: str | None = None

    ORDER: ClassVar[int] = 70
    NEEDS: ClassVar[dict[str, str]] = {"final_model": "retrain"}

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        from ctrlab.errors import CtrlabError
        from ctrlab.serve.registry import check_model_name

        try:
            check_model_name(name, "name")
        except CtrlabError as error:
            raise ValueError(error.message) from None
        return name

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, alias: str | None) -> str | None:
        from ctrlab.errors import CtrlabError
        from ctrlab.serve.registry import check_alias

        if alias is not None:
            try:
                check_alias(alias, "alias")
            except CtrlabError as error:
                raise ValueError(error.message) from None
        return alias


@register_stage(RegisterStageConfig)
class RegisterStage(PipelineStage):
    """Register the retrain stage's chosen model as an MLflow pyfunc model (raw rows in)."""

    name = "register"

    def estimate(self, config: Any, plain_seconds: float, epoch_seconds: float) -> float:
        return 30.0

    def run(self, context: StageContext) -> StageResult:
        from ctrlab.serve.registry import register_run

        config: RegisterStageConfig = context.config
        registered = register_run(str(context.incumbent.run_dir), config.name, alias=config.alias,
                                  tracking_uri=config.tracking_uri)
        context.say(f"registered {registered.name} version {registered.version}"
                    + (f" as @{registered.alias}" if registered.alias else ""))
        return StageResult(None, {"name": registered.name, "version": registered.version, "alias": registered.alias,
                                  "model_uri": registered.model_uri, "run": str(context.incumbent.run_dir)},
                           judged=False)

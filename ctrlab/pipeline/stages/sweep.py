"""Stage ``sweep``: an Optuna study (:mod:`ctrlab.sweep`) over the hyper-parameters the earlier stages left open,
with their findings fixed. A space key inside a searching section (e.g. ``gate.sparsity_weight``, OptFS's lambda)
makes every trial run that search again, and the searches after it, so that what they find fits."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ctrlab.config.base import MAX_EPOCHS, Int
from ctrlab.config.sweep import ParamSpace
from ctrlab.pipeline.base import Candidate, PipelineStage, StageContext, StageResult, read_candidate, register_stage
from ctrlab.pipeline.recipes import SEARCHABLE_SECTIONS
from ctrlab.pipeline.stage_config import StageConfigBase

#: A space key inside one of these sections needs the stage that adds it (unless the plain recipe has it).
_SECTION_STAGES = {"gate": ("feature_set", "optfs"), "interaction": ("pair_methods", "optinter")}


class SweepStageConfig(StageConfigBase):
    """An Optuna study of ``n_trials`` trials over ``space`` (dotted recipe keys, as ``sweep.space``), stopped at
    the stage's time budget. With ``baseline_trial`` (the default) the first trial is the model before this stage,
    so the sweep is judged against its own retraining of it."""

    stage: Literal["sweep"]
    n_trials: Int = Field(20, ge=1, le=MAX_EPOCHS)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = "median"
    pruner_startup_trials: Int = Field(2, ge=0, le=MAX_EPOCHS)
    pruner_warmup_epochs: Int = Field(1, ge=0, le=MAX_EPOCHS)
    baseline_trial: bool = True
    space: dict[str, ParamSpace] = Field(min_length=1)

    ORDER: ClassVar[int] = 50
    PRODUCES: ClassVar[frozenset[str]] = frozenset({"hyper_parameters"})

    def needs(self) -> dict[str, tuple[str, str]]:
        wanted: dict[str, tuple[str, str]] = {}
        for key in self.space:
            section = key.split(".")[0]
            if section in _SECTION_STAGES and key.split(".")[1:2] != ["kind"]:
                product, maker = _SECTION_STAGES[section]
                wanted.setdefault(product, (f"space.{key}", maker))
        return wanted


def researched(recipe: dict[str, Any], space: dict[str, ParamSpace]) -> dict[str, Any]:
    """``recipe`` with the searching sections that a space key lies in, and every later one, set to search again
    (all their stages, no ``from_run``): a trial with another lambda must find its own feature set."""
    from ctrlab.config.loader import validate_recipe

    touched = {key.split(".")[0] for key in space}
    validated = validate_recipe({k: v for k, v in recipe.items() if k != "sweep"}, "pipeline sweep")
    again = False
    for section in SEARCHABLE_SECTIONS:
        config = getattr(validated, section, None)
        stages = getattr(type(config), "STAGES", ()) if config is not None else ()
        again = again or (section in touched and bool(stages))
        if again and stages and isinstance(recipe.get(section), dict):
            recipe[section]["stages"] = list(stages)
            recipe[section]["from_run"] = None
    return recipe


@register_stage(SweepStageConfig)
class SweepStage(PipelineStage):
    """Run an Optuna study (TPE, Bergstra et al. 2011, by default) over the stage's space on the model before it, and
    propose its best trial on validation."""

    name = "sweep"

    def estimate(self, config: Any, plain_seconds: float, epoch_seconds: float) -> float:
        return config.n_trials * plain_seconds * (0.8 if config.pruner != "none" else 1.0)

    def run(self, context: StageContext) -> StageResult:
        import yaml

        from ctrlab.sweep.study import run_sweep
        from ctrlab.utils.io import write_text_atomic

        config: SweepStageConfig = context.config
        recipe = researched(context.base_recipe(), config.space)
        recipe["output_dir"] = str(context.directory / "study")
        recipe["sweep"] = {
            "n_trials": config.n_trials, "sampler": config.sampler, "pruner": config.pruner,
            "pruner_startup_trials": config.pruner_startup_trials,
            "pruner_warmup_epochs": config.pruner_warmup_epochs, "baseline_trial": config.baseline_trial,
            "timeout_seconds": context.budget_seconds, "study_name": f"{recipe.get('name', 'run')}-pipeline",
            "space": {key: spec.model_dump(mode="json", exclude_defaults=True) for key, spec in config.space.items()},
        }
        source = context.directory / "sweep_recipe.yaml"
        write_text_atomic(source, yaml.safe_dump(recipe, sort_keys=False))
        found = run_sweep(source, [], data_dir=context.data_dir, console=context.console,
                          parent_run_id=context.mlflow_run_id)
        decision: dict[str, Any] = {"best_trial": found.best_trial, "best_params": found.best_params,
                                    "best_value": found.best_value, "trials": found.counts,
                                    "study": str(found.output_dir)}
        if found.best_trial is None:
            return StageResult(None, decision, note="no trial completed")
        decision["best_is_baseline"] = found.best_trial == found.baseline_trial
        if decision["best_is_baseline"]:
            return StageResult(None, decision, note=f"no trial beat the model before it (its retraining, trial "
                                                    f"{found.best_trial}, was best)")
        candidate: Candidate | None = read_candidate(found.output_dir / "trials" / str(found.best_trial))
        if candidate is None:
            return StageResult(None, decision, note=f"the best trial's run ({found.best_trial}) is missing")
        return StageResult(candidate, decision)

"""``ctrlab pipeline RECIPE``: run the recipe's ``pipeline`` stages from the plain recipe to a served model.

First the plain recipe (the recipe without its ``pipeline`` section) is trained: it is the reference. Then each
listed stage, in order, proposes a model built on the model the pipeline holds (the *incumbent*): the recipe with
what the stage found (features dropped, a feature set, pair methods, table dims, hyper-parameters). The proposal is
judged on validation (:func:`~ctrlab.pipeline.budget.judge`): kept when it costs at most ``pipeline.tolerance``
against the incumbent and against the plain model, and, when it costs anything, only if it is ``pipeline.min_saving``
(1%) smaller; else reported
and rolled back, so the pipeline never ends below the plain recipe on validation. A kept stage's searches are fixed
(``from_run``, re-train only) for the stages after it. The retrain stage trains the incumbent under several seeds;
the register stage registers the seed best on validation.

Everything lands in ``output_dir``: ``stages/<NN>-<stage>/`` (each stage's runs, ranking, study),
``pipeline.json`` (the state: one record per finished stage, written atomically after each), ``report.md`` and its
PNGs. A rerun after a kill reads the state and continues at the first unfinished stage; inside a stage, finished
runs are read back and a sweep resumes its study at its next trial. With tracking on, the pipeline is one MLflow
parent run (reopened by a rerun) with a nested run per stage, and the stages' trainings nested under those.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.console import Console
from rich.markup import escape

from ctrlab.config.loader import (
    flatten,
    parse_override,
    read_recipe_file,
    recipe_to_dict,
    set_path,
    validate_recipe,
)
from ctrlab.config.schema import Recipe
from ctrlab.errors import RecipeError
from ctrlab.pipeline import PIPELINE_STAGES
from ctrlab.pipeline.base import Candidate, PipelineStage, StageContext, StageResult, read_candidate
from ctrlab.pipeline.budget import judge, shares
from ctrlab.pipeline.recipes import settle_searches
from ctrlab.pipeline.report import write_report
from ctrlab.pipeline.stage_config import StageConfigBase
from ctrlab.pipeline.state import STAGES_DIR, PipelineState, StageRecord
from ctrlab.train.state import recipe_digest
from ctrlab.utils.io import write_json_atomic
from ctrlab.utils.output_dir import OutputFolder

#: Stages the pipeline may leave out when its time is spent; the final retrain and the registration always run.
_SKIPPABLE = ("rank", "optfs", "optinter", "embedding", "sweep")
#: Before the plain model has run, estimates are relative to a nominal plain training of this many seconds, taken to
#: run this many epochs (early stopping usually stops it around here); they are printed in plain trainings.
_NOMINAL_SECONDS = 600.0
_EXPECTED_EPOCHS = 10


class PlainStageConfig(StageConfigBase):
    """The first stage of every pipeline (never listed): the plain recipe, trained as written."""

    stage: Literal["plain"] = "plain"
    ORDER: ClassVar[int] = 0
    PRODUCES: ClassVar[frozenset[str]] = frozenset({"model"})


class PlainStage(PipelineStage):
    """Train the recipe without its pipeline section: the reference every stage is judged against."""

    name = "plain"

    def run(self, context: StageContext) -> StageResult:
        return StageResult(context.train(context.base_recipe(), "model"), {}, judged=False)


@dataclass
class PipelineResult:
    """Where the pipeline wrote its results and what each stage did."""

    output_dir: Path
    records: list[StageRecord]
    report: Path
    monitor: str

    @property
    def final(self) -> StageRecord | None:
        return next((r for r in self.records if r.stage == "retrain"), None)

    def summary(self) -> dict[str, Any]:
        stages = [{"stage": r.stage, "outcome": r.outcome,
                   f"valid_{self.monitor}": (r.candidate or {}).get("valid", {}).get(self.monitor)}
                  for r in self.records]
        final = self.final
        out: dict[str, Any] = {"output_dir": str(self.output_dir), "report": str(self.report), "stages": stages}
        if final is not None:
            out["final"] = {"run": final.incumbent_run, **{k: v for k, v in final.decision.items()
                                                           if k.startswith(("test_", "valid_"))}}
        registered = next((r for r in self.records if r.stage == "register" and r.outcome == "registered"), None)
        if registered is not None:
            out["registered"] = registered.decision
        return out


def load_pipeline_recipe(recipe_path: str | Path, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """The recipe with its overrides, checked for what a pipeline needs: a ``pipeline`` section, no ``sweep``
    section (the sweep stage holds the space) and one process."""
    source = str(recipe_path)
    raw = read_recipe_file(recipe_path)
    for text in overrides:
        keys, value = parse_override(text)
        set_path(raw, keys, value)
    recipe: Recipe = validate_recipe(raw, source)
    if recipe.pipeline is None:
        raise RecipeError(f"{source}: pipeline: the recipe has no pipeline section; add pipeline: {{stages: "
                          "[...]}} (see recipes/frappe_pipeline.yaml)")
    if recipe.sweep is not None:
        raise RecipeError(f"{source}: sweep: a pipeline sweeps in its sweep stage; move sweep.space into a stage "
                          "of pipeline.stages (stage: sweep)")
    if recipe.distributed.processes > 1 or recipe.distributed.sharding != "none":
        raise RecipeError(f"{source}: distributed: a pipeline runs its searches in one process; set "
                          "distributed.processes: 1 and distributed.sharding: none (train its result on more later)")
    monitor = _monitor(recipe)
    if monitor not in recipe.train.metrics:
        raise RecipeError(f"{source}: train.metrics: must include {monitor}, the metric the pipeline judges stages "
                          "by")
    return recipe


def _monitor(recipe: Recipe) -> str:
    return recipe.train.early_stopping.monitor if recipe.train.early_stopping is not None else "auc"


def _impl(config: Any) -> PipelineStage:
    if config.stage == "plain":
        return PlainStage()
    stage: PipelineStage = PIPELINE_STAGES.get(config.stage).impl()
    return stage


def run_pipeline(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                 data_dir: str | Path | None = None, console: Console | None = None,
                 overwrite: bool = False) -> PipelineResult:
    """Run (or resume) the recipe's pipeline; see the module docstring."""
    console = console or Console(stderr=True)
    recipe = load_pipeline_recipe(recipe_path, overrides)
    assert recipe.pipeline is not None
    full = recipe_to_dict(recipe)
    plain_recipe = {key: value for key, value in full.items() if key not in ("pipeline", "output_dir")}
    output_dir = Path(recipe.output_dir).expanduser()
    # The budget may change between reruns (to give a resumed pipeline more time); nothing else may.
    digest = recipe_digest({**full, "pipeline": {**full["pipeline"], "hours": None}})
    folder = OutputFolder(output_dir, "pipeline", recipe.name, digest, overwrite)
    folder.check()
    state = PipelineState.open(output_dir, digest, overwrite)
    folder.open()
    monitor = _monitor(recipe)
    configs: list[Any] = [PlainStageConfig(), *recipe.pipeline.stages]
    runner = _Runner(recipe, configs, plain_recipe, output_dir, state, monitor, data_dir, console)
    from ctrlab.tracking import mlflow_run

    with mlflow_run(recipe.tracking, recipe.tracking.experiment or recipe.name, run_name=f"{recipe.name}-pipeline",
                    tags={"ctrlab.kind": "pipeline"}, resume_run_id=state.parent_run_id) as parent:
        if parent is not None and state.parent_run_id != parent.run_id:
            state.parent_run_id = parent.run_id
            parent.log_params(flatten(full))
            state.save(output_dir)
        runner.parent = parent
        runner.run()
        report = write_report(output_dir, recipe.name, state.records, monitor, console)
        if parent is not None:
            _log_parent(parent, state.records, output_dir, report, monitor)
    return PipelineResult(output_dir, state.records, report, monitor)


class _Runner:
    """The loop over the stages (see the module docstring); holds the incumbent and the plain model."""

    def __init__(self, recipe: Recipe, configs: list[Any], plain_recipe: dict[str, Any], output_dir: Path,
                 state: PipelineState, monitor: str, data_dir: str | Path | None, console: Console) -> None:
        self.recipe = recipe
        self.configs = configs
        self.output_dir = output_dir
        self.state = state
        self.monitor = monitor
        self.data_dir = data_dir
        self.console = console
        self.parent: Any = None
        assert recipe.pipeline is not None
        self.tolerance = recipe.pipeline.tolerance
        self.min_saving = recipe.pipeline.min_saving
        hours = recipe.pipeline.hours
        self.total_seconds = hours * 3600.0 if hours is not None else None
        # each stage's own minutes, in seconds (None: a share of the hours)
        self.fixed = [c.minutes * 60.0 if c.minutes is not None else None for c in configs]
        self.incumbent = Candidate(plain_recipe, output_dir, {})
        self.plain = self.incumbent

    # ------------------------------------------------------------------------------------------ estimates
    def _plain_times(self) -> tuple[float, float, bool]:
        """Seconds of one plain training and of one of its epochs, and whether they were measured (else: the
        nominal :data:`_NOMINAL_SECONDS` over :data:`_EXPECTED_EPOCHS` epochs)."""
        record = self.state.finished(0)
        if record is not None and record.candidate is not None:
            seconds = float(record.candidate.get("seconds") or record.seconds)
            epochs = max(len(self.plain.metrics.get("history", [])), 1)
            return seconds, seconds / epochs, True
        epochs = min(self.recipe.train.epochs, _EXPECTED_EPOCHS)
        return _NOMINAL_SECONDS, _NOMINAL_SECONDS / epochs, False

    def _estimates(self) -> list[float]:
        plain_seconds, epoch_seconds, _ = self._plain_times()
        return [_impl(c).estimate(c, plain_seconds, epoch_seconds) for c in self.configs]

    def _budget(self, index: int) -> float | None:
        """This stage's share of the time left (see :mod:`ctrlab.pipeline.budget`)."""
        left = None
        if self.total_seconds is not None:
            left = max(self.total_seconds - sum(r.seconds for r in self.state.records), 0.0)
        return shares(left, self._estimates()[index:], self.fixed[index:])[0]

    def print_plan(self) -> None:
        plain_seconds, _, measured = self._plain_times()
        estimates = self._estimates()
        planned = shares(self.total_seconds, estimates, self.fixed)
        total = f"{self.total_seconds / 3600:g} h" if self.total_seconds is not None else "no time limit"
        unit = "measured" if measured else "in plain trainings, before the plain model has run"
        self.console.print(f"[bold]pipeline[/bold] {escape(self.recipe.name)}: {len(self.configs)} stages, "
                           f"budget {total}; estimates {unit}", highlight=False, soft_wrap=True)
        for index, (config, estimate, share) in enumerate(zip(self.configs, estimates, planned)):
            done = self.state.finished(index)
            est = (f"{estimate / 60:7.1f} min" if measured else f"{estimate / plain_seconds:6.2f} x plain")
            budget = f"{share / 60:7.1f} min" if share is not None and measured else (
                f"{share / self.total_seconds:6.1%} of budget" if share is not None and self.total_seconds else
                "   -")
            status = f"  done: {done.outcome}" if done is not None else ""
            self.console.print(f"  {index:2d} {config.stage:<10} estimate {est}   budget {budget}{status}",
                               highlight=False)

    # ----------------------------------------------------------------------------------------------- loop
    def run(self) -> None:
        self.print_plan()
        for index, config in enumerate(self.configs):
            record = self.state.finished(index)
            if record is None:
                record = self._run_stage(index, config)
                self.state.records.append(record)
                self.state.save(self.output_dir)
                write_report(self.output_dir, self.recipe.name, self.state.records, self.monitor, None)
            else:
                self.console.print(f"[bold]{config.stage}[/bold] finished earlier: {record.outcome}",
                                   highlight=False)
            self._restore(record)
            if index == 0 and record.candidate is not None and len(self.configs) > 1:
                self.print_plan()

    def _restore(self, record: StageRecord) -> None:
        """Take the model the pipeline holds after ``record`` (and the plain model after the first)."""
        run_dir = Path(record.incumbent_run)
        candidate = read_candidate(run_dir)
        metrics = candidate.metrics if candidate is not None else {}
        self.incumbent = Candidate(copy.deepcopy(record.incumbent_recipe), run_dir, metrics)
        if record.index == 0:
            self.plain = self.incumbent

    def _run_stage(self, index: int, config: Any) -> StageRecord:
        stage = _impl(config)
        budget = self._budget(index)
        plain_seconds, epoch_seconds, measured = self._plain_times()
        estimate = stage.estimate(config, plain_seconds, epoch_seconds) if measured else None
        directory = self.output_dir / STAGES_DIR / f"{index:02d}-{config.stage}"
        if config.stage in _SKIPPABLE and budget is not None and budget <= 0:
            self.console.print(f"[bold]{config.stage}[/bold] skipped: the pipeline's time budget is spent",
                               highlight=False)
            return self._record(index, config, "skipped", "the time budget was spent", {}, None, 0.0, budget,
                                estimate, None)
        directory.mkdir(parents=True, exist_ok=True)
        head = f"stage {index}: {config.stage}"
        if budget is not None:
            head += f" (budget {budget / 60:.1f} min" + (f", estimate {estimate / 60:.1f} min)" if estimate else ")")
        self.console.rule(head)
        from ctrlab.tracking import mlflow_run

        tracking = self.recipe.tracking
        started = time.perf_counter()
        with mlflow_run(tracking, tracking.experiment or self.recipe.name,
                        run_name=f"{self.recipe.name}-{index:02d}-{config.stage}",
                        parent_run_id=self.parent.run_id if self.parent is not None else None,
                        tags={"ctrlab.kind": "pipeline-stage", "ctrlab.stage": config.stage}) as stage_run:
            context = StageContext(config, index, directory, self.incumbent, self.plain, self.monitor, self.data_dir,
                                   self.console, stage_run.run_id if stage_run is not None else None, budget)
            result = stage.run(context)
            seconds = time.perf_counter() - started
            outcome, reason = self._decide(config, result)
            record = self._record(index, config, outcome, reason, result.decision, result, seconds, budget, estimate,
                                  stage_run.run_id if stage_run is not None else None)
            write_json_atomic(directory / "decision.json", asdict(record))
            if stage_run is not None:
                _log_stage(stage_run, config, record, directory, self.monitor)
        style = {"kept": "green", "rolled_back": "red"}.get(outcome, "bold")
        self.console.print(f"[{style}]{config.stage}: {outcome.replace('_', ' ')}[/{style}] - {escape(reason)} "
                           f"({seconds / 60:.1f} min)", highlight=False, soft_wrap=True)
        return record

    def _decide(self, config: Any, result: StageResult) -> tuple[str, str]:
        if config.stage == "plain":
            return "kept", "the plain recipe: the reference"
        if config.stage == "register":
            return "registered", f"{result.decision.get('name')} version {result.decision.get('version')}"
        if result.candidate is None:
            return "nothing_proposed", result.note or "the stage proposed no model"
        if not result.judged:
            return "final", result.note or f"the model chosen among {len(result.finals)} seeds on validation"
        kept, reason = judge(result.candidate, self.incumbent, self.plain, self.monitor, self.tolerance,
                             self.min_saving)
        return ("kept" if kept else "rolled_back"), reason

    def _record(self, index: int, config: Any, outcome: str, reason: str, decision: dict[str, Any],
                result: StageResult | None, seconds: float, budget: float | None, estimate: float | None,
                run_id: str | None) -> StageRecord:
        candidate = result.candidate if result is not None else None
        incumbent = self.incumbent
        if candidate is not None and outcome in ("kept", "final"):
            incumbent = Candidate(settle_searches(copy.deepcopy(candidate.recipe), candidate.run_dir),
                                  candidate.run_dir, candidate.metrics)
        return StageRecord(
            index=index, stage=config.stage, outcome=outcome, reason=reason, decision=decision,
            candidate=candidate.summary(self.monitor) if candidate is not None else None,
            incumbent_run=str(incumbent.run_dir), incumbent_recipe=incumbent.recipe, seconds=seconds,
            budget_seconds=budget, estimate_seconds=estimate, mlflow_run_id=run_id,
            finals=[final.summary(self.monitor) for final in (result.finals if result is not None else [])])


def _log_stage(run: Any, config: Any, record: StageRecord, directory: Path, monitor: str) -> None:
    run.log_params(flatten(config.model_dump(mode="json"), "stage"))
    metrics: dict[str, float] = {"kept": float(record.outcome in ("kept", "final")), "seconds": record.seconds}
    if record.candidate is not None:
        for split in ("valid", "test"):
            for name, value in (record.candidate.get(split) or {}).items():
                if isinstance(value, (int, float)):
                    metrics[f"{split}_{name}"] = float(value)
        metrics["model_parameters"] = float(record.candidate.get("parameters") or 0)
        metrics["samples_per_second"] = float(record.candidate.get("samples_per_second") or 0)
    run.log_metrics(metrics)
    run.set_tags({"ctrlab.outcome": record.outcome, "ctrlab.reason": record.reason})
    run.log_artifact(directory / "decision.json")


def _log_parent(parent: Any, records: list[StageRecord], output_dir: Path, report: Path, monitor: str) -> None:
    final = next((r for r in records if r.stage == "retrain"), None)
    metrics: dict[str, float] = {"stages_kept": float(sum(r.outcome == "kept" for r in records[1:]))}
    if final is not None:
        for key, value in final.decision.items():
            if key.startswith(("test_", "valid_")) and isinstance(value, dict):
                metrics[f"final_{key}_mean"] = float(value["mean"])
                metrics[f"final_{key}_std"] = float(value["std"])
    parent.log_metrics(metrics)
    parent.log_artifact(report, "report")
    for picture in sorted(output_dir.glob("pipeline_*.png")):
        parent.log_artifact(picture, "report")

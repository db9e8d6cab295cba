"""What every pipeline stage shares: its config base, the trained models it proposes (:class:`Candidate`), what it
returns (:class:`StageResult`), what it gets (:class:`StageContext`) and the interface it implements
(:class:`PipelineStage`).

A stage proposes a recipe (the model before it, changed by what the stage found), trains it through
:meth:`StageContext.train` and returns the trained :class:`Candidate`; the runner judges it on validation and keeps
it or rolls it back. Stages never judge themselves, and they never touch the runner's state.
"""

from __future__ import annotations

import copy
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:  # pragma: no cover
    from ctrlab.pipeline.stage_config import StageConfigBase

@dataclass
class Candidate:
    """A trained model: its resolved recipe (a plain mapping, without ``output_dir``), its run directory and its
    ``metrics.json``."""

    recipe: dict[str, Any]
    run_dir: Path
    metrics: dict[str, Any]

    def valid(self, metric: str) -> float:
        return metric_value(self.metrics.get("valid", {}).get(metric))

    def test(self, metric: str) -> float:
        return metric_value(self.metrics.get("test", {}).get(metric))

    @property
    def parameters(self) -> int:
        return int(self.metrics.get("model_parameters", 0))

    @property
    def samples_per_second(self) -> float:
        """Mean training throughput over the run's epochs (0 when it trained none)."""
        rates = [r["samples_per_second"] for r in self.metrics.get("history", []) if r.get("samples_per_second")]
        return sum(rates) / len(rates) if rates else 0.0

    def summary(self, metric: str) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "valid": self.metrics.get("valid", {}),
                "test": self.metrics.get("test", {}), "parameters": self.parameters,
                "embedding_parameters": self.metrics.get("embedding_parameters"),
                "samples_per_second": self.samples_per_second, "seconds": self.metrics.get("seconds"),
                "best_epoch": self.metrics.get("best_epoch")}


@dataclass
class StageResult:
    """What a stage did. ``candidate``: the model it proposes (None when it proposes nothing: nothing to change, or a
    stage that trains no model), judged against the model before it unless ``judged`` is false (the final
    retrain, whose model *is* the one before it, under other seeds). ``decision``: what it found, for the report
    (features dropped, pairs memorised, dims chosen, best trial, ...). ``finals``: the retrained models, one per
    seed (the retrain stage)."""

    candidate: Candidate | None
    decision: dict[str, Any]
    judged: bool = True
    finals: list[Candidate] = field(default_factory=list)
    note: str = ""


@dataclass
class StageContext:
    """What a stage gets: its config and position, its folder (``directory``), the model before it
    (``incumbent``) and the plain recipe's model (``plain``), the metric the pipeline judges by, the data
    directory, the console, the stage's MLflow run id (trainings nest under it) and its time budget."""

    config: Any
    index: int
    directory: Path
    incumbent: Candidate
    plain: Candidate
    monitor: str
    data_dir: str | Path | None
    console: Console
    mlflow_run_id: str | None
    budget_seconds: float | None

    @property
    def name(self) -> str:
        return str(self.config.stage)

    def base_recipe(self) -> dict[str, Any]:
        """A copy of the model-before-this-stage's recipe, to change into this stage's proposal."""
        return copy.deepcopy(self.incumbent.recipe)

    def say(self, text: str) -> None:
        self.console.print(f"[bold]{escape(self.name)}[/bold] {escape(text)}", highlight=False, soft_wrap=True)

    def train(self, recipe: dict[str, Any], name: str) -> Candidate:
        """Train ``recipe`` into ``<directory>/<name>`` (nested under the stage's MLflow run) and return it. A run
        already there for the same recipe (a rerun after a kill) is read back, not trained again."""
        from ctrlab.config.loader import recipe_to_dict, validate_recipe
        from ctrlab.train.state import recipe_digest

        data = copy.deepcopy(recipe)
        data["output_dir"] = str(self.directory / name)
        data.setdefault("tracking", {})["run_name"] = f"{data.get('name', 'run')}-{self.name}-{name}"
        resolved = validate_recipe(data, f"pipeline stage {self.index} ({self.name})")
        done = read_candidate(Path(resolved.output_dir), recipe_digest(recipe_to_dict(resolved)))
        if done is not None:
            self.say(f"{name}: finished earlier, read back from {resolved.output_dir}")
            return done
        started = time.perf_counter()
        from ctrlab.train.run import train_recipe

        train_recipe(resolved, data_dir=self.data_dir, console=self.console, parent_run_id=self.mlflow_run_id,
                     overwrite=True)
        candidate = read_candidate(Path(resolved.output_dir))
        assert candidate is not None, resolved.output_dir
        self.say(f"{name}: valid {self.monitor} {candidate.valid(self.monitor):.5f} "
                 f"({time.perf_counter() - started:.0f} s)")
        return candidate


def metric_value(value: Any) -> float:
    """A metric read back from JSON (where an undefined one is null) as a float, NaN when undefined."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")


def read_candidate(run_dir: Path, digest: str | None = None) -> Candidate | None:
    """The finished run in ``run_dir`` as a :class:`Candidate` (None when there is none, or, given ``digest``,
    when it ran another recipe)."""
    from ctrlab.config.loader import read_recipe_file
    from ctrlab.errors import CtrlabError
    from ctrlab.run_dir import METRICS_FILE, RECIPE_FILE
    from ctrlab.train.state import recipe_digest

    if not (run_dir / METRICS_FILE).is_file() or not (run_dir / RECIPE_FILE).is_file():
        return None
    try:
        recipe = read_recipe_file(run_dir / RECIPE_FILE)
        metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (CtrlabError, ValueError, OSError):
        return None
    if digest is not None and recipe_digest(recipe) != digest:
        return None
    recipe.pop("output_dir", None)
    return Candidate(recipe, run_dir, metrics)


class PipelineStage(ABC):
    """One stage of a pipeline: :meth:`run` proposes and trains a model (see the module docstring);
    :meth:`estimate` says how long it should take, in seconds, from the plain model's training time."""

    name: ClassVar[str]

    @abstractmethod
    def run(self, context: StageContext) -> StageResult:
        """Do the stage's work within ``context.budget_seconds`` where it can bound itself."""

    def estimate(self, config: Any, plain_seconds: float, epoch_seconds: float) -> float:
        """Expected seconds of this stage (default: one training of the plain model)."""
        return plain_seconds


def register_stage(config: type[StageConfigBase]) -> Callable[[type[PipelineStage]], type[PipelineStage]]:
    """Class decorator: register a stage under its ``name`` with ``config`` as its recipe section."""
    from ctrlab.pipeline import PIPELINE_STAGES

    def decorator(stage: type[PipelineStage]) -> type[PipelineStage]:
        PIPELINE_STAGES.register(stage.name, config)(stage)
        return stage
    return decorator

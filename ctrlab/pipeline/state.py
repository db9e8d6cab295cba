"""What a pipeline has done so far, kept in ``<output_dir>/pipeline.json`` (written atomically after every stage):
the recipe digest it belongs to, its MLflow parent run and one record per finished stage. A rerun reads it and
continues at the first unfinished stage."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctrlab.errors import RecipeError
from ctrlab.utils.io import write_json_atomic

STATE_FILE = "pipeline.json"
STAGES_DIR = "stages"

#: How a stage ended: its model was kept, rolled back, or it proposed none; or it is the final retrain or the
#: registration (not judged); or it was skipped (the time budget was spent).
OUTCOMES = ("kept", "rolled_back", "nothing_proposed", "final", "registered", "skipped")


@dataclass
class StageRecord:
    """One finished stage: its place and name, how it ended (``outcome``, see :data:`OUTCOMES`) and why
    (``reason``), what it decided, its model's figures (``candidate``: run_dir, valid, test, parameters,
    samples_per_second, ...), the model the pipeline holds after it (``incumbent_run``, ``incumbent_recipe``), its
    seconds, budget and estimate, and its MLflow run."""

    index: int
    stage: str
    outcome: str
    reason: str
    decision: dict[str, Any]
    candidate: dict[str, Any] | None
    incumbent_run: str
    incumbent_recipe: dict[str, Any]
    seconds: float
    budget_seconds: float | None = None
    estimate_seconds: float | None = None
    mlflow_run_id: str | None = None
    finals: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PipelineState:
    """The pipeline's progress (see the module docstring)."""

    digest: str
    parent_run_id: str | None = None
    records: list[StageRecord] = field(default_factory=list)

    @classmethod
    def open(cls, output_dir: Path, digest: str, overwrite: bool) -> PipelineState:
        """The state of the pipeline in ``output_dir``: read back when it belongs to the same recipe, else new.
        A pipeline of another recipe is replaced only with ``overwrite`` (its stages' folders are removed)."""
        path = output_dir / STATE_FILE
        if not path.is_file():
            return cls(digest)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            state = cls(data["digest"], data.get("parent_run_id"),
                        [StageRecord(**record) for record in data.get("records", [])])
        except (ValueError, KeyError, TypeError) as error:
            raise RecipeError(f"output_dir: {path} is not a pipeline state ctrlab can read ({type(error).__name__}); "
                              "pass --overwrite to start the pipeline again") from None
        if state.digest == digest:
            return state
        if not overwrite:
            raise RecipeError(f"output_dir: '{output_dir}' holds a pipeline of another recipe (or other settings); "
                              "pass --overwrite to start it again, or choose another location")
        shutil.rmtree(output_dir / STAGES_DIR, ignore_errors=True)
        path.unlink()
        return cls(digest)

    def save(self, output_dir: Path) -> None:
        write_json_atomic(output_dir / STATE_FILE, {"digest": self.digest, "parent_run_id": self.parent_run_id,
                                                     "records": [asdict(record) for record in self.records]})

    def finished(self, index: int) -> StageRecord | None:
        return next((record for record in self.records if record.index == index), None)

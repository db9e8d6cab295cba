"""Recipe section ``sweep``: an Optuna study over any recipe field, run by ``ctrlab sweep``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ctrlab.config.base import MAX_EPOCHS, Int, Section


class ParamSpace(Section):
    """The range of one recipe field (its dotted key is the key of ``sweep.space``).

    ``int`` / ``float`` take ``low``, ``high``, optional ``step`` and ``log``; ``categorical`` takes ``choices``.
    ``when`` makes the parameter conditional: it is sampled only if every named field (dotted key) has the given
    value, e.g. ``when: {model.block: deepfm}``.
    """

    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0)
    log: bool = False
    choices: list[Any] | None = Field(None, max_length=10_000)
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "ParamSpace":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty choices list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"an {self.type} parameter needs low and high")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) is above high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("a log-scaled parameter needs low > 0")
            if self.log and self.step is not None:
                raise ValueError("step and log cannot be combined")
        return self


class SweepConfig(Section):
    """An Optuna study: sampler, pruner (fed the validation metric every epoch), budget and storage.

    ``storage`` defaults to an embedded SQLite file ``<output_dir>/study.db``; an SQLAlchemy URL (e.g.
    ``postgresql://...``) lets many ``ctrlab sweep`` processes on many machines share one study.
    """

    n_trials: Int = Field(20, ge=1, le=MAX_EPOCHS)
    timeout_seconds: float | None = Field(None, gt=0)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = "median"
    pruner_startup_trials: Int = Field(2, ge=0, le=MAX_EPOCHS,
                                       description="trials that are never pruned (median pruner)")
    pruner_warmup_epochs: Int = Field(1, ge=0, le=MAX_EPOCHS, description="epochs of each trial that are never pruned")
    storage: str | None = None
    study_name: str | None = Field(None, description="defaults to the recipe name")
    space: dict[str, ParamSpace] = Field(default_factory=dict)
    baseline_trial: bool = Field(False, description="run the recipe's own values of the space as the first trial "
                                 "(when every one lies in the space), so the best trial is never worse on validation "
                                 "than the recipe as written")

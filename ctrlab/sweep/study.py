"""``ctrlab sweep``: an Optuna study over recipe fields, stored in SQLite (default) or any SQLAlchemy database.

One call of :func:`run_sweep` is one worker. Workers that name the same storage and study share the study, so a
rerun resumes it and several processes (on several machines, with a server database) split the work. The budget is
``sweep.n_trials`` trials that COMPLETE or are PRUNED, summed over all workers and reruns; a FAILed trial (it
raised, or its objective was NaN) does not count. Trials record a heartbeat in the storage: a trial left RUNNING
by a killed worker is marked FAIL by the next worker once its heartbeat is ``grace`` seconds old.

Each trial trains the recipe with its sampled overrides into ``<output_dir>/trials/<number>`` and reports the
monitored validation metric after every epoch, so that the pruner can stop a bad trial early. At the end each
worker writes into ``<output_dir>``: ``best_recipe.yaml`` (the best trial's resolved recipe; ``ctrlab train``
accepts it), ``trials.csv``, and Optuna's plots as PNG; with MLflow tracking on, the worker's sweep is a parent run
and each trial a nested run.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.markup import escape

from ctrlab.config.loader import parse_override, read_recipe_file, recipe_to_dict, set_path, validate_recipe
from ctrlab.config.schema import Recipe
from ctrlab.config.sweep import SweepConfig
from ctrlab.errors import CtrlabError, RecipeError
from ctrlab.sweep.space import apply_params, baseline_params, check_space, sample_params
from ctrlab.utils.io import remove_stale_in, write_text_atomic
from ctrlab.utils.output_dir import OutputFolder
from ctrlab.utils.signals import Interrupted, Terminated

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STUDY_DB = "study.db"
TRIALS_DIR = "trials"
BEST_RECIPE = "best_recipe.yaml"
TRIALS_CSV = "trials.csv"
HISTORY_PNG = "optimization_history.png"
IMPORTANCE_PNG = "param_importances.png"

#: Heartbeat of a running trial, and how old it may get before another worker marks the trial FAIL (seconds).
HEARTBEAT_INTERVAL = int(os.environ.get("CTRLAB_SWEEP_HEARTBEAT_INTERVAL", "10"))
HEARTBEAT_GRACE = int(os.environ.get("CTRLAB_SWEEP_HEARTBEAT_GRACE", "30"))
#: How often a worker looks again while the rest of the budget is taken by other workers' running trials.
WAIT_POLL_SECONDS = 2.0

#: User attributes: a trial stopped by a signal or a killed worker (``interrupted``), and the trial a rerun of it
#: repeats (``retry_of``).
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
_MAXIMIZE = {"auc": True, "gauc": True, "logloss": False}
_QUIET = Console(quiet=True)


@dataclass
class SweepResult:
    """What a sweep worker found and wrote (``best_*`` are None when no trial has completed yet)."""

    study_name: str
    storage: str
    output_dir: Path
    direction: str
    monitor: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    best_recipe: Path | None
    trials_csv: Path
    counts: dict[str, int]
    plots: list[Path] = field(default_factory=list)
    trials_run: int = 0  # by this worker
    baseline_trial: int | None = None  # the trial that ran the recipe's own values (sweep.baseline_trial)

    def summary(self) -> dict[str, Any]:
        return {"study": self.study_name, "storage": redact_url(self.storage), "monitor": self.monitor,
                "direction": self.direction, "best_value": self.best_value, "best_trial": self.best_trial,
                "best_params": self.best_params, "best_recipe": str(self.best_recipe) if self.best_recipe else None,
                "trials_csv": str(self.trials_csv), "plots": [str(p) for p in self.plots], "counts": self.counts,
                "baseline_trial": self.baseline_trial,
                "trials_run_by_this_worker": self.trials_run}


class _BudgetTaken(Exception):
    """Raised before training when the budget was taken by other workers meanwhile (the trial is not run)."""


# ------------------------------------------------------------------------------------------------ helpers
def redact_url(url: str) -> str:
    """The storage URL with any password hidden (safe to print and log)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _one_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = " ".join(str(text).split())
    name = type(error).__name__
    return text if isinstance(error, CtrlabError) else f"{name}: {text}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _fmt_params(params: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) + "}"


def _trial_params(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's recipe overrides (decoded; categorical lists stay lists)."""
    overrides = trial.user_attrs.get("overrides")
    return dict(overrides) if isinstance(overrides, dict) else dict(trial.params)


def default_storage(output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str(output_dir.resolve() / STUDY_DB)


def make_storage(url: str, on_stale: Any = None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (SQLite waits for locks instead of failing at once); ``on_stale(study,
    trial)`` is called for each trial of a dead worker that this worker marks FAIL."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}
    last: Exception | None = None
    for attempt in range(5):  # two workers creating the same fresh database can race on the schema
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=HEARTBEAT_INTERVAL,
                                                  grace_period=HEARTBEAT_GRACE,
                                                  heartbeat_stale_trial_callback=on_stale)
        except Exception as error:  # sqlalchemy OperationalError/IntegrityError on a concurrent create
            last = error
            time.sleep(0.5 + attempt)
    raise RecipeError(f"sweep.storage: cannot open {redact_url(url)} ({_one_line(last) if last else 'unknown'})")


def _sampler_factory(config: SweepConfig) -> Any:
    def make(seed: int) -> optuna.samplers.BaseSampler:
        if config.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, config.n_trials // 3)))
    return make


class _PerTrialSeeded(optuna.samplers.BaseSampler):
    """A sampler re-created for every trial with seed ``recipe seed + the trial's place``: its number less the
    interrupted trials before it (each was run again, under the next number, with its parameters). A single
    worker's sweep is reproducible, interrupted and resumed or not, and workers sharing a study never replay each
    other's random draws."""

    def __init__(self, factory: Any, seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._inner: optuna.samplers.BaseSampler = factory(seed)
        self.current_trial_id: int | None = None  # the trial this worker asked for last

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        interrupted = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                          if t.number < trial.number and was_interrupted(t))
        self._inner = self._factory(self._seed + trial.number - interrupted)
        self.current_trial_id = trial._trial_id
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def _pruner(config: SweepConfig, epochs: int) -> optuna.pruners.BasePruner:
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup_trials,
                                           n_warmup_steps=config.pruner_warmup_epochs)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


@contextlib.contextmanager
def _parent_run(recipe: Recipe, study_name: str, parent_run_id: str | None = None) -> Iterator[Any]:
    """The worker's MLflow parent run (a RunLogger; nested under ``parent_run_id`` when given, e.g. a pipeline
    stage's run), or None when tracking is off or unavailable."""
    if not recipe.tracking.enabled:
        yield None
        return
    try:
        from ctrlab.tracking import mlflow_run
    except ImportError:
        yield None
        return
    experiment = recipe.tracking.experiment or recipe.name
    with mlflow_run(recipe.tracking, experiment, run_name=f"{study_name}-sweep", parent_run_id=parent_run_id,
                    tags={"ctrlab.kind": "sweep", "ctrlab.study": study_name}) as logger:
        yield logger


def _accepts_parent_run_id() -> bool:
    from ctrlab.train.run import train_recipe

    return "parent_run_id" in inspect.signature(train_recipe).parameters


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna logs every failed trial with its traceback; the sweep prints its own one line per trial."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)


# ------------------------------------------------------------------------------------------------- sweep
def _fail_trials_without_heartbeat(study: optuna.Study, grace_seconds: float) -> None:
    """Mark FAIL the RUNNING trials that never wrote a heartbeat and started more than ``grace_seconds`` ago.

    Optuna's stale-trial check skips trials with no heartbeat at all; a worker killed between creating a trial and
    its first heartbeat would otherwise leave a RUNNING trial that every later worker waits on forever.
    """
    import datetime as dt

    storage = getattr(study._storage, "_backend", study._storage)
    if not isinstance(storage, optuna.storages.RDBStorage):
        return
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    ids = [t._trial_id for t in running]
    with _create_scoped_session(storage.scoped_session) as session:
        beating = {row[0] for row in session.query(models.TrialHeartbeatModel.trial_id)
                   .filter(models.TrialHeartbeatModel.trial_id.in_(ids)).all()}
    now = dt.datetime.now()  # optuna stores datetime_start as naive local time
    for trial in running:
        started = trial.datetime_start
        if trial._trial_id in beating or started is None:
            continue
        if (now - started.replace(tzinfo=None)).total_seconds() > grace_seconds:
            with contextlib.suppress(Exception):  # another worker may have settled it meanwhile
                _mark_interrupted(storage, trial._trial_id)


def was_interrupted(trial: FrozenTrial) -> bool:
    """A FAILed trial that did not fail by itself: stopped by a signal (marked ``interrupted``), or its worker died
    (Optuna failed it when its heartbeat went stale, which leaves no error); not one whose training raised or
    whose budget other workers took (those carry ``error`` / ``surplus``)."""
    attrs = trial.user_attrs
    return trial.state == TrialState.FAIL and (bool(attrs.get(INTERRUPTED)) or
                                               not ("error" in attrs or "surplus" in attrs))


def _mark_interrupted(storage: Any, trial_id: int) -> None:
    """Record a RUNNING trial as interrupted and FAIL (it is run again: see :func:`_retry_interrupted`)."""
    if storage.get_trial(trial_id).state == TrialState.RUNNING:
        storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _retry_interrupted(study: optuna.Study, console: Console) -> None:
    """Queue, once each, the parameters of the trials that were interrupted (a signal, or a killed worker whose
    heartbeat stopped): the budget counts finished trials only, so a resumed sweep ends with the same trials as one
    that was never stopped, none lost and none run twice."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    for trial in trials:
        if was_interrupted(trial) and trial.number not in retried:
            console.print(f"trial {trial.number:>3} was interrupted: it runs again with the same parameters",
                          highlight=False)
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})


def run_sweep(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (),
              data_dir: str | Path | None = None, console: Console | None = None,
              parent_run_id: str | None = None) -> SweepResult:
    """Run (or resume, or join) the recipe's study as one worker; see the module docstring. ``parent_run_id``:
    an MLflow run to nest the worker's run under."""
    console = console or Console(stderr=True)
    source = str(recipe_path)
    raw = read_recipe_file(recipe_path)
    for text in overrides:
        keys, value = parse_override(text)
        set_path(raw, keys, value)
    base = validate_recipe(raw, source)
    if base.sweep is None:
        raise RecipeError(f"{source}: recipe has no sweep section (add sweep: {{space: ...}} to sweep it)")
    config: SweepConfig = base.sweep
    if not config.space:
        raise RecipeError(f"{source}: sweep.space is empty: name at least one recipe key to search over")
    check_space(raw, config.space, source)
    base_dict = recipe_to_dict(base)

    monitor = base.train.early_stopping.monitor if base.train.early_stopping else "auc"
    if monitor not in base.train.metrics:
        raise RecipeError(f"{source}: train.metrics must include {monitor} (the metric the sweep optimizes)")
    direction: Literal["maximize", "minimize"] = "maximize" if _MAXIMIZE[monitor] else "minimize"
    from ctrlab.train.state import recipe_digest

    # The sweep's folder holds its study, trials and plots; each trial's run folder inside it is the sweep's own,
    # so a trial replaces whatever an earlier study left under the same number.
    output_dir = OutputFolder(base.output_dir, "sweep", base.name, recipe_digest(base_dict)).open()
    remove_stale_in(output_dir / TRIALS_DIR)  # trials of killed workers: their numbers never come again
    storage_url = config.storage or default_storage(output_dir)
    study_name = config.study_name or base.name

    def on_stale(_study: optuna.Study, trial: FrozenTrial) -> None:
        console.print(f"trial {trial.number:>3} FAIL     its worker stopped sending heartbeats (killed?); "
                      "it does not count", highlight=False)

    storage = make_storage(storage_url, on_stale)
    factory = _sampler_factory(config)
    sampler = _PerTrialSeeded(factory, base.seed)
    with _optuna_quiet():
        study = optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                                    sampler=sampler,
                                    pruner=_pruner(config, base.train.epochs), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise RecipeError(f"{source}: study '{study_name}' in {redact_url(storage_url)} is set to "
                          f"{study.direction.name.lower()}, but the recipe monitors {monitor} ({direction}); "
                          "set sweep.study_name to start a new study")

    n_trials = config.n_trials
    deadline = time.monotonic() + config.timeout_seconds if config.timeout_seconds else None
    pass_parent = _accepts_parent_run_id()
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in _FINISHED)
    console.print(f"sweep {escape(study_name)}: {len(config.space)} parameters, {n_trials} trials ({done} done), "
                  f"{direction} valid {monitor}", highlight=False, soft_wrap=True)
    console.print(f"storage {escape(redact_url(storage_url))}", highlight=False, soft_wrap=True)

    if config.baseline_trial and not study.get_trials(deepcopy=False):
        first = baseline_params(config.space, base_dict)
        if first is not None:
            console.print("trial   0 runs the recipe's own values of the space (sweep.baseline_trial)", highlight=False)
            study.enqueue_trial(first, user_attrs={"baseline": True})

    with _parent_run(base, study_name, parent_run_id) as parent:
        if parent is not None:
            parent.log_params({"sweep.n_trials": n_trials, "sweep.sampler": config.sampler,
                               "sweep.pruner": config.pruner, "sweep.study_name": study_name,
                               "sweep.storage": redact_url(storage_url), "sweep.monitor": monitor,
                               **{f"space.{k}": json.dumps(v.model_dump(mode="json", exclude_defaults=True))
                                  for k, v in config.space.items()}})
        mine: list[FrozenTrial] = []
        errors: dict[int, BaseException] = {}

        def objective(trial: optuna.Trial) -> float:
            try:
                return _objective(trial)
            except optuna.TrialPruned:
                raise
            except (Terminated, Interrupted, KeyboardInterrupt):
                # Recorded now (a SIGTERM would leave it RUNNING until its heartbeat goes stale) and run again, with
                # the same parameters, by the next worker (see _retry_interrupted).
                trial.set_user_attr(INTERRUPTED, True)  # FAIL: by Optuna (Ctrl-C), or below (a signal)
                raise
            except BaseException as error:
                errors[trial.number] = error
                trial.set_user_attr("error", _one_line(error)[:500])
                raise

        def _objective(trial: optuna.Trial) -> float:
            ahead = sum(1 for t in study.get_trials(deepcopy=False, states=(*_FINISHED, TrialState.RUNNING))
                        if t.state in _FINISHED or t.number < trial.number)
            if ahead >= n_trials:
                trial.set_user_attr("surplus", True)
                raise _BudgetTaken("not run: the budget was taken by other workers meanwhile")
            # A queued trial (the baseline, or a rerun) gets its fixed values from the suggestions, which record them
            # as the trial's parameters, as the sampler needs.
            params = sample_params(trial, config.space, base_dict)
            trial.set_user_attr("overrides", params)
            data = apply_params(raw, params)
            data.pop("sweep", None)
            trial_dir = output_dir / TRIALS_DIR / str(trial.number)
            data["output_dir"] = str(trial_dir)
            if base.tracking.enabled:
                set_path(data, ["tracking", "run_name"], f"{study_name}-trial-{trial.number}")
            recipe = validate_recipe(data, f"{source} (trial {trial.number})")
            warmup = config.pruner_warmup_epochs if config.pruner != "hyperband" else 0

            def report(record: Any) -> None:
                value = record.valid.get(monitor, float("nan"))
                trial.report(float(value), record.epoch)
                # never in the warm-up, nor at the last epoch (the trial has done all its work by then)
                if warmup < record.epoch < recipe.train.epochs and trial.should_prune():
                    trial.set_user_attr("pruned_at_epoch", record.epoch)
                    raise optuna.TrialPruned(f"pruned at epoch {record.epoch} ({monitor} {value:.5f})")

            from ctrlab.train.run import train_recipe

            kwargs: dict[str, Any] = {}
            if pass_parent and parent is not None:
                kwargs["parent_run_id"] = parent.run_id
            result = train_recipe(recipe, data_dir=data_dir, console=_QUIET, callbacks=[report], overwrite=True,
                                  **kwargs)
            trial.set_user_attr("output_dir", str(result.output_dir))
            trial.set_user_attr("test", result.metrics.get("test", {}))
            trial.set_user_attr("best_epoch", result.metrics.get("best_epoch"))
            value = float(result.metrics["valid"][monitor])
            if math.isnan(value):
                trial.set_user_attr("error", f"validation {monitor} is NaN")
            return value

        def on_trial(study_: optuna.Study, trial: FrozenTrial) -> None:
            mine.append(trial)
            if trial.user_attrs.get("surplus"):
                console.print(f"trial {trial.number:>3} not run: other workers took the rest of the budget meanwhile "
                              "(recorded as FAIL)", highlight=False)
                study_.stop()
                return
            _print_trial(console, study_, trial, monitor)
            if parent is not None and trial.state == TrialState.COMPLETE and trial.value is not None:
                with contextlib.suppress(Exception):
                    parent.log_metrics({f"trial_{monitor}": float(trial.value)}, step=trial.number)

        waiting_said = False
        with _optuna_quiet():
            while True:
                optuna.storages.fail_stale_trials(study)
                _fail_trials_without_heartbeat(study, HEARTBEAT_GRACE)
                _retry_interrupted(study, console)
                trials = study.get_trials(deepcopy=False)
                finished = sum(1 for t in trials if t.state in _FINISHED)
                running = sum(1 for t in trials if t.state == TrialState.RUNNING)
                if finished >= n_trials:
                    break
                remaining_time = None if deadline is None else deadline - time.monotonic()
                if remaining_time is not None and remaining_time <= 0:
                    console.print(f"timeout: sweep.timeout_seconds ({config.timeout_seconds:g}) reached")
                    break
                if finished + running >= n_trials:
                    if not waiting_said:
                        console.print(f"waiting for {running} running trial(s) of other workers", highlight=False)
                        waiting_said = True
                    time.sleep(WAIT_POLL_SECONDS)
                    continue
                waiting_said = False
                before = len(mine)
                try:
                    study.optimize(objective, n_trials=n_trials - finished - running, timeout=remaining_time,
                                   catch=(Exception,),
                                   callbacks=[on_trial, optuna.study.MaxTrialsCallback(n_trials, states=_FINISHED),
                                              # after a trial of ours ends, RUNNING ones are other workers': when
                                              # they would fill the budget, stop asking (and wait above)
                                              optuna.study.MaxTrialsCallback(n_trials, states=_TAKEN)])
                except (Terminated, Interrupted, KeyboardInterrupt):
                    # Stopped outside the objective (asking for the trial, sampling): the trial is recorded as
                    # interrupted now, so the next worker runs it again instead of waiting for its heartbeat.
                    if sampler.current_trial_id is not None:
                        with contextlib.suppress(Exception):  # already finished: nothing to mark
                            _mark_interrupted(study._storage, sampler.current_trial_id)
                    raise
                round_trials = [t for t in mine[before:] if not t.user_attrs.get("surplus")]
                if round_trials and not any(t.state in _FINISHED for t in round_trials):
                    _all_failed(console, round_trials, errors, study)
                    break

        result = _finish(study, base, raw, source, output_dir, storage_url, direction, monitor, console)
        result.trials_run = sum(1 for t in mine if not t.user_attrs.get("surplus"))
        if parent is not None:
            _log_parent(parent, result)
    return result


def _print_trial(console: Console, study: optuna.Study, trial: FrozenTrial, monitor: str) -> None:
    state = trial.state.name
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        what = f"{monitor} {trial.value:.5f}"
    elif trial.state == TrialState.PRUNED:
        epoch = trial.user_attrs.get("pruned_at_epoch")
        last = trial.intermediate_values.get(epoch) if epoch is not None else None
        what = f"at epoch {epoch}" + (f" ({monitor} {last:.5f})" if last is not None else "")
    else:
        what = trial.user_attrs.get("error", "failed")
    try:
        best = study.best_trial
        best_text = f"best {best.value:.5f} (trial {best.number})"
    except ValueError:
        best_text = "best -"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    console.print(f"trial {trial.number:>3} {state:<8} {escape(what)}  {escape(_fmt_params(_trial_params(trial)))}  "
                  f"{seconds:.0f}s  {best_text}", highlight=False, soft_wrap=True)


def _all_failed(console: Console, trials: list[FrozenTrial], errors: dict[int, BaseException],
                study: optuna.Study) -> None:
    """A whole round failed: stop this worker. If nothing ever succeeded and every trial failed with the same user
    error (a missing data file, a recipe the data contradicts), that error is raised as the sweep's own."""
    failures = [errors.get(t.number) for t in trials]
    ever_succeeded = any(t.state in _FINISHED for t in study.get_trials(deepcopy=False))
    messages = {_one_line(e) for e in failures if e is not None}
    if (not ever_succeeded and failures and all(isinstance(e, CtrlabError) for e in failures)
            and len(messages) == 1):
        error = failures[-1]
        assert isinstance(error, CtrlabError)
        raise type(error)(f"every trial failed: {error.message}")
    last = trials[-1].user_attrs.get("error", "failed")
    console.print(f"stopping: all {len(trials)} trial(s) of this round failed (last: {escape(str(last))})",
                  highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ outputs
def _finish(study: optuna.Study, base: Recipe, raw: dict[str, Any], source: str, output_dir: Path,
            storage_url: str, direction: str, monitor: str, console: Console) -> SweepResult:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    trials_csv = output_dir / TRIALS_CSV
    write_trials_csv(trials, trials_csv)
    best: FrozenTrial | None
    try:
        best = study.best_trial
    except ValueError:
        best = None
    best_recipe = None
    if best is not None:
        best_recipe = output_dir / BEST_RECIPE
        write_text_atomic(best_recipe, yaml.safe_dump(best_recipe_dict(best, base, raw, source, output_dir),
                                                      sort_keys=False))
    plots = save_plots(study, output_dir, console)
    return SweepResult(study_name=study.study_name, storage=storage_url, output_dir=output_dir, direction=direction,
                       monitor=monitor, best_value=best.value if best else None,
                       best_params=_trial_params(best) if best else {}, best_trial=best.number if best else None,
                       best_recipe=best_recipe, trials_csv=trials_csv, counts=counts, plots=plots,
                       baseline_trial=next((t.number for t in trials if t.user_attrs.get("baseline")), None))


def best_recipe_dict(best: FrozenTrial, base: Recipe, raw: dict[str, Any], source: str,
                     output_dir: Path) -> dict[str, Any]:
    """The best trial's resolved recipe (its ``recipe.yaml``; rebuilt from the base recipe and its overrides when
    the trial ran on another machine), with ``output_dir: <output_dir>/best`` and no ``sweep`` section."""
    trial_recipe = Path(best.user_attrs.get("output_dir", output_dir / TRIALS_DIR / str(best.number))) / "recipe.yaml"
    data: dict[str, Any] | None = None
    if trial_recipe.is_file():
        with contextlib.suppress(CtrlabError):
            data = read_recipe_file(trial_recipe)
    if data is None:
        data = apply_params(raw, _trial_params(best))
    data.pop("sweep", None)
    data["output_dir"] = str(output_dir / "best")
    if isinstance(data.get("tracking"), dict):
        if base.tracking.run_name is None:
            data["tracking"].pop("run_name", None)
        else:
            data["tracking"]["run_name"] = base.tracking.run_name
    return recipe_to_dict(validate_recipe(data, f"{source} (best trial {best.number})"))


def write_trials_csv(trials: list[FrozenTrial], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "value", "params", "duration_seconds", "pruned_at_epoch", "test",
                     "output_dir", "error"])
    for t in sorted(trials, key=lambda t: t.number):
        writer.writerow([
            t.number, t.state.name, "" if t.value is None else repr(float(t.value)),
            json.dumps(_trial_params(t), sort_keys=True),
            "" if t.duration is None else f"{t.duration.total_seconds():.3f}",
            t.user_attrs.get("pruned_at_epoch", ""),
            json.dumps(t.user_attrs["test"]) if "test" in t.user_attrs else "",
            t.user_attrs.get("output_dir", ""), t.user_attrs.get("error", ""),
        ])
    write_text_atomic(path, buffer.getvalue())


def save_plots(study: optuna.Study, output_dir: Path, console: Console) -> list[Path]:
    """Optuna's optimization history and (with >= 2 completed trials over > 1 parameter) parameter importances,
    as PNG files in ``output_dir``. A plot that cannot be drawn is skipped with a note."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    wanted: list[tuple[str, Callable[[optuna.Study], Any]]] = [(HISTORY_PNG, ovm.plot_optimization_history)]
    names = {name for t in complete for name in t.params}
    if len(complete) >= 2 and len(names) > 1:
        wanted.append((IMPORTANCE_PNG, ovm.plot_param_importances))
    saved: list[Path] = []
    for filename, plot in wanted:
        try:
            with _optuna_quiet():
                figure = _root_figure(plot(study))
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            path = output_dir / filename
            tmp = output_dir / f".{filename}.tmp.png"
            figure.savefig(tmp, dpi=100)
            os.replace(tmp, path)
            plt.close(figure)
            saved.append(path)
        except Exception as error:  # plots are a convenience: never fail the sweep over one
            console.print(f"note: {filename} not drawn ({escape(_one_line(error))})", highlight=False)
    return saved


def _root_figure(plotted: Any) -> Figure:
    """The figure an Optuna matplotlib plot drew on (the plot returns an Axes, or an array of them)."""
    from matplotlib.figure import Figure

    axes = plotted if hasattr(plotted, "figure") else plotted.flat[0]
    figure = axes.figure
    return figure if isinstance(figure, Figure) else figure.figure  # a SubFigure's .figure is its root Figure


def _log_parent(parent: Any, result: SweepResult) -> None:
    """Best value and parameters, trials.csv, best_recipe.yaml and the plots, on the worker's parent run."""
    metrics = {f"trials_{state.lower()}": float(n) for state, n in result.counts.items()}
    if result.best_value is not None:
        metrics[f"best_{result.monitor}"] = float(result.best_value)
    steps: list[Any] = [lambda: parent.log_metrics(metrics)]
    if result.best_params:
        best = {f"best.{k}": v if isinstance(v, (int, float, str)) else json.dumps(v)
                for k, v in result.best_params.items()}
        steps += [lambda: parent.log_params(best),
                  lambda: parent.set_tags({"ctrlab.best_trial": str(result.best_trial)})]
    steps.append(lambda: parent.log_artifact(result.trials_csv))
    if result.best_recipe is not None:
        steps.append(lambda: parent.log_artifact(result.best_recipe))
    for plot in result.plots:
        steps.append(lambda plot=plot: parent.log_artifact(plot, artifact_path="plots"))
    for step in steps:
        with contextlib.suppress(Exception):  # tracking never fails a finished sweep
            step()

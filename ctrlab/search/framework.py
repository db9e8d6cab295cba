"""The architecture-search framework every paper's search runs on (OptEmbed, DNIS, OptFS, ...).

A *searching section* of a recipe is a part whose kind searches its own architecture: an embedding kind
(``embedding.kind: optembed`` or ``dnis``, which search the table), a gate kind (``gate.kind: optfs``, which searches
the feature set) or a pair-layer kind (``interaction.kind: optinter``, which searches each pair's method). Its config
lists ``stages`` (the method's stage names, in order) and may name ``from_run``, an earlier run directory whose
outputs the first listed stage starts from.

A *search method* is one module of this package that registers a :class:`SearchMethod` subclass under the kind's name
(:func:`register`); :data:`SEARCH_METHODS` finds it by name. A method's :meth:`SearchMethod.run` gets a
:class:`SearchContext` and returns a :class:`SearchOutcome`, whose :attr:`~SearchOutcome.artefact` (a typed
:class:`Artefact`: dims and row masks, a kept feature set, ...) the framework saves under the method's folder of the
run directory, summarises into ``metrics.json`` and MLflow, and whose hooks then shape the rest of the run:
:meth:`~SearchOutcome.prepare_data` (e.g. the kept feature values) before anything else is built, and
:meth:`~SearchOutcome.prepare_model` on the run's freshly built final model (pruning a table, rewinding weights).

:func:`run_searches` runs the recipe's searching sections in model order (gate, pair layer, then embedding: the pair
search sees the kept feature set, the table search both). Each runs with the global random state saved and restored,
so the final training is the same whichever stages ran here. Importing this module imports neither the trainer nor
Optuna: methods do their imports themselves.
"""

from __future__ import annotations

import random
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.data.processor import FeatureProcessor
from ctrlab.errors import DataError, RecipeError
from ctrlab.interactions.base import decided
from ctrlab.models.ctr_model import CTRModel, build_model
from ctrlab.registry import PackageRegistry
from ctrlab.run_dir import seed_everything
from ctrlab.utils.checkpoint import load_weights
from ctrlab.utils.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from ctrlab.config.schema import Recipe
    from ctrlab.embeddings.base import FeatureEmbedding
    from ctrlab.gates.base import FeatureGate
    from ctrlab.interactions.base import PairInteraction
    from ctrlab.tracking import RunLogger


class Artefact(Protocol):
    """What a search found, as a typed object that writes itself into a folder (files a later run reads back with
    the method's own loader) and summarises itself in numbers (``metrics.json``, MLflow)."""

    def save(self, directory: Path) -> None: ...

    def summary(self) -> dict[str, Any]: ...


@dataclass
class SearchData:
    """The data a run trains on, which a search may change (a feature-set search restricts the processor, and so the
    layout, and re-encodes the tensorised splits): the fitted processor and the splits as tensors."""

    processor: FeatureProcessor
    batches: dict[str, FeatureBatch]

    @property
    def layout(self) -> FeatureLayout:
        return self.processor.layout


@dataclass
class SearchOutcome:
    """What a method returns: its ``artefact``, whether the run's final training re-trains (``retrain`` listed),
    and the stages' own figures (``summary``). Subclasses override the two hooks to shape the rest of the run."""

    artefact: Artefact
    retrain: bool
    summary: dict[str, Any] = field(default_factory=dict)

    def prepare_data(self, data: SearchData) -> None:
        """Change the run's data before the next searches and the final model are built (default: nothing)."""

    def prepare_model(self, model: CTRModel) -> None:
        """Change the run's final model (built from the recipe, after seeding) before it trains (default:
        nothing)."""


@dataclass
class SearchContext:
    """What a search method gets: the resolved recipe, its searching section (``config``), the run's data (as the
    earlier searches left it), the device, the console, the MLflow run (or None) and ``directory``, the method's
    folder of the run directory (being written)."""

    recipe: Recipe
    config: Any
    data: SearchData
    device: torch.device
    console: Console
    tracker: RunLogger | None
    directory: Path
    method: str
    section: str

    @property
    def layout(self) -> FeatureLayout:
        return self.data.layout

    @property
    def batches(self) -> dict[str, FeatureBatch]:
        return self.data.batches

    @property
    def dim(self) -> int:
        return int(self.recipe.embedding.dim)

    def earlier(self, name: str) -> Path:
        """A stage output of ``from_run``; a missing file is a :class:`DataError` naming it."""
        if self.config.from_run is None:
            raise RecipeError(f"{self.section}.from_run: stages {self.config.stages} need {name} from an earlier run")
        path = Path(self.config.from_run) / self.directory.name / name
        if not path.is_file():
            raise DataError(f"{path}: not found; {self.section}.from_run must be a run directory whose stages wrote "
                            f"{self.directory.name}/{name}")
        return path

    def copy_earlier(self, name: str) -> Path:
        """Copy a stage output of ``from_run`` into this run's directory (so the run is complete on its own)."""
        source = self.earlier(name)
        target = self.directory / name
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return target

    def build_network(self, main_embedding: Callable[[Any, FeatureLayout], FeatureEmbedding] | None = None,
                      gate: FeatureGate | None = None,
                      interaction: Callable[[FeatureLayout, int, float], PairInteraction] | None = None) -> CTRModel:
        """The recipe's model for the current layout, with ``main_embedding`` as its main embedding, ``gate`` in
        the gate slot and ``interaction(layout, width, init_std)`` as its pair layer when given, built after seeding
        with the recipe's seed: it starts from the same initial values as the run's own model (same seed, same
        draws)."""
        return self.build_network_for(self.layout, main_embedding, gate, interaction)

    def build_network_for(self, layout: FeatureLayout,
                          main_embedding: Callable[[Any, FeatureLayout], FeatureEmbedding] | None = None,
                          gate: FeatureGate | None = None,
                          interaction: Callable[[FeatureLayout, int, float], PairInteraction] | None = None,
                          ) -> CTRModel:
        """:meth:`build_network` for another layout (e.g. the one a search saw, after the data changed).

        The pair layer is ``interaction`` when given (a pair search's mixture), else the recipe's once its pairs
        are decided (a fixed architecture, or a pair search that ran earlier), else none: a search that runs before
        the pair search sees the model without pair vectors."""
        seed_everything(self.recipe.seed)
        config = self.recipe.interaction
        return build_model(self.recipe.embedding, self.recipe.model, layout, main_embedding, gate,
                           interaction_config=config if decided(config, layout) and interaction is None else None,
                           interaction=interaction)

    def load_network(self, model: CTRModel, path: Path) -> None:
        try:
            load_weights(model, path)
        except RuntimeError as error:  # shapes differ
            raise DataError(f"{path}: the weights do not fit this recipe's features and model "
                            f"({str(error).splitlines()[-1].strip()})") from None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)

    def progress(self) -> Progress | None:
        if not self.recipe.train.progress:
            return None
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)

    def say(self, text: str) -> None:
        self.console.print(f"[bold]{self.method}[/bold] {text}", highlight=False, soft_wrap=True)


class SearchMethod(ABC):
    """A paper's search: ``name`` (the searching kind it runs), ``directory`` (its folder of a run directory) and
    :meth:`run`, which runs the stages its config lists."""

    name: ClassVar[str]
    directory: ClassVar[str]

    @abstractmethod
    def run(self, context: SearchContext) -> SearchOutcome:
        """Run the listed stages (stages left out at the front are read from ``from_run``)."""


class MethodRegistry(PackageRegistry[type[SearchMethod]]):
    """Search methods by name: every module of :mod:`ctrlab.search` is imported on first use (a module registers
    its method with :func:`register`), so a new method is one new file."""

    def register(self, method: type[SearchMethod]) -> type[SearchMethod]:
        self._add(method.name, method)
        return method


SEARCH_METHODS = MethodRegistry("search method", "ctrlab.search")


def register(method: type[SearchMethod]) -> type[SearchMethod]:
    """Class decorator: register a search method under its ``name``."""
    return SEARCH_METHODS.register(method)


def is_searching(config: Any) -> bool:
    """Whether a recipe section's kind searches its architecture (it lists stages)."""
    return config is not None and hasattr(config, "stages") and hasattr(config, "from_run")


def searching_sections(recipe: Recipe) -> list[tuple[str, Any]]:
    """The recipe's searching sections in the order they run: the gate (feature set), the pair layer (which pairs
    to memorise or factorise), then the embedding (table)."""
    sections = [("gate", recipe.gate), ("interaction", recipe.interaction), ("embedding", recipe.embedding)]
    return [(name, config) for name, config in sections if is_searching(config)]


# ------------------------------------------------------------------------------------------------- helpers
def flatten_numbers(data: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric leaves of nested dicts as ``prefix.key.subkey`` (for MLflow metrics)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flatten_numbers(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global random state on exit."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


@dataclass
class SearchRun:
    """What :func:`run_searches` did: every method's outcome, in order, and their summaries by folder name
    (``metrics.json`` keys)."""

    outcomes: list[SearchOutcome] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def retrain(self) -> bool:
        return all(outcome.retrain for outcome in self.outcomes)

    def prepare_model(self, model: CTRModel) -> None:
        for outcome in self.outcomes:
            outcome.prepare_model(model)


def run_searches(recipe: Recipe, data: SearchData, device: torch.device, console: Console,
                 tracker: RunLogger | None, run_dir: Path) -> SearchRun:
    """Run every searching section of ``recipe`` (see the module docstring) on ``data``, which their outcomes may
    change; write each method's artefact under ``run_dir/<its folder>``, log its summary to MLflow as
    ``<folder>.*`` metrics, and return the outcomes (whose :meth:`SearchRun.prepare_model` the run applies to its
    final model)."""
    done = SearchRun()
    for section, config in searching_sections(recipe):
        method = SEARCH_METHODS.get(config.kind)
        directory = run_dir / method.directory
        directory.mkdir(parents=True, exist_ok=True)
        context = SearchContext(recipe, config, data, device, console, tracker, directory, method.name, section)
        with preserved_random_state():
            outcome = method().run(context)
        outcome.artefact.save(directory)
        outcome.prepare_data(data)
        summary = {"method": method.name, "stages": list(config.stages), "from_run": config.from_run,
                   **outcome.artefact.summary(), **outcome.summary}
        outcome.summary = summary
        done.outcomes.append(outcome)
        done.summaries[method.directory] = summary
        if tracker is not None:
            tracker.log_metrics(flatten_numbers({k: v for k, v in summary.items() if k != "rows"}, method.directory))
    return done

"""Embedding-table searches inside a training run (``embedding.kind: optembed`` or ``dnis``).

:func:`run_embedding_search` is the hook :func:`ctrlab.train.run.train_recipe` calls before its final training
when the recipe's embedding kind searches its table. It runs the stages the recipe lists (the method's module,
:mod:`ctrlab.search.optembed` or :mod:`ctrlab.search.dnis`, does the work), writes every stage's outputs under
``<run>/embedding_search/`` and prunes the run's freshly built model to the found architecture; the run then trains
that model (stage ``retrain``) with the recipe's ``train`` settings and saves it as usual. Without ``retrain`` the
run's model takes the searched network's weights instead and is only evaluated (for DNIS, whose kept dimensions are
not a field's leading ones, with the full table: its dims are saved for a later ``retrain``).

Shared outputs (every searching run writes them, so a run directory is complete on its own):

``dims.json``
    ``{"dim": D, "dims": {unit: kept dimensions}, "order": {unit: [source dimensions]}}``; a *unit* is a vocabulary
    table or a numeric field (see :mod:`ctrlab.embeddings.mixed_dim`).
    With frequency blocks (DNIS ``blocks`` > 1) also ``"block_dims": {unit: [kept dimensions per block]}`` and
    ``"block_order": {unit: [[source dimensions] per block]}``.
``row_mask.safetensors``
    one bool-as-uint8 tensor per vocabulary table, 1 = row kept (OptEmbed only; DNIS keeps every row).
``row_blocks.safetensors``
    with frequency blocks: per blocked table the block of every row (int64; 0 = the most frequent values).

Stages that read an earlier run (``embedding.from_run``) copy what they read into this run's directory. The
global random state is restored after the search, so the final training is the same whichever stages ran here.
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from ctrlab.config.schema import Recipe
from ctrlab.data.batches import BatchIterator, FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings.base import FeatureEmbedding
from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture, EmbeddingUnits, MixedDimEmbedding
from ctrlab.embeddings.searchable import SearchableEmbeddingConfig
from ctrlab.errors import DataError, RecipeError
from ctrlab.models.ctr_model import CTRModel, build_model
from ctrlab.tracking import RunLogger
from ctrlab.train.device import autocast
from ctrlab.train.metrics import auc
from ctrlab.train.run import EMBEDDING_SEARCH_DIR, seed_everything
from ctrlab.utils.checkpoint import load_weights
from ctrlab.utils.io import atomic_path, write_json_atomic

DIMS_FILE = "dims.json"
ROW_BLOCKS_FILE = "row_blocks.safetensors"
ROW_MASK_FILE = "row_mask.safetensors"

#: embedding kind -> module with ``run(context) -> SearchOutcome``
METHODS = {"optembed": "ctrlab.search.optembed", "dnis": "ctrlab.search.dnis"}


@dataclass
class SearchContext:
    """What a search method gets: the resolved recipe, the layout, the tensorised splits, the device, the
    console, the MLflow run (or None) and ``directory``, this run's ``embedding_search/`` (being written)."""

    recipe: Recipe
    layout: FeatureLayout
    batches: dict[str, FeatureBatch]
    device: torch.device
    console: Console
    tracker: RunLogger | None
    directory: Path

    @property
    def config(self) -> Any:
        return self.recipe.embedding

    @property
    def units(self) -> EmbeddingUnits:
        return EmbeddingUnits.from_layout(self.layout)

    @property
    def dim(self) -> int:
        return int(self.config.dim)

    def earlier(self, name: str) -> Path:
        """A stage output of ``embedding.from_run``; a missing file is a :class:`DataError` naming it."""
        if self.config.from_run is None:
            raise RecipeError(f"embedding.from_run: stages {self.config.stages} need {name} from an earlier run")
        path = Path(self.config.from_run) / EMBEDDING_SEARCH_DIR / name
        if not path.is_file():
            raise DataError(f"{path}: not found; embedding.from_run must be a run directory whose stages wrote "
                            f"{EMBEDDING_SEARCH_DIR}/{name}")
        return path

    def copy_earlier(self, name: str) -> Path:
        """Copy a stage output of ``from_run`` into this run's directory (so the run is complete on its own)."""
        source = self.earlier(name)
        target = self.directory / name
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return target

    def build_network(self, main_embedding: Callable[[Any, FeatureLayout], FeatureEmbedding]) -> CTRModel:
        """The recipe's model with ``main_embedding`` as its main embedding, built after seeding with the recipe's
        seed: it starts from the same initial values as the run's own model (same seed, same draws)."""
        seed_everything(self.recipe.seed)
        return build_model(self.recipe.embedding, self.recipe.model, self.layout, main_embedding)

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
        self.console.print(f"[bold]{self.config.kind}[/bold] {text}", highlight=False, soft_wrap=True)


@dataclass
class SearchOutcome:
    """What a search found: the architecture, whether the run re-trains (``retrain`` listed), the searched
    network (kept when the run does not re-train: the final model takes its weights) and the stages' figures.

    ``network_architecture`` is what the run's own model keeps when it is not re-trained, if that differs from
    ``architecture`` (DNIS keeps a field's most significant dimensions, not its leading ones, so its searched
    network's blocks only fit the full table)."""

    architecture: EmbeddingArchitecture
    retrain: bool
    network: CTRModel | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    network_architecture: EmbeddingArchitecture | None = None


# ------------------------------------------------------------------------------------------ architecture files
def save_architecture(architecture: EmbeddingArchitecture, directory: Path) -> None:
    """``dims.json``, with pruned rows ``row_mask.safetensors``, with frequency blocks ``row_blocks.safetensors``."""
    data: dict[str, Any] = {"dim": architecture.dim, "dims": architecture.dims, "order": architecture.order}
    if architecture.blocks:
        data.update(block_dims=architecture.block_dims, block_order=architecture.block_order)
        with atomic_path(directory / ROW_BLOCKS_FILE) as tmp:
            save_file({k: v.to(torch.int64).contiguous() for k, v in architecture.blocks.items()}, str(tmp))
    write_json_atomic(directory / DIMS_FILE, data)
    if architecture.rows:
        with atomic_path(directory / ROW_MASK_FILE) as tmp:
            save_file({k: v.to(torch.uint8).contiguous() for k, v in architecture.rows.items()}, str(tmp))


def load_row_mask(path: Path, units: EmbeddingUnits) -> dict[str, torch.Tensor]:
    rows = {name: t.to(torch.bool) for name, t in load_file(str(path)).items()}
    for name, mask in rows.items():
        if name not in units.names or mask.shape != (units.rows[units.index(name)],):
            raise DataError(f"{path}: row mask {name!r} ({tuple(mask.shape)}) does not fit this recipe's tables "
                            f"({dict(zip(units.names, units.rows))})")
    return rows


def load_dims(path: Path, units: EmbeddingUnits, dim: int) -> EmbeddingArchitecture:
    """The dims, orders and block dims of ``dims.json`` (no row masks or row blocks yet)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        dims = {str(k): int(v) for k, v in data["dims"].items()}
        order = {str(k): [int(i) for i in v] for k, v in data.get("order", {}).items()}
        block_dims = {str(k): [int(d) for d in v] for k, v in data.get("block_dims", {}).items()}
        block_order = {str(k): [[int(i) for i in o] for o in v] for k, v in data.get("block_order", {}).items()}
        saved_dim = int(data["dim"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: not a dims file ({error})") from None
    named = set(dims) | set(block_dims)
    if saved_dim != dim or named - set(units.names):
        raise DataError(f"{path}: dims for width {saved_dim} and units {sorted(named)} do not fit embedding.dim "
                        f"{dim} and this recipe's units {list(units.names)}")
    return EmbeddingArchitecture(dim, dims, {}, order, {}, block_dims, block_order)


def load_architecture(directory: Path, units: EmbeddingUnits, dim: int) -> EmbeddingArchitecture:
    """The architecture saved by :func:`save_architecture` in ``directory``."""
    architecture = load_dims(directory / DIMS_FILE, units, dim)
    mask_path = directory / ROW_MASK_FILE
    architecture.rows = load_row_mask(mask_path, units) if mask_path.is_file() else {}
    if architecture.block_dims:
        blocks_path = directory / ROW_BLOCKS_FILE
        if not blocks_path.is_file():
            raise DataError(f"{blocks_path}: not found; {directory / DIMS_FILE} has block dims")
        architecture.blocks = {name: t.to(torch.long) for name, t in load_file(str(blocks_path)).items()}
    try:
        architecture.check(units)
    except ValueError as error:
        raise DataError(f"{directory / DIMS_FILE}: {error}") from None
    return architecture


def architecture_summary(architecture: EmbeddingArchitecture, units: EmbeddingUnits) -> dict[str, Any]:
    """Kept parameters, sparsity, dims and kept rows per unit."""
    kept_rows = architecture.kept_rows(units)
    full = EmbeddingArchitecture.full_parameters(units, architecture.dim)
    kept = architecture.kept_parameters(units)
    table_rows = sum(units.rows[:units.num_tables])
    kept_table_rows = sum(kept_rows[n] for n in units.names[:units.num_tables])
    return {
        "full_parameters": full, "kept_parameters": kept, "kept_fraction": kept / max(full, 1),
        "sparsity": 1 - kept / max(full, 1), "row_sparsity": 1 - kept_table_rows / max(table_rows, 1),
        "dims": {n: architecture.dim_of(n) for n in units.names}, "kept_rows": kept_rows,
        "rows": dict(zip(units.names, units.rows)),
    }


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


# ------------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def predict(model: CTRModel, data: FeatureBatch, batch_size: int, device: torch.device,
            precision: str = "fp32") -> np.ndarray:
    """Click probabilities of ``model`` in eval mode (``data`` already on ``device``)."""
    model.eval()
    out = []
    for batch in BatchIterator(data, batch_size):
        with autocast(device, precision):
            logits = model(batch)
        out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out).double().numpy()


def valid_auc(model: CTRModel, data: FeatureBatch, batch_size: int, device: torch.device,
              precision: str = "fp32") -> float:
    labels = data.label.cpu().numpy()  # type: ignore[union-attr]
    return auc(labels, predict(model, data, batch_size, device, precision))


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


# ------------------------------------------------------------------------------------------------ the hook
def apply_outcome(model: CTRModel, outcome: SearchOutcome) -> None:
    """Prune ``model``'s table to the found architecture; without re-training, first give ``model`` the searched
    network's weights (its table as the network effectively used it) and keep ``network_architecture``."""
    embedding = model.embedding
    assert isinstance(embedding, MixedDimEmbedding)
    if outcome.retrain:
        embedding.prune(outcome.architecture)
    else:
        network = outcome.network
        assert network is not None and network.embedding is not None
        state = {k: v for k, v in network.state_dict().items() if not k.startswith("embedding.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("embedding.")]
        if missing or unexpected:  # pragma: no cover - the same recipe builds both
            raise RuntimeError(f"searched network does not fit the model: missing {missing}, unexpected {unexpected}")
        embedding.reset_dense_(network.embedding.effective_table())  # type: ignore[attr-defined]
        embedding.prune(outcome.network_architecture or outcome.architecture)


def run_embedding_search(recipe: Recipe, model: CTRModel, batches: dict[str, FeatureBatch], device: torch.device,
                         console: Console, tracker: RunLogger | None, run_dir: Path) -> SearchOutcome:
    """Run the recipe's embedding-search stages, write their outputs under ``run_dir/embedding_search``, prune
    ``model`` (built from the recipe, full shapes) to the found architecture and return what was found.

    The figures (kept parameters and rows, dims, sparsity, each stage's own) go into the outcome's ``summary``
    (``metrics.json`` key ``embedding_search``) and, with tracking on, into MLflow as ``embedding_search.*``."""
    config = recipe.embedding
    assert isinstance(config, SearchableEmbeddingConfig)
    if not isinstance(model.embedding, MixedDimEmbedding):
        raise RecipeError(f"embedding.kind: {config.kind} searches the main embedding table, but model.block "
                          f"{recipe.model.block} has none; pick a block with an embedding")
    directory = run_dir / EMBEDDING_SEARCH_DIR
    directory.mkdir(parents=True, exist_ok=True)
    layout = model.embedding.layout
    context = SearchContext(recipe, layout, batches, device, console, tracker, directory)
    method = importlib.import_module(METHODS[config.kind])
    with preserved_random_state():
        outcome: SearchOutcome = method.run(context)
    save_architecture(outcome.architecture, directory)
    apply_outcome(model, outcome)
    summary = {"method": config.kind, "stages": list(config.stages), "from_run": config.from_run,
               **architecture_summary(outcome.architecture, context.units), **outcome.summary}
    outcome.summary = summary
    if tracker is not None:
        tracker.log_metrics(flatten_numbers({k: v for k, v in summary.items() if k != "rows"}, "embedding_search"))
    context.say(f"architecture: {summary['kept_parameters']:,} of {summary['full_parameters']:,} table parameters "
                f"kept ({summary['kept_fraction']:.1%}); rows pruned {summary['row_sparsity']:.1%}; dims "
                + " ".join(f"{n}={d}" for n, d in summary["dims"].items()))
    return outcome

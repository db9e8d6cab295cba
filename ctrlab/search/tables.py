"""What the embedding-table searches (``embedding.kind: optembed`` or ``dnis``) share on the search framework
(:mod:`ctrlab.search.framework`): their typed artefact, :class:`TableArchitecture` (the dims, row masks and
frequency blocks of a mixed-dimension table), its files, and :class:`TableOutcome`, which prunes the run's final
model to the found architecture. The run then trains that model (stage ``retrain``) with the recipe's ``train``
settings and saves it as usual. Without ``retrain`` the run's model takes the searched network's weights instead
and is only evaluated (for DNIS, whose kept dimensions are not a field's leading ones, with the full table: its dims
are saved for a later ``retrain``).

Files (every searching run writes them under ``<run>/embedding_search/``, so a run directory is complete on its
own):

``dims.json``
    ``{"dim": D, "dims": {unit: kept dimensions}, "order": {unit: [source dimensions]}}``; a *unit* is a vocabulary
    table or a numeric field (see :mod:`ctrlab.embeddings.mixed_dim`).
    With frequency blocks (DNIS ``blocks`` > 1) also ``"block_dims": {unit: [kept dimensions per block]}`` and
    ``"block_order": {unit: [[source dimensions] per block]}``.
``row_mask.safetensors``
    one bool-as-uint8 tensor per vocabulary table, 1 = row kept (OptEmbed only; DNIS keeps every row).
``row_blocks.safetensors``
    with frequency blocks: per blocked table the block of every row (int64; 0 = the most frequent values).

Stages that read an earlier run (``embedding.from_run``) copy what they read into this run's directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ctrlab.blocks import BLOCKS
from ctrlab.config.schema import Recipe
from ctrlab.data.batches import BatchIterator, FeatureBatch
from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture, EmbeddingUnits, MixedDimEmbedding
from ctrlab.embeddings.searchable import FullTableSearchEmbedding
from ctrlab.errors import DataError, RecipeError
from ctrlab.models.ctr_model import CTRModel
from ctrlab.search.framework import SearchContext, SearchOutcome
from ctrlab.train.device import autocast
from ctrlab.train.metrics import auc
from ctrlab.utils.io import atomic_path, write_json_atomic

DIMS_FILE = "dims.json"
ROW_BLOCKS_FILE = "row_blocks.safetensors"
ROW_MASK_FILE = "row_mask.safetensors"

def table_units(context: SearchContext) -> EmbeddingUnits:
    """The units (vocabulary tables, then numeric fields) of the context's current layout."""
    return EmbeddingUnits.from_layout(context.layout)


def check_has_table(recipe: Recipe, section: str) -> None:
    """A table search needs a block that embeds the features."""
    if not getattr(BLOCKS.get(recipe.model.block).impl, "needs_embedding", True):
        raise RecipeError(f"{section}.kind: {recipe.embedding.kind} searches the main embedding table, but "
                          f"model.block {recipe.model.block} has none; pick a block with an embedding")


@dataclass
class TableArchitecture:
    """The typed artefact of a table search: a mixed-dimension table's architecture over ``units``."""

    architecture: EmbeddingArchitecture
    units: EmbeddingUnits

    def save(self, directory: Path) -> None:
        save_architecture(self.architecture, directory)

    def summary(self) -> dict[str, Any]:
        return architecture_summary(self.architecture, self.units)

    @classmethod
    def load(cls, directory: Path, units: EmbeddingUnits, dim: int) -> TableArchitecture:
        return cls(load_architecture(directory, units, dim), units)


@dataclass
class TableOutcome(SearchOutcome):
    """A table search's outcome: besides the artefact, the searched network (kept when the run does not re-train:
    the final model takes its weights) and ``network_architecture``, what the run's own model keeps when it is not
    re-trained, if that differs from the artefact's (DNIS keeps a field's most significant dimensions, not its
    leading ones, so its searched network's blocks only fit the full table)."""

    network: CTRModel | None = None
    network_architecture: EmbeddingArchitecture | None = None

    @property
    def architecture(self) -> EmbeddingArchitecture:
        assert isinstance(self.artefact, TableArchitecture)
        return self.artefact.architecture

    def prepare_model(self, model: CTRModel) -> None:
        apply_outcome(model, self)


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


# ------------------------------------------------------------------------------------------------ the hook
def apply_outcome(model: CTRModel, outcome: TableOutcome) -> None:
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
        searched = network.embedding
        assert isinstance(searched, FullTableSearchEmbedding)
        embedding.reset_dense_(searched.effective_table())
        embedding.prune(outcome.network_architecture or outcome.architecture)


def report_architecture(context: SearchContext, artefact: TableArchitecture) -> None:
    """One line: kept table parameters, pruned rows, dims per unit."""
    summary = artefact.summary()
    context.say(f"architecture: {summary['kept_parameters']:,} of {summary['full_parameters']:,} table parameters "
                f"kept ({summary['kept_fraction']:.1%}); rows pruned {summary['row_sparsity']:.1%}; dims "
                + " ".join(f"{n}={d}" for n, d in summary["dims"].items()))

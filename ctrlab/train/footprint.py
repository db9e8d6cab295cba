"""Estimate what a run will need before anything is allocated, and refuse one that cannot fit.

The schema bounds every size on its own (see :mod:`ctrlab.config.base`); what it cannot see is products: a
modest ``embedding.dim`` over a vocabulary of ten million values, a wide MLP over a thousand fields, a large batch of
long sequences. Two checks, both cheap enough to run before every training:

* :func:`check_data_footprint`, before the data is read or generated: the bytes of data whose size the recipe
  fixes (``dataset.synthetic``: rows × bytes per row, plus the per-value tables).
* :func:`check_model_footprint`, once the feature layout (the vocabulary sizes) is known and before the model is
  built: the model is built on PyTorch's ``meta`` device, which records shapes without allocating, so the parameter
  count is exact; one forward pass of a batch on ``meta`` measures the activations.

Training memory is estimated as ``parameters × 4 bytes × (weights + gradients + optimizer moments)`` (Adam keeps
two moments per parameter, Adagrad one; gradients are counted dense even for sparse tables, an upper bound) plus
the model's buffers plus ``2 × the bytes autograd saves for the backward pass of one training batch`` (the saved
activations, and as much again for the gradients flowing back through them). Where a forward pass on ``meta``
is impossible (a block with a data-dependent step), activations are estimated as
``3 × 4 bytes × batch_size × (fields × dim + Σ widths of the linear layers) × (1 + Σ sequence max_len)``.

Both are compared with the memory available on the device the run uses: ``MemAvailable`` of ``/proc/meminfo``
(and a cgroup limit, where one is set) for the CPU, ``torch.cuda.mem_get_info`` for CUDA, or the byte count in
``$CTRLAB_MEMORY_LIMIT_BYTES`` when set (which overrides both). An estimate above the limit is a one-line
:class:`~ctrlab.errors.RecipeError` stating the estimate, the limit and the recipe key to lower.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ctrlab.errors import CtrlabError, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    from ctrlab.config.dataset import DatasetConfig
    from ctrlab.config.schema import Recipe
    from ctrlab.data.layout import FeatureLayout
    from ctrlab.datasets.synthetic import SyntheticConfig

__all__ = [
    "LIMIT_ENV",
    "DataEstimate",
    "MemoryLimit",
    "ModelEstimate",
    "available_memory",
    "check_data_footprint",
    "check_model_footprint",
    "estimate_model",
    "estimate_synthetic",
    "human_bytes",
]

LIMIT_ENV = "CTRLAB_MEMORY_LIMIT_BYTES"
FLOAT_BYTES = 4  # parameters, gradients and optimizer moments stay fp32 under autocast


@dataclass(frozen=True)
class MemoryLimit:
    """How many bytes the run may use, and where that figure comes from (for the message)."""

    bytes: int
    source: str


def human_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units, as ``free`` and disk vendors print them)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"  # pragma: no cover - the loop always returns


# ------------------------------------------------------------------------------------------------ the limit
def _env_limit() -> MemoryLimit | None:
    raw = os.environ.get(LIMIT_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        raise CtrlabError(f"{LIMIT_ENV}={raw[:40]!r} is not a number of bytes") from None
    if not math.isfinite(value) or value <= 0:
        raise CtrlabError(f"{LIMIT_ENV}={raw[:40]!r} must be a positive number of bytes")
    return MemoryLimit(int(value), f"${LIMIT_ENV}")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _cpu_available() -> int | None:
    """``MemAvailable`` (what can be allocated without swapping), capped by a cgroup v2 memory limit if set."""
    available: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        available = None
    # A container's own limit is what the OOM killer enforces, whatever the host has free.
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        room = max(limit - used, 0)
        available = room if available is None else min(available, room)
    return available


def available_memory(device: torch.device | str | None = None) -> MemoryLimit | None:
    """The memory a run on ``device`` may use: ``$CTRLAB_MEMORY_LIMIT_BYTES`` if set, else the free memory of the
    CUDA device, else the CPU's available memory; None where it cannot be determined (then nothing is refused)."""
    override = _env_limit()
    if override is not None:
        return override
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return MemoryLimit(int(free), f"free on {device}")
    available = _cpu_available()
    return None if available is None else MemoryLimit(available, "available on this machine")


# ------------------------------------------------------------------------------------------------- the data
@dataclass(frozen=True)
class DataEstimate:
    """Bytes to generate and hold a synthetic table through training: ``rows × per_row + per_value``."""

    rows: int
    per_row: int
    per_value: int

    @property
    def bytes(self) -> int:
        return self.rows * self.per_row + self.per_value


def estimate_synthetic(config: SyntheticConfig) -> DataEstimate:
    """A rough (within about a factor of two) estimate of the peak memory of generating ``config`` and holding it
    encoded for training. Per row: 80 bytes of logit terms, probability, label and time; 24 bytes per numeric
    column (the values, the missing mask, the frame and encoded copies); 48 bytes per categorical or redundant column
    (frequency ranks, the string column and its split copy, int64 ids in numpy and torch); with ``sequence``, 80
    bytes for the candidate plus 32 bytes per history slot (the flattened history, its row index and joined
    strings, the padded ids). Per value of a vocabulary, 40 bytes (CDF, relabelling, the id strings)."""
    categorical = config.categorical_fields + config.redundant_fields
    per_row = 80 + 24 * config.numeric_fields + 48 * categorical
    per_value = 40 * sum(config.resolved_cardinalities())
    if config.sequence:
        per_row += 80 + 32 * config.max_history
        per_value += 40 * config.num_items
    return DataEstimate(config.rows, per_row, per_value)


def _two_sizes(needed: int, allowed: int) -> tuple[str, str]:
    """Both sizes for a message, in bytes where rounding would print them alike ("1.2 GB ... the limit is 1.2 GB")."""
    a, b = human_bytes(needed), human_bytes(allowed)
    return (a, b) if a != b else (f"{needed:,} bytes", f"{allowed:,} bytes")


def check_data_footprint(dataset: DatasetConfig, limit: MemoryLimit | None = None) -> DataEstimate | None:
    """Refuse (one-line ``RecipeError``) a ``dataset`` section whose data, as far as the recipe fixes its size,
    cannot fit in memory. Call before ``prepare_data``. Returns the estimate (None for sources of unknown size:
    files, cards)."""
    synthetic = dataset.synthetic
    if synthetic is None:
        return None
    estimate = estimate_synthetic(synthetic)
    limit = limit if limit is not None else available_memory("cpu")  # the data is generated in host memory
    if limit is not None and estimate.bytes > limit.bytes:
        needed, allowed = _two_sizes(estimate.bytes, limit.bytes)
        raise RecipeError(
            f"dataset.synthetic: about {needed} to generate and hold "
            f"({estimate.rows:,} rows x {estimate.per_row:,} bytes per row, plus {human_bytes(estimate.per_value)} "
            f"for the vocabularies); the limit is {allowed} ({limit.source}); lower dataset.synthetic.rows "
            f"(now {synthetic.rows:,})")
    return estimate


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelEstimate:
    """Parameters per part (exact), buffer bytes, activation bytes of one training batch, and the total."""

    parameters: dict[str, int]
    buffer_bytes: int
    activation_bytes: int
    optimizer_moments: int
    batch_size: int
    exact_activations: bool

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    @property
    def parameter_bytes(self) -> int:
        """Weights, gradients and optimizer moments."""
        return self.total_parameters * FLOAT_BYTES * (2 + self.optimizer_moments)

    @property
    def bytes(self) -> int:
        return self.parameter_bytes + self.buffer_bytes + self.activation_bytes


def _saved_for_backward(model: nn.Module, batch: Any) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward pass (on ``meta``).

    Counting every tensor an operator returns instead overestimates attention blocks tenfold: views and the
    temporaries freed at once are not memory held at the peak; what the backward pass needs is."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(batch)
    return sum(storages.values()) + output.numel() * output.element_size()


def _meta_embedding_config(embedding: Any) -> Any:
    """An embedding config that builds on ``meta`` with the parameter count of ``embedding``'s largest model.

    The torchrec backend holds the same tables as the plain one (and importing torchrec under a meta device fails);
    searching kinds (OptEmbed, DNIS) train a full per-field table before pruning it, and their pruning code needs
    real values. Both are counted as plain per-field tables of the same width."""
    from ctrlab.embeddings import EMBEDDINGS
    from ctrlab.embeddings.searchable import SearchableEmbeddingConfig

    if isinstance(embedding, SearchableEmbeddingConfig) or getattr(embedding, "backend", "plain") != "plain":
        return EMBEDDINGS.get("per_field").config(dim=embedding.dim, init_std=embedding.init_std,
                                                  sparse=embedding.sparse)
    return embedding


def _meta_batch(layout: FeatureLayout, batch_size: int) -> Any:
    from ctrlab.data.batches import FeatureBatch

    # Id 2 is the first real value of every vocabulary (0 padding, 1 OOV); on meta the values are never read anyway.
    return FeatureBatch(
        categorical=torch.empty((batch_size, len(layout.categorical)), dtype=torch.long, device="meta"),
        numeric=torch.empty((batch_size, len(layout.numeric)), dtype=torch.float32, device="meta"),
        sequences={f.name: torch.empty((batch_size, f.max_len), dtype=torch.long, device="meta")
                   for f in layout.sequence},
        label=torch.empty((batch_size,), dtype=torch.float32, device="meta"),
        crosses=(torch.empty((batch_size, len(layout.crosses)), dtype=torch.long, device="meta") if layout.crosses
                 else None),
    )


def _analytic_activations(model: nn.Module, layout: FeatureLayout, dim: int, batch_size: int) -> int:
    widths = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    positions = 1 + sum(f.max_len for f in layout.sequence)
    return 3 * FLOAT_BYTES * batch_size * (layout.num_fields * dim + widths) * positions


def estimate_model(embedding: Any, model_config: Any, layout: FeatureLayout, batch_size: int,
                   optimizer: str = "adam", interaction: Any | None = None) -> ModelEstimate:
    """Build the model on the ``meta`` device (no memory) and measure it; see the module docstring for the formula.

    A model the recipe describes inconsistently (e.g. DIN's candidate is not a categorical feature) raises the
    ``RecipeError`` the real build would, as one line."""
    from ctrlab.blocks import BLOCKS
    from ctrlab.embeddings import EMBEDDINGS
    from ctrlab.models import build_model

    BLOCKS.names(), EMBEDDINGS.names()  # import every registered module now, not under the meta device
    meta_embedding = _meta_embedding_config(embedding)
    try:
        with torch.device("meta"):
            model = build_model(meta_embedding, model_config, layout, interaction_config=interaction)
    except CtrlabError:
        raise
    except ValueError as exc:  # the real build would fail the same way, after allocating
        raise RecipeError(f"model: {exc}") from None
    parts = {"embedding": model.embedding, "linear": model.linear, "block": model.block,
             "interaction": model.interaction}
    parameters = {name: sum(p.numel() for p in part.parameters()) if part is not None else 0
                  for name, part in parts.items()}
    parameters["bias"] = model.bias.numel()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    try:
        model.train()
        activations, exact = 2 * _saved_for_backward(model, _meta_batch(layout, batch_size)), True
    except Exception:  # noqa: BLE001 - a data-dependent step (nonzero, item) cannot run on meta: estimate instead
        activations, exact = _analytic_activations(model, layout, embedding.dim, batch_size), False
    return ModelEstimate(parameters, buffers, activations, 2 if optimizer == "adam" else 1, batch_size, exact)


def _estimated_pair_layer(recipe: Recipe, layout: FeatureLayout) -> Any | None:
    """The pair layer to estimate: the recipe's, or, for a pair search whose pairs are undecided, every pair
    memorised (the search's largest part: its mixture holds those tables and, besides, the factor tables)."""
    from ctrlab.interactions import INTERACTIONS
    from ctrlab.interactions.base import decided

    config = recipe.interaction
    if config is None or decided(config, layout):
        return config
    return INTERACTIONS.get("pairs").config(method="memorize")


def _advice(recipe: Recipe, estimate: ModelEstimate) -> str:
    """The recipe key that contributes most, to lower."""
    shares = {
        "embedding": (estimate.parameters["embedding"] + estimate.parameters["linear"]) * FLOAT_BYTES
        * (2 + estimate.optimizer_moments),
        "block": estimate.parameters["block"] * FLOAT_BYTES * (2 + estimate.optimizer_moments),
        "interaction": estimate.parameters["interaction"] * FLOAT_BYTES * (2 + estimate.optimizer_moments),
        "activations": estimate.activation_bytes,
    }
    largest = max(shares, key=lambda k: shares[k])
    if largest == "embedding":
        return f"lower embedding.dim (now {recipe.embedding.dim:,}) or the vocabularies (features.*.min_count)"
    if largest == "interaction":
        return "lower features.crosses.max_rows (the row budget of a memorised pair) or the candidate pairs"
    if largest == "block":
        return f"make the {recipe.model.block} block's layers smaller (model.*)"
    return f"lower train.batch_size (now {recipe.train.batch_size:,})"


def check_model_footprint(recipe: Recipe, layout: FeatureLayout, device: torch.device | str | None = None,
                          limit: MemoryLimit | None = None) -> ModelEstimate:
    """Refuse (one-line ``RecipeError``) a model that cannot be trained in the memory of ``device``. Call once the
    feature layout is known and before ``build_model``. Returns the estimate."""
    estimate = estimate_model(recipe.embedding, recipe.model, layout, recipe.train.batch_size,
                              recipe.train.optimizer.name, _estimated_pair_layer(recipe, layout))
    limit = limit if limit is not None else available_memory(device)
    if limit is not None and estimate.bytes > limit.bytes:
        parts = "; ".join(f"{name} {count:,}" for name, count in estimate.parameters.items() if count)
        how = "" if estimate.exact_activations else "about "
        needed, allowed = _two_sizes(estimate.bytes, limit.bytes)
        raise RecipeError(
            f"model: about {needed} to train ({estimate.total_parameters:,} parameters: {parts}; "
            f"activations of a batch of {estimate.batch_size:,} rows {how}{human_bytes(estimate.activation_bytes)}); "
            f"the limit is {allowed} ({limit.source}); {_advice(recipe, estimate)}")
    return estimate

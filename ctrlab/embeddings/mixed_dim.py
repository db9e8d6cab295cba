"""A shared mixed-dimension embedding table: per vocabulary table only the kept rows and the first ``d`` kept
dimensions are stored; the output is zero-padded to the common width ``D``.

This is the table that embedding searches retrain and serve (OptEmbed, Lyu et al. 2022, Section 3.4 "re-train";
DNIS, Cheng et al. 2020, Section 3.3), so it is not registered under a kind of its own: the searching kinds
(``optembed``, ``dnis``) register subclasses of :class:`MixedDimEmbedding`.

Terms used here and by the searches:

* a **unit** is what a search assigns rows and dimensions to: every vocabulary table (shared by the fields that
  index it, e.g. a candidate item and a behaviour history) and every numeric field, taken as a one-row table
  holding its vector ``v`` of ``e = x · v``. Units are ordered: tables in :meth:`FeatureLayout.tables` order, then
  numeric fields in layout order.
* an **architecture** (:class:`EmbeddingArchitecture`) says, per unit, which rows are kept (row pruning) and
  which dimensions are kept in which order (dimension search); a unit may be split into **blocks** of rows (DNIS's
  frequency blocks), each keeping its own dimensions, so rows of one unit can have different widths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.kept_values import KeptValues
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings.base import EmbeddingConfigBase, EmbeddingOutput, FeatureEmbedding, concatenated_row_ids

WEIGHT_PREFIX = "weight_"
"""Parameters ``weight_<w>``: the stored rows of every unit whose width is ``w``, ``[kept rows, w]``."""
REMAP_PREFIX = "remap_"
"""Buffers ``remap_<i>`` (int32, one per unit): vocabulary id -> row of its width's ``weight_<w>``, -1 if pruned."""
WIDTHS_PREFIX = "widths_"
"""Buffers ``widths_<i>`` (uint8), only for units whose kept rows have different widths (blocks): every row's
stored width (0: pruned). A unit without one stores ``dims[i]`` dimensions for every kept row."""


def init_table(rows: int, dim: int, std: float) -> torch.Tensor:
    """The initial values of a full ``[rows, dim]`` table (normal, std ``std``), drawn from torch's global RNG.

    The mixed-dimension table and the search embeddings draw their full table with this one call, so a model
    built after the same seed starts from the same values whichever of them it holds."""
    return torch.randn(rows, dim) * std


@dataclass(frozen=True)
class EmbeddingUnits:
    """The units of a layout (vocabulary tables, then numeric fields as one-row tables) and where every field
    looks them up. ``flat_units``: the unit of each non-sequence field (categorical fields, then numeric ones, as
    :class:`EmbeddingOutput.fields` orders them); ``sequence_units``: the unit of each sequence field."""

    names: tuple[str, ...]
    rows: tuple[int, ...]
    num_tables: int
    flat_units: tuple[int, ...]
    sequence_units: tuple[int, ...]

    @classmethod
    def from_layout(cls, layout: FeatureLayout) -> "EmbeddingUnits":
        tables = layout.tables()
        names = list(tables) + [f.name for f in layout.numeric]
        rows = list(tables.values()) + [1] * len(layout.numeric)
        index = {name: i for i, name in enumerate(names)}
        flat = [index[f.table] for f in layout.categorical]  # type: ignore[index]
        flat += [index[f.name] for f in layout.numeric]
        sequences = [index[f.table] for f in layout.sequence]  # type: ignore[index]
        return cls(tuple(names), tuple(rows), len(tables), tuple(flat), tuple(sequences))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First global row of every unit in the full ``[Σ rows, D]`` table."""
        out, total = [], 0
        for rows in self.rows:
            out.append(total)
            total += rows
        return tuple(out)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown embedding unit {name!r}; units: {', '.join(self.names)}") from None

    def register_offsets(self, module: nn.Module) -> None:
        """Give ``module`` the (non-persistent, derived from the layout) buffers ``flat_offsets`` (first row of each
        flat field's unit) and ``unit_starts`` (first row of every unit) that lookups into the full table use."""
        offsets = self.offsets
        module.register_buffer("flat_offsets", torch.tensor([offsets[u] for u in self.flat_units], dtype=torch.long),
                               persistent=False)
        module.register_buffer("unit_starts", torch.tensor(offsets, dtype=torch.long), persistent=False)

    def is_table(self, unit: int) -> bool:
        return unit < self.num_tables


def flat_row_ids(layout: FeatureLayout, batch: FeatureBatch, flat_offsets: torch.Tensor) -> torch.Tensor:
    """``[B, Fc + Fn]`` rows of the full table for the non-sequence fields: each categorical id offset by its
    unit's first row, then each numeric field's one row (its value scales the vector after the lookup)."""
    num_cat, num_num = len(layout.categorical), len(layout.numeric)
    ids = []
    if num_cat:
        ids.append(batch.categorical + flat_offsets[:num_cat])
    if num_num:
        ids.append(flat_offsets[num_cat:].expand(len(batch), num_num))
    return ids[0] if len(ids) == 1 else torch.cat(ids, dim=1)


def full_table_row_ids(layout: FeatureLayout, units: EmbeddingUnits, batch: FeatureBatch,
                       flat_offsets: torch.Tensor, unit_starts: torch.Tensor) -> torch.Tensor:
    """Global rows of the full ``[Σ rows, D]`` table (units laid out by :class:`EmbeddingUnits`) that ``batch``
    looks up, one entry per lookup (repeats kept): every categorical id and every non-padding sequence id (numeric
    vectors are not table rows). ``flat_offsets``: first row of each flat field's unit; ``unit_starts``: first row
    of every unit (:attr:`EmbeddingUnits.offsets` as tensors on the batch's device)."""
    starts = {spec.name: unit_starts[unit] for spec, unit in zip(layout.sequence, units.sequence_units)}
    return concatenated_row_ids(layout, batch, flat_offsets[:len(layout.categorical)], starts)


@dataclass
class EmbeddingArchitecture:
    """What a mixed-dimension table keeps of a full ``[rows, D]`` table, per unit (see the module docstring).

    ``dims``: kept dimensions per unit (0 drops the unit; a unit left out keeps all ``dim``). ``rows``: per unit a
    boolean keep-mask over its rows (a unit left out keeps every row). ``order``: per unit, which dimensions of the
    source table are kept, most significant first (a unit left out keeps the first ``dims`` dimensions).

    Blocks (DNIS's frequency blocks, Cheng et al. 2020, Section 3.1): ``blocks`` gives a unit's rows a block index
    each (long ``[rows]``), ``block_dims`` the kept dimensions of each block and ``block_order`` (optional) their
    source dimensions; for such a unit they replace ``dims``/``order``, and :meth:`dim_of` is its widest block.
    """

    dim: int
    dims: dict[str, int] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    order: dict[str, list[int]] = field(default_factory=dict)
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    block_dims: dict[str, list[int]] = field(default_factory=dict)
    block_order: dict[str, list[list[int]]] = field(default_factory=dict)

    def check(self, units: EmbeddingUnits) -> None:
        """Raise ``ValueError`` naming the unit when this architecture does not fit ``units``."""
        for name, d in self.dims.items():
            units.index(name)
            if not 0 <= int(d) <= self.dim:
                raise ValueError(f"embedding unit {name!r}: {d} dimensions is outside 0..{self.dim}")
        for name, mask in self.rows.items():
            rows = units.rows[units.index(name)]
            if mask.dtype != torch.bool or mask.shape != (rows,):
                raise ValueError(f"embedding unit {name!r}: the row mask must be a bool tensor of {rows} rows "
                                 f"(got {mask.dtype} {tuple(mask.shape)})")
        for name, order in self.order.items():
            units.index(name)
            self._check_order(name, order, self.dim_of(name))
        for name, block in self.blocks.items():
            rows = units.rows[units.index(name)]
            dims = self.block_dims.get(name)
            if dims is None or block.shape != (rows,) or block.dtype != torch.long:
                raise ValueError(f"embedding unit {name!r}: blocks need a long tensor of {rows} rows and the "
                                 "block_dims of every block")
            if rows and not 0 <= int(block.min()) <= int(block.max()) < len(dims):
                raise ValueError(f"embedding unit {name!r}: block indices must lie in 0..{len(dims) - 1}")
            if any(not 0 <= int(d) <= self.dim for d in dims):
                raise ValueError(f"embedding unit {name!r}: block dims {dims} are outside 0..{self.dim}")
            orders = self.block_order.get(name)
            if orders is not None:
                if len(orders) != len(dims):
                    raise ValueError(f"embedding unit {name!r}: {len(orders)} block orders for {len(dims)} blocks")
                for order, d in zip(orders, dims):
                    self._check_order(name, order, int(d))
        for name in set(self.block_dims) - set(self.blocks):
            raise ValueError(f"embedding unit {name!r}: block_dims without blocks")

    def _check_order(self, name: str, order: Sequence[int], d: int) -> None:
        if len(order) != d or len(set(order)) != d or any(not 0 <= int(k) < self.dim for k in order):
            raise ValueError(f"embedding unit {name!r}: the dimension order must list {d} distinct "
                             f"dimensions in 0..{self.dim - 1} (got {list(order)})")

    def dim_of(self, name: str) -> int:
        """Kept dimensions of the unit (of its widest block when it has blocks)."""
        if name in self.blocks:
            return max((int(d) for d in self.block_dims[name]), default=0)
        return int(self.dims.get(name, self.dim))

    def unit_blocks(self, name: str, rows: int) -> tuple[torch.Tensor, list[int], list[list[int]]]:
        """The unit as blocks: each row's block (long ``[rows]``), each block's kept dims and source dimensions
        (a unit without blocks is one block)."""
        if name in self.blocks:
            dims = [int(d) for d in self.block_dims[name]]
            orders = self.block_order.get(name) or [list(range(d)) for d in dims]
            return self.blocks[name], dims, [list(map(int, o)) for o in orders]
        d = self.dim_of(name)
        return torch.zeros(rows, dtype=torch.long), [d], [list(map(int, self.order.get(name, range(d))))]

    def row_widths(self, units: EmbeddingUnits, name: str) -> torch.Tensor:
        """Kept dimensions of every row of the unit (0 for a pruned row), long ``[rows]``."""
        rows = units.rows[units.index(name)]
        block, dims, _ = self.unit_blocks(name, rows)
        widths = torch.tensor(dims, dtype=torch.long)[block] if dims else torch.zeros(rows, dtype=torch.long)
        if name in self.rows:
            widths = widths * self.rows[name].long()
        return widths

    def kept_rows(self, units: EmbeddingUnits) -> dict[str, int]:
        return {name: int(self.rows[name].sum()) if name in self.rows else rows
                for name, rows in zip(units.names, units.rows)}

    def kept_parameters(self, units: EmbeddingUnits) -> int:
        """Floats a mixed-dimension table with this architecture stores: Σ over kept rows of their dimensions."""
        return sum(int(self.row_widths(units, name).sum()) for name in units.names)

    @staticmethod
    def full_parameters(units: EmbeddingUnits, dim: int) -> int:
        return units.total_rows * dim


class MixedDimEmbedding(FeatureEmbedding):
    """A per-field embedding whose units (vocabulary tables and numeric fields) each keep only some rows and their
    first ``d_u`` dimensions, as OptEmbed's re-trained table (Lyu et al. 2022, Section 3.4, the pruned table
    ``E ⊙ m_e`` with field dimensions ``d_f``) and DNIS's mixed-dimension table (Cheng et al. 2020, Section 3.3).

    **Output.** ``[B, F, D]`` like every embedding: each field's ``d_u`` stored dimensions followed by
    ``D - d_u`` zeros. Interaction blocks (FM, MLP, cross network, attention) are built for one width ``D``; the
    zero padding makes a mixed-dimension table a drop-in replacement, and zeros add nothing to inner products or to
    the first MLP layer. A pruned row embeds as the zero vector. Numeric fields give ``x · v``; sequences are
    looked up item by item (``EmbeddingOutput.sequences`` holds ``[B, L, D]`` and the padding mask; padding id 0
    gives zero) and mean- or sum-pooled over real items, as in
    :class:`~ctrlab.embeddings.per_field.PerFieldEmbedding`.

    **Storage.** Rows are grouped by width: one parameter ``weight_<w>`` of shape ``[kept rows of width w, w]``
    per distinct width, and per unit an int32 buffer ``remap_<i>`` mapping its vocabulary ids to rows of their
    width's group (-1: pruned). The forward pass does one ``F.embedding`` per width group, not one per field. A
    unit split into blocks of different widths (DNIS's frequency blocks) also stores ``widths_<i>``, every row's
    width; fields of such units are looked up row by row (one masked lookup per width) instead of field by field.

    **Self-describing state.** ``dims`` and the ``remap_<i>`` buffers are in the state dict, so loading a pruned
    state dict into a module built from the recipe alone (full shapes) re-shapes the parameters first
    (:meth:`_load_from_state_dict`): a run directory needs no extra file to be served. Re-shaping replaces the
    parameter objects: build optimisers after loading or pruning, never before.

    :meth:`parameter_count` and :meth:`parameter_bytes` count the stored floats only (Σ kept rows × kept dims).
    """

    # Buffers, declared for the type checker (``nn.Module.__getattr__`` is typed ``Tensor | Module``).
    dims: torch.Tensor
    flat_offsets: torch.Tensor
    unit_starts: torch.Tensor
    global_remap: torch.Tensor
    global_widths: torch.Tensor
    _flat_inverse: torch.Tensor

    def __init__(self, config: EmbeddingConfigBase, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.dim = dim if dim is not None else config.dim
        self.sparse = config.sparse
        self.units = EmbeddingUnits.from_layout(layout)
        self.units.register_offsets(self)
        self.register_buffer("dims", torch.full((len(self.units),), self.dim, dtype=torch.long))
        for i, rows in enumerate(self.units.rows):
            self.register_buffer(f"{REMAP_PREFIX}{i}", torch.zeros(rows, dtype=torch.int32))
        self._index_buffers: list[str] = []
        full = init_table(self.units.total_rows, self.dim, config.init_std)
        self._install(self._uniform_widths(self.dim), {self.dim: full})

    # ---------------------------------------------------------------------------------------- structure
    @property
    def unit_dims(self) -> list[int]:
        """Stored dimensions per unit, in unit order."""
        return list(self._unit_dims)

    def _remap(self, unit: int) -> torch.Tensor:
        return getattr(self, f"{REMAP_PREFIX}{unit}")

    def _uniform_widths(self, width: int) -> list[torch.Tensor]:
        return [torch.full((rows,), width, dtype=torch.long) for rows in self.units.rows]

    def row_widths(self, unit: int) -> torch.Tensor:
        """Stored dimensions of every row of ``unit`` (0: pruned), long ``[rows]``."""
        stored = self._buffers.get(f"{WIDTHS_PREFIX}{unit}")
        if stored is not None:
            return stored.long()
        return torch.where(self._remap(unit) >= 0, self._unit_dims[unit], 0).long()

    def group_weights(self) -> dict[int, nn.Parameter]:
        """The stored tables by width."""
        return {int(name[len(WEIGHT_PREFIX):]): p for name, p in self._parameters.items()
                if name.startswith(WEIGHT_PREFIX) and p is not None}

    def _install(self, widths: Sequence[torch.Tensor], values: Mapping[int, torch.Tensor] | None) -> None:
        """Lay out units whose rows have ``widths`` (per unit a ``[rows]`` tensor, 0: pruned) and (re)create the
        group parameters, filled from ``values`` (width -> ``[kept rows of that width, width]``, rows in unit
        order, then row order) or zeros."""
        device = self.dims.device
        counters: dict[int, int] = {}
        unit_dims: list[int] = []
        for name in [n for n in self._buffers if n.startswith(WIDTHS_PREFIX)]:
            del self._buffers[name]
        for i, row_width in enumerate(widths):
            row_width = row_width.to(device=device, dtype=torch.long)
            remap = torch.full((self.units.rows[i],), -1, dtype=torch.int32, device=device)
            present = sorted(int(w) for w in torch.unique(row_width[row_width > 0]).tolist())
            for w in present:
                selected = row_width == w
                n = int(selected.sum())
                remap[selected] = torch.arange(counters.get(w, 0), counters.get(w, 0) + n, dtype=torch.int32,
                                               device=device)
                counters[w] = counters.get(w, 0) + n
            setattr(self, f"{REMAP_PREFIX}{i}", remap)
            unit_dims.append(max(present, default=0))
            if len(present) > 1:
                self.register_buffer(f"{WIDTHS_PREFIX}{i}", row_width.to(torch.uint8))
        self.dims = torch.tensor(unit_dims, dtype=torch.long, device=device)
        dtype = next((p.dtype for p in self.group_weights().values()), torch.get_default_dtype())
        for name in [n for n in self._parameters if n.startswith(WEIGHT_PREFIX)]:
            del self._parameters[name]
        for width in sorted(counters, reverse=True):
            if values is not None and width in values:
                data = values[width].detach().to(device=device, dtype=dtype).clone()
                if data.shape != (counters[width], width):
                    raise ValueError(f"values for width {width} have shape {tuple(data.shape)}, expected "
                                     f"{(counters[width], width)}")
            else:
                data = torch.zeros(counters[width], width, dtype=dtype, device=device)
            self.register_parameter(f"{WEIGHT_PREFIX}{width}", nn.Parameter(data))
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        """Derive the lookup index (non-persistent) from ``dims`` and the ``remap_<i>`` buffers."""
        device = self.dims.device
        for name in self._index_buffers:
            delattr(self, name)
        self._index_buffers = []

        def buffer(name: str, value: torch.Tensor) -> None:
            self.register_buffer(name, value.to(device), persistent=False)
            self._index_buffers.append(name)

        self._unit_dims = [int(d) for d in self.dims.tolist()]
        remaps = [self._remap(i) for i in range(len(self.units))]
        buffer("global_remap", torch.cat(remaps).long() if remaps else torch.zeros(0, dtype=torch.long))
        self._pruned_widths = {d for d, r in zip(self._unit_dims, remaps) if d > 0 and bool((r < 0).any())}
        self._blocked_units = {i for i in range(len(self.units)) if f"{WIDTHS_PREFIX}{i}" in self._buffers}
        if self._blocked_units:
            buffer("global_widths", torch.cat([self.row_widths(i) for i in range(len(self.units))]).to(torch.uint8))
        # A field of a blocked unit has rows of several widths: the flat fields are then looked up row by row.
        self._flat_rowwise = any(u in self._blocked_units for u in self.units.flat_units)
        # Flat fields (categorical, then numeric) grouped by width; `flat_inverse` puts the groups back in order.
        widths = [self._unit_dims[u] for u in self.units.flat_units]
        self._flat_groups: list[tuple[int, str]] = []
        self._flat_single: int | None = None
        self._flat_zero: list[int] = []
        if widths and len(set(widths)) == 1 and widths[0] > 0:
            self._flat_single = widths[0]
        elif widths:
            order: list[int] = []
            for w in sorted({w for w in widths if w > 0}, reverse=True):
                positions = [p for p, pw in enumerate(widths) if pw == w]
                buffer(f"_flat_positions_{w}", torch.tensor(positions, dtype=torch.long))
                self._flat_groups.append((w, f"_flat_positions_{w}"))
                order += positions
            self._flat_zero = [p for p, pw in enumerate(widths) if pw == 0]
            order += self._flat_zero
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
            buffer("_flat_inverse", inverse)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """Re-shape to the incoming ``dims``/``remap_<i>`` before loading: a pruned state dict loads into a module
        built with full shapes. A state dict of the same structure loads in place (parameters keep identity)."""
        dims = state_dict.get(prefix + "dims")
        remaps = [state_dict.get(f"{prefix}{REMAP_PREFIX}{i}") for i in range(len(self.units))]
        stored_widths = [state_dict.get(f"{prefix}{WIDTHS_PREFIX}{i}") for i in range(len(self.units))]
        loaded_remaps = [r for r in remaps if r is not None]
        if dims is not None and len(loaded_remaps) == len(remaps):
            rows = tuple(int(r.shape[0]) for r in loaded_remaps)
            if tuple(dims.shape) != (len(self.units),) or rows != self.units.rows:
                error_msgs.append(
                    f"{prefix or 'embedding'}: the weights hold {int(dims.numel())} embedding units with rows "
                    f"{list(rows)}, this model's features give {len(self.units)} units with rows "
                    f"{list(self.units.rows)} (different features or vocabularies)")
                return
            widths = [w.long().cpu() if w is not None else torch.where(r.cpu() >= 0, int(d), 0).long()
                      for w, r, d in zip(stored_widths, loaded_remaps, dims.tolist())]
            same = all(torch.equal(w, self.row_widths(i).cpu()) and torch.equal(
                r.to(torch.int32).cpu(), self._remap(i).cpu())
                for i, (w, r) in enumerate(zip(widths, loaded_remaps)))
            if not same:
                self._install(widths, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._rebuild_index()

    # -------------------------------------------------------------------------------------- architecture
    def architecture(self) -> EmbeddingArchitecture:
        """The stored structure: dims and row keep-masks per unit; a unit whose rows have several widths as
        blocks, one per width (widest first)."""
        architecture = EmbeddingArchitecture(
            self.dim, dict(zip(self.units.names, self._unit_dims)),
            {name: (self._remap(i) >= 0).cpu() for i, name in enumerate(self.units.names)})
        for i in sorted(self._blocked_units):
            name, widths = self.units.names[i], self.row_widths(i).cpu()
            present = sorted({int(w) for w in widths[widths > 0].tolist()}, reverse=True)
            block = torch.zeros_like(widths)
            for b, w in enumerate(present):
                block[widths == w] = b
            architecture.blocks[name] = block
            architecture.block_dims[name] = present
        return architecture

    @torch.no_grad()
    def dense_table(self) -> torch.Tensor:
        """The table as a full ``[Σ rows, D]`` tensor: stored values in place, zeros for pruned rows and dims."""
        weights = self.group_weights()
        dense = torch.zeros(self.units.total_rows, self.dim, dtype=next(iter(weights.values())).dtype
                            if weights else torch.get_default_dtype(), device=self.dims.device)
        for i, start in enumerate(self.units.offsets):
            remap = self._remap(i).long()
            widths = self.row_widths(i).to(remap.device)
            for d in {int(w) for w in torch.unique(widths).tolist() if w > 0}:
                selected = widths == d
                rows = torch.arange(start, start + len(remap), device=remap.device)[selected]
                dense[rows, :d] = weights[d][remap[selected]]
        return dense

    @torch.no_grad()
    def load_kept_rows(self, source: FeatureEmbedding, kept: KeptValues) -> bool:
        """The base class's copy for a table stored by width groups: the kept units' rows of ``source``'s full
        table (a mixed-dimension table of the unrestricted layout, every row and dimension stored) become this
        table's full table."""
        if not isinstance(source, MixedDimEmbedding) or source.dim != self.dim:
            return False
        full = source.dense_table()
        index: list[torch.Tensor] = []
        for name, start, rows in zip(source.units.names, source.units.offsets, source.units.rows):
            ids = (torch.from_numpy(kept.tables[name].nonzero()[0]) if name in kept.tables
                   else torch.arange(rows))
            index.append(ids.to(full.device) + start)
        self.reset_dense_(full[torch.cat(index)])
        return True

    @torch.no_grad()
    def reset_dense_(self, table: torch.Tensor) -> None:
        """Store the full ``[Σ rows, D]`` ``table`` (every row, every dimension), e.g. a search's trained table."""
        if tuple(table.shape) != (self.units.total_rows, self.dim):
            raise ValueError(f"a full table has shape {(self.units.total_rows, self.dim)}, got {tuple(table.shape)}")
        self._install(self._uniform_widths(self.dim), {self.dim: table})

    @torch.no_grad()
    def prune(self, architecture: EmbeddingArchitecture) -> None:
        """Keep only what ``architecture`` keeps of the current table: per unit the rows of its mask (a row already
        pruned stays pruned) and, per block of rows, the dimensions of its order (indices into the currently
        stored dimensions). Parameters are replaced: build optimisers afterwards."""
        if architecture.dim != self.dim:
            raise ValueError(f"the architecture is for width {architecture.dim}, this table has width {self.dim}")
        architecture.check(self.units)
        dense = self.dense_table()
        widths: list[torch.Tensor] = []
        parts: dict[int, list[torch.Tensor]] = {}
        for i, (name, start, rows) in enumerate(zip(self.units.names, self.units.offsets, self.units.rows)):
            stored = self.row_widths(i).to(dense.device)
            keep = stored > 0
            if name in architecture.rows:
                keep = keep & architecture.rows[name].to(keep.device)
            block, dims, orders = architecture.unit_blocks(name, rows)
            block = block.to(dense.device)
            unit_dense = dense[start:start + rows]
            ordered = torch.zeros_like(unit_dense)
            width = torch.zeros(rows, dtype=torch.long, device=dense.device)
            for b, (d, order) in enumerate(zip(dims, orders)):
                in_block = (block == b) & keep
                if d == 0 or not bool(in_block.any()):
                    continue
                if int(stored[in_block].min()) <= max(order):
                    raise ValueError(f"embedding unit {name!r}: the table stores {int(stored[in_block].min())} "
                                     f"dimensions, the architecture keeps dimensions {order}")
                index = torch.tensor(order, dtype=torch.long, device=dense.device)
                ordered[in_block, :d] = unit_dense[in_block].index_select(1, index)
                width[in_block] = d
            widths.append(width)
            for d in sorted({int(w) for w in torch.unique(width).tolist() if w > 0}):
                parts.setdefault(d, []).append(ordered[width == d, :d])
        self._install(widths, {w: torch.cat(p) for w, p in parts.items()})

    # -------------------------------------------------------------------------------------------- lookup
    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.group_weights().values()), torch.get_default_dtype())

    def _zeros(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.zeros(*shape, self.dim, dtype=self._dtype(), device=device)

    def _lookup(self, compact: torch.Tensor, width: int) -> torch.Tensor:
        """Rows ``compact`` (-1: pruned -> zeros) of the width-``width`` group, zero-padded to ``D``."""
        weight = self._parameters[f"{WEIGHT_PREFIX}{width}"]
        if weight is None or weight.shape[0] == 0:
            return self._zeros(compact.shape, compact.device)
        if width in self._pruned_widths:
            valid = compact >= 0
            vectors = F.embedding(compact.clamp(min=0), weight, sparse=self.sparse)
            vectors = vectors * valid.unsqueeze(-1).to(vectors.dtype)
        else:
            vectors = F.embedding(compact, weight, sparse=self.sparse)
        return F.pad(vectors, (0, self.dim - width)) if width < self.dim else vectors

    def _lookup_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Global rows ``rows`` (any shape) -> ``[*, D]``, each row at its own width (blocked units)."""
        widths = self.global_widths[rows]
        compact = self.global_remap[rows]
        out = self._zeros(rows.shape, rows.device)
        for width, weight in self.group_weights().items():
            selected = widths == width
            vectors = F.embedding(compact[selected], weight, sparse=self.sparse)
            out = out.index_put((selected,), F.pad(vectors, (0, self.dim - width)) if width < self.dim else vectors)
        return out

    def _flat(self, batch: FeatureBatch) -> torch.Tensor | None:
        num_cat, num_num = len(self.layout.categorical), len(self.layout.numeric)
        if num_cat + num_num == 0:
            return None
        rows = flat_row_ids(self.layout, batch, self.flat_offsets)
        if self._flat_rowwise:
            vectors = self._lookup_rows(rows)
        elif self._flat_single is not None:
            vectors = self._lookup(self.global_remap[rows], self._flat_single)
        else:
            compact = self.global_remap[rows]
            blocks = [self._lookup(compact.index_select(1, getattr(self, name)), w) for w, name in self._flat_groups]
            if self._flat_zero:
                blocks.append(self._zeros((len(batch), len(self._flat_zero)), compact.device))
            vectors = torch.cat(blocks, dim=1).index_select(1, self._flat_inverse)
        if num_num:
            vectors = torch.cat([vectors[:, :num_cat], vectors[:, num_cat:] * batch.numeric.unsqueeze(-1)], dim=1)
        return vectors

    def forward(self, batch: FeatureBatch) -> EmbeddingOutput:
        parts: list[torch.Tensor] = []
        flat = self._flat(batch)
        if flat is not None:
            parts.append(flat)
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for spec, unit in zip(self.layout.sequence, self.units.sequence_units):
            ids = batch.sequences[spec.name]
            mask = ids > 0
            width = self._unit_dims[unit]
            if unit in self._blocked_units:
                vectors = self._lookup_rows(ids + self.unit_starts[unit]) * mask.unsqueeze(-1).to(self._dtype())
            elif width > 0:
                vectors = self._lookup(self.global_remap[ids + self.unit_starts[unit]], width)
                vectors = vectors * mask.unsqueeze(-1).to(vectors.dtype)
            else:
                vectors = self._zeros(ids.shape, ids.device)
            sequences[spec.name] = (vectors, mask)
        return EmbeddingOutput.assemble(self.layout, parts, sequences)

    # ----------------------------------------------------------------------- trainer hooks and accounting
    def table_parameters(self) -> list[nn.Parameter]:
        return list(self.group_weights().values())

    @property
    def num_rows(self) -> int:
        """Rows of the full (unpruned) row space that :meth:`row_ids` numbers."""
        return self.units.total_rows

    def row_ids(self, batch: FeatureBatch) -> torch.Tensor:
        """Full-table (unpruned) global rows the batch looks up: every categorical id and every non-padding
        sequence id (numeric vectors are not table rows)."""
        return full_table_row_ids(self.layout, self.units, batch, self.flat_offsets, self.unit_starts)

    def _stored_rows(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, nn.Parameter]]:
        """For global rows ``rows``: per width group, (which of ``rows`` are stored there, their stored rows)."""
        if self._blocked_units:
            widths = self.global_widths[rows].long()
        else:
            widths = self.dims[torch.bucketize(rows, self.unit_starts, right=True) - 1]
        compact = self.global_remap[rows]
        out = []
        for width, weight in self.group_weights().items():
            selected = (widths == width) & (compact >= 0)
            out.append((selected, compact[selected], weight))
        return out

    def lazy_l2(self, batch: FeatureBatch) -> torch.Tensor:
        rows = torch.unique(self.row_ids(batch))
        total = torch.zeros((), device=self.dims.device)
        for _, compact, weight in self._stored_rows(rows):
            total = total + F.embedding(compact, weight, sparse=self.sparse).pow(2).sum()
        return 0.5 * total

    def mini_batch_aware_l2(self, batch: FeatureBatch, counts: torch.Tensor, coefficient: float) -> torch.Tensor:
        """DIN's mini-batch aware L2 (Zhou et al. 2018, eq. 7) over the stored rows the batch touches; ``counts``
        is indexed by the full row space (:attr:`num_rows`)."""
        rows = torch.unique(self.row_ids(batch))
        total = torch.zeros((), device=self.dims.device)
        for selected, compact, weight in self._stored_rows(rows):
            n = counts[rows[selected]].clamp(min=1).to(weight.dtype)
            total = total + (F.embedding(compact, weight, sparse=self.sparse).pow(2).sum(dim=1) / n).sum()
        return coefficient * 0.5 * total

    def parameter_count(self) -> int:
        """Stored floats: Σ over units of kept rows × kept dimensions (the remap buffers are not counted)."""
        return sum(p.numel() for p in self.group_weights().values())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.group_weights().values())

    def extra_repr(self) -> str:
        dims = ", ".join(f"{n}={d}" + ("(blocks)" if i in self._blocked_units else "")
                         for i, (n, d) in enumerate(zip(self.units.names, self._unit_dims)))
        return f"dim={self.dim}, stored={self.parameter_count():,} floats, dims=[{dims}]"

"""Deterministic hash functions and row budgets for the hashed embedding layers.

The hashing trick (Weinberger et al. 2009, "Feature Hashing for Large Scale Multitask Learning", ICML) maps a
feature value to one of ``R`` rows of a table with a hash function instead of a vocabulary lookup, so the table
size no longer grows with the vocabulary. Unified Embedding (Coleman et al. 2023, "Unified Embedding:
Battle-Tested Feature Representations for Web-Scale ML Systems", NeurIPS) hashes every field into one shared
table with field-specific hash functions (feature multiplexing).

The functions here are the universal family of Carter & Wegman (1979)::

    h(x) = ((a · x + b) mod P) mod R,    P = 2^31 − 1 (a Mersenne prime),  a ∈ [1, P),  b ∈ [0, P)

evaluated with vectorised int64 tensor ops (``a · x < 2^62`` cannot overflow for ``x < P``). The constants
``(a, b)`` of hash function ``(table, probe)`` come from splitmix64 (Steele et al. 2014) applied to the table
index, the probe index and a salt, in pure Python integer arithmetic: they are the same in every process, on every
platform and with every numpy / torch version. Python's built-in ``hash()`` is never used (it is randomised per
process for strings, see ``PYTHONHASHSEED``). Because the constants are a pure function of
``(table, probe, salt)`` they are not stored in checkpoints (:mod:`ctrlab.utils.hashing` computes them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import PADDING_ID, FeatureLayout
from ctrlab.embeddings.base import EmbeddingOutput, FeatureEmbedding

# The constants are shared with the data layer's hashed cross features; re-exported here for the layers' users.
from ctrlab.utils.hashing import MERSENNE_PRIME as MERSENNE_PRIME
from ctrlab.utils.hashing import hash_constants as hash_constants
from ctrlab.utils.hashing import splitmix64 as splitmix64

PADDING_ROW = 0
"""Row 0 of a hashed layer's table: all zeros, never updated; every padding id (0) looks it up."""


def hash_parameters(tables: int, probes: int = 1, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The constants of ``tables × probes`` hash functions as two int64 tensors ``a``, ``b`` of that shape."""
    pairs = [[hash_constants(t, p, salt) for p in range(probes)] for t in range(tables)]
    a = torch.tensor([[pair[0] for pair in row] for row in pairs], dtype=torch.long).reshape(tables, probes)
    b = torch.tensor([[pair[1] for pair in row] for row in pairs], dtype=torch.long).reshape(tables, probes)
    return a, b


def universal_hash(ids: torch.Tensor, a: torch.Tensor | int, b: torch.Tensor | int,
                   buckets: torch.Tensor | int) -> torch.Tensor:
    """``((a · x + b) mod P) mod buckets`` elementwise (broadcasting ``ids`` against ``a``, ``b``, ``buckets``).

    ``ids`` are reduced modulo ``P`` first (a no-op for vocabulary ids), so ``a · x + b < 2^62 + 2^31`` fits int64.
    The result is an int64 tensor in ``[0, buckets)``."""
    x = torch.remainder(ids.long(), MERSENNE_PRIME)
    return torch.remainder(torch.remainder(a * x + b, MERSENNE_PRIME), buckets)


def budget_rows(full: float, fraction: float) -> int:
    """``ceil(full · fraction)``, at least 1, ignoring floating-point noise (``ceil(30 · 0.1)`` is 3, not 4)."""
    value = full * fraction
    return max(1, math.ceil(value - 1e-9 * max(1.0, abs(value))))


def proportional_rows(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` rows over tables in proportion to ``sizes``: every table gets one row, the remaining
    ``total − len(sizes)`` are shared by the largest-remainder method (ties to the earlier table); the parts sum to
    ``total`` exactly."""
    n = len(sizes)
    if n == 0:
        return []
    if total < n:
        raise ValueError(f"rows ({total}) must be at least the number of vocabulary tables ({n}): one row each")
    weight = sum(sizes)
    spare = total - n
    if weight <= 0:
        sizes, weight = [1] * n, n
    # exact integer quotas: spare · s / weight = part + remainder / weight
    split = [divmod(spare * s, weight) for s in sizes]
    parts = [q for q, _ in split]
    order = sorted(range(n), key=lambda i: (-split[i][1], i))
    for i in order[: spare - sum(parts)]:
        parts[i] += 1
    return [1 + p for p in parts]


def check_one_size(budget: float | None, rows: int | None) -> None:
    """Config check shared by the hashed layers: ``budget`` and ``rows`` are alternatives."""
    if budget is not None and rows is not None:
        raise ValueError(f"give either budget ({budget}) or rows ({rows}), not both: budget is a fraction of the "
                         "full tables, rows an explicit row count")


class HashedTableEmbedding(FeatureEmbedding):
    """What the hashing trick and Unified Embedding share: ids reach the rows of one table :attr:`weight` through
    hash functions instead of a vocabulary, with row :data:`PADDING_ROW` an all-zero row (the lookup's
    ``padding_idx``, so it never gets a gradient) for every padding id.

    Subclasses build :attr:`weight` and :attr:`numeric_weight` and say which rows an id probes
    (:meth:`_categorical_rows`, :meth:`_sequence_rows`: ``[...]`` for one probe or ``[..., k]`` for k) and how the
    looked-up rows become a ``dim``-wide vector (:meth:`_lookup`, the rows themselves unless overridden). Numeric
    fields get a learned vector scaled by their value and sequences are pooled over their real items, as in
    ``per_field``.
    """

    layout: FeatureLayout
    dim: int
    sparse: bool
    weight: nn.Parameter
    numeric_weight: nn.Parameter

    def _categorical_rows(self, batch: FeatureBatch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _sequence_rows(self, batch: FeatureBatch, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _rows_embedding(self, rows: torch.Tensor) -> torch.Tensor:
        """The table rows ``rows`` themselves, ``[..., chunk]`` (padding row zero, without gradient)."""
        return F.embedding(rows, self.weight, padding_idx=PADDING_ROW, sparse=self.sparse)

    def _lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Probed rows -> ``dim``-wide vectors; with one probe per value the rows are the vectors."""
        return self._rows_embedding(rows)

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def forward(self, batch: FeatureBatch) -> EmbeddingOutput:
        parts: list[torch.Tensor] = []
        if self.layout.categorical:
            parts.append(self._lookup(self._categorical_rows(batch)))
        if self.layout.numeric:
            parts.append(batch.numeric.unsqueeze(-1) * self.numeric_weight)
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for spec in self.layout.sequence:
            mask = batch.sequences[spec.name] != PADDING_ID
            vectors = self._lookup(self._sequence_rows(batch, spec.name)) * mask.unsqueeze(-1)
            sequences[spec.name] = (vectors, mask)
        return EmbeddingOutput.assemble(self.layout, parts, sequences)

    def row_ids(self, batch: FeatureBatch) -> torch.Tensor:
        """The rows of :attr:`weight` the batch looks up, one entry per probe (repeats kept, padding excluded):
        every categorical id and every sequence item."""
        ids: list[torch.Tensor] = []
        if self.layout.categorical:
            ids.append(self._categorical_rows(batch)[batch.categorical != PADDING_ID].reshape(-1))
        for spec in self.layout.sequence:
            real = batch.sequences[spec.name] != PADDING_ID
            ids.append(self._sequence_rows(batch, spec.name)[real].reshape(-1))
        if not ids:
            return torch.zeros(0, dtype=torch.long, device=self.weight.device)
        return torch.cat(ids)

    def lazy_l2(self, batch: FeatureBatch) -> torch.Tensor:
        rows = torch.unique(self.row_ids(batch))
        return 0.5 * self._rows_embedding(rows).pow(2).sum()

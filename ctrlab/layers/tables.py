"""Lookup tables stored as one weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConcatenatedTables(nn.Module):
    """``T`` lookup tables of ``rows[t]`` rows each, stored one after another as a single ``[Σ rows, D]`` weight,
    so that looking up one id in every table is one gather: ``forward(ids [B, T]) -> [B, T, D]``. Rows start as
    ``N(0, init_std²)``, the embedding layers' initialisation."""

    offsets: torch.Tensor

    def __init__(self, rows: Sequence[int], dim: int, init_std: float) -> None:
        super().__init__()
        self.rows = [int(r) for r in rows]
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(sum(self.rows), dim) * init_std)
        starts = [0]
        for r in self.rows[:-1]:
            starts.append(starts[-1] + r)
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.long() + self.offsets, self.weight)

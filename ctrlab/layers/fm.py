"""Factorization-machine pairwise interaction."""

from __future__ import annotations

import torch
from torch import nn


class FMInteraction(nn.Module):
    """Σ_{i<j} ⟨v_i, v_j⟩ over field vectors ``[B, F, D]`` -> ``[B]``, computed in O(F·D) as
    ½ Σ_d [(Σ_i v_id)² − Σ_i v_id²] (Rendle 2010, eq. 5)."""

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(dim=1).pow(2)
        sum_of_square = fields.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)

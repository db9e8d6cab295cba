"""DCN-V2's cross network."""

from __future__ import annotations

import torch
from torch import nn


class CrossNetworkV2(nn.Module):
    """``layers`` full-rank cross layers over a flat input ``[B, dim]`` -> ``[B, dim]`` (Wang et al. 2021,
    "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank Systems", eq. 1):

        x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l,   W_l ∈ R^{dim x dim}, b_l ∈ R^dim.

    Layer l models feature crosses up to degree l + 1 (the paper's low-rank mixture, eq. 3, is not implemented).
    """

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a cross network needs at least one layer, got {layers}")
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))  # W_l x_l + b_l
        self.out_dim = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x

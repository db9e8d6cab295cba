"""Embedding regularisers computed per mini-batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mini_batch_aware_l2(weight: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                        coefficient: float, sparse: bool = False) -> torch.Tensor:
    """DIN's mini-batch aware L2 (Zhou et al. 2018, eq. 6-7): ``coefficient · ½ Σ_{j ∈ B} ‖w_j‖² / n_j``.

    ``ids``: the table rows the batch looks up (any shape, repeats allowed, padding already excluded); each distinct
    row counts once (``α_mj`` of eq. 7). ``counts``: ``n_j``, the number of training rows in which row ``j``
    occurs (indexed by row id; values below 1 count as 1). The gradient w.r.t. ``w_j`` is
    ``coefficient · w_j / n_j`` for the rows in the batch and 0 for the others, which is eq. 7's update term.
    ``sparse``: look the rows up with a sparse gradient (for tables trained with sparse gradients).
    """
    rows = torch.unique(ids.reshape(-1))
    if rows.numel() == 0 or coefficient == 0:
        return weight.sum() * 0.0
    n = counts.to(device=weight.device)[rows].to(weight.dtype).clamp(min=1)
    return coefficient * 0.5 * (F.embedding(rows, weight, sparse=sparse).pow(2).sum(dim=1) / n).sum()

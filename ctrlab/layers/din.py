"""Deep Interest Network layers (Zhou et al. 2018): the Dice activation, the local activation unit and the
attention-weighted sum pooling of a behaviour history."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ctrlab.layers.mlp import _ACTIVATIONS, MLP, MLPConfig


class Dice(nn.Module):
    """Data-adaptive activation (DIN eq. 8): ``f(s) = p(s)·s + (1 − p(s))·α·s`` with
    ``p(s) = sigmoid((s − E[s]) / sqrt(Var[s] + eps))``.

    ``E[s]`` and ``Var[s]`` are per unit: the batch statistics in training (biased variance, as batch
    normalisation normalises) and running statistics in evaluation (updated in training with ``momentum``; the
    running variance uses the unbiased estimate). ``α`` is learned per unit. Input ``[N, H]`` or ``[..., H]``
    (statistics over every leading position).
    """

    # Buffers, declared for the type checker (``nn.Module.__getattr__`` is typed ``Tensor | Module``).
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.01, alpha_init: float = 0.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.full((num_features,), float(alpha_init)))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.num_features)
        if self.training and flat.shape[0] > 0:
            var, mean = torch.var_mean(flat, dim=0, unbiased=False)
            with torch.no_grad():
                n = flat.shape[0]
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))
        return x * torch.addcmul(self.alpha, p, 1 - self.alpha)  # = p·x + (1 − p)·α·x with fewer full-size ops

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def _activation(name: str, width: int) -> nn.Module:
    if name == "dice":
        return Dice(width)
    if name == "prelu":
        return nn.PReLU(width)  # one slope per unit; inputs are always [N, width] here
    return _ACTIVATIONS[name]()


def deep_mlp(in_dim: int, config: MLPConfig, out_dim: int | None = 1, activation: str | None = None) -> MLP:
    """:class:`ctrlab.layers.mlp.MLP` whose ``activation`` (e.g. ``"dice"``) overrides ``config.activation``
    with a per-unit module. Inputs must be ``[N, in_dim]``."""
    name = activation or config.activation
    return MLP(in_dim, config, out_dim, activation=lambda width: _activation(name, width))


class LocalActivationUnit(nn.Module):
    """Scores each behaviour against the candidate: ``a(e_j, e_c) = MLP([e_j, e_c, e_j − e_c, e_j ⊙ e_c])``.

    ``dim`` is the width of one behaviour vector: ``k·D`` when a behaviour is the concatenation of ``k`` features'
    embeddings (DIN §4, Fig. 2: goods_id, shop_id, cate_id), so the network's input is ``4·k·D`` wide.

    The weights are NOT softmax-normalised (DIN keeps the intensity of the user's interest). Only real (unmasked)
    behaviours go through the network, so padded positions get weight exactly 0 and never influence the result,
    not even through Dice's batch statistics.

    ``output_bias`` initialises the network's output bias (the paper does not say): with 1 every real behaviour
    starts near weight 1, so training starts from plain (sum or mean) pooling and learns the candidate-dependent
    deviations from it, instead of starting from a near-zero interest vector whose embeddings get no gradient.
    """

    def __init__(self, dim: int, hidden: list[int], activation: Literal["dice", "prelu"] = "dice",
                 output_bias: float = 0.0) -> None:
        super().__init__()
        self.net = deep_mlp(4 * dim, MLPConfig(hidden=list(hidden)), out_dim=1, activation=activation)
        self.output_bias = output_bias
        self.reset_output_bias()

    def reset_output_bias(self) -> None:
        """Set the network's output bias to ``output_bias`` (again, after a block-wide re-initialisation)."""
        output = self.net[-1]
        assert isinstance(output, nn.Linear)
        nn.init.constant_(output.bias, self.output_bias)

    def forward(self, behaviours: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``behaviours [B, L, D]``, ``candidate [B, D]``, ``mask [B, L]`` (True = real) -> weights ``[B, L]``."""
        batch, length, dim = behaviours.shape
        query = candidate.unsqueeze(1).expand(batch, length, dim)
        real = mask.reshape(-1)
        keys = behaviours.reshape(-1, dim)[real]
        query = query.reshape(-1, dim)[real]
        scores = self.net(torch.cat([keys, query, keys - query, keys * query], dim=-1)).squeeze(-1)
        weights = torch.zeros(batch * length, dtype=scores.dtype, device=scores.device)
        weights = weights.masked_scatter(real, scores)
        return weights.reshape(batch, length)


class AttentionPooling(nn.Module):
    """DIN's user-interest vector: ``v_U = Σ_j a(e_j, e_c) · e_j`` over the real behaviours (eq. 3).

    ``e_j`` and ``e_c`` may each be a concatenation of several features' embeddings (``dim = k·D``); ``v_U`` then has
    the same ``k·D`` layout.

    With ``reduce="mean"`` the weighted sum is divided by the number of real behaviours (still no softmax: the
    weights keep their intensity relative to each other, but the vector's scale no longer grows with the history's
    length). This is not in the paper; it is the option that matches a mean-pooled baseline's scale.
    """

    def __init__(self, dim: int, hidden: list[int], activation: Literal["dice", "prelu"] = "dice",
                 reduce: Literal["sum", "mean"] = "sum", output_bias: float = 0.0) -> None:
        super().__init__()
        self.unit = LocalActivationUnit(dim, hidden, activation, output_bias)
        self.reduce = reduce

    def forward(self, behaviours: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor,
                return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weights = self.unit(behaviours, candidate, mask)
        pooled = (weights.unsqueeze(-1) * behaviours * mask.unsqueeze(-1)).sum(dim=1)
        if self.reduce == "mean":
            pooled = pooled / mask.sum(dim=1, keepdim=True).clamp(min=1).to(pooled.dtype)
        return (pooled, weights) if return_weights else pooled

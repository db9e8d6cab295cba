"""Multi-head self-attention over fields: AutoInt's interacting layer."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class InteractingLayer(nn.Module):
    """One interacting layer of AutoInt (Song et al. 2019, "AutoInt: Automatic Feature Interaction Learning via
    Self-Attentive Neural Networks", §4.3, eq. 5–8) over field vectors ``[B, F, in_dim]`` -> ``[B, F, attention_dim]``.

    For every head h with width d' = attention_dim / heads:

    * eq. 5–6: α^(h)_{m,k} = softmax_k ψ(W_Q e_m, W_K e_k), with ψ the inner product ⟨q, k⟩ (the paper), or
      ⟨q, k⟩ / √d' when ``scaled`` (scaled dot-product attention, as FuxiCTR's ``use_scale``);
    * eq. 6: ẽ^(h)_m = Σ_k α^(h)_{m,k} W_V e_k;
    * eq. 7: ẽ_m = ẽ^(1)_m ⊕ … ⊕ ẽ^(H)_m (heads concatenated);
    * eq. 8: e^Res_m = ReLU(ẽ_m + W_Res e_m) with its own projection W_Res (``residual``; without it ReLU(ẽ_m)).
      With ``residual_projection="width_change"`` W_Res exists only where the layer changes the width
      (``in_dim != attention_dim``) and the skip is the identity elsewhere, ReLU(ẽ_m + e_m): FuxiCTR's layer, which
      the BARS benchmark runs use (the paper and its authors' code project in every layer).

    ``layer_norm`` normalises ẽ_m + W_Res e_m before the ReLU (an option of FuxiCTR's implementation, not in the
    paper). With ``keep_attention`` the last forward's weights α are kept in :attr:`last_attention`
    ``[B, heads, F, F]`` (rows over k sum to 1); it is off by default so training keeps no extra tensors.
    """

    def __init__(
        self,
        in_dim: int,
        attention_dim: int,
        heads: int,
        *,
        residual: bool = True,
        layer_norm: bool = False,
        scaled: bool = False,
        residual_projection: Literal["every_layer", "width_change"] = "every_layer",
    ) -> None:
        super().__init__()
        if heads < 1 or attention_dim % heads:
            raise ValueError(f"attention_dim {attention_dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = attention_dim // heads
        self.out_dim = attention_dim
        self.scaled = scaled
        # The H per-head matrices W_Q^(h) [d' x in_dim] stacked into one [H·d' x in_dim] projection (same for K, V).
        self.query = nn.Linear(in_dim, attention_dim, bias=False)
        self.key = nn.Linear(in_dim, attention_dim, bias=False)
        self.value = nn.Linear(in_dim, attention_dim, bias=False)
        project = residual_projection == "every_layer" or in_dim != attention_dim
        self.residual: nn.Module | None = None
        if residual:
            self.residual = nn.Linear(in_dim, attention_dim, bias=False) if project else nn.Identity()
        self.norm = nn.LayerNorm(attention_dim) if layer_norm else None
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [B, F, H·d'] -> [B, H, F, d']
        b, f, _ = x.shape
        return x.view(b, f, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(fields)), self._split(self.key(fields)), self._split(self.value(fields))
        scores = q @ k.transpose(-1, -2)  # ψ(e_m, e_k) = <W_Q e_m, W_K e_k>, [B, H, F, F]
        if self.scaled:
            scores = scores / self.head_dim**0.5
        alpha = torch.softmax(scores, dim=-1)  # eq. 5: normalised over the fields k
        self.last_attention = alpha.detach() if self.keep_attention else None
        heads = alpha @ v  # eq. 6, [B, H, F, d']
        out = heads.transpose(1, 2).reshape(fields.shape[0], fields.shape[1], self.out_dim)  # eq. 7
        if self.residual is not None:
            out = out + self.residual(fields)  # eq. 8
        if self.norm is not None:
            out = self.norm(out)
        return torch.relu(out)

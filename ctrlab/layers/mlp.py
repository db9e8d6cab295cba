"""Multi-layer perceptron shared by every block that has a deep part."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from ctrlab.config.base import MAX_DEPTH, MAX_WIDTH, Int, Section

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "prelu": nn.PReLU,
}


class MLPConfig(Section):
    """Hidden layer widths and their regularisation."""

    hidden: list[Annotated[Int, Field(ge=1, le=MAX_WIDTH)]] = Field(default_factory=lambda: [400, 400, 400],
                                                                    max_length=MAX_DEPTH)
    activation: Literal["relu", "gelu", "silu", "tanh", "sigmoid", "prelu"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    batch_norm: bool = False


class MLP(nn.Sequential):
    """``Linear -> [BatchNorm] -> activation -> [Dropout]`` per hidden layer, then an optional linear output."""

    def __init__(self, in_dim: int, config: MLPConfig, out_dim: int | None = 1,
                 activation: Callable[[int], nn.Module] | None = None) -> None:
        """``activation`` builds the activation module for a layer of a given width (e.g. DIN's per-unit Dice);
        by default ``config.activation``."""
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in config.hidden:
            layers.append(nn.Linear(width, hidden))
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(activation(hidden) if activation else _ACTIVATIONS[config.activation]())
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        super().__init__(*layers)
        self.out_dim = width

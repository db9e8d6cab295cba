"""Model weights as safetensors: no pickle is ever loaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ctrlab.errors import DataError
from ctrlab.utils.io import atomic_path


def save_weights(model: nn.Module, path: str | Path) -> None:
    save_state_dict(model.state_dict(), path)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A model's state dict (e.g. best weights kept aside during training) as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: weights file not found")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")

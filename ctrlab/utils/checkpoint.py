"""Model weights as safetensors: no pickle is ever loaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
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
    """Load safetensors weights into ``model``. Any problem with the file (missing, truncated, not safetensors, a
    tensor the model does not have or of another shape, a NaN or infinite value) is a one-line
    :class:`~ctrlab.errors.DataError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: weights file not found")
    if not path.is_file():
        raise DataError(f"{path}: weights path is not a file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        # The safetensors parser reports a truncated or overwritten file as a header error; say which file it is,
        # since the parser's own message never does.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable safetensors weights file ({reason[:200]}); is it truncated or "
                        "damaged? copy it again from the run or retrain") from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(f"{path}: tensor '{key}' holds NaN or infinite values; the file is damaged or training "
                            "diverged")
    # The model's own loading hooks decide what matches (a pruned mixed-dimension table takes its shapes from the
    # file), so compare through load_state_dict rather than against model.state_dict().
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape or dtype
        reason = " ".join(str(exc).split())
        raise DataError(f"{path}: weights do not match the model ({reason[:240]}); was the recipe or processor "
                        "changed after training?") from None
    if missing or unexpected:
        raise DataError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        "was the recipe or processor changed after training?")

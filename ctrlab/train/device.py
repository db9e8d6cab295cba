"""Device and precision selection."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ctrlab.errors import RecipeError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a recipe error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device: cuda was requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> Any:
    """Mixed-precision context for the forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise RecipeError("train.precision: fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)

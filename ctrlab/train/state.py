"""Resumable training: everything the loop needs to continue after the last finished epoch, saved once per epoch.

A run with ``train.resume: true`` writes ``.<output_dir name>.train_state.pt`` beside its output directory after
every epoch (atomically) and deletes it when the run completes. Rerunning the same recipe finds it and continues
from the epoch after the saved one: the model, the best weights so far, the optimisers (moments, step counts and
learning rates reduced on plateaus), the early-stopping counters, the history, and the random-number generators
(the trainer's shuffling generator and torch's global one, which drives dropout). On the same machine and device
the resumed run therefore ends with the same weights and metrics as one that was never interrupted.

Only the final training resumes: an embedding search (``optembed``, ``dnis``) runs its stages again first (they are
deterministic, so they prune the model to the same shapes the state was saved for).

The file is written with ``torch.save`` and read with ``torch.load(weights_only=True)``: tensors, numbers, strings,
lists and dicts only, no pickled objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrlab.errors import RecipeError
from ctrlab.utils.io import atomic_path

STATE_VERSION = 1
# Keys that change how a run is watched or how fast it goes, never what it computes: a state saved under one
# value may be resumed under another.
_IGNORED_KEYS = (("tracking",), ("output_dir",), ("train", "resume"), ("train", "progress"),
                 ("train", "num_threads"), ("train", "eval_batch_size"))


def state_path(output_dir: str | Path) -> Path:
    """Where a run writing ``output_dir`` keeps its training state: beside it, hidden."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.train_state.pt"


def recipe_digest(recipe: dict[str, Any]) -> str:
    """sha256 of the resolved recipe without the keys that do not change the computation (``_IGNORED_KEYS``)."""
    data = json.loads(json.dumps(recipe, default=str))
    for path in _IGNORED_KEYS:
        node = data
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass
class TrainingStateFile:
    """Where the state goes and which recipe it belongs to (a state from another recipe is never resumed)."""

    path: Path
    digest: str

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"version": STATE_VERSION, "recipe_digest": self.digest, **state}, tmp)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none; a state of another recipe or version is an error that
        names the file."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file
            raise RecipeError(f"{self.path}: not a readable training state ({type(exc).__name__}); delete it to "
                              f"start the run afresh") from None
        if state.get("version") != STATE_VERSION or state.get("recipe_digest") != self.digest:
            raise RecipeError(f"{self.path}: the saved training state belongs to a different recipe (or ctrlab "
                              f"version); delete it to start afresh, or set train.resume=false")
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

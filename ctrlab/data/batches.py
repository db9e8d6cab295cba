"""Model input batches and the in-memory batch iterator the trainer uses.

One input type for every model (as torchrec has one for all sparse features): :class:`FeatureBatch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ctrlab.data.encoded import EncodedSplit


@dataclass
class FeatureBatch:
    """Categorical ids ``[B, Fc]`` (per-field local ids), numeric values ``[B, Fn]``, padded sequence ids
    ``{name: [B, L]}``, labels ``[B]`` and group ids ``[B]`` where known, and cross-feature ids ``[B, P]`` (one
    column per :attr:`FeatureLayout.crosses` entry) where the features define crosses."""

    categorical: torch.Tensor
    numeric: torch.Tensor
    sequences: dict[str, torch.Tensor] = field(default_factory=dict)
    label: torch.Tensor | None = None
    group: torch.Tensor | None = None
    crosses: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> "FeatureBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return FeatureBatch(
            categorical=self.categorical.to(device, non_blocking=non_blocking),
            numeric=self.numeric.to(device, non_blocking=non_blocking),
            sequences={k: v.to(device, non_blocking=non_blocking) for k, v in self.sequences.items()},
            label=move(self.label),
            group=move(self.group),
            crosses=move(self.crosses),
        )

    def select(self, index: torch.Tensor | slice) -> "FeatureBatch":
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return FeatureBatch(
            categorical=self.categorical[index],
            numeric=self.numeric[index],
            sequences={k: v[index] for k, v in self.sequences.items()},
            label=pick(self.label),
            group=pick(self.group),
            crosses=pick(self.crosses),
        )

    def pin_memory(self) -> "FeatureBatch":
        """The batch in page-locked host memory, so that a ``to(cuda, non_blocking=True)`` overlaps compute."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return FeatureBatch(
            categorical=self.categorical.pin_memory(),
            numeric=self.numeric.pin_memory(),
            sequences={k: v.pin_memory() for k, v in self.sequences.items()},
            label=pin(self.label),
            group=pin(self.group),
            crosses=pin(self.crosses),
        )

    @classmethod
    def concat(cls, parts: list["FeatureBatch"]) -> "FeatureBatch":
        """The rows of ``parts`` one after another (all parts hold the same fields)."""
        if len(parts) == 1:
            return parts[0]

        def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if tensors[0] is None else torch.cat(tensors)  # type: ignore[arg-type]

        return cls(
            categorical=torch.cat([p.categorical for p in parts]),
            numeric=torch.cat([p.numeric for p in parts]),
            sequences={k: torch.cat([p.sequences[k] for p in parts]) for k in parts[0].sequences},
            label=cat([p.label for p in parts]),
            group=cat([p.group for p in parts]),
            crosses=cat([p.crosses for p in parts]),
        )

    @classmethod
    def from_encoded(cls, split: EncodedSplit) -> "FeatureBatch":
        """The whole split as tensors (ids as int64, the dtype embedding lookups take without a copy)."""
        return cls(
            categorical=torch.from_numpy(split.categorical.astype(np.int64)),
            numeric=torch.from_numpy(split.numeric.astype(np.float32)),
            sequences={k: torch.from_numpy(v.astype(np.int64)) for k, v in split.sequences.items()},
            label=None if split.label is None else torch.from_numpy(split.label.astype(np.float32)),
            group=None if split.group is None else torch.from_numpy(split.group.astype(np.int64)),
            crosses=None if split.crosses is None else torch.from_numpy(split.crosses.astype(np.int64)),
        )


class BatchIterator:
    """Yields mini-batches of a split held as tensors on one device.

    With ``shuffle`` the whole split is permuted once per epoch (one gather) and batches are contiguous slices of
    the permuted tensors: cheaper than gathering every batch separately.
    """

    def __init__(self, data: FeatureBatch, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, drop_last: bool = False) -> None:
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[FeatureBatch]:
        data = self.data
        if self.shuffle:
            perm = torch.randperm(len(data), generator=self.generator).to(data.categorical.device)
            data = data.select(perm)
        for i in range(len(self)):
            start = i * self.batch_size
            yield data.select(slice(start, start + self.batch_size))

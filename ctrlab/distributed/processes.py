"""The processes of one training run, and the few collectives the trainer needs.

:class:`Processes` describes this process's place in the run (rank, world size, device) and wraps the collectives
``torch.distributed`` offers that the trainer uses: a barrier, a broadcast of a Python value from rank 0, a sum over
ranks, and gathering every rank's rows back into the split's order. A single process is the same object with a
world of one, whose collectives do nothing, so the trainer has one code path.

The process group is started from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): see :func:`start`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ctrlab.config.distributed import DistributedConfig
from ctrlab.errors import RecipeError

T = TypeVar("T")


def launched_world_size() -> int:
    """The world size ``torchrun`` set for this process (1 when not launched by it)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


@dataclass(frozen=True)
class Processes:
    """This process's rank among ``world_size`` training processes (``local_rank`` on its machine).

    Only rank 0 (:attr:`is_main`) writes checkpoints, artefacts and the MLflow run; decisions taken from
    validation metrics are computed on rank 0 and broadcast, so every rank takes the same one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device this rank uses: its own GPU (``cuda:LOCAL_RANK``) when training on CUDA."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    # ------------------------------------------------------------------------------------------ collectives
    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (our own metrics and flags: torch pickles them in transit, between
        processes of this run only)."""
        if not self.distributed:
            return value
        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]  # type: ignore[return-value]

    def all_objects(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over ranks (a new tensor; the input is left as it was)."""
        if not self.distributed:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def gather_rows(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """The split's ``rows`` values in split order, from every rank's values for its shard
        (:func:`~ctrlab.distributed.shards.shard_rows`: rank r holds rows r, r + W, ...)."""
        if not self.distributed:
            return local
        size = -(-rows // self.world_size)
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        # parts[r][i] is row r + i * W: stacking on dim 1 and flattening interleaves them back.
        return torch.stack(parts, dim=1).reshape(size * self.world_size, *local.shape[1:])[:rows]


SINGLE = Processes()
"""One process: every collective is the identity."""


def start(config: DistributedConfig, device: torch.device) -> Processes:
    """Join the process group ``torchrun`` set up (``WORLD_SIZE`` > 1), or run alone.

    ``distributed.backend: auto`` is NCCL on CUDA and gloo on CPU. Alone with ``distributed.sharding`` set, a
    process group of one is started (torchrec's sharded modules talk through one even then: that is how a single
    process gets fbgemm's fused table updates). A ``distributed.processes`` that is neither 1 nor the launched world
    size is a :class:`RecipeError` naming the key."""
    world = launched_world_size()
    if config.processes not in (1, world):
        how = (f"torchrun started {world}" if world > 1 else
               "this process was not started by torchrun (run `ctrlab train --nproc N`, or torchrun)")
        raise RecipeError(f"distributed.processes: the recipe asks for {config.processes} processes but {how}; "
                          "make them agree (or leave distributed.processes at 1 under torchrun)")
    if world == 1 and config.sharding == "none":
        return SINGLE
    backend = config.backend if config.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise RecipeError("distributed.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    timeout = datetime.timedelta(minutes=config.timeout_minutes)
    if world == 1:
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return SINGLE
    processes = Processes(rank=int(os.environ["RANK"]), world_size=world,
                          local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(processes.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return processes


def stop() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(config: DistributedConfig, device: torch.device) -> Iterator[Processes]:
    """:func:`start`, then :func:`stop` however the block ends."""
    joined = dist.is_available() and dist.is_initialized()
    processes = start(config, device)
    try:
        yield processes
    finally:
        if not joined:  # leave only a group this block started
            stop()


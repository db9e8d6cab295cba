"""Parallelism applied from outside an unchanged model, as torchrec does it.

:func:`parallelize` wraps a built :class:`~ctrlab.models.CTRModel` for the run's processes:

* one process: the model itself;
* ``distributed.sharding: none``: PyTorch's ``DistributedDataParallel`` (every rank holds every weight; gradients are
  averaged across ranks in the backward pass);
* ``distributed.sharding`` set (``embedding.backend: torchrec``): torchrec's ``DistributedModelParallel``. Its
  planner places each table on the ranks (table-wise, row-wise, column-wise, ... as it chooses or the recipe
  forces), the dense layers are replicated under DDP, and the tables are updated by fbgemm's fused optimiser inside
  the backward pass (``apply_optimizer_in_backward``: the update never materialises a table-sized gradient).

The model object itself is kept (the trainer reads its parts, e.g. ``embedding_modules``); torchrec swaps the
bag collections inside it for sharded ones in place, so its state-dict keys do not change and
:func:`full_state_dict` gathers a sharded model's weights into the exact dict an unsharded model of the same recipe
loads (serving is single-process).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctrlab.config.distributed import DistributedConfig
from ctrlab.config.train import TrainConfig
from ctrlab.distributed.processes import SINGLE, Processes
from ctrlab.errors import RecipeError
from ctrlab.models.ctr_model import CTRModel

CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
"""What fbgemm's CPU kernels can shard (row-wise placements need CUDA)."""


@dataclass
class ParallelModel:
    """A model prepared for its processes: ``network`` is what the training step calls (the DDP or DMP wrapper,
    which synchronises gradients), ``model`` the unchanged model inside it, ``fused_optimizers`` the optimisers
    torchrec runs inside the backward pass (stepping them only syncs their learning rate)."""

    model: CTRModel
    network: nn.Module
    processes: Processes = SINGLE
    sharded: bool = False
    fused_optimizers: list[torch.optim.Optimizer] = field(default_factory=list)

    @classmethod
    def single(cls, model: CTRModel) -> ParallelModel:
        return cls(model, model)

    def fused_parameters(self) -> set[int]:
        """ids of the parameters the fused optimisers own (the trainer's own optimisers must leave them out)."""
        return {id(p) for p in self.model.parameters() if hasattr(p, "_in_backward_optimizers")}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights as plain tensors on rank 0 (``None`` on the other ranks). A collective when
        sharded: every rank must call it."""
        state = self.model.state_dict()
        if not self.sharded:
            return dict(state) if self.processes.is_main else None
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        full: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if isinstance(value, ShardedTensor):
                out = torch.empty(value.size(), dtype=value.dtype) if self.processes.is_main else None
                value.gather(dst=0, out=out)
                if out is not None:
                    full[key] = out
            else:
                full[key] = value.detach().cpu()
        return full if self.processes.is_main else None

    def snapshot(self) -> dict[str, Any]:
        """This rank's copy of the weights (its shards when sharded), for :meth:`restore`."""
        return copy.deepcopy(self.model.state_dict())

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.model.load_state_dict(snapshot)


def check_sharding(config: DistributedConfig, train: TrainConfig, embedding: Any, device: torch.device) -> None:
    """What torchrec's sharded tables cannot do here, as one-line errors naming the key (checked from the recipe
    alone, before any data is read)."""
    if config.sharding in ("row_wise", "table_row_wise") and device.type != "cuda":
        raise RecipeError(f"distributed.sharding: {config.sharding} needs CUDA (fbgemm's CPU kernels shard "
                          f"{', '.join(CPU_SHARDING_TYPES)}); choose one of those or auto")
    if train.optimizer.name == "adam" and device.type != "cuda":
        raise RecipeError("train.optimizer.name: sharded tables are updated by fbgemm's fused optimiser, which on "
                          "CPU is adagrad (or SGD) only; set train.optimizer.name: adagrad, or train on CUDA")
    if train.optimizer.embedding_regularizer != "weight_decay":
        raise RecipeError("train.optimizer.embedding_regularizer: mini_batch_aware reads whole tables, which "
                          "sharded tables do not have; use weight_decay with distributed.sharding")
    if train.precision == "fp16":
        raise RecipeError("train.precision: fp16 loss scaling cannot reach the fused table updates; use bf16 or "
                          "fp32 with distributed.sharding")
    if getattr(embedding, "sparse", False):
        raise RecipeError("embedding.sparse: with distributed.sharding the tables are updated by torchrec's "
                          "fused optimiser (which touches only the looked-up rows); set embedding.sparse: false")
    width = getattr(embedding, "dim", 4)
    if width % 4:
        raise RecipeError(f"embedding.dim: sharded tables need a width divisible by 4 (fbgemm's kernels), got "
                          f"{width}")


def _check_layout(model: CTRModel) -> None:
    layout = getattr(model.embedding, "layout", None)
    if layout is not None and layout.sequence:
        raise RecipeError("distributed.sharding: sequence features read their table directly (DIN's attention "
                          "needs the unpooled vectors), which a sharded table cannot serve; use "
                          "distributed.sharding: none")


def parallelize(model: CTRModel, processes: Processes, config: DistributedConfig, train: TrainConfig,
                device: torch.device) -> ParallelModel:
    """Wrap ``model`` (already on ``device``) for ``processes``; see the module docstring."""
    if not processes.distributed and config.sharding == "none":
        return ParallelModel.single(model)
    if config.sharding == "none":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # static_graph: DDP learns in the first step which parameters the model leaves unused (an empty numeric
        # table when every numeric field is bucketized, a first-order term of a block without one) and reduces
        # the rest from then on, rather than wait for gradients that never come.
        network = DistributedDataParallel(model, device_ids=ids, static_graph=True)
        return ParallelModel(model, network, processes)
    _check_layout(model)
    return _shard(model, processes, config, train, device)


def _shard(model: CTRModel, processes: Processes, config: DistributedConfig, train: TrainConfig,
           device: torch.device) -> ParallelModel:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    # The unsharded initial weights: torchrec initialises sharded tables afresh; loading these back keeps a sharded
    # run starting exactly where the same recipe on one process starts.
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    embedding = model.embedding
    tables = embedding.table_parameters() if embedding is not None else []
    optimizer = train.optimizer
    if optimizer.name == "adam":
        fused_class: type[torch.optim.Optimizer] = torch.optim.Adam
        options: dict[str, Any] = {"lr": optimizer.lr, "betas": optimizer.betas, "eps": optimizer.eps}
    else:
        fused_class, options = torch.optim.Adagrad, {"lr": optimizer.lr, "eps": optimizer.eps}
    if optimizer.embedding_weight_decay:
        options["weight_decay"] = optimizer.embedding_weight_decay
    apply_optimizer_in_backward(fused_class, tables, options)

    names = list(getattr(embedding, "module_names", {}).values())
    constraints = None
    if config.sharding != "auto":
        constraints = {name: ParameterConstraints(sharding_types=[config.sharding]) for name in names}
    compute = "cuda" if device.type == "cuda" else "cpu"
    with _quiet_planner():
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=processes.world_size, compute_device=compute),
                                           constraints=constraints)
        plan = planner.collective_plan(model, None, dist.GroupMember.WORLD)
    # Only the main embedding is sharded. The first-order term's tables are one float a row (fbgemm's kernels need
    # widths divisible by 4) and small: they stay whole and are replicated like the dense layers.
    plan.plan = {path: module_plan for path, module_plan in plan.plan.items() if path.startswith("embedding.")}
    network = DistributedModelParallel(model, device=device, plan=plan)
    model.load_state_dict(initial)
    fused = network.fused_optimizer
    return ParallelModel(model, network, processes, sharded=True, fused_optimizers=[fused])


@contextlib.contextmanager
def _quiet_planner() -> Iterator[None]:
    """torchrec's planner warns about dry-run storage estimates and how its topology was built on every plan; the
    plan it prints is what matters, and the run reports it (:func:`sharding_plan`)."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torchrec.distributed.planner")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def sharding_plan(parallel: ParallelModel) -> dict[str, str]:
    """Each sharded table's placement as torchrec planned it (``{table: "table_wise on ranks [0]"}``)."""
    plan = getattr(parallel.network, "plan", None)
    if plan is None:
        return {}
    placements: dict[str, str] = {}
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():
            placements[table] = f"{sharding.sharding_type} on ranks {sharding.ranks}"
    return placements

"""Optimiser construction: separate weight decay for embedding tables and dense weights, sparse tables apart, and
the named parameter groups of a search (:class:`~ctrlab.train.hooks.ParameterGroup`) with optimisers of their own."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import torch
from torch import nn

from ctrlab.config.train import OptimizerConfig
from ctrlab.models.ctr_model import CTRModel
from ctrlab.train.hooks import ParameterGroup


@dataclass
class Optimizers:
    """The optimisers of one model: one for dense-gradient parameters and, with sparse tables, one for those, then
    one per named parameter group of a search (``groups``, in the order given).

    ``lazy_embedding_decay`` is the coefficient of the batch-row L2 term the trainer adds to the loss when tables
    have sparse gradients (coupled weight decay on the rows a batch touches).
    """

    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    lazy_embedding_decay: float = 0.0
    mini_batch_aware_decay: float = 0.0
    """Coefficient of DIN's mini-batch aware L2 on the embedding tables (then they get no other weight decay)."""
    groups: list[tuple[ParameterGroup, torch.optim.Optimizer]] = field(default_factory=list)

    @property
    def training(self) -> list[torch.optim.Optimizer]:
        """The optimisers a training step steps: the model's, then the groups stepped on the training loss."""
        return self.optimizers + [opt for group, opt in self.groups if group.step == "train"]

    @property
    def validation(self) -> list[tuple[ParameterGroup, torch.optim.Optimizer]]:
        """The groups a bi-level search steps on validation batches."""
        return [(group, opt) for group, opt in self.groups if group.step == "validation"]

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        """Every optimiser, in a fixed order (saved and restored with a resumable run)."""
        return self.optimizers + [opt for _, opt in self.groups]

    def zero_grad(self) -> None:
        for opt in self.training:
            opt.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        for opt in self.training:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()

    @property
    def lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])

    def scale_lr(self, factor: float, min_lr: float) -> None:
        """``train.lr_on_plateau``: the model's optimisers, and the groups whose ``on_plateau`` is true."""
        scaled = self.optimizers + [opt for group, opt in self.groups if group.on_plateau]
        for opt in scaled:
            for param_group in opt.param_groups:
                param_group["lr"] = max(param_group["lr"] * factor, min_lr)


def build_optimizers(model: CTRModel, config: OptimizerConfig,
                     parameter_groups: Sequence[ParameterGroup] = (), exclude: AbstractSet[int] = frozenset()
                     ) -> Optimizers:
    """The model's optimisers for ``config`` and one optimiser per named group; the groups' parameters and every
    architecture parameter of the model are left out of the model's optimisers. An architecture parameter in no
    group is a ``ValueError`` (it would silently never train). Parameters whose ``id`` is in ``exclude`` are
    updated elsewhere (sharded tables under torchrec's fused optimiser) and left out of every optimiser here."""
    grouped = {id(p) for group in parameter_groups for p in group.params}
    orphans = [name for name, p in model.named_parameters()
               if id(p) in {id(a) for a in model.architecture_parameters()} and id(p) not in grouped]
    if orphans:
        raise ValueError(f"architecture parameters {', '.join(orphans)} belong to no parameter group: the search "
                         "that adds them must give them an optimiser (TrainingHooks.parameter_groups)")
    mini_batch_aware = config.embedding_regularizer == "mini_batch_aware"
    embedding_params: list[nn.Parameter] = []
    undecayed_tables: list[nn.Parameter] = []  # dense-gradient tables under the mini-batch aware L2
    sparse_params: list[nn.Parameter] = []
    # An architecture search (thresholds, significance weights, gates) optimises these with its own optimiser.
    architecture = {id(p) for p in model.architecture_parameters()} | grouped | set(exclude)
    for module in model.embedding_modules():
        tables = set(map(id, module.table_parameters()))
        for param in module.parameters():
            if id(param) in architecture:
                continue
            if id(param) in tables and module.sparse:
                sparse_params.append(param)
            elif id(param) in tables and mini_batch_aware:
                undecayed_tables.append(param)
            else:
                embedding_params.append(param)
    # A pair layer's lookup tables (memorised crosses, factor vectors) are embedding tables too.
    pair_tables = model.interaction.table_parameters() if model.interaction is not None else []
    embedding_params += [p for p in pair_tables if id(p) not in architecture]
    seen = {id(p) for p in embedding_params + undecayed_tables + sparse_params} | architecture
    dense_params = [p for p in model.parameters() if id(p) not in seen]

    groups = [
        {"params": embedding_params, "weight_decay": config.embedding_weight_decay},
        {"params": undecayed_tables, "weight_decay": 0.0},
        {"params": dense_params, "weight_decay": config.dense_weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    result = Optimizers()
    if config.name == "adam":
        result.optimizers.append(torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps))
        if sparse_params:
            result.optimizers.append(torch.optim.SparseAdam(sparse_params, lr=config.lr, betas=config.betas,
                                                            eps=config.eps))
    else:
        result.optimizers.append(torch.optim.Adagrad(groups, lr=config.lr, eps=config.eps))
        if sparse_params:
            result.optimizers.append(torch.optim.Adagrad(sparse_params, lr=config.lr, eps=config.eps))
    result.groups = [(group, group.build()) for group in parameter_groups]
    if mini_batch_aware:
        result.mini_batch_aware_decay = config.embedding_weight_decay
    elif sparse_params:
        result.lazy_embedding_decay = config.embedding_weight_decay
    return result

"""The trainer's public extension points, which the architecture searches (:mod:`ctrlab.search`) use instead of
subclassing the trainer:

- :attr:`TrainingHooks.loss_terms`: terms added to the training loss of every step (a sparsity regulariser);
- :attr:`TrainingHooks.before_epoch`: called with the epoch number before it trains (a temperature schedule);
- :attr:`TrainingHooks.parameter_groups`: named :class:`ParameterGroup` s, each with its own optimiser, learning
  rate and weight decay, stepped on the training loss (``step="train"``) or, for a first-order bi-level search, on
  the loss of the next validation batch after every training step (``step="validation"``, see
  :class:`ValidationStep`).

Which learning rates ``train.lr_on_plateau`` lowers: the model's own optimisers always; a parameter group's only
when its ``on_plateau`` is true (each search says so for its groups: OptEmbed's thresholds follow the model's
learning rate down, DNIS's significance weights and OptFS's gates keep theirs).

Every parameter a model reports in ``architecture_parameters()`` must belong to a group: the trainer refuses a
model whose architecture parameters no search gave an optimiser, rather than let them join the model's Adam with
its weight decay.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ctrlab.data.batches import BatchIterator, FeatureBatch
from ctrlab.train.device import autocast

LossTerm = Callable[[FeatureBatch], torch.Tensor]
EpochStart = Callable[[int], None]


@dataclass
class ParameterGroup:
    """Parameters with their own optimiser: ``name`` (for messages and logs), ``optimizer`` (``adam``),
    ``lr``, ``weight_decay`` (coupled L2, as torch's), ``on_plateau`` (whether ``train.lr_on_plateau`` lowers
    ``lr``) and ``step``: ``train`` (stepped with the model's optimisers on the training loss) or ``validation``
    (stepped by :class:`ValidationStep` on validation batches; the training loss never reaches these)."""

    name: str
    params: Sequence[nn.Parameter]
    lr: float
    weight_decay: float = 0.0
    on_plateau: bool = False
    step: Literal["train", "validation"] = "train"
    optimizer: Literal["adam"] = "adam"

    def build(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.params), lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class TrainingHooks:
    """What a search adds to an ordinary training run (see the module docstring)."""

    loss_terms: list[LossTerm] = field(default_factory=list)
    before_epoch: list[EpochStart] = field(default_factory=list)
    parameter_groups: list[ParameterGroup] = field(default_factory=list)


class ValidationStep:
    """One architecture step of a first-order bi-level optimisation (DNIS, Cheng et al. 2020, Section 3.3; the
    first-order DARTS approximation): with the model's weights fixed, ``α ← optimiser(α, ∇_α L_valid(w, α))`` on
    the next batch of the validation split (shuffled once per pass with its own generator, cycled).

    The batch is scored in eval mode (no dropout, batch-norm statistics untouched) and the gradient is taken with
    :func:`torch.autograd.grad` for the group's parameters alone: the weights get no gradient and no update. Outside
    this step the group's parameters have ``requires_grad`` off (:meth:`freeze`), so training batches never reach
    them. After a step their ``.grad`` holds the validation gradient it used."""

    def __init__(self, model: nn.Module, groups: Sequence[tuple[ParameterGroup, torch.optim.Optimizer]],
                 valid: FeatureBatch, batch_size: int, device: torch.device, precision: str = "fp32",
                 seed: int = 0) -> None:
        self.model = model
        self.groups = list(groups)
        self.params = [p for group, _ in self.groups for p in group.params]
        self.device = device
        self.precision = precision
        self.steps = 0
        generator = torch.Generator().manual_seed(seed)
        self._batches = self._cycle(BatchIterator(valid.to(device), batch_size, shuffle=True, generator=generator))
        self.freeze()

    @staticmethod
    def _cycle(iterator: BatchIterator) -> Iterator[FeatureBatch]:
        for _ in itertools.count():
            yield from iterator

    def freeze(self) -> None:
        for param in self.params:
            param.requires_grad_(False)

    def release(self) -> None:
        """Give the parameters ``requires_grad`` back (after training: they are ordinary parameters again)."""
        for param in self.params:
            param.requires_grad_(True)

    def __call__(self) -> None:
        batch = next(self._batches)
        was_training = self.model.training
        self.model.eval()
        for param in self.params:
            param.requires_grad_(True)
        try:
            with autocast(self.device, self.precision):
                logits = self.model(batch)
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch.label)  # type: ignore[arg-type]
            grads = torch.autograd.grad(loss, self.params)
        finally:
            self.freeze()
            self.model.train(was_training)
        for param, grad in zip(self.params, grads):
            param.grad = grad
        for _, optimizer in self.groups:
            optimizer.step()
        self.steps += 1

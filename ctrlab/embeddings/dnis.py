"""DNIS (Cheng, Shen, Huang 2020, "Differentiable Neural Input Search for Recommender Systems"): a soft
selection layer weighs every embedding dimension of every field; the weights are learnt against the validation
loss, then each field keeps its most significant dimensions (stages in :mod:`ctrlab.search.dnis`).

``embedding.kind: dnis`` registers the table the final model holds (:class:`DNISEmbedding`, a mixed-dimension
table); the search stage trains :class:`DNISSearchEmbedding`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.mixed_dim import MixedDimEmbedding
from ctrlab.embeddings.searchable import FullTableSearchEmbedding, SearchableEmbeddingConfig

DNISStage = Literal["search", "retrain"]
DEFAULT_BUDGET = 0.5


class DNISConfig(SearchableEmbeddingConfig):
    """DNIS (Cheng et al. 2020): ``search`` trains the model with a soft selection layer ``ẽ = e ⊙ α_f`` whose
    significance weights ``α`` follow the validation loss (first-order bi-level optimisation, alternating a
    training step on the weights with a validation step on ``α``); the dimensions of each field are then ranked by
    ``|α|`` and pruned by a relative ``threshold`` or a parameter ``budget``; ``retrain`` trains a fresh model
    (same seed, same initial values) whose table keeps only those dimensions, with the recipe's ``train`` settings.

    Set one of ``threshold`` and ``budget``; with neither, ``budget`` is 0.5.
    """

    STAGES: ClassVar[tuple[str, ...]] = ("search", "retrain")

    kind: Literal["dnis"] = "dnis"
    stages: list[DNISStage] = Field(default_factory=lambda: ["search", "retrain"],
                                    description="stages this run does, in order: search, retrain")
    search_epochs: int = Field(10, ge=1, description="epochs of the bi-level search (early stopping and "
                                                     "lr_on_plateau as in train)")
    arch_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the significance weights alpha, "
                                                   "stepped on a validation batch after every training step")
    alpha_init: float = Field(1.0, description="initial value of every significance weight")
    threshold: float | None = Field(None, gt=0, le=1, description="keep the (field, dimension) units whose |alpha| "
                                                                  "is at least this fraction of the largest |alpha|")
    budget: float | None = Field(None, gt=0, le=1, description="fraction of the full table's parameters to keep: "
                                                               "the most significant (field, dimension) units, each "
                                                               "costing its field's rows")

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("threshold") is None and data.get("budget") is None:
            data = {**data, "budget": DEFAULT_BUDGET}
        return data

    @model_validator(mode="after")
    def _one_rule(self) -> DNISConfig:
        if self.threshold is not None and self.budget is not None:
            raise ValueError("embedding.threshold and embedding.budget are alternatives: set one and make the "
                             "other null")
        return self


class DNISSearchEmbedding(FullTableSearchEmbedding):
    """DNIS's soft selection layer over the full table (Cheng et al. 2020, Section 3.2): the vector of field
    (unit) ``f`` is ``ẽ = e ⊙ α_f``, with one learnable significance weight per (unit, dimension), ``α: U × D``.

    ``α`` is an architecture parameter: the trainer's optimisers leave it out and the search stage steps it on
    validation batches only (Section 3.3, the first-order approximation of the bi-level problem). During the
    weights' step it is excluded from autograd (``requires_grad`` off), so training batches give it no gradient.
    """

    def __init__(self, config: DNISConfig, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__(config, layout, dim)
        self.alpha = nn.Parameter(torch.full((len(self.units), self.dim), float(config.alpha_init)))
        self.register_buffer("unit_rows", torch.tensor(self.units.rows, dtype=torch.long), persistent=False)

    def architecture_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def select(self, vectors: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return vectors * self.alpha[units]

    def effective_table(self) -> torch.Tensor:
        """``e ⊙ α_f`` for every row: the table the searched network effectively uses."""
        return (self.weight * self.alpha.repeat_interleave(self.unit_rows, dim=0)).detach()

    def significance(self) -> torch.Tensor:
        """``|α|``, ``[units, D]`` (detached, on CPU)."""
        return self.alpha.detach().abs().cpu()


@EMBEDDINGS.register("dnis", DNISConfig)
class DNISEmbedding(MixedDimEmbedding):
    """The table of a model trained with ``embedding.kind: dnis``: DNIS's mixed-dimension table (Cheng et al.
    2020, Section 3.3, pruning the least significant dimensions), a
    :class:`~ctrlab.embeddings.mixed_dim.MixedDimEmbedding` that keeps per field the dimensions with the largest
    ``|α|``, most significant first. Built from the recipe alone it has full shapes; the search stages prune it,
    and loading a run's weights re-shapes it."""

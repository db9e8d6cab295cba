"""OptEmbed (Lyu et al. 2022, "OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction",
CIKM): row pruning with learnable per-table thresholds and a one-shot supernet over per-field dimensions, then an
evolutionary search and re-training (stages in :mod:`ctrlab.search.optembed`).

``embedding.kind: optembed`` registers the table the final model holds (:class:`OptEmbedEmbedding`, a
mixed-dimension table); the supernet stage trains :class:`OptEmbedSupernet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ctrlab.config.base import MAX_COUNT, MAX_EPOCHS, MAX_POPULATION, Int
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.embeddings.mixed_dim import MixedDimEmbedding
from ctrlab.embeddings.searchable import FullTableSearchEmbedding, SearchableEmbeddingConfig, binary_step

OptEmbedStage = Literal["supernet", "search", "retrain"]


def _every_stage() -> list[OptEmbedStage]:
    return ["supernet", "search", "retrain"]


class OptEmbedConfig(SearchableEmbeddingConfig):
    """OptEmbed (Lyu et al. 2022): ``supernet`` trains the full table with learnable row-pruning thresholds
    (Section 3.2, redundant embedding pruning) while every (example, field) sees a random number of leading
    dimensions (Section 3.3, supernet training with uniform dimension sampling); ``search`` evolves per-field
    dimensions scored by the supernet's validation AUC (Section 3.3, evolutionary search); ``retrain`` trains a
    fresh model (same seed, same initial values) whose table keeps only the surviving rows and the found
    dimensions (Section 3.4, re-training) with the recipe's ``train`` settings.

    Defaults follow the authors' settings (threshold lr 1e-4, α 1e-4, 10 mutations, 10 crossovers, 30
    generations, mutation probability 0.1, parents drawn from the best 15), except:

    - ``keep``: the authors carry no candidate over unchanged (0); here the best 5 are, so every generation's best
      is at least the last one's;
    - ``warmup_epochs``: the paper and its reference code sample dimensions from the first step. Here the supernet
      first trains at all dimensions (up to 10 epochs, thresholds learning), as once-for-all networks first train
      their largest network (Cai et al. 2020, progressive shrinking): a table that starts near 0 (``init_std``
      1e-4) leaves the network on a plateau it escapes only after some epochs, and with sampled dimensions from the
      start it did not escape before ``lr_on_plateau`` and early stopping ended the supernet (quickstart at 200,000
      rows: validation AUC 0.731 against 0.801 after the warm-up), so the search scored candidates on a network that
      barely used its embeddings;
    - after a warm-up, the sampling phase is validated at sampled dimensions (the same draws every epoch), the
      distribution it trains on and the sub-networks the search scores, not at all dimensions, which that phase
      trains least (dimension ``D`` is kept 1 time in ``D``; on the quickstart the sampled supernet scores 0.797 at
      all dimensions against 0.807 for the search's best candidate). ``warmup_epochs: 0`` trains the supernet as
      the paper (sampling from the first step, validated at all dimensions);
    - ``fallback_tolerance``: the paper takes the search's best candidate whatever it scores; here every field
      keeps all its dimensions when that candidate scores more than the tolerance (default 0) below the supernet
      at all dimensions, on the same validation rows."""

    STAGES: ClassVar[tuple[str, ...]] = ("supernet", "search", "retrain")

    kind: Literal["optembed"] = "optembed"
    stages: list[OptEmbedStage] = Field(default_factory=_every_stage,
                                        description="stages this run does, in order: supernet, search, retrain")
    warmup_epochs: Int = Field(10, ge=0, le=MAX_EPOCHS,
                               description="supernet epochs at all dimensions (thresholds learning) before the "
                                           "dimension sampling starts (early stopping and lr_on_plateau as in "
                                           "train); 0: sample from the first step, as the paper")
    supernet_epochs: Int = Field(10, ge=1, le=MAX_EPOCHS, description="supernet epochs with uniform dimension "
                                                                      "sampling, after the warm-up (early stopping "
                                                                      "and lr_on_plateau as in train, on the "
                                                                      "validation AUC at sampled dimensions)")
    threshold_init: float = Field(0.0, description="initial pruning threshold t_f of every table (L1 norm)")
    threshold_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the thresholds")
    sparsity_weight: float = Field(1e-4, ge=0, description="alpha of the threshold regulariser "
                                                           "alpha · Σ_f exp(-t_f) added to the supernet loss")
    generations: Int = Field(30, ge=1, le=MAX_EPOCHS, description="generations of the evolutionary dimension search")
    keep: Int = Field(5, ge=0, le=MAX_POPULATION,
                      description="best candidates carried into the next generation unchanged")
    mutation: Int = Field(10, ge=0, le=MAX_POPULATION, description="mutated candidates per generation")
    crossover: Int = Field(10, ge=0, le=MAX_POPULATION, description="crossed-over candidates per generation")
    mutation_prob: float = Field(0.1, gt=0, le=1, description="chance that a mutation redraws a field's dimension")
    parents: Int = Field(15, ge=1, le=MAX_POPULATION,
                         description="mutations and crossovers draw their parents from this many best "
                                               "candidates of the generation")
    max_parameters: float | None = Field(None, gt=0, le=1, description="search only candidates storing at most "
                                                                       "this fraction of the full table's parameters "
                                                                       "(after row pruning); default: no limit, as in "
                                                                       "the paper")
    fallback_tolerance: float | None = Field(0.0, ge=0, le=1,
                                             description="keep every field at all dimensions when the best "
                                                         "candidate's validation AUC is more than this below the "
                                                         "supernet's at all dimensions (scored on the same rows); "
                                                         "null: always take the search's best, as the paper")
    search_rows: Int | None = Field(None, ge=1000, le=MAX_COUNT,
                                    description="score each candidate on a seeded sample of this "
                                                               "many validation rows (default: all of them)")

    @model_validator(mode="after")
    def _population(self) -> OptEmbedConfig:
        if self.keep + self.mutation + self.crossover < 2:
            raise ValueError("embedding.keep + embedding.mutation + embedding.crossover (the search's population) "
                             "must be at least 2")
        return self


class OptEmbedSupernet(FullTableSearchEmbedding):
    """OptEmbed's supernet embedding (Lyu et al. 2022, Sections 3.2 and 3.3).

    **Row pruning** (Section 3.2): table ``f`` has a learnable threshold ``t_f``; row ``e`` is kept where
    ``m = S(‖e‖_1 - t_f) = 1``, with ``S`` the unit step and a straight-through surrogate gradient
    (:class:`~ctrlab.embeddings.searchable.BinaryStep`). The mask is computed on the full row in training and
    evaluation alike; :meth:`sparsity_loss` is the threshold regulariser ``α · Σ_f exp(-t_f)`` the supernet loss
    adds, pushing thresholds up.

    **Supernet dimensions** (Section 3.3, uniform dimension sampling): in training every (example, unit) draws
    ``d`` uniformly from ``1..D`` and its vectors keep their first ``d`` dimensions (a field sharing a vocabulary,
    e.g. a behaviour history, shares its table's ``d``); with :attr:`sampling` off (the warm-up) training uses all
    ``D``. In evaluation all ``D`` dimensions are used, or the candidate's dimensions set with :meth:`use_dims`
    (the evolutionary search), or, after :meth:`sample_in_evaluation`, dimensions drawn as in training from a
    seeded generator. Numeric fields' vectors are never row-pruned but take part in the dimension search.
    """

    dim_range: torch.Tensor
    candidate_dims: torch.Tensor | None

    def __init__(self, config: OptEmbedConfig, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__(config, layout, dim)
        self.sparsity_weight = config.sparsity_weight
        self.thresholds = nn.Parameter(torch.full((self.units.num_tables,), float(config.threshold_init)))
        self.register_buffer("dim_range", torch.arange(self.dim), persistent=False)
        self.register_buffer("candidate_dims", None, persistent=False)
        self.sampling = True
        self._evaluation_draws: torch.Generator | None = None
        self._sampled_dims: torch.Tensor | None = None

    def architecture_parameters(self) -> list[nn.Parameter]:
        return [self.thresholds]

    def use_dims(self, dims: Sequence[int] | None) -> None:
        """Evaluate with ``dims`` (one per unit) instead of all ``D`` dimensions; ``None``: all dimensions."""
        if dims is None:
            self.candidate_dims = None
            return
        if len(dims) != len(self.units) or any(not 1 <= int(d) <= self.dim for d in dims):
            raise ValueError(f"candidate dimensions must be {len(self.units)} values in 1..{self.dim}")
        self.candidate_dims = torch.tensor([int(d) for d in dims], dtype=torch.long, device=self.weight.device)

    def sample_in_evaluation(self, seed: int | None) -> None:
        """Evaluate at sampled dimensions too (when no candidate is set): every (example, unit) draws its ``d``
        uniformly from ``1..D`` with a generator seeded with ``seed``, so an evaluation that starts right after this
        call scores the same draws as every other one; ``None``: evaluate at all dimensions again."""
        self._evaluation_draws = None if seed is None else torch.Generator().manual_seed(seed)

    def sample_dims(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, units]`` dimensions drawn uniformly from ``1..D`` (torch's global RNG, or ``generator``'s, drawn on
        the CPU)."""
        if generator is not None:
            dims = torch.randint(1, self.dim + 1, (batch_size, len(self.units)), generator=generator)
            return dims.to(self.weight.device)
        return torch.randint(1, self.dim + 1, (batch_size, len(self.units)), device=self.weight.device)

    def forward(self, batch: FeatureBatch) -> EmbeddingOutput:
        if self.training:
            self._sampled_dims = self.sample_dims(len(batch)) if self.sampling else None
        elif self.candidate_dims is None and self._evaluation_draws is not None:
            self._sampled_dims = self.sample_dims(len(batch), self._evaluation_draws)
        else:
            self._sampled_dims = None
        try:
            return super().forward(batch)
        finally:
            self._sampled_dims = None

    def row_mask_of(self, vectors: torch.Tensor, units: torch.Tensor) -> torch.Tensor | None:
        """``S(‖e‖_1 - t_f)`` of looked-up vectors ``[B, P, D]`` (1 for numeric units); None without tables."""
        tables = self.units.num_tables
        is_table = units < tables
        if tables == 0 or not bool(is_table.any()):
            return None
        thresholds = self.thresholds[units.clamp(max=tables - 1)]
        mask = binary_step(vectors.abs().sum(dim=-1) - thresholds)
        return torch.where(is_table, mask, torch.ones_like(mask))

    def select(self, vectors: torch.Tensor, units: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        mask = self.row_mask_of(vectors, units)
        if mask is not None:
            vectors = vectors * mask.unsqueeze(-1)
        if self._sampled_dims is not None:
            dims = self._sampled_dims[:, units]  # [B, P], or [B, 1] for a sequence's items
            vectors = vectors * (self.dim_range < dims.unsqueeze(-1)).to(vectors.dtype)
        elif self.candidate_dims is not None:
            vectors = vectors * (self.dim_range < self.candidate_dims[units].unsqueeze(-1)).to(vectors.dtype)
        return vectors

    def sparsity_loss(self) -> torch.Tensor:
        """``α · Σ_f exp(-t_f)``, the threshold regulariser of Lyu et al. 2022, Section 3.2."""
        return self.sparsity_weight * torch.exp(-self.thresholds).sum()

    @torch.no_grad()
    def row_mask(self) -> dict[str, torch.Tensor]:
        """Per vocabulary table, which rows survive: ``‖e‖_1 > t_f`` (bool, on CPU)."""
        norms = self.weight.abs().sum(dim=1)
        out = {}
        for unit in range(self.units.num_tables):
            start, rows = self.units.offsets[unit], self.units.rows[unit]
            out[self.units.names[unit]] = (norms[start:start + rows] - self.thresholds[unit] > 0).cpu()
        return out


@EMBEDDINGS.register("optembed", OptEmbedConfig)
class OptEmbedEmbedding(MixedDimEmbedding):
    """The table of a model trained with ``embedding.kind: optembed``: OptEmbed's re-trained table (Lyu et al.
    2022, Section 3.4), a :class:`~ctrlab.embeddings.mixed_dim.MixedDimEmbedding` that keeps the rows the supernet's
    thresholds kept and the dimensions the evolutionary search found. Built from the recipe alone it has full
    shapes; the search stages prune it, and loading a run's weights re-shapes it."""

"""OptInter (Lyu et al. 2022, ICDE, "Memorize, Factorize, or be Naive: Learning Optimal Feature Interaction Methods
for CTR Prediction"): per pair of fields, a search over three interaction methods (stages in
:mod:`ctrlab.search.optinter`).

``interaction.kind: optinter`` searches with :class:`PairMixture` in the model's pair slot; the final model's pair
layer is a :class:`~ctrlab.interactions.base.PairVectors` of the decided methods, which the processor carries
(:meth:`~ctrlab.data.processor.FeatureProcessor.choose_pairs`), so serving builds it from ``processor.json``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ctrlab.config.base import MAX_EPOCHS, Int, Section
from ctrlab.config.stages import check_ends_with_retrain, check_stages
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.errors import RecipeError
from ctrlab.interactions import INTERACTIONS
from ctrlab.interactions.base import FACTORIZE, MEMORIZE, METHODS, PairInteraction, PairVectors

OptInterStage = Literal["search", "retrain"]


def _every_stage() -> list[OptInterStage]:
    return ["search", "retrain"]


class OptInterConfig(Section):
    """OptInter (Lyu et al. 2022). ``search`` trains the recipe's model with every candidate pair (the crosses of
    ``features.crosses``) as a mixture of its three methods, weights ``softmax(alpha_p / t)`` (Section III-C,
    eq. 8), for at most ``search_epochs`` epochs while ``t`` falls geometrically from ``initial_temperature`` to
    ``final_temperature``; the architecture weights ``alpha`` learn with their own Adam (``arch_lr``, no weight
    decay) on the training batches (one-level) or, with ``bilevel``, on the next validation batch after every
    training step (first-order DARTS, Section III-D). ``gumbel`` adds Gumbel noise to ``alpha`` in training
    (Gumbel-softmax). Bi-level is the default: stepped on the training loss, ``alpha`` favours whatever fits the
    training rows best, and memorising fits them best (on the generator's planted pairs at 300,000 rows the
    one-level search memorised 44 of 45 pairs and reached test AUC 0.7479, the bi-level one kept 6 memorised, 34
    factorised, 5 naive at 0.7751). The search keeps the epoch with the best validation metric
    (``train.early_stopping``, whose patience applies too) and each pair's method is the argmax of its ``alpha``
    there. ``retrain`` trains a fresh model with those methods (the run's final training, early stopping on
    validation).

    The reference code picks its architecture at the epoch with the best *test* AUC and allocates every cross table
    in full for the final model; here the test split is scored once, at the end, and only memorised pairs get a
    table."""

    STAGES: ClassVar[tuple[str, ...]] = ("search", "retrain")

    kind: Literal["optinter"] = "optinter"
    stages: list[OptInterStage] = Field(default_factory=_every_stage)
    from_run: str | None = Field(None, description="an earlier run directory whose interaction_search/ outputs "
                                                   "stage retrain starts from")
    search_epochs: Int = Field(10, ge=1, le=MAX_EPOCHS, description="most epochs of the search")
    initial_temperature: float = Field(1.0, gt=0, le=1e6, description="temperature t of the first search epoch")
    final_temperature: float = Field(0.01, gt=0, le=1e6, description="temperature t of the last search epoch")
    arch_lr: float = Field(3e-3, gt=0, le=1e3, description="learning rate of the architecture weights' Adam")
    bilevel: bool = Field(True, description="step the architecture weights on validation batches (bi-level); "
                                            "false: on the training batches (one-level)")
    gumbel: bool = Field(False, description="add Gumbel noise to the architecture weights in training")

    @model_validator(mode="after")
    def _check(self) -> OptInterConfig:
        check_stages("interaction", self.stages, self.STAGES, self.from_run)
        check_ends_with_retrain("interaction", self.stages, "mixed pair vectors")
        return self

    def temperature(self, epoch: int) -> float:
        """t of search epoch ``epoch`` (1-based): geometric from ``initial_temperature`` (epoch 1) to
        ``final_temperature`` (epoch ``search_epochs``)."""
        if self.search_epochs == 1:
            return float(self.final_temperature)
        ratio = self.final_temperature / self.initial_temperature
        return float(self.initial_temperature * ratio ** ((epoch - 1) / (self.search_epochs - 1)))


@INTERACTIONS.register("optinter", OptInterConfig)
def decided_pairs(config: OptInterConfig, layout: FeatureLayout, dim: int, init_std: float) -> PairVectors:
    """The final model's pair layer (Lyu et al. 2022, Section III-E): the methods the search decided, as the
    processor's layout carries them."""
    undecided = [cross.name for cross in layout.crosses if cross.method is None]
    if undecided:
        raise RecipeError(f"interaction.kind optinter: pairs {', '.join(undecided[:5])} are not decided yet; the "
                          "search stage decides them (or interaction.from_run names a run that did)")
    return PairVectors(layout, dim, init_std, [cross.method or "" for cross in layout.crosses])


class PairMixture(PairInteraction):
    """OptInter's search layer (Lyu et al. 2022, eq. 7-8): for every candidate pair ``p`` the vector
    ``o_p = w_p,mem · e_p + w_p,fac · (v_a ⊙ v_b) + w_p,naive · 0`` with ``w_p = softmax((alpha_p + g_p) / t)``
    (``g_p`` Gumbel noise in training when ``gumbel``, else 0). The memorised and factorised candidates are two
    :class:`~ctrlab.interactions.base.PairVectors` (every pair memorised, every pair factorised), so fixing ``w``
    to a one-hot architecture gives exactly the single-method layers' vectors. ``alpha`` starts at 0 (every method
    equally weighted)."""

    def __init__(self, layout: FeatureLayout, dim: int, init_std: float, gumbel: bool = False) -> None:
        super().__init__()
        pairs = len(layout.crosses)
        self.names = [cross.name for cross in layout.crosses]
        self.memorize = PairVectors(layout, dim, init_std, [MEMORIZE] * pairs)
        self.factorize = PairVectors(layout, dim, init_std, [FACTORIZE] * pairs)
        self.alpha = nn.Parameter(torch.zeros(pairs, len(METHODS)))
        self.temperature = 1.0
        self.gumbel = gumbel
        self.extra_fields = pairs

    def weights(self) -> torch.Tensor:
        """``[P, 3]`` method weights (memorize, factorize, naive) at the current temperature (noisy in training with
        ``gumbel``)."""
        alpha: torch.Tensor = self.alpha
        if self.gumbel and self.training:
            uniform = torch.rand_like(alpha).clamp(1e-10, 1 - 1e-10)
            alpha = alpha - torch.log(-torch.log(uniform))
        return F.softmax(alpha / self.temperature, dim=1)

    def pair_vectors(self, batch: FeatureBatch) -> torch.Tensor:
        weights = self.weights()
        memorized = self.memorize.pair_vectors(batch)
        factorized = self.factorize.pair_vectors(batch)
        return weights[:, 0, None] * memorized + weights[:, 1, None] * factorized

    def choices(self) -> dict[str, str]:
        """Each pair's method: the argmax of its ``alpha`` (ties: memorize, then factorize)."""
        best = self.alpha.detach().argmax(dim=1).tolist()
        return {name: METHODS[k] for name, k in zip(self.names, best)}

    def table_parameters(self) -> list[nn.Parameter]:
        return self.memorize.table_parameters() + self.factorize.table_parameters()

    def architecture_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

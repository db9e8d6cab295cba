"""OptFS (Lyu et al. 2023, "Optimizing Feature Set for Click-Through Rate Prediction", WWW): one learnable gate per
feature *value*, searched jointly with the model and then used as a hard mask (stages in
:mod:`ctrlab.search.optfs`).

``gate.kind: optfs`` puts :class:`OptFSGate` into the model slot between the embedding and the block during the
search; the final model has no gate: the kept values are applied to the data instead
(:mod:`ctrlab.data.kept_values`), so a dropped value is out-of-vocabulary in training and at serving and the
table stores kept rows only.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ctrlab.config.base import MAX_EPOCHS, Int, Section
from ctrlab.config.stages import check_ends_with_retrain, check_stages
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FIRST_VALUE_ID, FeatureLayout
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.embeddings.mixed_dim import EmbeddingUnits, flat_row_ids
from ctrlab.gates import GATES
from ctrlab.gates.base import FeatureGate

OptFSStage = Literal["search", "retrain"]


def _every_stage() -> list[OptFSStage]:
    return ["search", "retrain"]


class OptFSConfig(Section):
    """OptFS (Lyu et al. 2023). ``search`` trains the recipe's model with a gate on every feature value for
    ``search_epochs`` epochs while the temperature rises geometrically from 1 to ``final_temperature`` (Section
    3.2, learning by continuation), the loss adding ``sparsity_weight · Σ gates`` (eq. 10) and the gates learning
    with their own Adam (``gate_lr``, no weight decay); a value is kept when its gate logit ends above 0. ``retrain``
    is the run's final training (Section 3.3): only the kept values (the others are out-of-vocabulary), weights
    rewound to those the search had after ``rewind_epoch`` epochs (0: its initial values), early stopping on the
    validation split as ``train`` says.

    The authors' code selects its retrained model on the test split; here the test split is only ever scored
    once, at the end."""

    STAGES: ClassVar[tuple[str, ...]] = ("search", "retrain")

    kind: Literal["optfs"] = "optfs"
    stages: list[OptFSStage] = Field(default_factory=_every_stage)
    from_run: str | None = Field(None, description="an earlier run directory whose feature_search/ outputs "
                                                   "stage retrain starts from")
    search_epochs: Int = Field(10, ge=1, le=MAX_EPOCHS, description="epochs of the search (the schedule's length)")
    final_temperature: float = Field(200.0, ge=1, le=1e6, description="temperature tau of the last search epoch")
    sparsity_weight: float = Field(1e-8, ge=0, le=1e3, description="lambda of the loss term lambda * sum of gates")
    gate_lr: float = Field(1e-2, gt=0, le=1e3, description="learning rate of the gates' Adam")
    gate_init: float = Field(0.5, gt=0, le=10, description="m0: every gate logit's initial value (gate 1 at start)")
    rewind_epoch: Int = Field(1, ge=0, le=MAX_EPOCHS,
                              description="retrain starts from the search's weights after this many epochs")

    @model_validator(mode="after")
    def _check(self) -> OptFSConfig:
        check_stages("gate", self.stages, self.STAGES, self.from_run)
        check_ends_with_retrain("gate", self.stages, "soft gates")
        if self.rewind_epoch > self.search_epochs:
            raise ValueError(f"gate.rewind_epoch {self.rewind_epoch} is beyond gate.search_epochs "
                             f"{self.search_epochs}")
        return self

    def temperature(self, epoch: int) -> float:
        """tau of search epoch ``epoch`` (1-based): ``final_temperature ** ((epoch - 1) / (search_epochs - 1))``,
        1 in the first epoch and ``final_temperature`` in the last."""
        if self.search_epochs == 1:
            return float(self.final_temperature)
        return float(self.final_temperature ** ((epoch - 1) / (self.search_epochs - 1)))


@GATES.register("optfs", OptFSConfig)
class OptFSGate(FeatureGate):
    """Per-value gates (Lyu et al. 2023, eq. 7-9): value ``z`` of any vocabulary table (categorical fields, their
    sequences, bucketised numerics) and every value-scaled numeric field (one value) has a logit ``m_z``, and its
    vector ``e_z`` becomes ``g_z · e_z`` with ``g_z = sigmoid(tau · m_z) / sigmoid(m0)``: 1 for every value at the
    start (``m_z = m0``, ``tau = 1``). Padding and the out-of-vocabulary id are not searched (gate 1): dropped values
    become out-of-vocabulary afterwards. A sequence's items are gated before pooling, so the pooled vector is pooled
    over gated items.

    The logits are laid out unit by unit as :class:`~ctrlab.embeddings.mixed_dim.EmbeddingUnits` lays out a full
    table (tables, then numeric fields), so a row index is the same here as in a full-table embedding."""

    searched: torch.Tensor
    flat_offsets: torch.Tensor
    unit_starts: torch.Tensor

    def __init__(self, config: OptFSConfig, layout: FeatureLayout) -> None:
        super().__init__()
        self.layout = layout
        self.units = EmbeddingUnits.from_layout(layout)
        self.gate_init = float(config.gate_init)
        self.temperature = 1.0
        self.logits = nn.Parameter(torch.full((self.units.total_rows,), self.gate_init))
        searched = torch.ones(self.units.total_rows, dtype=torch.bool)
        for unit, start in enumerate(self.units.offsets):
            if self.units.is_table(unit):
                searched[start:start + FIRST_VALUE_ID] = False  # padding, out-of-vocabulary
        self.register_buffer("searched", searched, persistent=False)
        self.units.register_offsets(self)

    def gates(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The gates at the current temperature (1 where not searched): of every value (``[Σ rows]``), or of the
        values ``rows`` index (any shape; a forward pass computes only the gates its batch looks up)."""
        logits = self.logits if rows is None else self.logits[rows]
        searched = self.searched if rows is None else self.searched[rows]
        # Divided in the logits' precision, so that every gate is exactly 1 at the start whatever m0 is.
        start = torch.sigmoid(torch.tensor(self.gate_init, dtype=logits.dtype, device=logits.device))
        soft = torch.sigmoid(self.temperature * logits) / start
        return torch.where(searched, soft, torch.ones_like(soft))

    def penalty(self) -> torch.Tensor:
        """``Σ_z g_z`` over the searched values (the L1 norm of eq. 10; gates are positive)."""
        return self.gates()[self.searched].sum()

    def kept(self) -> torch.Tensor:
        """``[Σ rows]`` bool: the hard mask of the retraining, ``m_z > 0`` (always True where not searched)."""
        return (self.logits.detach() > 0) | ~self.searched

    def forward(self, output: EmbeddingOutput, batch: FeatureBatch) -> EmbeddingOutput:
        dtype = output.fields.dtype
        flat = len(self.layout.categorical) + len(self.layout.numeric)
        parts = []
        if flat:
            rows = flat_row_ids(self.layout, batch, self.flat_offsets)
            parts.append(output.fields[:, :flat] * self.gates(rows).to(dtype).unsqueeze(-1))
        sequences = {}
        for spec, unit in zip(self.layout.sequence, self.units.sequence_units):
            vectors, mask = output.sequences[spec.name]
            rows = batch.sequences[spec.name] + self.unit_starts[unit]
            sequences[spec.name] = (vectors * self.gates(rows).to(dtype).unsqueeze(-1), mask)
        return EmbeddingOutput.assemble(self.layout, parts, sequences)

    def architecture_parameters(self) -> list[nn.Parameter]:
        return [self.logits]

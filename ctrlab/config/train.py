"""Recipe section ``train``: optimisation, early stopping, device and metrics."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ctrlab.config.base import MAX_BATCH, MAX_EPOCHS, MAX_THREADS, Int, Section


class OptimizerConfig(Section):
    """Adam or Adagrad with separate L2 weight decay for embedding tables and for dense (network) weights.

    Weight decay is coupled (added to the gradient, as torch's ``weight_decay`` and FuxiCTR's regularisers do).
    With ``embedding.sparse: true`` the embedding decay is applied lazily to the rows a batch touches. With
    ``embedding_regularizer: mini_batch_aware`` it is instead DIN's mini-batch aware L2 term added to the loss.
    """

    name: Literal["adam", "adagrad"] = "adam"
    # Finite is not enough: torch keeps these in float32, where 1e39 is already infinite.
    lr: float = Field(1e-3, gt=0, le=1e3)
    embedding_weight_decay: float = Field(0.0, ge=0, le=1e3)
    dense_weight_decay: float = Field(0.0, ge=0, le=1e3)
    embedding_regularizer: Literal["weight_decay", "mini_batch_aware"] = Field(
        "weight_decay",
        description="how embedding_weight_decay applies to embedding tables: weight decay, or DIN's mini-batch "
        "aware L2 (each row in the batch decayed by 1/its training-set frequency)",
    )
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


class EarlyStoppingConfig(Section):
    """Stop when the monitored validation metric has not improved for ``patience`` evaluations."""

    monitor: Literal["auc", "logloss", "gauc"] = "auc"
    patience: Int = Field(2, ge=1, le=MAX_EPOCHS)
    min_delta: float = Field(0.0, ge=0)


class LROnPlateauConfig(Section):
    """Multiply the learning rate by ``factor`` each time the monitored metric fails to improve."""

    factor: float = Field(0.1, gt=0, lt=1)
    min_lr: float = Field(1e-6, ge=0)


class TrainConfig(Section):
    """How the trainer optimises the model. The model itself never owns its optimiser, device or loss."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype (CUDA; bf16 also on CPU)")
    batch_size: Int = Field(4096, ge=1, le=MAX_BATCH)
    eval_batch_size: Int = Field(16384, ge=1, le=MAX_BATCH)
    epochs: Int = Field(100, ge=1, le=MAX_EPOCHS)
    optimizer: OptimizerConfig = OptimizerConfig()
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()
    lr_on_plateau: LROnPlateauConfig | None = LROnPlateauConfig()
    metrics: list[Literal["auc", "logloss", "gauc"]] = ["auc", "logloss"]
    num_threads: Int | None = Field(None, ge=1, le=MAX_THREADS,
                                    description="torch CPU threads; default: torch's choice")
    progress: bool = True
    grad_clip_norm: float | None = Field(None, gt=0)
    resume: bool = Field(False, description="save the training state after every epoch beside output_dir and, "
                         "when the same recipe saved one, continue from it (see ctrlab.train.state)")

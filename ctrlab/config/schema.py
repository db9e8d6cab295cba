"""The recipe: one pydantic schema that is the single source of truth for a run.

CLI commands, overrides, sweeps and tracking all read and write this schema. The ``embedding``, ``model``, ``gate``
and ``interaction`` sections are discriminated unions built from the registries when this module is imported, so a
new block, embedding layer or gate (one new file that registers itself) needs no change here.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from ctrlab.config.base import MAX_SEED, Int, Section
from ctrlab.config.dataset import DatasetConfig
from ctrlab.config.distributed import DistributedConfig
from ctrlab.config.features import FeaturesConfig
from ctrlab.config.parts import EmbeddingConfig, GateConfig, InteractionConfig, ModelConfig, per_field_embedding
from ctrlab.config.pipeline import PipelineConfig, check_stage_inputs
from ctrlab.config.sweep import SweepConfig
from ctrlab.config.tracking import TrackingConfig
from ctrlab.config.train import TrainConfig


class Recipe(Section):
    """A complete, validated ctrlab recipe: data, features, embedding, model block, training, tracking and sweep."""

    # Letters, digits, '_', '.', '-', starting with a letter or digit: the name is a folder (runs/${name}), an
    # MLflow experiment and a study name, so '..' or '.hidden' must not be one.
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=128)
    seed: Int = Field(2021, ge=0, le=MAX_SEED)
    output_dir: str = "runs/${name}"
    dataset: DatasetConfig
    features: FeaturesConfig = FeaturesConfig()
    embedding: EmbeddingConfig = Field(default_factory=per_field_embedding)
    model: ModelConfig
    gate: GateConfig | None = Field(None, description="a feature gate between embedding and block; kind optfs "
                                    "searches the feature set (stages run before the final training)")
    interaction: InteractionConfig | None = Field(
        None, description="a pair layer between the gate and the block over features.crosses: kind pairs (one "
        "method for every pair) or optinter (searched per pair; stages run before the final training)")
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig | None = None
    pipeline: PipelineConfig | None = Field(None, description="the stages ctrlab pipeline runs, from this recipe "
                                            "(the plain model) to a served model")

    @model_validator(mode="before")
    @classmethod
    def _embedding_kind_defaults_to_per_field(cls, data: Any) -> Any:
        # `embedding: {dim: 8}` keeps meaning per-field tables however many kinds are registered.
        if isinstance(data, dict) and isinstance(data.get("embedding"), dict) and "kind" not in data["embedding"]:
            data = {**data, "embedding": {"kind": "per_field", **data["embedding"]}}
        return data

    @model_validator(mode="after")
    def _interaction_needs_crosses(self) -> Recipe:
        if self.interaction is not None and self.features.crosses is None:
            raise ValueError("interaction: the pair layer needs candidate pairs; add features.crosses (e.g. "
                             "crosses: {pairs: all})")
        return self

    @model_validator(mode="after")
    def _pipeline_inputs(self) -> Recipe:
        if self.pipeline is not None:
            given = {"feature_set"} if self.gate is not None else set()
            given |= {"pair_methods"} if self.interaction is not None else set()
            check_stage_inputs(self.pipeline.stages, given)
        return self

    @model_validator(mode="after")
    def _sharding_needs_torchrec(self) -> Recipe:
        if self.distributed.sharding != "none" and getattr(self.embedding, "backend", None) != "torchrec":
            raise ValueError(f"distributed.sharding: {self.distributed.sharding} places torchrec tables; set "
                             "embedding.backend: torchrec (per_field embedding) or distributed.sharding: none")
        return self

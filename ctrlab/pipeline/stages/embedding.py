"""Stage ``embedding``: an embedding-table search (OptEmbed, Lyu et al. 2022; DNIS, Cheng et al. 2020) or a table
budget (multiplexed tables, Coleman et al. 2023), run as the recipe's ``embedding`` section."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ctrlab.config.parts import EmbeddingConfig
from ctrlab.pipeline.base import PipelineStage, StageContext, StageResult, register_stage
from ctrlab.pipeline.searching import search_seconds, with_section
from ctrlab.pipeline.stage_config import StageConfigBase


class EmbeddingStageConfig(StageConfigBase):
    """Propose the model before this stage with the ``embedding`` section (e.g. ``{kind: dnis}``,
    ``{kind: optembed}`` or ``{kind: multiplexed, budget: 0.5}``). Settings the stage leaves out that the recipe's
    embedding also has (``dim``, ``init_std``, ...) are carried over. A search's dims are fixed for the later
    stages."""

    stage: Literal["embedding"]
    embedding: EmbeddingConfig = Field(description="the embedding section to try")

    ORDER: ClassVar[int] = 40
    PRODUCES: ClassVar[frozenset[str]] = frozenset({"table_dims"})


@register_stage(EmbeddingStageConfig)
class EmbeddingStage(PipelineStage):
    """Propose the model with the stage's embedding section: a table search (OptEmbed, DNIS) searched and re-trained in
    one run, or a fixed budget (multiplexed tables)."""

    name = "embedding"

    def estimate(self, config: Any, plain_seconds: float, epoch_seconds: float) -> float:
        embedding = config.embedding
        epochs = int(getattr(embedding, "search_epochs", getattr(embedding, "supernet_epochs", 0)))
        return search_seconds(epochs, plain_seconds, epoch_seconds, 1.3)

    def run(self, context: StageContext) -> StageResult:
        before = context.incumbent.metrics.get("embedding_parameters")
        candidate = context.train(with_section(context, "embedding", context.config.embedding), "tables")
        found = candidate.metrics.get("embedding_search", {})
        decision: dict[str, Any] = {"kind": context.config.embedding.kind, "embedding_parameters_before": before,
                                    "embedding_parameters": candidate.metrics.get("embedding_parameters")}
        if found:
            decision.update({"dims": found.get("dims"), "kept_fraction": found.get("kept_fraction"),
                             "kept_parameters": found.get("kept_parameters")})
        return StageResult(candidate, decision)

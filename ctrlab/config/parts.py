"""The recipe sections whose kind picks an implementation (``embedding``, ``model``, ``gate``, ``interaction``):
discriminated unions built from the registries when this module is imported, so a new block, embedding layer, gate
or pair layer (one new file that registers itself) needs no change here. The recipe schema and the pipeline stages
(which propose such sections) share them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union, cast

from pydantic import Field

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockConfigBase
from ctrlab.config.base import Section
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.base import EmbeddingConfigBase
from ctrlab.gates import GATES
from ctrlab.interactions import INTERACTIONS
from ctrlab.registry import Registry


def union_of(registry: Registry[Any]) -> Any:
    """The configs of ``registry`` as one pydantic union, discriminated by the registry's discriminator."""
    configs = registry.configs()
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator=registry.discriminator)]


if TYPE_CHECKING:  # pragma: no cover - what a type checker sees of the unions: the fields every member has
    class EmbeddingConfig(EmbeddingConfigBase):
        kind: str

    class ModelConfig(BlockConfigBase):
        block: str

    class GateConfig(Section):
        kind: str

    class InteractionConfig(Section):
        kind: str
else:
    EmbeddingConfig = union_of(EMBEDDINGS)
    ModelConfig = union_of(BLOCKS)
    GateConfig = union_of(GATES)
    InteractionConfig = union_of(INTERACTIONS)


def per_field_embedding() -> EmbeddingConfig:
    return cast("EmbeddingConfig", EMBEDDINGS.get("per_field").config())

"""``interaction.kind: pairs``: one method for every candidate pair (the uniform architectures OptInter, Lyu et al.
2022, is measured against: all-memorise, all-factorise, all-naive)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ctrlab.config.base import Section
from ctrlab.data.layout import FeatureLayout
from ctrlab.interactions import INTERACTIONS
from ctrlab.interactions.base import PairVectors


class UniformPairsConfig(Section):
    """Every cross of ``features.crosses`` used the same way: ``memorize`` (a vector per cross value),
    ``factorize`` (the product of the two fields' factor vectors) or ``naive`` (no pair vectors: the block alone
    models the pair)."""

    kind: Literal["pairs"] = "pairs"
    method: Literal["memorize", "factorize", "naive"] = Field(description="the method of every pair")


@INTERACTIONS.register("pairs", UniformPairsConfig)
def uniform_pairs(config: UniformPairsConfig, layout: FeatureLayout, dim: int, init_std: float) -> PairVectors:
    """:class:`~ctrlab.interactions.base.PairVectors` with ``config.method`` for every cross (Lyu et al. 2022,
    Section III-B: memorised, factorised or naive pairs)."""
    return PairVectors(layout, dim, init_std, [config.method] * len(layout.crosses))

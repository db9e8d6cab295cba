"""Stage ``rank``: drop the features that carry no information on the label (OutRank-style ranking, Skrlj et al.
2023), judged like every stage by training the model without them."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field

from ctrlab.config.base import MAX_COUNT, Int
from ctrlab.pipeline.base import Candidate, PipelineStage, StageContext, StageResult, register_stage
from ctrlab.pipeline.stage_config import StageConfigBase


class RankStageConfig(StageConfigBase):
    """Rank the training split's features by chance-corrected mutual information with the label
    (:mod:`ctrlab.ranking`) and propose the model without those that carry no information: a feature is dropped when
    its chance-corrected information is below ``significance`` standard deviations of what a random feature with as
    many values gets on as many rows, or below ``min_share`` of the best feature's. A feature that takes part in a
    pair whose interaction score is significant in the same sense is kept even when it says little on its
    own (``keep_pairs``): it may matter only jointly. A pair's level is set the same way, with the pair's
    ``(values_a - 1)(values_b - 1)`` degrees of freedom."""

    stage: Literal["rank"]
    min_share: float = Field(0.01, ge=0, le=1, description="drop features whose chance-corrected information is "
                             "below this share of the best feature's")
    significance: float = Field(4.0, ge=0, le=100, description="drop features whose chance-corrected "
                                "information is below this many standard deviations of a random feature's")
    keep_pairs: bool = Field(True, description="keep a feature that takes part in an informative pair")
    rows: Int | None = Field(1_000_000, ge=1, le=MAX_COUNT, description="rank a uniform sample of this many "
                             "training rows (none: all)")
    bins: Int = Field(32, ge=2, le=10_000, description="quantile bins of numeric features")
    pair_candidates: Int = Field(20, ge=0, le=10_000, description="pairs are scored among this many most "
                                 "informative features")

    ORDER: ClassVar[int] = 10
    PRODUCES: ClassVar[frozenset[str]] = frozenset({"ranking"})


def chance_spread(values: int, rows: int, classes: int = 2) -> float:
    """Standard deviation (nats) of the mutual information between the label and a random feature of ``values``
    values on ``rows`` rows: ``2 n MI`` is then about chi-squared with ``(values - 1)(classes - 1)`` degrees of
    freedom, whose standard deviation is ``sqrt(2 df)``. No more values than rows can be observed, so the degrees of
    freedom are capped there (a pair of two large fields has far more possible cells than rows)."""
    freedom = max(min(values, rows) - 1, 1) * (classes - 1)
    return math.sqrt(2.0 * freedom) / (2.0 * max(rows, 1))


def uninformative(table: Any, pairs: Any, rows: int, min_share: float, significance: float,
                  keep_pairs: bool) -> tuple[list[str], float]:
    """The features to drop from a ranking (``table``: feature, normalized_mi, cardinality; ``pairs``:
    feature_a, feature_b, interaction; ``rows`` ranked) and the share-of-best level they fall below."""
    best = max(float(table["normalized_mi"].max() or 0.0), 0.0)
    level = min_share * best
    low = [str(name) for name, info, values in zip(table["feature"], table["normalized_mi"], table["cardinality"])
           if float(info) < max(level, significance * chance_spread(int(values), rows))]
    if keep_pairs and pairs.height:
        values = dict(zip(table["feature"], table["cardinality"]))
        paired: set[str] = set()
        for row in pairs.iter_rows(named=True):
            a, b = str(row["feature_a"]), str(row["feature_b"])
            cells = (max(int(values.get(a, 2)), 2) - 1) * (max(int(values.get(b, 2)), 2) - 1) + 1
            if float(row["interaction"]) >= max(level, significance * chance_spread(cells, rows)):
                paired |= {a, b}
        low = [name for name in low if name not in paired]
    return low, level


def without_features(recipe: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    """``recipe`` without the ``dropped`` categorical and numeric features (and the cross pairs naming them)."""
    features = recipe["features"]
    for kind in ("categorical", "numeric"):
        features[kind] = [f for f in features.get(kind, []) if (f if isinstance(f, str) else f["name"]) not in dropped]
    crosses = features.get("crosses")
    if isinstance(crosses, dict) and isinstance(crosses.get("pairs"), list):
        crosses["pairs"] = [pair for pair in crosses["pairs"] if not set(pair) & dropped]
    return recipe


@register_stage(RankStageConfig)
class RankStage(PipelineStage):
    """Rank the features (OutRank-style chance-corrected mutual information, Skrlj et al. 2023) and propose the
    model without the uninformative ones (see :class:`RankStageConfig`)."""

    name = "rank"

    def estimate(self, config: Any, plain_seconds: float, epoch_seconds: float) -> float:
        return 0.5 * epoch_seconds

    def run(self, context: StageContext) -> StageResult:
        import yaml

        from ctrlab.ranking.rank import RankingOptions
        from ctrlab.ranking.run import run_rank
        from ctrlab.utils.io import write_text_atomic

        config: RankStageConfig = context.config
        recipe = context.base_recipe()
        source = context.directory / "ranked_recipe.yaml"
        write_text_atomic(source, yaml.safe_dump({**recipe, "output_dir": str(context.directory)}, sort_keys=False))
        options = RankingOptions(bins=config.bins, seed=int(recipe.get("seed", 2021)),
                                 pair_candidates=config.pair_candidates)
        ranked = run_rank(source, [], options, sample=config.rows, output_dir=context.directory / "ranking",
                          data_dir=context.data_dir, track=False, console=context.console).ranking
        dropped, level = uninformative(ranked.table, ranked.pairs, ranked.rows, config.min_share,
                                       config.significance, config.keep_pairs)
        features = [str(name) for name in ranked.table["feature"]]
        if len(dropped) == len(features):  # nothing says anything: keep the best one rather than no model
            dropped = dropped[1:]
        decision: dict[str, Any] = {"dropped": dropped, "kept": [f for f in features if f not in dropped],
                                    "information_level": level, "ranking": str(context.directory / "ranking")}
        if not dropped:
            return StageResult(None, decision, note="every feature carries information: nothing to drop")
        context.say(f"proposes dropping {len(dropped)} of {len(features)} features: {', '.join(dropped)}")
        candidate: Candidate = context.train(without_features(recipe, set(dropped)), "without_dropped")
        return StageResult(candidate, decision)

"""Feature ranking (OutRank-style): chance-corrected mutual information, 3MR, pair interactions, data-quality notes.

``ctrlab rank`` is :func:`ctrlab.ranking.run.run_rank`; the scoring itself is :func:`ctrlab.ranking.rank.rank_features`
over a polars frame, and ``features.select`` in a recipe is applied by :func:`ctrlab.ranking.select.apply_selection`.
Importing this package imports neither matplotlib nor mlflow.
"""

from ctrlab.ranking.rank import HEURISTICS, FeatureRanking, RankingOptions, rank_features

__all__ = ["HEURISTICS", "FeatureRanking", "RankingOptions", "rank_features"]

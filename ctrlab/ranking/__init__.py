"""Feature ranking (OutRank-style): chance-corrected mutual information, 3MR, pair interactions, data-quality notes.

``ctrlab rank`` is :func:`ctrlab.ranking.run.run_rank`; the scoring itself is :func:`ctrlab.ranking.rank.rank_features`
over a polars frame, and ``features.select`` in a recipe is applied by :func:`ctrlab.ranking.select.apply_selection`.
The package imports nothing itself: the data pipeline imports ``select`` on every run and must not pay for pandas,
matplotlib or mlflow.
"""

"""Hyperparameter sweeps over recipe fields with Optuna (``ctrlab sweep``), and the embedding-table searches that
``ctrlab train`` runs for ``embedding.kind: optembed`` and ``dnis`` (:mod:`ctrlab.search.embedding_search`)."""

from ctrlab.search.space import apply_params, check_space, sample_order, sample_params
from ctrlab.search.sweep import SweepResult, run_sweep

__all__ = ["SweepResult", "apply_params", "check_space", "run_sweep", "sample_order", "sample_params"]

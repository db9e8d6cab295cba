"""Hyperparameter sweeps over recipe fields with Optuna (``ctrlab sweep``)."""

from ctrlab.search.space import apply_params, check_space, sample_order, sample_params
from ctrlab.search.sweep import SweepResult, run_sweep

__all__ = ["SweepResult", "apply_params", "check_space", "run_sweep", "sample_order", "sample_params"]

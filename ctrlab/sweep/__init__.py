"""Hyperparameter sweeps over recipe fields with Optuna (``ctrlab sweep``, recipe section ``sweep``):
:mod:`ctrlab.sweep.space` samples and checks the space, :mod:`ctrlab.sweep.study` runs the study."""

from ctrlab.sweep.space import apply_params, check_space, sample_order, sample_params
from ctrlab.sweep.study import SweepResult, run_sweep

__all__ = ["SweepResult", "apply_params", "check_space", "run_sweep", "sample_order", "sample_params"]

"""Experiment tracking (MLflow): one tracked run per training run, nested runs for sweeps.

Importing this package does not import mlflow or matplotlib; they are loaded when a tracked run starts.
"""

from ctrlab.tracking.mlflow_tracker import (
    RunLogger,
    connect,
    learning_curve_figure,
    mlflow_run,
    resolve_tracking_uri,
    system_tags,
)

__all__ = ["RunLogger", "connect", "learning_curve_figure", "mlflow_run", "resolve_tracking_uri", "system_tags"]

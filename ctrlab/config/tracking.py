"""Recipe section ``tracking``: where runs are logged (MLflow)."""

from __future__ import annotations

from pydantic import Field

from ctrlab.config.base import Section


class TrackingConfig(Section):
    """MLflow tracking. ``uri`` defaults to ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store
    ``sqlite:///~/.ctrlab/mlflow.db``; any tracking URI works (e.g. an ``mlflow server`` backed by PostgreSQL)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = Field(None, description="defaults to the recipe name")
    run_name: str | None = None
    log_artifacts: bool = True

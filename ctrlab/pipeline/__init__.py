"""``ctrlab pipeline``: one recipe from raw data to a served model.

A recipe's ``pipeline`` section lists stages (feature ranking, OptFS, OptInter, an embedding-table search or budget,
an Optuna sweep, a multi-seed retrain, registration). Each stage is one module of :mod:`ctrlab.pipeline.stages`
that registers its config and its :class:`~ctrlab.pipeline.base.PipelineStage` in :data:`PIPELINE_STAGES`, so a new
stage is one new file. :mod:`ctrlab.pipeline.runner` runs them: every stage proposes a model, which is judged on
validation against the model before it and rolled back when it costs more than ``pipeline.tolerance``.
"""

from ctrlab.registry import Registry

PIPELINE_STAGES: Registry = Registry("pipeline stage", "stage", "ctrlab.pipeline.stages")

__all__ = ["PIPELINE_STAGES"]

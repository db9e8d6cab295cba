"""Serving: load a finished run and predict click probabilities for raw rows."""

from ctrlab.serve.predictor import Predictor

__all__ = ["Predictor"]

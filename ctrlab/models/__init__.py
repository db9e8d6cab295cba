"""Model assembly: embedding layer + optional first-order term + interaction block."""

from ctrlab.models.ctr_model import CTRModel, build_model

__all__ = ["CTRModel", "build_model"]

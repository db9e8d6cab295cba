"""Model assembly: embedding layer + optional first-order term + optional gate and pair layer + interaction block."""

from ctrlab.models.ctr_model import CTRModel, build_model, build_recipe_model

__all__ = ["CTRModel", "build_model", "build_recipe_model"]

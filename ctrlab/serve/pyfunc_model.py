"""The MLflow pyfunc flavour of a ctrlab run: raw rows in, click probabilities out.

The model is logged as *models from code* (``ctrlab/serve/model_code.py`` is the model's code file), so nothing is
pickled: loading reads the recipe (YAML, safe loader), the processor (JSON) and the weights (safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

try:  # mlflow is an optional dependency ("track" extra); this module is only imported when it is installed
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[assignment,misc]

ARTIFACT_KEYS = ("recipe", "processor", "weights")


class CtrlabPyfuncModel(PythonModel):
    """Scores raw rows with a trained ctrlab model. Unseen categories map to out-of-vocabulary; a missing column,
    a non-numeric value in a numeric column or an empty batch is an input error (HTTP 400 when served)."""

    def load_context(self, context: Any) -> None:
        # The same loader as `ctrlab serve` and `ctrlab register`: safe YAML, JSON and safetensors, never a pickle.
        from ctrlab.serve.registry import predictor_from_files

        artifacts = {k: Path(context.artifacts[k]) for k in ARTIFACT_KEYS}
        self.predictor = predictor_from_files(artifacts["recipe"], artifacts["processor"], artifacts["weights"])

    # No type hints on predict: MLflow would try to derive a schema from them; the signature logged with the model
    # is the schema.
    def predict(self, context, model_input, params=None):
        from ctrlab.errors import CtrlabError

        try:
            frame = _to_polars(model_input)
            if frame.height == 0:
                raise CtrlabError("request has no rows")
            probabilities = self.predictor.predict(frame, source="request")
        except CtrlabError as error:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(error.message, error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame({"probability": probabilities})


def _to_polars(model_input: Any) -> pl.DataFrame:
    if isinstance(model_input, pl.DataFrame):
        return model_input
    if isinstance(model_input, pd.DataFrame):
        # Object columns may mix ints and strings (JSON); give polars one type per column.
        converted = {c: (model_input[c].astype(str).where(model_input[c].notna(), None)
                         if model_input[c].dtype == object else model_input[c]) for c in model_input.columns}
        return pl.from_pandas(pd.DataFrame(converted))
    if isinstance(model_input, dict):
        return pl.DataFrame({k: list(np.atleast_1d(v)) for k, v in model_input.items()})
    from ctrlab.errors import CtrlabError

    raise CtrlabError(f"expected a table of rows, got {type(model_input).__name__}")

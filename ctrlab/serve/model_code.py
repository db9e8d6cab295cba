"""MLflow models-from-code entry point for a ctrlab pyfunc model (copied into every logged model)."""

import mlflow

from ctrlab.serve.pyfunc_model import CtrlabPyfuncModel

mlflow.models.set_model(CtrlabPyfuncModel())

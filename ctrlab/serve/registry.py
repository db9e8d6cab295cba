"""Register a finished run as an MLflow pyfunc model (raw rows in, probabilities out) and serve it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.data.processor import FeatureProcessor
from ctrlab.errors import CtrlabError
from ctrlab.train.run import METRICS_FILE, PROCESSOR_FILE, RECIPE_FILE, WEIGHTS_FILE

MODEL_CODE = Path(__file__).with_name("model_code.py")


@dataclass
class RegisteredModel:
    """Where the registered version lives."""

    name: str
    version: str
    alias: str | None
    model_uri: str
    run_id: str


def _processor_types(processor: FeatureProcessor) -> dict[str, str]:
    types = {f.name: "string" for f in processor.features.categorical}
    types.update({f.name: "double" for f in processor.features.numeric})
    types.update({f.name: "string" for f in processor.features.sequence})
    return types


def model_signature(processor: FeatureProcessor) -> Any:
    """Inputs: the raw columns the features read (categorical and sequence as strings, numeric as doubles, all
    optional so that missing values are allowed); output: one ``probability`` column."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec(t, name, required=False) for name, t in _processor_types(processor).items()])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "probability")]))


def input_example(processor: FeatureProcessor, rows: int = 2) -> Any:
    """Rows built from the processor's own state: the most frequent values of each vocabulary and the numeric
    fill values (no training data is stored in the model)."""
    data: dict[str, list[Any]] = {}
    for spec in processor.features.categorical:
        values = processor.vocabularies[spec.name].values or ["unseen"]
        data[spec.name] = [values[i % len(values)] for i in range(rows)]
    for spec in processor.features.numeric:
        data[spec.name] = [float(processor.numeric_stats[spec.name]["fill"])] * rows
    for spec in processor.features.sequence:
        values = processor.vocabularies[spec.share_vocab_with or spec.name].values[:3]
        data[spec.name] = [spec.separator.join(values)] * rows
    return pl.DataFrame(data).to_pandas()


def _run_files(run: str, tracking_uri: str | None) -> tuple[Path, str | None]:
    """A run directory, or an MLflow run id whose artefacts hold a ctrlab run; returns (dir, mlflow run id)."""
    path = Path(run)
    if path.is_dir():
        metrics = path / METRICS_FILE
        run_id = json.loads(metrics.read_text()).get("mlflow_run_id") if metrics.exists() else None
        return path, run_id
    if "/" in run or "\\" in run or run.startswith("."):
        raise CtrlabError(f"{run}: run directory not found")
    import mlflow

    from ctrlab.config.tracking import TrackingConfig
    from ctrlab.tracking import resolve_tracking_uri

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run, tracking_uri=tracking_uri or resolve_tracking_uri(TrackingConfig()))
    except Exception as exc:  # mlflow raises several types for unknown ids
        raise CtrlabError(f"{run}: neither a run directory nor an MLflow run id with artefacts ({exc})".splitlines()[0])
    hits = sorted(Path(local).rglob(RECIPE_FILE))
    if not hits:
        raise CtrlabError(f"MLflow run {run} has no {RECIPE_FILE} among its artefacts; is it a ctrlab run?")
    return hits[0].parent, run


def register_run(run: str, name: str, alias: str | None = None, tracking_uri: str | None = None) -> RegisteredModel:
    """Log the run's recipe, processor and weights as a pyfunc model and register it under ``name``."""
    import mlflow
    from mlflow import MlflowClient

    from ctrlab.tracking import mlflow_run, resolve_tracking_uri

    run_dir, run_id = _run_files(run, tracking_uri)
    for file in (RECIPE_FILE, PROCESSOR_FILE, WEIGHTS_FILE):
        if not (run_dir / file).exists():
            raise CtrlabError(f"{run_dir}: {file} is missing; is this a finished ctrlab run?")
    recipe = validate_recipe(read_recipe_file(run_dir / RECIPE_FILE), str(run_dir / RECIPE_FILE))
    processor = FeatureProcessor.load(run_dir / PROCESSOR_FILE)
    tracking = recipe.tracking.model_copy(update={"enabled": True, "uri": tracking_uri or
                                                  resolve_tracking_uri(recipe.tracking)})
    mlflow.set_tracking_uri(tracking.uri)
    client = MlflowClient()
    if run_id is None:  # an untracked run: give the model a run of its own to live in
        with mlflow_run(tracking, recipe.tracking.experiment or recipe.name, run_name=f"{recipe.name}-register") as logger:
            assert logger is not None
            run_id = logger.run_id
    from ctrlab import __version__

    # MLflow prints progress and "View run" links to stdout; the CLI's stdout carries only its JSON result.
    with contextlib.redirect_stdout(sys.stderr), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"recipe": str(run_dir / RECIPE_FILE), "processor": str(run_dir / PROCESSOR_FILE),
                       "weights": str(run_dir / WEIGHTS_FILE)},
            signature=model_signature(processor),
            input_example=input_example(processor),
            pip_requirements=[f"ctrlab=={__version__}"],
        )
    with contextlib.redirect_stdout(sys.stderr):
        version = mlflow.register_model(info.model_uri, name)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredModel(name, str(version.version), alias, info.model_uri, run_id)


def serve_command(name: str, alias: str | None, version: str | None, host: str, port: int,
                  workers: int = 1) -> list[str]:
    """The ``mlflow models serve`` command line for a registered model (local environment, no network)."""
    if alias and version:
        raise CtrlabError("give either --alias or --version, not both")
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}" if version else f"models:/{name}@champion"
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    return [mlflow_bin, "models", "serve", "-m", uri, "--env-manager", "local", "-h", host, "-p", str(port),
            "--workers", str(workers)]

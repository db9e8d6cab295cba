"""Register a finished run as an MLflow pyfunc model (raw rows in, probabilities out) and find it again to serve.

Registration checks everything it can before it writes anything to the tracking store: the model name and alias
(with the rules MLflow enforces), and the run itself, loaded exactly as serving loads it and scored on the model's
input example. A run that cannot be served is never registered.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ctrlab.errors import CtrlabError, DataError
from ctrlab.run_dir import METRICS_FILE, PROCESSOR_FILE, RECIPE_FILE, WEIGHTS_FILE

MODEL_CODE = Path(__file__).with_name("model_code.py")
DEFAULT_ALIAS = "champion"
ARTIFACT_FILES = {"recipe": RECIPE_FILE, "processor": PROCESSOR_FILE, "weights": WEIGHTS_FILE}

# The rules of mlflow.utils.validation (_validate_model_name, _validate_model_alias_name and
# _validate_model_alias_name_reserved) and of its stores (the file store forbids path separators and '%', the SQL
# stores keep names in VARCHAR(256) columns), restated so that a bad name is refused before anything is logged.
_MAX_NAME_LENGTH = 256
_MAX_ALIAS_LENGTH = 255
_ALIAS_PATTERN = re.compile(r"^[\w\-]*$")
_VERSION_ALIAS_PATTERN = re.compile(r"^[vV]\d+$")
_NAME_FORBIDDEN = ("/", ":", "\\", "%")


@dataclass
class RegisteredModel:
    """Where the registered version lives."""

    name: str
    version: str
    alias: str | None
    model_uri: str
    run_id: str


def _quoted(value: str, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model_name(name: str, option: str = "--name") -> None:
    """Refuse a registered model name that MLflow (or a ``models:/`` URI) would not accept."""
    if not name or not name.strip():
        raise CtrlabError(f"{option}: the model name is empty")
    if len(name) > _MAX_NAME_LENGTH:
        raise CtrlabError(f"{option}: the model name has {len(name)} characters; at most {_MAX_NAME_LENGTH} are "
                          "allowed")
    bad = [c for c in _NAME_FORBIDDEN if c in name]
    if bad:
        raise CtrlabError(f"{option}: model name {_quoted(name)} contains {bad[0]!r}; names cannot contain "
                          "'/', ':', '\\' or '%'")
    # Not MLflow's rules, but a '?' ends the path of a models:/NAME@ALIAS URI (the rest is read as a query) and a
    # control character would break every one-line message that names the model.
    if "?" in name or any(not c.isprintable() for c in name):
        raise CtrlabError(f"{option}: model name {_quoted(name)} contains '?' or a control character, which a "
                          "models:/ URI cannot carry")
    normal = posixpath.normpath(name)
    if normal != name or normal == "." or normal.startswith(".."):
        raise CtrlabError(f"{option}: model name {_quoted(name)} would resolve to another name when used as a "
                          "file name (MLflow refuses it)")


def check_alias(alias: str, option: str = "--alias") -> None:
    """Refuse an alias that MLflow would not set: empty, other than letters, digits, '_' and '-', 'latest', or a
    version alias such as 'v3'."""
    if not alias:
        raise CtrlabError(f"{option}: the alias is empty")
    if len(alias) > _MAX_ALIAS_LENGTH:
        raise CtrlabError(f"{option}: the alias has {len(alias)} characters; at most {_MAX_ALIAS_LENGTH} are allowed")
    if not _ALIAS_PATTERN.match(alias):
        raise CtrlabError(f"{option}: alias {_quoted(alias)} may only contain letters, digits, '_' and '-'")
    if alias.lower() == "latest":
        raise CtrlabError(f"{option}: the alias 'latest' is reserved by MLflow")
    if _VERSION_ALIAS_PATTERN.match(alias):
        raise CtrlabError(f"{option}: alias {_quoted(alias)} is reserved by MLflow for version {alias[1:]}")


def check_version(version: str, option: str = "--version") -> None:
    """A model version is a positive integer."""
    if not version.isascii() or not version.isdigit() or int(version) < 1:
        raise CtrlabError(f"{option}: a model version is a positive integer, got {_quoted(version)}")


def _processor_types(processor: Any) -> dict[str, str]:
    types = {f.name: "string" for f in processor.features.categorical}
    types.update({f.name: "double" for f in processor.features.numeric})
    types.update({f.name: "string" for f in processor.features.sequence})
    return types


def model_signature(processor: Any) -> Any:
    """Inputs: the raw columns the features read (categorical and sequence as strings, numeric as doubles, all
    optional so that missing values are allowed); output: one ``probability`` column."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec(t, name, required=False) for name, t in _processor_types(processor).items()])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "probability")]))


def input_example(processor: Any, rows: int = 2) -> Any:
    """Rows built from the processor's own state: the most frequent values of each vocabulary and the numeric
    fill values (no training data is stored in the model)."""
    return _example_frame(processor, rows).to_pandas()


def _example_frame(processor: Any, rows: int = 2) -> pl.DataFrame:
    data: dict[str, list[Any]] = {}
    for spec in processor.features.categorical:
        values = processor.vocabularies[spec.name].values or ["unseen"]
        data[spec.name] = [values[i % len(values)] for i in range(rows)]
    for spec in processor.features.numeric:
        data[spec.name] = [float(processor.numeric_stats[spec.name]["fill"])] * rows
    for spec in processor.features.sequence:
        values = processor.vocabularies[spec.share_vocab_with or spec.name].values[:3]
        data[spec.name] = [spec.separator.join(values)] * rows
    return pl.DataFrame(data)


def predictor_from_files(recipe: Path, processor: Path, weights: Path) -> Any:
    """A :class:`~ctrlab.serve.Predictor` from the three files of a run (or of a logged model's artefacts): safe
    YAML, JSON and safetensors, never a pickle."""
    from ctrlab.config.loader import read_recipe_file, validate_recipe
    from ctrlab.data.processor import FeatureProcessor
    from ctrlab.models import build_recipe_model
    from ctrlab.serve.predictor import Predictor
    from ctrlab.utils.checkpoint import load_weights

    for path in (recipe, processor, weights):
        if not path.is_file():
            raise DataError(f"{path}: file not found; is this a finished ctrlab run?")
    loaded = validate_recipe(read_recipe_file(recipe), str(recipe))
    fitted = FeatureProcessor.load(processor)
    model = build_recipe_model(loaded, fitted.layout)
    load_weights(model, weights)
    return Predictor(loaded, fitted, model)


def check_scores(predictor: Any, where: str) -> None:
    """Score the model's input example, as serving will: every probability must be a finite number in [0, 1]."""
    example = _example_frame(predictor.processor)
    probabilities = predictor.predict(example, source=f"{where}: input example")
    bad = [p for p in probabilities.tolist() if not (math.isfinite(p) and 0.0 <= p <= 1.0)]
    if bad:
        raise DataError(f"{where}: the model scores its input example as {bad[0]!r}, not a probability; the weights "
                        "are damaged or training diverged")


def _run_id_from_metrics(metrics: Path) -> str | None:
    """The MLflow run id that ``ctrlab train`` wrote into metrics.json, if any; a damaged file is an error rather
    than a reason to register the model somewhere unexpected."""
    if not metrics.exists():
        return None
    try:
        data = json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{metrics}: cannot be read ({exc.__class__.__name__}); is the run complete?") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{metrics}: not valid JSON ({exc.msg} at line {exc.lineno}); is the run complete?") from None
    if not isinstance(data, dict):
        raise DataError(f"{metrics}: expected a JSON object, found {type(data).__name__}; is the run complete?")
    run_id = data.get("mlflow_run_id")
    if run_id is None:
        return None
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w\-]{0,255}", run_id):
        raise DataError(f"{metrics}: mlflow_run_id {_quoted(str(run_id))} is not an MLflow run id")
    return run_id


def _run_files(run: str, tracking_uri: str | None) -> tuple[Path, str | None]:
    """A run directory, or an MLflow run id whose artefacts hold a ctrlab run; returns (dir, mlflow run id)."""
    path = Path(run)
    if path.is_dir():
        return path, _run_id_from_metrics(path / METRICS_FILE)
    if "/" in run or "\\" in run or run.startswith(".") or not re.fullmatch(r"[A-Za-z0-9][\w\-]{0,255}", run):
        shown = run if len(run) <= 200 else run[:197] + "..."
        raise CtrlabError(f"{shown}: run directory not found")
    import mlflow

    try:
        with contextlib.redirect_stdout(sys.stderr):
            local = mlflow.artifacts.download_artifacts(run_id=run, tracking_uri=_tracking_uri(tracking_uri))
    except Exception as exc:  # mlflow raises several types for unknown ids
        raise CtrlabError(f"{run}: neither a run directory nor an MLflow run id with artefacts "
                          f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    hits = sorted(Path(local).rglob(RECIPE_FILE))
    if not hits:
        raise CtrlabError(f"MLflow run {run} has no {RECIPE_FILE} among its artefacts; is it a ctrlab run?")
    return hits[0].parent, run


def _tracking_uri(tracking_uri: str | None) -> str:
    from ctrlab.config.tracking import TrackingConfig
    from ctrlab.tracking import resolve_tracking_uri

    return tracking_uri or resolve_tracking_uri(TrackingConfig())


def _existing_run(client: Any, run_id: str | None) -> str | None:
    """``run_id`` when the store holds it as a live run; a run tracked in another store (or deleted) is not one to
    log into, and the model then gets a run of its own."""
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def register_run(run: str, name: str, alias: str | None = None, tracking_uri: str | None = None) -> RegisteredModel:
    """Log the run's recipe, processor and weights as a pyfunc model and register it under ``name``.

    Nothing is logged unless the name and alias are valid and the run loads and scores its input example."""
    check_model_name(name)
    if alias is not None:
        check_alias(alias)
    run_dir, run_id = _run_files(run, tracking_uri)
    files = {key: run_dir / file for key, file in ARTIFACT_FILES.items()}
    for file in files.values():
        if not file.is_file():
            raise DataError(f"{run_dir}: {file.name} is missing; is this a finished ctrlab run?")
    predictor = predictor_from_files(files["recipe"], files["processor"], files["weights"])
    check_scores(predictor, str(run_dir))

    import mlflow
    from mlflow import MlflowClient

    from ctrlab import __version__
    from ctrlab.tracking import mlflow_run, resolve_tracking_uri
    from ctrlab.tracking.mlflow_tracker import open_store

    recipe = predictor.recipe
    uri = tracking_uri or resolve_tracking_uri(recipe.tracking)
    open_store(uri, "--tracking-uri")
    tracking = recipe.tracking.model_copy(update={"enabled": True, "uri": uri})
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    run_id = _existing_run(client, run_id)
    if run_id is None:  # an untracked run: give the model a run of its own to live in
        with mlflow_run(tracking, recipe.tracking.experiment or recipe.name,
                        run_name=f"{recipe.name}-register") as logger:
            assert logger is not None
            run_id = logger.run_id
    # MLflow prints progress and "View run" links to stdout; the CLI's stdout carries only its JSON result.
    with contextlib.redirect_stdout(sys.stderr), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={key: str(file) for key, file in files.items()},
            signature=model_signature(predictor.processor),
            input_example=input_example(predictor.processor),
            pip_requirements=[f"ctrlab=={__version__}"],
        )
    with contextlib.redirect_stdout(sys.stderr):
        version = mlflow.register_model(info.model_uri, name)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredModel(name, str(version.version), alias, info.model_uri, run_id)


# ------------------------------------------------------------------------------------------------------- serving
@dataclass
class ResolvedModel:
    """A registered model version found in the tracking store."""

    name: str
    version: str
    alias: str | None
    tracking_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def resolve_model(name: str, alias: str | None, version: str | None, tracking_uri: str | None) -> ResolvedModel:
    """Find ``name`` at ``alias`` (default champion) or ``version`` in the tracking store; a missing store, model,
    alias or version is a one-line :class:`CtrlabError` naming it."""
    from ctrlab.tracking.mlflow_tracker import _sqlite_path, open_store, redact_uri

    if alias and version:
        raise CtrlabError("give either --alias or --version, not both")
    check_model_name(name, "NAME")
    if version is not None:
        check_version(version)
    else:
        alias = alias or DEFAULT_ALIAS
        check_alias(alias)
    uri = _tracking_uri(tracking_uri)
    shown = redact_uri(uri)
    database = _sqlite_path(uri)
    if database is not None and not database.is_file():
        # Opening a missing SQLite store would create an empty one as a side effect of a typo.
        raise CtrlabError(f"no MLflow tracking store at {database} (set --tracking-uri or $MLFLOW_TRACKING_URI to the "
                          "store `ctrlab register` wrote to)")
    open_store(uri, "--tracking-uri")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise CtrlabError(f"no registered model named {_quoted(name)} in {shown} (register one with "
                              "`ctrlab register RUN --name NAME`)") from None
        raise CtrlabError(f"{shown}: cannot read the model registry ({_first_line(exc)})") from None
    except Exception as exc:  # a store that cannot be opened (bad URI, unreachable server, not a database)
        raise CtrlabError(f"{shown}: cannot read the model registry ({_first_line(exc)})") from None
    try:
        found = client.get_model_version_by_alias(name, alias or DEFAULT_ALIAS) if version is None \
            else client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {_quoted(alias or '')}" if version is None else f"version {version}"
        raise CtrlabError(f"model {_quoted(name)} has no {what} in {shown}") from None
    return ResolvedModel(name, str(found.version), alias if version is None else None, uri)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def download_model(model: ResolvedModel, destination: Path) -> Path:
    """Copy the registered version's files into ``destination``; returns the model directory (the one with
    ``MLmodel``)."""
    import mlflow

    # The version's files are found through a client bound to this store (registry included) and downloaded from
    # their artefact location: `download_artifacts("models:/NAME/V", tracking_uri=...)` resolves the name in the
    # process-wide registry ($MLFLOW_TRACKING_URI), not in the store given, and setting that registry would change
    # it for every later call of the process.
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=model.tracking_uri, registry_uri=model.tracking_uri)
        source = client.get_model_version_download_uri(model.name, model.version)
        with contextlib.redirect_stdout(sys.stderr), _quiet_progress():
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination),
                                                        tracking_uri=model.tracking_uri)
    except Exception as exc:  # noqa: BLE001 - artefact stores raise many types
        raise CtrlabError(f"{model.uri}: cannot download the model's files ({_first_line(exc)})") from None
    return Path(local)


@contextlib.contextmanager
def _quiet_progress() -> Any:
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def model_artifacts(model_dir: Path) -> dict[str, Path]:
    """The recipe, processor and weights files of a downloaded ctrlab pyfunc model, from its ``MLmodel`` file."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        entries: Mapping[str, Any] = meta["flavors"]["python_function"]["artifacts"]
        paths = {key: (model_dir / str(entries[key]["path"])).resolve() for key in ARTIFACT_FILES}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise DataError(f"{mlmodel}: not the MLmodel file of a ctrlab model ({_first_line(exc)}); was it registered "
                        "with `ctrlab register`?") from None
    root = model_dir.resolve()
    for key, path in paths.items():
        if not path.is_relative_to(root):  # the artefact paths come from a file anyone could have edited
            raise DataError(f"{mlmodel}: artefact '{key}' points outside the model directory")
    return paths


def load_registered(model_dir: Path) -> Any:
    """The :class:`~ctrlab.serve.Predictor` of a downloaded model, checked on its input example."""
    files = model_artifacts(model_dir)
    predictor = predictor_from_files(files["recipe"], files["processor"], files["weights"])
    check_scores(predictor, str(model_dir))
    return predictor


def serve_command(model: ResolvedModel, host: str, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow models serve`` command line for a registered model (local environment, no network)."""
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    return [mlflow_bin, "models", "serve", "-m", model.uri, "--env-manager", "local", "-h", host, "-p", str(port),
            "--workers", str(workers)]

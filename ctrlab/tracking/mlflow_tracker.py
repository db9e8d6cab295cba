"""MLflow tracking for ctrlab runs.

Every run opened through :func:`mlflow_run` goes to one tracking store, chosen by :func:`resolve_tracking_uri`:
the recipe's ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store
``~/.ctrlab/mlflow.db`` (artefacts beside it in ``~/.ctrlab/mlartifacts``). Any MLflow tracking URI works, e.g. an
``mlflow server`` backed by PostgreSQL (``http://host:5000``).

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids, never MLflow's fluent global "active
run", so runs can be nested (a sweep's parent run and its trials) or logged from several threads at once.

``mlflow`` and ``matplotlib`` are imported lazily, inside the functions that need them: importing ctrlab, or
training with ``tracking.enabled: false``, imports neither.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import math
import os
import platform
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ctrlab.config.tracking import TrackingConfig
from ctrlab.errors import RecipeError
from ctrlab.utils.signals import Interrupted, Terminated

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    from ctrlab.train.trainer import EpochRecord

DEFAULT_DB = Path(".ctrlab") / "mlflow.db"  # under the home directory
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite database file
PARENT_RUN_TAG = "mlflow.parentRunId"

_PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
_INVALID_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")  # what MLflow accepts in param/metric/tag keys
_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic",
                  "alembic.runtime.migration")

_clients: dict[str, MlflowClient] = {}
_clients_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------ the store
def resolve_tracking_uri(config: TrackingConfig) -> str:
    """The tracking URI for a run: ``config.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///~/.ctrlab/mlflow.db``
    (whose directory is created)."""
    if config.uri:
        return _expand_sqlite_home(config.uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return _expand_sqlite_home(env)
    path = Path.home() / DEFAULT_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str(path)


def _expand_sqlite_home(uri: str) -> str:
    if uri.startswith("sqlite:///~"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser())
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by ``***`` (safe to print)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[-1]}"))


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide MLflow's INFO chatter (database creation and alembic migrations on first use of a SQLite store).

    Only used while opening a store, under ``_clients_lock``: logger levels and warning filters are process-wide."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
            warnings.filterwarnings("ignore", module=r"alembic(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*[Ff]ilesystem.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_REACH_TIMEOUT_SECONDS = 5.0


def check_reachable(uri: str, key: str = "tracking.uri") -> None:
    """Fail fast on a tracking server nobody answers at (a one-line error naming ``key``): MLflow itself retries
    with back-off for minutes."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=_REACH_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise RecipeError(f"{key}: cannot reach {redact_uri(uri)} ({error.strerror or error}); start the tracking "
                          "server or fix the URI" + (", or set tracking.enabled=false" if key == "tracking.uri" else "")
                          ) from None


def _client(uri: str, key: str = "tracking.uri") -> MlflowClient:
    """One client per tracking URI for the whole process (opening a SQLite store checks its schema: ~1 s). A URI
    MLflow cannot use is a one-line :class:`RecipeError` naming ``key``."""
    with _clients_lock:
        client = _clients.get(uri)
        if client is None:
            check_reachable(uri, key)
            with _quiet_mlflow():
                from mlflow import MlflowClient

                try:
                    db = _sqlite_path(uri)
                    if db is not None:
                        db.parent.mkdir(parents=True, exist_ok=True)
                        # MLflow retries an engine it cannot open (a folder, /proc, not a database) for minutes.
                        import sqlite3

                        with contextlib.closing(sqlite3.connect(str(db), timeout=10)) as connection:
                            connection.execute("pragma schema_version")
                    client = MlflowClient(tracking_uri=uri)
                    client.search_experiments(max_results=1)  # creates/migrates the store now, quietly
                except Exception as error:
                    reason = " ".join(str(error).split())[:200] or type(error).__name__
                    hint = "; fix it or set tracking.enabled=false" if key == "tracking.uri" else "; fix it"
                    raise RecipeError(f"{key}: cannot use {redact_uri(uri)} as an MLflow store "
                                      f"({type(error).__name__}: {reason}){hint}") from None
            _clients[uri] = client
        return client


def open_store(uri: str, key: str) -> None:
    """Check now that ``uri`` is a usable MLflow store (reachable, openable), naming ``key`` when it is not."""
    _client(uri, key)


def connect(tracking: TrackingConfig) -> None:
    """Open (and check) the tracking store now, so that a bad ``tracking.uri`` fails before any work."""
    if tracking.enabled:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            return  # mlflow_run names the missing package
        _client(resolve_tracking_uri(tracking))


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (or restored, if deleted) when needed."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)
    artifact_location = None
    db = _sqlite_path(uri)
    if db is not None:
        # MLflow's default would be ./mlruns under the current directory; keep artefacts beside the database.
        safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "experiment"
        artifact_location = (db.resolve().parent / ARTIFACTS_DIR / safe).as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException:  # created concurrently by another process or thread
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


# ---------------------------------------------------------------------------------------------- one run
def _key(key: str) -> str:
    return _INVALID_KEY_CHARS.sub("_", str(key))[:250]


class RunLogger:
    """A thin wrapper over one active MLflow run, addressed by its id."""

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id

    def __repr__(self) -> str:
        return f"RunLogger(run_id={self.run_id!r}, tracking_uri={redact_uri(self.tracking_uri)!r})"

    @property
    def artifact_uri(self) -> str:
        return str(self.client.get_run(self.run_id).info.artifact_uri)

    def _log_strings(self, kind: str, values: dict[str, Any], limit_name: str, fallback_limit: int) -> None:
        """Params or tags: ``str()``-ed values cut to MLflow's length limit, sent in batches of at most 100."""
        from mlflow.entities import Param, RunTag

        try:
            from mlflow.utils import validation

            limit = int(getattr(validation, limit_name))
        except (ImportError, AttributeError):  # pragma: no cover - older MLflow
            limit = fallback_limit
        items = [(_key(k), str(v)[:limit]) for k, v in values.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            batch = items[i:i + _PARAMS_PER_BATCH]
            if kind == "params":
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in batch], synchronous=True)
            else:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in batch], synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters in batches of at most 100; values are ``str()``-ed and cut to MLflow's length limit."""
        self._log_strings("params", params, "MAX_PARAM_VAL_LENGTH", 500)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics (at ``step``, default 0); NaN values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if value is None:
                continue
            value = float(value)
            if math.isnan(value):
                continue
            items.append(Metric(_key(key), value, now, step or 0))
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _METRICS_PER_BATCH], synchronous=True)

    def log_epoch(self, record: EpochRecord) -> None:
        """An :data:`~ctrlab.train.trainer.EpochCallback`: train_loss, valid_<metric>, lr and samples_per_second
        at ``step=epoch``."""
        metrics = {"train_loss": record.train_loss, **{f"valid_{k}": v for k, v in record.valid.items()},
                   "lr": record.lr, "samples_per_second": record.samples_per_second}
        self.log_metrics(metrics, step=record.epoch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a whole directory) into the run's artefacts, under ``artifact_path`` if given."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Figure, name: str) -> None:
        """Save a matplotlib figure as a PNG artefact ``name`` (``.png`` is added when missing)."""
        if not Path(name).suffix:
            name += ".png"
        self.client.log_figure(self.run_id, figure, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._log_strings("tags", tags, "MAX_TAG_VAL_LENGTH", 5000)


@contextmanager
def mlflow_run(tracking: TrackingConfig, experiment: str, run_name: str | None = None,
               parent_run_id: str | None = None, tags: dict[str, str] | None = None,
               resume_run_id: str | None = None) -> Iterator[RunLogger | None]:
    """Open one MLflow run for the ``with`` block and yield its :class:`RunLogger` (``None`` when
    ``tracking.enabled`` is false). With ``resume_run_id``, a run of this store and experiment, that run is opened
    again (status RUNNING) instead of a new one: a resumed pipeline keeps its one parent run.

    The experiment is created when missing. With ``parent_run_id`` the run is nested under that run (tag
    ``mlflow.parentRunId``; the MLflow UI nests runs of the same experiment). The run ends FINISHED when the block
    succeeds, FAILED when it raises (the exception propagates) and KILLED on Ctrl-C or SIGTERM.
    """
    if not tracking.enabled:
        yield None
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise RecipeError("tracking.enabled: MLflow is not installed; pip install 'ctrlab[track]' "
                          "or set tracking.enabled=false") from None
    uri = resolve_tracking_uri(tracking)
    client = _client(uri)
    experiment_id = _experiment_id(client, experiment, uri)
    all_tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": _source_name(), "mlflow.user": _user()}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    all_tags.update(tags or {})
    run_id = _resumable(client, resume_run_id, experiment_id)
    if run_id is None:
        run_id = client.create_run(experiment_id, tags={_key(k): str(v) for k, v in all_tags.items()},
                                   run_name=run_name).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    logger = RunLogger(client, run_id, uri, experiment_id)
    try:
        yield logger
    except (KeyboardInterrupt, Interrupted, Terminated):
        _terminate(logger, "KILLED")
        raise
    except BaseException:
        _terminate(logger, "FAILED")
        raise
    _terminate(logger, "FINISHED", quiet=False)


def _resumable(client: MlflowClient, run_id: str | None, experiment_id: str) -> str | None:
    """``run_id`` when it names a live run of ``experiment_id`` in this store, else None."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # another store, or deleted: start a new run
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        return None
    return run_id


def _terminate(logger: RunLogger, status: str, quiet: bool = True) -> None:
    """End the run; when the block already failed, a tracking error must not hide the original exception."""
    try:
        # MLflow prints "View run ... at: <url>" to stdout for HTTP stores; stdout belongs to the CLI's JSON.
        with contextlib.redirect_stdout(sys.stderr):
            logger.client.set_terminated(logger.run_id, status)
    except Exception:
        if not quiet:
            raise
        logging.getLogger(__name__).warning("could not mark MLflow run %s as %s", logger.run_id, status,
                                            exc_info=True)


def _source_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ctrlab"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in containers without a passwd entry
        return "unknown"


# ----------------------------------------------------------------------------------------- system facts
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def system_tags() -> dict[str, str]:
    """Versions (ctrlab, torch, python, mlflow, numpy, polars), platform, host name, CPU count and the CUDA device
    if there is one, as run tags."""
    import ctrlab

    tags = {
        "version.ctrlab": ctrlab.__version__,
        "version.python": platform.python_version(),
        "version.torch": _version("torch"),
        "version.mlflow": _version("mlflow"),
        "version.numpy": _version("numpy"),
        "version.polars": _version("polars"),
        "system.platform": platform.platform(),
        "system.hostname": socket.gethostname(),
        "system.cpu_count": str(os.cpu_count() or 0),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                tags["system.cuda_device"] = torch.cuda.get_device_name(0)
                tags["version.cuda"] = str(torch.version.cuda)
    return tags


# ------------------------------------------------------------------------------------------------ figures
def learning_curve_figure(history: list[EpochRecord]) -> Figure:
    """Training loss and every validation metric against the epoch, one panel each; the best epoch is marked.

    Built on the Agg canvas directly (no pyplot): no display is needed, nothing is kept in global state, and the
    figure is freed with its last reference.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r.epoch for r in history]
    names = list(history[0].valid) if history else []
    panels = [("train_loss", [r.train_loss for r in history])]
    panels += [(f"valid_{n}", [r.valid.get(n, math.nan) for r in history]) for n in names]
    best = [r.epoch for r in history if r.improved]
    figure = Figure(figsize=(4.0 * len(panels), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, values) in zip(axes, panels):
        ax.plot(epochs, values, marker="o", markersize=3)
        if best:
            ax.axvline(best[-1], color="tab:green", linestyle="--", linewidth=1, label=f"best epoch {best[-1]}")
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 12 else epochs[:: max(1, len(epochs) // 10)])
    return figure

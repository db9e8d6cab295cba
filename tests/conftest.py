"""Shared fixtures.

Tests that need the real data read it in place from ``../shared/datasets`` (or ``$CTRLAB_DATA_DIR``). They skip
with a reason when it is absent, except when ``CTRLAB_REQUIRE_DATA=1`` (set by ``.ci/run``): then a missing copy
fails the run instead of silently skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("CTRLAB_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real-data directory; skips (or fails under CI) when it is missing."""
    path = _data_dir()
    if not (path / "README.md").exists() and not any(path.glob("*/")):
        message = f"real datasets not found at {path} (set CTRLAB_DATA_DIR or place ../shared/datasets)"
        if os.environ.get("CTRLAB_REQUIRE_DATA") == "1":
            pytest.fail(message + "; CTRLAB_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(message)
    return path


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated cache directory so tests never share encoded splits."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CTRLAB_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session", autouse=True)
def mlflow_tracking_store(tmp_path_factory: pytest.TempPathFactory):
    """Point MLflow at a per-session SQLite store so the suite never writes to ~/.ctrlab (or a real server)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = "sqlite:///" + str(root / "mlflow.db")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


# ------------------------------------------------------------------------------------------ real services
@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server on loopback (databases ``mlflow`` and ``optuna``); skips without the binaries,
    except under CI (``CTRLAB_REQUIRE_SERVICES=1``), where their absence fails."""
    from services import postgres_bindir, postgres_server

    if postgres_bindir() is None:
        message = "PostgreSQL is not installed (Debian package postgresql; `make test` installs it as root)"
        if os.environ.get("CTRLAB_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with postgres_server(("mlflow", "optuna")) as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_server_uri(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process on loopback, backed by the PostgreSQL server."""
    from services import mlflow_server

    with mlflow_server(f"{postgres_url}/mlflow", tmp_path_factory.mktemp("mlflow-artifacts")) as uri:
        yield uri

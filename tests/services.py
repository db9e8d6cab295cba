"""Real services for tests: a throw-away PostgreSQL cluster and an ``mlflow server`` on loopback.

PostgreSQL comes from Debian's packages (``make test`` installs them when missing and it can). The cluster lives in
a temporary directory, listens on 127.0.0.1 on a free port, trusts local connections and is removed afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctrlab.serve.server import free_port, running_process, venv_env


def postgres_bindir() -> Path | None:
    """Where initdb / pg_ctl live (Debian puts them in /usr/lib/postgresql/<version>/bin)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for path in reversed(candidates):
        if (Path(path) / "initdb").exists():
            return Path(path)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; Debian's package creates the 'postgres' user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@contextmanager
def postgres_server(databases: tuple[str, ...] = ("ctrlab",)) -> Iterator[str]:
    """Start a PostgreSQL cluster; yields the base URL ``postgresql://postgres@127.0.0.1:PORT``."""
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's postgresql")
    root = Path(tempfile.mkdtemp(prefix="ctrlab-pg-"))
    os.chmod(root, 0o755)
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "check": True}
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                     "-E", "UTF8", "--no-sync"]), **quiet)
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                                     "-o", f"-p {port} -h 127.0.0.1 -k {sockets} -F", "start"]), **quiet)
        for name in databases:
            subprocess.run(_as_postgres([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                                         "postgres", name]), **quiet)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, startup_timeout: float = 120) -> Iterator[str]:
    """Start ``mlflow server`` with the given backend store; yields its ``http://127.0.0.1:PORT`` URI."""
    port = free_port()
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    env = venv_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [mlflow_bin, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    with running_process(command, env, f"{uri}/health", "mlflow server", startup_timeout):
        yield uri

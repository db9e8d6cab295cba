"""Run a registered model behind ``ctrlab serve`` (or ``--backend mlflow``) on loopback and talk to it (tests,
benchmarks)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ctrlab.errors import CtrlabError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServedModel:
    """A running scoring server on ``127.0.0.1:port``."""

    port: int

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 120) -> tuple[int, bytes]:
        """One request on a fresh connection; returns (HTTP status, raw body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post(self, body: bytes, timeout: float = 120,
             content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        """POST a raw body to ``/invocations``; returns (HTTP status, parsed JSON reply)."""
        status, raw = self.request("POST", "/invocations", body, {"Content-Type": content_type}, timeout)
        return status, json.loads(raw)

    def predict_records(self, records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        return self.post(json.dumps({"dataframe_records": records}).encode())


@contextmanager
def running_process(command: list[str], env: dict[str, str], ready_url: str, what: str,
                    startup_timeout: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command``, wait until ``ready_url`` answers, and stop the process on exit (terminate, then kill).

    The process's stderr goes to a temporary file, not a pipe: a pipe nobody reads would block a chatty server."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-1500:]
                    raise CtrlabError(f"{what} exited with status {process.returncode}: {tail}")
                try:
                    with urllib.request.urlopen(ready_url, timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise CtrlabError(f"{what} did not answer at {ready_url} within {startup_timeout}s") from None
                    time.sleep(0.2)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def venv_env(**extra: str) -> dict[str, str]:
    """The environment with this interpreter's bin directory first on PATH (uvicorn, mlflow live there)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@contextmanager
def serve_registered(name: str, alias: str | None = "champion", tracking_uri: str | None = None,
                     startup_timeout: float = 120, workers: int = 1, backend: str = "ctrlab",
                     max_body_bytes: int | None = None) -> Iterator[ServedModel]:
    """Start ``python -m ctrlab serve NAME --alias ALIAS`` on a free loopback port (``backend="mlflow"``: behind
    ``mlflow models serve --env-manager local``) and stop it on exit."""
    port = free_port()
    env = venv_env(**({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}))
    command = [sys.executable, "-m", "ctrlab", "serve", name, "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers), "--backend", backend]
    if alias:
        command += ["--alias", alias]
    if max_body_bytes is not None:
        command += ["--max-body-bytes", str(max_body_bytes)]
    with running_process(command, env, f"http://127.0.0.1:{port}/ping", f"ctrlab serve --backend {backend}",
                         startup_timeout):
        yield ServedModel(port)

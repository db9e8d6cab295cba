"""Run a registered model behind ``mlflow models serve`` on loopback and talk to it (tests, benchmarks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ctrlab.errors import CtrlabError
from ctrlab.serve.registry import serve_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServedModel:
    """A running scoring server on ``127.0.0.1:port``."""

    port: int

    def post(self, body: bytes, timeout: float = 120) -> tuple[int, dict[str, Any]]:
        """POST a raw body to ``/invocations``; returns (HTTP status, parsed JSON reply)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def predict_records(self, records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        return self.post(json.dumps({"dataframe_records": records}).encode())


@contextmanager
def running_process(command: list[str], env: dict[str, str], ready_url: str, what: str,
                    startup_timeout: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command``, wait until ``ready_url`` answers, and stop the process on exit (terminate, then kill)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                tail = process.stderr.read().decode(errors="replace")[-1500:] if process.stderr else ""
                raise CtrlabError(f"{what} exited with status {process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise CtrlabError(f"{what} did not answer at {ready_url} within {startup_timeout}s") from None
                time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def venv_env(**extra: str) -> dict[str, str]:
    """The environment with this interpreter's bin directory first on PATH (uvicorn, mlflow live there)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@contextmanager
def serve_registered(name: str, alias: str | None = "champion", tracking_uri: str | None = None,
                     startup_timeout: float = 120, workers: int = 1) -> Iterator[ServedModel]:
    """Start ``mlflow models serve --env-manager local`` for ``models:/name@alias`` and stop it on exit."""
    port = free_port()
    env = venv_env(**({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}))
    command = serve_command(name, alias, None, "127.0.0.1", port, workers)
    with running_process(command, env, f"http://127.0.0.1:{port}/ping", "mlflow models serve", startup_timeout):
        yield ServedModel(port)

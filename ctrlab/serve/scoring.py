"""ctrlab's own scoring server: a small ASGI app that speaks MLflow's scoring protocol for a ctrlab model.

``POST /invocations`` takes what ``mlflow models serve`` takes (JSON with one of ``dataframe_split``,
``dataframe_records``, ``instances`` or ``inputs``; or ``text/csv``) and answers what it answers for a ctrlab
model, ``{"predictions": [{"probability": p}, ...]}``. ``GET /ping`` and ``GET /health`` answer 200 once the model
is loaded, ``GET /version`` names the versions. Unlike MLflow's server it

* limits the request body (``max_body_bytes``, on ``Content-Length`` and while a chunked body streams in: 413);
* answers every error with one JSON object ``{"error_code": ..., "message": ...}`` whose message quotes at most a
  short excerpt of the input, with 400 for anything wrong with the request, including a value the model cannot
  score (the message names the column and row), and 500 only for a fault of the server itself;
* never writes NaN or Infinity into a response (they are not JSON);
* builds the model's polars frame straight from the JSON values, without a pandas round trip.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from ctrlab.errors import CtrlabError, DataError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
EXCERPT_CHARS = 100
MAX_MESSAGE_CHARS = 400
JSON_HEADERS = [(b"content-type", b"application/json")]

logger = logging.getLogger("ctrlab.serve")


class HttpError(Exception):
    """A request the server refuses: HTTP status, an MLflow-style error code and a one-line message."""

    def __init__(self, status: int, code: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable quotation of request data (never the whole input)."""
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    text = text[: limit + 1]
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def error_body(code: str, message: str) -> bytes:
    """``{"error_code": ..., "message": ...}`` as ASCII JSON; the message is cut to one short line."""
    line = " ".join(message.split())
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[: MAX_MESSAGE_CHARS - 3] + "..."
    return json.dumps({"error_code": code, "message": line}).encode()


class NonStandardNumber:
    """``NaN``, ``Infinity`` or ``-Infinity`` in a request: Python's JSON parser accepts them, JSON does not. Kept
    as a marker so that the error can name the column and row where one was sent."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


def decode_json(body: bytes) -> Any:
    """Parse a request body; anything that is not one UTF-8 JSON document is a 400 quoting a short excerpt."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, "BAD_REQUEST",
                        f"the body is not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        return json.loads(text, parse_constant=NonStandardNumber)
    except json.JSONDecodeError as exc:
        start = max(0, exc.pos - 20)
        raise HttpError(400, "BAD_REQUEST", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                        f"{exc.colno} (near {excerpt(text[start:start + 60], 60)})") from None
    except RecursionError:
        raise HttpError(400, "BAD_REQUEST", "the body's JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise HttpError(400, "BAD_REQUEST", f"the body is not valid JSON ({str(exc)[:120]})") from None


@dataclass(frozen=True)
class InputColumns:
    """The raw columns a model reads, and how each is read."""

    names: tuple[str, ...]
    separators: dict[str, str]  # sequence columns: their separator (a list value is joined with it)

    @classmethod
    def of(cls, processor: Any) -> "InputColumns":
        return cls(tuple(processor.features.columns()),
                   {s.name: s.separator for s in processor.features.sequence})


_SCALARS = (str, int, float, bool, type(None))


def _bad_value(column: str, row: int, value: Any) -> DataError:
    if isinstance(value, NonStandardNumber):
        return DataError(f"request: column '{column}' row {row}: {value.literal} is not a finite number (JSON has no "
                         "NaN or Infinity; send null for a missing value)")
    return DataError(f"request: column '{column}' row {row}: a {_json_type(value)} is not a value of this column "
                     "(expected a string, a number or null)")


def _series(name: str, values: list[Any], separator: str | None) -> pl.Series:
    """One input column from JSON values, typed as polars would type the same values read from a file: integers
    Int64, numbers Float64, text String (numbers among text become text); the processor then reads it exactly as
    it reads training data (a number in a categorical column is its text, text in a numeric column is parsed)."""
    types = set(map(type, values))
    if separator is not None and list in types:
        values = [_joined(name, i, v, separator) if type(v) is list else v for i, v in enumerate(values, 1)]
        types = set(map(type, values))
    if not types.issubset(_SCALARS):
        row = next(i for i, v in enumerate(values, 1) if not isinstance(v, _SCALARS))
        raise _bad_value(name, row, values[row - 1])
    types.discard(type(None))
    try:
        if not types:
            return pl.Series(name, values, dtype=pl.String if separator is not None else pl.Float64)
        if types == {bool}:
            return pl.Series(name, values, dtype=pl.Boolean)
        if str not in types:
            if types == {int}:
                try:
                    return pl.Series(name, values, dtype=pl.Int64)
                except (TypeError, OverflowError, ValueError):
                    pass  # beyond int64: as text, which the processor reads as a float (or refuses as non-finite)
            elif float in types and not any(type(v) is int and abs(v) > 2**53 for v in values):
                return pl.Series(name, [float(v) if type(v) is bool else v for v in values],
                                 dtype=pl.Float64, strict=False)
        return pl.Series(name, [_text(v) for v in values], dtype=pl.String)
    except UnicodeEncodeError:
        row = next(i for i, v in enumerate(values, 1) if type(v) is str and not _encodable(v))
        raise DataError(f"request: column '{name}' row {row}: the text holds an unpaired surrogate escape "
                        "(\\ud800-\\udfff), which is not valid Unicode") from None


def _text(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    if type(value) is bool:
        return "true" if value else "false"
    return repr(value) if type(value) is float else str(value)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _joined(column: str, row: int, items: list[Any], separator: str) -> str:
    """A sequence value sent as a JSON list of ids: the ids joined as the column's text form."""
    for item in items:
        if not isinstance(item, (str, int, float)) or isinstance(item, bool) or (
                type(item) is float and not math.isfinite(item)):
            raise DataError(f"request: column '{column}' row {row}: a sequence is a list of ids (strings or "
                            f"numbers), found a {_json_type(item)} in it")
    return separator.join(_text(item) or "" for item in items)


def _missing(name: str, columns: InputColumns) -> DataError:
    listed = ", ".join(columns.names[:30]) + ("..." if len(columns.names) > 30 else "")
    return DataError(f"request: column '{name}' is missing (the model reads {listed})")


def _from_records(rows: Any, key: str, columns: InputColumns) -> pl.DataFrame:
    if not isinstance(rows, list):
        raise HttpError(400, "BAD_REQUEST", f"'{key}' must be a list of rows (JSON objects), got a {_json_type(rows)}")
    if not rows:
        raise DataError("request has no rows")
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise HttpError(400, "BAD_REQUEST", f"'{key}' row {i + 1} is a {_json_type(row)}, not an object of "
                            "column values")
    series = []
    for name in columns.names:
        values = [row.get(name) for row in rows]
        if not any(name in row for row in rows):
            raise _missing(name, columns)
        series.append(_series(name, values, columns.separators.get(name)))
    return pl.DataFrame(series)


def _from_columns(data: dict[str, Any], key: str, columns: InputColumns) -> pl.DataFrame:
    lists: dict[str, list[Any]] = {}
    for name in columns.names:
        if name not in data:
            raise _missing(name, columns)
        value = data[name]
        if type(value) is dict:
            raise HttpError(400, "BAD_REQUEST", f"'{key}' column '{name}' is an object; give a list of values")
        # A single value is one row, as MLflow reads it; a list is the column's rows.
        lists[name] = value if type(value) is list else [value]
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        shown = ", ".join(f"{n}: {len(v)}" for n, v in list(lists.items())[:6])
        raise HttpError(400, "BAD_REQUEST", f"'{key}' columns have different lengths ({shown})")
    if lengths == {0}:
        raise DataError("request has no rows")
    return pl.DataFrame([_series(n, v, columns.separators.get(n)) for n, v in lists.items()])


def _from_split(data: Any, columns: InputColumns) -> pl.DataFrame:
    if type(data) is not dict:
        raise HttpError(400, "BAD_REQUEST", f"'dataframe_split' must be an object with 'columns' and 'data', got a "
                        f"{_json_type(data)}")
    extra = [k for k in data if k not in ("columns", "data", "index")]
    if extra or "data" not in data:
        raise HttpError(400, "BAD_REQUEST", "'dataframe_split' must have 'data' and optionally 'columns' and 'index'"
                        + (f"; unknown key {excerpt(extra[0], 40)}" if extra else ""))
    names = data.get("columns")
    rows = data["data"]
    if type(names) is not list or any(type(n) is not str for n in names):
        raise HttpError(400, "BAD_REQUEST", "'dataframe_split.columns' must be a list of column names (strings)")
    if type(rows) is not list:
        raise HttpError(400, "BAD_REQUEST", f"'dataframe_split.data' must be a list of rows, got a {_json_type(rows)}")
    if not rows:
        raise DataError("request has no rows")
    width = len(names)
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != width:
            got = f"{len(row)} values" if type(row) is list else f"a {_json_type(row)}"
            raise HttpError(400, "BAD_REQUEST", f"'dataframe_split.data' row {i + 1} has {got}; each row is a list "
                            f"of {width} values, one per column")
    position: dict[str, int] = {}
    for j, name in enumerate(names):
        if name in position and name in columns.names:
            raise HttpError(400, "BAD_REQUEST", f"'dataframe_split.columns' names column '{name}' twice")
        position.setdefault(name, j)
    series = []
    for name in columns.names:
        if name not in position:
            raise _missing(name, columns)
        j = position[name]
        series.append(_series(name, [row[j] for row in rows], columns.separators.get(name)))
    return pl.DataFrame(series)


def frame_from_json(payload: Any, columns: InputColumns) -> pl.DataFrame:
    """The model's input frame from a decoded MLflow scoring request."""
    if type(payload) is not dict:
        raise HttpError(400, "BAD_REQUEST", "the body must be a JSON object with exactly one of the keys "
                        f"{', '.join(FORMATS)}; got a {_json_type(payload)}")
    keys = [k for k in payload if k in FORMATS]
    if len(keys) != 1:
        found = ", ".join(excerpt(k, 30) for k in list(payload)[:5]) or "none"
        raise HttpError(400, "BAD_REQUEST", f"the body must have exactly one of the keys {', '.join(FORMATS)} "
                        f"(keys found: {found})")
    unknown = [k for k in payload if k not in FORMATS and k != "params"]
    if unknown:
        raise HttpError(400, "BAD_REQUEST", f"unknown key {excerpt(unknown[0], 40)} next to '{keys[0]}' (allowed: "
                        f"one of {', '.join(FORMATS)}, and params)")
    key = keys[0]
    data = payload[key]
    if key == "dataframe_split":
        return _from_split(data, columns)
    if key == "dataframe_records":
        return _from_records(data, key, columns)
    # instances / inputs (TF-serving style): a list of row objects or an object of columns.
    if type(data) is dict:
        return _from_columns(data, key, columns)
    if type(data) is list and all(type(r) is dict for r in data):
        return _from_records(data, key, columns)
    raise HttpError(400, "BAD_REQUEST", f"'{key}' must be a list of row objects or an object of columns, got a "
                    f"{_json_type(data)}" + (" of other values" if type(data) is list else ""))


def frame_from_csv(body: bytes, columns: InputColumns) -> pl.DataFrame:
    """The model's input frame from a CSV body with a header line; every column is read as text and parsed by the
    processor exactly as a training file is."""
    import io

    try:
        header = pl.read_csv(io.BytesIO(body), n_rows=0, infer_schema=False)
        wanted = [n for n in columns.names if n in header.columns]
        missing = [n for n in columns.names if n not in header.columns]
        if missing:
            raise _missing(missing[0], columns)
        frame = pl.read_csv(io.BytesIO(body), columns=wanted, infer_schema=False)
    except CtrlabError:
        raise
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HttpError(400, "BAD_REQUEST",
                        f"the body is not a CSV table with a header line ({excerpt(reason, 100)})") \
            from None
    if frame.height == 0:
        raise DataError("request has no rows")
    return frame


def _content_type(scope: Scope) -> str:
    raw = _header(scope, b"content-type")
    if raw is None:
        raise HttpError(415, "BAD_REQUEST", "no Content-Type; send application/json or text/csv")
    text = raw.decode("latin-1")
    mime, *params = [part.strip() for part in text.split(";")]
    mime = mime.lower()
    for param in params:
        key, _, value = param.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"').lower()
        if key == "charset" and value not in ("utf-8", "utf8"):
            raise HttpError(415, "BAD_REQUEST", f"charset {excerpt(value, 20)} is not supported; send UTF-8")
        if key not in ("charset", ""):
            raise HttpError(415, "BAD_REQUEST", f"unknown Content-Type parameter {excerpt(key, 20)}")
    if mime not in ("application/json", "text/csv"):
        raise HttpError(415, "BAD_REQUEST", f"Content-Type {excerpt(mime, 40)} is not supported; send "
                        "application/json or text/csv")
    return mime


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class ClientGone(Exception):
    """The client closed the connection before its body arrived; there is no one to answer."""


class ScoringApp:
    """ASGI app scoring raw rows with a :class:`~ctrlab.serve.Predictor`, in MLflow's scoring protocol.

    Scoring runs on one worker thread, one request at a time (torch parallelises each batch itself), so that the
    event loop keeps answering ``/ping`` and reading the next request while a large batch is scored.
    """

    def __init__(self, predictor: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 info: dict[str, Any] | None = None) -> None:
        if max_body_bytes < 1:
            raise CtrlabError("--max-body-bytes: must be at least 1")
        self.predictor = predictor
        self.columns = InputColumns.of(predictor.processor)
        self.max_body_bytes = max_body_bytes
        self.version_body = json.dumps(info or {}).encode()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrlab-score")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served
        try:
            status, body, headers = await self._handle(scope, receive)
        except ClientGone:
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._executor.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        try:
            path, method = scope["path"], scope["method"]
            if path in ("/ping", "/health", "/version"):
                if method not in ("GET", "HEAD"):  # HEAD: health checks of load balancers (uvicorn drops the body)
                    raise HttpError(405, "METHOD_NOT_ALLOWED", f"{path} answers GET", [(b"allow", b"GET, HEAD")])
                return 200, (self.version_body if path == "/version" else b'{"status": "ok"}'), []
            if path != "/invocations":
                raise HttpError(404, "ENDPOINT_NOT_FOUND", f"no endpoint {excerpt(path, 60)}; POST /invocations "
                                "scores rows, GET /ping checks the server")
            if method != "POST":
                raise HttpError(405, "METHOD_NOT_ALLOWED", "/invocations answers POST", [(b"allow", b"POST")])
            mime = _content_type(scope)
            body = await self._read_body(scope, receive)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self.score, body, mime)
        except HttpError as error:
            return error.status, error_body(error.code, error.message), error.headers
        except ClientGone:
            raise
        except Exception:  # noqa: BLE001 - never let a fault reach uvicorn's plain-text 500
            logger.exception("request failed")
            return 500, error_body("INTERNAL_ERROR", "the server failed to answer this request; see the server log"), []

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise HttpError(400, "BAD_REQUEST", "Content-Length is not a number") from None
            if size > limit:
                # Answer before reading: uvicorn discards the unread body and keeps the connection usable.
                raise HttpError(413, "REQUEST_TOO_LARGE", f"the body has {size:,} bytes; this server takes at most "
                                f"{limit:,} (ctrlab serve --max-body-bytes); send fewer rows per request")
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise HttpError(413, "REQUEST_TOO_LARGE", f"the body exceeds {limit:,} bytes, the most this server "
                                "takes (ctrlab serve --max-body-bytes); send fewer rows per request")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def score(self, body: bytes, mime: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Parse, predict and serialize one request (runs on the scoring thread); never raises."""
        try:
            if mime == "text/csv":
                frame = frame_from_csv(body, self.columns)
            else:
                frame = frame_from_json(decode_json(body), self.columns)
            probabilities = self.predictor.predict(frame, source="request")
            finite = np.isfinite(probabilities) & (probabilities >= 0.0) & (probabilities <= 1.0)
            if not finite.all():  # Predictor refuses non-finite scores; this keeps NaN out of JSON regardless
                row = int(np.flatnonzero(~finite)[0]) + 1
                raise DataError(f"request: row {row}: the model's score is not a probability")
            out = json.dumps({"predictions": [{"probability": p} for p in probabilities.tolist()]},
                             allow_nan=False).encode()
            return 200, out, []
        except HttpError as error:
            return error.status, error_body(error.code, error.message), error.headers
        except CtrlabError as error:
            return 400, error_body("INVALID_PARAMETER_VALUE", error.message), []
        except RecursionError:
            return 400, error_body("BAD_REQUEST", "the request is nested too deeply"), []
        except MemoryError:
            return 413, error_body("REQUEST_TOO_LARGE", "the request needs more memory than the server has; send "
                                   "fewer rows per request"), []
        except (Exception, pl.exceptions.PanicException):  # noqa: BLE001 - a fault of the server, not of the
            # request (a panic inside polars is a BaseException): log it, answer one line, keep serving
            logger.exception("scoring failed")
            return 500, error_body("INTERNAL_ERROR", "the server failed to score this request; see the server log"), []


def default_threads(workers: int) -> int:
    """Torch threads per worker process: the cores shared among the workers, at most 4 (a request of a few rows
    has no parallel work, and more OpenMP threads only spin against the event loop and polars)."""
    return max(1, min(4, (os.cpu_count() or 1) // max(1, workers)))


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now, so that a port in use is a one-line error before any worker starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CtrlabError(f"--host/--port: cannot listen on {host}:{port} ({reason})") from None
    sock.set_inheritable(True)
    return sock


MODEL_DIR_ENV = "CTRLAB_SERVE_MODEL_DIR"
MAX_BODY_ENV = "CTRLAB_SERVE_MAX_BODY_BYTES"
INFO_ENV = "CTRLAB_SERVE_INFO"
THREADS_ENV = "CTRLAB_SERVE_THREADS"


def app_from_environment() -> ScoringApp:
    """The app of one worker process of ``ctrlab serve --workers N`` (uvicorn's factory): the parent process
    downloaded and checked the model and names its directory in the environment."""
    from pathlib import Path

    import torch

    from ctrlab.serve.registry import load_registered

    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    predictor = load_registered(Path(os.environ[MODEL_DIR_ENV]))
    return ScoringApp(predictor, int(os.environ[MAX_BODY_ENV]), json.loads(os.environ.get(INFO_ENV, "{}")))


def uvicorn_config(app: Any, host: str, port: int, workers: int = 1) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, workers=workers, lifespan="on", access_log=False,
                          log_level="warning", server_header=False, date_header=False, timeout_keep_alive=5,
                          factory=isinstance(app, str))


def run(predictor: Any, model_dir: Any, host: str, port: int, workers: int = 1,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, info: dict[str, Any] | None = None,
        threads: int | None = None, announce: Callable[[str], None] | None = None) -> None:
    """Serve ``predictor`` until SIGINT/SIGTERM. ``workers > 1`` starts that many processes, each loading the model
    from ``model_dir`` (already downloaded and checked)."""
    import torch
    import uvicorn

    if workers < 1:
        raise CtrlabError("--workers: must be at least 1")
    if max_body_bytes < 1:
        raise CtrlabError("--max-body-bytes: must be at least 1")
    threads = threads or default_threads(workers)
    sock = listening_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    if announce:
        announce(f"serving {info.get('model_uri') if info else 'the model'} on http://{shown}:{port} "
                 f"({workers} worker{'s' if workers > 1 else ''}, bodies up to {max_body_bytes:,} bytes)")
    if workers == 1:
        torch.set_num_threads(threads)
        app = ScoringApp(predictor, max_body_bytes, info)
        uvicorn.Server(uvicorn_config(app, host, port)).run(sockets=[sock])
        return
    import signal

    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's worker supervisor, remembering which signal stopped it."""

        stopped_by: int | None = None

        def handle_signals(self) -> None:
            for sig in self.signal_queue:
                if sig in (signal.SIGINT, signal.SIGTERM):
                    self.stopped_by = sig
            super().handle_signals()

    os.environ.update({MODEL_DIR_ENV: str(model_dir), MAX_BODY_ENV: str(max_body_bytes),
                       INFO_ENV: json.dumps(info or {}), THREADS_ENV: str(threads)})
    config = uvicorn_config("ctrlab.serve.scoring:app_from_environment", host, port, workers)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stderr.flush()
    if supervisor.stopped_by is not None:
        # Stopped on request: exit as the signal says (130 for Ctrl-C, 143 for SIGTERM), as with one worker.
        signal.raise_signal(supervisor.stopped_by)
    else:
        raise CtrlabError("the server's worker processes stopped (they failed to start); see the messages above")

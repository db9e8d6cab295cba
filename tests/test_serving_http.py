"""The serving boundary, over real HTTP on loopback: `ctrlab serve` (ctrlab's own scoring server) speaks MLflow's
scoring protocol, limits the body size (413), answers every bad request with a short JSON error (4xx, never a
5xx, never the whole input echoed back, never NaN), keeps serving after each, and refuses to start (exit 2, one
line) when the model, alias, version or store does not exist."""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ctrlab.data.pipeline import load_raw_splits
from ctrlab.serve import Predictor
from ctrlab.serve.server import ServedModel, free_port, serve_registered
from tiny import train_small_synthetic_run

mlflow = pytest.importorskip("mlflow")
MAX_BODY = 100_000
NAME = "serve_http"
COLUMNS = ["C1", "C2", "C3", "C4", "I1", "I2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, pl.DataFrame, Predictor]:
    """A tiny run registered as NAME@champion: (tracking URI, raw test rows, in-process predictor)."""
    from ctrlab.serve.registry import register_run

    root = tmp_path_factory.mktemp("serving_http")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    recipe, result = train_small_synthetic_run(root, NAME, {"enabled": False})
    register_run(str(result.output_dir), NAME, alias="champion", tracking_uri=uri)
    rows = load_raw_splits(recipe.dataset, recipe.seed).frames["test"]
    predictor = Predictor.from_run(result.output_dir)
    assert predictor.input_columns == COLUMNS
    return uri, rows.select(COLUMNS), predictor


@pytest.fixture(scope="module")
def server(model) -> ServedModel:
    with serve_registered(NAME, "champion", tracking_uri=model[0], max_body_bytes=MAX_BODY) as served:
        yield served


def _strict_json(raw: bytes) -> Any:
    """Parse as strict JSON: NaN and Infinity are not JSON and fail the test."""
    def refuse(literal: str) -> None:
        raise AssertionError(f"response holds {literal}: {raw[:200]!r}")

    return json.loads(raw, parse_constant=refuse)


def _post(server: ServedModel, body: bytes | str, content_type: str = "application/json",
          timeout: float = 30) -> tuple[int, Any]:
    data = body.encode() if isinstance(body, str) else body
    status, raw = server.request("POST", "/invocations", data, {"Content-Type": content_type}, timeout)
    return status, _strict_json(raw)


def _assert_error(status: int, body: Any, expected: int, *fragments: str) -> str:
    assert status == expected, body
    assert set(body) == {"error_code", "message"} and isinstance(body["error_code"], str)
    message = body["message"]
    assert "\n" not in message and len(message) < 300, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _alive(server: ServedModel, model) -> None:
    status, raw = server.request("GET", "/ping")
    assert status == 200
    _, rows, predictor = model
    status, body = _post(server, json.dumps({"dataframe_records": rows.head(2).to_dicts()}))
    assert status == 200
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], predictor.predict(rows.head(2)),
                               rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ the protocol
def test_every_request_format_scores_like_ctrlab_in_process(model, server) -> None:
    _, rows, predictor = model
    batch = rows.head(50)
    expected = predictor.predict(batch)
    records = batch.to_dicts()
    columns = batch.to_dict(as_series=False)
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": batch.columns, "data": [list(r.values()) for r in records],
                                                "index": list(range(batch.height))}},
        "dataframe_records": {"dataframe_records": records},
        "instances": {"instances": records},
        "inputs": {"inputs": columns},
        "instances_columns": {"instances": columns, "params": {}},
    }
    for what, body in bodies.items():
        status, reply = _post(server, json.dumps(body))
        assert status == 200, (what, reply)
        assert list(reply) == ["predictions"] and all(list(p) == ["probability"] for p in reply["predictions"])
        np.testing.assert_allclose([p["probability"] for p in reply["predictions"]], expected, rtol=0, atol=1e-6,
                                   err_msg=what)
    status, reply = _post(server, batch.write_csv(), "text/csv; charset=utf-8")
    assert status == 200, reply
    np.testing.assert_allclose([p["probability"] for p in reply["predictions"]], expected, rtol=0, atol=1e-6)
    # One row as a bare object of values (MLflow reads a scalar as one row); an unseen category is out of vocabulary.
    status, reply = _post(server, json.dumps({"inputs": {**records[0], "C3": "never-seen"}}))
    assert status == 200 and len(reply["predictions"]) == 1
    status, raw = server.request("GET", "/version")
    assert status == 200 and _strict_json(raw)["name"] == NAME
    status, raw = server.request("GET", "/health")
    assert status == 200


def test_body_over_the_limit_is_413_and_the_server_keeps_serving(model, server) -> None:
    big = json.dumps({"dataframe_records": [{"C1": "x" * 1000}] * 200}).encode()
    assert len(big) > 2 * MAX_BODY
    status, body = _post(server, big)
    _assert_error(status, body, 413, "--max-body-bytes", f"{MAX_BODY:,}")
    _alive(server, model)
    # A chunked body has no Content-Length: the limit is enforced while it streams in.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))
        connection.request("POST", "/invocations", body=chunks, encode_chunked=True,
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        _assert_error(response.status, _strict_json(response.read()), 413, "--max-body-bytes")
    finally:
        connection.close()
    _alive(server, model)
    # A body just under the limit is read and answered normally.
    status, body = _post(server, b" " * (MAX_BODY - 30) + b'{"dataframe_records": []}')
    _assert_error(status, body, 400, "no rows")


def test_junk_is_400_with_a_short_excerpt(model, server) -> None:
    junk = ("<junk>" + "".join(chr(65 + (i * 7) % 26) for i in range(80_000))).encode()
    status, body = _post(server, junk)
    message = _assert_error(status, body, 400, "not valid JSON")
    assert junk[:120].decode() not in message
    status, body = _post(server, b"\xff\xfe" + junk)
    _assert_error(status, body, 400, "UTF-8")
    status, body = _post(server, "[" * 50_000 + "]" * 50_000)
    assert status == 400, body
    status, body = _post(server, '{"dataframe_records": [{"I1": 1' + "0" * 5000 + "}]}")
    assert status == 400, body
    status, body = _post(server, junk.decode(), "text/csv")
    assert status == 400, body
    _alive(server, model)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e400", "-1e400", "1e39"])
def test_non_finite_numbers_are_400_naming_the_column(model, server, literal: str) -> None:
    _, rows, _ = model
    record = rows.head(1).to_dicts()[0]
    body = json.dumps({"dataframe_records": [record, {**record, "I1": 0.5}]})
    body = body.replace('"I1": 0.5', f'"I1": {literal}')
    status, reply = _post(server, body)
    _assert_error(status, reply, 400, "column 'I1'", "row 2")
    status, reply = _post(server, json.dumps({"dataframe_split": {"columns": ["I2", *COLUMNS[:4], "I1"],
                                                                   "data": [[1.0, "a", "b", "c", "d", 0.25]]}})
                          .replace("0.25", literal))
    _assert_error(status, reply, 400, "column 'I1'")
    status, reply = _post(server, f"C1,C2,C3,C4,I1,I2\na,b,c,d,{literal.replace('Infinity', 'inf')},1\n",
                          "text/csv")
    if literal not in ("NaN", "1e39"):  # CSV "NaN" is a missing value, as in a training file; 1e39 overflows float32
        _assert_error(status, reply, 400, "column 'I1'")


def test_bad_requests_are_4xx_json(model, server) -> None:
    _, rows, _ = model
    records = rows.head(3).to_dicts()
    cases: list[tuple[bytes | str, str, int, tuple[str, ...]]] = [
        (json.dumps({"dataframe_records": [{k: v for k, v in r.items() if k != "C2"} for r in records]}),
         "application/json", 400, ("column 'C2'",)),
        (json.dumps({"dataframe_records": [{**r, "I1": "abc"} for r in records]}), "application/json", 400,
         ("column 'I1'",)),
        (json.dumps({"dataframe_records": [{**r, "C1": {"nested": [1]}} for r in records]}), "application/json", 400,
         ("column 'C1'", "row 1")),
        (b"", "application/json", 400, ()),
        (json.dumps({"dataframe_records": []}), "application/json", 400, ("no rows",)),
        (json.dumps([1, 2, 3]), "application/json", 400, ("dataframe_records",)),
        (json.dumps({"dataframe_recs": records}), "application/json", 400, ("exactly one",)),
        (json.dumps({"dataframe_records": records, "instances": records}), "application/json", 400, ("exactly one",)),
        (json.dumps({"dataframe_records": records, "extra": 1}), "application/json", 400, ("unknown key",)),
        (json.dumps({"dataframe_split": {"columns": COLUMNS, "data": [[1, 2]]}}), "application/json", 400,
         ("row 1",)),
        (json.dumps({"inputs": {"C1": ["a", "b"], "C2": ["a"], "C3": ["a"], "C4": ["a"], "I1": [1], "I2": [1]}}),
         "application/json", 400, ("different lengths",)),
        (json.dumps({"dataframe_records": records}), "text/plain", 415, ("application/json",)),
        (json.dumps({"dataframe_records": records}), "application/json; charset=latin-1", 415, ("UTF-8",)),
    ]
    for body, content_type, expected, fragments in cases:
        status, reply = _post(server, body, content_type)
        _assert_error(status, reply, expected, *fragments)
    status, raw = server.request("GET", "/nowhere")
    _assert_error(status, _strict_json(raw), 404)
    status, raw = server.request("GET", "/invocations")
    _assert_error(status, _strict_json(raw), 405)
    status, raw = server.request("POST", "/ping", b"{}", {"Content-Type": "application/json"})
    _assert_error(status, _strict_json(raw), 405)
    status, raw = server.request("POST", "/invocations", b"{}", {})
    _assert_error(status, _strict_json(raw), 415)
    # Large batches still work after all that.
    big = pl.concat([rows] * (1000 // rows.height + 1)).head(1000)
    status, reply = _post(server, big.write_csv(), "text/csv")
    assert status == 200 and len(reply["predictions"]) == 1000
    _alive(server, model)


# -------------------------------------------------------------------------- random bodies: never a 5xx
FORMAT_KEYS = ["dataframe_split", "dataframe_records", "instances", "inputs"]
HUGE = st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, 1e308, -1e308, 1e39, 3.4e38, 1e-320, 0.0, -0.0])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", " ", "1e400", "inf", "-inf", "nan", "NaN", "1,5", "\u0000",
                                            "\ud800", "C1_000001", "1" * 400]),
)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=6)), inner,
                                             max_size=4), max_leaves=12)
CELL = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2))
RECORDS = st.lists(st.dictionaries(st.sampled_from([*COLUMNS, "extra"]), CELL, max_size=7), max_size=5)
FULL_RECORDS = st.lists(st.fixed_dictionaries({c: CELL for c in COLUMNS}), min_size=1, max_size=4)
COLUMN_DICT = st.dictionaries(st.sampled_from([*COLUMNS, "extra"]), st.one_of(CELL, st.lists(CELL, max_size=4)),
                              max_size=7)
SPLIT = st.fixed_dictionaries(
    {"columns": st.one_of(st.permutations(COLUMNS), st.lists(st.sampled_from(COLUMNS), max_size=7)),
     "data": st.lists(st.lists(CELL, min_size=5, max_size=7), max_size=4)},
    optional={"index": st.lists(st.integers(), max_size=4)})
# Plausible rows (the values a client would send) so that the scoring path itself is exercised, not only the parser.
CATEGORY = st.one_of(st.text(max_size=10), st.integers(-1000, 1000), st.sampled_from(["C1_000001", "C2_000055"]),
                     st.none())
NUMBER = st.one_of(st.floats(-1e6, 1e6), st.integers(-10**6, 10**6), st.none(),
                   st.floats(-1e6, 1e6).map(lambda x: f" {x} "))
PLAUSIBLE = st.lists(st.fixed_dictionaries({**{c: CATEGORY for c in COLUMNS[:4]}, **{c: NUMBER for c in COLUMNS[4:]}}),
                     min_size=1, max_size=6)
PAYLOADS = st.one_of(
    JSON_VALUES,
    st.builds(lambda r: {"dataframe_records": r}, PLAUSIBLE),
    st.builds(lambda r: {"dataframe_split": {"columns": list(r[0]), "data": [list(x.values()) for x in r]}},
              PLAUSIBLE),
    st.builds(lambda r: {"inputs": {c: [x[c] for x in r] for c in COLUMNS}}, PLAUSIBLE),
    st.builds(lambda r: {"dataframe_records": r}, st.one_of(RECORDS, FULL_RECORDS)),
    st.builds(lambda r: {"instances": r}, st.one_of(FULL_RECORDS, COLUMN_DICT)),
    st.builds(lambda c: {"inputs": c}, COLUMN_DICT),
    st.builds(lambda s: {"dataframe_split": s}, SPLIT),
    st.dictionaries(st.sampled_from([*FORMAT_KEYS, "params", "prompt", "x"]), JSON_VALUES, max_size=3),
)


def _body(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=True).encode("utf-8", "surrogatepass")


BODIES = st.one_of(
    st.tuples(PAYLOADS.map(_body), st.just("application/json")),
    st.tuples(st.binary(max_size=300), st.sampled_from(["application/json", "text/csv"])),
    st.tuples(st.lists(st.lists(st.one_of(st.text(max_size=6), st.sampled_from(COLUMNS)), min_size=1, max_size=7),
                       min_size=1, max_size=4).map(lambda lines: "\n".join(",".join(v) for v in lines).encode(
                           "utf-8", "surrogatepass")), st.just("text/csv")),
)


# Derandomised (the same 150 cases every run) so that CI is repeatable; a 4,000-case random run found no 5xx.
@settings(max_examples=150, deadline=15_000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(BODIES)
def test_random_bodies_get_a_prediction_or_a_4xx(server, case: tuple[bytes, str]) -> None:
    body, content_type = case
    status, raw = server.request("POST", "/invocations", body, {"Content-Type": content_type}, timeout=10)
    reply = _strict_json(raw)
    event(f"HTTP {status}")
    assert status == 200 or 400 <= status < 500, (status, reply)
    if status == 200:
        probabilities = [p["probability"] for p in reply["predictions"]]
        assert probabilities and all(math.isfinite(p) and 0 <= p <= 1 for p in probabilities)
    else:
        assert set(reply) == {"error_code", "message"} and len(reply["message"]) < 500


def test_server_survives_the_property_test(model, server) -> None:
    _alive(server, model)


# -------------------------------------------------------------------------------------- refusing to start
def _serve(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ctrlab", "serve", *args, "--port", str(free_port()), "--tracking-uri", uri]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "fragment"), [
    (["no_such_model"], "no_such_model"),
    ([NAME, "--alias", "nope"], "alias 'nope'"),
    ([NAME, "--version", "9"], "version 9"),
    (["no_such_model", "--backend", "mlflow"], "no_such_model"),
])
def test_serving_a_missing_model_exits_2_with_one_line(model, args: list[str], fragment: str) -> None:
    result = _serve(model[0], *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr[-2000:]


def test_serving_from_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    database = tmp_path / "typo.db"
    result = _serve(f"sqlite:///{database}", NAME)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "typo.db" in result.stderr and not database.exists()


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_stops_the_server_with_its_status_and_one_line(model, sig: str, code: int, word: str) -> None:
    """Ctrl-C (or a supervisor's SIGTERM) stops `ctrlab serve` with the shell's status for that signal and one
    closing line, never a traceback."""
    import os
    import signal
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": model[0]}
    process = subprocess.Popen([sys.executable, "-m", "ctrlab", "serve", NAME, "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                break
        except OSError:
            time.sleep(0.2)
    process.send_signal(getattr(signal, sig))
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith(word), err

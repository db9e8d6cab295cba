"""Registry and serving: a run registered as a pyfunc model scores raw rows exactly like ctrlab in process, in
Python and over HTTP through `ctrlab serve` (ctrlab's own scoring server) and `ctrlab serve --backend mlflow`
(`mlflow models serve --env-manager local`); bad requests get 400s with messages naming the column, and the server
keeps answering. tests/test_serving_http.py covers the HTTP boundary in depth."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from rich.console import Console

from ctrlab.data.pipeline import load_raw_splits
from ctrlab.serve import Predictor
from tiny import train_small_synthetic_run

mlflow = pytest.importorskip("mlflow")
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory):
    from ctrlab.serve.registry import register_run

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    recipe, result = train_small_synthetic_run(root, "serve_t", {"uri": uri})
    version = register_run(str(result.output_dir), "serve_t", alias="champion", tracking_uri=uri)
    raw = load_raw_splits(recipe.dataset, recipe.seed).frames["test"]
    predictor = Predictor.from_run(result.output_dir)
    return uri, version, raw.select(predictor.input_columns), predictor


def test_registered_pyfunc_matches_in_process_predictions(registered) -> None:
    uri, version, rows, predictor = registered
    assert version.version == "1" and version.alias == "champion"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/serve_t@champion")
    served = model.predict(rows.to_pandas())["probability"].to_numpy()
    np.testing.assert_allclose(served, predictor.predict(rows), rtol=0, atol=1e-6)
    signature = model.metadata.get_input_schema()
    assert signature.input_names() == predictor.input_columns


def test_pyfunc_names_a_missing_column(registered) -> None:
    uri, _, rows, _ = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/serve_t@champion")
    with pytest.raises(mlflow.exceptions.MlflowException, match="column 'C1'"):
        model.predict(rows.drop("C1").to_pandas())


def _records(frame: pl.DataFrame) -> list[dict]:
    return frame.to_dicts()


@pytest.fixture(scope="module")
def server(registered):
    from ctrlab.serve.server import serve_registered

    with serve_registered("serve_t", "champion", tracking_uri=registered[0]) as served:
        yield served


@pytest.fixture(scope="module")
def mlflow_server(registered):
    from ctrlab.serve.server import serve_registered

    with serve_registered("serve_t", "champion", tracking_uri=registered[0], backend="mlflow") as served:
        yield served


@pytest.mark.parametrize("backend", ["ctrlab", "mlflow"])
def test_http_predictions_equal_in_process(registered, backend: str, request: pytest.FixtureRequest) -> None:
    _, _, rows, predictor = registered
    served_model = request.getfixturevalue("server" if backend == "ctrlab" else "mlflow_server")
    status, body = served_model.predict_records(_records(rows.head(200)))
    assert status == 200
    served = np.array([p["probability"] for p in body["predictions"]])
    np.testing.assert_allclose(served, predictor.predict(rows.head(200)), rtol=0, atol=1e-6)
    status, body = served_model.predict_records(_records(rows.head(3).drop("C2")))
    assert status == 400 and "column 'C2'" in body["message"]


def test_http_bad_requests_then_good_one(registered, server) -> None:
    _, _, rows, predictor = registered
    status, body = server.predict_records(_records(rows.head(3).drop("C2")))
    assert status == 400 and "column 'C2'" in body["message"]
    status, body = server.predict_records(_records(rows.head(3).with_columns(pl.lit("abc").alias("I1"))))
    assert status == 400 and "I1" in body["message"]
    status, body = server.post(b"")
    assert status == 400
    status, body = server.post(b'{"dataframe_records": []}')
    assert status == 400 and "no rows" in body["message"]
    unseen = rows.head(2).with_columns(pl.lit("never-seen-value").alias("C3"))
    status, body = server.predict_records(_records(unseen))
    assert status == 200 and len(body["predictions"]) == 2
    big = pl.concat([rows] * (10_000 // rows.height + 1)).head(10_000)
    status, body = server.predict_records(_records(big))
    assert status == 200 and len(body["predictions"]) == 10_000
    status, body = server.predict_records(_records(rows.head(5)))
    assert status == 200
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], predictor.predict(rows.head(5)),
                               atol=1e-6, rtol=0)

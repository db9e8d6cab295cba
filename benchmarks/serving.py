"""Serving latency and throughput of a registered ctrlab model behind `mlflow models serve`.

Trains a small DeepFM on synthetic data (or takes ``--run DIR``, a finished run), registers it in a temporary
SQLite-backed MLflow store, serves it on loopback with ``mlflow models serve --env-manager local`` and prints:

* p50 / p99 latency of single-row requests (``--single N`` requests, one at a time);
* rows/s for 1,000-row batches over HTTP (``--batches N``);
* rows/s of in-process ``Predictor.predict`` on the same 1,000-row batches, and the ratio HTTP / in-process.

    python benchmarks/serving.py                       # ~1-2 minutes on 2 cores
    python benchmarks/serving.py --run runs/frappe_deepfm --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.console import Console

from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.data.pipeline import load_raw_splits
from ctrlab.serve import Predictor
from ctrlab.serve.registry import register_run
from ctrlab.serve.server import serve_registered
from ctrlab.train.run import RECIPE_FILE, train_recipe


def _small_run(root: Path) -> Path:
    recipe = validate_recipe({
        "name": "bench_serving", "output_dir": str(root / "run"),
        "dataset": {"synthetic": {"rows": 50_000}},
        "model": {"block": "deepfm", "mlp": {"hidden": [256, 128]}}, "embedding": {"dim": 16},
        "train": {"epochs": 1, "progress": False, "device": "cpu"}, "tracking": {"enabled": False},
    })
    return train_recipe(recipe, console=Console(quiet=True)).output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run directory (default: train a small one)")
    parser.add_argument("--data-dir", help="data directory for a card-based --run")
    parser.add_argument("--single", type=int, default=300, help="single-row requests to time")
    parser.add_argument("--batches", type=int, default=30, help="1,000-row requests to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = args.run or _small_run(root)
        recipe = validate_recipe(read_recipe_file(run_dir / RECIPE_FILE))
        predictor = Predictor.from_run(run_dir)
        rows = load_raw_splits(recipe.dataset, recipe.seed, args.data_dir).frames["test"].select(predictor.input_columns)
        rows = pl.concat([rows] * (1000 // rows.height + 1)).head(max(1000, rows.height))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        register_run(str(run_dir), "bench_serving", alias="champion", tracking_uri=uri)
        batch = rows.head(1000)
        records = batch.to_dicts()

        with serve_registered("bench_serving", "champion", tracking_uri=uri) as server:
            for record in records[:20]:  # warm-up
                server.predict_records([record])
            latencies = []
            for i in range(args.single):
                start = time.perf_counter()
                status, _ = server.predict_records([records[i % len(records)]])
                latencies.append(time.perf_counter() - start)
                assert status == 200
            batch_seconds = []
            for _ in range(args.batches):
                start = time.perf_counter()
                status, body = server.predict_records(records)
                batch_seconds.append(time.perf_counter() - start)
                assert status == 200 and len(body["predictions"]) == 1000
            http = np.array([p["probability"] for p in body["predictions"]])

        predictor.predict(batch)
        local_seconds = []
        for _ in range(args.batches):
            start = time.perf_counter()
            local = predictor.predict(batch)
            local_seconds.append(time.perf_counter() - start)
        assert np.allclose(http, local, atol=1e-6, rtol=0), "served predictions differ from in-process ones"

    lat = np.array(latencies) * 1000
    http_rps = 1000 / statistics.median(batch_seconds)
    local_rps = 1000 / statistics.median(local_seconds)
    result = {
        "single_row_p50_ms": float(np.percentile(lat, 50)), "single_row_p99_ms": float(np.percentile(lat, 99)),
        "http_rows_per_s_1000_batch": http_rps, "in_process_rows_per_s_1000_batch": local_rps,
        "ratio_http_over_in_process": http_rps / local_rps, "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "date": dt.date.today().isoformat(),
    }
    print(f"serving benchmark, {dt.date.today()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.single} single-row requests, {args.batches} x 1,000-row batches\n")
    print("| measure | value |\n|---|---:|")
    print(f"| single-row latency p50 | {result['single_row_p50_ms']:.1f} ms |")
    print(f"| single-row latency p99 | {result['single_row_p99_ms']:.1f} ms |")
    print(f"| HTTP rows/s (1,000-row batches) | {http_rps:,.0f} |")
    print(f"| in-process `Predictor.predict` rows/s (1,000-row batches) | {local_rps:,.0f} |")
    print(f"| ratio HTTP / in-process | {result['ratio_http_over_in_process']:.3f} |")
    json.dump(result, sys.stderr)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()

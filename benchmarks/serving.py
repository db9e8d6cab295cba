"""Serving latency and throughput of a registered ctrlab model behind `ctrlab serve` (and `mlflow models serve`).

Trains a small DeepFM on synthetic data (or takes ``--run DIR``, a finished run), registers it in a temporary
SQLite-backed MLflow store, serves it on loopback with ``ctrlab serve`` (``--backend ctrlab``, the default: ctrlab's
own scoring server), ``--backend mlflow`` (``mlflow models serve --env-manager local``) or ``--backend both``, and
prints for each:

* p50 / p99 latency of single-row requests (``--single N`` requests, one at a time, a new connection each);
* rows/s for 1,000-row batches over HTTP (``--batches N``);
* rows/s of in-process ``Predictor.predict`` on the same 1,000-row batches, and the ratio HTTP / in-process;
* with ``--backend both``: the ratios ctrlab / mlflow.

    python benchmarks/serving.py                       # ~1 minute on 2 cores
    python benchmarks/serving.py --backend both        # ~2 minutes
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
from typing import Any

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


def _measure(backend: str, uri: str, records: list[dict[str, Any]], single: int, batches: int,
             workers: int) -> tuple[dict[str, float], np.ndarray]:
    with serve_registered("bench_serving", "champion", tracking_uri=uri, backend=backend, workers=workers) as server:
        for record in records[:30]:  # warm-up
            server.predict_records([record])
        latencies = []
        for i in range(single):
            start = time.perf_counter()
            status, _ = server.predict_records([records[i % len(records)]])
            latencies.append(time.perf_counter() - start)
            assert status == 200
        batch_seconds = []
        for _ in range(batches):
            start = time.perf_counter()
            status, body = server.predict_records(records)
            batch_seconds.append(time.perf_counter() - start)
            assert status == 200 and len(body["predictions"]) == len(records)
    lat = np.array(latencies) * 1000
    result = {"single_row_p50_ms": float(np.percentile(lat, 50)), "single_row_p99_ms": float(np.percentile(lat, 99)),
              "http_rows_per_s_1000_batch": len(records) / statistics.median(batch_seconds)}
    return result, np.array([p["probability"] for p in body["predictions"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run directory (default: train a small one)")
    parser.add_argument("--data-dir", help="data directory for a card-based --run")
    parser.add_argument("--backend", choices=["ctrlab", "mlflow", "both"], default="ctrlab")
    parser.add_argument("--single", type=int, default=300, help="single-row requests to time")
    parser.add_argument("--batches", type=int, default=30, help="1,000-row requests to time")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backends = ["ctrlab", "mlflow"] if args.backend == "both" else [args.backend]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = args.run or _small_run(root)
        recipe = validate_recipe(read_recipe_file(run_dir / RECIPE_FILE))
        predictor = Predictor.from_run(run_dir)
        rows = load_raw_splits(recipe.dataset, recipe.seed, args.data_dir).frames["test"]
        rows = rows.select(predictor.input_columns)
        rows = pl.concat([rows] * (1000 // rows.height + 1)).head(1000)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        register_run(str(run_dir), "bench_serving", alias="champion", tracking_uri=uri)
        records = rows.to_dicts()

        predictor.predict(rows)
        local_seconds = []
        for _ in range(args.batches):
            start = time.perf_counter()
            local = predictor.predict(rows)
            local_seconds.append(time.perf_counter() - start)
        local_rps = len(records) / statistics.median(local_seconds)

        results: dict[str, dict[str, float]] = {}
        for backend in backends:
            measured, http = _measure(backend, uri, records, args.single, args.batches, args.workers)
            assert np.allclose(http, local, atol=1e-6, rtol=0), f"{backend}: served predictions differ from in-process"
            measured["ratio_http_over_in_process"] = measured["http_rows_per_s_1000_batch"] / local_rps
            results[backend] = measured

    summary: dict[str, Any] = {
        "backends": results, "in_process_rows_per_s_1000_batch": local_rps, "workers": args.workers,
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
    }
    print(f"serving benchmark, {dt.date.today()}, torch {torch.__version__}, {args.workers} server worker(s), "
          f"{args.single} single-row requests, {args.batches} x 1,000-row batches\n")
    print("| measure | " + " | ".join(backends) + " |\n|---|" + "---:|" * len(backends))
    rowsfmt = [("single-row latency p50", "single_row_p50_ms", "{:.1f} ms"),
               ("single-row latency p99", "single_row_p99_ms", "{:.1f} ms"),
               ("HTTP rows/s (1,000-row batches)", "http_rows_per_s_1000_batch", "{:,.0f}"),
               ("ratio HTTP / in-process rows/s", "ratio_http_over_in_process", "{:.3f}")]
    for label, key, fmt in rowsfmt:
        print(f"| {label} | " + " | ".join(fmt.format(results[b][key]) for b in backends) + " |")
    print(f"\nin-process `Predictor.predict` rows/s (1,000-row batches): {local_rps:,.0f}")
    if len(backends) == 2:
        ctr, mlf = results["ctrlab"], results["mlflow"]
        summary["ctrlab_over_mlflow"] = {
            "single_row_p50_speedup": mlf["single_row_p50_ms"] / ctr["single_row_p50_ms"],
            "batch_rows_per_s_ratio": ctr["http_rows_per_s_1000_batch"] / mlf["http_rows_per_s_1000_batch"]}
        print(f"ctrlab vs mlflow: single-row p50 {summary['ctrlab_over_mlflow']['single_row_p50_speedup']:.2f}x "
              f"faster, 1,000-row batches {summary['ctrlab_over_mlflow']['batch_rows_per_s_ratio']:.2f}x the rows/s")
    json.dump(summary, sys.stderr)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()

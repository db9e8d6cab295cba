"""Out-of-core preprocessing at Criteo scale: generate a large Criteo-like parquet file, run the streamed pipeline
on it through the library, and measure rows/s and peak resident memory.

Commands:

* ``generate``: writes ``--rows`` rows (default 50,000,000) of ``label``, 13 numeric columns ``I1..I13`` (integer
  counts with heavy tails and 5-40% missing, as in Criteo) and 26 categorical columns ``C1..C26`` (Zipf-like draws
  from vocabularies of 3 to 1,000,000 values, written as decimal strings, some with missing values) to one parquet
  file, one row group per ``--chunk-rows`` chunk, with numpy seeded per chunk: memory stays at one chunk whatever
  ``--rows`` is, and the same arguments give the same file. The label is drawn from a planted logistic model (main
  effects of the frequent values of six categorical fields, three numeric fields, one interaction between two
  categorical fields), so a model can reach an AUC well above 0.5; ``<out>.json`` records the planted AUC (the AUC
  of the true click probabilities).
* ``prepare``: runs :func:`ctrlab.data.pipeline.prepare_data` with ``recipes/large_synthetic_deepfm.yaml`` (its
  ``dataset.data_dir`` pointed at the generated file's folder) in a child process and prints the rows, the seconds,
  rows/s and the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``; ``/usr/bin/time -v`` gives the same figure as
  "Maximum resident set size"). ``--threads`` caps polars', pyarrow's and torch's threads.
* ``read``: one epoch of the prepared training split through :meth:`StreamedSplit.batches` (the data side of a
  streamed training epoch, without a model), with rows/s and peak RSS; needs the cache entry ``prepare`` wrote.

::

    python benchmarks/out_of_core.py generate --rows 1000000 --out runs/large_synthetic/criteo_like.parquet
    python benchmarks/out_of_core.py prepare --data runs/large_synthetic/criteo_like.parquet --threads 1
    python benchmarks/out_of_core.py read --data runs/large_synthetic/criteo_like.parquet --threads 1
    /usr/bin/time -v python benchmarks/out_of_core.py prepare --data ... --in-process   # the same, measured by time
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "large_synthetic_deepfm.yaml"
NUMERIC = 13
# Criteo-like vocabulary sizes: a few huge id fields, many mid-sized, some tiny.
VOCABULARIES = [1_000_000, 600_000, 300_000, 150_000, 80_000, 40_000, 20_000, 10_000, 5_000, 2_500, 1_200, 600,
                300, 150, 80, 40, 20, 10, 5, 3, 1_000_000, 250_000, 60_000, 15_000, 4_000, 1_000]
ZIPF_EXPONENT = 1.05
# The planted model: which categorical fields carry main effects, which pair interacts, which numerics matter.
INFORMATIVE = (0, 3, 6, 9, 12, 15)
INTERACTING = (1, 7)
NUMERIC_INFORMATIVE = (0, 4, 8)
EFFECT_RANKS = 2_000  # the most frequent values of an informative field get their own weight; the tail shares 0
BASE_LOGIT = -1.6  # about 25% clicks, as in Criteo


# --------------------------------------------------------------------------------------------- generation
class _Generator:
    """Deterministic chunks of the Criteo-like table (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        self.seed = seed
        self.cdfs = []
        for size in VOCABULARIES:
            weights = 1.0 / np.arange(1, size + 1) ** ZIPF_EXPONENT
            self.cdfs.append(np.cumsum(weights) / weights.sum())
        # a scramble per field, so value strings do not reveal frequency ranks
        self.scramble = rng.integers(1, 2**31 - 1, size=(len(VOCABULARIES), 2))
        self.effects = {f: rng.normal(0.0, 0.6, min(EFFECT_RANKS, VOCABULARIES[f])) for f in INFORMATIVE}
        self.pair = rng.normal(0.0, 0.8, (16, 16))
        self.numeric_weights = rng.normal(0.0, 0.4, len(NUMERIC_INFORMATIVE))
        self.missing_categorical = rng.uniform(0.0, 0.15, len(VOCABULARIES)) * (rng.random(len(VOCABULARIES)) < 0.4)
        self.missing_numeric = rng.uniform(0.05, 0.4, NUMERIC)
        self.numeric_scale = rng.uniform(0.5, 2.5, NUMERIC)

    def chunk(self, index: int, rows: int) -> tuple[dict[str, Any], np.ndarray]:
        """Columns of chunk ``index`` (numpy arrays; strings for C*) and the true click probabilities."""
        import polars as pl

        rng = np.random.default_rng([self.seed, 1, index])
        logit = np.full(rows, BASE_LOGIT)
        columns: dict[str, Any] = {}
        ranks = []
        for f, cdf in enumerate(self.cdfs):
            rank = np.minimum(np.searchsorted(cdf, rng.random(rows)), len(cdf) - 1)
            ranks.append(rank)
            if f in self.effects:
                effects = self.effects[f]
                logit += np.where(rank < len(effects), effects[np.minimum(rank, len(effects) - 1)], 0.0)
        a, b = INTERACTING
        logit += self.pair[ranks[a] % 16, ranks[b] % 16]
        for i in range(NUMERIC):
            values = np.floor(rng.lognormal(0.0, self.numeric_scale[i], rows) * (1 + rng.pareto(2.5, rows)))
            if i in NUMERIC_INFORMATIVE:
                standardized = (np.log1p(values) - self.numeric_scale[i]) / (1 + self.numeric_scale[i])
                logit += self.numeric_weights[NUMERIC_INFORMATIVE.index(i)] * standardized
            missing = rng.random(rows) < self.missing_numeric[i]
            columns[f"I{i + 1}"] = pl.Series(f"I{i + 1}", values, dtype=pl.Float64).set(pl.Series(missing), None) \
                .cast(pl.Int64)
        for f, rank in enumerate(ranks):
            multiplier, offset = self.scramble[f]
            code = (rank.astype(np.int64) * multiplier + offset) % (2**31 - 1)
            strings = pl.Series(f"C{f + 1}", code).cast(pl.String)
            if self.missing_categorical[f] > 0:
                strings = strings.set(pl.Series(rng.random(rows) < self.missing_categorical[f]), None)
            columns[f"C{f + 1}"] = strings
        probability = 1.0 / (1.0 + np.exp(-logit))
        label = (rng.random(rows) < probability).astype(np.int8)
        return {"label": label, **columns}, probability


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    positives = labels.astype(bool)
    n_pos = positives.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def generate(args: argparse.Namespace) -> None:
    import polars as pl
    import pyarrow.parquet as pq

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = _Generator(args.seed)
    started = time.perf_counter()
    tmp = out.with_name(f".{out.name}.partial")
    writer: pq.ParquetWriter | None = None
    written, clicks, sample_labels, sample_scores = 0, 0, [], []
    try:
        for index, start in enumerate(range(0, args.rows, args.chunk_rows)):
            rows = min(args.chunk_rows, args.rows - start)
            columns, probability = generator.chunk(index, rows)
            table = pl.DataFrame(columns).to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=rows)
            written += rows
            clicks += int(columns["label"].sum())
            if index < 8:  # the planted AUC from the first chunks (about 2M rows): plenty for three decimals
                sample_labels.append(columns["label"])
                sample_scores.append(probability)
            if index % 20 == 0:
                rate = written / (time.perf_counter() - started)
                print(f"generate: {written:,} rows ({rate:,.0f} rows/s)", file=sys.stderr, flush=True)
        assert writer is not None
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    planted = _auc(np.concatenate(sample_labels), np.concatenate(sample_scores))
    info = {"rows": written, "click_rate": clicks / written, "planted_auc": planted, "seed": args.seed,
            "chunk_rows": args.chunk_rows, "seconds": seconds, "bytes": out.stat().st_size,
            "peak_rss_bytes": _self_peak_rss()}
    Path(f"{out}.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(info))


# ---------------------------------------------------------------------------------------- measurement
def _self_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _limit_threads(threads: int | None) -> None:
    """Before polars, pyarrow and torch are imported (they read these once)."""
    if threads:
        for name in ("POLARS_MAX_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(threads)


def _recipe(data: Path, cache_dir: Path | None) -> Any:
    from ctrlab.config.loader import load_recipe

    overrides = [f"dataset.path={data.name}", f"dataset.data_dir={data.parent.resolve()}"]
    if cache_dir is not None:
        overrides.append(f"dataset.cache_dir={cache_dir}")
    return load_recipe(RECIPE, overrides)


def _prepare_here(args: argparse.Namespace) -> dict[str, Any]:
    _limit_threads(args.threads)
    if args.threads:
        import pyarrow as pa

        pa.set_cpu_count(args.threads)
        pa.set_io_thread_count(max(args.threads, 2))
    from rich.console import Console

    from ctrlab.data.pipeline import prepare_data

    recipe = _recipe(Path(args.data), Path(args.cache_dir) if args.cache_dir else None)
    started = time.perf_counter()
    data = prepare_data(recipe.dataset, recipe.features, recipe.seed, console=Console(stderr=True))
    seconds = time.perf_counter() - started
    rows = data.rows()
    total = sum(rows.values())
    return {"command": "prepare", "rows": rows, "seconds": round(seconds, 1), "rows_per_s": round(total / seconds),
            "cache_hit": data.cache_hit, "streamed": data.streamed,
            "vocabulary_rows": sum(f.vocab_size for f in data.processor.layout.categorical),
            "entry": str(data.streams["train"].path.parent) if data.streams else None,
            "peak_rss_bytes": _self_peak_rss()}


def _read_here(args: argparse.Namespace) -> dict[str, Any]:
    _limit_threads(args.threads)
    from rich.console import Console

    from ctrlab.data.pipeline import prepare_data

    recipe = _recipe(Path(args.data), Path(args.cache_dir) if args.cache_dir else None)
    data = prepare_data(recipe.dataset, recipe.features, recipe.seed, console=Console(stderr=True))
    if not data.cache_hit or data.streams is None:
        raise SystemExit("read: run prepare first (the streamed cache entry is missing)")
    split = data.streams["train"]
    started = time.perf_counter()
    rows = batches = 0
    for batch in split.batches(0, args.batch_size):
        rows += len(batch)
        batches += 1
    seconds = time.perf_counter() - started
    return {"command": "read", "rows": rows, "batches": batches, "seconds": round(seconds, 1),
            "rows_per_s": round(rows / seconds), "shuffle_buffer_rows": split.shuffle_buffer_rows,
            "peak_rss_bytes": _self_peak_rss()}


def _in_child(args: argparse.Namespace, command: str) -> None:
    """Run ``command`` in a child process and report its peak RSS from ``getrusage(RUSAGE_CHILDREN)``."""
    argv = [sys.executable, __file__, command, "--data", args.data, "--in-process", "--json-only"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    if command == "read":
        argv += ["--batch-size", str(args.batch_size)]
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result["wall_seconds"] = round(wall, 1)
    _report(result)


def _report(result: dict[str, Any]) -> None:
    peak = result.get("child_peak_rss_bytes", result["peak_rss_bytes"])
    rows = result["rows"] if isinstance(result["rows"], int) else sum(result["rows"].values())
    print(f"{result['command']}: {rows:,} rows in {result['seconds']}s = {result['rows_per_s']:,} rows/s; "
          f"peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write the Criteo-like parquet file")
    gen.add_argument("--rows", type=int, default=50_000_000)
    gen.add_argument("--out", default=str(REPO / "runs" / "large_synthetic" / "criteo_like.parquet"))
    gen.add_argument("--chunk-rows", type=int, default=262_144)
    gen.add_argument("--seed", type=int, default=2021)
    for name in ("prepare", "read"):
        sub = commands.add_parser(name, help=f"{name} through the library, in a child process")
        sub.add_argument("--data", default=str(REPO / "runs" / "large_synthetic" / "criteo_like.parquet"))
        sub.add_argument("--cache-dir", default=None, help="dataset.cache_dir (default: the recipe's)")
        sub.add_argument("--threads", type=int, default=None, help="polars/pyarrow/BLAS threads")
        sub.add_argument("--in-process", action="store_true", help="run here (for /usr/bin/time -v)")
        sub.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
        if name == "read":
            sub.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(args)
        return
    if not args.in_process:
        _in_child(args, args.command)
        return
    result = _prepare_here(args) if args.command == "prepare" else _read_here(args)
    if args.json_only:
        print(json.dumps(result))
    else:
        _report(result)


if __name__ == "__main__":
    main()

"""Feature ranking: `ctrlab rank` against the `outrank` package from PyPI, and DeepFM AUC against top-k.

Parts (``--parts``):

* ``synthetic``: for each ``--rows`` (default 1M and 10M) the planted ranking suite (12 categorical fields with
  vocabularies 5 .. 100,000, 4 numeric; main effects on 4 categorical and 2 numeric fields, 2 interactions among
  them, 2 noisy relabelled copies R1, R2 of informative fields, the rest noise) is written once as parquet (for
  ctrlab) and as ``data.csv`` (for outrank). Each tool runs in its own process, timed end to end (start-up and
  reading included) with its peak resident memory. Printed: rows/s, peak memory, precision@k of the informative
  fields (k = their number; the copies, as informative as their sources, are left out of this count) and for the
  redundancy-aware rankings whether each copy sits below its source.
* ``criteo``: the same two tools on the Criteo sample's training split (no ground truth: the top-10 overlap).
* ``auc``: DeepFM trained on the top-k features of ctrlab's 3MR ranking (ranked on the training split) for several
  k, on the synthetic suite (``--auc-rows``) and on the Criteo sample (3 seeds each; that sample is 10,000 rows).

outrank runs from its own virtualenv (``--outrank-venv``, created with ``pip install outrank`` when missing); when it
cannot be installed its columns say so. It runs with its cardinality-corrected heuristic (MI-numba-randomized) on
every row (``--subsampling 1``) and ``--outrank-threads`` threads, after one untimed warm-up run that compiles its
numba kernels; ctrlab with ``--heuristic normalized_mi`` (the same
score family) and with its default ``3mr``. Results go to ``benchmarks/results/ranking/`` as JSON; ``--report``
prints the tables from them.

    python benchmarks/ranking.py                       # everything (about an hour on 2 cores)
    python benchmarks/ranking.py --parts synthetic --rows 1000000
    python benchmarks/ranking.py --report
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ranking"
SUITE = {"categorical_fields": 12, "numeric_fields": 4, "informative_fields": 4, "numeric_informative": 2,
         "interaction_pairs": 2, "interactions_among": "main_effects", "redundant_fields": 2}
SEED = 3
PYTHON = sys.executable
# Runs COMMAND and prints its wall time and the peak RSS of its process tree (RUSAGE_CHILDREN after it ends).
_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "wall = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print(json.dumps({'rc': code.returncode, 'seconds': wall, 'peak_mib': peak, 'stderr': code.stderr[-2000:]}))\n"
)


def measure(command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall seconds, peak MiB and exit code of ``command`` in a fresh process (``rc`` 124 on timeout)."""
    try:
        done = subprocess.run([PYTHON, "-c", _MEASURE, *command], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"rc": 124, "seconds": timeout, "peak_mib": None, "stderr": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0 or not done.stdout.strip():
        return {"rc": done.returncode or 1, "seconds": None, "peak_mib": None, "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ data
def suite_data(rows: int, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The planted suite with ``rows`` rows as parquet and as outrank's ``<dir>/data.csv``, plus its ground truth."""
    from ctrlab.datasets.synthetic import SyntheticConfig, generate

    folder = work / f"synthetic_{rows}"
    parquet, csv_dir, truth_file = folder / "data.parquet", folder / "csv", folder / "truth.json"
    if not truth_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        data = generate(SyntheticConfig(rows=rows, **SUITE), SEED)
        frame = data.frame.drop("ts")
        frame.write_parquet(parquet)
        csv_dir.mkdir(exist_ok=True)
        frame.write_csv(csv_dir / "data.csv")
        truth = {"informative": data.informative, "redundant": data.redundant, "noise": data.noise,
                 "interactions": data.interactions}
        truth_file.write_text(json.dumps(truth))
    return parquet, csv_dir, json.loads(truth_file.read_text())


def precision(order: list[str], truth: dict[str, Any], skip_copies: bool) -> float:
    informative = set(truth["informative"])
    ranked = [f for f in order if not (skip_copies and f in truth["redundant"])]
    return len(set(ranked[: len(informative)]) & informative) / len(informative)


def copies_below_sources(order: list[str], truth: dict[str, Any]) -> bool:
    return all(order.index(copy) > order.index(source) for copy, source in truth["redundant"].items())


# --------------------------------------------------------------------------------------------- the tools
def run_ctrlab(data: Path, out: Path, heuristic: str, timeout: float, extra: list[str] = ()) -> dict[str, Any]:
    command = [str(Path(PYTHON).parent / "ctrlab"), "rank", str(data), "--heuristic", heuristic, "--no-track",
               "--output", str(out), *extra]
    result = measure(command, timeout)
    if result["rc"] == 0:
        with open(out / "ranking.csv", newline="") as handle:
            result["order"] = [row["feature"] for row in sorted(csv.DictReader(handle), key=lambda r: int(r["rank"]))]
    return result


def outrank_python(venv: Path) -> Path | None:
    """outrank's interpreter, installing the package into ``venv`` first when needed; None if that fails."""
    python = venv / "bin" / "python"
    probe = "import outrank, pandas, xxhash; assert pandas.__version__ < '3' and xxhash.VERSION < '4'"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"installing outrank into {venv} ...", flush=True)
    if subprocess.run([PYTHON, "-m", "venv", str(venv)]).returncode != 0:
        return None
    # outrank 0.97.5 (2024) predates pandas 3 (string dtype) and xxhash 4 (no str input): both break its ranking.
    done = subprocess.run([python, "-m", "pip", "install", "-q", "outrank", "pandas<3", "xxhash<4"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"outrank could not be installed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return python


def run_outrank(python: Path, csv_dir: Path, out: Path, threads: int, timeout: float, label: str = "label",
                heuristic: str = "MI-numba-randomized") -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    command = [str(python), "-m", "outrank", "--task", "ranking", "--data_path", str(csv_dir), "--data_source",
               "csv-raw", "--heuristic", heuristic, "--subsampling", "1", "--num_threads", str(threads),
               "--output_folder", str(out), "--label_column", label, "--target_ranking_only", "True",
               "--include_cardinality_in_feature_names", "False", "--disable_tqdm", "True", "--tldr", "False"]
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads)}
    result = measure(command, timeout, env)
    ranks = out / "pairwise_ranks.tsv"
    if result["rc"] == 0 and ranks.exists():
        scores: dict[str, float] = {}
        with open(ranks, newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                pair = {row["FeatureA"], row["FeatureB"]}
                if label in pair and len(pair) == 2:
                    scores[(pair - {label}).pop()] = float(row["Score"])
        result["order"] = sorted(scores, key=lambda f: (-scores[f], f))
    elif result["rc"] == 0:
        result["rc"] = 1
        result["stderr"] = f"no pairwise_ranks.tsv in {out}"
    return result


# ------------------------------------------------------------------------------------------------ parts
def part_synthetic(args: argparse.Namespace, outrank: Path | None) -> None:
    if outrank is not None:
        # outrank compiles its numba kernels on first use (cached on disk): compile them before anything is timed
        _, warm_csv, _ = suite_data(20_000, args.work)
        run_outrank(outrank, warm_csv, args.work / "outrank_warmup", args.outrank_threads, args.timeout)
    for rows in args.rows:
        parquet, csv_dir, truth = suite_data(rows, args.work)
        record: dict[str, Any] = {"part": "synthetic", "rows": rows, "date": dt.date.today().isoformat(),
                                  "truth": truth, "tools": {}}
        heuristics = ["normalized_mi", "3mr"] + (["mi"] if rows <= 1_000_000 else [])
        for heuristic in heuristics:
            result = run_ctrlab(parquet, args.work / f"ctrlab_{rows}_{heuristic}", heuristic, args.timeout)
            record["tools"][f"ctrlab {heuristic}"] = _summarise(result, rows, truth, heuristic == "3mr")
            _print_row(rows, f"ctrlab {heuristic}", record["tools"][f"ctrlab {heuristic}"])
        # the very file outrank reads, so that parsing text is timed on both sides
        result = run_ctrlab(csv_dir / "data.csv", args.work / f"ctrlab_{rows}_csv", "normalized_mi", args.timeout)
        record["tools"]["ctrlab normalized_mi, csv"] = _summarise(result, rows, truth, False)
        _print_row(rows, "ctrlab normalized_mi, csv", record["tools"]["ctrlab normalized_mi, csv"])
        if args.skip_outrank:
            _save(f"synthetic_{rows}", record, keep_tools=True)
            continue
        if outrank is not None:
            result = run_outrank(outrank, csv_dir, args.work / f"outrank_{rows}", args.outrank_threads, args.timeout)
            record["tools"]["outrank MI-numba-randomized"] = _summarise(result, rows, truth, False)
            _print_row(rows, "outrank MI-numba-randomized", record["tools"]["outrank MI-numba-randomized"])
        else:
            record["tools"]["outrank MI-numba-randomized"] = {"error": "outrank could not be installed"}
        _save(f"synthetic_{rows}", record)


def _summarise(result: dict[str, Any], rows: int, truth: dict[str, Any], redundancy_aware: bool) -> dict[str, Any]:
    if result.get("rc") != 0 or "order" not in result:
        return {"error": (result.get("stderr") or "failed").strip().splitlines()[-1:], "seconds": result["seconds"]}
    order = result["order"]
    summary = {"seconds": round(result["seconds"], 2), "rows_per_second": round(rows / result["seconds"]),
               "peak_mib": round(result["peak_mib"]), "precision_at_k": precision(order, truth, True),
               "precision_at_k_with_copies": precision(order, truth, False), "order": order}
    summary["copies_below_sources"] = copies_below_sources(order, truth)
    summary["redundancy_aware"] = redundancy_aware
    return summary


def _print_row(rows: int, tool: str, s: dict[str, Any]) -> None:
    if "error" in s:
        print(f"{rows:>11,} {tool:<30} error: {s['error']}", flush=True)
        return
    print(f"{rows:>11,} {tool:<30} {s['seconds']:>8.1f} s {s['rows_per_second']:>11,} rows/s "
          f"{s['peak_mib']:>7,} MiB  precision@k {s['precision_at_k']:.2f}  copies below sources "
          f"{s['copies_below_sources']}", flush=True)


def part_criteo(args: argparse.Namespace, outrank: Path | None) -> None:
    from ctrlab.config.loader import load_recipe
    from ctrlab.data.pipeline import load_raw_splits

    recipe = load_recipe(REPO / "recipes" / "criteo_sample_deepfm.yaml")
    raw = load_raw_splits(recipe.dataset, recipe.seed, args.data_dir)
    folder = args.work / "criteo"
    (folder / "csv").mkdir(parents=True, exist_ok=True)
    # A scratch copy of the training split under runs/ (ignored by git, deleted below): outrank reads only files.
    train = raw.frames["train"]
    train.write_parquet(folder / "train.parquet")
    train.write_csv(folder / "csv" / "data.csv")
    record: dict[str, Any] = {"part": "criteo", "rows": train.height, "date": dt.date.today().isoformat(), "tools": {}}
    try:
        for heuristic in ("normalized_mi", "3mr"):
            result = run_ctrlab(folder / "train.parquet", folder / f"ctrlab_{heuristic}", heuristic, args.timeout,
                                ["--target", raw.label])
            record["tools"][f"ctrlab {heuristic}"] = {k: v for k, v in result.items() if k != "stderr"}
        if outrank is not None:
            result = run_outrank(outrank, folder / "csv", folder / "outrank", args.outrank_threads, args.timeout,
                                 label=raw.label)
            record["tools"]["outrank MI-numba-randomized"] = {k: v for k, v in result.items() if k != "stderr"}
    finally:
        shutil.rmtree(folder / "csv", ignore_errors=True)
        (folder / "train.parquet").unlink(missing_ok=True)
    for tool, result in record["tools"].items():
        print(f"criteo sample {train.height:,} rows  {tool:<30} {result.get('seconds') or float('nan'):8.2f} s  "
              f"top 10: {result.get('order', [])[:10]}", flush=True)
    _save("criteo", record)


def part_auc(args: argparse.Namespace) -> None:
    for dataset in args.auc_datasets:
        base = _auc_recipe(dataset, args)
        recipe_path = args.work / f"auc_{dataset}.yaml"
        recipe_path.write_text(yaml.safe_dump(base, sort_keys=False))
        ranking_dir = args.work / f"auc_{dataset}_ranking"
        subprocess.run([str(Path(PYTHON).parent / "ctrlab"), "rank", str(recipe_path), "--no-track", "--output",
                        str(ranking_dir), *(["--data-dir", args.data_dir] if args.data_dir else [])], check=True,
                       stdout=subprocess.DEVNULL)
        with open(ranking_dir / "ranking.csv", newline="") as handle:
            order = [r["feature"] for r in sorted(csv.DictReader(handle), key=lambda r: int(r["rank"]))]
        record: dict[str, Any] = {"part": "auc", "dataset": dataset, "date": dt.date.today().isoformat(),
                                  "order": order, "results": {}}
        ks = sorted({k for k in _ks(dataset, len(order)) if k <= len(order)})
        seeds = args.auc_seeds if dataset == "synthetic" else args.criteo_seeds
        for k in ks:
            aucs = []
            for seed in range(2021, 2021 + seeds):
                auc, bayes = _train_top_k(recipe_path, ranking_dir / "ranking.csv", k, seed, args)
                aucs.append(auc)
                if bayes is not None:
                    record["bayes_optimal_auc"] = bayes
            record["results"][str(k)] = aucs
            print(f"{dataset:<10} top {k:>2} of {len(order)}: test AUC {statistics.mean(aucs):.4f} "
                  f"(seeds {', '.join(f'{a:.4f}' for a in aucs)})", flush=True)
            _save(f"auc_{dataset}", record)


def _ks(dataset: str, total: int) -> list[int]:
    return [1, 2, 4, 6, 8, 10, 12, total] if dataset == "synthetic" else [2, 4, 8, 12, 16, 24, 32, total]


def _auc_recipe(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    if dataset == "criteo":
        raw = yaml.safe_load((REPO / "recipes" / "criteo_sample_deepfm.yaml").read_text())
        raw.pop("output_dir", None)
        raw["tracking"] = {"enabled": False}
        return raw
    raw = yaml.safe_load((REPO / "recipes" / "ranking_synthetic_deepfm.yaml").read_text())
    raw["dataset"]["synthetic"]["rows"] = args.auc_rows
    raw["features"].pop("select", None)
    raw["tracking"] = {"enabled": False}
    raw.pop("sweep", None)
    return raw


def _train_top_k(recipe_path: Path, ranking: Path, k: int, seed: int,
                 args: argparse.Namespace) -> tuple[float, float | None]:
    out = args.work / "auc_runs" / f"{recipe_path.stem}_k{k}_s{seed}"
    command = [str(Path(PYTHON).parent / "ctrlab"), "train", str(recipe_path), f"features.select.ranking={ranking}",
               f"features.select.top_k={k}", f"seed={seed}", f"output_dir={out}",
               *(["--data-dir", args.data_dir] if args.data_dir else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training top {k} failed: {done.stderr.strip().splitlines()[-1:]}")
    printed = json.loads(done.stdout)
    return float(printed["test"]["auc"]), printed.get("bayes_optimal_test_auc")


# ----------------------------------------------------------------------------------------------- report
def _save(name: str, record: dict[str, Any], keep_tools: bool = False) -> None:
    """Write a part's record; ``keep_tools`` keeps the saved results of tools this run did not measure."""
    from ctrlab.utils.io import write_json_atomic

    path = RESULTS / f"{name}.json"
    if keep_tools and path.exists():
        record["tools"] = {**json.loads(path.read_text()).get("tools", {}), **record["tools"]}
    record["threads"] = os.environ.get("OMP_NUM_THREADS")
    write_json_atomic(path, record)


def report() -> None:
    print("\n| rows | tool | wall s | rows/s | peak MiB | precision@k | copies below sources |")
    print("|---:|---|---:|---:|---:|---:|---|")
    synthetic = sorted(RESULTS.glob("synthetic_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    for path in synthetic:
        record = json.loads(path.read_text())
        for tool, s in record["tools"].items():
            if "error" in s:
                print(f"| {record['rows']:,} | {tool} | {s.get('seconds') or '—'} | — | — | — | {s['error']} |")
                continue
            below = "yes" if s["copies_below_sources"] else "no"
            print(f"| {record['rows']:,} | {tool} | {s['seconds']:.1f} | {s['rows_per_second']:,} | "
                  f"{s['peak_mib']:,} | {s['precision_at_k']:.2f} | {below} |")
    for path in synthetic:
        record = json.loads(path.read_text())
        tools = record["tools"]
        theirs = tools.get("outrank MI-numba-randomized", {})
        if not theirs.get("seconds"):
            continue
        finished = "error" not in theirs
        for tool in ("ctrlab normalized_mi", "ctrlab normalized_mi, csv", "ctrlab 3mr"):
            if tools.get(tool, {}).get("seconds"):
                ratio = theirs["seconds"] / tools[tool]["seconds"]
                print(f"{record['rows']:,} rows: outrank / {tool} wall time {'=' if finished else '>'} {ratio:.1f}x"
                      + ("" if finished else f" (outrank stopped after {theirs['seconds']:.0f} s)"))
    criteo = RESULTS / "criteo.json"
    if criteo.exists():
        record = json.loads(criteo.read_text())
        print(f"\nCriteo sample, training split ({record['rows']:,} rows):")
        orders = {tool: r.get("order", []) for tool, r in record["tools"].items()}
        for tool, r in record["tools"].items():
            print(f"  {tool:<30} {r.get('seconds') or float('nan'):7.2f} s  top 10 {orders[tool][:10]}")
        if "outrank MI-numba-randomized" in orders:
            ours = set(orders["ctrlab normalized_mi"][:10])
            print(f"  top-10 overlap ctrlab normalized_mi / outrank: "
                  f"{len(ours & set(orders['outrank MI-numba-randomized'][:10]))} of 10")
    for path in sorted(RESULTS.glob("auc_*.json")):
        record = json.loads(path.read_text())
        bayes = f"; Bayes-optimal test AUC {record['bayes_optimal_auc']:.4f}" if "bayes_optimal_auc" in record else ""
        print(f"\nDeepFM on the top-k features of the 3MR ranking, {record['dataset']} (test AUC, mean of seeds"
              f"{bayes}):")
        print("| k | features | test AUC | spread |")
        print("|---:|---|---:|---:|")
        for k, aucs in sorted(record["results"].items(), key=lambda kv: int(kv[0])):
            spread = f"±{(max(aucs) - min(aucs)) / 2:.4f}" if len(aucs) > 1 else "—"
            names = ", ".join(record["order"][: int(k)]) if int(k) <= 8 else f"top {k}"
            print(f"| {k} | {names} | {statistics.mean(aucs):.4f} | {spread} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["synthetic", "criteo", "auc"],
                        choices=["synthetic", "criteo", "auc"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--auc-rows", type=int, default=500_000)
    parser.add_argument("--auc-datasets", nargs="+", default=["synthetic", "criteo"], choices=["synthetic", "criteo"])
    parser.add_argument("--auc-seeds", type=int, default=1)
    parser.add_argument("--criteo-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads for ctrlab (polars, torch)")
    parser.add_argument("--outrank-threads", type=int, default=2)
    parser.add_argument("--outrank-venv", type=Path, default=REPO / "runs" / "bench_ranking" / "outrank-venv")
    parser.add_argument("--skip-outrank", action="store_true",
                        help="run only ctrlab, keeping saved outrank results")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_ranking")
    parser.add_argument("--data-dir", default=os.environ.get("CTRLAB_DATA_DIR"))
    parser.add_argument("--report", action="store_true", help="only print the tables from saved results")
    args = parser.parse_args()
    if args.report:
        report()
        return
    for name in ("OMP_NUM_THREADS", "POLARS_MAX_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    outrank = None
    if not args.skip_outrank and {"synthetic", "criteo"} & set(args.parts):
        outrank = outrank_python(args.outrank_venv)
    started = time.perf_counter()
    if "synthetic" in args.parts:
        part_synthetic(args, outrank)
    if "criteo" in args.parts:
        part_criteo(args, outrank)
    if "auc" in args.parts:
        part_auc(args)
    print(f"done in {time.perf_counter() - started:.0f} s")
    report()


if __name__ == "__main__":
    main()

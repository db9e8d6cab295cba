"""Every interaction block on Frappe x1, on the synthetic generator and (DIN) on ML-1M behaviour sequences: test AUC
/ logloss / gAUC (mean and spread over seeds) next to a reference, plus each block's training throughput.

Suites (``--suites``):

* ``frappe``: each block trains with its own recipe ``recipes/frappe_<block>.yaml`` (the BARS protocol: embedding
  10, batch 4096, Adam 1e-3, lr x0.1 on a plateau, early stopping with patience 2 on validation AUC); reference =
  the BARS frappe_x1 test AUC of that model (FGCNN, absent there, is held to DeepFM's).
* ``synthetic``: the same model, embedding and training sections (but the quickstart's optimizer and embedding
  L2) on the built-in generator (the quickstart's planted fields and interactions, ``--synthetic-rows`` rows);
  reference = the Bayes-optimal test AUC (the generator knows every row's true click probability).
* ``ml1m``: ``recipes/ml1m_din.yaml`` against ``recipes/ml1m_history_pooling.yaml`` (same embedding and MLP, the
  history mean-pooled instead of attention-pooled); reported by test gAUC (grouped by user), reference = the
  pooling baseline's mean gAUC. ``din_mean`` is DIN with ``model.attention_reduce: mean`` (the weighted sum
  divided by the history's length; not in the paper).

Throughput (``--throughput``) is timed apart from the training runs, on a quiet machine: ``--throughput-steps``
training steps of 4096 Frappe rows per block after a warm-up step (forward, backward, optimizer), so runs done in
parallel (``--threads 1`` in two shells) do not distort it.

Each (suite, block) result is written to ``--results`` as JSON after every seed, keeping the seeds saved earlier with
the same settings (a digest of the run's recipe without seed and paths), and the table is printed from every result
found there, so suites and even the seeds of one slow block can run in separate processes and be reported together:

    python benchmarks/blocks.py                                   # everything, 3 seeds (hours on 2 CPU cores)
    python benchmarks/blocks.py --suites frappe --blocks deepfm dcnv2 --seeds 1
    python benchmarks/blocks.py --suites frappe --blocks autoint --seeds 1 --seed-start 2022   # one more seed
    python benchmarks/blocks.py --report                          # only print the table from saved results
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.pipeline import prepare_data
from ctrlab.models import build_model
from ctrlab.train.run import seed_everything, train_recipe
from ctrlab.train.trainer import Trainer
from ctrlab.utils.io import write_json_atomic
from ctrlab.utils.signals import run_terminable

REPO = Path(__file__).resolve().parents[1]
# BARS frappe_x1 test AUC of each model (FGCNN has no x1 figure there: held to DeepFM's).
BARS_FRAPPE_X1 = {"fm": 0.9671, "deepfm": 0.9842, "dcnv2": 0.9845, "autoint": 0.9831, "autoint_plus": 0.9848,
                  "fgcnn": 0.9842}
FRAPPE_BLOCKS = ["fm", "deepfm", "dcnv2", "autoint", "autoint_plus", "fgcnn"]
SEQUENCE_BLOCKS = ["history_pooling", "din", "din_mean"]
# Benchmark rows that are a recipe plus overrides: name -> (recipe block, override of the recipe's model section).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"din_mean": ("din", {"attention_reduce": "mean"})}
SUITES = ("frappe", "synthetic", "ml1m")
TARGET_GAP = 0.002


def _recipe_file(suite: str, block: str) -> Path:
    block = VARIANTS.get(block, (block, {}))[0]
    return REPO / "recipes" / (f"ml1m_{block}.yaml" if suite == "ml1m" else f"frappe_{block}.yaml")


def _recipe(suite: str, block: str, seed: int, out: Path, synthetic_rows: int) -> dict[str, Any]:
    model_recipe = read_recipe_file(_recipe_file(suite, block))
    if suite == "synthetic":
        data = read_recipe_file(REPO / "recipes" / "quickstart.yaml")
        data["dataset"]["synthetic"]["rows"] = synthetic_rows
        data.update({k: model_recipe[k] for k in ("model", "embedding") if k in model_recipe})
        # BARS tunes the embedding L2 per dataset: Frappe's strong one would wash out the generator's rare values.
        data["train"] = {**model_recipe.get("train", {}), "optimizer": data["train"]["optimizer"],
                         "metrics": ["auc", "logloss"]}
    else:
        data = model_recipe
    data["model"] = {**data["model"], **VARIANTS.get(block, ("", {}))[1]}
    data.update({"name": f"{suite}_{block}_s{seed}", "seed": seed, "output_dir": str(out / f"{suite}_{block}_s{seed}")})
    data.setdefault("train", {})["progress"] = False
    data["tracking"] = {"enabled": False}
    return data


def _settings_key(recipe: dict[str, Any]) -> str:
    """A digest of what decides a run's result except its seed and paths: runs with equal keys can be averaged.

    It digests the recipe file as written, not the validated recipe with its defaults filled in (so saved keys stay
    valid when the schema gains a field): a recipe must spell out a setting whose code default changed, as
    recipes/frappe_fgcnn.yaml does with ``generation_batch_norm``."""
    kept = {k: v for k, v in recipe.items() if k not in ("name", "seed", "output_dir")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_record(seed: int, result: Any, settings: Any, started: float) -> dict[str, Any]:
    """One seed's row as the results file keeps it (``result``: a :class:`~ctrlab.train.run.RunResult`;
    ``started``: its ``time.perf_counter()`` at the start)."""
    test = result.metrics["test"]
    return {"seed": seed, "auc": test["auc"], "logloss": test["logloss"], "gauc": test.get("gauc"),
            "bayes_optimal_auc": result.metrics.get("bayes_optimal_test_auc"),
            "epochs": len(result.fit.history), "best_epoch": result.fit.best_epoch,
            "seconds": round(time.perf_counter() - started, 1), "settings": settings,
            "train_seconds": round(sum(r.seconds for r in result.fit.history), 1),
            "date": str(dt.date.today()), "threads": torch.get_num_threads()}


def _saved_runs(result_file: Path, settings: str) -> list[dict]:
    """The runs already saved for this (suite, block) with the same settings (other seeds are kept on re-runs)."""
    if not result_file.exists():
        return []
    return [r for r in json.loads(result_file.read_text())["runs"] if r.get("settings") == settings]


def train_suite(suite: str, block: str, seeds: list[int], args: argparse.Namespace, console: Console) -> None:
    """Train ``block`` on ``suite`` once per seed, saving the result file after every seed: runs of earlier
    invocations with the same settings but other seeds stay in it, so the seeds of a slow block can be trained in
    separate processes or sessions (``--seed-start``) and averaged together."""
    result_file = args.results / f"{suite}_{block}.json"
    for seed in seeds:
        raw = _recipe(suite, block, seed, args.out, args.synthetic_rows)
        settings = _settings_key(raw)
        # After the settings key (resuming does not change the result): a seed killed part-way, e.g. by a
        # session's end, continues from its last finished epoch when the same command runs again.
        raw["train"]["resume"] = True
        recipe = validate_recipe(raw)
        started = time.perf_counter()
        result = train_recipe(recipe, data_dir=args.data_dir, console=Console(quiet=True))
        run = run_record(seed, result, settings, started)
        test = result.metrics["test"]
        runs = sorted([r for r in _saved_runs(result_file, settings) if r["seed"] != seed] + [run],
                      key=lambda r: r["seed"])
        write_json_atomic(result_file, {"suite": suite, "block": block, "runs": runs, "torch": torch.__version__})
        gauc = "" if test.get("gauc") is None else f" gauc {test['gauc']:.5f}"
        console.print(f"{suite} {block} seed {seed}: test auc {test['auc']:.5f} logloss {test['logloss']:.5f}{gauc} "
                      f"({run['epochs']} epochs, {run['seconds']:.0f} s; {len(runs)} seed(s) saved)")


def measure_throughput(block: str, steps: int, data_dir: str | None) -> float:
    """Training samples/s of the Frappe recipe's model: ``steps`` timed steps of 4096 rows after one warm-up."""
    recipe = validate_recipe({**read_recipe_file(_recipe_file("frappe", block)), "tracking": {"enabled": False}})
    data = prepare_data(recipe.dataset, recipe.features, recipe.seed, data_dir, Console(quiet=True))
    seed_everything(recipe.seed)
    model = build_model(recipe.embedding, recipe.model, data.processor.layout)
    trainer = Trainer(model, recipe.train, torch.device("cpu"), seed=recipe.seed, console=Console(quiet=True))
    batch = recipe.train.batch_size
    train = FeatureBatch.from_encoded(data.splits["train"])
    trainer.train_epoch(train.select(slice(0, batch)))
    rows = train.select(slice(batch, batch * (steps + 1)))
    started = time.perf_counter()
    trainer.train_epoch(rows)
    return len(rows) / (time.perf_counter() - started)


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), max(values) - min(values)


def report(results_dir: Path) -> str:
    """The markdown table of every saved result (frappe, synthetic, then ml1m), with throughput where measured."""
    found = {(r["suite"], r["block"]): r for r in
             (json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if p.name != "throughput.json")}
    speed_file = results_dir / "throughput.json"
    speeds = json.loads(speed_file.read_text()) if speed_file.exists() else {}
    lines = ["| suite | block | seeds | test AUC (mean) | spread | test logloss | reference | gap | within 0.002 "
             "| epochs | train samples/s |", "|---|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|"]
    pooling = found.get(("ml1m", "history_pooling"))
    for suite in SUITES:
        order = SEQUENCE_BLOCKS if suite == "ml1m" else FRAPPE_BLOCKS
        for block in [b for b in order if (suite, b) in found]:
            runs = found[(suite, block)]["runs"]
            auc, spread = _stats([r["auc"] for r in runs])
            logloss = statistics.mean(r["logloss"] for r in runs)
            epochs = "/".join(str(r["epochs"]) for r in runs)
            speed = speeds.get(block, {}).get("samples_per_second") if suite == "frappe" else None
            speed_text = "–" if speed is None else f"{speed:,.0f}"
            if suite == "frappe":
                reference, label = BARS_FRAPPE_X1[block], "BARS"
            elif suite == "synthetic":
                reference, label = statistics.mean(r["bayes_optimal_auc"] for r in runs), "Bayes"
            else:  # DIN against the pooling baseline, by gAUC
                auc, spread = _stats([r["gauc"] for r in runs])
                reference = None if pooling is None else statistics.mean(r["gauc"] for r in pooling["runs"])
                label = "pooling gAUC"
            gap = None if reference is None else auc - reference
            within = "–" if suite != "frappe" else ("yes" if gap is not None and gap >= -TARGET_GAP else "**no**")
            metric = "gAUC " if suite == "ml1m" else ""
            lines.append(f"| {suite} | {block} | {len(runs)} | {metric}{auc:.4f} | {spread:.4f} | {logloss:.4f} | "
                         + ("–" if reference is None else f"{label} {reference:.4f}") + " | "
                         + ("–" if gap is None else f"{gap:+.4f}") + f" | {within} | {epochs} | {speed_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--blocks", nargs="+", help="default: every block of the suite")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-start", type=int, default=2021, help="first seed (e.g. 2022 with --seeds 1)")
    parser.add_argument("--synthetic-rows", type=int, default=300_000)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--throughput", action="store_true", help="time every Frappe block's training step")
    parser.add_argument("--throughput-steps", type=int, default=8)
    parser.add_argument("--report", action="store_true", help="only print the table from saved results")
    parser.add_argument("--data-dir", default=os.environ.get("CTRLAB_DATA_DIR"))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_blocks")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "blocks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.report:
        seeds = list(range(args.seed_start, args.seed_start + args.seeds))
        for suite in args.suites:
            for block in args.blocks or (SEQUENCE_BLOCKS if suite == "ml1m" else FRAPPE_BLOCKS):
                if not _recipe_file(suite, block).exists():
                    console.print(f"skip {suite} {block}: {_recipe_file(suite, block).name} not found")
                    continue
                train_suite(suite, block, seeds, args, console)
    if args.throughput:
        speeds = {}
        for block in args.blocks or FRAPPE_BLOCKS:
            speed = measure_throughput(block, args.throughput_steps, args.data_dir)
            speeds[block] = {"samples_per_second": speed, "threads": torch.get_num_threads(),
                             "steps": args.throughput_steps, "date": str(dt.date.today())}
            console.print(f"throughput {block}: {speed:,.0f} samples/s ({torch.get_num_threads()} threads)")
        speed_file = args.results / "throughput.json"
        old = json.loads(speed_file.read_text()) if speed_file.exists() else {}
        speed_file.write_text(json.dumps({**old, **speeds}, indent=2))
    print(f"blocks benchmark, printed {dt.date.today()}, torch {torch.__version__}; results from {args.results}\n")
    print(report(args.results))
    print(f"\nreference: BARS frappe_x1 test AUC (FGCNN held to DeepFM's); synthetic: Bayes-optimal test AUC; ml1m: "
          f"the mean-pooling baseline's test gAUC (DIN rows show gAUC). Frappe target: gap >= -{TARGET_GAP}. "
          f"Throughput: training samples/s on Frappe, batch 4096, {torch.get_num_threads()} threads.")


if __name__ == "__main__":
    # a killed run leaves its resumable state, not a half-built output directory
    run_terminable(main, "terminated; finished runs are saved and a resumable run continues when started again")

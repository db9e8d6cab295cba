"""Every interaction block on Frappe x1 and on the synthetic generator: test AUC / logloss (mean and spread over
seeds) next to the public BARS frappe_x1 figure or the Bayes-optimal AUC, plus training throughput.

For Frappe each block trains with its own recipe ``recipes/frappe_<block>.yaml`` (the BARS protocol: embedding 10,
batch 4096, Adam 1e-3, lr x0.1 on a plateau, early stopping with patience 2 on validation AUC). For synthetic data
the same model and embedding sections train on the quickstart's data (``recipes/quickstart.yaml``).

    python benchmarks/blocks.py                                  # all blocks, 3 seeds, both datasets (long)
    python benchmarks/blocks.py --blocks deepfm dcnv2 --seeds 1 --datasets frappe
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console

from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.train.run import train_recipe

REPO = Path(__file__).resolve().parents[1]
# BARS frappe_x1 test AUC of each model (FGCNN has no x1 figure there: held to DeepFM's).
BARS_FRAPPE_X1 = {"deepfm": 0.9842, "dcnv2": 0.9845, "autoint": 0.9831, "autoint_plus": 0.9848, "fgcnn": 0.9842,
                  "fm": 0.9671}
DEFAULT_BLOCKS = ["fm", "deepfm", "dcnv2", "autoint", "autoint_plus", "fgcnn"]


def _recipe(block: str, dataset: str, seed: int, out: Path) -> dict:
    frappe = read_recipe_file(REPO / "recipes" / f"frappe_{block}.yaml")
    if dataset == "frappe":
        data = frappe
    else:
        data = read_recipe_file(REPO / "recipes" / "quickstart.yaml")
        data.update({k: frappe[k] for k in ("model", "embedding") if k in frappe})
        data["train"] = {**frappe.get("train", {}), "metrics": ["auc", "logloss"]}
    data.update({"name": f"{dataset}_{block}_s{seed}", "seed": seed, "output_dir": str(out / f"{dataset}_{block}_s{seed}")})
    data.setdefault("train", {})["progress"] = False
    data["tracking"] = {"enabled": False}
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", default=DEFAULT_BLOCKS)
    parser.add_argument("--datasets", nargs="+", default=["frappe", "synthetic"], choices=["frappe", "synthetic"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_blocks")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console(stderr=True)
    rows = []
    for dataset in args.datasets:
        for block in args.blocks:
            if not (REPO / "recipes" / f"frappe_{block}.yaml").exists():
                console.print(f"skip {block}: recipes/frappe_{block}.yaml not found")
                continue
            aucs, losses, speeds, extra = [], [], [], []
            for seed in range(2021, 2021 + args.seeds):
                recipe = validate_recipe(_recipe(block, dataset, seed, args.out))
                result = train_recipe(recipe, data_dir=args.data_dir, console=Console(quiet=True))
                aucs.append(result.metrics["test"]["auc"])
                losses.append(result.metrics["test"]["logloss"])
                speeds.append(statistics.median(r.samples_per_second for r in result.fit.history))
                extra.append(result.metrics.get("bayes_optimal_test_auc"))
                console.print(f"{dataset} {block} seed {seed}: test auc {aucs[-1]:.5f} logloss {losses[-1]:.5f} "
                              f"({len(result.fit.history)} epochs, {speeds[-1]:,.0f} samples/s)")
            reference = BARS_FRAPPE_X1.get(block) if dataset == "frappe" else statistics.mean(extra)
            rows.append({"dataset": dataset, "block": block, "auc": statistics.mean(aucs),
                         "auc_spread": max(aucs) - min(aucs), "logloss": statistics.mean(losses),
                         "reference": reference, "gap": None if reference is None else statistics.mean(aucs) - reference,
                         "samples_per_second": statistics.median(speeds), "seeds": args.seeds})
    print(f"blocks benchmark, {dt.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.seeds} seeds\n")
    print("| dataset | block | test AUC (mean) | spread | test logloss | reference AUC | gap | samples/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = "–" if r["reference"] is None else f"{r['reference']:.4f}"
        gap = "–" if r["gap"] is None else f"{r['gap']:+.4f}"
        print(f"| {r['dataset']} | {r['block']} | {r['auc']:.4f} | {r['auc_spread']:.4f} | {r['logloss']:.4f} | "
              f"{ref} | {gap} | {r['samples_per_second']:,.0f} |")
    print("\nreference: BARS frappe_x1 test AUC (FGCNN held to DeepFM's 0.9842); synthetic: Bayes-optimal test AUC")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

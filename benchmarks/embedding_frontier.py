"""Embedding parameters vs test AUC: full per-field tables, the hashing trick and multiplexed (Unified Embedding)
tables at 1/4 and 1/16 of the parameters, OptEmbed and DNIS, under DeepFM and one attention block, on Frappe x1 and
on a large synthetic set (2M rows, vocabularies of 10^5 to 10^6 values). Prints a table and writes a frontier plot.

Every variant trains the same model, training settings and seed as the dataset's recipe (AutoInt+ at the paper's
default attention size, see ``ATTENTION_SIZE``); only ``embedding`` changes:

* ``full``: ``per_field`` (the reference);
* ``hashed_1/4``, ``hashed_1/16``: ``hashed`` with ``budget`` 0.25 / 0.0625 of the full rows;
* ``multiplexed_1/4``, ``multiplexed_1/16``: ``multiplexed`` with the same parameter budgets, ``dim / 2``-wide
  chunks (two probes per value);
* ``optembed``: supernet + evolutionary search + retrain (``--optembed`` settings below);
* ``dnis``: bi-level search over ``--dnis-blocks`` frequency blocks per table, pruned to ``--dnis-budget`` of the
  full parameters, retrain.

Each run's result is saved to ``--results`` as JSON when it finishes, and the table and plot are made from every saved
result, so the grid can be filled over several invocations (``--only``) and reported with ``--report``:

    python benchmarks/embedding_frontier.py --datasets frappe --blocks deepfm            # one panel
    python benchmarks/embedding_frontier.py --report                                      # table + PNG only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.train.run import train_recipe
from ctrlab.utils.signals import run_terminable

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("frappe", "synthetic_large")
BLOCKS = ("deepfm", "autoint_plus")
VARIANTS = ("full", "hashed_1/4", "hashed_1/16", "multiplexed_1/4", "multiplexed_1/16", "optembed", "dnis")
# AutoInt's default size in the paper (Song et al. 2019, §5.1.4): 3 interacting layers, 2 heads of width 32.
ATTENTION_SIZE: dict[str, dict[str, Any]] = {"autoint_plus": {"layers": 3, "heads": 2, "attention_dim": 64}}
AUC_TOLERANCE = 0.001  # OptEmbed and DNIS: within this of the full table's AUC ...
SAVING_TARGET = 0.5  # ... while storing at least this much fewer embedding parameters (Frappe)

# 2M rows; 12 categorical fields whose vocabularies span 5 to 10^6 values (Zipf-distributed, so the largest fields
# see a few hundred thousand distinct values in 1.6M training rows), 4 bucketised counts; the quickstart's effects.
SYNTHETIC_LARGE: dict[str, Any] = {
    "rows": 2_000_000, "numeric_fields": 4, "categorical_fields": 12,
    "cardinalities": [5, 20, 100, 1_000, 10_000, 100_000, 200_000, 300_000, 500_000, 700_000, 1_000_000, 1_000_000],
    "informative_fields": 6, "interaction_pairs": 3, "zipf_exponent": 1.05,
}


def base_recipe(dataset: str, block: str) -> dict[str, Any]:
    """The dataset's recipe for ``block`` (model, training), before the embedding variant is applied."""
    recipe = read_recipe_file(REPO / "recipes" / f"frappe_{block}.yaml")
    if block in ATTENTION_SIZE:
        # The BARS AutoInt+ (5 layers x 128) trains at ~2k samples/s on 2 CPU cores: 8 variants x 2 datasets would
        # take days. The frontier compares tables, not attention sizes, so it uses the paper's own default size.
        recipe["model"] = {**recipe["model"], **ATTENTION_SIZE[block]}
    if dataset == "synthetic_large":
        quick = read_recipe_file(REPO / "recipes" / "quickstart.yaml")
        recipe["dataset"] = {"synthetic": SYNTHETIC_LARGE, "split": quick["dataset"]["split"]}
        recipe["features"] = {"categorical": [f"C{i}" for i in range(1, 13)],
                              "numeric": [{"name": f"I{i}", "transform": "bucketize", "buckets": 20}
                                          for i in range(1, 5)]}
        # Millions of rows: sparse gradients (SparseAdam) and a light L2, as for the quickstart.
        recipe["embedding"] = {"dim": 16, "sparse": True}
        recipe["train"] = {**recipe["train"], "optimizer": quick["train"]["optimizer"], "metrics": ["auc", "logloss"]}
    return recipe


def embedding_variant(variant: str, base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The ``embedding`` section of a variant, keeping the base's width and gradient kind."""
    common = {k: base[k] for k in ("dim", "init_std", "sparse") if k in base}
    dim = common.get("dim", 16)
    if variant == "full":
        return {"kind": "per_field", **common}
    kind, _, fraction = variant.partition("_")
    if kind in ("hashed", "multiplexed"):
        budget = 1 / int(fraction.split("/")[1])
        extra = {"chunk_dim": dim // 2} if kind == "multiplexed" else {}
        return {"kind": kind, "budget": budget, **extra, **common}
    if kind == "optembed":
        return {"kind": "optembed", **common, "supernet_epochs": args.search_epochs,
                "sparsity_weight": args.optembed_sparsity, "threshold_lr": args.optembed_threshold_lr,
                "generations": args.optembed_generations, "search_rows": args.search_rows,
                "max_parameters": args.optembed_max_parameters}
    if kind == "dnis":
        return {"kind": "dnis", **common, "search_epochs": args.search_epochs, "budget": args.dnis_budget,
                "blocks": args.dnis_blocks, "arch_lr": args.dnis_arch_lr, "significance": args.dnis_significance,
                "budget_order": args.dnis_budget_order}
    raise ValueError(f"unknown variant {variant}")


def run_one(dataset: str, block: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    recipe = base_recipe(dataset, block)
    recipe["embedding"] = embedding_variant(variant, recipe.get("embedding", {}), args)
    tag = f"{dataset}_{block}_{variant.replace('/', 'of')}"
    recipe.update({"name": tag, "seed": args.seed, "output_dir": str(args.out / tag),
                   "tracking": {"enabled": False}})
    # resume: a run killed part-way (a session's end) continues from its last epoch when started again
    recipe["train"] = {**recipe["train"], "progress": False, "resume": True}
    if args.device:
        recipe["train"]["device"] = args.device
    started = time.perf_counter()
    result = train_recipe(validate_recipe(recipe), data_dir=args.data_dir, console=Console(quiet=True))
    metrics = result.metrics
    return {"dataset": dataset, "block": block, "variant": variant, "seed": args.seed,
            "auc": metrics["test"]["auc"], "logloss": metrics["test"]["logloss"],
            "embedding_parameters": metrics["embedding_parameters"], "embedding_bytes": metrics["embedding_bytes"],
            "epochs": len(result.fit.history), "seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(sum(r.seconds for r in result.fit.history), 1),
            "search": metrics.get("embedding_search", {}).get("dims"), "embedding": recipe["embedding"],
            "model": recipe["model"], "date": str(dt.date.today()),
            "device": metrics["device"]}


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]


def report(rows: list[dict[str, Any]]) -> str:
    """Markdown table: per dataset and block, every variant's stored embedding parameters next to its test AUC."""
    lines = ["| dataset | block | variant | embedding parameters | vs full | test AUC | Δ AUC vs full | test logloss "
             "| target |", "|---|---|---|---:|---:|---:|---:|---:|:---:|"]
    for dataset in DATASETS:
        for block in BLOCKS:
            group = {r["variant"]: r for r in rows if r["dataset"] == dataset and r["block"] == block}
            full = group.get("full")
            for variant in [v for v in VARIANTS if v in group]:
                r = group[variant]
                ratio = "–" if full is None else f"{r['embedding_parameters'] / full['embedding_parameters']:.3f}"
                delta = "–" if full is None else f"{r['auc'] - full['auc']:+.4f}"
                target = "–"
                if full is not None and variant in ("optembed", "dnis"):
                    met = (r["auc"] >= full["auc"] - AUC_TOLERANCE
                           and r["embedding_parameters"] <= (1 - SAVING_TARGET) * full["embedding_parameters"])
                    target = "met" if met else "**missed**"
                elif full is not None and variant.startswith("multiplexed"):
                    hashed = group.get(variant.replace("multiplexed", "hashed"))
                    if hashed is not None:
                        target = "beats hashed" if r["auc"] > hashed["auc"] else "**below hashed**"
                lines.append(f"| {dataset} | {block} | {variant} | {r['embedding_parameters']:,} | {ratio} | "
                             f"{r['auc']:.4f} | {delta} | {r['logloss']:.4f} | {target} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per (dataset, block): test AUC against stored embedding parameters (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, b) for d in DATASETS for b in BLOCKS if any(r["dataset"] == d and r["block"] == b for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    markers = {"full": "*", "hashed": "o", "multiplexed": "s", "optembed": "^", "dnis": "D"}
    # one colour per table design in every panel (the default cycle would colour by order of appearance)
    colours = dict(zip(markers, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (dataset, block) in zip(axes[0], panels):
        group = [r for r in rows if r["dataset"] == dataset and r["block"] == block]
        for kind, marker in markers.items():
            points = sorted((r["embedding_parameters"], r["auc"], r["variant"]) for r in group
                            if r["variant"].split("_")[0] == kind)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle="-" if
                        len(points) > 1 else "none", markersize=9 if kind == "full" else 6, label=kind,
                        color=colours[kind])
                for x, y, name in points:
                    ax.annotate(name.split("_")[-1] if "/" in name else "", (x, y), textcoords="offset points",
                                xytext=(4, -10), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        ax.set_xlabel("stored embedding parameters")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{dataset} · {block}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=BLOCKS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--search-epochs", type=int, default=10, help="OptEmbed supernet / DNIS search epochs")
    parser.add_argument("--search-rows", type=int, default=20_000, help="OptEmbed: validation rows per candidate")
    parser.add_argument("--optembed-generations", type=int, default=30)
    parser.add_argument("--optembed-sparsity", type=float, default=1e-4)
    parser.add_argument("--optembed-threshold-lr", type=float, default=1e-4)
    parser.add_argument("--optembed-max-parameters", type=float, help="OptEmbed: search only candidates storing "
                        "at most this fraction of the full parameters (default: no limit, as in the paper)")
    parser.add_argument("--dnis-budget", type=float, default=0.4)
    parser.add_argument("--dnis-blocks", type=int, default=1, help="frequency blocks per table (DNIS)")
    parser.add_argument("--dnis-arch-lr", type=float, default=1e-3, help="DNIS: learning rate of alpha")
    parser.add_argument("--dnis-significance", choices=("alpha", "effective"), default="alpha")
    parser.add_argument("--dnis-budget-order", choices=("significance", "per_parameter"), default="significance")
    parser.add_argument("--device", help="train.device for every run (default: the recipe's)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--skip-existing", action="store_true", help="keep saved results instead of re-running")
    parser.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    parser.add_argument("--data-dir", default=os.environ.get("CTRLAB_DATA_DIR"))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_frontier")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "embedding_frontier")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "embedding_frontier.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for dataset in args.datasets:
            for block in args.blocks:
                for variant in args.variants:
                    path = args.results / f"{dataset}_{block}_{variant.replace('/', 'of')}.json"
                    if args.skip_existing and path.exists():
                        continue
                    console.print(f"[bold]{dataset} {block} {variant}[/]: training ...")
                    row = run_one(dataset, block, variant, args)
                    path.write_text(json.dumps(row, indent=2))
                    console.print(f"{dataset} {block} {variant}: test auc {row['auc']:.5f}, "
                                  f"{row['embedding_parameters']:,} embedding parameters ({row['seconds']:.0f} s)")
    rows = load_results(args.results)
    plot(rows, args.plot)
    print(f"embedding frontier, printed {dt.date.today()}, torch {torch.__version__}; results from {args.results}\n")
    print(report(rows))
    print(f"\ntargets: OptEmbed and DNIS within {AUC_TOLERANCE} of the full table's test AUC with at least "
          f"{SAVING_TARGET:.0%} fewer stored embedding parameters; multiplexed above hashed at equal budget. "
          f"Plot: {args.plot}")


if __name__ == "__main__":
    # a killed run leaves its resumable state, not a half-built output directory
    run_terminable(main, "terminated; finished runs are saved and a resumable run continues when started again")

"""OptInter (Lyu et al. 2022, "Memorize, Factorize, or be Naive", ``interaction.kind: optinter``): does the search
tell planted memorise-type pairs from factorise-type and non-interacting ones, and does its architecture beat the
uniform ones (every pair memorised, every pair factorised, no pair vectors) and a random architecture with the same
proportions of methods, with fewer stored parameters than memorising everything?

Every piece is ONE training in its own process (one suite, seed and variant), appended to ``--results`` (default
``benchmarks/results/optinter.jsonl``; a recorded piece is skipped unless ``--force``); ``report`` prints the tables
and draws ``--plot`` (default ``benchmarks/results/optinter.png``); ``plan`` lists every piece, done or missing, and
``plan --commands`` prints them as shell commands (two chains side by side on 2 cores)::

    .venv/bin/python benchmarks/optinter.py run --suite synthetic --seed 2021 --variant optinter
    .venv/bin/python benchmarks/optinter.py run --suite synthetic --seed 2021 --variant random   # after optinter
    .venv/bin/python benchmarks/optinter.py run --suite frappe --seed 2022 --variant memorize
    .venv/bin/python benchmarks/optinter.py run --suite criteo --seed 2021 --variant optinter    # ranks first
    .venv/bin/python benchmarks/optinter.py throughput --seed 2021   # on an otherwise idle machine
    .venv/bin/python benchmarks/optinter.py report
    .venv/bin/python benchmarks/optinter.py plan --commands | xargs -P 2 -I{} sh -c {}

Suites: ``synthetic`` (``recipes/synthetic_mlp_optinter.yaml``: the generator's planted memorise-type and
factorise-type pairs among non-interacting ones; which pairs is drawn from the seed, and the record keeps the
planted kind of every candidate pair), ``frappe`` (``recipes/frappe_mlp_optinter.yaml``, Frappe x1 from
``$CTRLAB_DATA_DIR``) and ``criteo`` (``recipes/criteo_sample_mlp_optinter.yaml``: 20 candidate pairs from a
``ctrlab rank`` of the sample, run first into ``--out``). Variants: ``optinter`` (search + retrain), ``memorize``,
``factorize``, ``naive`` (``interaction.kind: pairs`` with that method), ``random`` (the optinter run's choices
shuffled over the pairs, seeded, retrained as OptInter's own are: ``stages: [retrain]`` from a folder holding them)
and, on Frappe, ``deepfm`` (``recipes/frappe_deepfm.yaml``: the throughput reference).

Targets (issue 19): on the generator, per seed, >= 80% of memorise-type pairs memorised and no planted pair naive;
OptInter's test AUC at or above the best uniform architecture's and above the random one's; fewer stored
pair-layer parameters than all-memorise. On Frappe (3 seeds) the same AUC and parameter comparison, and OptInter's
training samples/s at least half of DeepFM's (medians over the final training's epochs, same machine and threads).

``--rows`` (synthetic), ``--epochs`` (a cap on ``train.epochs``), ``--search-epochs`` and ``--set KEY=VALUE``
(any dotted recipe override, e.g. ``--set interaction.arch_lr=1e-2``) become part of a record's identity, and so
does the digest of the recipe the piece runs: editing a suite's recipe leaves the records it changes out of the
report and the plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pieces import ResultsFile

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "optinter.jsonl"
PLOT = REPO / "benchmarks" / "results" / "optinter.png"
OUT = REPO / "runs" / "bench_optinter"
RECIPES = {"synthetic": "synthetic_mlp_optinter.yaml", "frappe": "frappe_mlp_optinter.yaml",
           "criteo": "criteo_sample_mlp_optinter.yaml"}
UNIFORM = ("memorize", "factorize", "naive")
VARIANTS = ("optinter", *UNIFORM, "random", "deepfm")
SEEDS = (2021, 2022, 2023)
PLAN: tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...] = (
    ("synthetic", ("optinter", *UNIFORM, "random"), SEEDS),
    ("frappe", ("optinter", *UNIFORM, "random", "deepfm"), SEEDS),
    ("criteo", ("optinter",), SEEDS[:1]),
)
MEMORIZED_TARGET = 0.80


def results_file(path: Path) -> ResultsFile:
    return ResultsFile(path, ("suite", "variant", "seed", "settings", "recipe"), lock="optinter")


def recipe_digest(suite: str, variant: str) -> str:
    """The piece's recipe as it runs (the suite's recipe with the variant's pair layer; name, seed and output left
    out): a record measured with another recipe is not this piece, and a change that only touches OptInter's
    settings leaves the uniform variants' records valid."""
    import hashlib

    recipe = {k: v for k, v in recipe_for(suite, variant).items() if k not in ("name", "seed", "output_dir")}
    return hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ recipes
def read_recipe(path: Path) -> dict[str, Any]:
    from ctrlab.config.loader import read_recipe_file

    return read_recipe_file(path)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a piece changes from its suite's recipe (part of its identity)."""
    settings: dict[str, Any] = {}
    if args.rows:
        settings["dataset.synthetic.rows"] = args.rows
    if args.epochs:
        settings["train.epochs"] = args.epochs
    if args.search_epochs:
        settings["interaction.search_epochs"] = args.search_epochs
    for item in args.set or []:
        key, _, value = item.partition("=")
        settings[key.strip()] = value.strip()
    return settings


def run_name(suite: str, variant: str, seed: int, settings: dict[str, Any]) -> str:
    import hashlib

    tag = json.dumps(settings, sort_keys=True)
    suffix = "" if not settings else "_" + hashlib.sha1(tag.encode()).hexdigest()[:8]
    return f"{suite}_{variant}_s{seed}{suffix}"


def recipe_for(suite: str, variant: str) -> dict[str, Any]:
    """The piece's recipe before overrides: the suite's, with the variant's pair layer."""
    if variant == "deepfm":
        if suite != "frappe":
            sys.exit("variant deepfm: suite frappe only (the throughput reference)")
        return read_recipe(REPO / "recipes" / "frappe_deepfm.yaml")
    recipe = read_recipe(REPO / "recipes" / RECIPES[suite])
    if variant in UNIFORM:
        recipe["interaction"] = {"kind": "pairs", "method": variant}
    return recipe


def planted_kinds(recipe: dict[str, Any], seed: int) -> dict[str, str]:
    """Every candidate pair's planted kind (memorize, factorize, group, none) for a synthetic piece: which pairs
    are planted is drawn from the seed and the cardinalities alone, so a 2,000-row draw tells."""
    from ctrlab.datasets.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(**{**recipe["dataset"]["synthetic"], "rows": 2000})
    kinds = {f"{a}:{b}": kind for (a, b), kind in generate(config, seed).pair_kinds.items()}
    return kinds


def random_source(optinter_dir: Path, target: Path, seed: int) -> dict[str, str]:
    """A ``from_run`` folder holding OptInter's choices shuffled over the pairs (same number of each method)."""
    import numpy as np

    choices = json.loads((optinter_dir / "interaction_search" / "pair_choices.json").read_text())["choices"]
    names = sorted(choices)
    methods = [choices[n] for n in names]
    order = np.random.default_rng([seed, 4_001]).permutation(len(names))
    shuffled = {name: methods[int(i)] for name, i in zip(names, order)}
    if target.exists():
        shutil.rmtree(target)
    (target / "interaction_search").mkdir(parents=True)
    (target / "interaction_search" / "pair_choices.json").write_text(json.dumps({"choices": shuffled}))
    return shuffled


def ensure_ranking(out: Path, recipe_path: Path, threads: int, data_dir: str) -> Path:
    """The Criteo sample's ``pairs.csv`` (``ctrlab rank`` into ``out/criteo_rank`` once)."""
    target = out / "criteo_rank"
    if not (target / "pairs.csv").is_file():
        import subprocess

        subprocess.run([sys.executable, "-m", "ctrlab", "rank", str(recipe_path), "--output", str(target),
                        "--no-track", f"dataset.data_dir={data_dir}", f"train.num_threads={threads}"], check=True,
                       cwd=REPO)
    return target / "pairs.csv"


# ------------------------------------------------------------------------------------------------ one piece
def run_piece(args: argparse.Namespace) -> None:
    import torch

    from ctrlab.config.loader import parse_override, set_path, validate_recipe
    from ctrlab.train.run import train_recipe

    suite, variant, seed = args.suite, args.variant, args.seed
    settings = settings_of(args)
    record_id = {"suite": suite, "variant": variant, "seed": seed, "settings": settings,
                 "recipe": recipe_digest(suite, variant)}
    results = results_file(args.results)
    if not args.force and results.find(results.key(record_id)) is not None:
        print(f"{run_name(suite, variant, seed, settings)}: recorded already (--force to run again)")
        return
    torch.set_num_threads(args.threads)
    name = run_name(suite, variant, seed, settings)
    recipe = recipe_for(suite, variant)
    recipe.update({"name": name, "seed": seed, "output_dir": str(args.out / name)})
    recipe["tracking"] = {"enabled": False}
    recipe.setdefault("train", {}).update({"progress": not args.quiet, "num_threads": args.threads})
    if suite == "criteo":
        crosses = recipe["features"]["crosses"]
        crosses["ranking"] = {**crosses["ranking"],
                              "path": str(ensure_ranking(args.out, REPO / "recipes" / RECIPES[suite], args.threads,
                                                              args.data_dir))}
    random_choices = None
    if variant == "random":
        source = args.out / run_name(suite, "optinter", seed, settings)
        if not (source / "interaction_search" / "pair_choices.json").is_file():
            sys.exit(f"variant random needs the optinter piece of seed {seed} first ({source})")
        random_choices = random_source(source, args.out / f"{name}_choices", seed)
        recipe["interaction"] = {**recipe["interaction"], "stages": ["retrain"], "from_run": str(args.out /
                                                                                                f"{name}_choices")}
    # search settings reach the variants that search (or reuse a search's choices) only
    overrides = [f"{k}={v}" for k, v in settings.items()
                 if variant in ("optinter", "random") or not k.startswith("interaction.")]
    for override in overrides:
        set_path(recipe, *parse_override(override))
    if "train.epochs" in settings:
        recipe["train"]["epochs"] = min(int(settings["train.epochs"]), int(recipe["train"].get("epochs", 1)))
    started = time.perf_counter()
    result = train_recipe(validate_recipe(recipe, name), data_dir=args.data_dir, overwrite=True)
    metrics = result.metrics
    run_dir = result.output_dir
    speeds = [h["samples_per_second"] for h in metrics["history"] if h.get("samples_per_second")]
    record: dict[str, Any] = {
        **record_id, "run": name, "date": dt.date.today().isoformat(), "threads": args.threads,
        "test_auc": metrics["test"]["auc"], "test_logloss": metrics["test"]["logloss"],
        "valid_auc": metrics["valid"]["auc"], "bayes_optimal_test_auc": metrics.get("bayes_optimal_test_auc"),
        "interaction_parameters": metrics.get("interaction_parameters", 0),
        "embedding_parameters": metrics["embedding_parameters"], "model_parameters": metrics.get("model_parameters"),
        "epochs_run": metrics["epochs_run"], "best_epoch": metrics["best_epoch"],
        "samples_per_second": statistics.median(speeds) if speeds else None,
        "seconds": time.perf_counter() - started,
    }
    choices_file = run_dir / "interaction_search" / "pair_choices.json"
    if choices_file.is_file():
        record["choices"] = json.loads(choices_file.read_text())["choices"]
        search = metrics.get("interaction_search", {}).get("search", {})
        record["search_seconds_per_epoch"] = statistics.median(
            [h["seconds"] for h in search.get("history", [])]) if search.get("history") else None
    if random_choices is not None:
        record["choices"] = random_choices
    if suite == "synthetic":
        record["planted"] = planted_kinds(recipe, seed)
    if variant == "optinter" and seed == SEEDS[0] and (run_dir / "interaction_search" / "pairs.png").is_file():
        shutil.copyfile(run_dir / "interaction_search" / "pairs.png",
                        args.results.parent / f"optinter_pairs_{suite}.png")
    results.append(record)
    print(f"{name}: test auc {record['test_auc']:.5f}, pair-layer parameters {record['interaction_parameters']:,}, "
          f"{record['samples_per_second'] or 0:,.0f} samples/s -> {args.results}")


# ------------------------------------------------------------------------------------------------ throughput
def throughput(args: argparse.Namespace) -> None:
    """Training samples/s of the retrained OptInter model (its choices reused from the recorded optinter piece of
    ``--seed``) and of DeepFM on Frappe, measured one after the other in this process on ``--threads`` threads, for
    ``--epochs`` epochs each (median epoch): the ratio the target reads, free of the load other pieces put on the
    machine while the benchmark's pieces ran."""
    import torch

    from ctrlab.config.loader import validate_recipe
    from ctrlab.train.run import train_recipe

    torch.set_num_threads(args.threads)
    source = args.out / run_name("frappe", "optinter", args.seed, {})
    if not (source / "interaction_search" / "pair_choices.json").is_file():
        sys.exit(f"throughput needs the frappe optinter piece of seed {args.seed} first ({source})")
    speeds: dict[str, float] = {}
    for variant in ("optinter", "deepfm"):
        recipe = recipe_for("frappe", variant)
        name = f"throughput_{variant}_s{args.seed}"
        recipe.update({"name": name, "seed": args.seed, "output_dir": str(args.out / name),
                       "tracking": {"enabled": False}})
        recipe["train"].update({"epochs": args.epochs, "early_stopping": None, "progress": False,
                                "num_threads": args.threads})
        if variant == "optinter":
            recipe["interaction"] = {**recipe["interaction"], "stages": ["retrain"], "from_run": str(source)}
        result = train_recipe(validate_recipe(recipe, name), data_dir=args.data_dir, overwrite=True)
        speeds[variant] = statistics.median(h["samples_per_second"] for h in result.metrics["history"])
    record = {"suite": "frappe", "variant": "throughput", "seed": args.seed, "settings": {"epochs": args.epochs},
              "recipe": recipe_digest("frappe", "optinter"), "threads": args.threads,
              "date": dt.date.today().isoformat(), "samples_per_second": speeds,
              "ratio": speeds["optinter"] / speeds["deepfm"]}
    results_file(args.results).append(record)
    print(f"samples/s: OptInter retrained {speeds['optinter']:,.0f}, DeepFM {speeds['deepfm']:,.0f}; "
          f"ratio {record['ratio']:.2f} -> {args.results}")


# ------------------------------------------------------------------------------------------------ report
def confusion(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Planted kind -> chosen method -> pairs, over the records' seeds."""
    table: dict[str, dict[str, int]] = {}
    for record in records:
        for pair, method in record["choices"].items():
            kind = record["planted"].get(pair, "none")
            table.setdefault(kind, {m: 0 for m in UNIFORM})[method] += 1
    return table


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "missing" if value is None else format(value, spec)


def report(args: argparse.Namespace) -> None:
    records = results_file(args.results).load()
    print(f"OptInter benchmark, printed {dt.date.today().isoformat()}; {len(records)} recorded pieces from "
          f"{args.results}\n")
    current = {(s, v): recipe_digest(s, v) for s in RECIPES for v in VARIANTS if v != "deepfm" or s == "frappe"}
    current[("frappe", "throughput")] = recipe_digest("frappe", "optinter")
    stale = [r for r in records if current.get((r["suite"], r["variant"])) != r.get("recipe")]
    if stale:
        print(f"({len(stale)} records measured with another version of their recipe are left out)\n")
    timed = [r for r in records if r["variant"] == "throughput"]
    records = [r for r in records if r["variant"] != "throughput"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r not in stale:
            groups.setdefault((r["suite"], json.dumps(r["settings"], sort_keys=True)), []).append(r)
    for (suite, settings), rows in sorted(groups.items()):
        print(f"### {suite}, settings {settings}\n")
        seeds = sorted({r["seed"] for r in rows})
        by = {(r["variant"], r["seed"]): r for r in rows}
        variants = [v for v in VARIANTS if any((v, s) in by for s in seeds)]
        print("| seed | " + " | ".join(f"test AUC {v}" for v in variants) + " | OptInter ≥ best uniform | "
              "OptInter > random | pair params OptInter / memorize |")
        print("|---|" + "---:|" * len(variants) + ":---:|:---:|---:|")
        for seed in seeds:
            auc = {v: by[(v, seed)]["test_auc"] if (v, seed) in by else None for v in variants}
            uniform = [auc[v] for v in UNIFORM if auc.get(v) is not None]
            ours = auc.get("optinter")
            beats = "missing" if ours is None or len(uniform) < 3 else ("met" if ours >= max(uniform) else "NOT met")
            random = auc.get("random")
            above = "missing" if ours is None or random is None else ("met" if ours > random else "NOT met")
            mem = by.get(("memorize", seed), {}).get("interaction_parameters")
            own = by.get(("optinter", seed), {}).get("interaction_parameters")
            params = "missing" if mem is None or own is None else f"{own:,} / {mem:,}"
            print(f"| {seed} | " + " | ".join(fmt(auc[v]) for v in variants) + f" | {beats} | {above} | {params} |")
        means = {v: mean([by[(v, s)]["test_auc"] for s in seeds if (v, s) in by]) for v in variants}
        print("| mean | " + " | ".join(fmt(means[v]) for v in variants) + " | | | |\n")
        speed = {v: mean([by[(v, s)]["samples_per_second"] for s in seeds if (v, s) in by
                          and by[(v, s)]["samples_per_second"]]) for v in variants}
        print("training samples/s (median epoch, mean over seeds): " + ", ".join(
            f"{v} {fmt(speed[v], ',.0f')}" for v in variants))
        if speed.get("optinter") and speed.get("deepfm"):
            ratio = speed["optinter"] / speed["deepfm"]
            print(f"OptInter / DeepFM throughput in the pieces (under their varying load): {ratio:.2f}")
        for r in timed:
            if suite == r["suite"] and r.get("recipe") == current[("frappe", "throughput")]:
                sps = r["samples_per_second"]
                print(f"OptInter / DeepFM throughput, measured back to back (seed {r['seed']}, {r['threads']} "
                      f"thread, {r['settings']['epochs']} epochs): {sps['optinter']:,.0f} / {sps['deepfm']:,.0f} "
                      f"= {r['ratio']:.2f} ({'met' if r['ratio'] >= 0.5 else 'NOT met'}: >= 0.5)")
        ours = [by[("optinter", s)] for s in seeds if ("optinter", s) in by]
        if ours:
            counts = {m: mean([sum(1 for c in r["choices"].values() if c == m) for r in ours]) for m in UNIFORM}
            print("OptInter's choices (mean pairs per seed): " + ", ".join(f"{m} {fmt(n, '.1f')}"
                                                                            for m, n in counts.items()))
        if suite == "synthetic" and ours:
            table = confusion(ours)
            print("\nplanted kind vs chosen method (pairs, all seeds):\n")
            print("| planted | memorize | factorize | naive | memorised share |\n|---|---:|---:|---:|---:|")
            for kind, row in sorted(table.items()):
                total = sum(row.values())
                print(f"| {kind} | {row['memorize']} | {row['factorize']} | {row['naive']} | "
                      f"{row['memorize'] / total:.0%} |")
            for r in ours:
                planted = {p: k for p, k in r["planted"].items() if k != "none"}
                mem = [p for p, k in planted.items() if k == "memorize"]
                share = sum(r["choices"].get(p) == "memorize" for p in mem) / len(mem) if mem else None
                naive = [p for p in planted if r["choices"].get(p) == "naive"]
                print(f"seed {r['seed']}: memorise-type memorised {fmt(share, '.0%')} "
                      f"({'met' if share is not None and share >= MEMORIZED_TARGET else 'NOT met'}), planted pairs "
                      f"left naive: {', '.join(naive) or 'none'} ({'met' if not naive else 'NOT met'})")
        print()
    plot(records, args.plot)
    print(f"plot: {args.plot}")


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Test AUC against the pair layer's stored parameters, per suite (one point per piece)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suites = sorted({r["suite"] for r in records})
    if not suites:
        return
    figure = Figure(figsize=(5.0 * len(suites), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(suites), squeeze=False)[0]
    for ax, suite in zip(axes, suites):
        for variant in VARIANTS:
            points = [(max(r["interaction_parameters"], 1), r["test_auc"]) for r in records
                      if r["suite"] == suite and r["variant"] == variant]
            if points:
                ax.scatter(*zip(*points), label=variant, s=24)
        ax.set_xscale("log")
        ax.set_xlabel("pair-layer parameters (naive: 1)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"OptInter vs uniform architectures: {suite}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")


def plan(args: argparse.Namespace) -> None:
    results = results_file(args.results)
    done = {results.key(r) for r in results.load()}
    chains = []
    for suite, variants, seeds in PLAN:
        for seed in seeds:
            chain = []
            for variant in variants:
                key = results.key({"suite": suite, "variant": variant, "seed": seed, "settings": {},
                                   "recipe": recipe_digest(suite, variant)})
                if not args.commands:
                    print(f"{'done   ' if key in done else 'missing'}  {suite} {variant} seed {seed}")
                elif key not in done:
                    chain.append(shlex.join([sys.executable, str(Path(__file__).resolve()), "run", "--suite", suite,
                                             "--variant", variant, "--seed", str(seed), "--quiet"]))
            if chain:
                chains.append(" && ".join(chain))
    if args.commands:
        for chain in chains:
            print(shlex.quote(chain))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--suite", choices=sorted(RECIPES), required=True)
    run.add_argument("--variant", choices=VARIANTS, required=True)
    run.add_argument("--seed", type=int, default=SEEDS[0])
    run.add_argument("--rows", type=int)
    run.add_argument("--epochs", type=int)
    run.add_argument("--search-epochs", type=int)
    run.add_argument("--set", action="append", help="KEY=VALUE recipe override (repeatable)")
    timing = sub.add_parser("throughput")
    timing.add_argument("--seed", type=int, default=SEEDS[0])
    timing.add_argument("--epochs", type=int, default=3)
    data = os.environ.get("CTRLAB_DATA_DIR") or str(REPO.parent / "shared" / "datasets")
    for command in (run, timing):
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--data-dir", default=data, help="where the dataset cards' files are (default "
                             "$CTRLAB_DATA_DIR, else ../shared/datasets)")
        command.add_argument("--out", type=Path, default=OUT)
    run.add_argument("--force", action="store_true")
    run.add_argument("--quiet", action="store_true")
    for command in (run, timing, sub.add_parser("report"), sub.add_parser("plan")):
        command.add_argument("--results", type=Path, default=RESULTS)
    sub.choices["report"].add_argument("--plot", type=Path, default=PLOT)
    sub.choices["plan"].add_argument("--commands", action="store_true")
    args = parser.parse_args()
    {"run": run_piece, "throughput": throughput, "report": report, "plan": plan}[args.command](args)


if __name__ == "__main__":
    main()

"""OptFS (Lyu et al. 2023, feature-set search, ``gate.kind: optfs``): does it find a planted feature set, and does the
retrained model keep the ungated model's AUC with fewer stored embedding rows?

Every piece is ONE training in its own process (one seed, one variant), appended to ``--results`` (default
``benchmarks/results/optfs.jsonl``, one JSON object a line, written atomically under a lock; a piece already
recorded is skipped unless ``--force``); ``report`` prints the tables from that file and draws ``--plot`` (default
``benchmarks/results/optfs.png``). A missing piece is shown as missing; every number printed comes from a recorded
run. Run directories go to ``--out`` (default ``runs/bench_optfs/``; the random controls need their seed's ``optfs``
run directory there). ``plan`` lists the full benchmark's pieces, done or missing.

Suites (``--suite``):

* ``planted``: ``recipes/synthetic_deepfm_optfs.yaml`` (``--rows``, default the recipe's 2,000,000): 4 categorical
  fields with main effects and 3 planted interactions among them, 6 noise fields with 10k .. 200k Zipf-distributed
  values, 2 bucketised counts. The generator draws WHICH fields are informative from the seed, so for every seed
  the recipe's cardinalities are re-arranged: the informative fields get the recipe's informative vocabulary sizes
  (50 / 300 / 1,000 / 5,000), the noise fields the large ones (see :func:`planted_cardinalities`). Each seed is a
  fresh data set and a fresh model. Variants:

  - ``optfs``: search + retrain (the recipe as it is);
  - ``plain``: the same recipe without ``gate`` (the ungated DeepFM);
  - ``random``: the control that matters. The same number of values as OptFS kept, PER FIELD (per table), drawn
    uniformly from the field's values (seeded by the run's seed), then retrained exactly as OptFS's own mask is:
    ``gate.stages: [retrain]`` with ``gate.from_run`` a folder holding this random ``kept_values.json`` and the
    OptFS run's ``rewind.safetensors``. Same rewound weights, same seed, same training: only the mask differs. It
    inherits from OptFS how many values each field keeps (which already says which fields matter), so it isolates
    the choice of values WITHIN a field: the fairer, harder control;
  - ``random_global``: the same, but the same overall number of values drawn uniformly over all tables together
    (small informative fields are starved: an easy control, shown for reference).

  Acceptance (per seed): OptFS keeps >= 95% of the informative categorical fields' training occurrences
  (``kept_occurrence_share`` pooled over those fields; every row has one value per field, so this is their plain
  mean) and drops >= 80% of the noise categorical fields' distinct values (1 - kept / total, pooled); the random
  masks' test AUC is below OptFS's (both printed, per field and global).
* ``synthetic2m``: the planted data at exactly 2,000,000 rows, variants ``optfs`` and ``plain`` only. A
  ``synthetic2m`` piece IS the ``planted`` piece of the same seed and variant at 2M rows (same data set, same
  record), so running one suite fills the other.
* ``frappe``: ``recipes/frappe_<model>.yaml`` on Frappe x1 (``--data-dir``, default ``$CTRLAB_DATA_DIR`` or
  ``../shared/datasets``; skipped with a message when the data is not there), ``optfs`` = the recipe plus the
  ``gate`` section of ``recipes/frappe_deepfm_optfs.yaml``, ``plain`` = the recipe. ``--model deepfm`` (3 seeds),
  ``autoint_plus`` and ``dcnv2`` (one seed each; the BARS model sizes of their recipes).

Targets of (b): OptFS's mean test AUC within 0.001 of the ungated model's, or above; printed next to the kept share
of values, both models' stored embedding parameters (``metrics.json: embedding_parameters``) and the search's cost
per epoch as a ratio to the ungated model's (median seconds per epoch from the runs' histories).

Usage (one thread per process: two pieces can run side by side on a 2-core machine)::

    .venv/bin/python benchmarks/optfs.py run --suite planted --seed 2021 --variant optfs
    .venv/bin/python benchmarks/optfs.py run --suite planted --seed 2021 --variant plain
    .venv/bin/python benchmarks/optfs.py run --suite planted --seed 2021 --variant random   # after optfs
    .venv/bin/python benchmarks/optfs.py run --suite planted --seed 2021 --variant random_global
    .venv/bin/python benchmarks/optfs.py run --suite synthetic2m --seed 2022 --variant optfs
    .venv/bin/python benchmarks/optfs.py run --suite frappe --seed 2021 --model dcnv2 --variant optfs
    .venv/bin/python benchmarks/optfs.py plan                  # every piece of the full benchmark, done or not
    .venv/bin/python benchmarks/optfs.py report                # tables + benchmarks/results/optfs.png

    # the whole benchmark, resumable (recorded pieces are skipped), two chains at a time (a chain = one suite,
    # model and seed, its pieces in order); about 2 hours on 2 CPU cores, AutoInt+ on Frappe the longest chain:
    .venv/bin/python benchmarks/optfs.py plan --commands | xargs -P 2 -I{} sh -c {}

Measured on 2 cores, 1 thread per piece, nothing else running (seconds per epoch): planted 2M rows DeepFM ungated
25.8, OptFS search 29.5 (x1.14), retrain on the kept set 22.1; Frappe x1 ungated / search: DeepFM 9.1 / 9.2, DCNv2
11.0 / 10.9, AutoInt+ (BARS size) 100 / 101. Two pieces side by side run each about 1.3-1.6x slower, so time
ratios are only comparable between pieces run under the same load.

A quick try on a small planted set (a scratch results file, so the committed one holds real measurements only)::

    for v in optfs plain random random_global; do .venv/bin/python benchmarks/optfs.py run --suite planted \\
        --seed 2021 --variant $v --rows 200000 --epochs 3 --search-epochs 3 --results /tmp/optfs_try.jsonl \\
        --out /tmp/optfs_runs --quiet; done
    .venv/bin/python benchmarks/optfs.py report --results /tmp/optfs_try.jsonl --plot /tmp/optfs_try.png

``--rows``, ``--epochs`` (a cap on ``train.epochs``), ``--search-epochs`` and ``--gate KEY=VALUE`` (sparsity_weight,
gate_lr, final_temperature, search_epochs, gate_init, rewind_epoch; e.g. ``--gate sparsity_weight=1e-6``) become
part of a record's identity, and so do the effective OptFS settings (recipe + defaults + overrides): the report
compares only pieces with the same settings and prints them for every group.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
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
RESULTS = REPO / "benchmarks" / "results" / "optfs.jsonl"
PLOT = REPO / "benchmarks" / "results" / "optfs.png"
OUT = REPO / "runs" / "bench_optfs"
PLANTED_RECIPE = REPO / "recipes" / "synthetic_deepfm_optfs.yaml"
FRAPPE_GATE_RECIPE = REPO / "recipes" / "frappe_deepfm_optfs.yaml"
SUITES = ("planted", "synthetic2m", "frappe")
MODELS = ("deepfm", "autoint_plus", "dcnv2")
VARIANTS = ("optfs", "plain", "random", "random_global")
RANDOM = {"random": "field", "random_global": "global"}
ROWS_2M = 2_000_000
SEEDS = (2021, 2022, 2023)
# the full benchmark: (suite, model, variants, seeds); the planted pieces run at the recipe's 2M rows, so they are
# the synthetic2m pieces too
PLAN: tuple[tuple[str, str, tuple[str, ...], tuple[int, ...]], ...] = (
    ("planted", "deepfm", ("optfs", "plain", "random", "random_global"), SEEDS),
    ("frappe", "deepfm", ("optfs", "plain"), SEEDS),
    ("frappe", "autoint_plus", ("optfs", "plain"), SEEDS[:1]),
    ("frappe", "dcnv2", ("optfs", "plain"), SEEDS[:1]),
)
INFORMATIVE_KEPT_TARGET = 0.95  # share of the informative fields' training occurrences kept
NOISE_DROPPED_TARGET = 0.80  # share of the noise fields' distinct values dropped
AUC_TOLERANCE = 0.001  # OptFS's test AUC at most this far below the ungated model's


# ------------------------------------------------------------------------------------------------ recipes
def read_recipe(path: Path) -> dict[str, Any]:
    from ctrlab.config.loader import read_recipe_file

    return read_recipe_file(path)


def informative_indices(synthetic: dict[str, Any], seed: int) -> list[int]:
    """0-based indices of the categorical fields with a main effect or in a planted pair, for ``seed`` (which
    fields matter is drawn from the seed alone: a 2,000-row draw gives the same fields as the full one)."""
    from ctrlab.datasets.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(**{**synthetic, "rows": 2000})
    data = generate(config, seed)
    names = set(data.main_effects) | {f for pair in data.interactions for f in pair}
    return sorted(int(name[1:]) - 1 for name in names if name.startswith("C"))


def planted_cardinalities(synthetic: dict[str, Any], recipe_seed: int, seed: int) -> list[int]:
    """The recipe's cardinalities re-arranged for ``seed``: the vocabulary sizes the recipe gives its informative
    fields (at its own seed) go, in the same order, to the informative fields of ``seed``, the noise sizes to the
    noise fields."""
    cards = list(synthetic["cardinalities"])
    base = informative_indices(synthetic, recipe_seed)
    informative = [cards[i] for i in base]
    noise = [c for i, c in enumerate(cards) if i not in base]
    target = informative_indices(synthetic, seed)
    out, info, rest = [], iter(informative), iter(noise)
    for i in range(len(cards)):
        out.append(next(info) if i in target else next(rest))
    return out


def base_recipe(suite: str, model: str, variant: str, seed: int, rows: int | None) -> dict[str, Any]:
    """The recipe of a piece before the benchmark's own settings (name, output, threads, overrides)."""
    if suite in ("planted", "synthetic2m"):
        recipe = read_recipe(PLANTED_RECIPE)
        synthetic = dict(recipe["dataset"]["synthetic"])
        synthetic["cardinalities"] = planted_cardinalities(synthetic, int(recipe["seed"]), seed)
        synthetic["rows"] = ROWS_2M if suite == "synthetic2m" else (rows or synthetic["rows"])
        recipe["dataset"] = {**recipe["dataset"], "synthetic": synthetic}
    else:
        recipe = read_recipe(REPO / "recipes" / f"frappe_{model}.yaml")
        if variant != "plain":
            recipe["gate"] = read_recipe(FRAPPE_GATE_RECIPE)["gate"]
    if variant == "plain":
        recipe.pop("gate", None)
    return recipe


def dataset_tag(suite: str, recipe: dict[str, Any]) -> str:
    if suite == "frappe":
        return "frappe_x1"
    return f"planted_{recipe['dataset']['synthetic']['rows']}"


GATE_KEYS = {"sparsity_weight": "lambda", "gate_lr": "gate_lr", "final_temperature": "tau", "search_epochs":
             "search_epochs", "gate_init": "m0", "rewind_epoch": "rewind"}


def settings_of(args: argparse.Namespace, variant: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """A piece's settings (part of its identity): ``train`` departures from the recipe (``--epochs``) and, for a
    gated variant, the EFFECTIVE OptFS settings (the recipe's gate section, the library's defaults for keys it leaves
    out, ``--search-epochs`` and ``--gate``), so a record stays tied to what ran when a recipe changes."""
    from ctrlab.gates.optfs import OptFSConfig

    train = {"epochs": args.epochs} if args.epochs else {}
    if variant == "plain":
        return {"train": train, "gate": {}}
    gate = {k: v for k, v in recipe["gate"].items() if k in GATE_KEYS}
    if args.search_epochs:
        gate["search_epochs"] = args.search_epochs
    for item in args.gate or []:
        key, _, value = item.partition("=")
        if key.strip() not in GATE_KEYS:
            sys.exit(f"--gate {item}: one of {', '.join(GATE_KEYS)}")
        gate[key.strip()] = yaml_value(value)
    full = OptFSConfig.model_fields
    gate = {k: gate.get(k, full[k].default) for k in GATE_KEYS}
    gate["rewind_epoch"] = min(gate["rewind_epoch"], gate["search_epochs"])
    checked = OptFSConfig(**gate).model_dump()
    return {"train": train, "gate": {k: checked[k] for k in GATE_KEYS}}


def yaml_value(text: str) -> Any:
    """A ``--gate`` value: a number when it reads as one (``1e-7`` too, which YAML 1.1 leaves a string)."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def settings_tag(settings: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in sorted(settings["train"].items())]
    parts += [f"{label}={settings['gate'][k]:g}" for k, label in GATE_KEYS.items() if k in settings["gate"]]
    return " ".join(parts) or "defaults"


def piece_key(record: dict[str, Any]) -> str:
    return results_file(RESULTS).key(record)


def run_name(dataset: str, model: str, variant: str, seed: int, settings: dict[str, Any]) -> str:
    tag = settings_tag(settings)
    suffix = "" if tag == "defaults" else "_" + hashlib.sha1(tag.encode()).hexdigest()[:8]
    return f"{dataset}_{model}_{variant}_s{seed}{suffix}"


# ------------------------------------------------------------------------------------------------ records
def results_file(path: Path) -> ResultsFile:
    return ResultsFile(path, ("dataset", "model", "variant", "seed", "settings"), lock="optfs")


# -------------------------------------------------------------------------------------------- the random mask
def random_source(optfs_dir: Path, target: Path, seed: int, scope: str) -> dict[str, int]:
    """A ``from_run`` folder for a random control: OptFS's rewound weights and a random kept set of the same size,
    drawn uniformly per table (``scope`` "field": each table keeps as many values as OptFS kept in it) or over all
    tables' values together (``scope`` "global": the same overall number). Returns the kept count per table."""
    import numpy as np

    from ctrlab.data.layout import FIRST_VALUE_ID

    source = optfs_dir / "feature_search"
    kept = json.loads((source / "kept_values.json").read_text(encoding="utf-8"))
    names = sorted(kept["tables"])
    sizes = {name: int(kept["tables"][name]["ids"]) - FIRST_VALUE_ID for name in names}
    rng = np.random.default_rng([seed, 7_919])
    if scope == "field":
        draws = {name: rng.choice(sizes[name], size=len(kept["tables"][name]["kept"]), replace=False)
                 for name in names}
    else:
        total = sum(len(kept["tables"][name]["kept"]) for name in names)
        starts = np.cumsum([0] + [sizes[name] for name in names])
        chosen = np.sort(rng.choice(int(starts[-1]), size=total, replace=False))
        draws = {name: chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
                 for i, name in enumerate(names)}
    tables = {name: {"ids": sizes[name] + FIRST_VALUE_ID,
                     "kept": sorted(int(i) + FIRST_VALUE_ID for i in draws[name])} for name in names}
    folder = target / "feature_search"
    if target.exists():
        shutil.rmtree(target)
    folder.mkdir(parents=True)
    (folder / "kept_values.json").write_text(json.dumps({"tables": tables, "numeric": kept.get("numeric", {})}),
                                             encoding="utf-8")
    shutil.copyfile(source / "rewind.safetensors", folder / "rewind.safetensors")
    return {name: len(draws[name]) for name in names}


# ------------------------------------------------------------------------------------------------ one piece
def median_seconds(history: list[dict[str, Any]]) -> float | None:
    seconds = [h["seconds"] for h in history if h.get("seconds")]
    return statistics.median(seconds) if seconds else None


def field_table(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "feature_search" / "kept_features.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        return [{"field": r["field"], "kind": r["kind"], "values_total": int(r["values_total"]),
                 "values_kept": int(r["values_kept"]), "kept_share": float(r["kept_share"]),
                 "kept_occurrence_share": float(r["kept_occurrence_share"])} for r in csv.DictReader(handle)]


def planted_figures(fields: list[dict[str, Any]], informative: list[str]) -> dict[str, Any]:
    """The acceptance figures of the planted suite over the categorical fields (C*)."""
    cat = [f for f in fields if f["field"].startswith("C")]
    info = [f for f in cat if f["field"] in informative]
    noise = [f for f in cat if f["field"] not in informative]
    occurrence = statistics.fmean(f["kept_occurrence_share"] for f in info) if info else None
    total = sum(f["values_total"] for f in noise)
    dropped = 1 - sum(f["values_kept"] for f in noise) / total if total else None
    return {"informative_occurrences_kept": occurrence, "noise_values_dropped": dropped,
            "informative_values_kept": (sum(f["values_kept"] for f in info) / sum(f["values_total"] for f in info)
                                        if info else None)}


def run_piece(args: argparse.Namespace) -> int:
    suite, model, variant, seed = args.suite, args.model, args.variant, args.seed
    if suite != "frappe" and model != "deepfm":
        sys.exit(f"suite {suite}: DeepFM only")
    if suite == "synthetic2m" and variant in RANDOM:
        sys.exit("suite synthetic2m: variants optfs and plain (the random controls belong to the planted suite)")
    if suite == "frappe" and variant in RANDOM:
        sys.exit("suite frappe: variants optfs and plain")
    if suite == "synthetic2m" and args.rows not in (None, ROWS_2M):
        sys.exit("suite synthetic2m is 2,000,000 rows; use --suite planted --rows N for another size")
    data_dir = args.data_dir
    if suite == "frappe":
        if not (Path(data_dir) / "frappe" / "x1" / "train.csv.gz").is_file():
            print(f"skipped: Frappe x1 is not under {data_dir}/frappe/x1 (set --data-dir or $CTRLAB_DATA_DIR)")
            return 0

    import torch
    from rich.console import Console

    from ctrlab.config.loader import validate_recipe
    from ctrlab.train.run import train_recipe

    torch.set_num_threads(args.threads)
    recipe = base_recipe(suite, model, variant, seed, args.rows)
    dataset = dataset_tag(suite, recipe)
    settings = settings_of(args, variant, recipe)
    name = run_name(dataset, model, variant, seed, settings)
    record_id = {"dataset": dataset, "model": model, "variant": variant, "seed": seed, "settings": settings}
    key = piece_key(record_id)
    if not args.force and (old := results_file(args.results).find(key)) is not None:
        print(f"already recorded ({old['date']}): {name}; --force to run it again")
        return 0

    run_dir = args.out / name
    recipe.update({"name": name, "seed": seed, "output_dir": str(run_dir), "tracking": {"enabled": False}})
    train = {**recipe["train"], "progress": False, "num_threads": args.threads}
    if args.epochs:
        train["epochs"] = min(int(recipe["train"].get("epochs", args.epochs)), args.epochs)
    if args.device:
        train["device"] = args.device
    recipe["train"] = train
    extra: dict[str, Any] = {}
    if variant != "plain":
        gate = {**recipe["gate"], **settings["gate"]}
        if variant in RANDOM:
            optfs_dir = args.out / run_name(dataset, model, "optfs", seed, settings)
            if not (optfs_dir / "feature_search" / "rewind.safetensors").is_file():
                sys.exit(f"the random control needs the optfs piece's run directory {optfs_dir} (run --variant optfs "
                         "first, with the same settings and --out)")
            source = args.out / f"{name}_source"
            extra["random_kept_per_table"] = random_source(optfs_dir, source, seed, RANDOM[variant])
            extra["mask_from"] = str(optfs_dir.relative_to(REPO) if optfs_dir.is_relative_to(REPO) else optfs_dir)
            gate.update({"stages": ["retrain"], "from_run": str(source)})
        recipe["gate"] = gate

    print(f"{name}: training ({settings_tag(settings)}) ...", flush=True)
    started = time.perf_counter()
    result = train_recipe(validate_recipe(recipe), data_dir=data_dir, console=Console(stderr=True, quiet=args.quiet),
                          overwrite=True)
    wall = time.perf_counter() - started
    metrics = result.metrics
    record: dict[str, Any] = {
        **record_id, "suites": [suite] if suite == "frappe" else (
            ["planted", "synthetic2m"] if dataset == f"planted_{ROWS_2M}" else ["planted"]),
        "test": metrics["test"], "valid": metrics["valid"], "best_epoch": metrics["best_epoch"],
        "epochs": metrics["epochs_run"], "epoch_seconds": median_seconds(metrics["history"]),
        "embedding_parameters": metrics["embedding_parameters"], "embedding_bytes": metrics["embedding_bytes"],
        "rows": metrics["rows"], "seconds": round(wall, 1), "threads": args.threads, "device": metrics["device"],
        "bayes_optimal_test_auc": metrics.get("bayes_optimal_test_auc"), "run_dir": str(run_dir),
        "date": str(dt.date.today()), "torch": torch.__version__, **extra,
    }
    if variant != "plain":
        search = metrics["feature_search"]
        history = search.get("search", {}).get("history", [])
        record.update({"gate": recipe["gate"] | {"from_run": None}, "values_total": search["values_total"],
                       "values_kept": search["values_kept"], "kept_share": search["values_kept"] /
                       search["values_total"] if search["values_total"] else 1.0, "fields": field_table(run_dir)})
        if history:
            record.update({"search_epochs_run": len(history), "search_epoch_seconds": median_seconds(history),
                           "search_final_valid": search["search"].get("final_valid")})
    if suite != "frappe":
        synthetic = recipe["dataset"]["synthetic"]
        info = [f"C{i + 1}" for i in informative_indices(synthetic, seed)]
        record.update({"informative": info, "cardinalities": synthetic["cardinalities"]})
        if variant != "plain":
            record.update(planted_figures(record["fields"], info))
    results_file(args.results).append(record)
    figures = f"test auc {metrics['test']['auc']:.5f}, {metrics['embedding_parameters']:,} embedding parameters"
    if variant != "plain":
        figures += f", kept {record['values_kept']:,}/{record['values_total']:,} values ({record['kept_share']:.1%})"
    if record.get("informative_occurrences_kept") is not None:
        figures += (f", informative occurrences kept {record['informative_occurrences_kept']:.1%}, noise values "
                    f"dropped {record['noise_values_dropped']:.1%}")
    print(f"{name}: {figures}; {wall:.0f} s, {record['epoch_seconds'] or float('nan'):.1f} s/epoch "
          f"(search {record.get('search_epoch_seconds') or float('nan'):.1f} s/epoch) -> {args.results}")
    return 0


# ------------------------------------------------------------------------------------------------ report
def fmt(value: float | None, spec: str = ".4f") -> str:
    return "missing" if value is None else format(value, spec)


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def spread(values: list[float]) -> str:
    return f"±{statistics.stdev(values):.4f}" if len(values) > 1 else ""


def train_tag(settings: dict[str, Any]) -> str:
    return settings_tag({"train": settings["train"], "gate": {}})


def auc_of(record: dict[str, Any] | None) -> float | None:
    return record["test"]["auc"] if record else None


def above(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "missing"
    return f"{a - b:+.4f} " + ("yes" if a > b else "**no**")


def report_planted(records: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    planted = [r for r in records if r["dataset"].startswith("planted_")]
    groups = sorted({(r["dataset"], settings_tag(r["settings"])) for r in planted if r["variant"] != "plain"})
    for dataset, tag in groups:
        rows = int(dataset.split("_")[1])
        gated = [r for r in planted if r["dataset"] == dataset and settings_tag(r["settings"]) == tag]
        ttag = train_tag(gated[0]["settings"])
        plain = {r["seed"]: r for r in planted if r["dataset"] == dataset and r["variant"] == "plain"
                 and train_tag(r["settings"]) == ttag}
        by = {v: {r["seed"]: r for r in gated if r["variant"] == v} for v in ("optfs", *RANDOM)}
        optfs, field, overall = by["optfs"], by["random"], by["random_global"]
        seeds = sorted(set(optfs) | set(field) | set(overall) | set(plain))
        lines += [f"\n### (a) planted suite, {rows:,} rows, OptFS settings: {tag}\n",
                  "| seed | informative fields | informative occurrences kept | noise values dropped | values kept "
                  "| test AUC OptFS | random per field | random global | ungated | Bayes-optimal "
                  "| kept/dropped targets | OptFS − random per field | OptFS − random global |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|"]
        for seed in seeds:
            o, p = optfs.get(seed), plain.get(seed)
            occ = o.get("informative_occurrences_kept") if o else None
            drop = o.get("noise_values_dropped") if o else None
            any_run = o or field.get(seed) or overall.get(seed) or p
            target = "missing" if occ is None or drop is None else (
                "met" if occ >= INFORMATIVE_KEPT_TARGET and drop >= NOISE_DROPPED_TARGET else "**missed**")
            lines.append(
                f"| {seed} | {', '.join(any_run.get('informative', [])) if any_run else '–'} | {fmt(occ, '.2%')} | "
                f"{fmt(drop, '.2%')} | {fmt(o['kept_share'] if o else None, '.2%')} | {fmt(auc_of(o))} | "
                f"{fmt(auc_of(field.get(seed)))} | {fmt(auc_of(overall.get(seed)))} | {fmt(auc_of(p))} | "
                f"{fmt(any_run.get('bayes_optimal_test_auc') if any_run else None)} | {target} | "
                f"{above(auc_of(o), auc_of(field.get(seed)))} | {above(auc_of(o), auc_of(overall.get(seed)))} |")
        if len(seeds) > 1:
            def avg(group: dict[int, dict[str, Any]], key: str = "auc") -> float | None:
                values = [r["test"]["auc"] if key == "auc" else r.get(key) for r in group.values()]
                return mean(values)

            paired = [s for s in optfs if s in field]
            paired_global = [s for s in optfs if s in overall]
            lines.append(
                f"| mean | | {fmt(avg(optfs, 'informative_occurrences_kept'), '.2%')} | "
                f"{fmt(avg(optfs, 'noise_values_dropped'), '.2%')} | {fmt(avg(optfs, 'kept_share'), '.2%')} | "
                f"{fmt(avg(optfs))} | {fmt(avg(field))} | {fmt(avg(overall))} | {fmt(avg(plain))} | | | "
                f"{fmt(mean([optfs[s]['test']['auc'] - field[s]['test']['auc'] for s in paired]), '+.4f')} | "
                f"{fmt(mean([optfs[s]['test']['auc'] - overall[s]['test']['auc'] for s in paired_global]), '+.4f')} |")
        for name, group in (("OptFS", optfs), ("random per field", field), ("random global", overall)):
            if not group:
                continue
            classes: dict[str, list[dict[str, Any]]] = {}
            for r in group.values():
                for f in r["fields"]:
                    kind = "numeric (buckets)" if not f["field"].startswith("C") else (
                        "informative" if f["field"] in r["informative"] else "noise")
                    classes.setdefault(kind, []).append(f)
            lines.append(f"\n{name}, per field class (every seed): " + "; ".join(
                f"{kind}: {sum(f['values_kept'] for f in fs):,} of {sum(f['values_total'] for f in fs):,} values kept, "
                f"{statistics.fmean(f['kept_occurrence_share'] for f in fs):.1%} of occurrences (field mean)"
                for kind, fs in sorted(classes.items())))
    if not groups:
        lines.append("\n### (a) planted suite: no OptFS or random-mask piece recorded (missing)")
    return lines


def report_comparison(records: list[dict[str, Any]]) -> list[str]:
    lines = ["\n### (b) OptFS retrained vs the ungated model\n",
             "| data | model | settings | seeds (OptFS / ungated) | test AUC ungated | test AUC OptFS | Δ AUC | target "
             "| values kept | embedding params ungated | OptFS | ratio | s/epoch ungated | search s/epoch | search / "
             "ungated | retrain s/epoch |",
             "|---|---|---|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    wanted = [("frappe_x1", m) for m in MODELS] + [(f"planted_{ROWS_2M}", "deepfm")]
    extra = sorted({(r["dataset"], r["model"]) for r in records} - set(wanted))
    for dataset, model in wanted + extra:
        rows = [r for r in records if r["dataset"] == dataset and r["model"] == model and r["variant"] not in RANDOM]
        tags = sorted({settings_tag(r["settings"]) for r in rows if r["variant"] == "optfs"}) or ["defaults"]
        for tag in tags:
            optfs = [r for r in rows if r["variant"] == "optfs" and settings_tag(r["settings"]) == tag]
            ttag = train_tag(optfs[0]["settings"]) if optfs else "defaults"
            plain = [r for r in rows if r["variant"] == "plain" and train_tag(r["settings"]) == ttag]
            a_o = [r["test"]["auc"] for r in optfs]
            a_p = [r["test"]["auc"] for r in plain]
            m_o, m_p = mean(a_o), mean(a_p)
            delta = None if m_o is None or m_p is None else m_o - m_p
            target = "missing" if delta is None else ("met" if delta >= -AUC_TOLERANCE else "**missed**")
            e_o = mean([r["embedding_parameters"] for r in optfs])
            e_p = mean([r["embedding_parameters"] for r in plain])
            s_p = mean([r["epoch_seconds"] for r in plain])
            s_s = mean([r.get("search_epoch_seconds") for r in optfs])
            s_r = mean([r["epoch_seconds"] for r in optfs])
            name = "Frappe x1" if dataset == "frappe_x1" else f"planted {int(dataset.split('_')[1]):,} rows"
            lines.append(
                f"| {name} | {model} | {tag} | {len(optfs)} / {len(plain)} | {fmt(m_p)}{spread(a_p)} | "
                f"{fmt(m_o)}{spread(a_o)} | {fmt(delta, '+.4f')} | {target} | "
                f"{fmt(mean([r['kept_share'] for r in optfs]), '.1%')} | {fmt(e_p, ',.0f')} | {fmt(e_o, ',.0f')} | "
                f"{fmt(None if e_o is None or not e_p else e_o / e_p, '.3f')} | {fmt(s_p, '.1f')} | "
                f"{fmt(s_s, '.1f')} | {fmt(None if s_s is None or not s_p else s_s / s_p, '.2f')} | "
                f"{fmt(s_r, '.1f')} |")
    return lines


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Left: the planted suite's per-field kept shares against vocabulary size (informative vs noise fields, every
    seed). Right: test AUC against the kept share of values (ungated at 1), per data set and model."""
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    planted = [r for r in records if r["dataset"].startswith("planted_") and r["variant"] == "optfs"]
    for kind, marker in (("informative", "o"), ("noise", "x")):
        for measure, colour in (("kept_share", "C0"), ("kept_occurrence_share", "C1")):
            points = [(f["values_total"], f[measure]) for r in planted for f in r["fields"] if f["field"].startswith(
                "C") and (f["field"] in r["informative"]) == (kind == "informative")]
            if points:
                left.scatter(*zip(*points), marker=marker, color=colour, alpha=0.7,
                             label=f"{kind}: {'values' if measure == 'kept_share' else 'occurrences'} kept")
    left.set_xscale("log")
    left.set_ylim(-0.03, 1.03)
    left.set_xlabel("distinct training values of the field")
    left.set_ylabel("share kept by OptFS")
    left.set_title("planted suite: per categorical field, every seed")
    left.grid(alpha=0.3)
    if planted:
        left.legend(fontsize=7)
    groups = sorted({(r["dataset"], r["model"]) for r in records})
    markers = {"plain": "*", "optfs": "o", "random": "x", "random_global": "+"}
    for i, (dataset, model) in enumerate(groups):
        for variant, marker in markers.items():
            rows = [r for r in records if (r["dataset"], r["model"], r["variant"]) == (dataset, model, variant)]
            if rows:
                xs = [1.0 if variant == "plain" else r["kept_share"] for r in rows]
                right.scatter(xs, [r["test"]["auc"] for r in rows], marker=marker, color=f"C{i}", s=50,
                              label=f"{dataset} {model} {variant}")
    right.set_xscale("log")
    right.set_xlabel("share of feature values kept (ungated = 1)")
    right.set_ylabel("test AUC")
    right.set_title("test AUC against the kept feature set")
    right.grid(alpha=0.3)
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def report(args: argparse.Namespace) -> int:
    records = results_file(args.results).load()
    print(f"OptFS benchmark, printed {dt.date.today()}; {len(records)} recorded pieces from {args.results}")
    lines = report_planted(records) + report_comparison(records)
    print("\n".join(lines))
    print(f"\ntargets: (a) informative occurrences kept >= {INFORMATIVE_KEPT_TARGET:.0%}, noise values dropped >= "
          f"{NOISE_DROPPED_TARGET:.0%}, OptFS above the random mask; (b) OptFS test AUC >= ungated − {AUC_TOLERANCE} "
          "(means over seeds). Seconds per epoch are medians of the runs' histories (threads as recorded: "
          f"{sorted({r['threads'] for r in records}) or '–'}).")
    if plot(records, args.plot):
        print(f"plot: {args.plot}")
    return 0


def plan(args: argparse.Namespace) -> int:
    """Every piece of the full benchmark and whether it is recorded; with ``--commands`` one shell line per
    (suite, model, seed) that runs its missing pieces in order (optfs before the random controls that need its run
    directory), the slowest lines first, for ``xargs -P 2``."""
    records = results_file(args.results).load()
    keys = {piece_key(r) for r in records}
    defaults = argparse.Namespace(epochs=None, search_epochs=None, gate=None)
    chains, lines = [], []
    for order, (suite, model, variants, seeds) in enumerate(PLAN):
        for seed in seeds:
            steps = []
            for variant in variants:
                dataset = "frappe_x1" if suite == "frappe" else f"planted_{ROWS_2M}"
                settings = settings_of(defaults, variant, base_recipe(suite, model, variant, seed, None))
                done = piece_key({"dataset": dataset, "model": model, "variant": variant, "seed": seed,
                                  "settings": settings}) in keys
                lines.append(f"{'done   ' if done else 'missing'}  {suite} {model} {variant} seed {seed}")
                if not done:
                    command = (f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__)))} run --suite {suite} "
                               f"--model {model} --variant {variant} --seed {seed} --quiet")
                    for option in ("results", "out"):
                        if getattr(args, option) != {"results": RESULTS, "out": OUT}[option]:
                            command += f" --{option} {shlex.quote(str(getattr(args, option)))}"
                    steps.append(command)
            if steps:
                chains.append((model == "autoint_plus", -len(steps), order, " && ".join(steps)))
    if args.commands:
        for chain in sorted(chains, key=lambda c: (not c[0], c[1], c[2])):
            print(shlex.quote(chain[3]))
    else:
        print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    default_data = os.environ.get("CTRLAB_DATA_DIR") or str(REPO.parent / "shared" / "datasets")
    one = sub.add_parser("run", help="run one piece (one training) and record it")
    one.add_argument("--suite", choices=SUITES, required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--model", choices=MODELS, default="deepfm")
    one.add_argument("--variant", choices=VARIANTS, default="optfs")
    one.add_argument("--rows", type=int, help="planted suite: rows of the generated set (default: the recipe's 2M)")
    one.add_argument("--epochs", type=int, help="cap on train.epochs (a quick try; recorded as a setting)")
    one.add_argument("--search-epochs", type=int, help="gate.search_epochs (recorded as a setting)")
    one.add_argument("--gate", action="append", metavar="KEY=VALUE", help="an OptFS setting (recorded), repeatable")
    one.add_argument("--threads", type=int, default=1)
    one.add_argument("--device", help="train.device (default: the recipe's)")
    one.add_argument("--data-dir", default=default_data)
    one.add_argument("--force", action="store_true", help="run and replace a piece already recorded")
    one.add_argument("--quiet", action="store_true", help="no training log")
    for p in (one, sub.add_parser("report", help="print the tables and draw the plot"),
              sub.add_parser("plan", help="list the full benchmark's pieces, done or missing")):
        p.add_argument("--results", type=Path, default=RESULTS)
        p.add_argument("--out", type=Path, default=OUT)
        p.add_argument("--plot", type=Path, default=PLOT)
        if p.prog.endswith("plan"):
            p.add_argument("--commands", action="store_true", help="print the missing pieces as commands")
    args = parser.parse_args()
    args.results = args.results.resolve()
    args.out = args.out.resolve()
    if args.command == "run":
        return run_piece(args)
    if args.command == "plan":
        return plan(args)
    return report(args)


if __name__ == "__main__":
    from ctrlab.utils.signals import run_terminable

    run_terminable(lambda: sys.exit(main()), "terminated; recorded pieces are kept, run the piece again")

"""``ctrlab pipeline`` on planted synthetic data: does it close the gap to the Bayes-optimal AUC, and do its
decisions match the planted structure?

Reads ``<output_dir>/pipeline.json`` of a finished (or partly finished) pipeline of a recipe with
``dataset.synthetic`` (e.g. ``recipes/synthetic_pipeline.yaml``) and the planted truth of its data: which fields
carry a main effect, which pairs interact and how (``SyntheticData.pair_kinds``), which are noise. The truth is
drawn before any row (the ``pick`` and ``pair_choice`` streams depend on the config's counts, cardinalities and
seed only), so it is regenerated on a few rows rather than on the recipe's million.

Prints, and writes to ``--out`` (one JSON object; appended as one line to ``--jsonl`` too):

* plain test AUC (DeepFM on all features), Bayes-optimal test AUC, the final model's mean test AUC over the
  retrain stage's seeds (± std) and the gap closed ``(final - plain) / (bayes - plain)``;
* for every informative and noise field: kept or dropped by the rank stage, its share of values kept by OptFS
  (dropped when none), and whether the final model has it;
* for every planted pair: the method OptInter chose (memorize / factorize / naive, or not a candidate) and whether
  the final model holds that choice;
* each stage's outcome and minutes, and the wall time (the sum of the stages' seconds).

Usage::

    .venv/bin/python benchmarks/pipeline_planted.py recipes/synthetic_pipeline.yaml
    .venv/bin/python benchmarks/pipeline_planted.py recipes/synthetic_pipeline.yaml \\
        dataset.synthetic.rows=100000 output_dir=/tmp/synth_smoke --out /tmp/smoke.json --jsonl ''
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from ctrlab.data.pipeline import data_seed
from ctrlab.datasets.synthetic import SyntheticData, generate
from ctrlab.pipeline.runner import load_pipeline_recipe

RESULTS = Path("benchmarks/results/pipeline")
_TRUTH_ROWS = 2_000  # the planted structure does not depend on the number of rows


def planted_truth(recipe: Any) -> tuple[SyntheticData, int]:
    """The generator's output on a few rows of the recipe's config and data seed (same structure as the full data)."""
    synthetic = recipe.dataset.synthetic
    if synthetic is None:
        raise SystemExit("the recipe has no dataset.synthetic section: no planted truth to compare with")
    seed = data_seed(recipe.dataset, recipe.seed)
    return generate(synthetic.model_copy(update={"rows": _TRUTH_ROWS}), seed), seed


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def pair_methods(run_dir: Path | None) -> dict[frozenset[str], str]:
    """Each candidate pair's method from an OptInter run's ``interaction_search/pairs.csv``."""
    if run_dir is None:
        return {}
    return {frozenset((row["field_a"], row["field_b"])): row["method"]
            for row in read_rows(run_dir / "interaction_search" / "pairs.csv")}


def feature_names(recipe: dict[str, Any]) -> list[str]:
    features = recipe.get("features", {})
    return [f if isinstance(f, str) else f["name"]
            for kind in ("categorical", "numeric") for f in features.get(kind, [])]


def summarise(recipe: Any, records: list[dict[str, Any]], truth: SyntheticData, data_seed_: int) -> dict[str, Any]:
    by_stage = {r["stage"]: r for r in records}
    plain = by_stage["plain"]
    plain_auc = float(plain["candidate"]["test"]["auc"])
    plain_metrics = json.loads((Path(plain["candidate"]["run_dir"]) / "metrics.json").read_text())
    bayes = float(plain_metrics["bayes_optimal_test_auc"])
    out: dict[str, Any] = {
        "recipe": recipe.name, "rows": recipe.dataset.synthetic.rows, "data_seed": data_seed_,
        "date": datetime.date.today().isoformat(), "plain_test_auc": plain_auc, "bayes_optimal_test_auc": bayes,
    }

    retrain = by_stage.get("retrain")
    if retrain is not None and retrain["outcome"] == "final":
        test = retrain["decision"]["test_auc"]
        out.update(final_test_auc_mean=test["mean"], final_test_auc_std=test["std"],
                   final_test_auc_by_seed=test["by_seed"], seeds=retrain["decision"]["seeds"],
                   gap_closed=(test["mean"] - plain_auc) / (bayes - plain_auc))

    # The final model: the last record's incumbent (its features, its gate's kept values, its pair methods).
    final = records[-1]["incumbent_recipe"]
    final_features = set(feature_names(final))
    gate = final.get("gate") or {}
    kept_values = {row["field"]: int(row["values_kept"]) for row in
                   read_rows(Path(gate["from_run"]) / "feature_search" / "kept_features.csv")} \
        if gate.get("from_run") else {}
    interaction = final.get("interaction") or {}
    final_pairs = pair_methods(Path(interaction["from_run"])) if interaction.get("from_run") else {}

    rank = by_stage.get("rank")
    rank_dropped = set(rank["decision"].get("dropped", [])) if rank else set()
    optfs = by_stage.get("optfs")
    optfs_share = optfs["decision"].get("kept_share_by_feature", {}) if optfs else {}
    optinter = by_stage.get("optinter")
    searched = pair_methods(Path(optinter["candidate"]["run_dir"])) if optinter and optinter["candidate"] else {}

    fields = []
    for name in truth.informative + truth.noise:
        # What the field takes part in: a main effect (categorical or numeric), the kinds of its planted pairs.
        roles = ["main"] if name in truth.main_effects or (name in truth.informative and name.startswith("I")) else []
        roles += sorted({kind for pair, kind in truth.pair_kinds.items() if name in pair})
        role = "+".join(roles) or "noise"
        share = optfs_share.get(name)
        fields.append({
            "field": name, "informative": name in truth.informative, "role": role,
            "rank": "dropped" if name in rank_dropped else "kept" if rank else None,
            "optfs_kept_share": share,
            "optfs": None if share is None else "dropped" if not share else "kept",
            "in_final_model": name in final_features and kept_values.get(name, 1) > 0,
        })
    out["fields"] = fields
    out["pairs"] = [{"pair": f"{a} x {b}", "kind": kind,
                     "optinter_method": searched.get(frozenset((a, b)), "not a candidate"),
                     "final_method": final_pairs.get(frozenset((a, b)), "no cross")}
                    for (a, b), kind in truth.pair_kinds.items()]
    planted = {frozenset(p) for p in truth.pair_kinds}
    others = [m for p, m in searched.items() if p not in planted]
    out["other_pairs_methods"] = {m: others.count(m) for m in ("memorize", "factorize", "naive")}
    out["stages"] = [{"stage": r["stage"], "outcome": r["outcome"], "minutes": r["seconds"] / 60.0,
                      "valid_auc": (r["candidate"] or {}).get("valid", {}).get("auc"),
                      "test_auc": (r["candidate"] or {}).get("test", {}).get("auc"), "reason": r["reason"]}
                     for r in records]
    out["wall_minutes"] = sum(r["seconds"] for r in records) / 60.0
    return out


def show(result: dict[str, Any]) -> None:
    print(f"{result['recipe']}: {result['rows']:,} rows, data seed {result['data_seed']}")
    print(f"  plain DeepFM (all features) test AUC {result['plain_test_auc']:.5f}")
    print(f"  Bayes-optimal test AUC              {result['bayes_optimal_test_auc']:.5f}")
    if "final_test_auc_mean" in result:
        print(f"  pipeline final test AUC             {result['final_test_auc_mean']:.5f} ± "
              f"{result['final_test_auc_std']:.5f} over seeds {result['seeds']}")
        print(f"  gap closed                          {result['gap_closed']:.1%} (target 60%)")
    else:
        print("  the retrain stage has not finished: no final figure")
    print(f"  wall time (sum of stages)           {result['wall_minutes']:.1f} min")
    outcome = {s["stage"]: s["outcome"] for s in result["stages"]}
    print(f"\n  field  planted                rank ({outcome.get('rank', '-')}), OptFS kept share "
          f"({outcome.get('optfs', '-')}), in the final model")
    for f in result["fields"]:
        share = "-" if f["optfs_kept_share"] is None else f"{f['optfs_kept_share']:.1%}"
        print(f"  {f['field']:<6} {f['role']:<22} {f['rank'] or '-':<8} {share:>7}  "
              f"{'yes' if f['in_final_model'] else 'no'}")
    print(f"\n  planted pair  kind       OptInter chose ({outcome.get('optinter', '-')}), in the final model")
    for p in result["pairs"]:
        print(f"  {p['pair']:<13} {p['kind']:<10} {p['optinter_method']:<17} {p['final_method']}")
    print(f"  other pairs: {result['other_pairs_methods']}")
    print("\n  stage      outcome       min   valid AUC  test AUC")
    for s in result["stages"]:
        valid = f"{s['valid_auc']:.5f}" if s["valid_auc"] is not None else "-"
        test = f"{s['test_auc']:.5f}" if s["test_auc"] is not None else "-"
        print(f"  {s['stage']:<10} {s['outcome']:<12} {s['minutes']:5.1f}  {valid:>9}  {test:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("recipe", help="the pipeline recipe (dataset.synthetic)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as given to ctrlab pipeline")
    parser.add_argument("--output-dir", help="the pipeline's output_dir (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/pipeline/<recipe name>.json)")
    parser.add_argument("--jsonl", default=str(RESULTS / "pipeline_planted.jsonl"),
                        help="append the result as one line here ('' for none)")
    args = parser.parse_args(argv)

    recipe = load_pipeline_recipe(args.recipe, args.overrides)
    output_dir = Path(args.output_dir or recipe.output_dir).expanduser()
    state = output_dir / "pipeline.json"
    if not state.is_file():
        print(f"{state}: not found (has the pipeline run?)", file=sys.stderr)
        return 1
    records: list[dict[str, Any]] = json.loads(state.read_text())["records"]
    if not records or records[0]["stage"] != "plain":
        print(f"{state}: the plain model has not finished", file=sys.stderr)
        return 1
    truth, seed = planted_truth(recipe)
    result = {"output_dir": str(output_dir), **summarise(recipe, records, truth, seed)}
    show(result)
    out = args.out or RESULTS / f"{recipe.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.jsonl:
        with open(args.jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
    print(f"\nwrote {out}" + (f" and appended to {args.jsonl}" if args.jsonl else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

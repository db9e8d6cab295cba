"""The pipeline's report: ``report.md`` in the output directory, with two PNGs (``pipeline_valid.png``: each
stage's validation metric against the model the pipeline held; ``pipeline_cost.png``: parameters and training
throughput per stage) and links to the stages' own pictures (ranking, kept features, pair methods, the sweep's
history). It shows, stage by stage, what the stage proposed, what that model measured and whether it was kept, so
a reader sees which stage bought what."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console

from ctrlab.pipeline.base import metric_value
from ctrlab.pipeline.state import STAGES_DIR, StageRecord
from ctrlab.utils.io import atomic_path, write_text_atomic

REPORT_FILE = "report.md"
VALID_PNG = "pipeline_valid.png"
COST_PNG = "pipeline_cost.png"
#: The pictures each stage's work writes, linked from the report when present (relative to the stage's folder).
_STAGE_PICTURES = {"rank": ("ranking/ranking.png",), "optfs": ("*/feature_search/*.png",),
                   "optinter": ("*/interaction_search/pairs.png",), "embedding": ("*/embedding_search/*.png",),
                   "sweep": ("study/optimization_history.png", "study/param_importances.png")}


def _value(record: StageRecord, split: str, metric: str) -> float:
    return metric_value(((record.candidate or {}).get(split) or {}).get(metric))


def _fmt(value: Any, spec: str = ".5f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _held(records: list[StageRecord], metric: str) -> tuple[list[float], list[float]]:
    """The validation metric of the model the pipeline held before and after each record."""
    held, before, after = math.nan, [], []
    for record in records:
        before.append(held)
        if record.outcome in ("kept", "final") and record.candidate is not None:
            held = _value(record, "valid", metric)
        after.append(held)
    return before, after


def decision_text(record: StageRecord, metric: str = "auc") -> str:
    """What the stage decided, in one line."""
    d = record.decision
    if record.stage == "rank":
        dropped = d.get("dropped") or []
        return f"drop {len(dropped)}: {', '.join(dropped)}" if dropped else "nothing to drop"
    if record.stage == "optfs":
        share = d.get("kept_share")
        dropped = d.get("features_dropped") or []
        return (f"keep {_fmt(share, '.1%')} of values ({d.get('values_kept')}/{d.get('values_total')})"
                + (f"; features with no value kept: {', '.join(dropped)}" if dropped else ""))
    if record.stage == "optinter":
        counts = {m: len(d.get(f"pairs_{m}", [])) for m in ("memorize", "factorize", "naive")}
        return (f"{d.get('pairs')} pairs: memorise {counts['memorize']}, factorise {counts['factorize']}, "
                f"naive {counts['naive']}")
    if record.stage == "embedding":
        dims = d.get("dims") or {}
        text = (f"{d.get('kind')}: embedding parameters {_fmt(d.get('embedding_parameters_before'), ',')} -> "
                f"{_fmt(d.get('embedding_parameters'), ',')}")
        if len(set(dims.values())) == 1:
            return text + f"; every field {next(iter(dims.values()))} dims"
        return text + ("; dims " + ", ".join(f"{name} {dim}" for name, dim in dims.items()) if dims else "")
    if record.stage == "sweep":
        counts = d.get("trials") or {}
        done = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
        best = d.get("best_params") or {}
        params = ", ".join(f"{key.split('.')[-1]}={_short(value)}" for key, value in best.items())
        baseline = " (the model before it)" if d.get("best_is_baseline") else ""
        return f"best trial {d.get('best_trial')}{baseline} of {sum(counts.values())} ({done}): {params}"
    if record.stage == "retrain":
        test = d.get(f"test_{metric}") or {}
        spread = (f"; test {metric} {_fmt(test.get('mean'))} ± {_fmt(test.get('std'))} over the seeds"
                  if test else "")
        return f"seeds {d.get('seeds')}; chosen on validation: seed {d.get('chosen_seed')}{spread}"
    if record.stage == "register":
        return f"{d.get('name')} version {d.get('version')}" + (f" @{d.get('alias')}" if d.get("alias") else "")
    return ""


def _details(record: StageRecord) -> list[str]:
    d = record.decision
    lines: list[str] = []
    if record.stage == "rank" and d:
        lines.append(f"- kept: {', '.join(d.get('kept') or [])}")
        lines.append(f"- dropped (chance-corrected information below {_fmt(d.get('information_level'), '.2e')} "
                     f"nats): {', '.join(d.get('dropped') or []) or 'none'}")
    elif record.stage == "optfs" and d:
        shares = d.get("kept_share_by_feature") or {}
        lines.append("- kept share of each feature's values: "
                     + ", ".join(f"{name} {_fmt(share, '.0%')}" for name, share in shares.items()))
    elif record.stage == "optinter" and d:
        for method in ("memorize", "factorize", "naive"):
            pairs = d.get(f"pairs_{method}") or []
            lines.append(f"- {method} ({len(pairs)}): {', '.join(pairs) or 'none'}")
    elif record.stage == "embedding" and d.get("dims"):
        lines.append("- dims: " + ", ".join(f"{name} {dim}" for name, dim in d["dims"].items()))
    elif record.stage == "sweep" and d:
        lines.append(f"- best trial {d.get('best_trial')}: valid {_fmt(d.get('best_value'))}, "
                     f"parameters {d.get('best_params')}; trials {d.get('trials')}")
    elif record.stage == "retrain" and record.finals:
        lines.append("")
        lines.append("| seed | valid | test |")
        lines.append("|---|---:|---:|")
        for seed, final in zip(d.get("seeds", []), record.finals):
            valid = final.get("valid") or {}
            test = final.get("test") or {}
            lines.append(f"| {seed} | {' '.join(f'{k} {_fmt(v)}' for k, v in valid.items())} | "
                         f"{' '.join(f'{k} {_fmt(v)}' for k, v in test.items())} |")
        for key, value in d.items():
            if isinstance(value, dict) and "mean" in value:
                lines.append(f"\n- {key}: mean {_fmt(value['mean'])} ± {_fmt(value['std'])} over "
                             f"{len(value.get('by_seed', []))} seeds")
    return lines


def write_report(output_dir: Path, name: str, records: list[StageRecord], metric: str,
                 console: Console | None) -> Path:
    """Write the report of pipeline ``name``, ``report.md`` and its PNGs, into ``output_dir`` (each atomically) and
    return the report's path."""
    before, after = _held(records, metric)
    total = sum(r.seconds for r in records)
    lines = [f"# Pipeline report: {name}", "",
             f"{len(records)} stages finished, {total / 60:.1f} min of stage time. Each stage is judged on "
             f"validation {metric} against the model before it; a stage that costs more than the tolerance is "
             "rolled back.", "",
             f"| # | stage | outcome | valid {metric} | change | valid logloss | test {metric} | parameters | "
             "samples/s | minutes | what it decided |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for record, held in zip(records, before):
        valid = _value(record, "valid", metric)
        change = valid - held if not math.isnan(held) else math.nan
        candidate = record.candidate or {}
        lines.append(
            f"| {record.index} | {record.stage} | {record.outcome.replace('_', ' ')} | {_fmt(valid)} | "
            f"{_fmt(change, '+.5f')} | {_fmt(_value(record, 'valid', 'logloss'))} | "
            f"{_fmt(_value(record, 'test', metric))} | {_fmt(candidate.get('parameters'), ',')} | "
            f"{_fmt(candidate.get('samples_per_second'), ',.0f')} | {record.seconds / 60:.1f} | "
            f"{decision_text(record, metric).replace('|', '/')} |")
    lines += ["", "Test figures are shown, never used: every decision is taken on validation.", ""]
    pictures = _plots(output_dir, records, metric, after)
    lines += [f"![{name}]({name})" for name in pictures] + [""]
    for record in records:
        lines.append(f"## {record.index}. {record.stage}: {record.outcome.replace('_', ' ')}")
        lines.append("")
        lines.append(f"{record.reason}.")
        lines.extend(_details(record))
        stage_dir = output_dir / STAGES_DIR / f"{record.index:02d}-{record.stage}"
        for pattern in _STAGE_PICTURES.get(record.stage, ()):
            for picture in sorted(stage_dir.glob(pattern)):
                lines.append(f"\n![{picture.name}]({picture.relative_to(output_dir)})")
        lines.append("")
    path = output_dir / REPORT_FILE
    write_text_atomic(path, "\n".join(lines) + "\n")
    if console is not None:
        console.print(f"report: {path}", highlight=False)
    return path


def _plots(output_dir: Path, records: list[StageRecord], metric: str, held: list[float]) -> list[str]:
    """Draw the two PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r.index}. {r.stage}" for r in records]
    valid = [_value(r, "valid", metric) for r in records]
    colours = {"kept": "tab:green", "final": "tab:blue", "rolled_back": "tab:red"}
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(records)), 4.0))
    axis.step(range(len(records)), held, where="post", color="grey", alpha=0.5, label="model held")
    for i, (record, value) in enumerate(zip(records, valid)):
        if not math.isnan(value):
            axis.scatter(i, value, color=colours.get(record.outcome, "black"), zorder=3,
                         label=record.outcome.replace("_", " "))
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=8)
    axis.set_xticks(range(len(records)), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(f"valid {metric}")
    axis.set_title("validation by stage")
    figure.tight_layout()
    with atomic_path(output_dir / VALID_PNG) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(records)), 3.6))
    parameters = [float((r.candidate or {}).get("parameters") or 0) for r in records]
    speed = [float((r.candidate or {}).get("samples_per_second") or 0) for r in records]
    bar_colours = [colours.get(r.outcome, "lightgrey") for r in records]
    left.bar(range(len(records)), parameters, color=bar_colours)
    left.set_title("model parameters")
    right.bar(range(len(records)), speed, color=bar_colours)
    right.set_title("training samples/s")
    for axis in (left, right):
        axis.set_xticks(range(len(records)), names, rotation=30, ha="right", fontsize=8)
    figure.tight_layout()
    with atomic_path(output_dir / COST_PNG) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return [VALID_PNG, COST_PNG]

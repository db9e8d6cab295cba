"""OptFS's stages (Lyu et al. 2023, "Optimizing Feature Set for Click-Through Rate Prediction", WWW): ``search``
(Section 3.2: the recipe's model with :class:`~ctrlab.gates.optfs.OptFSGate` on every feature value, learning by
continuation) and ``retrain`` (Section 3.3: the run's own final training on the kept values, from rewound weights),
on the search framework (:mod:`ctrlab.search.framework`).

Outputs under ``<run>/feature_search/``:

``kept_values.json``
    the kept set (:class:`~ctrlab.data.kept_values.KeptValues`: per table its size and kept value ids, per numeric
    field whether it is kept); ``processor.json`` of the run carries the same set, so serving applies it.
``kept_features.csv``, ``kept_features.png``
    per field: ``values_total``, ``values_kept``, ``kept_share`` and ``kept_occurrence_share`` (the share of the
    field's training occurrences of in-vocabulary values whose value is kept), and a bar chart of both shares.
``gates.safetensors``
    the gate logits ``m`` at the end of the search (``logits``, laid out unit by unit).
``rewind.safetensors``
    the searched model's weights after ``rewind_epoch`` epochs (without the gates): where ``retrain`` starts.

The retrained model is the recipe's model built for the restricted layout: no gate (the kept set is applied to the
data), every table one row per kept value. Its weights start from ``rewind.safetensors``: a kept value's row is
copied from the rewound table (tables whose rows are one per value: per-field plain and torchrec, mixed-dimension);
a hashed or multiplexed table, whose rows are shared by hashing the (renumbered) ids, keeps its initial values, and
the summary says so.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.kept_values import KeptValues
from ctrlab.data.layout import FIRST_VALUE_ID, FeatureLayout
from ctrlab.embeddings.base import FeatureEmbedding
from ctrlab.embeddings.mixed_dim import EmbeddingUnits
from ctrlab.errors import DataError
from ctrlab.gates.optfs import OptFSConfig, OptFSGate
from ctrlab.models.ctr_model import CTRModel
from ctrlab.run_dir import FEATURE_SEARCH_DIR
from ctrlab.search.framework import SearchContext, SearchData, SearchMethod, SearchOutcome, register
from ctrlab.train.hooks import ParameterGroup, TrainingHooks
from ctrlab.train.trainer import EpochRecord, Trainer
from ctrlab.utils.io import atomic_path, write_json_atomic

KEPT_VALUES_FILE = "kept_values.json"
KEPT_FEATURES_FILE = "kept_features.csv"
KEPT_FEATURES_PLOT = "kept_features.png"
GATES_FILE = "gates.safetensors"
REWIND_FILE = "rewind.safetensors"
EMBEDDING_PARTS = ("embedding.", "linear.")


# ------------------------------------------------------------------------------------------- the kept set
def kept_values(gate_kept: torch.Tensor, layout: FeatureLayout) -> KeptValues:
    """The gate's hard mask (``[Σ rows]``, unit by unit) as a :class:`KeptValues` of ``layout``."""
    units = EmbeddingUnits.from_layout(layout)
    mask = gate_kept.cpu().numpy().astype(bool)
    tables, numeric = {}, {}
    for unit, (name, start, rows) in enumerate(zip(units.names, units.offsets, units.rows)):
        if units.is_table(unit):
            tables[name] = mask[start:start + rows]
        else:
            numeric[name] = bool(mask[start])
    return KeptValues(tables, numeric)


def field_rows(kept: KeptValues, layout: FeatureLayout, train: FeatureBatch) -> list[dict[str, Any]]:
    """One row per field of ``layout``: ``values_total``, ``values_kept``, ``kept_share`` and
    ``kept_occurrence_share`` (the share of the field's training occurrences of in-vocabulary values, ids >= 2,
    whose value is kept; for a numeric field 1 or 0)."""
    rows = []
    categorical = train.categorical.cpu().numpy()
    for spec in layout.fields:
        if spec.kind == "numeric":
            keep = kept.numeric.get(spec.name, True)
            rows.append(_row(spec.name, spec.kind, 1, int(keep), float(keep)))
            continue
        assert spec.table is not None
        mask = kept.tables.get(spec.table, np.ones(spec.vocab_size, dtype=bool))
        if spec.kind == "categorical":
            ids = categorical[:, layout.categorical.index(spec)]
        else:
            ids = train.sequences[spec.name].cpu().numpy().reshape(-1)
        counts = np.bincount(ids[ids >= FIRST_VALUE_ID], minlength=len(mask))
        seen = int(counts[FIRST_VALUE_ID:].sum())
        share = float(counts[FIRST_VALUE_ID:][mask[FIRST_VALUE_ID:]].sum() / seen) if seen else 1.0
        total = len(mask) - FIRST_VALUE_ID
        rows.append(_row(spec.name, spec.kind, total, int(mask[FIRST_VALUE_ID:].sum()), share))
    return rows


def _row(name: str, kind: str, total: int, kept: int, occurrence_share: float) -> dict[str, Any]:
    return {"field": name, "kind": kind, "values_total": total, "values_kept": kept,
            "kept_share": kept / total if total else 1.0, "kept_occurrence_share": occurrence_share}


@dataclass
class KeptFeatureSet:
    """OptFS's typed artefact: the kept values and their per-field figures (see the module docstring)."""

    kept: KeptValues
    fields: list[dict[str, Any]]
    logits: torch.Tensor | None = None

    def save(self, directory: Path) -> None:
        write_json_atomic(directory / KEPT_VALUES_FILE, self.kept.to_dict())
        with atomic_path(directory / KEPT_FEATURES_FILE) as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=["field", "kind", "values_total", "values_kept", "kept_share",
                                                       "kept_occurrence_share"])
                writer.writeheader()
                for row in self.fields:
                    writer.writerow({**row, "kept_share": f"{row['kept_share']:.6f}",
                                     "kept_occurrence_share": f"{row['kept_occurrence_share']:.6f}"})
        if self.logits is not None:
            with atomic_path(directory / GATES_FILE) as tmp:
                save_file({"logits": self.logits.detach().cpu().contiguous()}, str(tmp))
        plot_kept_features(self.fields, directory / KEPT_FEATURES_PLOT)

    def summary(self) -> dict[str, Any]:
        total = sum(r["values_total"] for r in self.fields if r["kind"] != "sequence")
        kept = sum(r["values_kept"] for r in self.fields if r["kind"] != "sequence")
        return {"values_total": total, "values_kept": kept, "kept_share": kept / total if total else 1.0,
                "fields": {r["field"]: {"kept_share": r["kept_share"],
                                        "kept_occurrence_share": r["kept_occurrence_share"]} for r in self.fields}}

    @staticmethod
    def load_kept(path: Path, layout: FeatureLayout) -> KeptValues:
        """The kept set saved in ``path``, checked against ``layout`` (the unrestricted one)."""
        try:
            kept = KeptValues.from_dict(json.loads(path.read_text(encoding="utf-8")))
            kept.restrict_layout(layout)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{path}: not a kept feature set for this recipe's features ({error})") from None
        return kept


def plot_kept_features(fields: list[dict[str, Any]], path: Path) -> None:
    """Per field, the share of values kept and the share of training occurrences kept (needs matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib comes with the tracking extra
        return
    names = [r["field"] for r in fields]
    y = np.arange(len(names))
    figure = Figure(figsize=(6.0, 0.9 + 0.28 * len(names)), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.barh(y - 0.2, [r["kept_share"] for r in fields], height=0.4, label="values kept")
    ax.barh(y + 0.2, [r["kept_occurrence_share"] for r in fields], height=0.4, label="training occurrences kept")
    ax.set_yticks(y, names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("share kept")
    ax.set_title("OptFS: kept feature values per field")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")


# ------------------------------------------------------------------------------------------------ the search
def search_hooks(gate: OptFSGate, config: OptFSConfig) -> TrainingHooks:
    """The search's additions to training: ``sparsity_weight · Σ gates`` in the loss, the temperature of each
    epoch set before it trains, and the gate logits in a group of their own (Adam, ``gate_lr``, no weight decay,
    not lowered by ``lr_on_plateau``)."""

    def set_temperature(epoch: int) -> None:
        gate.temperature = config.temperature(epoch)

    terms = [lambda batch: config.sparsity_weight * gate.penalty()] if config.sparsity_weight > 0 else []
    return TrainingHooks(loss_terms=terms, before_epoch=[set_temperature],
                         parameter_groups=[ParameterGroup("gates", [gate.logits], lr=config.gate_lr)])


def weights_without_gate(model: CTRModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items() if not k.startswith("gate.")}


def search(context: SearchContext) -> tuple[OptFSGate, dict[str, torch.Tensor], dict[str, Any]]:
    """Stage ``search``: train the gated model for ``search_epochs`` epochs (no early stopping: the temperature
    schedule defines the search; the gates are those of the last epoch); returns the gate, the weights after
    ``rewind_epoch`` epochs and the stage's figures."""
    config: OptFSConfig = context.config
    gate = OptFSGate(config, context.layout)
    model = context.build_network(gate=gate)
    rewind: dict[str, torch.Tensor] = weights_without_gate(model) if config.rewind_epoch == 0 else {}

    def after_epoch(record: EpochRecord) -> None:
        kept = gate.kept()
        share = float(kept[gate.searched].float().mean()) if bool(gate.searched.any()) else 1.0
        context.say(f"epoch {record.epoch}: temperature {gate.temperature:.3g}, values kept {share:.1%}")
        context.log_metrics({"search.train_loss": record.train_loss, "search.temperature": gate.temperature,
                             "search.kept_share": share,
                             **{f"search.valid_{k}": v for k, v in record.valid.items()}}, step=record.epoch)
        if record.epoch == config.rewind_epoch:
            rewind.update(weights_without_gate(model))

    train_config = context.recipe.train.model_copy(update={"epochs": config.search_epochs, "early_stopping": None})
    trainer = Trainer(model, train_config, context.device, seed=context.recipe.seed, console=context.console,
                      callbacks=[after_epoch], hooks=search_hooks(gate, config), keep_best=False)
    context.say(f"stage search: {config.search_epochs} epochs, temperature 1 -> {config.final_temperature:g}, "
                f"sparsity weight {config.sparsity_weight:g}, gate lr {config.gate_lr:g}, "
                f"{int(gate.searched.sum()):,} values")
    fit = trainer.fit(context.batches["train"], context.batches["valid"])
    with atomic_path(context.directory / REWIND_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in rewind.items()}, str(tmp))
    summary = {"epochs_run": len(fit.history), "final_valid": fit.history[-1].valid if fit.history else {},
               "history": [r.as_dict() for r in fit.history]}
    return gate, rewind, summary


def load_rewind(context: SearchContext) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(context.copy_earlier(REWIND_FILE))).items()}


# ---------------------------------------------------------------------------------------------- the outcome
@dataclass
class OptFSOutcome(SearchOutcome):
    """Restricts the run's data to the kept set and starts the final model from the rewound weights."""

    full_layout: FeatureLayout | None = None
    rewind: dict[str, torch.Tensor] = field(default_factory=dict)
    build_source: Callable[[], CTRModel] | None = None

    @property
    def kept(self) -> KeptValues:
        assert isinstance(self.artefact, KeptFeatureSet)
        return self.artefact.kept

    def prepare_data(self, data: SearchData) -> None:
        layout = data.layout
        data.processor.restrict(self.kept)
        data.batches = {name: self.kept.apply_to_batch(batch, layout) for name, batch in data.batches.items()}

    def prepare_model(self, model: CTRModel) -> None:
        """Rewind: the search's weights after ``rewind_epoch`` epochs, kept rows only (see the module docstring)."""
        assert self.build_source is not None
        source = self.build_source()
        # A later stage may have changed the model since the search (another embedding kind, other widths): what
        # still fits is rewound, the rest starts from the recipe's own initial values, and the summary says which.
        shapes = {key: value.shape for key, value in source.state_dict().items()}
        fitting = {k: v for k, v in self.rewind.items() if k in shapes and shapes[k] == v.shape}
        changed = sorted(k for k in self.rewind if k not in fitting)
        source.load_state_dict(fitting, strict=False)
        target = model.state_dict()
        fresh: list[str] = []
        with torch.no_grad():
            for key, value in source.state_dict().items():
                if key in target and key not in changed and not key.startswith(EMBEDDING_PARTS + ("gate.",)):
                    # A later search (a pair layer) may have changed a dense part's shape: it starts afresh.
                    if target[key].shape == value.shape:
                        target[key].copy_(value)
                    else:
                        fresh.append(key)
            tables: dict[str, str] = {}
            for part in ("embedding", "linear"):
                module: FeatureEmbedding | None = getattr(model, part)
                origin: FeatureEmbedding | None = getattr(source, part)
                if module is not None and origin is not None:
                    if any(key.startswith(f"{part}.") for key in changed):  # its own initial values stay
                        tables[part] = "initial values"
                        continue
                    copied = module.load_kept_rows(origin, self.kept)
                    tables[part] = "rewound rows" if copied else "initial values"
        if fresh or changed:
            tables["initial values (the model changed since the search)"] = ", ".join(sorted({*fresh, *changed}))
        self.summary["rewind"] = tables


@register
class OptFSSearch(SearchMethod):
    """OptFS (Lyu et al. 2023): stages ``search`` and ``retrain`` of ``gate.kind: optfs``."""

    name = "optfs"
    directory = FEATURE_SEARCH_DIR

    def run(self, context: SearchContext) -> OptFSOutcome:
        config: OptFSConfig = context.config
        layout = context.layout
        summary: dict[str, Any] = {}
        logits = None
        if "search" in config.stages:
            gate, rewind, summary["search"] = search(context)
            kept = kept_values(gate.kept(), layout)
            logits = gate.logits.detach().cpu()
        else:
            kept = KeptFeatureSet.load_kept(context.copy_earlier(KEPT_VALUES_FILE), layout)
            rewind = load_rewind(context)
        artefact = KeptFeatureSet(kept, field_rows(kept, layout, context.batches["train"]), logits)
        figures = artefact.summary()
        context.say(f"kept {figures['values_kept']:,} of {figures['values_total']:,} feature values "
                    f"({figures['kept_share']:.1%}); " + " ".join(
                        f"{r['field']}={r['kept_share']:.0%}" for r in artefact.fields))

        def build_source() -> CTRModel:
            return context.build_network_for(layout, gate=OptFSGate(config, layout))

        return OptFSOutcome(artefact, retrain=True, summary=summary, full_layout=layout, rewind=rewind,
                            build_source=build_source)

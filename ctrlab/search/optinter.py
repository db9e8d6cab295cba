"""OptInter's stages (Lyu et al., ICDE 2022, "Memorize, Factorize, or be Naive: Learning Optimal Feature Interaction
Methods for CTR Prediction"): ``search`` (Section III-C/D: the recipe's model with
:class:`~ctrlab.interactions.optinter.PairMixture` as its pair layer, every candidate pair a softmax mixture of
memorise, factorise and naive) and ``retrain`` (Section III-E: the run's own final training of a fresh model with
each pair's argmax method), on the search framework (:mod:`ctrlab.search.framework`).

Outputs under ``<run>/interaction_search/``:

``pair_choices.json``
    every candidate pair's method (what a later run's ``interaction.from_run`` reads); ``processor.json`` of the
    run carries the same decision, so serving builds the pair layer from it.
``pairs.csv``, ``pairs.png``
    per pair: ``field_a``, ``field_b``, ``method``, the final weight of each method (softmax of ``alpha`` at the
    selected epoch's temperature) and the rows the pair's table stores (memorised pairs only); a field-by-field
    heat map of the chosen methods with the winning weight in each cell.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctrlab.data.crosses import check_choices
from ctrlab.data.layout import FeatureLayout
from ctrlab.errors import DataError
from ctrlab.interactions.base import MEMORIZE, METHODS, NAIVE
from ctrlab.interactions.optinter import OptInterConfig, PairMixture
from ctrlab.run_dir import INTERACTION_SEARCH_DIR
from ctrlab.search.framework import SearchContext, SearchData, SearchMethod, SearchOutcome, register
from ctrlab.train.hooks import ParameterGroup, TrainingHooks
from ctrlab.train.trainer import EpochRecord, Trainer
from ctrlab.utils.io import atomic_path, write_json_atomic

CHOICES_FILE = "pair_choices.json"
PAIRS_FILE = "pairs.csv"
PAIRS_PLOT = "pairs.png"


@dataclass
class PairChoices:
    """OptInter's typed artefact: each candidate pair's method (``choices``, by cross name), the pairs' fields and
    table rows, and the final method weights when a search ran (``weights``: name -> [memorize, factorize,
    naive])."""

    layout: FeatureLayout
    choices: dict[str, str]
    weights: dict[str, list[float]] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for cross in self.layout.crosses:
            method = self.choices[cross.name]
            weights = self.weights.get(cross.name, [float("nan")] * len(METHODS))
            out.append({"field_a": cross.first, "field_b": cross.second, "method": method,
                        **{f"weight_{m}": w for m, w in zip(METHODS, weights)},
                        "table_rows": cross.rows if method == MEMORIZE else 0, "hashed": cross.hashed})
        return out

    def save(self, directory: Path) -> None:
        write_json_atomic(directory / CHOICES_FILE, {"choices": self.choices, "weights": self.weights})
        rows = self.rows()
        with atomic_path(directory / PAIRS_FILE) as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
        plot_pairs(self.layout, self.choices, self.weights, directory / PAIRS_PLOT)

    def summary(self) -> dict[str, Any]:
        counts = {m: sum(1 for c in self.choices.values() if c == m) for m in METHODS}
        memorized_rows = sum(r["table_rows"] for r in self.rows())
        return {"pairs": len(self.choices), **{f"pairs_{m}": n for m, n in counts.items()},
                "memorized_rows": memorized_rows}

    @staticmethod
    def load(path: Path, layout: FeatureLayout) -> dict[str, str]:
        """The choices saved in ``path``, checked against ``layout``'s crosses (the undecided candidates)."""
        try:
            choices = json.loads(path.read_text(encoding="utf-8"))["choices"]
            if not isinstance(choices, dict):
                raise ValueError("its choices are not a mapping of pair to method")
            check_choices([cross.name for cross in layout.crosses], choices)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}: not pair choices for this recipe's crosses ({error})") from None
        return {str(k): str(v) for k, v in choices.items()}

    @staticmethod
    def load_weights(path: Path, choices: dict[str, str]) -> dict[str, list[float]]:
        """The method weights saved in ``path`` beside ``choices`` (a searching run's), so that a run reusing the
        choices writes the same files; empty where the file holds none (or not one weight per method and pair)."""
        try:
            weights = json.loads(path.read_text(encoding="utf-8")).get("weights")
        except (OSError, ValueError, AttributeError):
            return {}
        if not isinstance(weights, dict) or set(weights) != set(choices) or not all(
                isinstance(w, list) and len(w) == len(METHODS)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w) for w in weights.values()):
            return {}
        return {str(k): [float(x) for x in w] for k, w in weights.items()}


def plot_pairs(layout: FeatureLayout, choices: dict[str, str], weights: dict[str, list[float]], path: Path) -> None:
    """Field-by-field heat map: each candidate pair's cell coloured by its method, labelled with the winning weight
    (needs matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:  # pragma: no cover - matplotlib comes with the tracking extra
        return
    fields = [f.name for f in layout.categorical
              if any(f.name in (c.first, c.second) for c in layout.crosses)]
    position = {name: i for i, name in enumerate(fields)}
    grid = np.full((len(fields), len(fields)), np.nan)
    colours = ["#d62728", "#1f77b4", "#c7c7c7"]  # memorize, factorize, naive
    size = max(4.0, 0.45 * len(fields) + 2.0)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for cross in layout.crosses:
        i, j = position[cross.second], position[cross.first]
        method = METHODS.index(choices[cross.name])
        grid[i, j] = method
        if cross.name in weights and len(fields) <= 30:
            ax.text(j, i, f"{weights[cross.name][method]:.2f}", ha="center", va="center", fontsize="x-small")
    ax.imshow(np.ma.masked_invalid(grid), cmap=ListedColormap(colours), vmin=-0.5, vmax=2.5)
    ax.set_xticks(range(len(fields)), fields, rotation=90, fontsize="small")
    ax.set_yticks(range(len(fields)), fields, fontsize="small")
    ax.set_title("OptInter: method per field pair")
    ax.legend(handles=[Patch(color=c, label=m) for c, m in zip(colours, METHODS)], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")


# ------------------------------------------------------------------------------------------------ the search
def search_hooks(mixture: PairMixture, config: OptInterConfig) -> TrainingHooks:
    """The search's additions to training: the temperature of each epoch set before it trains, and ``alpha`` in a
    group of its own (Adam, ``arch_lr``, no weight decay, not lowered by ``lr_on_plateau``), stepped on the
    training loss or, with ``bilevel``, on validation batches."""

    def set_temperature(epoch: int) -> None:
        mixture.temperature = config.temperature(epoch)

    group = ParameterGroup("alpha", [mixture.alpha], lr=config.arch_lr,
                           step="validation" if config.bilevel else "train")
    return TrainingHooks(before_epoch=[set_temperature], parameter_groups=[group])


def search(context: SearchContext) -> tuple[dict[str, str], dict[str, list[float]], dict[str, Any]]:
    """Stage ``search``: train the mixture network for at most ``search_epochs`` epochs (early stopping and the
    kept epoch as ``train.early_stopping`` says, on the validation split); returns each pair's argmax method at the
    kept epoch, the method weights there and the stage's figures."""
    config: OptInterConfig = context.config
    built: list[PairMixture] = []

    def mixture_layer(layout: FeatureLayout, dim: int, init_std: float) -> PairMixture:
        built.append(PairMixture(layout, dim, init_std, gumbel=config.gumbel))
        return built[-1]

    model = context.build_network(interaction=mixture_layer)
    mixture = built[0]
    temperatures: dict[int, float] = {}

    def after_epoch(record: EpochRecord) -> None:
        temperatures[record.epoch] = mixture.temperature
        counts = {m: 0 for m in METHODS}
        for method in mixture.choices().values():
            counts[method] += 1
        context.say(f"epoch {record.epoch}: temperature {mixture.temperature:.3g}, argmax "
                    + " ".join(f"{m} {n}" for m, n in counts.items()))
        context.log_metrics({"search.train_loss": record.train_loss, "search.temperature": mixture.temperature,
                             **{f"search.pairs_{m}": float(n) for m, n in counts.items()},
                             **{f"search.valid_{k}": v for k, v in record.valid.items()}}, step=record.epoch)

    train_config = context.recipe.train.model_copy(update={"epochs": config.search_epochs})
    trainer = Trainer(model, train_config, context.device, seed=context.recipe.seed, console=context.console,
                      callbacks=[after_epoch], hooks=search_hooks(mixture, config), keep_best=True)
    context.say(f"stage search: {len(mixture.names)} pairs, at most {config.search_epochs} epochs, temperature "
                f"{config.initial_temperature:g} -> {config.final_temperature:g}, arch lr {config.arch_lr:g}"
                f"{', bi-level' if config.bilevel else ''}{', Gumbel noise' if config.gumbel else ''}")
    fit = trainer.fit(context.batches["train"], context.batches["valid"])
    kept_epoch = fit.best_epoch or (fit.history[-1].epoch if fit.history else 0)
    mixture.temperature = temperatures.get(kept_epoch, mixture.temperature)
    mixture.eval()
    with torch.no_grad():
        weights = F.softmax(mixture.alpha.detach().float() / mixture.temperature, dim=1).cpu().tolist()
    summary = {"epochs_run": len(fit.history), "kept_epoch": kept_epoch, "best_valid": fit.best_valid,
               "history": [r.as_dict() for r in fit.history]}
    return mixture.choices(), dict(zip(mixture.names, weights)), summary


# ---------------------------------------------------------------------------------------------- the outcome
@dataclass
class OptInterOutcome(SearchOutcome):
    """Records the decided methods in the run's processor (naive pairs' cross ids are dropped from the data), so
    the final model, built from the recipe for that layout, has the decided pair layer."""

    choices: dict[str, str] = field(default_factory=dict)

    def prepare_data(self, data: SearchData) -> None:
        names = [cross.name for cross in data.layout.crosses]
        used = torch.tensor([i for i, name in enumerate(names) if self.choices[name] != NAIVE], dtype=torch.long)
        data.processor.choose_pairs(self.choices)
        data.batches = {split: replace(batch, crosses=batch.crosses[:, used.to(batch.crosses.device)]
                                       if batch.crosses is not None else None)
                        for split, batch in data.batches.items()}


@register
class OptInterSearch(SearchMethod):
    """OptInter (Lyu et al. 2022): stages ``search`` and ``retrain`` of ``interaction.kind: optinter``."""

    name = "optinter"
    directory = INTERACTION_SEARCH_DIR

    def run(self, context: SearchContext) -> OptInterOutcome:
        config: OptInterConfig = context.config
        layout = context.layout
        summary: dict[str, Any] = {}
        weights: dict[str, list[float]] = {}
        if "search" in config.stages:
            choices, weights, summary["search"] = search(context)
        else:
            path = context.copy_earlier(CHOICES_FILE)
            choices = PairChoices.load(path, layout)
            weights = PairChoices.load_weights(path, choices)
        artefact = PairChoices(layout, choices, weights)
        figures = artefact.summary()
        context.say(f"{figures['pairs']} pairs: memorize {figures['pairs_memorize']}, factorize "
                    f"{figures['pairs_factorize']}, naive {figures['pairs_naive']}; memorised tables "
                    f"{figures['memorized_rows']:,} rows")
        return OptInterOutcome(artefact, retrain=True, summary=summary, choices=choices)

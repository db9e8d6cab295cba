"""Training throughput of ctrlab's DeepFM against a bare hand-written PyTorch loop.

What it measures
    Samples per second of training (forward + backward + optimiser step) on the CPU, two ways, on the SAME model
    and the SAME data:

    * ``ctrlab Trainer``: :meth:`ctrlab.train.trainer.Trainer.train_epoch`, the library's real training path (its
      :class:`~ctrlab.data.batches.BatchIterator` with per-epoch shuffling, the BCE loss, the optimiser set-up of
      :func:`~ctrlab.train.optim.build_optimizers`, loss bookkeeping), on a model from
      :func:`~ctrlab.models.build_model`;
    * ``bare PyTorch loop``: a minimal DeepFM ``nn.Module`` written out in this file (one concatenated embedding
      table looked up with ``F.embedding`` and field offsets, a width-1 first-order table the same way, the FM term,
      the same ``Linear -> BatchNorm -> ReLU -> Dropout`` MLP, a bias), started from ctrlab's initial weights, trained
      with ``torch.optim.Adam`` (same lr, same weight decay per parameter group; ``SparseAdam`` plus the same lazy L2
      term with ``--sparse``) by ``perm = torch.randperm(n); for i in range(0, n, B): idx = perm[i:i+B]; ...`` over
      the very tensors the Trainer gets (ids already int64, in memory).

    The model is the one ``recipes/frappe_deepfm.yaml`` trains (embedding 10, MLP 400-400-400 with batch norm and
    dropout 0.2, Adam lr 1e-3, embedding weight decay 0.05, batch 4096). Before timing, the script asserts that both
    models give the same logits (to 1e-5) on a batch, and that one training step through each path gives the same
    loss and the same updated weights, so the comparison is provably between the same model and the same update.
    During timing both sides shuffle with generators seeded alike and start each round from the same global RNG state
    (dropout masks), so they train on the same batches and print the same epoch losses (bit for bit on CPU).

    After one warm-up epoch per side, the sides are timed epoch by epoch with ``time.perf_counter()``, alternating
    (ctrlab, bare, ctrlab, bare, ...) so that drift in the machine's speed hits both alike. Reported: the median
    samples/s of each side and their ratio ctrlab / bare (the aim is >= 0.9), with the settings (torch version,
    threads, CPU model, date), as a Markdown table ready to paste into the README.

Data
    By default the Frappe x1 card (train split, 202,027 rows) read through :func:`ctrlab.data.pipeline.prepare_data`
    when ``$CTRLAB_DATA_DIR`` (or ``--data-dir``) holds it, else ctrlab's synthetic click data (``--rows`` rows
    split 80/10/10, the quickstart's 12 categorical and 4 numeric fields; the train split is used).

Processes (``--processes 2``)
    Instead of the comparison above: the same recipe trained by ``ctrlab train --nproc N`` (torchrun, gloo,
    DistributedDataParallel; the global batch stays ``--batch-size``) for 1 process with ``--threads`` threads,
    1 process with 1 thread, and N processes with 1 thread each (the same cores as the first). Each is a real run
    (``--epochs`` + 1 epochs, early stopping off, tracking off) whose per-epoch samples/s (rows of the whole
    training split over the epoch's training seconds, as ``metrics.json`` records them) are read back; reported is
    the median over the epochs after the first, and each configuration's ratio to 1 process with ``--threads``.

How to run
    make bench                                   # = .venv/bin/python benchmarks/throughput.py
    python benchmarks/throughput.py --data synthetic --rows 300000 --epochs 3
    python benchmarks/throughput.py --sparse --json runs/bench.json
    python benchmarks/throughput.py --processes 2 --epochs 3       # 1 vs 2 processes (DDP, gloo)
    python benchmarks/throughput.py --help

    Run it on an otherwise idle machine: the two sides share it, and other load makes the ratio noisy. With
    ``--threads`` equal to the core count, any other busy process makes every OpenMP parallel region wait for a
    descheduled thread (epochs can become 10-20x slower and erratic); on a shared machine use ``--threads 1``.
    The script warns when one side's epoch times differ by more than 15%.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from ctrlab.config.loader import validate_recipe
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.data.pipeline import prepare_data
from ctrlab.datasets.cards import load_card
from ctrlab.models import build_model
from ctrlab.models.ctr_model import CTRModel
from ctrlab.train.trainer import Trainer

SEED = 2021
FRAPPE_CARD = "frappe_x1"

# The synthetic data of recipes/quickstart.yaml (rows set by --rows).
SYNTHETIC_DATASET: dict[str, Any] = {
    "synthetic": {"numeric_fields": 4, "categorical_fields": 12, "informative_fields": 4, "interaction_pairs": 3},
    "split": {"kind": "random", "fractions": [0.8, 0.1, 0.1]},
}
SYNTHETIC_FEATURES: dict[str, Any] = {
    "defaults": {"min_count": 2},
    "categorical": [f"C{i}" for i in range(1, 13)],
    "numeric": [{"name": f"I{i}", "transform": "log_standardize"} for i in range(1, 5)],
}


# ------------------------------------------------------------------------------------------------ the recipe
def make_recipe(args: argparse.Namespace) -> Any:
    """The recipe of recipes/frappe_deepfm.yaml with the benchmark's data, widths, batch size and sparsity."""
    if args.data == "frappe":
        dataset: dict[str, Any] = {"card": FRAPPE_CARD}
        features: dict[str, Any] = {}
    else:
        dataset = copy.deepcopy(SYNTHETIC_DATASET)
        dataset["synthetic"]["rows"] = args.rows
        features = copy.deepcopy(SYNTHETIC_FEATURES)
    data = {
        "name": "throughput",
        "seed": SEED,
        "dataset": dataset,
        "features": features,
        "embedding": {"kind": "per_field", "dim": args.embedding_dim, "sparse": args.sparse},
        "model": {
            "block": "deepfm",
            "linear": True,
            "mlp": {"hidden": args.hidden, "activation": "relu", "dropout": 0.2, "batch_norm": True},
        },
        "train": {
            "device": "cpu",
            "batch_size": args.batch_size,
            "epochs": 100,
            "num_threads": args.threads,
            "progress": False,
            "optimizer": {"name": "adam", "lr": 1.0e-3, "embedding_weight_decay": 0.05, "dense_weight_decay": 0.0},
        },
    }
    return validate_recipe(data, "benchmarks/throughput.py")


# ------------------------------------------------------------------------------------- the bare model and loop
class BareDeepFM(nn.Module):
    """DeepFM written out by hand: logit = b + Σ w_i x_i + Σ_{i<j} <v_i, v_j> + MLP([v_1; ...; v_F]).

    Categorical fields: one ``[Σ rows, D]`` table (and one ``[Σ rows, 1]`` first-order table) indexed by
    ``id + field offset``. Numeric fields: ``v_i = x_i · u_i`` (and ``w_i = x_i · a_i``).
    """

    def __init__(self, offsets: torch.Tensor, rows: int, num_numeric: int, dim: int, hidden: list[int],
                 dropout: float, batch_norm: bool, sparse: bool) -> None:
        super().__init__()
        self.register_buffer("offsets", offsets.clone(), persistent=False)
        self.sparse = sparse
        self.num_numeric = num_numeric
        self.table = nn.Parameter(torch.zeros(rows, dim))
        self.numeric_vectors = nn.Parameter(torch.zeros(num_numeric, dim))
        self.first_order = nn.Parameter(torch.zeros(rows, 1))
        self.numeric_first_order = nn.Parameter(torch.zeros(num_numeric, 1))
        layers: list[nn.Module] = []
        width = (offsets.numel() + num_numeric) * dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor | None) -> torch.Tensor:
        ids = categorical + self.offsets
        v = F.embedding(ids, self.table, sparse=self.sparse)  # [B, F, D]
        w = F.embedding(ids, self.first_order, sparse=self.sparse)  # [B, F, 1]
        if self.num_numeric:
            assert numeric is not None
            x = numeric.unsqueeze(-1)
            v = torch.cat([v, x * self.numeric_vectors], dim=1)
            w = torch.cat([w, x * self.numeric_first_order], dim=1)
        fm = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)
        deep = self.mlp(v.flatten(1)).squeeze(-1)
        return self.bias + (fm + deep) + w.sum(dim=(1, 2))

    def lazy_l2(self, categorical: torch.Tensor) -> torch.Tensor:
        """0.5 · Σ‖row‖² over the distinct rows of both tables in the batch (the sparse tables' weight decay)."""
        rows = torch.unique(categorical + self.offsets)
        return 0.5 * (F.embedding(rows, self.table, sparse=True).pow(2).sum()
                      + F.embedding(rows, self.first_order, sparse=True).pow(2).sum())


def bare_from_ctrlab(model: CTRModel, layout: FeatureLayout, sparse: bool) -> BareDeepFM:
    """A :class:`BareDeepFM` of the same shape as ``model``, holding a copy of its current weights."""
    if layout.sequence:
        raise SystemExit("the bare model has no sequence fields; use data without them")
    tables = layout.tables()
    starts, total = {}, 0
    for name, rows in tables.items():
        starts[name] = total
        total += rows
    offsets = torch.tensor([starts[f.table] for f in layout.categorical], dtype=torch.long)  # type: ignore[index]
    emb, lin = model.embedding, model.linear
    mlp = model.block.mlp  # type: ignore[union-attr]
    assert emb is not None and lin is not None
    hidden = [m.out_features for m in mlp if isinstance(m, nn.Linear)][:-1]
    dropout = next((m.p for m in mlp if isinstance(m, nn.Dropout)), 0.0)
    batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in mlp)
    bare = BareDeepFM(offsets, max(total, 1), len(layout.numeric), emb.dim, hidden, dropout, batch_norm, sparse)
    with torch.no_grad():
        bare.table.copy_(emb.weight)  # type: ignore[arg-type]
        bare.numeric_vectors.copy_(emb.numeric_weight)  # type: ignore[arg-type]
        bare.first_order.copy_(lin.weight)  # type: ignore[arg-type]
        bare.numeric_first_order.copy_(lin.numeric_weight)  # type: ignore[arg-type]
        bare.bias.copy_(model.bias)
    bare.mlp.load_state_dict(mlp.state_dict(), strict=True)
    return bare


def bare_optimizers(model: BareDeepFM, lr: float, betas: tuple[float, float], eps: float, embedding_decay: float,
                    dense_decay: float, sparse: bool) -> list[torch.optim.Optimizer]:
    """Adam with weight decay ``embedding_decay`` on the embedding parameters and ``dense_decay`` on the rest;
    with ``sparse`` the two tables go to SparseAdam instead (their decay is the lazy L2 term of the loss)."""
    tables = [model.table, model.first_order]
    numeric = [model.numeric_vectors, model.numeric_first_order]
    dense = list(model.mlp.parameters()) + [model.bias]
    embedding = numeric if sparse else tables + numeric
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(
        [{"params": embedding, "weight_decay": embedding_decay}, {"params": dense, "weight_decay": dense_decay}],
        lr=lr, betas=betas, eps=eps)]
    if sparse:
        opts.append(torch.optim.SparseAdam(tables, lr=lr, betas=betas, eps=eps))
    return opts


def bare_epoch(model: BareDeepFM, opts: list[torch.optim.Optimizer], categorical: torch.Tensor,
               numeric: torch.Tensor | None, label: torch.Tensor, batch_size: int, generator: torch.Generator,
               lazy_decay: float) -> float:
    """One shuffled pass; returns the mean training loss."""
    model.train()
    n = label.shape[0]
    total = torch.zeros(())
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        c, y = categorical[idx], label[idx]
        x = numeric[idx] if numeric is not None else None
        loss = F.binary_cross_entropy_with_logits(model(c, x), y)
        if lazy_decay > 0:
            loss = loss + lazy_decay * model.lazy_l2(c) / len(idx)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        total += loss.detach() * len(idx)
    return float(total) / n


# ----------------------------------------------------------------------------------------------- equivalence
def _bare_params(bare: BareDeepFM) -> dict[str, torch.Tensor]:
    return {
        "embedding.weight": bare.table, "embedding.numeric_weight": bare.numeric_vectors,
        "linear.weight": bare.first_order, "linear.numeric_weight": bare.numeric_first_order, "bias": bare.bias,
        **{f"block.mlp.{k}": v for k, v in bare.mlp.named_parameters()},
    }


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"not the same model: {message}")


def check_same_model(model: CTRModel, bare: BareDeepFM, trainer: Trainer, data: FeatureBatch, has_numeric: bool,
                     batch_size: int, lazy_decay: float, tol: float = 1e-5) -> dict[str, float]:
    """Assert both models give the same logits, and that one training step through each path (ctrlab's
    ``train_epoch`` on one batch, the bare loop on the same batch) gives the same loss and weights."""
    batch = data.select(slice(0, batch_size))
    numeric = batch.numeric if has_numeric else None
    assert batch.label is not None
    model.eval()
    bare.eval()
    with torch.no_grad():
        a = model(batch)
        b = bare(batch.categorical, numeric)
    forward_diff = float((a - b).abs().max())
    _require(forward_diff <= tol, f"forward outputs differ by {forward_diff:.3g} (> {tol})")

    # One step on copies (the timed models stay untouched). Same permutation generator seed on both sides, and the
    # same global RNG state before each so that the dropout masks match.
    model_c, bare_c = copy.deepcopy(model), copy.deepcopy(bare)
    trainer_c = Trainer(model_c, trainer.config, trainer.device, seed=SEED, console=trainer.console)
    opt = trainer.config.optimizer
    opts_c = bare_optimizers(bare_c, opt.lr, opt.betas, opt.eps, opt.embedding_weight_decay, opt.dense_weight_decay,
                             bare.sparse)
    state = torch.get_rng_state()
    loss_a = trainer_c.train_epoch(batch)
    torch.set_rng_state(state)
    loss_b = bare_epoch(bare_c, opts_c, batch.categorical, numeric, batch.label, batch_size,
                        torch.Generator().manual_seed(SEED), lazy_decay)
    loss_diff = abs(loss_a - loss_b)
    ctrlab_params = dict(model_c.named_parameters())
    bare_params = _bare_params(bare_c)
    _require(set(ctrlab_params) == set(bare_params), f"parameters {sorted(set(ctrlab_params) ^ set(bare_params))}")
    with torch.no_grad():
        step_diff = max(float((ctrlab_params[k] - bare_params[k]).abs().max()) if bare_params[k].numel() else 0.0
                        for k in bare_params)
    _require(loss_diff <= tol, f"one-step losses differ by {loss_diff:.3g} (> {tol})")
    # Adam moves each weight by about lr on its first step; agreement far below that means the same update.
    _require(step_diff <= tol, f"weights after one step differ by {step_diff:.3g} (> {tol})")
    return {"forward_max_abs_diff": forward_diff, "one_step_loss_diff": loss_diff,
            "one_step_weight_max_abs_diff": step_diff}


# ----------------------------------------------------------------------------------------------------- helpers
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def frappe_available(data_dir: str | None) -> Path | None:
    base = data_dir or os.environ.get("CTRLAB_DATA_DIR")
    if not base:
        return None
    path = Path(base).expanduser()
    return path if load_card(FRAPPE_CARD).status(path).available else None


def parse_hidden(text: str) -> list[int]:
    try:
        hidden = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes comma-separated widths, got {text!r}") from None
    if not hidden or min(hidden) < 1:
        raise argparse.ArgumentTypeError(f"--hidden takes positive widths, got {text!r}")
    return hidden


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["frappe", "synthetic"], default=None,
                        help="default: frappe when the data directory has the Frappe x1 card, else synthetic")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $CTRLAB_DATA_DIR)")
    parser.add_argument("--rows", type=int, default=300_000,
                        help="synthetic rows before the 80/10/10 split (default 300000)")
    parser.add_argument("--batch-size", type=int, default=4096, help="default 4096")
    parser.add_argument("--epochs", type=int, default=2,
                        help="measured epochs per side, after 1 warm-up epoch each (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--embedding-dim", type=int, default=10, help="default 10")
    parser.add_argument("--hidden", type=parse_hidden, default=[400, 400, 400], help="MLP widths (default 400,400,400)")
    parser.add_argument("--sparse", action="store_true", help="sparse embedding gradients (SparseAdam) on both sides")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="instead: samples/s of `ctrlab train --nproc N` against 1 process (see the docstring)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1 or args.rows < 10:
        parser.error("--epochs, --batch-size and --threads must be >= 1, --rows >= 10")
    if args.processes is not None and (args.processes < 2 or args.batch_size % args.processes):
        parser.error("--processes must be >= 2 and divide --batch-size")
    if args.data == "frappe" and frappe_available(args.data_dir) is None:
        parser.error("--data frappe: no Frappe x1 files in the data directory (set $CTRLAB_DATA_DIR or --data-dir)")
    if args.data is None:
        args.data = "frappe" if frappe_available(args.data_dir) is not None else "synthetic"
    return args


@dataclass
class Side:
    name: str
    seconds: list[float]
    losses: list[float]

    def rates(self, n: int) -> list[float]:
        return [n / s for s in self.seconds]


def markdown_table(ctrlab: Side, bare: Side, n: int, ratio: float) -> str:
    def row(side: Side) -> str:
        rates = side.rates(n)
        return (f"| {side.name} | {statistics.median(rates):,.0f} | {statistics.median(side.seconds):.2f} | "
                f"{min(rates):,.0f} – {max(rates):,.0f} |")

    return "\n".join([
        "| training path | samples/s (median) | s/epoch (median) | samples/s (min – max) |",
        "|---|---:|---:|---:|",
        row(ctrlab),
        row(bare),
        f"| ratio ctrlab / bare | {ratio:.3f} | | |",
    ])


# ------------------------------------------------------------------------------------------------ processes
def process_runs(args: argparse.Namespace, log: Console) -> int:
    """``--processes N``: samples/s of real ``ctrlab train`` runs on 1 and on N processes (see the docstring)."""
    import subprocess
    import tempfile

    import yaml

    from ctrlab.config.loader import recipe_to_dict

    recipe = recipe_to_dict(make_recipe(args))
    recipe["train"].update({"epochs": args.epochs + 1, "early_stopping": None, "lr_on_plateau": None})
    recipe["tracking"] = {"enabled": False}
    configurations = [(1, args.threads), (1, 1), (args.processes, 1)]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ctrlab-throughput-") as tmp:
        for processes, threads in configurations:
            out = Path(tmp) / f"p{processes}t{threads}"
            recipe["output_dir"], recipe["train"]["num_threads"] = str(out), threads
            recipe["dataset"]["cache_dir"] = str(Path(tmp) / "cache")
            path = Path(tmp) / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
            command = [sys.executable, "-m", "ctrlab", "train", str(path), "--nproc", str(processes)]
            if args.data_dir:
                command += ["--data-dir", str(args.data_dir)]
            log.print(f"{processes} process(es) x {threads} thread(s): {' '.join(command)}")
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            history = json.loads((out / "metrics.json").read_text())["history"]
            rates = [record["samples_per_second"] for record in history[1:]]
            results.append({"processes": processes, "threads_per_process": threads,
                            "samples_per_second_median": statistics.median(rates), "samples_per_second": rates,
                            "test_auc": json.loads((out / "metrics.json").read_text())["test"]["auc"]})
            log.print(f"   median {results[-1]['samples_per_second_median']:,.0f} samples/s over {len(rates)} epochs")
    base = results[0]["samples_per_second_median"]
    lines = ["| processes x threads | samples/s (median) | ratio to 1 x " + str(args.threads) + " | test AUC |",
             "|---|---:|---:|---:|"]
    for result in results:
        lines.append(f"| {result['processes']} x {result['threads_per_process']} | "
                     f"{result['samples_per_second_median']:,.0f} | {result['samples_per_second_median'] / base:.2f} | "
                     f"{result['test_auc']:.4f} |")
    table = "\n".join(lines)
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"DeepFM training throughput by processes (DDP, gloo), {args.data}, global batch {args.batch_size}; torch "
          f"{torch.__version__}, {cpu_model()} ({os.cpu_count()} logical CPUs), {date[:10]}; median of "
          f"{args.epochs} epochs after 1 warm-up epoch; 1-min load average {_loadavg()}.\n")
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": date, "data": args.data, "batch_size": args.batch_size,
                                         "cpu": cpu_model(), "torch": torch.__version__, "runs": results,
                                         "markdown": table}, indent=2) + "\n", encoding="utf-8")
    return 0


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.processes is not None:
        return process_runs(args, Console(stderr=True, highlight=False, soft_wrap=True))
    torch.set_num_threads(args.threads)
    log = Console(stderr=True, highlight=False, soft_wrap=True)
    load_start = _loadavg()
    recipe = make_recipe(args)

    torch.manual_seed(SEED)
    started = time.perf_counter()
    prepared = prepare_data(recipe.dataset, recipe.features, recipe.seed, args.data_dir, log)
    train = FeatureBatch.from_encoded(prepared.splits["train"])
    layout = prepared.processor.layout
    n = len(train)
    log.print(f"data: {args.data}, {n:,} training rows, {len(layout.categorical)} categorical + "
              f"{len(layout.numeric)} numeric fields, {sum(layout.tables().values()):,} table rows "
              f"({time.perf_counter() - started:.1f}s)")

    torch.manual_seed(SEED)
    model = build_model(recipe.embedding, recipe.model, layout)
    trainer = Trainer(model, recipe.train, torch.device("cpu"), seed=SEED, console=log)
    bare = bare_from_ctrlab(model, layout, args.sparse)
    opt = recipe.train.optimizer
    bare_opts = bare_optimizers(bare, opt.lr, opt.betas, opt.eps, opt.embedding_weight_decay, opt.dense_weight_decay,
                                args.sparse)
    lazy_decay = trainer.optimizers.lazy_embedding_decay
    numeric = train.numeric if layout.numeric else None
    bare_gen = torch.Generator().manual_seed(SEED)  # the same shuffles as the Trainer's generator
    label = train.label
    assert label is not None

    checks = check_same_model(model, bare, trainer, train, numeric is not None, args.batch_size, lazy_decay)
    log.print("same model: forward max |diff| {forward_max_abs_diff:.2g}, one-step loss |diff| "
              "{one_step_loss_diff:.2g}, one-step weights max |diff| {one_step_weight_max_abs_diff:.2g}"
              .format(**checks))

    def run_ctrlab() -> float:
        return trainer.train_epoch(train)

    def run_bare() -> float:
        return bare_epoch(bare, bare_opts, train.categorical, numeric, label, args.batch_size, bare_gen, lazy_decay)

    sides = {"ctrlab": (Side("ctrlab Trainer", [], []), run_ctrlab),
             "bare": (Side("bare PyTorch loop", [], []), run_bare)}
    # Both sides shuffle with their own generator seeded alike, and each round starts both from the same global RNG
    # state (dropout masks), so they see the same batches and masks and should log the same losses.
    for epoch in range(args.epochs + 1):  # epoch 0 is the warm-up
        rng = torch.get_rng_state()
        for side, fn in sides.values():
            torch.set_rng_state(rng)
            t0 = time.perf_counter()
            loss = fn()
            seconds = time.perf_counter() - t0
            tag = "warm-up" if epoch == 0 else f"epoch {epoch}/{args.epochs}"
            log.print(f"{tag:>12}  {side.name:<18} {seconds:7.2f}s  {n / seconds:>10,.0f} samples/s  loss {loss:.5f}")
            if not math.isfinite(loss):
                raise SystemExit(f"{side.name}: training loss became {loss}")
            if epoch > 0:
                side.seconds.append(seconds)
                side.losses.append(loss)

    ctrlab, bare_side = sides["ctrlab"][0], sides["bare"][0]
    med_c, med_b = statistics.median(ctrlab.rates(n)), statistics.median(bare_side.rates(n))
    ratio = med_c / med_b
    best_ratio = max(ctrlab.rates(n)) / max(bare_side.rates(n))
    spread = max(max(side.seconds) / min(side.seconds) for side in (ctrlab, bare_side))
    load_end = _loadavg()
    loss_diff = max(abs(a - b) for a, b in zip(ctrlab.losses, bare_side.losses))
    settings = {
        "data": args.data, "training_rows": n, "categorical_fields": len(layout.categorical),
        "numeric_fields": len(layout.numeric), "table_rows": sum(layout.tables().values()),
        "batch_size": args.batch_size, "epochs_measured": args.epochs, "warmup_epochs": 1,
        "embedding_dim": args.embedding_dim, "hidden": args.hidden, "batch_norm": True, "dropout": 0.2,
        "sparse": args.sparse, "optimizer": "adam", "lr": opt.lr, "embedding_weight_decay": opt.embedding_weight_decay,
        "dense_weight_decay": opt.dense_weight_decay, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(), "load_average_1min": {"start": load_start, "end": load_end},
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    table = markdown_table(ctrlab, bare_side, n, ratio)
    sparse = "sparse" if args.sparse else "dense"
    print(f"DeepFM training throughput, {args.data} ({n:,} rows), batch {args.batch_size}, embedding "
          f"{args.embedding_dim}, MLP {'-'.join(map(str, args.hidden))} (BN, dropout 0.2), {sparse} embedding "
          f"gradients, Adam; torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, "
          f"{settings['date'][:10]}; median of {args.epochs} epochs per side after 1 warm-up, alternating.\n")
    print(table)
    print(f"\nratio ctrlab / bare = {ratio:.3f} ({'meets' if ratio >= 0.9 else 'BELOW'} the 0.9 target); "
          f"ratio of the best epochs {best_ratio:.3f}")
    print(f"largest difference of the two sides' epoch losses: {loss_diff:.2g} (same batches and dropout masks; "
          "0 unless threaded kernels round differently)")
    if spread > 1.15:
        print(f"warning: epoch times of one side differ by up to {spread:.2f}x (1-min load average {load_start} at "
              f"the start, {load_end} at the end): the machine was not idle; rerun on an idle machine or with more "
              "--epochs before quoting these numbers")

    if args.json is not None:
        result = {
            "settings": settings, "checks": checks, "ratio": ratio, "best_epoch_ratio": best_ratio,
            "max_epoch_time_spread": spread, "max_epoch_loss_diff": loss_diff,
            "ctrlab": {"samples_per_second_median": med_c, "samples_per_second": ctrlab.rates(n),
                       "epoch_seconds": ctrlab.seconds, "train_loss": ctrlab.losses},
            "bare": {"samples_per_second_median": med_b, "samples_per_second": bare_side.rates(n),
                     "epoch_seconds": bare_side.seconds, "train_loss": bare_side.losses},
            "markdown": table,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        log.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

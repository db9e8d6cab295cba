"""The training loop: BCE-with-logits, early stopping on a validation metric, learning-rate reduction on a
plateau, best-checkpoint restore, progress bars and per-epoch summaries. Searches extend it through
:class:`~ctrlab.train.hooks.TrainingHooks` (extra loss terms, epoch-start callbacks, named parameter groups with
their own optimisers, a bi-level validation step), never by overriding its methods."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctrlab.config.train import TrainConfig
from ctrlab.data.batches import BatchIterator, FeatureBatch
from ctrlab.data.stream import StreamedSplit
from ctrlab.distributed.parallel import ParallelModel
from ctrlab.distributed.shards import ShardBatches, lockstep, shard_rows
from ctrlab.errors import RecipeError, TrainingDiverged
from ctrlab.models.ctr_model import CTRModel
from ctrlab.train.device import autocast
from ctrlab.train.hooks import TrainingHooks, ValidationStep
from ctrlab.train.metrics import compute_metrics
from ctrlab.train.optim import Optimizers, build_optimizers
from ctrlab.train.state import TrainingStateFile
from ctrlab.utils.checkpoint import save_state_dict

_HIGHER_IS_BETTER = {"auc": True, "gauc": True, "logloss": False}


@dataclass
class EpochRecord:
    """What one epoch did: mean training loss, validation metrics, learning rate, wall time."""

    epoch: int
    train_loss: float
    valid: dict[str, float]
    lr: float
    seconds: float
    samples_per_second: float
    improved: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, **{f"valid_{k}": v for k, v in self.valid.items()},
                "lr": self.lr, "seconds": self.seconds, "samples_per_second": self.samples_per_second,
                "improved": self.improved}


@dataclass
class FitResult:
    """The training history and the best epoch, whose weights the model holds after :meth:`Trainer.fit`."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


EpochCallback = Callable[[EpochRecord], None]


class Trainer:
    """Owns the optimisers, the device, the loss and the loop; the model only maps batches to logits.

    ``parallel`` (from :func:`~ctrlab.distributed.parallel.parallelize`) runs the loop on several processes: each
    rank trains on its shard of the training rows with ``batch_size / world_size`` rows a step (so the global batch
    is the recipe's), predictions are gathered back into split order before any metric, the metrics are computed on
    rank 0 and broadcast (every rank takes the same early-stopping and learning-rate decision), and only rank 0
    writes checkpoints and training states, prints and calls ``callbacks``.

    ``callbacks`` run after every epoch's evaluation (trackers log there; a sweep's pruner may raise to stop).
    ``hooks`` are a search's additions (see :mod:`ctrlab.train.hooks`). With ``keep_best`` (the default)
    :meth:`fit` ends holding the best validation epoch's weights; without, the last epoch's (a search whose
    schedule defines its end).
    """

    def __init__(self, model: CTRModel, config: TrainConfig, device: torch.device, seed: int = 0,
                 metrics: list[str] | None = None, console: Console | None = None,
                 callbacks: list[EpochCallback] | None = None, hooks: TrainingHooks | None = None,
                 keep_best: bool = True, parallel: ParallelModel | None = None) -> None:
        self.parallel = parallel if parallel is not None else ParallelModel.single(model.to(device))
        self.model = self.parallel.model
        self.network = self.parallel.network
        self.processes = self.parallel.processes
        self.config = config
        self.device = device
        self.metrics = list(metrics or config.metrics)
        monitor = config.early_stopping.monitor if config.early_stopping else "auc"
        if monitor not in self.metrics:
            self.metrics.append(monitor)
        self.monitor = monitor
        self.console = console or Console(stderr=True)
        self.callbacks = list(callbacks or []) if self.processes.is_main else []
        self.hooks = hooks or TrainingHooks()
        self.keep_best = keep_best
        self.seed = seed
        self.optimizers: Optimizers = build_optimizers(self.model, config.optimizer, self.hooks.parameter_groups,
                                                       exclude=self.parallel.fused_parameters())
        # Stepping a fused optimiser only hands it the current learning rate (its update ran in the backward pass).
        self.optimizers.optimizers.extend(self.parallel.fused_optimizers)
        self.validation_step: ValidationStep | None = None
        self.validation_steps = 0
        """Bi-level validation steps taken by :meth:`fit` so far."""
        # Each rank shuffles its own shard with its own stream (rank 0's is the single-process one).
        self.generator = torch.Generator().manual_seed(seed + 1_000_003 * self.processes.rank)
        self.scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
        self._row_counts: list[torch.Tensor] | None = None
        self._train_rows = 0
        self.epoch = 0
        """Training epochs done (a streamed split's shuffle order is a function of the epoch)."""

    # ------------------------------------------------------------------------------------------ steps
    def _loss(self, batch: FeatureBatch) -> torch.Tensor:
        with autocast(self.device, self.config.precision):
            logits = self.network(batch)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch.label)  # type: ignore[arg-type]
        if self.optimizers.lazy_embedding_decay > 0:
            penalty = sum(m.lazy_l2(batch) for m in self.model.embedding_modules() if m.sparse)
            loss = loss + self.optimizers.lazy_embedding_decay * penalty / len(batch)
        if self.optimizers.mini_batch_aware_decay > 0:
            assert self._row_counts is not None, "call fit() or train_epoch(), which count the training rows"
            for module, counts in zip(self.model.embedding_modules(), self._row_counts):
                loss = loss + module.mini_batch_aware_l2(batch, counts, self.optimizers.mini_batch_aware_decay)
        for term in self.hooks.loss_terms:
            loss = loss + term(batch)
        return loss

    def _count_rows(self, train: FeatureBatch) -> None:
        """n_j of the mini-batch aware L2: how often each table row is looked up in the training data (once)."""
        if self.optimizers.mini_batch_aware_decay <= 0 or self._row_counts is not None:
            return
        counts = []
        for module in self.model.embedding_modules():
            ids = module.row_ids(train).cpu().numpy()
            local = torch.from_numpy(np.bincount(ids, minlength=module.num_rows)).to(self.device)
            counts.append(self.processes.sum(local))  # n_j counts the whole training split, not a rank's shard
        self._row_counts = counts

    def shard(self, data: FeatureBatch) -> FeatureBatch:
        """This rank's rows of a split (all of them on one process; see :mod:`ctrlab.distributed.shards`)."""
        if not self.processes.distributed:
            return data
        index = shard_rows(len(data), self.processes.rank, self.processes.world_size)
        return data.select(index.to(data.categorical.device))

    def _batches(self, shard: FeatureBatch, rows: int, batch_size: int, shuffle: bool
                 ) -> BatchIterator | ShardBatches:
        if not self.processes.distributed:
            return BatchIterator(shard, batch_size, shuffle=shuffle, generator=self.generator)
        return ShardBatches(shard, rows, self.processes.world_size, batch_size, shuffle=shuffle,
                            generator=self.generator)

    def _streamed(self, split: StreamedSplit, batch_size: int, epoch: int | None) -> tuple[Iterator[FeatureBatch],
                                                                                              int]:
        """This rank's batches of a streamed split (shuffled for ``epoch``, else in file order) and how many there
        are: the same number on every rank (:func:`~ctrlab.distributed.shards.lockstep`), since ranks' shares of
        whole row groups differ."""
        rank, world = self.processes.rank, self.processes.world_size
        batches = (split.batches(epoch, batch_size, rank, world) if epoch is not None
                   else split.ordered_batches(batch_size, rank, world))
        shares = split.shares(world, ordered=epoch is None)
        steps = -(-max(shares) // batch_size)
        if world > 1:
            batches = lockstep(batches, shares[rank], steps)
        if self.device.type == "cuda":  # page-locked copies overlap the previous step's compute
            batches = (b.pin_memory().to(self.device, non_blocking=True) for b in batches)
        return batches, steps

    def train_epoch(self, data: FeatureBatch | StreamedSplit, progress: Progress | None = None,
                    rows: int | None = None) -> float:
        """One pass over ``data`` (this rank's shard of a ``rows``-row split when distributed; ``rows`` defaults
        to ``len(data)``); returns the mean training loss over every rank's rows. A streamed split is read
        through its shuffle buffer in the order of the epoch this is (``(seed, epoch, rank)`` fixes it)."""
        self.model.train()
        self.network.train()
        self.epoch += 1
        rows = len(data) if rows is None else rows
        local_batch = self.config.batch_size // self.processes.world_size
        iterator: Iterable[FeatureBatch]
        if isinstance(data, StreamedSplit):
            iterator, steps = self._streamed(data, local_batch, self.epoch)
        else:
            self._count_rows(data)
            if data.group is not None:  # group ids matter for evaluation only; don't shuffle them every epoch
                data = dataclasses.replace(data, group=None)
            iterator = self._batches(data, rows, local_batch, shuffle=True)
            steps = len(iterator)
        task = progress.add_task("train", total=steps) if progress is not None else None
        total = torch.zeros((), device=self.device)
        for step, batch in enumerate(iterator):
            loss = self._loss(batch)
            self.optimizers.zero_grad()
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                for opt in self.optimizers.training:
                    self.scaler.unscale_(opt)
            else:
                loss.backward()
            if self.config.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip_norm)
            self.optimizers.step(self.scaler)
            if self.validation_step is not None:
                self.validation_step()
            if self.scaler is not None:
                self.scaler.update()
            total += loss.detach() * len(batch)
            if progress is not None and task is not None and (step % 8 == 0 or step == steps - 1):
                progress.update(task, completed=step + 1)
        if progress is not None and task is not None:
            progress.remove_task(task)
        mean = float(self.processes.sum(total)) / max(rows, 1)
        if not math.isfinite(mean):
            raise TrainingDiverged(f"training loss became {mean}; lower train.optimizer.lr or set train.grad_clip_norm")
        return mean

    @torch.no_grad()
    def predict(self, data: FeatureBatch | StreamedSplit) -> np.ndarray:
        """Click probabilities for every row of ``data`` (float64 numpy). Distributed, each rank scores its shard and
        every rank gets all rows back in ``data``'s order."""
        self.model.eval()
        self.network.eval()
        if isinstance(data, StreamedSplit):
            return self._predict_streamed(data)
        data = data.to(self.device)
        local = self._score(self._batches(self.shard(data), len(data), self.config.eval_batch_size, shuffle=False))
        return self.processes.gather_rows(local, len(data)).numpy()

    def _predict_streamed(self, split: StreamedSplit) -> np.ndarray:
        # Each rank scores a contiguous block of row groups: concatenated in rank order, the blocks are the file.
        batches, _ = self._streamed(split, self.config.eval_batch_size, epoch=None)
        return np.concatenate(self.processes.all_objects(self._score(batches).numpy()))

    def _score(self, batches: Iterable[FeatureBatch]) -> torch.Tensor:
        """The click probabilities of ``batches``, one after another (float64, on the CPU)."""
        out = []
        for batch in batches:
            with autocast(self.device, self.config.precision):
                logits = self.model(batch)
            out.append(torch.sigmoid(logits.float()).cpu())
        return (torch.cat(out) if out else torch.zeros(0)).double()

    def evaluate(self, data: FeatureBatch | StreamedSplit) -> tuple[dict[str, float], np.ndarray]:
        """Metrics over all of ``data`` (computed on rank 0 and shared) and the probabilities."""
        probabilities = self.predict(data)
        metrics: dict[str, float] = {}
        if self.processes.is_main:
            if isinstance(data, StreamedSplit):
                labels, groups = data.labels(), data.groups()
            else:
                labels = data.label.cpu().numpy() if data.label is not None else None
                groups = data.group.cpu().numpy() if data.group is not None else None
            if labels is None:
                raise ValueError("evaluate needs labelled rows")
            metrics = compute_metrics(self.metrics, labels, probabilities, groups)
        return self.processes.broadcast(metrics), probabilities

    # ------------------------------------------------------------------------------------------- fit
    def _improved(self, value: float, best: float | None) -> bool:
        if best is None or math.isnan(best):
            return not math.isnan(value)
        delta = self.config.early_stopping.min_delta if self.config.early_stopping else 0.0
        return value > best + delta if _HIGHER_IS_BETTER[self.monitor] else value < best - delta

    def _stops(self, bad_epochs: int) -> bool:
        return self.config.early_stopping is not None and bad_epochs >= self.config.early_stopping.patience

    def _state(self, result: FitResult, best_value: float | None, best_state: dict[str, torch.Tensor] | None,
               bad_epochs: int) -> dict[str, Any]:
        """What :meth:`fit` needs to continue after the epoch just finished (see :mod:`ctrlab.train.state`).
        Distributed, every rank must call it (it collects each rank's random-number streams); rank 0 saves it."""
        distributed: dict[str, Any] = {}
        if self.processes.distributed:
            distributed = {"world_size": self.processes.world_size,
                           "rank_generators": self.processes.all_objects(self.generator.get_state()),
                           "rank_torch_rng": self.processes.all_objects(torch.get_rng_state())}
        return {
            "model": self.model.state_dict(),
            "best_model": best_state if best_state is not None else {},
            "optimizers": [opt.state_dict() for opt in self.optimizers.all],
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": [dataclasses.asdict(r) for r in result.history],
            "best_epoch": result.best_epoch,
            "best_valid": dict(result.best_valid),
            "best_value": best_value,
            "bad_epochs": bad_epochs,
            **distributed,
        }

    def _resume(self, saved: dict[str, Any], path: Path, result: FitResult, checkpoint: Path | None
                ) -> tuple[float | None, dict[str, torch.Tensor] | None, int]:
        """Load a state written by :meth:`_state` into the model, optimisers, generators and ``result``, replay
        its epochs to the callbacks and write its best weights to ``checkpoint``; returns (best value, best
        weights, epochs without improvement)."""
        world = int(saved.get("world_size", 1))
        if world != self.processes.world_size:
            raise RecipeError(f"{path}: the training state was saved by {world} process(es), this run has "
                              f"{self.processes.world_size}; resume with {world}, or delete it to start afresh")
        self.model.load_state_dict(saved["model"])
        for opt, opt_state in zip(self.optimizers.all, saved["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if self.scaler is not None and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        rank = self.processes.rank
        self.generator.set_state(saved["rank_generators"][rank] if world > 1 else saved["generator"])
        torch.set_rng_state(saved["rank_torch_rng"][rank] if world > 1 else saved["torch_rng"])
        if self.device.type == "cuda" and saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        result.history = [EpochRecord(**record) for record in saved["history"]]
        result.best_epoch, result.best_valid = saved["best_epoch"], dict(saved["best_valid"])
        best_state = {k: v.to(self.device) for k, v in saved["best_model"].items()} or None
        self._print(f"resuming after epoch {len(result.history)} from {path}")
        for record in result.history:
            for callback in self.callbacks:
                callback(record)
        if checkpoint is not None and best_state is not None and self.processes.is_main:
            save_state_dict(best_state, checkpoint)
        result.stopped_early = self._stops(saved["bad_epochs"])
        return saved["best_value"], best_state, saved["bad_epochs"]

    def fit(self, train: FeatureBatch | StreamedSplit, valid: FeatureBatch | StreamedSplit,
            checkpoint: Path | None = None,
            state: TrainingStateFile | None = None) -> FitResult:
        """Train until ``epochs`` or early stopping; the model ends holding the best validation weights.

        With ``state``, the training state is saved after every epoch and, if a saved one exists, training
        continues from it; the restored epochs are replayed to the callbacks (a tracker gets the whole curve).
        With validation-step parameter groups, every training step is followed by a :class:`ValidationStep` on
        ``valid``. Distributed, ``train`` and ``valid`` are the whole splits (every rank takes its shard).

        Distributed, only rank 0 reads and writes ``state`` and ``checkpoint``."""
        self._train_rows = len(train)
        if isinstance(train, FeatureBatch):
            train = self.shard(train).to(self.device)
        if isinstance(valid, FeatureBatch):
            valid = valid.to(self.device)
        if self.optimizers.validation:
            if not isinstance(valid, FeatureBatch):
                raise ValueError("a bi-level search steps on validation rows held in memory, not a streamed split")
            self.validation_step = ValidationStep(self.model, self.optimizers.validation, valid,
                                                  self.config.batch_size, self.device, self.config.precision,
                                                  seed=self.seed + 1)
        try:
            return self._fit(train, valid, checkpoint, state)
        finally:
            if self.validation_step is not None:
                self.validation_steps += self.validation_step.steps
                self.validation_step.release()
                self.validation_step = None

    def _fit(self, train: FeatureBatch | StreamedSplit, valid: FeatureBatch | StreamedSplit, checkpoint: Path | None,
             state: TrainingStateFile | None) -> FitResult:
        result = FitResult()
        best_value: float | None = None
        best_state: dict[str, torch.Tensor] | None = None
        bad_epochs = 0
        if state is not None:
            saved = self.processes.broadcast(state.load() if self.processes.is_main else None)
            if saved is not None:
                best_value, best_state, bad_epochs = self._resume(saved, state.path, result, checkpoint)
        progress = self._progress()
        with progress if progress is not None else contextlib.nullcontext():
            for epoch in range(len(result.history) + 1, self.config.epochs + 1):
                if result.stopped_early:
                    break
                for hook in self.hooks.before_epoch:
                    hook(epoch)
                start = time.perf_counter()
                self.epoch = epoch - 1
                train_loss = self.train_epoch(train, progress, rows=self._train_rows)
                train_seconds = time.perf_counter() - start
                metrics, _ = self.evaluate(valid)
                value = metrics[self.monitor]
                improved = self._improved(value, best_value)
                record = EpochRecord(epoch, train_loss, metrics, self.optimizers.lr, time.perf_counter() - start,
                                     self._train_rows / max(train_seconds, 1e-9), improved)
                result.history.append(record)
                self._summary(record)
                if improved:
                    best_value, bad_epochs = value, 0
                    best_state = self.parallel.snapshot()
                    result.best_epoch, result.best_valid = epoch, dict(metrics)
                    if checkpoint is not None:
                        weights = self.parallel.full_state_dict()  # on rank 0 only
                        if weights is not None:
                            save_state_dict(weights, checkpoint)
                else:
                    bad_epochs += 1
                    if self.config.lr_on_plateau is not None:
                        self.optimizers.scale_lr(self.config.lr_on_plateau.factor, self.config.lr_on_plateau.min_lr)
                if state is not None:
                    snapshot = self._state(result, best_value, best_state, bad_epochs)
                    if self.processes.is_main:
                        state.save(snapshot)
                for callback in self.callbacks:
                    callback(record)
                if self._stops(bad_epochs):
                    result.stopped_early = True
                    self._print(f"early stopping: no {self.monitor} improvement for {bad_epochs} epochs; "
                                f"best epoch {result.best_epoch}")
                    break
        if best_state is not None and self.keep_best:
            self.parallel.restore(best_state)
        return result

    def _print(self, line: str) -> None:
        if self.processes.is_main:
            self.console.print(line, highlight=False, soft_wrap=True)

    def _progress(self) -> Progress | None:
        if not self.config.progress or not self.processes.is_main:
            return None
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)

    def _summary(self, record: EpochRecord) -> None:
        valid = "  ".join(f"{k} {v:.5f}" for k, v in record.valid.items())
        mark = "  *best*" if record.improved else ""
        self._print(
            f"epoch {record.epoch:3d}/{self.config.epochs}  train_loss {record.train_loss:.5f}  valid {valid}  "
            f"lr {record.lr:.1e}  {record.seconds:.1f}s  {record.samples_per_second:,.0f} samples/s{mark}")


"""Training-step time of the per-field embedding's backends: ``plain`` (dense and sparse gradients) vs ``torchrec``.

What it measures
    Milliseconds per training step (forward + backward + optimiser step) of the embedding layer alone, with a
    linear head on the flattened field vectors and BCE, on Criteo-like input: 26 categorical fields with Criteo's
    vocabulary sizes capped at ``--vocab-cap`` (100,000 by default: about 0.9M rows in all), embedding 16, batch
    4096, Zipf-like ids (``floor(vocab · u^3)``: a few hot rows per field, a long tail). The optimisers are the
    library's (:func:`ctrlab.train.optim.build_optimizers`: Adam for dense tables, SparseAdam for sparse ones),
    embedding weight decay 0 (no lazy L2 term).

    Variants: ``plain`` and ``torchrec``, each with dense and sparse (``embedding.sparse``) table gradients, and
    with ``--optimizer adagrad`` also ``torchrec fused``: the torchrec tables sharded (``distributed.sharding:
    table_wise``) in a process group of one, so that fbgemm's kernels update them inside the backward pass (what
    ``distributed.sharding`` gives a single process; on CPU fbgemm fuses Adagrad, not Adam). All
    start from the same weights (torchrec's copied with ``load_from_plain``); the script first checks that every
    variant gives the same loss on a batch. After ``--warmup`` steps each, steps are timed round-robin (one step of
    each variant in turn, so that drift in the machine's speed hits all alike); reported: the median ms/step of each
    and its ratio to ``plain`` with dense gradients.

How to run
    .venv/bin/python benchmarks/embedding_backends.py                  # 50 timed steps per variant, 2 threads
    .venv/bin/python benchmarks/embedding_backends.py --steps 5 --threads 1
    .venv/bin/python benchmarks/embedding_backends.py --optimizer adagrad --threads 1   # + the fused path

    On a shared machine use ``--threads 1`` (see benchmarks/README.md on busy machines and OpenMP).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ctrlab.config.train import OptimizerConfig
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout, FieldSpec
from ctrlab.embeddings import EMBEDDINGS, FeatureEmbedding
from ctrlab.train.optim import Optimizers, build_optimizers

# Criteo (Kaggle display advertising) categorical cardinalities, C1..C26.
CRITEO_VOCABS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


class EmbeddingOnly(nn.Module):
    """An embedding layer and a linear head: logit = w · flatten(fields) + b."""

    def __init__(self, embedding: FeatureEmbedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = nn.Linear(embedding.num_fields * embedding.dim, 1)

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        return self.head(self.embedding(batch).fields.flatten(1)).squeeze(1)

    interaction = None  # what build_optimizers asks of a model: no pair layer, no architecture parameters

    def embedding_modules(self) -> list[FeatureEmbedding]:
        return [self.embedding]

    def architecture_parameters(self) -> list[nn.Parameter]:
        return []


def _layout(cap: int) -> FeatureLayout:
    return FeatureLayout(tuple(FieldSpec(f"C{i + 1}", "categorical", min(v, cap) + 2, f"C{i + 1}")
                               for i, v in enumerate(CRITEO_VOCABS)))


def _batches(layout: FeatureLayout, batch_size: int, count: int, seed: int) -> list[FeatureBatch]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([f.vocab_size for f in layout.fields], dtype=torch.float64)
    out = []
    for _ in range(count):
        u = torch.rand(batch_size, len(sizes), generator=g, dtype=torch.float64)
        ids = (u.pow(3) * sizes).long().clamp(max=sizes.long() - 1)
        out.append(FeatureBatch(ids, torch.zeros(batch_size, 0), label=(torch.rand(batch_size, generator=g) < 0.25)
                                .float()))
    return out


def _step(model: nn.Module, optimizers: Optimizers, batch: FeatureBatch) -> None:
    loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)  # type: ignore[arg-type]
    optimizers.zero_grad()
    loss.backward()
    optimizers.step()


def _fused(reference: EmbeddingOnly, layout: FeatureLayout, args: argparse.Namespace,
           optimizer: OptimizerConfig) -> tuple[nn.Module, Optimizers]:
    """The torchrec variant sharded table-wise in a process group of one: fbgemm updates the tables in the backward
    pass (the trainer's own optimisers keep the head)."""
    from ctrlab.config.distributed import DistributedConfig
    from ctrlab.config.train import TrainConfig
    from ctrlab.distributed.parallel import parallelize
    from ctrlab.distributed.processes import start

    config = DistributedConfig(sharding="table_wise")
    device = torch.device("cpu")
    processes = start(config, device)
    torch.manual_seed(args.seed)
    embedding = EMBEDDINGS.build(EMBEDDINGS.get("per_field").config(dim=args.dim, init_std=1e-2, backend="torchrec"),
                                 layout)
    model = EmbeddingOnly(embedding)
    model.head.load_state_dict(reference.head.state_dict())
    model.embedding.load_from_plain(reference.embedding)  # type: ignore[operator]
    parallel = parallelize(model, processes, config, TrainConfig(optimizer=optimizer), device)  # type: ignore[arg-type]
    optimizers = build_optimizers(model, optimizer, exclude=parallel.fused_parameters())  # type: ignore[arg-type]
    optimizers.optimizers.extend(parallel.fused_optimizers)
    return parallel.network, optimizers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--vocab-cap", type=int, default=100_000, help="largest vocabulary (Criteo's, capped)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=["adam", "adagrad"], default="adam",
                        help="adagrad adds the fused (sharded, one process) torchrec variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    layout = _layout(args.vocab_cap)
    batches = _batches(layout, args.batch_size, 8, args.seed)
    optimizer = OptimizerConfig(name=args.optimizer, lr=args.lr, embedding_weight_decay=0.0)
    variants: dict[str, tuple[nn.Module, Optimizers]] = {}
    reference: EmbeddingOnly | None = None
    for backend in ("plain", "torchrec"):
        for sparse in (False, True):
            torch.manual_seed(args.seed)
            config = EMBEDDINGS.get("per_field").config(dim=args.dim, init_std=1e-2, sparse=sparse, backend=backend)
            model = EmbeddingOnly(EMBEDDINGS.build(config, layout))
            if reference is None:
                reference = model
            else:
                model.head.load_state_dict(reference.head.state_dict())
                if backend == "torchrec":
                    model.embedding.load_from_plain(reference.embedding)  # type: ignore[operator]
                else:
                    model.embedding.load_state_dict(reference.embedding.state_dict())
            variants[f"{backend} {'sparse' if sparse else 'dense'}"] = (model, build_optimizers(model, optimizer))
    if args.optimizer == "adagrad":
        assert reference is not None
        variants["torchrec fused"] = _fused(reference, layout, args, optimizer)

    first = batches[0]
    with torch.no_grad():
        losses = {name: F.binary_cross_entropy_with_logits(m(first), first.label).item()  # type: ignore[arg-type]
                  for name, (m, _) in variants.items()}
    spread = max(losses.values()) - min(losses.values())
    assert spread < 1e-6, f"the variants disagree before training: {losses}"

    rows = sum(f.vocab_size for f in layout.fields)
    print(f"26 categorical fields, {rows:,} table rows, dim {args.dim}, batch {args.batch_size:,}; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    for model, opts in variants.values():
        for i in range(args.warmup):
            _step(model, opts, batches[i % len(batches)])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps):
        batch = batches[i % len(batches)]
        for name, (model, opts) in variants.items():
            start = time.perf_counter()
            _step(model, opts, batch)
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["plain dense"])
    print(f"{'variant':<16} {'ms/step':>9} {'vs plain dense':>15}")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:<16} {ms * 1e3:9.1f} {ms / base:14.2f}x")


if __name__ == "__main__":
    main()

"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): trains a small model through the real
trainer and records, per rank and epoch, which training rows its steps saw, and how its gathered validation
predictions compare with the whole model scoring the whole split in one process.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from rich.console import Console

from ctrlab.config.loader import validate_recipe
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.pipeline import prepare_data
from ctrlab.distributed.parallel import parallelize
from ctrlab.distributed.processes import process_group
from ctrlab.models import build_recipe_model
from ctrlab.run_dir import seed_everything
from ctrlab.train.hooks import TrainingHooks
from ctrlab.train.trainer import Trainer

ROW_SCALE = 2.0 ** -20  # row i is tagged i * 2^-20 in its first numeric column: exact in float32 below 2^24 rows

RECIPE = {
    "name": "worker", "seed": 7,
    "dataset": {"synthetic": {"rows": 3001, "cardinalities": [3, 5, 8, 12, 20, 30, 50, 80, 120, 200, 300, 500]},
                "cache": False},
    "model": {"block": "deepfm", "mlp": {"hidden": [16]}},
    "train": {"epochs": 2, "batch_size": 256, "eval_batch_size": 100, "progress": False, "device": "cpu",
              "early_stopping": None, "lr_on_plateau": None},
    "tracking": {"enabled": False},
}


def main(out: Path) -> None:
    recipe = validate_recipe(RECIPE)
    device = torch.device("cpu")
    with process_group(recipe.distributed, device) as processes:
        seed_everything(recipe.seed)
        data = prepare_data(recipe.dataset, recipe.features, recipe.seed, console=Console(quiet=True))
        train = FeatureBatch.from_encoded(data.splits["train"])
        numeric = train.numeric.clone()
        numeric[:, 0] = torch.arange(len(train), dtype=torch.float32) * ROW_SCALE
        train = dataclasses.replace(train, numeric=numeric)
        valid = FeatureBatch.from_encoded(data.splits["valid"])

        seen: dict[int, list[int]] = {}
        epoch = [0]

        def record(batch: FeatureBatch) -> torch.Tensor:
            rows = torch.round(batch.numeric[:, 0] / ROW_SCALE).long().tolist()
            seen.setdefault(epoch[0], []).extend(rows)
            return torch.zeros(())

        def count_epoch(number: int) -> None:
            epoch[0] = number

        model = build_recipe_model(recipe, data.processor.layout)
        parallel = parallelize(model, processes, recipe.distributed, recipe.train, device)
        hooks = TrainingHooks(loss_terms=[record], before_epoch=[count_epoch])
        trainer = Trainer(model, recipe.train, device, seed=recipe.seed, console=Console(quiet=True), hooks=hooks,
                          parallel=parallel)
        trainer.fit(train, valid)
        gathered = trainer.predict(valid)
        model.eval()
        with torch.no_grad():
            whole = torch.sigmoid(model(valid)).double().numpy()
        result = {"rank": processes.rank, "world_size": processes.world_size, "train_rows": len(train),
                  "seen": {str(k): v for k, v in seen.items()},
                  "max_prediction_difference": float(abs(gathered - whole).max()),
                  "valid_rows": len(valid), "predictions": len(gathered)}
        (out / f"rank{processes.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""A small synthetic recipe and layout shared by the embedding-search tests (imported by test modules; not a test
file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout, FieldSpec

# Two tables, one shared by a categorical field and a behaviour history, one numeric field.
LAYOUT = FeatureLayout((
    FieldSpec("item", "categorical", 9, "item"),
    FieldSpec("user", "categorical", 5, "user"),
    FieldSpec("x", "numeric"),
    FieldSpec("hist", "sequence", 9, "item", 4, "mean"),
))


def tiny_batch(n: int = 8, seed: int = 1) -> FeatureBatch:
    """Ids over :data:`LAYOUT`: an empty history in row 0, one real item in row 1, padding at the end."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(2, 9, (n, 4), generator=g)
    hist[0] = 0
    hist[1, 1:] = 0
    hist[2, 3:] = 0
    return FeatureBatch(
        categorical=torch.stack([torch.randint(1, 9, (n,), generator=g), torch.randint(1, 5, (n,), generator=g)], 1),
        numeric=torch.randn(n, 1, generator=g),
        sequences={"hist": hist},
        label=torch.tensor([0.0, 1.0] * (n // 2)),
    )


def synthetic_recipe(output_dir: Path, embedding: dict[str, Any], **train: Any) -> dict[str, Any]:
    """20,000 synthetic rows (16,000 train), 6 categorical fields (one of 3,000 values) and 2 numeric ones (one
    bucketised), DeepFM, 3 epochs, tracking off."""
    return {
        "name": "search", "seed": 3, "output_dir": str(output_dir),
        "dataset": {"synthetic": {"rows": 20000, "categorical_fields": 6, "numeric_fields": 2,
                                  "informative_fields": 3, "interaction_pairs": 1, "numeric_informative": 1,
                                  "cardinalities": [5, 20, 50, 200, 1000, 3000]}},
        "features": {"categorical": ["C1", "C2", "C3", "C4", "C5", "C6"],
                     "numeric": [{"name": "I1", "transform": "log"}, {"name": "I2", "transform": "bucketize"}]},
        "embedding": {"dim": 8, "init_std": 0.01, **embedding},
        "model": {"block": "deepfm", "mlp": {"hidden": [32, 16]}},
        "train": {"epochs": 3, "batch_size": 1024, "progress": False, "device": "cpu", "num_threads": 1,
                  "optimizer": {"lr": 1e-2}, **train},
        "tracking": {"enabled": False},
    }


def embedding_floats(path: Path) -> int:
    """Floats stored under ``embedding.`` in a safetensors file (the main table; the first-order term is
    ``linear.``)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key.startswith("embedding.") and tensor.is_floating_point():
                total += tensor.numel()
    return total


def reload_matches_saved_predictions(run_dir: Path, recipe: Any) -> None:
    """``Predictor.from_run`` scores the raw test rows exactly as the run did (bit for bit)."""
    from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, load_raw_splits
    from ctrlab.serve import Predictor

    predictor = Predictor.from_run(run_dir)
    raw_test = load_raw_splits(recipe.dataset, recipe.seed).frames["test"]
    again = predictor.predict(raw_test.drop(["label", TRUE_PROBABILITY_COLUMN]))
    saved = pl.read_parquet(run_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert again.dtype == saved.dtype == np.float64
    assert np.array_equal(again, saved)


def three_epochs_under_plateau(model: Any, hooks: Any, temperature: Any, train: FeatureBatch,
                               valid: FeatureBatch) -> list[tuple[int, float, float, float]]:
    """Train ``model`` with a search's ``hooks`` for 3 epochs under ``lr_on_plateau`` (factor 0.5, model lr 0.01)
    where only epoch 1 counts as improving; per epoch ``(epoch, temperature(), the model's lr, the lr of the hooks'
    first parameter group)``."""
    from rich.console import Console

    from ctrlab.config.train import TrainConfig
    from ctrlab.train.trainer import Trainer

    config = TrainConfig(progress=False, device="cpu", batch_size=8, epochs=3, lr_on_plateau={"factor": 0.5},
                         optimizer={"lr": 0.01})
    seen: list[tuple[int, float, float, float]] = []
    trainer = Trainer(model, config, torch.device("cpu"), hooks=hooks, console=Console(quiet=True),
                      callbacks=[lambda r: seen.append((r.epoch, temperature(), trainer.optimizers.lr,
                                                        trainer.optimizers.groups[0][1].param_groups[0]["lr"]))])
    trainer._improved = lambda value, best: best is None  # type: ignore[method-assign]  # only epoch 1 improves
    trainer.fit(train, valid)
    return seen

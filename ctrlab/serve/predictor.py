"""Load a run directory (recipe, processor JSON, safetensors weights) and score raw rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.processor import FeatureProcessor
from ctrlab.errors import DataError
from ctrlab.models import CTRModel, build_recipe_model
from ctrlab.run_dir import PROCESSOR_FILE, RECIPE_FILE, WEIGHTS_FILE
from ctrlab.utils.checkpoint import load_weights


class Predictor:
    """Raw rows in (the training data's own columns), click probabilities out. Runs on CPU unless told otherwise.

    Unseen categories map to the out-of-vocabulary id; a missing column or a non-numeric value in a numeric
    column raises :class:`~ctrlab.errors.DataError` naming the column.
    """

    def __init__(self, recipe: Any, processor: FeatureProcessor, model: CTRModel,
                 device: torch.device | str = "cpu", batch_size: int = 65536) -> None:
        self.recipe = recipe
        self.processor = processor
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run_dir: str | Path, device: torch.device | str = "cpu") -> "Predictor":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise DataError(f"{run_dir}: run directory not found")
        recipe = validate_recipe(read_recipe_file(run_dir / RECIPE_FILE), str(run_dir / RECIPE_FILE))
        processor = FeatureProcessor.load(run_dir / PROCESSOR_FILE)
        model = build_recipe_model(recipe, processor.layout)
        load_weights(model, run_dir / WEIGHTS_FILE)
        return cls(recipe, processor, model, device)

    @property
    def input_columns(self) -> list[str]:
        return self.processor.features.columns()

    @torch.no_grad()
    def predict(self, rows: pl.DataFrame | Any, source: str = "request") -> np.ndarray:
        """Probabilities (float64) for each row of a polars (or pandas) frame of raw values."""
        frame = rows if isinstance(rows, pl.DataFrame) else pl.from_pandas(rows)
        encoded = self.processor.transform(frame, source, with_label=False)
        data = FeatureBatch.from_encoded(encoded).to(self.device)
        out = []
        for start in range(0, len(data), self.batch_size):
            logits = self.model(data.select(slice(start, start + self.batch_size)))
            out.append(torch.sigmoid(logits.float()).cpu())
        probabilities = torch.cat(out).double().numpy()
        not_finite = ~np.isfinite(probabilities)
        if not_finite.any():
            # Finite inputs far outside the training range can still overflow inside the network; a NaN must never
            # reach a caller (it is not even valid JSON).
            row = int(np.flatnonzero(not_finite)[0]) + 1
            raise DataError(f"{source}: row {row}: the model's score is not a finite number (are its numeric "
                            "values far outside the range seen in training?)")
        return probabilities

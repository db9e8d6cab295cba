"""What a run directory holds, by name, and how a run seeds its random generators.

Everything that reads or writes a run directory (training, the searches, serving, the registry, the CLI) takes the
file names from here, so none of them has to import the trainer to find a file.
"""

from __future__ import annotations

import random

import numpy as np
import torch

RECIPE_FILE = "recipe.yaml"
PROCESSOR_FILE = "processor.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "test_predictions.parquet"
LEARNING_CURVE_FILE = "learning_curve.png"
ATTENTION_FILE = "attention.png"
#: Stage outputs of the embedding-table searches (OptEmbed, DNIS), the feature-set search (OptFS) and the
#: interaction search (OptInter).
EMBEDDING_SEARCH_DIR = "embedding_search"
FEATURE_SEARCH_DIR = "feature_search"
INTERACTION_SEARCH_DIR = "interaction_search"
SEARCH_DIRS = (EMBEDDING_SEARCH_DIR, FEATURE_SEARCH_DIR, INTERACTION_SEARCH_DIR)
#: Files logged to MLflow as artefacts when they exist (the search folders are logged whole).
TRACKED_FILES = (RECIPE_FILE, PROCESSOR_FILE, METRICS_FILE, WEIGHTS_FILE, LEARNING_CURVE_FILE)
#: What a training run writes into its folder (and so replaces on a rerun); ``ctrlab explain``'s picture belongs to
#: the model it was drawn from. Anything else in the folder (a ranking, a sweep) is carried into the new run.
RUN_ENTRIES = frozenset({RECIPE_FILE, PROCESSOR_FILE, WEIGHTS_FILE, METRICS_FILE, PREDICTIONS_FILE,
                         LEARNING_CURVE_FILE, ATTENTION_FILE, *SEARCH_DIRS})


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (every model is built right after this call)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

"""Data sources: the seeded synthetic generator (:mod:`ctrlab.datasets.synthetic`) and the dataset-card registry
(:mod:`ctrlab.datasets.cards`, cards and loaders in the repo's ``datasets/`` folder). Submodules are imported on
use, not here, to keep ``ctrlab.config`` free of import cycles."""

"""Dataset cards for ctrlab (installed as the import package ``ctrlab_datasets``).

This folder holds one YAML *card* per real dataset (``frappe_x1.yaml``, ``criteo_sample.yaml``, ...) and the
loader modules of the cards whose rows must be joined from several files (``movielens.py``). A card names its files
by path relative to a data directory, with their sha256 and row counts, plus the label, default features and split;
see ``ctrlab.datasets.cards`` for the model and ``README.md`` here for the list.

The data files themselves are never stored here or in the package: their terms forbid redistribution. They are
read in place from the data directory given by ``--data-dir`` or ``$CTRLAB_DATA_DIR``.
"""

from pathlib import Path

CARDS_DIR = Path(__file__).parent
"""The folder holding the card YAML files."""

"""Base class for every recipe section, and the bounded number types its size-like fields use.

Every integer a recipe can set is bounded on both sides (``Field(ge=..., le=...)`` with the limits below), so an
absurd value ("a 10,000,000-wide embedding", "a hidden layer of -4 units", "10^13 synthetic rows") is a one-line
validation error naming the key and the bound before anything is allocated; what stays within the bounds but is still
too big for the machine is caught by the footprint estimate (:mod:`ctrlab.train.footprint`). Floats must be finite
everywhere.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

# Upper bounds shared by the schema. Generous: far above anything a CTR model uses, small enough that no single
# value overflows int64 arithmetic or asks for an allocation by itself; the footprint estimate handles products.
MAX_EMBEDDING_DIM = 8_192      # embedding width per field (typical: 4..128)
MAX_WIDTH = 65_536             # hidden / attention widths, convolution channels, chunk widths
MAX_DEPTH = 128                # stacked layers of one kind, entries of a hidden-width list
MAX_HEADS = 1_024              # attention heads
MAX_KERNEL = 4_096             # kernel heights, pooling sizes, recombined maps
MAX_TABLE_ROWS = 2**40         # hashed / shared embedding rows (the estimate refuses far fewer)
MAX_BATCH = 2**24              # rows per batch (16.7M; the activation estimate refuses most of these)
MAX_EPOCHS = 1_000_000         # epochs, search epochs, patience, generations, trials
MAX_COUNT = 2**53              # thresholds on counts (min_count, rows per block): exact as a float too
MAX_SEQUENCE_LEN = 100_000     # ids kept per sequence value
MAX_SEED = 2**63 - 1           # seeds and salts: non-negative int64 (torch, numpy and polars all accept it)
MAX_FIELDS = 100_000           # feature columns of one kind
MAX_ROWS = 10_000_000_000      # synthetic rows (the data estimate refuses most of these)
MAX_CARDINALITY = 2_000_000_000  # values of one synthetic categorical field (fits int32 ids)
MAX_THREADS = 4_096
MAX_POPULATION = 10_000        # candidates per generation of an evolutionary search

_SCIENTIFIC = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def _number_from_text(value: Any) -> Any:
    # PyYAML follows YAML 1.1, which reads an unquoted ``1e6`` as the STRING "1e6" (``1.0e+6`` is a float). A size
    # written that way is meant as a number: read it as one so that it is checked against the bounds like any other
    # number (and a non-integral or out-of-range value gets the usual message naming the key and the bound).
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value.strip())
    return value


# ``Int`` is ``int`` that also reads ``1e6``-style text; fields give their bounds in ``Field(ge=..., le=...)``.
Int = Annotated[int, BeforeValidator(_number_from_text)]


class Section(BaseModel):
    """A recipe section: unknown keys are errors, values are validated on assignment too, floats must be finite."""

    # allow_inf_nan=False: YAML's .inf / .nan (and 1e400) are floats; no recipe setting means anything with them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

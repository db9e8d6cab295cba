"""Deterministic hash constants shared by the hashed embedding layers and the data layer's hashed cross features.

The universal family of Carter & Wegman (1979)::

    h(x) = ((a · x + b) mod P) mod R,    P = 2^31 − 1 (a Mersenne prime),  a ∈ [1, P),  b ∈ [0, P)

The constants ``(a, b)`` of hash function ``(table, probe)`` come from splitmix64 (Steele et al. 2014) applied to the
table index, the probe index and a salt, in pure Python integer arithmetic: they are the same in every process, on
every platform and with every numpy / torch version. Python's built-in ``hash()`` is never used (it is randomised per
process for strings, see ``PYTHONHASHSEED``). The torch evaluation lives with the embedding layers
(:func:`ctrlab.embeddings.hashing.universal_hash`); :func:`universal_hash_array` is the numpy one.
"""

from __future__ import annotations

import numpy as np

MERSENNE_PRIME = (1 << 31) - 1
"""P of the universal family: ids are reduced modulo P first, so any int64 id is accepted."""

_MASK64 = (1 << 64) - 1
_DOMAIN = 0x6374726C61622D68  # "ctrlab-h": separates these hash constants from any other use of splitmix64


def splitmix64(x: int) -> int:
    """One step of splitmix64 (the finaliser of Java's SplittableRandom): a bijective 64-bit mix."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash_constants(table: int, probe: int = 0, salt: int = 0) -> tuple[int, int]:
    """``(a, b)`` of the hash function for table ``table`` (for the embedding layers its index in
    ``FeatureLayout.tables()``), probe ``probe`` (0 for the hashing trick; 0..k-1 for the k chunks of Unified
    Embedding) and ``salt``.

    ``a`` is uniform on ``[1, P)`` and ``b`` on ``[0, P)`` (up to a bias below 2^-32), deterministically."""
    state = splitmix64((_DOMAIN ^ salt) & _MASK64)
    state = splitmix64(state ^ (table & _MASK64))
    state = splitmix64(state ^ (probe & _MASK64))
    a = 1 + splitmix64(state ^ 1) % (MERSENNE_PRIME - 1)
    b = splitmix64(state ^ 2) % MERSENNE_PRIME
    return a, b


def universal_hash_array(ids: np.ndarray, a: int, b: int, buckets: int) -> np.ndarray:
    """``((a · x + b) mod P) mod buckets`` elementwise for an integer array (int64 out, in ``[0, buckets)``).

    ``ids`` are reduced modulo ``P`` first (non-negative for any int64), so ``a · x + b < 2^62 + 2^31`` fits int64."""
    x = np.remainder(ids.astype(np.int64, copy=False), MERSENNE_PRIME)
    return np.remainder(np.remainder(a * x + b, MERSENNE_PRIME), buckets)

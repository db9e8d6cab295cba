"""Plug-in entropies and mutual information from integer codes, and their chance-corrected versions.

The plug-in mutual information of a feature with ``k`` values and the label grows with ``k`` even when the two are
independent (roughly ``(k - 1)(c - 1) / 2n`` nats for ``c`` classes and ``n`` rows), so an id column with a hundred
thousand values looks informative by noise alone. OutRank (Skrlj et al. 2023, Sec. 3) corrects for this by
subtracting the score a random feature with the same cardinality gets. Here that baseline is measured exactly for
the feature's own value counts: the label is shuffled, which keeps both marginals and destroys their dependence,
and the mutual information of the feature with the shuffled label is averaged over a few shuffles:

    normalised MI(X; Y) = MI(X; Y) - E_pi[ MI(X; pi(Y)) ]

Everything is ``np.bincount`` over the codes: O(rows) per feature and per shuffle.
"""

from __future__ import annotations

import math

import numpy as np

from ctrlab.ranking.encode import factorize

_DIRECT_BINCOUNT_LIMIT = 1 << 20  # value pairs below this count are counted in a dense array, above it hashed


def _sum_c_log_c(counts: np.ndarray) -> float:
    # counts of 0 and 1 contribute c*log(c) = 0: skipping them keeps sparse tables cheap
    big = counts[counts > 1].astype(np.float64)
    return float((big * np.log(big)).sum())


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution given by non-negative ``counts``: ``log n - sum c log c / n``."""
    n = float(counts.sum())
    if n <= 0:
        return 0.0
    return math.log(n) - _sum_c_log_c(counts) / n


def codes_entropy(codes: np.ndarray) -> float:
    """Entropy (nats) of the values of an integer code array."""
    return entropy(np.bincount(codes))


def joint_entropy(codes: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Entropy (nats) of the pairs ``(code, label)``, labels ``0..classes-1``."""
    return entropy(np.bincount(codes.astype(np.int64) * classes + labels))


def mutual_information(codes: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Plug-in MI (nats) between codes ``0..k-1`` and labels ``0..classes-1``: ``H(X) + H(Y) - H(X, Y)``."""
    return max(codes_entropy(codes) + codes_entropy(labels) - joint_entropy(codes, labels, classes), 0.0)


class LabelShuffles:
    """A fixed set of label permutations (seeded), shared by every feature so that scores are comparable."""

    def __init__(self, labels: np.ndarray, repeats: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = labels
        self.classes = int(labels.max()) + 1
        self.shuffled = [rng.permutation(labels) for _ in range(repeats)]
        self.label_entropy = codes_entropy(labels)

    def subset(self, rows: np.ndarray) -> "LabelShuffles":
        """The same shuffles restricted to ``rows`` (a shuffle of a subset stays a shuffle)."""
        other = object.__new__(LabelShuffles)
        other.labels = self.labels[rows]
        other.classes = self.classes
        other.shuffled = [s[rows] for s in self.shuffled]
        other.label_entropy = codes_entropy(other.labels)
        return other

    def scores(self, codes: np.ndarray) -> tuple[float, float]:
        """``(plain MI, normalised MI)`` of ``codes`` with the label; ``H(X)`` and ``H(Y)`` are shared by the
        observed and the shuffled labels, so only the joint entropy is recounted per shuffle."""
        marginals = codes_entropy(codes) + self.label_entropy
        plain = marginals - joint_entropy(codes, self.labels, self.classes)
        if not self.shuffled:
            return max(plain, 0.0), plain
        chance = marginals - float(np.mean([joint_entropy(codes, s, self.classes) for s in self.shuffled]))
        return max(plain, 0.0), plain - chance


def joint_codes(first: np.ndarray, second: np.ndarray, second_cardinality: int) -> np.ndarray:
    """Codes of the value pairs ``(first, second)``: the dense product when it is small, else hashed to dense codes
    so the pair table stays as small as the data."""
    combined = first.astype(np.int64) * second_cardinality + second
    if (int(first.max()) + 1) * second_cardinality <= _DIRECT_BINCOUNT_LIMIT:
        return combined
    return factorize(combined)[0]


def adjusted_redundancy(first: np.ndarray, pair: np.ndarray, shuffled_second: np.ndarray, first_entropy: float,
                        second_entropy: float) -> tuple[float, float]:
    """The share of each feature's information that the other one carries, corrected for chance, each in [0, 1]:
    ``(share of first explained by second, share of second explained by first)``.

    It is the uncertainty coefficient ``MI(a; b) / H(a)`` adjusted for chance like the adjusted MI of Vinh et al.
    (2010), with the chance term measured by shuffling ``second`` (``b~``):

        (MI - E[MI]) / (H(a) - E[MI]) = (H(a, b~) - H(a, b)) / (H(a, b~) - H(b))

    A relabelled copy scores 1 both ways, an independent feature 0, and a feature that a finer one determines (a
    country given its city) scores 1 while the finer one scores less. Dividing the chance-corrected MI by the entropy
    instead would score copies of a mostly-singleton id far below 1, because the shuffled joint entropy cannot exceed
    ``log(rows)``. ``pair`` is :func:`joint_codes` of ``(first, second)``.
    """
    k2 = int(shuffled_second.max()) + 1
    shuffled_joint = codes_entropy(joint_codes(first, shuffled_second, k2))
    excess = shuffled_joint - codes_entropy(pair)

    def share(own_entropy: float, other_entropy: float) -> float:
        # With mostly-singleton ids only a sliver of the entropy is testable at this sample size: below a quarter
        # of the feature's entropy the room is floored, so an untestable pair is not called redundant on the
        # evidence of a few frequent values.
        room = max(shuffled_joint - other_entropy, 0.25 * own_entropy)
        return float(np.clip(excess / room, 0.0, 1.0)) if room > 1e-12 else 0.0

    return share(first_entropy, second_entropy), share(second_entropy, first_entropy)

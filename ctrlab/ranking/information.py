"""Plug-in entropies and mutual information from integer codes, and their chance-corrected versions.

Features. The plug-in mutual information of a feature with ``k`` values and the label grows with ``k`` even when the
two are independent (roughly ``(k - 1)(c - 1) / 2n`` nats for ``c`` classes and ``n`` rows), so an id column with a
hundred thousand values looks informative by noise alone. OutRank (Skrlj et al. 2023, Sec. 3) corrects for this by
subtracting the score a random feature with the same cardinality gets. Here that baseline is measured exactly for
the feature's own value counts: the label is shuffled, which keeps both marginals and destroys their dependence,
and the mutual information of the feature with the shuffled label is averaged over a few shuffles:

    normalised MI(X; Y) = MI(X; Y) - E_pi[ MI(X; pi(Y)) ]

Pairs (new here). The interaction of two features asks whether the pair tells more about the label than the two
features do without interacting, so its chance level must keep what each feature says on its own. Subtracting each
feature's normalised MI from the pair's, ``[MI(ab; Y) - E_pi MI(ab; pi(Y))] - nMI(a) - nMI(b)``, does not: the label
shuffle also destroys ``a``'s relation to the label, and once the pair's cells hold a few rows each (their number
nears or passes the number of rows, e.g. a many-valued count crossed with an id) the plug-in bias of ``MI(ab; Y)``
depends on how the label rate varies across ``a``'s values. Crossed with a pure-noise id, an informative field then
scored anywhere from -0.06 to +0.007 nats, above planted interactions, and planted pairs of sparse cells fell below
zero. Instead ``b`` is dealt out again within each label class (``sigma``), which keeps the joint tables of
``(a, Y)`` and ``(b, Y)`` exactly and makes ``a`` and ``b`` independent given the label, and the pair's MI is compared
with that null:

    interaction(a, b) = MI(ab; Y) - E_sigma[ MI(a, sigma(b); Y) ]

The null is the pair combined in the naive-Bayes way, ``p(y | a, b)`` proportional to ``p(y | a) p(y | b) / p(y)``,
and it is exact, bias included, whenever either feature is independent of the other and of the label: a noise field
scores 0 in expectation however many cells the pair has, within the spread of the plug-in MI itself. A pair of
interacting features scores what the pair says beyond the naive-Bayes combination. Two limits, both far below a
planted interaction on the planted sets: two independent fields whose effects add on the logit score a little above
0, because averaging over one field attenuates the other's marginal relation to the label (the logit is not
collapsible), so the naive-Bayes combination of the two marginal relations says a little less than the pair; and
dependent fields (a city and its country) get more cells under the null than they have, which pushes their scores
down. A relabelled copy scores ``-MI(a; Y)`` as interaction information does.

Everything is ``np.bincount`` over the codes: O(rows) per feature and per shuffle, and per pair and per permutation.
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


def class_permutations(labels: np.ndarray, repeats: int, seed: int) -> list[np.ndarray]:
    """``repeats`` seeded permutations ``p`` of the rows that keep every row's label (``labels[p] == labels``), so
    ``codes[p]`` deals a feature's values out again at random among the rows of each class."""
    rng = np.random.default_rng(seed)
    by_class = np.argsort(labels, kind="stable")
    permutations: list[np.ndarray] = []
    for _ in range(repeats):
        # both orders list the rows class by class, so the j-th row of one and of the other share a class
        dealt = np.lexsort((rng.random((labels.shape[0],)), labels))
        permutation = np.empty_like(by_class)
        permutation[by_class] = dealt
        permutations.append(permutation)
    return permutations


class PairNull:
    """The chance level of pair scores: the second feature dealt out again within each label class, a few seeded
    times (see the module docstring). Built on the rows the pair scores use, shared by every pair."""

    def __init__(self, labels: np.ndarray, repeats: int, seed: int) -> None:
        self.labels = labels
        self.classes = int(labels.max()) + 1
        self.label_entropy = codes_entropy(labels)
        self.permutations = class_permutations(labels, repeats, seed)

    def information(self, pair: np.ndarray) -> float:
        """Plug-in MI (nats, not clipped at 0 so that chance levels average without bias) of codes with the label."""
        return codes_entropy(pair) + self.label_entropy - joint_entropy(pair, self.labels, self.classes)

    def interaction(self, first: np.ndarray, second: np.ndarray, second_cardinality: int,
                    pair: np.ndarray | None = None) -> float:
        """``MI((first, second); Y) - E_sigma[ MI((first, sigma(second)); Y) ]`` in nats, ``sigma`` a permutation
        within label classes; ``pair`` is :func:`joint_codes` of the two when the caller has it. Without
        permutations it is the uncorrected interaction information ``MI(ab; Y) - MI(a; Y) - MI(b; Y)``."""
        if pair is None:
            pair = joint_codes(first, second, second_cardinality)
        observed = self.information(pair)
        if not self.permutations:
            return observed - self.information(first) - self.information(second)
        chance = [self.information(joint_codes(first, second[p], second_cardinality)) for p in self.permutations]
        return observed - float(np.mean(chance))


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

"""Pair scores (pairs.csv ``interaction``) hold their chance level where a pair's cells outnumber its rows.

The fields: an informative count (hundreds of distinct values, kept as categorical codes, as ``ctrlab rank`` reads an
integer column with at most 1,000 values) and an informative 200-value category whose effects add on the logit; two
fields that matter only jointly (a planted interaction, the parity of one xor the parity of the other); and pure noise
of high cardinality: 50,000-value uniform and Zipf ids and a count with thousands of distinct values, as codes and cut
into quantile bins. On 60,000 rows every pair with a noise id has more possible cells than rows and nearly a cell per
row, the regime where the former correction (the pair's label-shuffle correction minus each feature's normalised MI)
fails.

The bound on a noise pair's score: under the null the observed pair MI and its ``K`` null draws are exchangeable, so
the score (observed minus the mean of the draws) has the spread ``sd * sqrt(1 + 1/K)``, ``sd`` the spread of one
draw, measured here from 24 more draws. Five spreads leave a noise pair outside the bound with a chance of about one
in a million under a normal approximation (the spread is estimated to within about 15%); the bounds are below a
hundredth of a nat, under a tenth of the planted pair's score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest

from ctrlab.datasets.synthetic import SyntheticConfig, generate
from ctrlab.ranking.encode import Kind, factorize, quantile_codes
from ctrlab.ranking.information import LabelShuffles, PairNull, class_permutations, joint_codes
from ctrlab.ranking.rank import RankingOptions, rank_features

ROWS = 60_000
REPEATS = 3  # RankingOptions.shuffles: null draws per pair score
SPREADS = 5.0


@dataclass
class Fields:
    labels: np.ndarray
    values: dict[str, np.ndarray]  # raw values, for building a frame
    codes: dict[str, np.ndarray]
    informative: set[str]
    planted: tuple[str, str]
    noise: set[str]


def _zipf(rng: np.random.Generator, k: int, size: int, exponent: float = 1.1) -> np.ndarray:
    cdf = np.cumsum(np.arange(1, k + 1, dtype=np.float64) ** -exponent)
    return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(size)), k - 1)


@pytest.fixture(scope="module")
def fields() -> Fields:
    rng = np.random.default_rng(0)
    count = np.floor(np.exp(rng.normal(2.0, 1.5, ROWS)))
    category = rng.integers(0, 200, ROWS)
    x1, x2 = rng.integers(0, 20, ROWS), rng.integers(0, 30, ROWS)
    logit = (-1.2 + 0.8 * (np.log1p(count) - 2.0) + rng.normal(0.0, 0.6, 200)[category]
             + 1.2 * np.where((x1 % 2) ^ (x2 % 2), 1.0, -1.0))
    labels = (rng.random(ROWS) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    noise_count = np.floor(np.exp(rng.normal(4.0, 2.0, ROWS)))
    values = {"count": count, "category": category, "x1": x1, "x2": x2,
              "uniform_id": rng.integers(0, 50_000, ROWS), "zipf_id": _zipf(rng, 50_000, ROWS),
              "noise_count": noise_count, "noise_count_bins": np.floor(np.exp(rng.normal(4.0, 2.0, ROWS)))}
    codes = {name: factorize(v)[0] for name, v in values.items() if name != "noise_count_bins"}
    codes["noise_count_bins"] = factorize(quantile_codes(values["noise_count_bins"], 32))[0]
    noise = {"uniform_id", "zipf_id", "noise_count", "noise_count_bins"}
    assert len(np.unique(noise_count)) > 2_000  # a count with thousands of distinct values
    return Fields(labels, values, codes, {"count", "category", "x1", "x2"}, ("x1", "x2"), noise)


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _cardinality(codes: np.ndarray) -> int:
    return int(codes.max()) + 1


@pytest.fixture(scope="module")
def bounds(fields: Fields) -> dict[tuple[str, str], float]:
    """SPREADS spreads of each pair's score under the null, from 24 null draws besides the scored ones."""
    extra = PairNull(fields.labels, 24, seed=99)
    result = {}
    for a, b in _pairs(list(fields.codes)):
        first, second = fields.codes[a], fields.codes[b]
        k = _cardinality(second)
        draws = [extra.information(joint_codes(first, second[p], k)) for p in extra.permutations]
        result[(a, b)] = SPREADS * float(np.std(draws, ddof=1)) * math.sqrt(1 + 1 / REPEATS)
    return result


def test_class_permutations_deal_values_out_again_within_each_label_class() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(10_000) < 0.3).astype(np.int64)
    values = rng.integers(0, 50, (labels.shape[0],))
    first, second = class_permutations(labels, 2, seed=5)
    for p in (first, second):
        assert np.array_equal(np.sort(p), np.arange(labels.shape[0]))
        assert np.array_equal(labels[p], labels)
        # the feature keeps its joint table with the label exactly, but lands on other rows
        assert np.array_equal(np.bincount(values[p] * 2 + labels), np.bincount(values * 2 + labels))
        assert (values[p] != values).mean() > 0.9
    assert not np.array_equal(first, second)
    assert np.array_equal(first, class_permutations(labels, 1, seed=5)[0])  # seeded


def test_noise_pairs_score_at_the_chance_level_where_cells_outnumber_rows(fields: Fields, bounds) -> None:
    null = PairNull(fields.labels, REPEATS, seed=7)
    shuffles = LabelShuffles(fields.labels, REPEATS, seed=7)
    former: dict[tuple[str, str], float] = {}
    sparse = 0
    for a, b in _pairs(list(fields.codes)):
        if not {a, b} & fields.noise:
            continue
        first, second = fields.codes[a], fields.codes[b]
        pair = joint_codes(first, second, _cardinality(second))
        score = null.interaction(first, second, _cardinality(second), pair)
        assert abs(score) < bounds[(a, b)], (a, b, score, bounds[(a, b)])
        if _cardinality(first) * _cardinality(second) > ROWS and len(np.unique(pair)) > ROWS / 2:
            sparse += 1
        former[(a, b)] = shuffles.scores(pair)[1] - shuffles.scores(first)[1] - shuffles.scores(second)[1]
    assert sparse >= 10  # most of these pairs have more possible cells than rows and nearly a cell per row
    largest = max(bounds[p] for p in former)
    assert largest < 0.01
    # the former correction is off by many spreads here: an informative field crossed with a noise id lost most of
    # its own information, and a noise pair could score above a weak planted interaction
    worst = min(former, key=lambda p: former[p])
    assert worst[0] in fields.informative and former[worst] < -5 * largest


def test_a_planted_interaction_outscores_every_noise_pair_by_far(fields: Fields, bounds) -> None:
    null = PairNull(fields.labels, REPEATS, seed=7)
    scores = {(a, b): null.interaction(fields.codes[a], fields.codes[b], _cardinality(fields.codes[b]))
              for a, b in _pairs(list(fields.codes))}
    planted = scores[fields.planted]
    assert max(scores, key=lambda p: scores[p]) == fields.planted
    assert planted > 0.05 and planted > 8 * max(bounds.values())
    # two independent fields whose effects add on the logit are not an interaction: far below the planted one
    assert scores[("count", "category")] < planted / 5


def test_rank_features_keeps_noise_pairs_at_chance_and_the_planted_pair_on_top(fields: Fields, bounds) -> None:
    frame = pl.DataFrame({"label": fields.labels.astype(np.int8),
                          **{name: v.astype(np.int64) for name, v in fields.values.items()}})
    kinds: dict[str, Kind | None] = {name: "categorical" for name in fields.values}
    kinds["noise_count_bins"] = "numeric"
    result = rank_features(frame, "label", kinds, RankingOptions(pair_rows=ROWS))
    pairs = result.pairs
    assert (pairs["feature_a"][0], pairs["feature_b"][0]) == fields.planted
    assert pairs.height == len(bounds)
    for a, b, score in zip(pairs["feature_a"], pairs["feature_b"], pairs["interaction"]):
        if {a, b} & fields.noise:
            bound = bounds[(a, b)] if (a, b) in bounds else bounds[(b, a)]
            assert abs(score) < bound, (a, b, score, bound)


@pytest.mark.parametrize("seed", [0, 2])
def test_generated_planted_pairs_stay_the_top_pairs_among_high_cardinality_noise(seed: int) -> None:
    # vocabularies up to 50,000 on 60,000 rows; the counts are integers, so most count columns are read as
    # categorical with hundreds of values. With the former correction one planted pair fell to rank 70 (seed 0) or
    # 45 (seed 2) of 91, below pairs of an informative count with a noise field.
    cardinalities = [5, 12, 40, 150, 600, 2_500, 10_000, 50_000, 50_000, 50_000]
    data = generate(SyntheticConfig(rows=ROWS, categorical_fields=len(cardinalities), cardinalities=cardinalities,
                                    numeric_fields=4, informative_fields=4, numeric_informative=2,
                                    interaction_pairs=2, interactions_among="main_effects"), seed)
    frame = data.frame.with_columns(pl.col(r"^I\d+$").cast(pl.Int64))
    result = rank_features(frame, "label", {c: None for c in frame.columns if c not in ("label", "ts")})
    pairs = [frozenset(p) for p in zip(result.pairs["feature_a"], result.pairs["feature_b"])]
    scores = result.pairs["interaction"].to_list()
    planted = {frozenset(p) for p in data.interactions}
    assert set(pairs[:2]) == planted
    noise = set(data.noise)
    noisy = [s for p, s in zip(pairs, scores) if p & noise]
    # noise pairs stay within a few thousandths of a nat, a third of the weaker planted pair or less
    assert max(abs(s) for s in noisy) < min(scores[:2]) / 2.5 and max(abs(s) for s in noisy) < 0.004

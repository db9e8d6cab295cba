"""Feature ranking in the spirit of OutRank (Skrlj et al. 2023): relevance, redundancy, interactions, data quality.

Three heuristics order the features:

* ``mi``: plug-in mutual information with the label. Biased towards high cardinality (shown in the tests).
* ``normalized_mi``: MI minus the MI of a random feature with the same value counts
  (:mod:`ctrlab.ranking.information`), OutRank's cardinality correction.
* ``3mr``: OutRank's "3MR" greedy ranking (Sec. 3.3), relevance minus redundancy plus relation: at each step pick
  the feature maximising ``v - alpha * redundancy * v`` with ``v = relevance + beta * relation``, all on a 0..1
  scale. Relevance is the normalised MI over the best one; relation the largest interaction of the feature with a
  partner (below), over the larger of the best relevance and the best interaction; redundancy the largest share of
  the feature's information that an already selected feature carries
  (:func:`~ctrlab.ranking.information.adjusted_redundancy`: a relabelled copy scores 1, an independent feature 0, a
  country given its city 1 but the city given its country less). Redundancy discounts the feature's value in
  proportion (instead of OutRank's plain difference) so that a copy cannot win back through its source's
  interactions, and it takes the maximum over the selected set (instead of OutRank's median), because a median lets
  a copy climb back once enough unrelated features have been selected.

A pair's interaction is what the pair tells about the label beyond the two features combined without interacting:
``MI((a, b); y) - E[MI((a, b~); y)]`` with ``b~`` the values of ``b`` dealt out again within each label class, which
keeps each feature's own relation to the label (:class:`~ctrlab.ranking.information.PairNull`). It is 0 in
expectation for a noise feature crossed with anything, however many cells the pair has; like interaction information,
``MI((a, b); y) - MI(a; y) - MI(b; y)``, it is positive for synergy and negative for redundancy.

Pair statistics (redundancy, interaction) are computed only among the ``pair_candidates`` most relevant features and
on at most ``pair_rows`` rows, so their cost is bounded whatever the data size; every per-feature score uses all
rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl

from ctrlab.ranking.encode import EncodedColumn, Kind, encode_column
from ctrlab.ranking.information import (
    LabelShuffles,
    PairNull,
    adjusted_redundancy,
    codes_entropy,
    joint_codes,
)

if TYPE_CHECKING:
    from ctrlab.ranking.source import ParquetColumns

Heuristic = Literal["mi", "normalized_mi", "3mr"]
HEURISTICS: tuple[str, ...] = ("mi", "normalized_mi", "3mr")

#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class RankingOptions:
    """Settings of one ranking; every field is written next to the result."""

    heuristic: Heuristic = "3mr"
    bins: int = 32
    shuffles: int = 3
    seed: int = 2021
    pair_candidates: int = 20
    pair_rows: int = 250_000
    redundancy_weight: float = 1.0
    relation_weight: float = 1.0
    near_constant_share: float = 0.99
    high_missing_share: float = 0.5
    id_like_share: float = 0.99

    def __post_init__(self) -> None:
        if self.heuristic not in HEURISTICS:
            raise ValueError(f"heuristic must be one of {', '.join(HEURISTICS)}, got {self.heuristic!r}")


@dataclass
class FeatureRanking:
    """The ranked features (one row each) and the pair statistics among the top candidates.

    ``table`` columns: feature, rank, score (of the chosen heuristic), mi, normalized_mi (nats), cardinality,
    kind, missing_share, notes. ``pairs`` columns: feature_a, feature_b, interaction (nats), a_explained_by_b and
    b_explained_by_a (the chance-corrected share of one feature's information the other carries, 0..1).
    """

    table: pl.DataFrame
    pairs: pl.DataFrame
    options: RankingOptions
    rows: int
    seconds: float
    target: str
    timings: dict[str, float] = field(default_factory=dict)

    def top(self, k: int | None = None) -> list[str]:
        names = self.table.sort("rank")["feature"].to_list()
        return names if k is None else names[:k]

    def summary(self) -> dict[str, object]:
        return {"rows": self.rows, "features": self.table.height, "target": self.target,
                "seconds": round(self.seconds, 3), "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "options": asdict(self.options), "top": self.top(10)}


def rank_features(frame: pl.DataFrame | ParquetColumns, target: str, kinds: dict[str, Kind | None],
                  options: RankingOptions | None = None, progress: Progress | None = None,
                  source: str = "data") -> FeatureRanking:
    """Rank the columns named in ``kinds`` (a kind of None is inferred) of ``frame`` by their information on
    ``target``. ``source`` names the data in error messages."""
    from ctrlab.errors import DataError
    from ctrlab.ranking.encode import encode_target

    options = options or RankingOptions()
    started = time.perf_counter()
    step = progress or (lambda stage, done, total: None)
    if target not in frame.columns:
        raise DataError(f"{source}: no label column '{target}' (columns: {', '.join(frame.columns[:20])})")
    missing = [name for name in kinds if name not in frame.columns]
    if missing:
        raise DataError(f"{source}: no column '{missing[0]}'")
    if not kinds:
        raise DataError(f"{source}: no feature columns to rank")
    if frame.height == 0:
        raise DataError(f"{source}: no rows")
    labels = encode_target(frame[target], source)
    shuffles = LabelShuffles(labels, options.shuffles, options.seed)
    timings: dict[str, float] = {}

    columns: list[EncodedColumn] = []
    plain: list[float] = []
    normalized: list[float] = []
    t0 = time.perf_counter()
    for i, (name, kind) in enumerate(kinds.items()):
        column = encode_column(frame[name], kind, options.bins)
        mi, nmi = shuffles.scores(column.codes)
        columns.append(column)
        plain.append(mi)
        normalized.append(nmi)
        step("features", i + 1, len(kinds))
    timings["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pairs = _pair_statistics(columns, np.asarray(normalized), shuffles, options, step)
    timings["pairs"] = time.perf_counter() - t0

    names = [c.name for c in columns]
    if options.heuristic == "mi":
        order, score = _by_score(names, plain), plain
    elif options.heuristic == "normalized_mi":
        order, score = _by_score(names, normalized), normalized
    else:
        order, score = _three_mr(names, np.asarray(normalized), pairs, options)
    rank = {index: position + 1 for position, index in enumerate(order)}
    notes = _quality_notes(columns, frame.height, options)
    _relation_notes(notes, names, pairs, float(max(max(normalized), 1e-12)))
    table = pl.DataFrame({
        "feature": names,
        "rank": [rank[i] for i in range(len(names))],
        "score": [float(s) for s in score],
        "mi": plain,
        "normalized_mi": normalized,
        "cardinality": [c.distinct_values for c in columns],
        "kind": [c.kind for c in columns],
        "missing_share": [c.missing_share for c in columns],
        "notes": ["; ".join(n) for n in notes],
    }, schema_overrides={"rank": pl.Int64, "cardinality": pl.Int64}).sort("rank")
    pair_frame = pl.DataFrame(
        [{"feature_a": names[a], "feature_b": names[b], **values} for (a, b), values in pairs.items()],
        schema={"feature_a": pl.String, "feature_b": pl.String, "interaction": pl.Float64,
                "a_explained_by_b": pl.Float64, "b_explained_by_a": pl.Float64},
    ).sort("interaction", descending=True)
    return FeatureRanking(table, pair_frame, options, frame.height, time.perf_counter() - started, target, timings)


def _by_score(names: list[str], score: list[float]) -> list[int]:
    return sorted(range(len(names)), key=lambda i: (-score[i], names[i]))


def _pair_statistics(columns: list[EncodedColumn], normalized: np.ndarray, shuffles: LabelShuffles,
                     options: RankingOptions, step: Progress) -> dict[tuple[int, int], dict[str, float]]:
    """Chance-corrected interaction (:meth:`~ctrlab.ranking.information.PairNull.interaction`) and redundancy of
    every pair among the top candidates."""
    if options.pair_candidates < 2 or len(columns) < 2:
        return {}
    candidates = sorted(np.argsort(-normalized, kind="stable")[: options.pair_candidates].tolist())
    rows = shuffles.labels.shape[0]
    rng = np.random.default_rng(options.seed + 1)
    if rows > options.pair_rows:
        subset = np.sort(rng.choice(rows, options.pair_rows, replace=False))
        codes = {i: columns[i].codes[subset] for i in candidates}
        labels = shuffles.labels[subset]
    else:
        codes = {i: columns[i].codes for i in candidates}
        labels = shuffles.labels
    null = PairNull(labels, options.shuffles, options.seed + 2)
    entropies = {i: codes_entropy(codes[i]) for i in candidates}
    cardinality = {i: int(codes[i].max()) + 1 for i in candidates}
    order = rng.permutation(codes[candidates[0]].shape[0])
    shuffled = {i: codes[i][order] for i in candidates}
    result: dict[tuple[int, int], dict[str, float]] = {}
    total = len(candidates) * (len(candidates) - 1) // 2
    for a_pos, a in enumerate(candidates):
        for b in candidates[a_pos + 1:]:
            pair = joint_codes(codes[a], codes[b], cardinality[b])
            interaction = null.interaction(codes[a], codes[b], cardinality[b], pair)
            a_by_b, b_by_a = adjusted_redundancy(codes[a], pair, shuffled[b], entropies[a], entropies[b])
            result[(a, b)] = {"interaction": float(interaction), "a_explained_by_b": a_by_b, "b_explained_by_a": b_by_a}
            step("pairs", len(result), total)
    return result


def _three_mr(names: list[str], normalized: np.ndarray, pairs: dict[tuple[int, int], dict[str, float]],
              options: RankingOptions) -> tuple[list[int], list[float]]:
    """Greedy relevance - redundancy + relation ranking; returns the order and each feature's score when picked."""
    n = len(names)
    best = max(float(normalized.max()), 1e-12)
    relevance = np.clip(normalized, 0.0, None) / best
    redundancy = np.zeros((n, n))
    relation = np.zeros((n, n))
    # Interactions share the relevance scale, capped so that the strongest pair is worth at most the best feature.
    scale = max([best] + [values["interaction"] for values in pairs.values()])
    for (a, b), values in pairs.items():
        redundancy[a, b], redundancy[b, a] = values["a_explained_by_b"], values["b_explained_by_a"]
        relation[a, b] = relation[b, a] = max(values["interaction"], 0.0) / scale
    # A feature that only matters jointly with a partner keeps that value whether or not the partner is picked yet.
    bonus = options.relation_weight * relation.max(axis=1)
    remaining = set(range(n))
    order: list[int] = []
    score = [0.0] * n
    while remaining:
        covered = redundancy[:, order].max(axis=1) if order else np.zeros(n)
        value = relevance + bonus
        merit = value - options.redundancy_weight * covered * value
        pick = min(remaining, key=lambda i: (-merit[i], names[i]))
        order.append(pick)
        score[pick] = float(merit[pick])
        remaining.remove(pick)
    return order, score


def _quality_notes(columns: list[EncodedColumn], rows: int, options: RankingOptions) -> list[list[str]]:
    notes: list[list[str]] = [[] for _ in columns]
    first_with: dict[str, str] = {}
    for note, column in zip(notes, columns):
        if column.cardinality <= 1:
            note.append("constant")
        elif column.top_share >= options.near_constant_share:
            note.append(f"near-constant ({column.top_share:.1%} one value)")
        if column.missing_share >= options.high_missing_share:
            note.append(f"missing {column.missing_share:.0%}")
        if rows > 1 and column.kind == "categorical" and column.distinct_values >= options.id_like_share * rows:
            note.append("id-like (a distinct value per row)")
        if column.fingerprint in first_with:
            note.append(f"duplicate of {first_with[column.fingerprint]}")
        else:
            first_with[column.fingerprint] = column.name
    return notes


def _relation_notes(notes: list[list[str]], names: list[str], pairs: dict[tuple[int, int], dict[str, float]],
                    best: float) -> None:
    """Name each feature's strongest redundant partner and strongest interaction partner where they matter."""
    redundant: dict[int, tuple[float, int]] = {}
    interacting: dict[int, tuple[float, int]] = {}
    for (a, b), values in pairs.items():
        for me, other, explained in ((a, b, values["a_explained_by_b"]), (b, a, values["b_explained_by_a"])):
            if explained >= 0.5 and explained > redundant.get(me, (0.0, -1))[0]:
                redundant[me] = (explained, other)
            if values["interaction"] >= 0.25 * best and values["interaction"] > interacting.get(me, (0.0, -1))[0]:
                interacting[me] = (values["interaction"], other)
    for me, (value, other) in redundant.items():
        if not any(n.startswith("duplicate of") for n in notes[me]):
            notes[me].append(f"redundant with {names[other]} ({value:.2f})")
    for me, (value, other) in interacting.items():
        notes[me].append(f"interacts with {names[other]} (+{value:.4f} nats)")

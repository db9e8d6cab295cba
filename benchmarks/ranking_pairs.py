"""Are `ctrlab rank`'s pair scores (pairs.csv ``interaction``) trustworthy on a Criteo-shaped planted set?

The set: 26 categorical fields (vocabularies log-spaced 5 .. 100,000, Zipf values) and 13 count-valued numeric
fields; main effects on 8 categorical and 4 numeric fields, 3 interactions planted among the main-effect fields (so
the 12 informative fields are all among the 20 pair candidates), the other 14 categorical and 9 numeric fields pure
noise. The counts are integers, as in a click log's file, so ``ctrlab rank`` reads a count column with at most 1,000
distinct values as categorical (``--float-counts`` keeps them floats, always cut into quantile bins). Per-feature
scores use every row (``--rows``), pair scores ``--pair-rows`` of them (the default 250,000).

Printed per seed: the strongest pairs, the rank and score of each planted pair, the best pair that involves a noise
field (rank, score) and the largest |score| of such a pair, the best pair of informative fields that is not planted,
and the noise fields in 3MR's top 12; then one summary line per seed. About 10 s per seed at 1M rows on one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ranking_pairs.py --seed 0 1 2
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("POLARS_MAX_THREADS", "1")

SCENARIO = {"categorical_fields": 26, "numeric_fields": 13, "informative_fields": 8, "numeric_informative": 4,
            "interaction_pairs": 3, "interactions_among": "main_effects"}


def run(seed: int, rows: int, pair_rows: int, float_counts: bool, show: int) -> str:
    """Rank one generated set, print its figures and return its summary line."""
    import polars as pl

    from ctrlab.datasets.synthetic import SyntheticConfig, generate
    from ctrlab.ranking.encode import Kind
    from ctrlab.ranking.rank import RankingOptions, rank_features

    started = time.perf_counter()
    data = generate(SyntheticConfig(rows=rows, **SCENARIO), seed)
    frame = data.frame
    if not float_counts:
        frame = frame.with_columns(pl.col(r"^I\d+$").cast(pl.Int64))
    kinds: dict[str, Kind | None] = {c: None for c in frame.columns if c not in ("label", "ts")}
    ranking = rank_features(frame, "label", kinds, RankingOptions(pair_rows=pair_rows))
    seconds = time.perf_counter() - started

    noise = set(data.noise)
    planted = {frozenset(p) for p in data.interactions}
    cardinality = dict(zip(ranking.table["feature"], ranking.table["cardinality"]))
    kind = dict(zip(ranking.table["feature"], ranking.table["kind"]))
    pairs = list(zip(ranking.pairs["feature_a"], ranking.pairs["feature_b"], ranking.pairs["interaction"]))

    def name(feature: str) -> str:
        return f"{feature}({cardinality[feature]}{'' if kind[feature] == 'categorical' else ' num'})"

    def describe(a: str, b: str) -> str:
        tag = "planted" if frozenset((a, b)) in planted else "noise" if {a, b} & noise else "informative"
        return f"{name(a)} x {name(b)} [{tag}]"

    print(f"seed {seed}: {rows:,} rows, pair scores on {min(rows, pair_rows):,} rows, {len(pairs)} pairs, "
          f"{seconds:.0f} s (ranking {ranking.seconds:.0f} s, pairs {ranking.timings['pairs']:.1f} s)")
    for rank, (a, b, score) in enumerate(pairs[:show], 1):
        print(f"  {rank:3d}  {score:+.5f}  {describe(a, b)}")
    planted_ranks = []
    for rank, (a, b, score) in enumerate(pairs, 1):
        if frozenset((a, b)) in planted:
            planted_ranks.append(rank)
            print(f"planted pair: rank {rank}, {score:+.5f}, {describe(a, b)}")
    a, b, score = pairs[0]
    strongest = f"strongest {describe(a, b)} {score:+.5f}"
    noisy = [(rank, a, b, score) for rank, (a, b, score) in enumerate(pairs, 1) if {a, b} & noise]
    rank, a, b, score = noisy[0]
    largest = max(abs(s) for *_, s in noisy)
    best_noise = f"best noise pair rank {rank} {score:+.5f} ({describe(a, b)}), largest |noise| {largest:.5f}"
    unplanted = [(rank, a, b, score) for rank, (a, b, score) in enumerate(pairs, 1)
                 if not {a, b} & noise and frozenset((a, b)) not in planted]
    rank, a, b, score = unplanted[0]
    print(f"best unplanted pair of informative fields: rank {rank}, {score:+.5f}, {describe(a, b)}")
    top = ranking.top(len(data.informative))
    intruders = [f for f in top if f in noise]
    print(f"3MR top {len(top)}: {', '.join(top)}")
    listed = ", ".join(intruders) if intruders else "none"
    print(f"noise fields in 3MR top {len(top)}: {listed}")
    return (f"seed {seed}: {strongest}; planted ranks {planted_ranks}; {best_noise}; best unplanted informative "
            f"pair rank {rank} {score:+.5f}; noise in 3MR top {len(top)}: {listed}; "
            f"pairs {ranking.timings['pairs']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="seeds of the generated sets")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated set")
    parser.add_argument("--pair-rows", type=int, default=250_000, help="rows the pair scores use")
    parser.add_argument("--float-counts", action="store_true",
                        help="keep the counts as floats (always cut into quantile bins)")
    parser.add_argument("--show", type=int, default=6, help="strongest pairs to print")
    args = parser.parse_args()
    summary = [run(seed, args.rows, args.pair_rows, args.float_counts, args.show) for seed in args.seed]
    print("\n".join(["", *summary]))


if __name__ == "__main__":
    main()

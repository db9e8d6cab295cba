"""Seeded, Criteo-like synthetic click data with the true click probability of every row.

:func:`generate` draws a table that looks like a click log (count-like numeric columns ``I1..In`` with missing
values, Zipf-distributed categorical ids ``C1..Cm`` whose vocabularies differ by orders of magnitude, optional noisy
copies ``R1..Rk``, an optional behaviour history ``hist`` with a candidate ``item``, and an increasing timestamp
``ts``) and the probability ``p`` each label was drawn from. Because ``p`` is known, the Bayes-optimal AUC of any split
is :func:`bayes_optimal_auc` of its labels against its ``p``: the ceiling a model can be measured against.

The click logit is ``intercept + signal_scale * (main + interaction + memorize + factorize + numeric + sequence)``:

* ``main``: one random effect per value of each of ``informative_fields`` categorical fields;
* ``interaction`` (pair kind "group"): for each of ``interaction_pairs`` planted pairs of categorical fields, the values
  of both fields are hashed into a few hidden groups and an effect table indexed by ``(group_a, group_b)`` is added.
  The table is double-centred under the group frequencies, so (fields being drawn independently) its best additive
  approximation is zero: only a model that crosses the two fields can use it;
* ``memorize`` (pair kind "memorize", after OptInter, Lyu et al. ICDE 2022): for each of ``memorize_pairs`` pairs of
  fields with at most ``memorize_max_cardinality`` values, a full-rank effect table ``T[value_a, value_b]`` of iid
  normals, double-centred under the two fields' value frequencies (no main effect leaks) and scaled to
  ``memorize_scale``. Every combination is frequent and its effect is unrelated to the others', so the best a model can
  do is to memorise it (a cross-product feature, one embedding per combination); a low-rank factorisation cannot
  represent it;
* ``factorize`` (pair kind "factorize"): for each of ``factorize_pairs`` pairs of fields with at least
  ``factorize_min_cardinality`` values, a rank-``factorize_rank`` effect ``sum_k u_a[k] * v_b[k]``, with ``u`` and
  ``v`` iid normal per value and each centred under its field's value frequencies (so the product has no conditional
  mean given either field), scaled to ``factorize_scale``. Most combinations are rare or unseen, so memorising them
  fails, but every value's factor is seen with many partners: an inner product of per-value embeddings (FM-style)
  learns it;
* ``numeric``: a nonlinear function (log, threshold or hump in ``log1p(x)``) of ``numeric_informative`` count columns;
  a missing value contributes nothing;
* ``sequence``: the share of the history that falls in the candidate item's latent cluster.

A pair of fields is planted at most once, whatever its kind; ``SyntheticData.pair_kinds`` says which pair got which
kind. Every term is scaled to a fixed standard deviation (``main_effect_scale`` and friends) and the intercept is
solved so that the mean of ``p`` equals ``base_rate``. All randomness comes from named :class:`numpy.random.PCG64`
streams derived from ``seed``, so the same config and seed give the same table in any process, and switching one
option (say ``sequence``, or the memorise/factorise pairs) leaves the columns it does not touch unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ctrlab.config.base import MAX_CARDINALITY, MAX_ROWS, MAX_SEQUENCE_LEN, Int

__all__ = ["SyntheticConfig", "SyntheticData", "bayes_optimal_auc", "generate"]

_TS_START = 1_600_000_000  # 2020-09-13, seconds
# A logit term with a std of 100 already saturates every probability; more only risks overflow to inf.
_MAX_SCALE = 100.0
_MAX_SYNTHETIC_FIELDS = 10_000
# Interaction groups make a groups x groups effect table per planted pair; a memorise pair a full values x values one.
_MAX_GROUPS = 1_000
_MAX_MEMORIZE_CARDINALITY = 1_000
# A factorise pair holds a (cardinality x rank) factor matrix per field.
_MAX_FACTORIZE_RANK = 64


class SyntheticConfig(BaseModel):
    """Shape and difficulty of a synthetic click table; see the module docstring for how the logit is built.

    ``memorize_pairs`` / ``factorize_pairs`` must fit among the pairs of small / large fields that stay free whichever
    pairs a seed gives ``interaction_pairs`` (the validator assumes the worst case, so validity never depends on the
    seed), and when both are planted ``memorize_max_cardinality < factorize_min_cardinality``.
    """

    # Bounded like every recipe section (see ctrlab.config.base): sizes on both sides, floats finite, so an absurd
    # shape is a validation error; rows x columns within the bounds is checked by ctrlab.train.footprint.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rows: Int = Field(200_000, ge=1, le=MAX_ROWS, description="total rows")
    numeric_fields: Int = Field(4, ge=0, le=_MAX_SYNTHETIC_FIELDS, description="count-like float columns I1..In")
    categorical_fields: Int = Field(12, ge=0, le=_MAX_SYNTHETIC_FIELDS, description="categorical id columns C1..Cm")
    cardinalities: list[Annotated[Int, Field(ge=2, le=MAX_CARDINALITY)]] | None = Field(
        None, max_length=_MAX_SYNTHETIC_FIELDS,
        description="vocabulary size per categorical field; default log-spaced from 5 to 100_000"
    )
    zipf_exponent: float = Field(1.1, ge=0.0, le=_MAX_SCALE,
                                 description="value frequencies within a field fall as rank**-exponent")
    informative_fields: Int = Field(4, ge=0, le=_MAX_SYNTHETIC_FIELDS,
                                    description="categorical fields with a main effect")
    interaction_pairs: Int = Field(3, ge=0, le=_MAX_SYNTHETIC_FIELDS,
                                   description="planted pairwise interactions between categorical fields")
    interactions_among: Literal["all", "main_effects"] = Field(
        "all", description="draw the interacting pairs from all categorical fields or only those with a main effect"
    )
    memorize_pairs: Int = Field(0, ge=0, le=_MAX_SYNTHETIC_FIELDS,
                                description="planted full-rank pairwise effects between small-vocabulary fields")
    factorize_pairs: Int = Field(0, ge=0, le=_MAX_SYNTHETIC_FIELDS,
                                 description="planted low-rank pairwise effects between large-vocabulary fields")
    numeric_informative: Int = Field(2, ge=0, le=_MAX_SYNTHETIC_FIELDS,
                                     description="numeric fields with a nonlinear effect")
    redundant_fields: Int = Field(0, ge=0, le=_MAX_SYNTHETIC_FIELDS,
                                  description="noisy relabelled copies R1..Rk of informative fields")
    sequence: bool = Field(False, description="add a behaviour history 'hist' and a candidate 'item'")
    max_history: Int = Field(20, ge=1, le=MAX_SEQUENCE_LEN, description="longest history")
    missing_rate: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of numeric values set to null")
    base_rate: float = Field(0.25, gt=0.0, lt=1.0, description="target mean click probability")
    signal_scale: float = Field(1.0, ge=0.0, le=_MAX_SCALE, description="multiplies the whole non-intercept logit")
    time_column: bool = Field(True, description="add an increasing integer 'ts' column")

    # Finer knobs (all defaulted).
    main_effect_scale: float = Field(0.5, ge=0.0, le=_MAX_SCALE,
                                     description="std of each main-effect term of the logit")
    interaction_scale: float = Field(0.6, ge=0.0, le=_MAX_SCALE,
                                     description="std of each interaction term of the logit")
    interaction_groups: Int = Field(4, ge=2, le=_MAX_GROUPS,
                                    description="hidden groups per field of an interaction pair")
    memorize_scale: float = Field(0.6, ge=0.0, le=_MAX_SCALE,
                                  description="std of each memorise-type pair term of the logit")
    memorize_max_cardinality: Int = Field(100, ge=2, le=_MAX_MEMORIZE_CARDINALITY,
                                          description="memorise pairs are drawn among fields with at most this many "
                                                      "values")
    factorize_scale: float = Field(0.6, ge=0.0, le=_MAX_SCALE,
                                   description="std of each factorise-type pair term of the logit")
    factorize_min_cardinality: Int = Field(1_000, ge=2, le=MAX_CARDINALITY,
                                           description="factorise pairs are drawn among fields with at least this many "
                                                       "values")
    factorize_rank: Int = Field(4, ge=1, le=_MAX_FACTORIZE_RANK, description="rank of each factorise-type pair effect")
    numeric_scale: float = Field(0.4, ge=0.0, le=_MAX_SCALE, description="std of each numeric term of the logit")
    redundant_noise: float = Field(0.05, ge=0.0, le=1.0, description="share of a redundant column redrawn at random")
    num_items: Int = Field(10_000, ge=2, le=MAX_CARDINALITY, description="item vocabulary of 'item' and 'hist'")
    item_clusters: Int = Field(20, ge=2, le=MAX_CARDINALITY,
                               description="latent item clusters driving the history affinity")
    history_focus: float = Field(0.7, ge=0.0, le=1.0, description="share of history items from the user's clusters")
    candidate_focus: float = Field(0.3, ge=0.0, le=1.0, description="chance the candidate is from the user's clusters")
    sequence_scale: float = Field(0.7, ge=0.0, le=_MAX_SCALE,
                                  description="std of the history-affinity term of the logit")

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        m = self.categorical_fields
        if self.cardinalities is not None:
            if len(self.cardinalities) != m:
                raise ValueError(f"cardinalities has {len(self.cardinalities)} entries, categorical_fields is {m}")
            if any(c < 2 for c in self.cardinalities):
                raise ValueError("every cardinality must be at least 2")
        if self.informative_fields > m:
            raise ValueError(f"informative_fields ({self.informative_fields}) > categorical_fields ({m})")
        if self.interaction_pairs > m * (m - 1) // 2:
            raise ValueError(f"interaction_pairs ({self.interaction_pairs}) > the {m * (m - 1) // 2} pairs of "
                             f"{m} fields")
        main = self.informative_fields
        if self.interactions_among == "main_effects" and self.interaction_pairs > main * (main - 1) // 2:
            raise ValueError(f"interaction_pairs ({self.interaction_pairs}) > the {main * (main - 1) // 2} pairs of "
                             f"{main} main-effect fields")
        if self.numeric_informative > self.numeric_fields:
            raise ValueError(
                f"numeric_informative ({self.numeric_informative}) > numeric_fields ({self.numeric_fields})"
            )
        self._check_pairs()
        if self.redundant_fields and not (
            self.informative_fields or self.interaction_pairs or self.memorize_pairs or self.factorize_pairs
        ):
            raise ValueError("redundant_fields needs an informative categorical field to copy")
        if self.item_clusters > self.num_items:
            raise ValueError(f"item_clusters ({self.item_clusters}) > num_items ({self.num_items})")
        return self

    def _check_pairs(self) -> None:
        """Enough memorise / factorise pairs exist whichever pairs the seed gives the group interactions."""
        if not (self.memorize_pairs or self.factorize_pairs):
            return
        if self.memorize_pairs and self.factorize_pairs and (
            self.memorize_max_cardinality >= self.factorize_min_cardinality
        ):
            raise ValueError(f"memorize_max_cardinality ({self.memorize_max_cardinality}) >= factorize_min_cardinality "
                             f"({self.factorize_min_cardinality}): the two kinds need disjoint fields")
        cards = self.resolved_cardinalities()
        pool = self.categorical_fields if self.interactions_among == "all" else self.informative_fields
        for name, count, fits, limit in (
            ("memorize_pairs", self.memorize_pairs, lambda c: c <= self.memorize_max_cardinality,
             f"<= {self.memorize_max_cardinality}"),
            ("factorize_pairs", self.factorize_pairs, lambda c: c >= self.factorize_min_cardinality,
             f">= {self.factorize_min_cardinality}"),
        ):
            if not count:
                continue
            k = sum(1 for c in cards if fits(c))
            total = k * (k - 1) // 2
            # In the worst case the group interactions take as many of these pairs as they can.
            taken = min(self.interaction_pairs, min(k, pool) * (min(k, pool) - 1) // 2)
            if count > total - taken:
                raise ValueError(f"{name} ({count}) > the {total - taken} pairs free among the {k} fields with "
                                 f"cardinality {limit} ({total} pairs, up to {taken} taken by interaction_pairs)")

    def resolved_cardinalities(self) -> list[int]:
        """The vocabulary size of each categorical field (the default spread when ``cardinalities`` is None)."""
        if self.cardinalities is not None:
            return list(self.cardinalities)
        m = self.categorical_fields
        if m == 0:
            return []
        if m == 1:
            return [1000]
        return [int(round(c)) for c in np.geomspace(5, 100_000, m)]


@dataclass
class SyntheticData:
    """A generated table, the true click probability of each row, and which columns matter.

    ``frame`` holds ``label`` (Int8), ``ts`` (Int64, if ``time_column``), ``I*`` (Float64 with nulls), ``C*`` and
    ``R*`` (String), and ``item``/``hist`` (String, if ``sequence``). ``click_probability[i]`` is the ``p`` the label
    of row ``i`` was drawn from. ``logit_parts`` holds each kind of term of the logit (already multiplied by
    ``signal_scale``), so ``click_probability == sigmoid(intercept + sum(logit_parts.values()))``; with it one can
    build oracles that see only part of the signal (e.g. main effects only). "memorize" and "factorize" are present
    only when such pairs are planted.

    ``informative`` lists the categorical fields with a main effect or in a planted pair (any kind), then the
    informative numeric fields (and ``item``/``hist``); ``noise`` the rest. ``redundant`` maps each copy ``R*`` to its
    source (a main-effect or group-interaction field; a memorise/factorise field only when there is none of those).
    ``main_effects`` names the main-effect fields and ``interactions`` the group-interaction pairs (as before).
    ``pair_kinds`` maps every planted pair, its two field names in column order (e.g. ``("C3", "C7")``), to its kind:
    "group" (the ``interactions``), "memorize" or "factorize"; no pair appears twice.
    """

    frame: pl.DataFrame
    click_probability: np.ndarray
    informative: list[str]
    redundant: dict[str, str]
    noise: list[str]
    max_history: int = 0
    main_effects: list[str] = field(default_factory=list)
    interactions: list[tuple[str, str]] = field(default_factory=list)
    intercept: float = 0.0
    logit_parts: dict[str, np.ndarray] = field(default_factory=dict)
    pair_kinds: dict[tuple[str, str], str] = field(default_factory=dict)

    def feature_spec(self) -> dict[str, Any]:
        """The feature columns by kind: categorical (``C*``, ``R*``, ``item``), numeric (``I*``) and sequence."""
        columns = self.frame.columns
        categorical = [c for c in columns if _is_field(c, "C") or _is_field(c, "R")]
        numeric = [c for c in columns if _is_field(c, "I")]
        sequence: list[dict[str, Any]] = []
        if "item" in columns:
            categorical.append("item")
        if "hist" in columns:
            sequence.append({"name": "hist", "share_vocab_with": "item", "max_len": self.max_history})
        return {"categorical": categorical, "numeric": numeric, "sequence": sequence}


def _is_field(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix) :].isdigit()


# ----------------------------------------------------------------------------------------------------------------------
# Random streams

_STREAMS = (
    "pick",
    "cat_values",
    "main",
    "interaction",
    "numeric_shape",
    "numeric_values",
    "redundant",
    "sequence_shape",
    "sequence_values",
    "time",
    "label",
    # Appended later: a new name goes at the end only, so the streams above keep their spawn keys.
    "pair_choice",
    "memorize",
    "factorize",
)


def _stream(seed: int, name: str) -> np.random.Generator:
    """An independent generator per named purpose, so one option never shifts the draws of another."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_STREAMS.index(name),))))


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def _zipf_cdf(k: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, k + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf


def _zipf_probs(k: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, k + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def _sample_ranks(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """Frequency ranks (0 = most frequent) drawn by inverse CDF."""
    ranks = np.searchsorted(cdf, rng.random(n), side="right")
    np.minimum(ranks, len(cdf) - 1, out=ranks)  # guards the (measure-zero) rounding at the top of the CDF
    return ranks.astype(np.int32, copy=False)


def _vocab(prefix: str, k: int) -> pl.Series:
    """Id strings ``{prefix}000000 .. {prefix}{k-1}``, zero-padded to a common width (at least 6 digits)."""
    width = max(6, len(str(k - 1)))
    return pl.select((pl.lit(prefix) + pl.int_range(k, dtype=pl.Int64).cast(pl.String).str.zfill(width)).alias("v"))[
        "v"
    ]


def _join_history(vocab: pl.Series, history: np.ndarray, offsets: np.ndarray) -> pl.Series:
    """Each row's ids joined by "|", built as one byte buffer (the ids of ``vocab`` all have the same length)."""
    tokens = (vocab + "|").cast(pl.Binary).to_numpy()
    width = len(tokens[0])
    table = np.frombuffer(b"".join(tokens), dtype=np.uint8).reshape(-1, width)
    data = table[history].reshape(-1)
    array = pa.LargeStringArray.from_buffers(
        len(offsets) - 1, pa.py_buffer(np.ascontiguousarray(offsets * width, dtype=np.int64)), pa.py_buffer(data)
    )
    return pl.Series("hist", array).str.strip_suffix("|")


def _standardise(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit std (under ``weights`` if given); a constant becomes all zeros."""
    if weights is None:
        mean = values.mean()
        std = values.std()
    else:
        mean = float(np.dot(weights, values))
        std = math.sqrt(max(float(np.dot(weights, (values - mean) ** 2)), 0.0))
    out = values - mean
    return out / std if std > 1e-12 else np.zeros_like(out)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _solve_intercept(z: np.ndarray, rate: float) -> float:
    """The ``b`` with ``mean(sigmoid(b + z)) == rate`` (safeguarded Newton; the mean is increasing in ``b``)."""
    lo, hi = -40.0 - float(z.max()), 40.0 - float(z.min())
    b = math.log(rate / (1 - rate)) - float(np.median(z))
    for _ in range(100):
        p = _sigmoid(b + z)
        gap = float(p.mean()) - rate
        if abs(gap) < 1e-10:
            break
        if gap > 0:
            hi = b
        else:
            lo = b
        slope = float((p * (1 - p)).mean())
        step = b - gap / slope if slope > 0 else 0.5 * (lo + hi)
        b = step if lo < step < hi else 0.5 * (lo + hi)
    return b


def _numeric_effect(kind: int, x: np.ndarray, centre: float) -> np.ndarray:
    lx = np.log1p(x)
    if kind == 0:  # monotone in log(count)
        return lx
    if kind == 1:  # step at a typical count
        return (lx > centre).astype(np.float64)
    return -((lx - centre) ** 2)  # hump: best at a typical count


# ----------------------------------------------------------------------------------------------------------------------
# Generator


def generate(config: SyntheticConfig, seed: int) -> SyntheticData:
    """Draw ``config.rows`` rows of synthetic click data from ``seed`` (a non-negative int); see the module docstring.

    Returns the table, the true click probability of each row and which columns are informative, redundant or noise.
    Deterministic: the same config and seed give the same result in any process.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    n = config.rows
    m = config.categorical_fields
    cards = config.resolved_cardinalities()
    cat_names = [f"C{j + 1}" for j in range(m)]
    num_names = [f"I{j + 1}" for j in range(config.numeric_fields)]

    # --- which fields matter ------------------------------------------------------------------------------------------
    pick = _stream(seed, "pick")
    main_idx = sorted(pick.choice(m, size=config.informative_fields, replace=False).tolist()) if m else []
    pool = main_idx if config.interactions_among == "main_effects" else list(range(m))
    all_pairs = [(a, b) for i, a in enumerate(pool) for b in pool[i + 1:]]
    pair_idx: np.ndarray | list[int] = (
        pick.choice(len(all_pairs), size=config.interaction_pairs, replace=False) if all_pairs else []
    )
    pairs = sorted(all_pairs[i] for i in pair_idx)
    num_idx = (
        sorted(pick.choice(config.numeric_fields, size=config.numeric_informative, replace=False).tolist())
        if config.numeric_fields
        else []
    )

    # --- categorical values -------------------------------------------------------------------------------------------
    cat_rng = _stream(seed, "cat_values")
    cdfs = [_zipf_cdf(k, config.zipf_exponent) for k in cards]
    ranks = [_sample_ranks(cat_rng, cdf, n) for cdf in cdfs]
    # The id of a value is a random relabelling of its frequency rank, so "C3_000000" is not always the most frequent.
    value_ids = [cat_rng.permutation(k).astype(np.int32) for k in cards]

    signal = config.signal_scale
    parts: dict[str, np.ndarray] = {}

    # --- main effects -------------------------------------------------------------------------------------------------
    main_rng = _stream(seed, "main")
    main = np.zeros(n)
    for j in main_idx:
        probs = _zipf_probs(cards[j], config.zipf_exponent)
        effect = _standardise(main_rng.standard_normal(cards[j]), probs) * config.main_effect_scale
        main += effect[ranks[j]]
    parts["main"] = signal * main

    # --- pairwise interactions ----------------------------------------------------------------------------------------
    int_rng = _stream(seed, "interaction")
    interaction = np.zeros(n)
    for a, b in pairs:
        ga_n = min(config.interaction_groups, cards[a])
        gb_n = min(config.interaction_groups, cards[b])
        group_a = int_rng.integers(0, ga_n, cards[a])
        group_b = int_rng.integers(0, gb_n, cards[b])
        wa = np.bincount(group_a, weights=_zipf_probs(cards[a], config.zipf_exponent), minlength=ga_n)
        wb = np.bincount(group_b, weights=_zipf_probs(cards[b], config.zipf_exponent), minlength=gb_n)
        table = int_rng.standard_normal((ga_n, gb_n))
        # Double-centre under the group frequencies: E[table | group_a] = E[table | group_b] = 0.
        table = table - (table @ wb)[:, None]
        table = table - (wa @ table)[None, :]
        std = math.sqrt(float(wa @ table**2 @ wb))
        if std > 1e-12:
            table = table / std * config.interaction_scale
        interaction += table[group_a[ranks[a]], group_b[ranks[b]]]
    parts["interaction"] = signal * interaction

    # --- memorise- and factorise-type pairs ---------------------------------------------------------------------------
    memorize_pairs, factorize_pairs = _choose_kind_pairs(config, seed, cards, pairs)
    if memorize_pairs:
        parts["memorize"] = signal * _memorize_term(config, seed, cards, ranks, memorize_pairs)
    if factorize_pairs:
        parts["factorize"] = signal * _factorize_term(config, seed, cards, ranks, factorize_pairs)

    # --- numeric columns ----------------------------------------------------------------------------------------------
    shape_rng = _stream(seed, "numeric_shape")
    num_rng = _stream(seed, "numeric_values")
    numeric_cols: list[np.ndarray] = []
    numeric = np.zeros(n)
    mus = shape_rng.uniform(0.5, 3.0, config.numeric_fields)
    sigmas = shape_rng.uniform(0.8, 2.0, config.numeric_fields)
    signs = shape_rng.choice([-1.0, 1.0], config.numeric_fields)
    kinds = shape_rng.permutation(config.numeric_fields) % 3
    for j in range(config.numeric_fields):
        x = np.floor(np.exp(mus[j] + sigmas[j] * num_rng.standard_normal(n)))
        missing = num_rng.random(n) < config.missing_rate
        if j in num_idx:
            observed = ~missing
            if observed.any():
                effect = _standardise(_numeric_effect(int(kinds[j]), x[observed], float(np.log1p(np.exp(mus[j])))))
                numeric[observed] += signs[j] * config.numeric_scale * effect
        x[missing] = np.nan
        numeric_cols.append(x)
    parts["numeric"] = signal * numeric

    # --- behaviour history --------------------------------------------------------------------------------------------
    hist_offsets: np.ndarray | None = None
    hist_items: np.ndarray | None = None
    candidate: np.ndarray | None = None
    if config.sequence:
        candidate, hist_items, hist_offsets, affinity = _sequence(config, seed, n)
        parts["sequence"] = signal * config.sequence_scale * _standardise(affinity)

    # --- probability and label ----------------------------------------------------------------------------------------
    z = np.zeros(n)
    for part in parts.values():
        z += part
    intercept = _solve_intercept(z, config.base_rate)
    p = _sigmoid(intercept + z)
    label = (_stream(seed, "label").random(n) < p).astype(np.int8)

    # --- frame --------------------------------------------------------------------------------------------------------
    columns: list[pl.Series] = [pl.Series("label", label, dtype=pl.Int8)]
    if config.time_column:
        gaps = 1 + _stream(seed, "time").poisson(2.0, n)
        columns.append(pl.Series("ts", _TS_START + np.cumsum(gaps), dtype=pl.Int64))
    for name, x in zip(num_names, numeric_cols):
        columns.append(pl.Series(name, x, dtype=pl.Float64, nan_to_null=True))
    for j, name in enumerate(cat_names):
        columns.append(_vocab(f"{name}_", cards[j]).gather(value_ids[j][ranks[j]]).alias(name))

    # --- redundant copies ---------------------------------------------------------------------------------------------
    # Copies are of main-effect and group-interaction fields, so planting memorise/factorise pairs leaves R* unchanged.
    copied = sorted(set(main_idx) | {f for pair in pairs for f in pair})
    informative_cat = sorted(set(copied) | {f for pair in memorize_pairs + factorize_pairs for f in pair})
    copied = copied or informative_cat
    redundant: dict[str, str] = {}
    red_rng = _stream(seed, "redundant")
    for r in range(config.redundant_fields):
        j = copied[r % len(copied)]  # copies cycle through the informative fields
        name = f"R{r + 1}"
        relabel = red_rng.permutation(cards[j]).astype(np.int32)
        rank = ranks[j].copy()
        redraw = red_rng.random(n) < config.redundant_noise
        rank[redraw] = _sample_ranks(red_rng, cdfs[j], int(redraw.sum()))
        columns.append(_vocab(f"{name}_", cards[j]).gather(relabel[rank]).alias(name))
        redundant[name] = cat_names[j]

    if config.sequence:
        assert candidate is not None and hist_items is not None and hist_offsets is not None
        items = _vocab("item_", config.num_items)
        columns.append(items.gather(candidate).alias("item"))
        columns.append(_join_history(items, hist_items, hist_offsets).alias("hist"))

    frame = pl.DataFrame(columns)

    informative = [cat_names[j] for j in informative_cat] + [num_names[j] for j in num_idx]
    noise = [cat_names[j] for j in range(m) if j not in informative_cat]
    noise += [num_names[j] for j in range(config.numeric_fields) if j not in num_idx]
    if config.sequence:
        informative += ["item", "hist"]
    pair_kinds: dict[tuple[str, str], str] = {}
    for kind, planted in (("group", pairs), ("memorize", memorize_pairs), ("factorize", factorize_pairs)):
        for a, b in planted:
            pair_kinds[(cat_names[a], cat_names[b])] = kind
    return SyntheticData(
        frame=frame,
        click_probability=p,
        informative=informative,
        redundant=redundant,
        noise=noise,
        max_history=config.max_history,
        main_effects=[cat_names[j] for j in main_idx],
        interactions=[(cat_names[a], cat_names[b]) for a, b in pairs],
        intercept=intercept,
        logit_parts=parts,
        pair_kinds=pair_kinds,
    )


def _choose_kind_pairs(
    config: SyntheticConfig, seed: int, cards: list[int], taken: list[tuple[int, int]]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The memorise and factorise pairs (field indices, ``a < b``, sorted): distinct, none among ``taken``.

    Drawn from their own stream, so the group pairs (and every other draw) are those of a config without them.
    """
    memorize: list[tuple[int, int]] = []
    factorize: list[tuple[int, int]] = []
    if not (config.memorize_pairs or config.factorize_pairs):
        return memorize, factorize
    rng = _stream(seed, "pair_choice")
    used = set(taken)
    m = len(cards)
    for count, fits, chosen in (
        (config.memorize_pairs, lambda c: c <= config.memorize_max_cardinality, memorize),
        (config.factorize_pairs, lambda c: c >= config.factorize_min_cardinality, factorize),
    ):
        if not count:
            continue
        fields = [j for j in range(m) if fits(cards[j])]
        free = [(a, b) for i, a in enumerate(fields) for b in fields[i + 1:] if (a, b) not in used]
        if count > len(free):  # the config validator rules this out
            raise ValueError(f"only {len(free)} free pairs for {count} planted pairs")
        chosen.extend(sorted(free[i] for i in rng.choice(len(free), size=count, replace=False)))
        used.update(chosen)
    return memorize, factorize


def _memorize_term(
    config: SyntheticConfig, seed: int, cards: list[int], ranks: list[np.ndarray], pairs: list[tuple[int, int]]
) -> np.ndarray:
    """Sum over ``pairs`` of a full-rank effect per value combination (indexed by frequency ranks), no main effect."""
    rng = _stream(seed, "memorize")
    term = np.zeros(ranks[0].size if ranks else 0)
    for a, b in pairs:
        wa = _zipf_probs(cards[a], config.zipf_exponent)
        wb = _zipf_probs(cards[b], config.zipf_exponent)
        table = rng.standard_normal((cards[a], cards[b]))
        # Double-centre under the value frequencies: E[table | value_a] = E[table | value_b] = 0.
        table = table - (table @ wb)[:, None]
        table = table - (wa @ table)[None, :]
        std = math.sqrt(float(wa @ table**2 @ wb))
        if std > 1e-12:
            table = table / std * config.memorize_scale
        term += table[ranks[a], ranks[b]]
    return term


def _factorize_term(
    config: SyntheticConfig, seed: int, cards: list[int], ranks: list[np.ndarray], pairs: list[tuple[int, int]]
) -> np.ndarray:
    """Sum over ``pairs`` of a rank-``factorize_rank`` effect ``u[value_a] . v[value_b]``, no main effect."""
    rng = _stream(seed, "factorize")
    term = np.zeros(ranks[0].size if ranks else 0)
    r = config.factorize_rank
    for a, b in pairs:
        wa = _zipf_probs(cards[a], config.zipf_exponent)
        wb = _zipf_probs(cards[b], config.zipf_exponent)
        u = rng.standard_normal((cards[a], r))
        v = rng.standard_normal((cards[b], r))
        # Centre each factor under its field's frequencies: E[u . v | value_a] = u . E[v] = 0, and likewise for b.
        u -= wa @ u
        v -= wb @ v
        # E[(u . v)^2] = sum_kl E[u_k u_l] E[v_k v_l] for independent fields.
        std = math.sqrt(max(float(np.sum((u.T * wa) @ u * ((v.T * wb) @ v))), 0.0))
        scale = config.factorize_scale / std if std > 1e-12 else 0.0
        term += scale * np.einsum("ij,ij->i", u[ranks[a]], v[ranks[b]])
    return term


def _sequence(
    config: SyntheticConfig, seed: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidate items, flattened histories (with their row offsets) and the candidate-history affinity per row.

    Items fall into latent clusters; each row (a user) has two favourite clusters. A history slot holds, with
    probability ``history_focus``, a uniform item of a favourite cluster, else an item drawn by global popularity;
    the candidate likewise comes from a favourite cluster with probability ``candidate_focus``. The affinity is the
    share of the history in the candidate's cluster (0 for an empty history).
    """
    shape = _stream(seed, "sequence_shape")
    rng = _stream(seed, "sequence_values")
    n_items, n_clusters, max_len = config.num_items, config.item_clusters, config.max_history

    item_cluster = shape.permutation(np.arange(n_items) % n_clusters)  # every cluster non-empty
    by_cluster = np.argsort(item_cluster, kind="stable").astype(np.int32)
    cluster_start = np.searchsorted(item_cluster[by_cluster], np.arange(n_clusters))
    cluster_size = np.bincount(item_cluster, minlength=n_clusters)
    popularity_cdf = _zipf_cdf(n_items, config.zipf_exponent)
    popularity_label = shape.permutation(n_items).astype(np.int32)

    def draw(favourites: np.ndarray, focus: float) -> np.ndarray:
        """An item per entry: with probability ``focus`` uniform in its favourite cluster, else by popularity."""
        size = favourites.size
        focused = rng.random(size) < focus
        items = np.empty(size, dtype=np.int32)
        fav = favourites[focused]
        items[focused] = by_cluster[cluster_start[fav] + (rng.random(fav.size) * cluster_size[fav]).astype(np.int64)]
        items[~focused] = popularity_label[_sample_ranks(rng, popularity_cdf, size - fav.size)]
        return items

    likes = rng.integers(0, n_clusters, (n, 2))
    candidate_cluster = likes[np.arange(n), rng.integers(0, 2, n)]
    candidate = draw(candidate_cluster, config.candidate_focus)
    lengths = rng.integers(0, max_len + 1, n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row = np.repeat(np.arange(n, dtype=np.int64), lengths)  # the row of each history slot, slots in order
    history = draw(likes[row, rng.integers(0, 2, row.size)], config.history_focus)

    same = item_cluster[history] == item_cluster[candidate][row]
    affinity = np.bincount(row, weights=same, minlength=n) / np.maximum(lengths, 1)
    return candidate, history, offsets, affinity


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def bayes_optimal_auc(labels: np.ndarray, click_probability: np.ndarray) -> float:
    """ROC AUC of ``click_probability`` as a score for the 0/1 ``labels`` (ties count one half).

    Computed from average ranks (the Mann-Whitney statistic) in ``O(n log n)``. Given the true probabilities of a
    split, this is the best AUC any model can expect on it. Raises ``ValueError`` when one class is absent.
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(click_probability, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels has {y.size} entries, click_probability has {s.size}")
    positive = y != 0
    n_pos = int(positive.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # Tie groups of equal scores; every member gets the group's average 1-based rank.
    new_group = np.empty(s.size, dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_s[1:], sorted_s[:-1], out=new_group[1:])
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], s.size)
    average_rank = 0.5 * (starts + 1 + ends)
    positives_per_group = np.bincount(group, weights=positive[order], minlength=starts.size)
    rank_sum = float(np.dot(average_rank, positives_per_group))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (float(n_pos) * float(n_neg))

"""Evaluation metrics: AUC, logloss and group AUC, vectorised in numpy."""

from __future__ import annotations

import numpy as np


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(scores)]))
    tie_ranks = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1..end
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(tie_ranks, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted as one half). NaN if one class only."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def logloss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """gAUC: the AUC within each group, averaged with weights = group size, over groups that hold both classes
    (Zhou et al. 2018, DIN, eq. 9 uses impressions as weights)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    # Rank scores within each group: sort by (group, score), then average ranks over (group, score) ties.
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    n = len(g)
    group_start = np.concatenate(([True], g[1:] != g[:-1]))
    tie_start = group_start | np.concatenate(([True], s[1:] != s[:-1]))
    tie_id = np.cumsum(tie_start) - 1
    tie_first = np.flatnonzero(tie_start)
    tie_len = np.diff(np.concatenate((tie_first, [n])))
    group_id = np.cumsum(group_start) - 1
    group_first = np.flatnonzero(group_start)
    position_in_group = np.arange(n) - group_first[group_id]
    tie_first_pos = position_in_group[tie_first]
    ranks = (tie_first_pos + 1 + tie_first_pos + tie_len) / 2.0
    rank = ranks[tie_id]
    n_groups = len(group_first)
    pos = np.bincount(group_id, weights=y, minlength=n_groups)
    size = np.bincount(group_id, minlength=n_groups).astype(np.float64)
    neg = size - pos
    rank_sum = np.bincount(group_id, weights=rank * y, minlength=n_groups)
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        return float("nan")
    group_aucs = (rank_sum[valid] - pos[valid] * (pos[valid] + 1) / 2.0) / (pos[valid] * neg[valid])
    return float(np.average(group_aucs, weights=size[valid]))


def compute_metrics(names: list[str], labels: np.ndarray, probabilities: np.ndarray,
                    groups: np.ndarray | None = None) -> dict[str, float]:
    """The requested metrics; ``gauc`` needs ``groups`` (NaN without)."""
    out: dict[str, float] = {}
    for name in names:
        if name == "auc":
            out["auc"] = auc(labels, probabilities)
        elif name == "logloss":
            out["logloss"] = logloss(labels, probabilities)
        elif name == "gauc":
            out["gauc"] = group_auc(labels, probabilities, groups) if groups is not None else float("nan")
        else:
            raise ValueError(f"unknown metric {name!r}")
    return out

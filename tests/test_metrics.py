"""Metrics against brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest

from ctrlab.train.metrics import auc, compute_metrics, group_auc, logloss


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 6, 300).astype(float)  # many ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.0
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_group_auc_is_size_weighted_mean_over_groups_with_both_classes() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500)
    s = rng.integers(0, 10, 500).astype(float)
    g = rng.integers(0, 30, 500)
    g[:5] = 99  # a group ...
    y[:5] = 1  # ... with one class only: excluded
    total = weight = 0.0
    for k in np.unique(g):
        m = g == k
        if 0 < y[m].sum() < m.sum():
            total += _pairwise_auc(y[m], s[m]) * m.sum()
            weight += m.sum()
    assert group_auc(y, s, g) == pytest.approx(total / weight, abs=1e-12)


def test_logloss_and_clipping() -> None:
    y = np.array([1, 0])
    assert logloss(y, np.array([0.8, 0.3])) == pytest.approx(-(np.log(0.8) + np.log(0.7)) / 2)
    assert np.isfinite(logloss(y, np.array([0.0, 1.0])))


def test_compute_metrics_names() -> None:
    out = compute_metrics(["auc", "logloss", "gauc"], np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.4, 0.6]),
                          np.array([0, 0, 1, 1]))
    assert set(out) == {"auc", "logloss", "gauc"} and out["gauc"] == 1.0

"""ROC-AUC and PR-AUC (average precision) for binary labels, in numpy.

The same definitions as scikit-learn's `roc_auc_score` and
`average_precision_score` (tests/test_lean.py checks them against
scikit-learn on random and tied scores), without importing scikit-learn and
scipy into every node process: ~1 s and ~140 MB that a node does not need.
"""

from __future__ import annotations

import numpy as np


def _binary(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    score = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or score.shape != y.shape:
        raise ValueError(f"labels {y.shape} and scores {score.shape}: expected two 1-d arrays "
                         "of one length")
    if not np.isfinite(score).all():
        raise ValueError("scores must be finite")
    pos = y == 1
    if not np.all(pos | (y == 0)):
        raise ValueError("labels must be 0 or 1")
    if pos.all() or not pos.any():
        raise ValueError("ROC-AUC and PR-AUC are undefined when the labels hold one class only")
    return pos, score


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, a tie counting one half (Mann-Whitney U with average ranks)."""
    pos, score = _binary(y, score)
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Tied scores share the mean of the ranks they span (ranks are 1-based).
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    n_pos = int(pos.sum())
    n_neg = len(s) - n_pos
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Sum over the distinct score thresholds (high to low) of precision x the recall
    gained there: scikit-learn's step-wise PR-AUC, without interpolation."""
    pos, score = _binary(y, score)
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], pos[order].astype(np.float64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # end of each tie group
    tps = np.cumsum(t)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))

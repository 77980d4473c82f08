"""95 % intervals for a round's metrics on a member's held-out rows.

A member that evaluates on 13 to 52 of its own rows sees its ROC-AUC swing by 0.3
from round to round: the interval says how much of that is the few rows. Closed
forms, from the counts alone (no resampling, no scores kept):

- accuracy: Wilson score interval for k correct of n (Wilson 1927), which stays
  inside [0, 1] and is not degenerate at 0 or n correct, unlike the normal one;
- ROC-AUC: Newcombe's score-type ("Wilson-type") interval for the Mann-Whitney AUC
  (Newcombe 2006, Stat Med 25:559-573, part 2, method 5): every θ with
  |A - θ| <= z·SE(θ), where SE(θ) is the Hanley & McNeil (1982) standard error
  evaluated at θ (not at A) with both class counts replaced by their mean
  N* = (m + n) / 2. Like Wilson's for a proportion it stays inside [0, 1] and is not
  degenerate at an AUC of exactly 0 or 1 (1.000 on 5 + 8 rows gives 0.71-1.00), where
  the Wald form A ± z·SE(A) (`hanley_mcneil`, kept for reference) is 0 wide.

Pure numpy-free arithmetic: `flnode report` uses it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def hanley_mcneil(auc: float, positives: int, negatives: int,
                  z: float = Z95) -> tuple[float, float]:
    if positives <= 0 or negatives <= 0 or not math.isfinite(auc):
        return (math.nan, math.nan)
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
           + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    se = math.sqrt(max(var, 0.0))
    return (max(0.0, auc - z * se), min(1.0, auc + z * se))


def _hm_variance(theta: float, m: float, n: float) -> float:
    """Hanley & McNeil's variance of the AUC at θ for m positives and n negatives, in the
    factored form θ(1-θ)[1 + (m-1)(1-θ)/(2-θ) + (n-1)θ/(1+θ)] / (m n)."""
    return theta * (1 - theta) * (1 + (m - 1) * (1 - theta) / (2 - theta)
                                  + (n - 1) * theta / (1 + theta)) / (m * n)


# Bisection steps for the score interval's ends: 60 halvings of [0, 1] reach 1e-18,
# below float resolution; the time is fixed (no data-dependent loop).
SCORE_STEPS = 60


def auc_score_interval(auc: float, positives: int, negatives: int,
                       z: float = Z95) -> tuple[float, float]:
    """Newcombe's (2006) method 5: {θ : (A - θ)^2 <= z^2 V(θ)} with V the Hanley-McNeil
    variance at θ, both counts set to N* = (m + n) / 2. Each end by bisection between A
    and the bound (0 or 1), where (A - θ)^2 - z^2 V(θ) changes sign: V is 0 at 0 and 1."""
    if positives <= 0 or negatives <= 0 or not math.isfinite(auc) or not 0 <= auc <= 1:
        return (math.nan, math.nan)
    m = n = (positives + negatives) / 2

    def outside(theta: float) -> bool:
        return (auc - theta) ** 2 > z * z * _hm_variance(theta, m, n)

    def end(bound: float) -> float:
        if not outside(bound):  # the whole side is inside (A near the bound)
            return bound
        inside, out = auc, bound
        for _ in range(SCORE_STEPS):
            mid = (inside + out) / 2
            if outside(mid):
                out = mid
            else:
                inside = mid
        return inside

    return (end(0.0), end(1.0))


def metric_intervals(metrics: dict[str, float], labels: Sequence[int]) -> dict[str, list[float]]:
    """{"accuracy": [lo, hi], "roc_auc": [lo, hi]} for the metrics present and defined;
    `labels` are the held-out rows' classes (0/1 for ROC-AUC)."""
    n = len(labels)
    out: dict[str, list[float]] = {}
    acc = metrics.get("accuracy")
    if acc is not None and math.isfinite(acc) and n:
        out["accuracy"] = [round(x, 6) for x in wilson(acc * n, n)]
    auc = metrics.get("roc_auc")
    if auc is not None and math.isfinite(auc):
        pos = sum(1 for y in labels if int(y) == 1)
        lo, hi = auc_score_interval(auc, pos, n - pos)
        if math.isfinite(lo):
            out["roc_auc"] = [round(lo, 6), round(hi, 6)]
    return out


def interval_text(metric: str, intervals: dict[str, list[float]] | None, rows: int | None) -> str:
    """" (95 % 0.81-0.97 on 52 rows)", or "" without an interval."""
    iv = (intervals or {}).get(metric)
    if not iv or len(iv) != 2:
        return ""
    on = f" on {rows} rows" if rows else ""
    return f" (95 % {iv[0]:.2f}-{iv[1]:.2f}{on})"

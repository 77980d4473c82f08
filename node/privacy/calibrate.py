"""Calibration: the noise multiplier from a total budget, once, up front."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from gossip.errors import LocalError
from node.privacy.accountant import LedgerRecord, epsilon_of

SIGMA_SEARCH = (0.05, 500.0)
# calibrate_sigma's tolerance: its sigma is within budget and less than this factor above
# a sigma that is not (the smallest that is, to 0.1 %).
SIGMA_RATIO = 1.001
_STEP = math.log(10.0)  # the longest bracketing step (x10 in sigma)
_TINY = math.ulp(0.0)  # the least "over the budget"


def plan_history(mode: str, sigma: float, sample_rate: float, steps_per_round: int, rounds: int,
                 count_sigma: float | None,
                 normalize_sigma: float | None = None) -> list[LedgerRecord]:
    """The releases a whole run will make, as ledger records (for calibration)."""
    records = []
    if normalize_sigma is not None:  # federated normalization's stats, once before round 1
        records.append(LedgerRecord(-1, "normalize", normalize_sigma, 1.0, 1, 1.0, ""))
    if count_sigma is not None:
        records.append(LedgerRecord(-1, "count", count_sigma, 1.0, 1, 1.0, ""))
    records += [LedgerRecord(r, mode, sigma, sample_rate, steps_per_round, 0.0, "")
                for r in range(rounds)]
    return records


def bisect_sigma(within: Callable[[float], bool],
                 cannot_meet: Callable[[float], Exception]) -> float:
    """Smallest sigma (to SIGMA_RATIO) that `within` accepts, by bisection on log sigma over
    SIGMA_SEARCH: a sigma `within` accepts that is less than SIGMA_RATIO times one it
    refuses, or SIGMA_SEARCH's lower end if `within` accepts that. `within` must be
    monotone (more noise never costs more epsilon); every candidate is judged by it
    alone. Raises cannot_meet(SIGMA_SEARCH's upper end) when even that is refused.

    The secure plan's and the secure sum's calibrations use this search (their sigma is
    in the plan every member must agree on, so its digits are pinned); calibrate_sigma
    below reaches the same tolerance in fewer accountant evaluations."""
    lo, hi = SIGMA_SEARCH
    if within(lo):
        return lo
    if not within(hi):
        raise cannot_meet(hi)
    while hi > lo * SIGMA_RATIO:  # lo over the budget, hi within it
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return hi


def calibrate_sigma(target_epsilon: float, delta: float, mode: str, sample_rate: float,
                    steps_per_round: int, rounds: int, count_sigma: float | None,
                    normalize_sigma: float | None = None) -> float:
    """Smallest sigma (to 0.1 %) whose whole planned run stays within target_epsilon.

    Returns a sigma that Opacus' RDP accountant (epsilon_of, every order, the whole
    planned history) puts within the budget, and that is less than SIGMA_RATIO times
    one it puts over it (or SIGMA_SEARCH's lower end, if that is within budget): the
    guarantee of the bisection this replaces, which took ~16 accountant evaluations.
    This search takes ~6 (tests/test_privacy.py holds the bisection and compares):
    a bracket from sigma = 1 by secant steps on (log sigma, log epsilon), then Brent's
    method (inverse quadratic interpolation, bisection when that stalls), whose last
    steps straddle the root. Only the proposals are heuristic: every sigma is judged
    by the accountant's own epsilon <= target. The noised-count and normalization
    releases, if any, are part of the same budget.
    """
    @functools.cache
    def over(x: float) -> tuple[float, float]:
        """(sigma = e^x, log(epsilon / target)): > 0 exactly when epsilon is over the
        budget (nan counts as over), never > 0 within it."""
        sigma = math.exp(x)
        e = epsilon_of(plan_history(mode, sigma, sample_rate, steps_per_round, rounds,
                                    count_sigma, normalize_sigma), delta)
        if not e <= target_epsilon:
            g = math.log(e / target_epsilon) if math.isfinite(e) else math.inf
            return sigma, max(g, _TINY)  # rounding never makes an over-budget sigma look fine
        ratio = e / target_epsilon
        return sigma, math.log(ratio) if ratio > 0 else -math.inf

    lo_x, hi_x = (math.log(s) for s in SIGMA_SEARCH)
    tol = math.log(SIGMA_RATIO)
    # 1. A bracket: from sigma = 1, secant steps in log-log (slope -1, epsilon ~ 1/sigma,
    #    until two points give one), 5 % and tol past the predicted root so as to cross it,
    #    at most x10 a step, clamped to SIGMA_SEARCH (whose ends decide as the bisection
    #    did: over at the top raises, within at the bottom returns it); the last two points
    #    straddle the root.
    x, prev = 0.0, None
    while True:
        x = min(max(x, lo_x), hi_x)
        g = over(x)[1]
        if g > 0 and x == hi_x:
            raise LocalError(f"privacy.epsilon = {target_epsilon:g} cannot be met for {rounds} "
                             f"rounds even with sigma = {SIGMA_SEARCH[1]:g}: raise epsilon or "
                             "plan fewer rounds")
        if g <= 0 and x == lo_x:
            return SIGMA_SEARCH[0]
        if prev is not None and (prev[1] > 0) != (g > 0):
            break
        slope = -1.0
        if prev is not None and math.isfinite(prev[1]) and math.isfinite(g):
            secant = (g - prev[1]) / (x - prev[0])
            slope = secant if secant < 0 else slope
        size = abs(g / slope) * 1.05 + tol if math.isfinite(g) else _STEP
        prev = (x, g)
        x += (1.0 if g > 0 else -1.0) * min(size, _STEP)  # up while over the budget
    # 2. Brent's method (Numerical Recipes' zbrent) on x = log sigma, until the bracket
    #    [b, c] is at most 0.9 tol wide: its feasible end is within SIGMA_RATIO of an
    #    infeasible sigma. A step is never shorter than tol1, toward the other end.
    a, fa, b, fb = prev[0], prev[1], x, g
    c, fc = b, fb
    d = e = b - a
    tol1 = 0.45 * tol
    while True:
        if (fb > 0) == (fc > 0):
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        xm = 0.5 * (c - b)
        if abs(xm) <= tol1:
            break
        if abs(e) >= tol1 and abs(fa) > abs(fb) and all(map(math.isfinite, (fa, fb, fc))):
            s = fb / fa
            if a == c:  # secant
                p, q = 2 * xm * s, 1 - s
            else:  # inverse quadratic interpolation
                q, r = fa / fc, fb / fc
                p = s * (2 * xm * q * (q - r) - (b - a) * (r - 1))
                q = (q - 1) * (r - 1) * (s - 1)
            if p > 0:
                q = -q
            p = abs(p)
            if 2 * p < min(3 * xm * q - abs(tol1 * q), abs(e * q)):
                e, d = d, p / q
            else:
                d = e = xm
        else:
            d = e = xm
        a, fa = b, fb
        b += d if abs(d) > tol1 else math.copysign(tol1, xm)
        fb = over(b)[1]
    feasible, infeasible = (b, c) if fb <= 0 else (c, b)
    sigma, lo = over(feasible)[0], over(infeasible)[0]
    assert lo < sigma <= lo * SIGMA_RATIO, (lo, sigma)
    return sigma

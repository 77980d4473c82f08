"""Capping declared weights: what one member may claim of a round's average.

A share's weight is its sender's word (a row count, maybe noised). Unchecked, a
member declaring 1e12 rows among honest members of ~1000 owns the weighted
mean. Two consortium-agreed caps, applied in this order:

1. `max_weight` (absolute): a declared weight above it counts as `max_weight`.
2. `max_weight_fraction` = c (relative), by water-filling: no member ends with
   more than c of the round's total. Algorithm, on the fractions p_i = w_i / sum w:

       capped = {}
       repeat:
           over = {i not in capped : p_i > c}
           if over is empty: stop
           capped |= over
           p_i = c                                      for i in capped
           p_i = (1 - c |capped|) w_i / sum_{j not in capped} w_j   otherwise

   Each pass caps at least one more member, so it stops after at most n passes.
   The excess of the capped members goes to the others in proportion to their
   own weights, so their relative weights are unchanged. When every p_i <= c
   nothing moves: honest FedAvg is unchanged whenever every weight is under its
   cap. With n shares and c < 1/n no assignment can hold (the round lost so many
   members that even equal weights exceed c): then every member gets 1/n, and
   that is reported as infeasible.

The result is bounded influence, not correctness: a capped member still pulls
the weighted mean by c times its distance from it, which is why the caps go with
a distance bound or a robust rule, not instead of them. And f members each at the
cap hold f x c together (f = 2, c = 0.25: half), which is why only the plain
`mean` weighs by declared weight by default; the robust rules count every share
once (`weighting = "equal"`, `base.py`) unless configured otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

# Water-filling caps one member per pass at least; this is a backstop against a
# float corner case only (n passes always suffice).
_SLACK = 1e-12


def cap_weights(weights: Sequence[float], max_fraction: float | None,
                max_weight: float | None) -> tuple[list[float], list[str | None], str | None]:
    """Fractions summing to 1 for positive finite `weights`, after both caps.

    Returns (fractions, per-share note or None, infeasibility note or None)."""
    n = len(weights)
    notes: list[str | None] = [None] * n
    w = [float(x) for x in weights]
    if max_weight is not None:
        for i, x in enumerate(w):
            if x > max_weight:
                notes[i] = (f"declared weight {x:g} above the absolute cap {max_weight:g}: "
                            f"counted as {max_weight:g}")
                w[i] = float(max_weight)
    total = sum(w)
    p = [x / total for x in w]
    if max_fraction is None or n == 0:
        return p, notes, None
    c = float(max_fraction)
    if c * n < 1 - _SLACK:
        before = list(p)
        p = [1.0 / n] * n
        for i in range(n):
            if before[i] > p[i] + _SLACK:
                notes[i] = _join(notes[i], f"fraction {before[i]:.4g} cut to equal share {p[i]:.4g}")
        return p, notes, (f"max_weight_fraction {c:g} cannot hold with {n} share(s) (needs at least "
                          f"{_ceil_inv(c)}): equal weights")
    before = list(p)
    capped: set[int] = set()
    for _ in range(n):
        over = {i for i in range(n) if i not in capped and p[i] > c + _SLACK}
        if not over:
            break
        capped |= over
        free = 1.0 - c * len(capped)
        rest = sum(w[j] for j in range(n) if j not in capped)
        for i in range(n):
            p[i] = c if i in capped else (free * w[i] / rest if rest > 0 else 0.0)
    total = sum(p)
    p = [x / total for x in p]
    for i in capped:
        notes[i] = _join(notes[i], f"fraction {before[i]:.4g} of the total capped at {c:g}")
    return p, notes, None


def _join(a: str | None, b: str) -> str:
    return b if a is None else f"{a}; {b}"


def _ceil_inv(c: float) -> int:
    n = int(1.0 / c)
    return n if n * c >= 1 - _SLACK else n + 1

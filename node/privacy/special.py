"""The two special functions Opacus' RDP analysis calls, without scipy.

`opacus/accountants/analysis/rdp.py` does `from scipy import special` for
`special.binom(alpha, i)` (alpha an int or a float order, i an int >= 0) and
`special.log_ndtr(x)` (x a finite float); importing scipy.special costs a node
~16 MB and ~0.3 s. node/privacy/accountant.py loads that file with `special` bound to this
module instead. tests/test_lean.py compares both with scipy's on dense grids.
"""

from __future__ import annotations

import math

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT2 = math.sqrt(2.0)
# Below this, erfc(-x / sqrt 2) is under 1e-87 (still a normal float: it underflows
# near x = -37.5); the asymptotic series is used from here on, where it converges to
# a double's precision in at most 10 terms (at x = -20; fewer below).
_SERIES_BELOW = -20.0


def binom(n: float, k: int) -> float:
    """The binomial coefficient C(n, k) for a real n and an integer k >= 0.

    The product formula prod_{j=0..k-1} (n - j) / (j + 1), as scipy's own binom computes
    it for integer k < 20 (numerator and denominator apart, rescaled before they
    overflow; for an integer n > 0 and k > n / 2 the same reduction to n - k), with two
    differences: each factor n - j is rounded once (scipy forms (j + n - k) + ...,
    which loses digits when n is near an integer), and the factors are taken from j = 0
    up, so that for a small n the partial products stay near the result (taken from the
    largest |n - j| down, they pass 2^k: overflow from k = 1024, which Opacus' loop
    reaches for a small sigma and q). scipy switches to the beta function from k = 20.
    Relative error: about k ulps (tests/test_lean.py checks it against exact rational
    arithmetic). For 0 < |n| <= 1e-8, which no accountant order is, scipy uses the beta
    function even for k < 20."""
    if type(k) is not int:  # the common case first: Opacus' loops call this ~10^5 times
        if isinstance(k, bool) or not isinstance(k, int | float) or not float(k).is_integer():
            raise ValueError(f"binom: k must be an integer >= 0, got {k!r}")
        k = int(k)
    if k < 0:
        raise ValueError(f"binom: k must be an integer >= 0, got {k!r}")
    if type(n) is not float:
        if isinstance(n, bool) or not isinstance(n, int | float):
            raise ValueError(f"binom: n must be a finite number, got {n!r}")
        n = float(n)
    if n - n != 0.0:  # inf or nan
        raise ValueError(f"binom: n must be a finite number, got {n!r}")
    kx = k
    if n.is_integer():
        if n < 0:
            return math.nan  # scipy: undefined at negative integers
        if n > 0 and k > n / 2:
            kx = int(n) - k  # C(n, k) = C(n, n - k); k > n gives kx < 0: zero
            if kx < 0:
                return 0.0
    steps = kx
    done, num, den = _PREFIX.get(n, (0, 1.0, 1.0))
    if done > steps:
        done, num, den = 0, 1.0, 1.0
    for j in range(done, steps):
        num *= n - j  # j is exact: one rounding, even for n near an integer
        den *= j + 1
        if abs(num) > 1e50 or den > 1e50:
            num /= den
            den = 1.0
    if len(_PREFIX) >= _PREFIX_MAX:
        _PREFIX.clear()
    _PREFIX[n] = (steps, num, den)
    return num / den


# Opacus' loop asks for binom(alpha, 0), binom(alpha, 1), ... up to k ~ 1000 and more (a
# small sigma and q): each product continues the last one for that n (n -> (factors
# taken, numerator, denominator)), so a loop costs O(k), not O(k^2). The same operations
# in the same order as from scratch, so the result does not depend on what was asked
# before. One tuple per n, replaced whole: threads at worst redo a product.
_PREFIX: dict[float, tuple[int, float, float]] = {}
_PREFIX_MAX = 1024


def log_ndtr(x: float) -> float:
    """log Phi(x), Phi the standard normal CDF, to a double's precision for every x.

    x >= -1: log1p(-erfc(x / sqrt 2) / 2) (Phi near 1: log1p keeps its small
    complement). -20 <= x < -1: log(erfc(-x / sqrt 2) / 2), erfc accurate to a few
    ulps relative. x < -20, where erfc heads for underflow: the asymptotic series
    log Phi(x) = -x^2/2 - log(-x) - log sqrt(2 pi) + log(1 + sum_k (-1)^k (2k-1)!! / x^2k),
    summed until a term is below a double's resolution (scipy uses erfcx there; the
    same function to rounding)."""
    if type(x) is not float:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise ValueError(f"log_ndtr: x must be a number, got {x!r}")
        x = float(x)
    if x != x:
        return math.nan
    if x == math.inf:
        return 0.0
    if x == -math.inf:
        return -math.inf
    if x >= -1.0:
        return math.log1p(-0.5 * math.erfc(x / _SQRT2))
    if x >= _SERIES_BELOW:
        return math.log(0.5 * math.erfc(-x / _SQRT2))
    inv = 1.0 / (x * x)
    total, term, k = 1.0, 1.0, 1
    while True:
        term *= -(2 * k - 1) * inv
        total += term
        if abs(term) < 1e-17 * total:
            break
        k += 1
    return -0.5 * x * x - math.log(-x) - _LOG_SQRT_2PI + math.log(total)

"""The Skellam mechanism's RDP with Poisson subsampling, and the parameter checks of
distributed DP: the pure arithmetic of node/privacy/distributed.py (whose docstring
derives it), in a module of its own so that the accountant (node/privacy/accountant.py),
which distributed.py itself uses, can charge a secure round's ledger record without an
import cycle. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gossip.errors import LocalError

# Integer RDP orders: the amplification formula (and its proof in distributed.py) holds at integers
# only. 256: past the best order of any budget and step count a consortium plans (Google's
# distributed_dp accounting uses 2..128 and 256).
ORDERS = tuple(range(2, 257))
# Conditional rounding's beta: a rounded row is rejected with probability <= beta
# (e^-1/2 makes sqrt(2 ln(1/beta)) = 1; Kairouz et al.'s experiments use it).
BETA = math.exp(-0.5)


class DistributedDPError(LocalError):
    """A distributed-DP parameter is out of range: the caller's (or the consortium
    rules') fault. The message names the parameter and the value."""


def finite_number(v: object) -> bool:
    """v is an int or float (not a bool) of float range: math.isfinite raises OverflowError
    on an int beyond it (a file's 10**400), which escaped every loader's checks."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _check_positive(name: str, value: float) -> float:
    if not (finite_number(value) and value > 0):
        raise DistributedDPError(f"distributed DP: {name} must be a finite number > 0, "
                                 f"got {value!r}")
    return float(value)


def _check_int(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise DistributedDPError(f"distributed DP: {name} must be an integer >= {low}, "
                                 f"got {value!r}")
    return int(value)


def check_sample_rate(q: float) -> float:
    if isinstance(q, bool) or not isinstance(q, int | float) or not (0 < q <= 1):
        raise DistributedDPError(f"distributed DP: sample rate q must be in (0, 1], got {q!r}")
    return float(q)


def check_sigma(sigma: float) -> float:
    """sigma >= 0 and finite (0: no noise, infinite epsilon); negative or nan is refused."""
    if not (finite_number(sigma) and sigma >= 0):
        raise DistributedDPError(f"distributed DP: noise multiplier sigma must be a finite "
                                 f"number >= 0, got {sigma!r}")
    return float(sigma)


def rounded_l2_bound_sq(scaled_clip: float, dim: int, beta: float = BETA) -> int:
    """floor(Delta2^2): the squared L2 norm a randomly rounded vector of norm <= scaled_clip
    in `dim` coordinates is conditioned to (Kairouz et al. 2021, Thm. 1; module docstring).
    Floored: an integer vector's squared norm is an integer."""
    c = _check_positive("scaled clip C/gamma", scaled_clip)
    d = _check_int("dimension", dim, 1)
    if not 0 < beta < 1:
        raise DistributedDPError(f"distributed DP: beta must be in (0, 1), got {beta!r}")
    always = (c + math.sqrt(d)) ** 2
    likely = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return math.floor(min(always, likely))


_LOG_FACT = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, max(ORDERS) + 1)))])


def skellam_rdp(l2_sq: float, l1: float, variance: float,
                orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP at integer `orders` of adding Skellam noise of variance `variance` per
    coordinate to an integer query of squared L2 sensitivity l2_sq and L1 sensitivity l1
    (no subsampling; Agarwal et al. 2021; module docstring)."""
    a = np.asarray(orders, dtype=np.float64)
    if variance <= 0:
        return np.full(a.shape, np.inf)
    extra = np.minimum(((2 * a - 1) * l2_sq + 6 * l1) / (4 * variance ** 2), 3 * l1 / (2 * variance))
    return a * l2_sq / (2 * variance) + extra


def honest_variance(sigma: float, clip_norm: float, granularity: float, members: int,
                    coalition: int, honest: int) -> float:
    """The noise variance per coordinate (integer units) of `honest` members' shares of a
    secure sum, each of variance 2 mu = (sigma C/gamma)^2 / (n - t); none (honest <= 0):
    0, no noise (node/privacy/distributed.py's module docstring)."""
    two_mu = (sigma * clip_norm / granularity) ** 2 / (members - coalition)
    return honest * two_mu if honest > 0 else 0.0


def sum_rdp(l2_bound_sq: int, dim: int, variance: float, sample_rate: float,
            steps: int) -> np.ndarray:
    """RDP at ORDERS of `steps` secure sums at Poisson rate q, each holding a record's
    rounded vector (squared L2 norm <= l2_bound_sq in `dim` coordinates, so L1 <=
    min(Delta2^2, sqrt(d) Delta2)) under Skellam noise of `variance` per coordinate: the
    one computation behind a ledger's secure charge (node/privacy/secure_record.py) and
    distributed.py's release accountant."""
    if steps == 0:
        return np.zeros(len(ORDERS))
    l1 = min(float(l2_bound_sq), math.sqrt(dim) * math.sqrt(l2_bound_sq))
    base = skellam_rdp(float(l2_bound_sq), l1, variance)
    return poisson_subsampled_rdp(base, sample_rate) * steps


def poisson_subsampled_rdp(base: np.ndarray, q: float, orders: Sequence[int] = ORDERS
                           ) -> np.ndarray:
    """RDP at each integer order a of a symmetric additive-noise mechanism with RDP `base`
    (base[i] at orders[i], which must be 2, 3, ..., A) under Poisson sampling at rate q,
    both neighbour directions (module docstring), capped by base itself."""
    q = check_sample_rate(q)
    orders = list(orders)
    if orders != list(range(2, len(orders) + 2)):
        raise DistributedDPError("distributed DP: the subsampling bound needs the orders "
                                 "2, 3, ..., A (every integer)")
    base = np.asarray(base, dtype=np.float64)
    if q == 1.0:
        return base.copy()
    top = orders[-1]
    a = np.arange(2, top + 1, dtype=np.float64)[:, None]  # order (rows)
    k = np.arange(2, top + 1, dtype=np.float64)[None, :]  # binomial index (columns)
    ai, ki = a.astype(int), k.astype(int)
    log_comb = _LOG_FACT[ai] - _LOG_FACT[ki] - _LOG_FACT[np.maximum(ai - ki, 0)]
    with np.errstate(invalid="ignore", over="ignore"):
        terms = log_comb + (a - k) * math.log1p(-q) + k * math.log(q) + (k - 1) * base[None, :]
        terms = np.where(k <= a, terms, -np.inf)
        first = (a[:, 0] - 1) * math.log1p(-q) + np.log1p((a[:, 0] - 1) * q)  # k = 0, 1
        every = np.concatenate([first[:, None], terms], axis=1)
        peak = every.max(axis=1)
        finite = np.isfinite(peak)
        safe = np.where(finite, peak, 0.0)
        lse = safe + np.log(np.exp(every - safe[:, None]).sum(axis=1))
        out = np.where(finite, lse, peak) / (a[:, 0] - 1)
    return np.minimum(out, base)

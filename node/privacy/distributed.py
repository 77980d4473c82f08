"""Distributed DP-SGD: the noise a member adds to its part of the consortium's secure sum,
and the exact accounting of what that sum reveals. Pure functions (numpy, no torch): the
secure-aggregation protocol calls them; node/learn/dstep.py computes the per-example
gradients they take.

One consortium DP-SGD step (a secure round):

1. Each member Poisson-samples its rows at the consortium's rate q (every row
   independently; the union of the members' rows is then Poisson-sampled at q).
2. Per example: the gradient g_i clipped to L2 norm C, scaled by 1/gamma
   (`granularity`: gamma = C / 2^k, so the scaled clip c = C/gamma = 2^k) and randomly
   rounded to integers, coordinate j to floor(x_j) + Bernoulli(frac(x_j)), **resampled
   until its squared L2 norm is at most `l2_bound_sq`** (conditional randomized rounding,
   Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism", Thm. 1 /
   Prop. 22): Delta2^2 = min(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2), (c + sqrt d)^2).
   A row is accepted with probability >= 1 - beta (beta = e^-1/2: <= 2.6 tries on
   average); the bound is *enforced* by the test, so the sensitivity below holds
   whatever the clipping's float rounding did. Rounding each example (not the member's
   sum) makes removing one record remove exactly one independent integer vector.
3. The member sums its rounded examples and adds Skellam noise, Poisson(mu) - Poisson(mu)
   per coordinate (variance 2 mu), mu = (sigma c)^2 / (2 (n - t)).

Why Skellam, not the distributed discrete Gaussian: a sum of independent Skellam
variables is Skellam again (Sk(mu1) + Sk(mu2) = Sk(mu1 + mu2)), so the noise on the sum
of m members is *exactly* Sk(m mu) and its RDP is the closed form of Agarwal, Kairouz,
Liu 2021 ("The Skellam Mechanism for Differentially Private Federated Learning"), for
any m: dropouts and coalitions change one number. A sum of discrete Gaussians is not a
discrete Gaussian; its bound carries the tau term of Kairouz et al., which is tiny at
these noise levels but must be carried per number of contributors. And sampling is two
vectorized numpy Poisson draws per coordinate (~1 ms for 10^4 coordinates), where the
exact discrete-Gaussian sampler (Canonne, Kamath, Steinke 2020) runs rational
arithmetic per coordinate in Python (seconds per step for a 10^4-parameter model).
numpy's Poisson sampler (PTRS, Hoermann 1993) is exact up to float64 arithmetic.

Randomness: a numpy Generator on Philox (a counter-based generator built on a block
cipher) keyed with 128 bits from os.urandom, fresh per call (`os_generator`); the only
seed a caller can give is `test_only_seed`, for tests.

The assumption (what is charged): the adversary is any coalition of at most t members
(t >= 1: every member knows its own noise). It sees the sum and subtracts its own
members' noise exactly; what protects a record of an honest member is the noise of the
honest members that contributed to that sum. With m contributors, at least m - t of
them are honest, so a step is charged as the Skellam mechanism with variance
(m - t) * 2 mu on the sum: sigma^2 c^2 when all n contribute. m <= t: nothing is left
to protect the sum, epsilon is infinite. Record-level neighbours (one record added or
removed at one member): L2 sensitivity Delta2 (enforced above), L1 sensitivity
min(Delta2^2, sqrt(d) Delta2) (an integer vector has |v|_1 <= |v|_2^2). The rounding's
own noise is not counted (conservative).

Per step, the base mechanism's RDP at integer order a (Agarwal et al. 2021, their
multi-dimensional bound, in integer units, V the honest noise variance per coordinate):
    eps(a) = a D2^2 / (2 V) + min(((2a - 1) D2^2 + 6 D1) / (4 V^2), 3 D1 / (2 V)),
then Poisson sampling at rate q, at integer orders a >= 2:
    rdp(a) = (1/(a-1)) log[(1-q)^(a-1) (a q - q + 1) + sum_{k=2..a} C(a,k) (1-q)^(a-k) q^k e^((k-1) eps(k))]
capped by eps(a) (subsampling never hurts), summed over steps and converted to
(epsilon, delta) by Opacus' get_privacy_spent, as node/privacy/accountant.py does.
Never by treating the noise as a continuous Gaussian: tests/test_distributed_dp.py
checks the closed form and the amplification against the exact Renyi divergences of the
discrete distributions, and that epsilon stays at or above Opacus' subsampled-Gaussian one.

Why that amplification formula holds here (Zhu & Wang 2019, "Poisson Subsampled Renyi
Differential Privacy", give it as exact for the Gaussian and Laplace mechanisms and, for
a general mechanism, only with a factor 3 on every k >= 3 term, which puts a floor under
the RDP that no noise removes: 2 q^3 / (a - 1) per step; at q = 1/8, sigma = 15 and 240
steps that bound says epsilon 3.1 where the formula above says 0.5).
Fix everything but the record in question (the other examples' rounding and sampling,
the coalition's noise: condition on it; it is a common shift of both outputs, and a
shift changes no divergence), and the record's rounded vector v (a mixture over v: by
joint convexity of exp((a-1) D_a), i.e. quasi-convexity of D_a, the worst v counts).
With P = Z + v, Q = Z (Z the honest Skellam noise), L = P/Q:
- removing the record: D_a((1-q)Q + qP || Q) = (1/(a-1)) log E_Q[(1 - q + q L)^a], and the
  binomial expansion of that is the sum above with E_Q[L^k] = e^((k-1) D_k(P||Q)), exactly;
- adding it: D_a(Q || (1-q)Q + qP) is never larger, for any pair (P, Q) swapped by a
  measure-preserving involution; in particular shifts of any symmetric noise (Skellam is
  one). Pair each x with v - x (an involution that swaps P and Q and maps L to 1/L):
  both expectations become E_Q[F(L) + L F(1/L)] / 2. Decompose both sums over the orbits
  {x, v - x}: each orbit is a weighted two-point instance (the fixed point, if any,
  contributes equally to both), so it suffices to compare them for a two-point pair
  (p, 1-p) vs (1-p, p), p <= 1/2. There, with m = (1-q)p + q(1-p),
  r = m/p >= 1, s = (1-m)/(1-p) <= 1 (and r s = 1 + q(1-q)(1-2p)^2/(p(1-p)) >= 1), the
  difference remove - add is p(r-1) [psi(r) - psi(s)], psi(z) = (z^a - z^(1-a))/(z - 1)
  = sum_{j=-(a-1)..a-1} z^j (a the integer order), which satisfies psi(z) = psi(1/z) and
  is non-decreasing on [1, inf); r >= 1/s >= 1 gives psi(r) >= psi(1/s) = psi(s).
This lemma is ours (it generalises what Mironov, Talwar and Zhang 2019 show for the
Gaussian). A second engineer re-derived each step and attacked it numerically: 2,700
random symmetric distributions on cyclic groups (multimodal, spiky, power-law), 900 on the
integer line, a Nelder-Mead search for add > remove, and this module's own parameters
(d = 4810, c = 512): add never exceeded remove, and the charge always covered both.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from node.privacy.accountant import _opacus_rdp
from node.privacy.calibrate import bisect_sigma
from node.privacy.skellam import (  # the arithmetic, re-exported: callers import it from here
    BETA,
    ORDERS,
    DistributedDPError,
    _check_int,
    _check_positive,
    check_sample_rate,
    check_sigma,
    honest_variance,
    poisson_subsampled_rdp,  # noqa: F401 (re-exported)
    rounded_l2_bound_sq,
    skellam_rdp,  # noqa: F401 (re-exported)
    sum_rdp,
)

# At most this many roundings of one example: P(all rejected) <= beta^64 ~ 1e-14.
MAX_ROUNDING_TRIES = 64
# The granularity gamma = C / 2^k: k at least MIN_SCALE_BITS, at most MAX_SCALE_BITS (a
# coordinate of the sum is then at most rows x 2^24 plus noise: 2^36 rows in 61 bits).
MIN_SCALE_BITS, MAX_SCALE_BITS = 4, 24
# The default granularity costs at most this much L2 sensitivity over C/gamma (0.5 %:
# the noise must be that much larger than with exact arithmetic).
INFLATION_MAX = 0.005
# numpy's Poisson sampler refuses lam above ~9.2e18; far beyond any useful noise.
POISSON_MU_MAX = 1e18
# `coordinate_bound`'s default failure probability for a whole vector.
OVERFLOW_FAILURE = 2.0 ** -40


def choose_granularity(clip_norm: float, dim: int, inflation: float = INFLATION_MAX,
                       beta: float = BETA) -> float:
    """gamma = clip_norm / 2^k for the smallest k in [MIN_SCALE_BITS, MAX_SCALE_BITS] whose
    rounding inflates the L2 sensitivity by at most `inflation` (Delta2 <= (1 + inflation) c).
    A power of two: C/gamma = 2^k exactly. Finer costs no privacy, only field bits."""
    clip_norm = _check_positive("clip norm", clip_norm)
    for k in range(MIN_SCALE_BITS, MAX_SCALE_BITS + 1):
        c = 2.0 ** k
        if math.sqrt(rounded_l2_bound_sq(c, dim, beta)) <= (1 + inflation) * c:
            return clip_norm / c
    raise DistributedDPError(f"distributed DP: no granularity down to clip/2^{MAX_SCALE_BITS} "
                             f"keeps the rounding inflation of {dim} coordinates under "
                             f"{inflation:g}")


@dataclass(frozen=True)
class SumMechanism:
    """What the consortium pins for distributed DP-SGD: the clip C, the granularity gamma,
    the model's dimension d, the members n and the coalition t tolerated (n > t >= 1)."""

    clip_norm: float
    granularity: float
    dim: int
    members: int
    coalition: int
    beta: float = BETA

    def __post_init__(self) -> None:
        _check_positive("clip norm", self.clip_norm)
        _check_positive("granularity gamma", self.granularity)
        _check_int("dimension", self.dim, 1)
        _check_int("coalition t", self.coalition, 1)  # a member always knows its own noise
        _check_int("members n", self.members, 2)
        if self.members <= self.coalition:
            raise DistributedDPError(
                f"distributed DP: members n = {self.members} must exceed the coalition "
                f"t = {self.coalition}: the members outside it carry all the noise")
        rounded_l2_bound_sq(self.scaled_clip, self.dim, self.beta)  # checks beta

    @property
    def scaled_clip(self) -> float:
        """c = C / gamma: the clip in integer units."""
        return self.clip_norm / self.granularity

    @property
    def l2_bound_sq(self) -> int:
        return rounded_l2_bound_sq(self.scaled_clip, self.dim, self.beta)

    @property
    def l2_sensitivity(self) -> float:
        """Delta2 in integer units (one record's rounded vector, enforced by the rounding)."""
        return math.sqrt(self.l2_bound_sq)

    @property
    def l1_sensitivity(self) -> float:
        """Delta1 <= min(Delta2^2, sqrt(d) Delta2) for an integer vector of norm <= Delta2."""
        return min(float(self.l2_bound_sq), math.sqrt(self.dim) * self.l2_sensitivity)

    @property
    def inflation(self) -> float:
        """Delta2 / c - 1: what rounding costs in sensitivity."""
        return self.l2_sensitivity / self.scaled_clip - 1

    def member_mu(self, sigma: float) -> float:
        """Each member's Skellam parameter: Poisson(mu) - Poisson(mu), variance 2 mu =
        (sigma c)^2 / (n - t), so n - t members' noise has std sigma c (sigma C on the
        decoded sum)."""
        sigma = check_sigma(sigma)
        return (sigma * self.scaled_clip) ** 2 / (2 * (self.members - self.coalition))

    def member_std(self, sigma: float) -> float:
        """The noise std a member adds, in gradient units: sigma C / sqrt(n - t)."""
        return check_sigma(sigma) * self.clip_norm / math.sqrt(self.members - self.coalition)


# -- the member's contribution --------------------------------------------------------------


def os_generator(test_only_seed: int | None = None) -> np.random.Generator:
    """A fresh generator keyed with 128 bits of os.urandom. `test_only_seed` is for tests:
    noise that protects real data must never come from a seed in a config."""
    if test_only_seed is not None:
        return np.random.Generator(np.random.Philox(key=int(test_only_seed)))
    return np.random.Generator(np.random.Philox(key=int.from_bytes(os.urandom(16), "little")))


def skellam(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of Poisson(mu) - Poisson(mu) (mean 0, variance 2 mu), int64."""
    if not (isinstance(mu, int | float) and math.isfinite(mu) and 0 <= mu <= POISSON_MU_MAX):
        raise DistributedDPError(f"distributed DP: Skellam parameter mu must be in "
                                 f"[0, {POISSON_MU_MAX:g}], got {mu!r}")
    _check_int("noise size", size, 0)
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


# Integers up to this are exact in float64: rounding works on integer-valued float64
# arrays (no int64 copies of examples x coordinates) while every sum stays below it.
_EXACT_FLOAT = 2.0 ** 53


def _round_rows(x: np.ndarray, bound_sq: int, rng: np.random.Generator) -> np.ndarray:
    """conditional_round's rows as integer-valued float64 (exact: callers check the sizes)."""
    low = np.floor(x)
    frac = x - low
    out = None
    rows = np.arange(x.shape[0])
    pending = rows
    for _ in range(MAX_ROUNDING_TRIES):
        whole = len(pending) == len(rows)  # the first pass: no copies of the inputs
        lo, fr = (low, frac) if whole else (low[pending], frac[pending])
        cand = lo + (rng.random(fr.shape) < fr)
        ok = np.einsum("ij,ij->i", cand, cand) <= bound_sq
        if whole and ok.all():
            return cand
        if out is None:
            out = low.copy()
        out[pending[ok]] = cand[ok]
        pending = pending[~ok]
        if not len(pending):
            return out
    raise DistributedDPError(f"conditional rounding: {len(pending)} example(s) still over the "
                             f"norm bound after {MAX_ROUNDING_TRIES} tries (were they clipped "
                             "to C before scaling?)")


def _check_scaled(scaled: np.ndarray, bound_sq: int) -> np.ndarray:
    x = np.asarray(scaled, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise DistributedDPError(f"conditional rounding: need a finite 2-d array, got shape "
                                 f"{x.shape}")
    # Accepted rows have squared norms <= bound_sq < 2^52: every partial sum is exact, and
    # a rejected row's float sum (relative error ~d 2^-53) cannot fall back under the bound.
    if bound_sq >= _EXACT_FLOAT / 2:
        raise DistributedDPError(f"conditional rounding: a squared norm bound of {bound_sq:.3g} "
                                 "is past exact float arithmetic (is the granularity absurdly "
                                 "fine?)")
    return x


def conditional_round(scaled: np.ndarray, bound_sq: int, rng: np.random.Generator) -> np.ndarray:
    """Each row of `scaled` (examples x coordinates, already divided by gamma) randomly
    rounded to integers (unbiased: floor + Bernoulli(frac)), a row resampled until its
    squared L2 norm is <= bound_sq. int64, same shape."""
    return _round_rows(_check_scaled(scaled, bound_sq), bound_sq, rng).astype(np.int64)


def member_contribution(per_example: np.ndarray, mech: SumMechanism, sigma: float,
                        rng: np.random.Generator) -> np.ndarray:
    """A member's integer contribution to one consortium step: its sampled examples'
    gradients (rows of `per_example`, any norm) each clipped to C, scaled by 1/gamma,
    conditionally rounded, summed, plus its Skellam share. int64 of length d. An empty
    batch (0 rows) still adds its noise."""
    g = np.asarray(per_example, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != mech.dim:
        raise DistributedDPError(f"member contribution: per-example gradients of shape "
                                 f"{g.shape}, the consortium's model has {mech.dim} parameters")
    if not np.all(np.isfinite(g)):
        raise DistributedDPError("member contribution: a per-example gradient is not finite")
    norms = np.sqrt(np.einsum("ij,ij->i", g, g))
    factor = np.minimum(1.0, mech.clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    scaled = _check_scaled(g * (factor / mech.granularity)[:, None], mech.l2_bound_sq)
    if len(g) * mech.l2_sensitivity >= _EXACT_FLOAT:  # each coordinate of a row <= its norm
        raise DistributedDPError(f"member contribution: {len(g)} examples of norm "
                                 f"{mech.l2_sensitivity:.3g} overflow an exact sum")
    total = _round_rows(scaled, mech.l2_bound_sq, rng).sum(axis=0).astype(np.int64)
    return total + skellam(mech.member_mu(sigma), mech.dim, rng)


def decode_sum(total: np.ndarray, mech: SumMechanism) -> np.ndarray:
    """The secure sum back in gradient units (sum of clipped gradients + noise std sigma C);
    the agreed optimizer divides it by the expected batch q * rows of the consortium."""
    return np.asarray(total, dtype=np.float64) * mech.granularity


def coordinate_bound(mech: SumMechanism, sigma: float, total_rows: int,
                     failure: float = OVERFLOW_FAILURE) -> int:
    """|every coordinate of the secure sum| <= this, except with probability `failure`:
    the signal at most total_rows * Delta2 (a rounded example's coordinate is at most its
    L2 norm), the noise of all n members (variance 2 n mu) by Bernstein's inequality for a
    sum of centered variables bounded by 1 (a Poisson is a limit of Bernoulli sums):
    P(|X| >= x) <= 2 exp(-x^2 / (2 (V + x/3))), union over d coordinates. The field (or
    the signed encoding) must hold twice this plus one."""
    _check_int("total rows", total_rows, 0)
    if not 0 < failure < 1:
        raise DistributedDPError(f"distributed DP: failure probability must be in (0, 1), "
                                 f"got {failure!r}")
    var = 2 * mech.members * mech.member_mu(sigma)
    log_term = math.log(2 * mech.dim / failure)
    noise = log_term / 3 + math.sqrt(log_term ** 2 / 9 + 2 * log_term * var)
    return math.ceil(total_rows * mech.l2_sensitivity + noise)


# -- the accountant -------------------------------------------------------------------------


@dataclass(frozen=True)
class SumRelease:
    """`steps` consortium steps at sample rate q, each sum made of `contributors` members'
    contributions (n when nobody dropped out)."""

    sample_rate: float
    steps: int
    contributors: int


def release_rdp(mech: SumMechanism, sigma: float, release: SumRelease) -> np.ndarray:
    """RDP (at ORDERS) that `release` costs a record of an honest member against any
    coalition of t: the noise of the m - t honest contributors, subsampled, times steps."""
    q = check_sample_rate(release.sample_rate)
    steps = _check_int("steps", release.steps, 0)
    m = _check_int("contributors", release.contributors, 0)
    if m > mech.members:
        raise DistributedDPError(f"distributed DP: {m} contributors, but the consortium has "
                                 f"{mech.members} members")
    if steps == 0:
        return np.zeros(len(ORDERS))
    variance = honest_variance(check_sigma(sigma), mech.clip_norm, mech.granularity,
                               mech.members, mech.coalition, m - mech.coalition)
    return sum_rdp(mech.l2_bound_sq, mech.dim, variance, q, steps)


def epsilon_of_sum(mech: SumMechanism, sigma: float, releases: Sequence[SumRelease],
                   delta: float) -> float:
    """Total epsilon at delta of these secure-sum releases (module docstring): the RDP of
    each summed over the history, converted at the best integer order by Opacus'
    get_privacy_spent (the arithmetic of node/privacy/accountant.py)."""
    if not 0 < delta < 1:
        raise DistributedDPError(f"distributed DP: delta must be in (0, 1), got {delta!r}")
    rdp = np.zeros(len(ORDERS))
    for release in releases:
        rdp = rdp + release_rdp(mech, sigma, release)
    if not np.any(rdp):
        return 0.0
    if not np.any(np.isfinite(rdp)):
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is at an edge
        eps, _ = _opacus_rdp().get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def calibrate_sum_sigma(mech: SumMechanism, target_epsilon: float, delta: float,
                        sample_rate: float, steps: int, contributors: int | None = None) -> float:
    """Smallest sigma (to SIGMA_RATIO) whose `steps` secure sums at rate q, each of
    `contributors` members (n: the plan; fewer plans for dropouts), stay within
    target_epsilon: bisection on log sigma over SIGMA_SEARCH, every candidate judged by
    epsilon_of_sum. Returns a sigma within budget that is less than SIGMA_RATIO times one
    over it (or SIGMA_SEARCH's lower end if that is within budget)."""
    target_epsilon = _check_positive("target epsilon", target_epsilon)
    check_sample_rate(sample_rate)
    _check_int("steps", steps, 1)
    m = mech.members if contributors is None else contributors
    release = [SumRelease(sample_rate, steps, m)]

    def within(sigma: float) -> bool:
        return epsilon_of_sum(mech, sigma, release, delta) <= target_epsilon

    def cannot_meet(hi: float) -> DistributedDPError:
        return DistributedDPError(
            f"distributed DP: epsilon = {target_epsilon:g} cannot be met over {steps} steps "
            f"at q = {sample_rate:g} with {m} contributors and a coalition of "
            f"{mech.coalition} even with sigma = {hi:g}")

    return bisect_sigma(within, cannot_meet)

"""Distributed DP-SGD (node/privacy/distributed.py, node/learn/dstep.py): the Skellam sampler,
conditional rounding, the accountant of the secure sum against exact Renyi divergences and
Opacus, monotonicity, calibration, hostile parameters. Fast unit tests."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import logsumexp

from node.privacy.accountant import LedgerRecord, _opacus_rdp, epsilon_of
from node.privacy.calibrate import SIGMA_RATIO
from node.privacy.distributed import (
    BETA,
    INFLATION_MAX,
    ORDERS,
    DistributedDPError,
    SumMechanism,
    SumRelease,
    calibrate_sum_sigma,
    choose_granularity,
    conditional_round,
    coordinate_bound,
    decode_sum,
    epsilon_of_sum,
    member_contribution,
    os_generator,
    poisson_subsampled_rdp,
    rounded_l2_bound_sq,
    skellam,
    skellam_rdp,
)

DELTA = 1e-5
DIGITS_DIM = 64 * 64 + 64 + 64 * 10 + 10  # the digits MLP (training.hidden = 64): 4,810
FINE = 2.0 ** -20  # granularity of the fine limit: rounding inflates Delta2 by < 1e-6
# In the large-noise, fine-granularity limit, epsilon of the secure sum is within this of
# Opacus' subsampled Gaussian with the same sigma, at the same (integer) orders; measured
# 4e-6 over sigma 0.7-16, q 0.001-1, 1-1000 steps. Never below it (the discretization can
# only cost: Delta2 >= C/gamma and the Skellam RDP is the Gaussian's plus a positive term).
FINE_TOLERANCE = 1e-5
# With the default granularity the discretization term is the rounding's inflation of the
# sensitivity (Delta2 <= (1 + INFLATION_MAX) C/gamma): epsilon is that of the Gaussian with
# sigma / (1 + inflation), to this much (the Skellam term; measured 2.5e-5). On the grid
# below that is up to 3.4 % more epsilon than sigma itself gives (digits MLP, inflation 0.33 %).
DEFAULT_TOLERANCE = 1e-4
# Against Opacus' own accountant (fractional orders 1.1-10.9 and 12-63, where ours has the
# integers 2-256), for epsilon 0.5-20: measured -0.04 % to +8.7 % (the order grid).
ORDER_GRID_TOLERANCE = 0.10


def mech(members: int = 8, coalition: int = 1, granularity: float = FINE, dim: int = 1000,
         clip: float = 1.0) -> SumMechanism:
    return SumMechanism(clip, granularity, dim, members, coalition)


def opacus_same_orders(sigma: float, q: float, steps: int) -> float:
    analysis = _opacus_rdp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdp = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS))
        return float(analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=DELTA)[0])


# -- the sampler ------------------------------------------------------------------------------


def moments_match(x: np.ndarray, variance: float) -> bool:
    """Sample mean within 6 standard errors of 0 and sample variance within 6 standard
    errors of `variance` (Skellam's excess kurtosis 1/variance is counted)."""
    n = len(x)
    mean_ok = abs(x.mean()) <= 6 * math.sqrt(variance / n)
    var_se = variance * math.sqrt((2 + 1 / variance) / n)
    return mean_ok and abs(x.var() - variance) <= 6 * var_se


@pytest.mark.parametrize("mu", [0.5, 50.0, 2.5e6])
def test_skellam_sampler_mean_and_variance_from_the_os(mu):
    x = skellam(mu, 400_000, os_generator())
    assert x.dtype == np.int64
    assert moments_match(x.astype(np.float64), 2 * mu)


def test_the_moment_check_rejects_a_wrong_sampler():
    """The check above can fail: 3 % too much variance, or a biased sampler, is caught."""
    rng = os_generator()
    too_wide = rng.poisson(51.5, 400_000) - rng.poisson(51.5, 400_000)
    assert not moments_match(too_wide.astype(np.float64), 100.0)
    biased = rng.poisson(50.2, 400_000) - rng.poisson(50.0, 400_000)
    assert not moments_match(biased.astype(np.float64), 100.0)


def test_skellam_pmf_by_chi_square():
    mu, n = 3.0, 200_000
    x = skellam(mu, n, os_generator())
    support = np.arange(-8, 9)
    observed = np.array([np.sum(x == k) for k in support] + [np.sum(np.abs(x) > 8)])
    pmf = stats.skellam.pmf(support, mu, mu)
    expected = n * np.append(pmf, 1 - pmf.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-6


def test_os_generator_is_fresh_and_the_test_seed_is_reproducible():
    assert not np.array_equal(skellam(1e4, 50, os_generator()), skellam(1e4, 50, os_generator()))
    a = skellam(1e4, 50, os_generator(test_only_seed=7))
    assert np.array_equal(a, skellam(1e4, 50, os_generator(test_only_seed=7)))


# -- rounding ---------------------------------------------------------------------------------


def test_rounded_bound_is_kairouz_et_al():
    c, d = 1024.0, 9610
    likely = c * c + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (c + math.sqrt(d) / 2)
    assert rounded_l2_bound_sq(c, d) == math.floor(min(likely, (c + math.sqrt(d)) ** 2))
    assert rounded_l2_bound_sq(1.0, 4, beta=1e-300) == (1 + 2) ** 2  # the "always" bound


def test_default_granularity_keeps_inflation_under_the_limit():
    gamma = choose_granularity(1.0, DIGITS_DIM)
    m = SumMechanism(1.0, gamma, DIGITS_DIM, 8, 1)
    assert m.scaled_clip == 2 ** round(math.log2(m.scaled_clip))
    assert 0 < m.inflation <= INFLATION_MAX
    coarser = SumMechanism(1.0, 2 * gamma, DIGITS_DIM, 8, 1)
    assert coarser.inflation > INFLATION_MAX  # the smallest power of two that meets it


def test_conditional_rounding_is_unbiased_and_bounded():
    rng = os_generator()
    d, c = 400, 64.0
    x = rng.normal(size=(1, d))
    x *= c / np.linalg.norm(x)
    bound = rounded_l2_bound_sq(c, d)
    rows = conditional_round(np.repeat(x, 4000, axis=0), bound, rng)
    assert rows.dtype == np.int64
    assert np.all(np.einsum("ij,ij->i", rows, rows) <= bound)
    assert np.all((rows == np.floor(x)) | (rows == np.floor(x) + 1))
    # Unbiased up to the conditioning: the mean is within 6 standard errors (<= 0.5/sqrt(n))
    # of x on all but a handful of coordinates, and within 0.05 on every one.
    err = np.abs(rows.mean(axis=0) - x[0])
    assert np.all(err < 0.05) and np.mean(err > 6 * 0.5 / math.sqrt(4000)) < 0.01


def test_unclipped_rows_are_a_named_error():
    with pytest.raises(DistributedDPError, match="norm bound"):
        conditional_round(np.full((2, 10), 100.0), rounded_l2_bound_sq(4.0, 10), os_generator())
    with pytest.raises(DistributedDPError, match="finite"):
        conditional_round(np.array([[np.nan, 1.0]]), 10, os_generator())
    with pytest.raises(DistributedDPError, match="exact"):  # squared norms past 2^53
        conditional_round(np.full((1, 2), 2.0 ** 30), 2 ** 61, os_generator())


def test_member_contribution_clips_rounds_and_adds_noise():
    m = SumMechanism(1.0, choose_granularity(1.0, 50), 50, 5, 1)
    rng = os_generator()
    g = rng.normal(size=(30, 50)) * 3  # norms ~21: clipped to 1
    noiseless = member_contribution(g, m, 0.0, rng)
    clipped = g / np.linalg.norm(g, axis=1, keepdims=True)
    # Each example's coordinate is off by less than one grid step.
    assert np.all(np.abs(decode_sum(noiseless, m) - clipped.sum(0)) < 30 * m.granularity)
    sigma = 2.0
    draws = np.stack([member_contribution(g, m, sigma, rng) for _ in range(400)])
    # per-coordinate centered (the rounding's mean differs per coordinate): ddof 1 each
    var = float(((draws - draws.mean(0)) ** 2).sum() / ((len(draws) - 1) * m.dim))
    tol = 6 * math.sqrt(2 / draws.size)  # 6 standard errors of a variance estimate
    # the member's share: variance (sigma c)^2 / (n - t), plus the rounding's own (<= 30/4)
    share = (sigma * m.scaled_clip) ** 2 / (m.members - m.coalition)
    assert share * (1 - tol) <= var <= (share + 30 / 4) * (1 + tol)
    empty = member_contribution(np.zeros((0, 50)), m, sigma, rng)
    assert empty.shape == (50,) and np.any(empty != 0)
    with pytest.raises(DistributedDPError, match="parameters"):
        member_contribution(np.zeros((3, 49)), m, sigma, rng)


def test_coordinate_bound_holds_for_the_whole_consortium():
    m = SumMechanism(1.0, choose_granularity(1.0, 2000), 2000, 8, 2)
    sigma, rows = 1.5, 1797
    bound = coordinate_bound(m, sigma, rows)
    rng = os_generator()
    noise = sum(skellam(m.member_mu(sigma), m.dim, rng) for _ in range(m.members))
    assert np.max(np.abs(noise)) + rows * m.l2_sensitivity <= bound
    assert bound < 2 ** 40  # fits a 61-bit field with room


# -- the accountant against exact divergences -------------------------------------------------


def renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: int) -> float:
    return float(logsumexp(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1))


def skellam_logpmf(mu: float, shift: int, support: np.ndarray) -> np.ndarray:
    return stats.skellam.logpmf(support - shift, mu, mu)


def skellam_support(variance: float) -> np.ndarray:
    """Where both pmfs are representable (beyond it the mass is below 1e-300)."""
    support = np.arange(-400, 401)
    both = np.isfinite(skellam_logpmf(variance / 2, 0, support)) & np.isfinite(
        skellam_logpmf(variance / 2, 3, support))
    return support[both]


@pytest.mark.parametrize("variance,shift", [(2.0, 1), (8.0, 1), (8.0, 3), (40.0, 2)])
def test_skellam_rdp_bounds_the_exact_divergence(variance, shift):
    support = skellam_support(variance)
    q0, p1 = skellam_logpmf(variance / 2, 0, support), skellam_logpmf(variance / 2, shift, support)
    orders = list(range(2, 21))
    bound = skellam_rdp(shift ** 2, shift, variance, orders)
    exact = [renyi(p1, q0, a) for a in orders]
    assert all(e <= b * (1 + 1e-9) for e, b in zip(exact, bound, strict=True))


def test_skellam_rdp_is_agarwal_et_al_in_their_units():
    """Agarwal, Kairouz, Liu 2021 state the bound with sensitivities in the data's units,
    the central variance mu in those units and the scale s = 1/gamma:
    a/(2 mu) D2^2 + min(((2a - 1) s D2^2 + 6 D1) / (4 s^3 mu^2), 3 D1 / (2 s mu)).
    Ours takes integer units (D2 s, D1 s, mu s^2): the same numbers."""
    s, d2, d1, mu = 512.0, 1.003, 40.1, 2.5  # scale, L2 and L1 sensitivity, central variance
    orders = [2, 3, 10, 64, 256]
    theirs = [a / (2 * mu) * d2 ** 2 + min(((2 * a - 1) * s * d2 ** 2 + 6 * d1) / (4 * s ** 3 * mu ** 2),
                                           3 * d1 / (2 * s * mu)) for a in orders]
    ours = skellam_rdp((d2 * s) ** 2, d1 * s, mu * s * s, orders)
    assert np.allclose(ours, theirs, rtol=1e-12)
    # and the extra term is positive: never below the Gaussian with the same variance
    assert np.all(ours > np.array(orders) * d2 ** 2 / (2 * mu))


@pytest.mark.parametrize("q", [0.05, 0.3, 0.8])
@pytest.mark.parametrize("variance,shift", [(2.0, 1), (10.0, 2)])
def test_subsampled_bound_covers_both_directions_exactly(q, variance, shift):
    support = skellam_support(variance)
    lq = skellam_logpmf(variance / 2, 0, support)
    lp = skellam_logpmf(variance / 2, shift, support)
    mix = np.logaddexp(math.log1p(-q) + lq, math.log(q) + lp)
    orders = list(range(2, 16))
    exact_base = np.array([renyi(lp, lq, a) for a in orders])
    remove = np.array([renyi(mix, lq, a) for a in orders])
    add = np.array([renyi(lq, mix, a) for a in orders])
    # The binomial expansion with the exact divergences is the remove direction exactly...
    assert np.allclose(poisson_subsampled_rdp(exact_base, q, orders), remove, rtol=1e-7)
    # ... the add direction never exceeds it (the module docstring's lemma) ...
    assert np.all(add <= remove * (1 + 1e-9))
    # ... and the accountant's bound (closed-form Skellam RDP) covers both.
    charged = poisson_subsampled_rdp(skellam_rdp(shift ** 2, shift, variance, orders), q, orders)
    assert np.all(np.maximum(add, remove) <= charged * (1 + 1e-9))


@settings(max_examples=200, deadline=None)
@given(p=st.floats(1e-6, 0.5), q=st.floats(1e-6, 1.0), alpha=st.integers(2, 64))
def test_adding_never_costs_more_than_removing_for_a_symmetric_pair(p, q, alpha):
    """The lemma on two points: P = (1-p, p), Q = (p, 1-p), M = (1-q) Q + q P."""
    lq = np.log([p, 1 - p])
    lp = lq[::-1]
    mix = np.logaddexp(math.log1p(-q) + lq, math.log(q) + lp) if q < 1 else lp
    assert renyi(lq, mix, alpha) <= renyi(mix, lq, alpha) + 1e-12 * max(1.0, abs(renyi(mix, lq, alpha)))


# -- the accountant against Opacus ------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("q,steps", [(0.001, 100), (0.01, 1000), (0.125, 240), (0.5, 10), (1.0, 10)])
def test_fine_limit_approaches_opacus_and_never_undercuts_it(sigma, q, steps):
    eps = epsilon_of_sum(mech(), sigma, [SumRelease(q, steps, 8)], DELTA)
    gauss = opacus_same_orders(sigma, q, steps)
    assert gauss * (1 - 1e-12) <= eps <= gauss * (1 + FINE_TOLERANCE)
    default = SumMechanism(1.0, choose_granularity(1.0, DIGITS_DIM), DIGITS_DIM, 8, 1)
    eps_default = epsilon_of_sum(default, sigma, [SumRelease(q, steps, 8)], DELTA)
    inflated = opacus_same_orders(sigma / (1 + default.inflation), q, steps)
    assert eps <= eps_default <= inflated * (1 + DEFAULT_TOLERANCE)
    assert default.inflation <= INFLATION_MAX
    opacus = epsilon_of([LedgerRecord(0, "record", sigma, q, steps, 1.0, "")], DELTA)
    if 0.5 <= opacus <= 20:
        assert abs(eps / opacus - 1) <= ORDER_GRID_TOLERANCE


def test_coarse_granularity_costs_epsilon():
    """Rounding to a coarse grid inflates the sensitivity; the accountant charges it."""
    coarse = SumMechanism(1.0, 1 / 8, 1000, 8, 1)  # c = 8, sqrt(d)/2 = 16: big inflation
    assert coarse.inflation > 1
    fine = epsilon_of_sum(mech(), 2.0, [SumRelease(0.1, 100, 8)], DELTA)
    assert epsilon_of_sum(coarse, 2.0, [SumRelease(0.1, 100, 8)], DELTA) > 2 * fine


# -- monotonicity -----------------------------------------------------------------------------

sigmas = st.floats(0.3, 20.0)
rates = st.floats(1e-3, 1.0)


@settings(max_examples=40, deadline=None)
@given(sigma=sigmas, q=rates, steps=st.integers(1, 2000), factor=st.floats(1.01, 3.0))
def test_more_noise_less_epsilon(sigma, q, steps, factor):
    m = mech(granularity=2.0 ** -8)
    release = [SumRelease(q, steps, 8)]
    assert epsilon_of_sum(m, sigma * factor, release, DELTA) <= epsilon_of_sum(m, sigma, release, DELTA)


@settings(max_examples=40, deadline=None)
@given(sigma=sigmas, q=rates, steps=st.integers(1, 2000), more=st.integers(1, 2000))
def test_more_steps_more_epsilon(sigma, q, steps, more):
    m = mech(granularity=2.0 ** -8)
    assert (epsilon_of_sum(m, sigma, [SumRelease(q, steps, 8)], DELTA)
            <= epsilon_of_sum(m, sigma, [SumRelease(q, steps + more, 8)], DELTA))


@settings(max_examples=40, deadline=None)
@given(sigma=sigmas, q=rates, steps=st.integers(1, 500), t=st.integers(1, 6), data=st.data())
def test_fewer_contributors_more_epsilon(sigma, q, steps, t, data):
    m = mech(members=8, coalition=t, granularity=2.0 ** -8)
    fewer = data.draw(st.integers(t + 1, 7))
    full = epsilon_of_sum(m, sigma, [SumRelease(q, steps, 8)], DELTA)
    dropped = epsilon_of_sum(m, sigma, [SumRelease(q, steps, fewer)], DELTA)
    assert dropped >= full
    assert dropped > full or full == 0 or math.isinf(full)


@settings(max_examples=40, deadline=None)
@given(sigma=sigmas, q=rates, steps=st.integers(1, 500), t=st.integers(1, 5))
def test_bigger_coalition_more_epsilon_at_the_same_member_noise(sigma, q, steps, t):
    small, big = mech(coalition=t, granularity=2.0 ** -8), mech(coalition=t + 1, granularity=2.0 ** -8)
    # the same Skellam share per member: sigma' = sigma sqrt((n - t - 1) / (n - t))
    sigma_big = sigma * math.sqrt((8 - t - 1) / (8 - t))
    assert math.isclose(small.member_mu(sigma), big.member_mu(sigma_big), rel_tol=1e-12)
    release = [SumRelease(q, steps, 8)]
    assert (epsilon_of_sum(big, sigma_big, release, DELTA)
            > epsilon_of_sum(small, sigma, release, DELTA))


def test_the_plan_sizes_shares_so_any_coalition_leaves_sigma_c():
    """All n contributing: the honest noise is sigma c whatever t is (shares grow with t)."""
    release = [SumRelease(0.1, 100, 8)]
    eps = {t: epsilon_of_sum(mech(coalition=t), 1.5, release, DELTA) for t in (1, 2, 3, 7)}
    assert max(eps.values()) == pytest.approx(min(eps.values()), rel=1e-12)
    assert mech(coalition=7).member_std(1.5) == pytest.approx(1.5)
    assert mech(coalition=1).member_std(1.5) == pytest.approx(1.5 / math.sqrt(7))


def test_no_honest_contributor_is_infinite_epsilon():
    m = mech(coalition=2)
    for contributors in (0, 1, 2):
        assert math.isinf(epsilon_of_sum(m, 5.0, [SumRelease(0.1, 1, contributors)], DELTA))
    assert math.isinf(epsilon_of_sum(m, 0.0, [SumRelease(0.1, 1, 8)], DELTA))
    assert epsilon_of_sum(m, 5.0, [SumRelease(0.1, 0, 8)], DELTA) == 0.0
    assert epsilon_of_sum(m, 5.0, [], DELTA) == 0.0


def test_a_history_with_a_dropout_round_costs_its_own_noise():
    m = mech(coalition=1)
    full = [SumRelease(0.1, 100, 8)]
    with_dropout = [SumRelease(0.1, 99, 8), SumRelease(0.1, 1, 3)]
    e_full = epsilon_of_sum(m, 1.5, full, DELTA)
    e_drop = epsilon_of_sum(m, 1.5, with_dropout, DELTA)
    assert e_drop > e_full
    # the dropout step alone is charged as a sum with 2/7 of the planned honest variance
    equivalent = epsilon_of_sum(m, 1.5 * math.sqrt(2 / 7), [SumRelease(0.1, 1, 8)], DELTA)
    assert epsilon_of_sum(m, 1.5, [SumRelease(0.1, 1, 3)], DELTA) == pytest.approx(equivalent)


# -- calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize("target,q,steps,t", [(3.0, 1 / 8, 240, 1), (1.0, 0.01, 1000, 2),
                                              (8.0, 1.0, 30, 3), (3.0, 1 / 7, 70, 2)])
def test_calibration_round_trips(target, q, steps, t):
    m = SumMechanism(1.0, choose_granularity(1.0, DIGITS_DIM), DIGITS_DIM, 8, t)
    sigma = calibrate_sum_sigma(m, target, DELTA, q, steps)
    release = [SumRelease(q, steps, 8)]
    assert epsilon_of_sum(m, sigma, release, DELTA) <= target
    assert epsilon_of_sum(m, sigma / SIGMA_RATIO, release, DELTA) > target
    # planning for dropouts (5 of 8 contributing) needs more noise
    assert calibrate_sum_sigma(m, target, DELTA, q, steps, contributors=5) > sigma


def test_calibration_that_cannot_be_met_is_a_named_error():
    with pytest.raises(DistributedDPError, match="cannot be met"):
        calibrate_sum_sigma(mech(), 1e-4, DELTA, 1.0, 100_000)


# -- hostile parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"members": 3, "coalition": 3}, "must exceed the coalition"),
    ({"members": 2, "coalition": 5}, "must exceed the coalition"),
    ({"coalition": 0}, "coalition t"),
    ({"members": 1}, "members n"),
    ({"clip": -1.0}, "clip norm"),
    ({"clip": math.nan}, "clip norm"),
    ({"granularity": 0.0}, "granularity"),
    ({"dim": 0}, "dimension"),
])
def test_hostile_mechanisms_are_named_errors(kwargs, match):
    with pytest.raises(DistributedDPError, match=match):
        mech(**kwargs)


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_sample_rate_outside_zero_one_is_a_named_error(q):
    with pytest.raises(DistributedDPError, match="sample rate"):
        epsilon_of_sum(mech(), 1.0, [SumRelease(q, 10, 8)], DELTA)
    with pytest.raises(DistributedDPError, match="sample rate"):
        calibrate_sum_sigma(mech(), 3.0, DELTA, q, 10)


@pytest.mark.parametrize("sigma", [-1.0, -1e-9, math.nan, math.inf])
def test_negative_or_nonfinite_noise_is_a_named_error(sigma):
    with pytest.raises(DistributedDPError, match="sigma"):
        epsilon_of_sum(mech(), sigma, [SumRelease(0.1, 10, 8)], DELTA)
    with pytest.raises(DistributedDPError, match="sigma"):
        mech().member_mu(sigma)


def test_other_hostile_accounting_inputs_are_named_errors():
    m = mech()
    with pytest.raises(DistributedDPError, match="contributors"):
        epsilon_of_sum(m, 1.0, [SumRelease(0.1, 10, 9)], DELTA)
    with pytest.raises(DistributedDPError, match="contributors"):
        epsilon_of_sum(m, 1.0, [SumRelease(0.1, 10, -1)], DELTA)
    with pytest.raises(DistributedDPError, match="steps"):
        epsilon_of_sum(m, 1.0, [SumRelease(0.1, -5, 8)], DELTA)
    with pytest.raises(DistributedDPError, match="delta"):
        epsilon_of_sum(m, 1.0, [SumRelease(0.1, 5, 8)], 1.0)
    with pytest.raises(DistributedDPError, match="mu"):
        skellam(-1.0, 5, os_generator())
    with pytest.raises(DistributedDPError, match="target epsilon"):
        calibrate_sum_sigma(m, -3.0, DELTA, 0.1, 10)


# -- the member's step (node/learn/dstep.py) ---------------------------------------------------


def test_per_example_gradients_match_autograd_and_the_dpsgd_clipped_sum():
    import torch  # lean start: only this test trains; the rest is numpy
    from torch import nn

    from node.learn.dpsgd import clipped_gradient_sum
    from node.learn.dstep import consortium_step, per_example_gradients
    from node.privacy.mechanisms import SeededNoise

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    xb, yb = torch.randn(7, 6), torch.randint(0, 3, (7,))
    grads = per_example_gradients(model, xb, yb)
    dim = sum(p.numel() for p in model.parameters())
    assert grads.shape == (7, dim) and grads.dtype == np.float64
    for i in range(7):
        model.zero_grad()
        nn.functional.cross_entropy(model(xb[i:i + 1]), yb[i:i + 1], reduction="sum").backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()
        assert np.allclose(grads[i], flat, atol=1e-6)
    clip = 0.5
    summed, _ = clipped_gradient_sum(model, xb, yb, clip)
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    ours = (grads * np.minimum(1.0, clip / norms)).sum(0)
    assert np.allclose(ours, torch.cat([g.reshape(-1) for g in summed]).detach().double().numpy(), atol=1e-5)

    m = SumMechanism(clip, choose_granularity(clip, dim), dim, 4, 1)
    X = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    y = np.random.default_rng(2).integers(0, 3, 50)
    vector, batch = consortium_step(model, X, y, sample_rate=0.2, mech=m, sigma=1.0,
                                    noise=SeededNoise(3), rng=os_generator(test_only_seed=4))
    assert vector.shape == (dim,) and vector.dtype == np.int64 and 0 < batch < 50
    with pytest.raises(DistributedDPError, match="parameters"):
        consortium_step(model, X, y, sample_rate=0.2, mech=mech(dim=dim + 1), sigma=1.0,
                        noise=SeededNoise(3), rng=os_generator())


def test_eight_members_steps_sum_to_the_clipped_sum_plus_the_plans_noise():
    """The secure round's sum as the bench simulates it: 8 members' consortium_step vectors
    under a SecurePlan (node/privacy/secure.py), summed as integers and decoded, are the
    exact clipped gradient sum of all their rows (q = 1) plus noise of std
    sigma C sqrt(n / (n - t)) (every member's share; the rounding adds ~1e-3 of it)."""
    import dataclasses

    import torch  # lean start: only this test trains; the rest is numpy
    from torch import nn

    from node.learn.dstep import consortium_step, per_example_gradients
    from node.privacy.mechanisms import SeededNoise
    from node.privacy.secure import secure_plan

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))
    dim = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(5)
    parts = [(rng.normal(size=(int(k), 6)).astype(np.float32), rng.integers(0, 3, int(k)))
             for k in rng.integers(5, 30, 8)]
    plan = secure_plan(rows_total=sum(len(y) for _, y in parts), members=8, coalition=2,
                       epsilon=3.0, delta=1e-4, dim=dim, clip_norm=0.5, rounds=20)
    plan = dataclasses.replace(plan, sample_rate=1.0)  # every row: the exact sum is known
    mech = plan.mechanism()
    total = np.zeros(dim, dtype=np.int64)
    exact = np.zeros(dim)
    for i, (X, y) in enumerate(parts):
        vec, batch = consortium_step(model, X, y, sample_rate=1.0, mech=mech,
                                     sigma=plan.noise_multiplier, noise=SeededNoise(i),
                                     rng=os_generator(test_only_seed=100 + i))
        assert batch == len(y)
        total += vec
        g = per_example_gradients(model, torch.from_numpy(X), torch.from_numpy(y))
        exact += (g * np.minimum(1.0, 0.5 / np.linalg.norm(g, axis=1, keepdims=True))).sum(0)
    noise = decode_sum(total, mech) - exact
    want = plan.noise_multiplier * 0.5 * math.sqrt(8 / 6)
    assert abs(noise.std() / want - 1) < 0.1, (noise.std(), want)
    assert abs(noise.mean()) < 4 * want / math.sqrt(dim)

"""The L2 check on a DP-on-the-sum aggregate (node/runtime/secure_bounds.py): an honest
sum stays under the bound, even with every sampled row at the clip and aligned; a member
(its real key) whose vector passes the per-coordinate bound but weighs more than rows and
noise explain fails the round by name at every member."""

from __future__ import annotations

import numpy as np

from node.privacy.secure import secure_plan
from node.runtime.secure_bounds import sum_l2_bound
from node.secagg.encoding import IntegerCodec
from tests.test_secure_round import SecureNet

DIGITS = dict(rows_total=1437, members=8, coalition=2, epsilon=3.0, delta=1e-5, dim=4810)


def test_an_honest_sum_at_its_worst_stays_under_the_bound():
    """Every sampled row at Delta2 along one direction (the largest signal rows can give),
    plus all 8 members' Skellam noise drawn as the members draw it: 20 draws, all under the
    bound; the bound is far below sqrt(d) x the coordinate bound the encoding checks."""
    from node.privacy.secure import coordinate_bound_of

    plan = secure_plan(**DIGITS)
    mech = plan.mechanism()
    bound = sum_l2_bound(plan)
    rng = np.random.default_rng(0)
    mu = mech.member_mu(plan.noise_multiplier)
    direction = np.zeros(mech.dim)
    direction[0] = 1.0
    for _ in range(20):
        rows = rng.binomial(plan.rows_total, plan.sample_rate)
        noise = sum(rng.poisson(mu, mech.dim) - rng.poisson(mu, mech.dim) for _ in range(8))
        total = rows * mech.l2_sensitivity * direction + noise
        assert np.linalg.norm(total) <= bound
    assert bound < 0.1 * np.sqrt(mech.dim) * coordinate_bound_of(plan)
    # the signal's allowance: the rows sampled at a 2^-40 tail, not every row
    assert bound < plan.rows_total * mech.l2_sensitivity + np.sqrt(
        mech.dim * 2 * 8 * mu) * 3


def test_a_member_weighing_more_than_rows_and_noise_fails_the_round_by_name():
    """n = 8, t = 2, sum_only, integer contributions: bank-7 deals a vector whose every
    coordinate is within the encoding's bound (accepted alone, and by the coordinate check
    of the sum) but whose norm is past the L2 bound: every member fails the round,
    aggregate_too_large, nothing applied. The same round without it opens."""
    def run(big: bool) -> SecureNet:
        vectors = {f"bank-{i}": np.full(6, 3, dtype=np.int64) for i in range(8)}
        if big:
            vectors["bank-7"] = np.full(6, 400, dtype=np.int64)  # norm 980 > 500
        net = SecureNet(8, 2, variant="sum_only", vectors=vectors)
        net.codec = IntegerCodec(8, 6, 1000)
        for m in net.members.values():
            m.secure.codec, m.secure.floor, m.secure.l2_bound = net.codec, 6, 500.0
        return net.run()

    clean = run(False)
    assert all(clean.outcome(m).ok for m in clean.names)
    net = run(True)
    for m in net.names:
        o = net.outcome(m)
        assert not o.ok and o.reason == "aggregate_too_large" and o.total is None, (o.reason,
                                                                                    o.detail)
        assert "L2 norm" in o.detail

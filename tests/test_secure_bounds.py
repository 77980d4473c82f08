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


def test_the_largest_secure_message_is_checked_against_the_envelope_limit():
    """Review 2 F9 (n = 7, t = 2, the default 64 MiB envelope): at d = 8M a deal fits but
    an honest holder's agreement with t reveals (121 MiB) does not; at d = 15M no deal
    fits. Both are refused at the start by name; the digits model fits. The bound is the
    wire's own (an agreement of t deal-sized reveals decodes at exactly that size)."""
    from gossip.bodies import SecAgg, decode_secagg, encode_secagg, secagg_piece_limits
    from node.runtime.secure_bounds import SECURE_FRAME_BYTES, largest_secure_message

    env = 64 * 1024 * 1024
    what, size = largest_secure_message(7, 2, 8_000_000)
    assert what == "an agreement with 2 reveal(s)" and size > env
    assert sum(secagg_piece_limits("deal", 7, 8_000_000)) + SECURE_FRAME_BYTES < env
    assert largest_secure_message(7, 2, 15_000_000)[1] > env
    assert largest_secure_message(7, 2, 4_810)[1] < env
    limits = secagg_piece_limits("agree", 7, 6)
    body = encode_secagg(SecAgg("agree", (bytes(limits[0]), bytes(limits[1]), bytes(limits[2]))))
    assert len(decode_secagg(body, 7, dim=6).pieces) == 3
    assert len(body) + SECURE_FRAME_BYTES >= largest_secure_message(7, 2, 6)[1] - 64


def test_a_node_whose_secure_messages_outgrow_its_envelope_limit_is_refused_at_start():
    """Review 2 F9 through secure_node.setup: a model whose deal (8 bytes per value) does
    not fit gossip.max_envelope_bytes is refused by name, not failed every round."""
    from types import SimpleNamespace

    import pytest
    import torch

    from gossip.errors import LocalError
    from gossip.membership import Consortium
    from node.runtime import secure_node
    from node.strategy.consortium_rules import pin_rules, rules_table
    from tests.helpers import consortium, keys

    base = consortium(keys(4))
    cons = Consortium(base.name, base.schema, base.members,
                      pin_rules(rules_table(4, secure=True), 4))

    def node(limit):
        return SimpleNamespace(
            consortium=cons, sealing=object(), name="bank-0", model=torch.nn.Linear(1000, 200),
            cfg=SimpleNamespace(gossip=SimpleNamespace(max_envelope_bytes=limit),
                                privacy=SimpleNamespace(mode="off")))

    with pytest.raises(LocalError, match="over gossip.max_envelope_bytes = 1048576"):
        secure_node.setup(node(1 << 20))
    assert secure_node.setup(node(64 << 20)) is not None

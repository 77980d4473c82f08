"""Variant "range" through a real secure round (tests/test_secure_round.py's harness: real
round machines, real signed envelopes, each member's own key): the witness rides in the
deal, the one-bit checks are opened at the degree-2 step, an out-of-range member is
excluded as "norm_out_of_range" and the others' sum is opened. A hostile member is an
honest driver whose dealing is replaced, signed with its real key."""

from __future__ import annotations

import numpy as np
import pytest

from node.runtime import secure_range
from node.runtime.secure_round import SecureRound, SecureRounds
from node.secagg import field as F
from node.secagg import range_check as RC
from node.secagg.encoding import FixedPoint, signed
from tests.test_secure_round import CLIP, DIM, SecureNet

N, T = 5, 1
CODEC = FixedPoint(CLIP, DIM, N, 16)  # a scale whose norms fit the check's field bounds
RP = RC.RangeParams.build(DIM, CLIP * CODEC.scale * 1.01 + DIM)


def range_net(**kw) -> SecureNet:
    net = SecureNet(N, T, variant="range", **kw)
    net.codec = CODEC
    for m in net.members.values():
        m.secure = SecureRounds(m.name, net.names, T, "range", CODEC, net.cid, range_params=RP)
    return net


def hostile(net: SecureNet, name: str, monkeypatch, make) -> None:
    """`name` deals make(its honest encoding) and, where its vector fails the range, the
    best witness it can (its projections' bits mod 2^L, the slack's mod 2^S)."""
    sec = net.members[name].secure
    honest_witness = secure_range.dealer_witness

    def witness(sr: SecureRound, encoded):
        fn = honest_witness(sr, encoded)
        if sr.me != name:
            return fn

        def fake(parts):
            try:
                return fn(parts)
            except RC.OutOfRange:
                u = RC.projections(sr.rp, secure_range._x_challenge(sr, sr.i))
                y = [v - F.P if v > F.P // 2 else v for v in RC.project(u, encoded).tolist()]
                return np.concatenate([
                    RC._bits([(v + RP.offset) % (1 << RP.bits) for v in y], RP.bits),
                    RC._bits([(RP.bound_sq - sum(v * v for v in y)) % (1 << RP.slack_bits)],
                             RP.slack_bits)])
        return fake

    monkeypatch.setattr(secure_range, "dealer_witness", witness)
    deal = sec.deal
    sec.deal = lambda r, encoded: deal(r, make(encoded))


def honest_sum(net: SecureNet, who) -> np.ndarray:
    return F.sum_mod(np.stack([net.codec.encode(net.vector(m, 0)) for m in who]), axis=0)


def test_honest_members_all_pass_and_the_sum_is_exact():
    net = range_net().run()
    for o in net.honest_outcomes(net.names):
        assert o.ok, (o.reason, o.detail)
        assert o.selected == tuple(net.names) and not o.excluded and not o.named
        np.testing.assert_array_equal(o.field_sum, honest_sum(net, net.names))


def scaled(encoded):
    return np.array([(40 * int(v)) % F.P for v in signed(encoded).tolist()], dtype=np.uint64)


def wrapped(encoded):
    """Two huge coordinates with a^2 + b^2 = 1 mod p: its squared norm opens as 1."""
    s = 12345
    inv = F.inv((1 + s * s) % F.P)
    x = np.zeros(DIM, dtype=np.uint64)
    x[0], x[1] = 2 * s * inv % F.P, (1 - s * s) * inv % F.P
    return x


@pytest.mark.parametrize("make", [scaled, wrapped], ids=["scaled", "wraparound"])
def test_an_out_of_range_member_is_excluded_and_the_round_sums_the_others(monkeypatch, make):
    net = range_net()
    bad = net.names[2]
    hostile(net, bad, monkeypatch, make)
    net.run()
    others = [m for m in net.names if m != bad]
    for o in net.honest_outcomes(others):
        assert o.ok, (o.reason, o.detail)
        assert bad in o.entered  # its dealing was consistent: only the range check catches it
        assert o.selected == tuple(others)
        assert o.excluded[bad].startswith("norm_out_of_range")
        assert not o.named  # no honest member blamed
        np.testing.assert_array_equal(o.field_sum, honest_sum(net, others))


def test_an_honest_member_out_of_its_own_range_does_not_deal():
    sr = SecureRound("a", ["a", "b", "c", "d", "e"], T, "range", CODEC, 0, b"c" * 32,
                     range_params=RP)
    big = np.full(DIM, 10 ** 9, dtype=np.uint64)  # far past B: no witness exists
    assert sr.deal(big) == {} and sr.own_pieces() is None
    assert sr.out.detail.startswith("norm_out_of_range")


def test_the_rehearsal_attacker_forges_a_witness_and_is_caught(monkeypatch):
    # node/rehearsal/attacks.py forged_witness: what the bench's scale and noise attackers
    # deal (an honest node refuses to deal an out-of-range vector; an attacker does not)
    from node.rehearsal.attacks import forged_witness

    net = range_net()
    bad = net.names[1]
    sec = net.members[bad].secure
    make, deal = sec.round, sec.deal

    def round_(r):
        sr = make(r)
        sr.witness_of = forged_witness
        return sr
    sec.round = round_
    sec.deal = lambda r, encoded: deal(r, scaled(encoded))
    net.run()
    others = [m for m in net.names if m != bad]
    for o in net.honest_outcomes(others):
        assert o.ok and o.selected == tuple(others), (o.reason, o.detail)
        assert o.excluded[bad].startswith("norm_out_of_range")
        np.testing.assert_array_equal(o.field_sum, honest_sum(net, others))

"""The optimistic sum opening (node/runtime/secure_open.py): the sum piece goes to the 2t
ring neighbours, a confirm step, the fallback to all pieces. Real RoundMachines and signed
envelopes (tests/test_secure_round.py's SecureNet), each member with its ring phases;
hostile members sign with their real member key."""

from __future__ import annotations

import numpy as np
import pytest

from gossip import envelope as E
from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.envelope import KIND_SECAGG
from gossip.protocol import RoundMachine, RoundParams
from node.runtime.secure_open import (
    CONFIRM_PHASE,
    FALLBACK_PHASE,
    OptimisticRounds,
    open_phases,
    ring,
)
from node.runtime.secure_round import SUM_PHASE, secure_phases
from node.secagg import field as F
from node.secagg.pieces import Piece, from_bytes, to_bytes
from tests.test_secure_round import DEADLINE, SecureNet, field_sum


def optimistic_net(n: int, t: int, **kw) -> SecureNet:
    """A SecureNet whose members run the optimistic opening, as the node does."""
    net = SecureNet(n, t, **kw)
    for name, m in net.members.items():
        m.m = RoundMachine(name, net.names, m.book,
                           RoundParams(net.rounds, DEADLINE, 1, len(net.names)),
                           keys={x: net.pub[x] for x in net.names},
                           phases=open_phases(net.variant, name, net.names, t))
        m.secure = OptimisticRounds(name, net.names, t, net.variant, net.codec, net.cid)
    return net


def steps(net: SecureNet, step: str, with_piece: bool = True) -> list[tuple[str, str]]:
    """(sender, recipient) of every delivered `step` message (carrying a piece)."""
    out = []
    for sender, to, data in net.delivered:
        outer = E._parse_outer(data, E.DEFAULT_MAX_ENVELOPE_BYTES)
        if outer.kind != KIND_SECAGG:
            continue
        msg = decode_secagg(bytes(outer.body), len(net.names))
        if msg.step == step and (bool(msg.pieces) or not with_piece):
            out.append((sender, to))
    return out


def assert_exact(net: SecureNet, honest) -> None:
    outs = net.honest_outcomes(honest)
    assert all(o.ok for o in outs), [(o.reason, o.detail) for o in outs]
    sel = outs[0].selected
    for o in outs:
        assert o.selected == sel
        np.testing.assert_array_equal(o.field_sum, field_sum(net, sel))


def paths(net: SecureNet, who) -> dict[str, str]:
    return {m: net.members[m].secure.paths[0] for m in who}


def wrong_sum(*names: str):
    def tamper(net, m, phase, body):
        if m not in names or phase != SUM_PHASE:
            return body
        p = from_bytes(decode_secagg(body, len(net.names)).pieces[0])
        vals = p.values.copy()
        vals[0] = (int(vals[0]) + 1) % F.P
        return encode_secagg(SecAgg(SUM_PHASE, (to_bytes(Piece(p.round, p.kind, p.owner,
                                                                p.holder, vals)),)))
    return tamper


def test_the_ring_is_symmetric_and_the_phases_are_todays_without_saving():
    names = [f"m{k}" for k in range(8)]
    for me in names:
        near, far = ring(names, 2, me)
        assert len(near) == 4 and len(far) == 3 and me not in near | far
        assert all(me in ring(names, 2, other)[0] for other in near)
    net = SecureNet(8, 2)  # the round's own ring (robust.sum_recipients) is the phases' peers
    for k, me in enumerate(net.names):
        params = OptimisticRounds(me, net.names, 2, net.variant, net.codec, net.cid).round(0)
        assert {net.names[j - 1] for j in params.near} == ring(net.names, 2, me)[0]
        assert k + 1 not in params.near
    phases = open_phases("distances", "m0", names, 2)
    assert [p.name for p in phases] == [p.name for p in secure_phases("distances")] + [
        CONFIRM_PHASE, FALLBACK_PHASE]
    assert phases[-3].peers == frozenset({"m1", "m2", "m6", "m7"})
    assert open_phases("sum_only", "m0", names[:5], 2) == secure_phases("sum_only")  # n - 1 = 2t


@pytest.mark.parametrize(("n", "t", "variant"), [(8, 2, "distances"), (8, 2, "sum_only"),
                                                 (4, 1, "norm_only")])
def test_the_optimistic_path_opens_the_exact_sum_from_the_ring_alone(n, t, variant):
    """Every member's aggregate is the plain field sum; each sum piece went to 2t members
    (today: n - 1), no fallback piece was sent."""
    net = optimistic_net(n, t, variant=variant).run()
    assert_exact(net, net.names)
    assert set(paths(net, net.names).values()) == {"optimistic"}
    assert len(steps(net, SUM_PHASE)) == n * 2 * t
    assert steps(net, FALLBACK_PHASE) == []
    assert len(steps(net, CONFIRM_PHASE)) == n * (n - 1)  # each a 32-byte digest
    assert not any(o.named for o in net.honest_outcomes(net.names))


@pytest.mark.parametrize("liars", [("bank-3",), ("bank-3", "bank-4")])
def test_a_wrong_sum_piece_forces_the_fallback_is_named_and_every_member_gets_the_sum(liars):
    """bank-3 (and with it bank-4: t liars, in each other's ring) sends its ring a wrong sum
    piece, signed with its own key: its neighbours detect it (2t + 1 pieces that disagree),
    say "need", every member sends the rest of the pieces and decodes all of them with
    correction: the exact sum at every honest member, each liar named by the members it
    sent the wrong piece to."""
    net = optimistic_net(8, 2, tamper_open=wrong_sum(*liars)).run()
    honest = [m for m in net.names if m not in liars]
    assert_exact(net, honest)
    for liar in liars:
        near, _ = ring(net.names, 2, liar)
        for m in honest:
            assert net.outcome(m).named.get(liar, "").startswith("wrong_sum_piece") == (m in near)
    assert all(p.startswith("fallback") for p in paths(net, honest).values())
    far = set(honest) - ring(net.names, 2, "bank-3")[0]
    assert "needs it" in paths(net, honest)[min(far)]
    assert len(steps(net, FALLBACK_PHASE)) == 8 * 3  # everyone to its n - 1 - 2t others


def test_a_false_need_costs_only_the_fallback():
    def need(net, m, phase, body):
        return encode_secagg(SecAgg(CONFIRM_PHASE, (b"",))) \
            if (m, phase) == ("bank-5", CONFIRM_PHASE) else body
    net = optimistic_net(8, 2, tamper_open=need).run()
    assert_exact(net, net.names)
    assert all("bank-5 needs it" in p for m, p in paths(net, net.names).items() if m != "bank-5")
    # the 7 others to their 3 others each (bank-5 itself saw only ok's)
    assert len(steps(net, FALLBACK_PHASE)) == 7 * 3
    assert not any(o.named for o in net.honest_outcomes(net.names))  # a need is no proof


@pytest.mark.parametrize("to_whom", ["some", "all"])
def test_a_lying_ok_digest_cannot_split_the_honest_members(to_whom):
    """bank-2 confirms "ok" with a digest of another aggregate, to two members or to all:
    those members name it and send the fallback; every honest member applies the exact sum."""
    fooled = {"bank-4", "bank-7"} if to_whom == "some" else None

    def lie(net, m, phase, to, body):
        if (m, phase) != ("bank-2", CONFIRM_PHASE) or (fooled is not None and to not in fooled):
            return body
        return encode_secagg(SecAgg(CONFIRM_PHASE, (bytes(range(32)),)))
    net = optimistic_net(8, 2, tamper_to=lie).run()
    honest = [m for m in net.names if m != "bank-2"]
    assert_exact(net, honest)
    for m in honest:
        lied_to = fooled is None or m in fooled
        assert net.outcome(m).named.get("bank-2", "").startswith("bad_confirm") == lied_to
        assert ("bank-2's digest differs" in paths(net, [m])[m]) == lied_to


@pytest.mark.parametrize("phases", [(SUM_PHASE, CONFIRM_PHASE, FALLBACK_PHASE),
                                    (CONFIRM_PHASE, FALLBACK_PHASE)])
def test_a_member_dropping_before_the_sum_or_the_confirm_means_the_fallback(phases):
    """bank-4 crashes after the agreement (before its sum piece, or after it and before its
    confirm): its ring neighbours hold fewer than 2t + 1 pieces, or its confirm is missing;
    the others fall back and every other member applies the exact sum."""
    net = optimistic_net(8, 2, mute={p: ("bank-4",) for p in phases}).run()
    others = [m for m in net.names if m != "bank-4"]
    assert_exact(net, others)
    assert all("bank-4's confirm is missing" in p for p in paths(net, others).values())
    near, _ = ring(net.names, 2, "bank-4")
    if SUM_PHASE in phases:
        assert all("we need it" in paths(net, [m])[m] for m in near)


def test_t_members_dropping_before_the_sum_still_open_through_the_fallback():
    net = optimistic_net(8, 2, mute={p: ("bank-2", "bank-3") for p in
                                     (SUM_PHASE, CONFIRM_PHASE, FALLBACK_PHASE)}).run()
    others = [m for m in net.names if m not in ("bank-2", "bank-3")]
    assert_exact(net, others)


def test_a_restarted_members_stored_need_still_brings_its_fallback_piece():
    """Our confirm as a run before a restart sent it ("need", re-sent byte for byte) counts
    as ours: we send the fallback piece the others will expect from us."""
    net = optimistic_net(8, 2)
    sr = net.members["bank-1"].secure.round(0)
    sr._bodies[SUM_PHASE] = encode_secagg(SecAgg(SUM_PHASE, (b"piece",)))
    sr.early, sr.digest = np.zeros(1, dtype=np.uint64), b"x" * 32
    net.members["bank-1"].secure.keep_own(0, CONFIRM_PHASE,
                                         encode_secagg(SecAgg(CONFIRM_PHASE, (b"",))))
    body = sr.fallback({m: encode_secagg(SecAgg(CONFIRM_PHASE, (b"x" * 32,)))
                        for m in net.names if m != "bank-1"})
    assert decode_secagg(body, 8).pieces == (b"piece",)
    assert sr.fallback_why == ["we need it (our stored confirm said need)"]


def test_a_member_whose_round_failed_sees_who_opened_the_sum_all_the_same():
    """`missed` (secure_agree.opened_elsewhere): with the ring, at most 2t sum pieces reach
    a member; the confirms' "ok"s count too, so a failed member learns that more than t
    opened (its model now differs from theirs)."""
    net = optimistic_net(8, 2)
    got = {}
    sec = net.members["bank-6"].secure
    close = sec.close
    sec.close = lambda r, phases: got.setdefault(r, phases) and close(r, phases)
    net.run()
    failed = OptimisticRounds("bank-6", net.names, 2, net.variant, net.codec, net.cid).round(0)
    failed.out.reason = "no_agreement"
    out = failed.finish_open(got[0])
    assert out.missed == tuple(m for m in net.names if m != "bank-6")


@pytest.mark.parametrize("n", [7, 8])
def test_t_liars_asking_for_the_fallback_and_sending_wrong_fallback_pieces_are_named(n):
    """Review s4: t liars (real keys) say "need" so everyone falls back, and send their far
    members a fallback piece other than their sum piece: every honest member applies the
    exact sum, each liar is named `wrong_sum_piece` by exactly the members it sent the wrong
    piece to, and no honest member is named (n = 3t + 1 too: correction at its bound)."""
    liars = ("bank-3", "bank-6")

    def tamper(net, m, phase, body):
        if m not in liars or phase not in (CONFIRM_PHASE, FALLBACK_PHASE):
            return body
        if phase == CONFIRM_PHASE:
            return encode_secagg(SecAgg(CONFIRM_PHASE, (b"",)))
        msg = decode_secagg(body, len(net.names))
        if not msg.pieces:
            return body
        p = from_bytes(msg.pieces[0])
        vals = (p.values + 5) % F.P
        return encode_secagg(SecAgg(FALLBACK_PHASE, (to_bytes(Piece(p.round, p.kind, p.owner,
                                                                     p.holder, vals)),)))
    net = optimistic_net(n, 2, tamper_open=tamper).run()
    honest = [m for m in net.names if m not in liars]
    assert_exact(net, honest)
    for m in honest:
        named = net.outcome(m).named
        assert set(named) <= set(liars), named
        for liar in liars:
            far = m not in ring(net.names, 2, liar)[0]
            assert named.get(liar, "").startswith("wrong_sum_piece") == far, (m, liar, named)

"""Members proven at fault kept out of later secure rounds (review s5 R5,
node/runtime/secure_kept.py), through the real round (tests/test_secure_round.py's
SecureNet: each member's RoundMachine and SecureRounds, every message signed with the
member's own key)."""

from __future__ import annotations

import numpy as np

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.envelope import KIND_DEAL, decode_outer
from node.runtime import secure_explain, secure_kept
from node.runtime.secure_agree import AGREE_BYTES, AGREE_NONE
from node.secagg import explain
from node.secagg import field as F
from node.secagg.pieces import Piece, from_bytes, to_bytes
from tests.test_secure_maskcheck import mask_lie
from tests.test_secure_round import SecureNet

LIARS = ("bank-5", "bank-6")
HONEST = ("bank-0", "bank-1", "bank-2", "bank-3", "bank-4")


def _liars_claiming_everything(net, m, phase, body):
    """The mask-check liars of tests/test_secure_maskcheck.py (vector columns honest, mask
    columns random), whose checks also claim to hold every member's dealing."""
    if m not in LIARS or phase != "check":
        return body
    r, edited = mask_lie(net, m, body, salt=100, held=tuple(range(1, len(net.names) + 1)))
    net.members[m].secure.keep_own(r, "check", edited)  # what it signs for
    return edited


def _searches(monkeypatch) -> list[int]:
    """The rounds in which some member ran the explanation search (node/secagg/explain.py)."""
    calls: list[int] = []
    current: list[int] = []
    unresolved, search = secure_explain.unresolved, explain.explain

    def spy_unresolved(sr, *args):
        current.append(sr.r)
        try:
            return unresolved(sr, *args)
        finally:
            current.pop()

    def spy_search(*args, **kwargs):
        calls.append(current[-1])
        return search(*args, **kwargs)

    monkeypatch.setattr(secure_explain, "unresolved", spy_unresolved)
    monkeypatch.setattr(explain, "explain", spy_search)
    return calls


def _check_used(net: SecureNet, m: str, r: int, of: str) -> bool:
    """Whether member m's round-r agreement names `of`'s check body (it used it)."""
    msg = decode_secagg(decode_outer(net.members[m].sent[(r, "agree")]).body, len(net.names))
    k = net.names.index(of)
    entry = msg.pieces[0][AGREE_BYTES * (1 + 2 * k):AGREE_BYTES * (2 + 2 * k)]
    return entry != AGREE_NONE


def test_mask_check_liars_named_once_are_kept_out_of_the_next_round(monkeypatch):
    """n = 7, t = 2, sum_only, two rounds; bank-5 and bank-6 (their real keys) open wrong
    mask checks in both rounds and claim to hold every dealing. Round 1: every member runs
    the explanation search, names them `mask_check_liar`, and the honest five open. Round
    2: the honest members deal them nothing (KEPT_OUT in their commitment slots) and refuse
    their deals (`kept_out`); their claims to hold the honest dealings are void (those
    commitments rule them out), so no honest dealing is left unresolved and nobody runs
    the search; the honest five open again. Before, the search ran in every round."""
    calls = _searches(monkeypatch)
    net = SecureNet(7, 2, variant="sum_only", rounds=2, tamper_open=_liars_claiming_everything).run()
    assert set(calls) == {0}, calls
    for m in HONEST:
        first, second = net.outcome(m, 0), net.outcome(m, 1)
        # named mask_check_liar at the entry (then, their disputes settled by the revealed
        # deals at the sum step, `false_dispute`, which replaces the claim)
        assert all(first.named.get(x, "").startswith(("mask_check_liar", "false_dispute"))
                   for x in LIARS), first.named
        assert net.members[m].secure.proven == {x: "mask_check_liar in round 1" for x in LIARS}
        assert first.ok and first.entered == HONEST, (first.reason, first.detail)
        assert second.ok and second.entered == second.selected == HONEST, \
            (second.reason, second.detail, second.entered)
        assert all(second.named.get(x, "").startswith("kept_out: mask_check_liar in round 1")
                   for x in LIARS), second.named
        assert not set(second.named) & set(HONEST), second.named
        # (getting no deal from us, their machines waited for the share deadline: their
        # round-2 checks came after ours was judged; the claims voided in time: below)
        assert not any(_check_used(net, m, 1, x) for x in LIARS)
    for sender, to, data in net.delivered:  # no honest piece reached a liar in round 2
        env = decode_outer(data)
        if env.kind == KIND_DEAL and env.round == 1 and to in LIARS:
            assert sender in LIARS, (sender, to)


def test_claims_on_a_dealing_that_kept_the_claimant_out_are_void(monkeypatch):
    """The same second round step by step (SecureRound, no machine: the liars' checks in
    time): each honest member keeps bank-5 and bank-6 out, the liars claim to hold every
    dealing with wrong mask checks. Their claims on the honest dealings are void, the
    honest dealings enter without the explanation search, and the liars cannot open."""
    from node.runtime.secure_round import SecureRound
    from node.secagg.encoding import FixedPoint
    from tests.helpers import consortium, keys

    calls = _searches(monkeypatch)
    names = [m.name for m in consortium(keys(7)).members]
    codec, cid = FixedPoint.choose(1.0, 6, 7), b"c" * 32
    rounds = {m: SecureRound(m, names, 2, "sum_only", codec, 1, cid) for m in names}
    for m in HONEST:
        rounds[m].kept_out = {x: "mask_check_liar in round 1" for x in LIARS}
    deals = {m: rounds[m].deal(codec.encode(np.full(6, 0.1))) for m in names}
    assert all(x not in deals[m] for m in HONEST for x in LIARS)
    for m in names:
        for dealer in names:
            if m in deals[dealer]:
                rounds[m].file_deal(dealer, decode_secagg(deals[dealer][m], 7, deal=True))
    checks = {m: rounds[m].check() for m in names}
    for x in LIARS:
        sr = rounds[x]
        msg = decode_secagg(checks[x], 7)
        p = from_bytes(msg.pieces[0])
        vals = p.values.copy()
        vals[7:] = np.random.default_rng(names.index(x)).integers(0, F.P, size=7, dtype=np.uint64)
        checks[x] = encode_secagg(SecAgg("check", (to_bytes(Piece(1, p.kind, 0, sr.i, vals)),),
                                         tuple(range(1, 8))))
    for m in HONEST:
        sr = rounds[m]
        sr.degree2({k: v for k, v in checks.items() if k != m})
        assert sr.out.reason is None, (sr.out.reason, sr.out.detail)
        assert sr.entered == (1, 2, 3, 4, 5) and sr.openers == (1, 2, 3, 4, 5), \
            (sr.entered, sr.openers)
        assert all(sr.out.named[x].startswith("kept_out") for x in LIARS), sr.out.named
    assert calls == [], calls
    # the same checks read by a member that keeps nobody out: the liars' claims on the
    # honest dealings are void there too (the commitments say so, not its own list)
    fresh = SecureRound("bank-0", names, 2, "sum_only", codec, 1, cid)
    fresh.vectors, fresh.masks, fresh.commitments = (dict(rounds["bank-0"].vectors),
                                                     dict(rounds["bank-0"].masks),
                                                     dict(rounds["bank-0"].commitments))
    fresh._bodies["check"] = checks["bank-0"]
    fresh.degree2({k: v for k, v in checks.items() if k != "bank-0"})
    assert fresh.entered == rounds["bank-0"].entered and fresh.openers == rounds["bank-0"].openers
    assert calls == [], calls


def test_a_commitment_slot_kept_out_voids_that_holders_claim_only():
    """Dealer 1 kept holder 6 out (KEPT_OUT in slot 6); dealer 2 did not. Holder 6's claim on
    dealing 1 is void, on dealing 2 it stands; a dealer whose commitment we lack (we do not
    hold its dealing) voids nothing."""
    digest = bytes(range(1, 33))
    com1 = b"".join(secure_kept.KEPT_OUT if j == 6 else digest for j in range(1, 8))
    com2 = digest * 7
    held = {6: {1, 2, 3}, 5: {1, 2, 3}}
    got = secure_kept.void_claims({1: com1, 2: com2}, held)
    assert got == {6: {2, 3}, 5: {1, 2, 3}}
    assert held[6] == {1, 2, 3}  # the input is not changed


def test_an_honest_round_keeps_nobody_out():
    net = SecureNet(5, 1, variant="distances", rounds=2).run()
    for m in net.names:
        assert net.outcome(m, 1).ok and not net.outcome(m, 1).named
        assert net.members[m].secure.proven == {}

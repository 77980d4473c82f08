"""The agreement step of a secure round (review finding C2, docs/privacy-secure.md "The
agreement step"), attacked through the real round (tests/test_secure_round.py's SecureNet:
each member's RoundMachine and SecureRounds, every message signed with the member's own
key and read by a real Verifier).

The split-view attack (the review's attack_split.py, made to work past the 3t + 1 opener
floor): n = 4, t = 1, variant sum_only (2t + 1 = 3 openers). The hostile bank-3 deals
bank-2 a piece other than the one it committed to (bank-2 refuses it, `bad_piece`: an
honest member that genuinely lacks bank-3's dealing and sends its check in time), then
sends two different correctly signed check messages: the honest one to bank-0 and bank-2
(bank-3's dealing is lacked by bank-2 alone, at most t: it enters, and bank-0 opens the sum
of all four with bank-1 and bank-3), and to bank-1 one that claims not to hold its own
dealing (lacked by two, more than t: it stays out, and bank-1 opens the sum of bank-0,
bank-1, bank-2). From the two sums bank-3 would get their difference. With the agreement
step no honest member opens for two selections, and bank-3 is named.

(Before review s5 R4 the view sent to bank-1 claimed not to hold bank-2's dealing and the
entry dropped it on bank-3's word: the difference of the two sums was bank-2's
contribution. The entry now drops only a dealing more than t check senders lack
(node/runtime/secure_entry.py), so a split can only move a dealing some honest member
genuinely lacks, here the hostile's own; the agreement is tested on that split.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.envelope import decode_outer
from node.runtime.secure_round import (
    AGREE_PHASE,
    CHECK_PHASE,
    SUM_PHASE,
    agreement_quorum,
    body_digest,
    challenge,
)
from node.secagg import field as F
from node.secagg import robust
from node.secagg.encoding import signed
from node.secagg.pieces import CHECK, Piece, from_bytes, to_bytes
from node.secagg.shamir import decode
from tests.helpers import consortium, keys, verifier_for
from tests.test_secure_round import SecureNet, deal_one_refused_piece, deal_one_wrong_piece

HOSTILE, VICTIM, A, B = "bank-3", "bank-2", "bank-0", "bank-1"
REFUSER = VICTIM  # the split view's honest holder that refuses bank-3's piece


def _split_view_attack() -> tuple[SecureNet, dict]:
    dealt: dict = {}  # "sr": bank-3's round (its pieces, kept after the close)

    def tamper_deal(net, m, r, deals):
        if m != HOSTILE:
            return deals
        dealt["sr"] = net.members[m].secure.round(r)
        return deal_one_refused_piece(net, m, r, deals, REFUSER)

    def tamper_to(net, m, phase, to, body):
        if m != HOSTILE or phase != CHECK_PHASE or to != B:
            return body
        sr = net.members[m].secure.round(0)
        held = (1, 2, 3)  # claims not to hold its own dealing
        total = np.zeros(8, dtype=np.uint64)
        for i in held:  # an honest check of every other dealing: only the held list lies
            total += robust.check_piece(sr.params, sr.i, sr.vectors, sr.masks, (i,), challenge(
                net.cid, 0, i, sr.commitments[i])).values
        piece = Piece(0, CHECK, 0, sr.i, total)
        return encode_secagg(SecAgg(CHECK_PHASE, (to_bytes(piece),), held))

    net = SecureNet(4, 1, variant="sum_only", tamper_deal=tamper_deal, tamper_to=tamper_to).run()
    return net, dealt


def _opened(net: SecureNet, m: str) -> bool:
    """Whether member m broadcast a piece of the sum (not an empty "abstain")."""
    data = net.members[m].sent.get((0, SUM_PHASE))
    return data is not None and bool(decode_secagg(decode_outer(data).body, 4).pieces)


def test_a_split_view_never_opens_two_different_sums():
    """The attack above. Without the agreement step bank-0 opened its piece of the sum over
    all four and bank-1 its piece of the sum over bank-0, bank-1, bank-2 (both views have
    their 2t + 1 openers: checked below). Now an honest member opens only with a quorum of
    matching agreements; the two views cannot both have one, and bank-3 is named by the
    member whose view it split."""
    net, dealt = _split_view_attack()
    honest = (A, B, REFUSER)
    outs = {m: net.outcome(m) for m in honest}
    # the split took, on a genuine lack: bank-2 refused bank-3's piece and still checked
    assert outs[REFUSER].named.get(HOSTILE, "").startswith("bad_piece"), outs[REFUSER].named
    assert net.members[REFUSER].sent.get((0, CHECK_PHASE)) is not None
    assert outs[A].entered == ("bank-0", "bank-1", "bank-2", "bank-3"), outs[A].entered
    assert outs[B].entered == ("bank-0", "bank-1", "bank-2"), outs[B].entered
    # both views passed the entry with their 2t + 1 openers: bank-0's view reached a quorum
    # (bank-0, bank-2, bank-3) and opened; bank-1's failed at the agreement (below), not at
    # the entry. bank-0's sum then lacks bank-1's piece (too_few_openers at the decode).
    assert _opened(net, A) and outs[A].selected == outs[A].entered, (outs[A].reason,
                                                                     outs[A].detail)
    opened = {m: outs[m].selected for m in honest if _opened(net, m)}
    if len(set(opened.values())) > 1:  # bank-3 decodes both sums and subtracts
        hs = dealt["sr"]
        sums = []
        for m, sel in opened.items():
            sel_i = tuple(net.names.index(s) + 1 for s in sel)
            theirs = from_bytes(decode_secagg(decode_outer(
                net.members[m].sent[(0, SUM_PHASE)]).body, 4).pieces[0])
            mine = robust.sum_piece(hs.params, hs.i, hs.vectors, sel_i)
            sums.append(decode({net.names.index(m) + 1: theirs.values, hs.i: mine.values},
                               1).value)  # t + 1 = 2 pieces of a degree-1 sharing
        raise AssertionError(f"two selections opened {opened}: bank-3 holds both sums "
                             f"(their difference: {signed(F.sub(sums[0], sums[1]))[:3]}...)")
    for (m, other) in ((A, B), (B, A)):  # each saw the other's agreement disagree on bank-3's
        # check: that is the other's claim (split_claim, filed under it with bank-3's check as
        # it reached us), never proof against bank-3 (review 2 F1: one member could aim it at
        # any honest member)
        assert outs[m].named.get(other, "").startswith("split_claim"), outs[m].named
        assert HOSTILE in outs[m].claims[other] and other in outs[m].disagreed[other]
        assert all(why.startswith("split_claim") for w, why in outs[m].named.items()
                   if w in honest), outs[m].named
    # bank-3's own agreement to bank-1 reports its check otherwise than it signed: a proof
    assert outs[B].named.get(HOSTILE, "").startswith("split_view"), outs[B].named
    # bank-1 (bank-3's other view) has no quorum: it opened nothing, the round failed there
    assert not _opened(net, B) and outs[B].reason == "no_agreement", (outs[B].reason,
                                                                      outs[B].detail)


def test_an_untampered_round_agrees_and_opens():
    """Without the attack every member's agreement matches: the round opens at all."""
    net = SecureNet(4, 1, variant="sum_only").run()
    for m in net.names:
        o = net.outcome(m)
        assert o.ok and not o.named, (o.reason, o.detail, o.named)
        assert _opened(net, m)


def test_the_quorum_makes_any_two_quorums_share_an_honest_member():
    """q = ceil((n + t + 1) / 2): two quorums overlap in 2q - n >= t + 1 members, so at
    least one honest member (who signs one agreement a round) is in both."""
    for n in range(1, 40):
        for t in range(0, (n - 1) // 2 + 1):
            q = agreement_quorum(n, t)
            assert q <= n and 2 * q - n >= t + 1
            assert 2 * (q - 1) - n < t + 1  # the least such
    assert agreement_quorum(4, 1) == 3 and agreement_quorum(8, 2) == 6
    assert AGREE_PHASE == "agree"


@pytest.mark.parametrize("step,size", [(AGREE_PHASE, 32 * 9), ("enter", 32 * 5)])
def test_a_restart_mid_agreement_resends_the_same_bytes(tmp_path, step, size):
    """The agreement (and the entry agreement) is stored (outbox/round-N.agree, .enter)
    before it leaves; a restarted member whose view changed re-sends the stored message
    byte for byte, and its round reads that one as ours (never a second, different
    agreement: two would let two quorums form)."""
    import asyncio
    from types import SimpleNamespace

    from gossip.envelope import KIND_SECAGG, pack
    from gossip.protocol import events as ev
    from node.runtime import secure_node
    from node.runtime.state import StateDir
    from tests.helpers import keys

    key, seq = keys(1)[0], iter(range(100))
    before = encode_secagg(SecAgg(step, (b"\x01" * size,)))
    after = encode_secagg(SecAgg(step, (b"\x02" * size,)))

    class Rounds:  # the round's own computation of the step: another body after the restart
        def __init__(self, body: bytes):
            self.body, self.kept = body, {}

        def phase(self, r, phase, got, deals, reveals=None):
            self.thread = threading.get_ident()
            return self.body

        def keep_own(self, r, phase, body):
            self.kept[(r, phase)] = bytes(body)

        def round(self, r):  # no disputes: nothing to reveal
            return SimpleNamespace(members=("site-0", "site-1", "site-2", "site-3"),
                                   my_disputes=lambda: ())

    def run(body: bytes) -> tuple[list[bytes], Rounds]:
        sent: list[bytes] = []
        rounds = Rounds(body)

        async def broadcast(r, data):
            sent.append(data)

        async def in_background(coro, what):
            await coro

        node = SimpleNamespace(
            name="site-0", state=StateDir(tmp_path / "state"),
            secure=SimpleNamespace(rounds=rounds, restored={}),
            book=SimpleNamespace(shares=lambda r: {}, neighbours={"site-1", "site-2"}),
            signer=SimpleNamespace(sealing=SimpleNamespace(own=None)),
            _sign=lambda kind, r, b: pack(key, b"c" * 32, kind, r, next(seq), b),
            _broadcast=broadcast, _in_background=in_background)
        asyncio.run(secure_node.send_phase(node, ev.SendPhase(3, step,
                                                              ("site-1", "site-2"))))
        return sent, rounds

    (tmp_path / "state" / "outbox").mkdir(parents=True)
    first, _ = run(before)
    path = secure_node.step_path(SimpleNamespace(state=StateDir(tmp_path / "state")), 3, step)
    assert path.name == f"round-00000003.{step}" and path.read_bytes() == first[0]
    env = decode_outer(first[0])
    assert (env.kind, env.round, bytes(env.body)) == (KIND_SECAGG, 3, before)
    again, rounds = run(after)  # the restarted member's view changed
    assert again == first  # the stored message, byte for byte
    assert rounds.kept == {(3, step): before}
    # the step (decoding, judging: its cost is the peers' to choose) ran off the event loop
    assert rounds.thread != threading.get_ident()


def test_a_member_whose_stored_agreement_differs_opens_nothing():
    """After a restart the round reads the stored agreement as ours (keep_own); when it is
    not the one the round computes now, the member opens no sum piece (agreement_changed),
    and the others, who see the same bodies with another outcome, name it."""
    changed = "bank-1"

    def tamper(net, m, phase, body):
        if m != changed or phase != AGREE_PHASE:
            return body
        statement = bytearray(decode_secagg(body, 4).pieces[0])
        statement[0] ^= 1  # another outcome over the same bodies
        other = encode_secagg(SecAgg(AGREE_PHASE, (bytes(statement),)))
        net.members[m].secure.keep_own(0, AGREE_PHASE, other)  # as the node does on restart
        return other

    net = SecureNet(4, 1, variant="sum_only", tamper_open=tamper).run()
    o = net.outcome(changed)
    assert o.reason == "agreement_changed" and not _opened(net, changed), (o.reason, o.detail)
    # the three others opened: it knows its model now differs from theirs, and says so
    assert o.missed == tuple(sorted((A, VICTIM, HOSTILE))), o.missed
    for m in (A, VICTIM, HOSTILE):  # 3 = q agree without it: the round opens
        out = net.outcome(m)
        assert out.named[changed].startswith("bad_agreement"), out.named
        assert _opened(net, m)


def test_a_split_view_is_kept_as_evidence_with_both_signed_sides(tmp_path):
    """The attack above through the node's evidence: the named member's signed check as it
    reached us, the disagreeing member's signed agreement and ours are written under
    state/evidence/secure/ byte for byte (anyone with the consortium's keys can check)."""
    from types import SimpleNamespace

    from gossip.envelope import KIND_SECAGG, Accepted
    from node.runtime import secure_node
    from node.runtime.state import StateDir

    net, _ = _split_view_attack()
    me = net.members[A]
    out = net.outcome(A)
    state = StateDir(tmp_path / "state")
    (tmp_path / "state" / "outbox").mkdir(parents=True)
    sec = SimpleNamespace(signed={}, restored={})
    verifier = verifier_for(net.cons, net.sks[0], secure=True)  # bank-0's own, fresh
    node = SimpleNamespace(name=A, state=state, secure=sec)
    secure_node.step_path(node, 0, AGREE_PHASE).write_bytes(me.sent[(0, AGREE_PHASE)])
    for sender in (HOSTILE, *out.disagreed[B]):
        m = net.members[sender]
        for step in (CHECK_PHASE, AGREE_PHASE):
            data = m.sent[(0, step)]
            if sender == HOSTILE and step == CHECK_PHASE:
                data = next(d for s, to, d in net.delivered if s == HOSTILE and to == A
                            and decode_outer(d).kind == KIND_SECAGG
                            and decode_secagg(decode_outer(d).body, 4).step == CHECK_PHASE)
            acc = verifier.verify(data, 0)
            assert isinstance(acc, Accepted)
            secure_node.keep_signed_step(node, acc, data)
    kept = secure_node.keep_split_evidence(node, 0, B, out)  # bank-1's split_claim
    files = {p.rsplit("/", 1)[1]: (tmp_path / "state" / p).read_bytes() for p in kept}
    assert files[f"agree-{A}"] == me.sent[(0, AGREE_PHASE)]
    assert files[f"agree-{B}"] == net.members[B].sent[(0, AGREE_PHASE)]
    # bank-3's check as bank-0 got it: not the one bank-1 got, whose digest bank-1 signed
    theirs = decode_secagg(decode_outer(files[f"agree-{B}"]).body, 4).pieces[0]
    got = body_digest(decode_outer(files[f"check-{HOSTILE}"]).body)
    assert theirs[32 * (1 + 2 * 3):32 * (2 + 2 * 3)] != got


def test_an_agreement_is_bounded_before_it_is_copied_and_refused_in_a_plain_consortium():
    """32 (1 + 2n) bytes at most (gossip/bodies.py secagg_piece_limits), checked before the
    bytes are copied; a plain consortium refuses it as the other round mode's (wrong_kind),
    after checking the signature."""
    import pytest

    from gossip import envelope as E
    from gossip.errors import RemoteError
    from tests.helpers import consortium, keys

    ok = encode_secagg(SecAgg(AGREE_PHASE, (bytes(32 * 9),)))
    assert decode_secagg(ok, 4).pieces == (bytes(32 * 9),)
    with pytest.raises(RemoteError, match="agree piece 0"):
        decode_secagg(encode_secagg(SecAgg(AGREE_PHASE, (bytes(32 * 9 + 1),))), 4, "bank-3")
    ks = keys(4)
    cons = consortium(ks)
    plain = verifier_for(cons, ks[0], secure=False)
    with pytest.raises(RemoteError) as exc:
        plain.verify(E.pack(ks[3], cons.id, E.KIND_SECAGG, 0, 1, ok), current_round=0)
    assert exc.value.reason == "wrong_kind" and "bank-3" in str(exc.value)


def _stores(tmp_path, members) -> dict:
    """What secure_node.receive stores a filed step with (node/runtime/secure_deals.py
    keep_step): the state dir, the step's bound's inputs."""
    from types import SimpleNamespace

    import torch

    from node.runtime.state import StateDir

    return {"name": "bank-0", "state": StateDir(tmp_path / "state"), "model": torch.nn.Linear(3, 1),
            "consortium": SimpleNamespace(members=members),
            "cfg": SimpleNamespace(gossip=SimpleNamespace(max_envelope_bytes=1 << 20))}


def test_every_secure_step_message_gets_an_audit_line_accepted_or_dropped(tmp_path):
    """Review finding M2: a verified secagg message the machine files is an "accepted"
    line (where: its step); one it would drop unseen (late, too far ahead) is a named
    refusal line and counted; one the machine refuses (a second, different message) is
    not called accepted (the refusal is the machine's line)."""
    from collections import Counter
    from types import SimpleNamespace

    from gossip import envelope as E
    from gossip.protocol import events as ev
    from node.runtime import secure_node

    ks = keys(4)
    cons = consortium(ks)
    lines: list = []
    filed: dict = {}

    def phase_message(msg, now):
        held = filed.setdefault((msg.round, msg.phase, msg.sender), msg.body)
        return [] if held == msg.body else [ev.Refused(msg.round, msg.sender, "equivocation",
                                                       "a second, different message")]

    node = SimpleNamespace(
        secure=SimpleNamespace(signed={}, audited={}, rounds=SimpleNamespace(variant="sum_only")),
        counters=SimpleNamespace(rejected=Counter()),
        audit=SimpleNamespace(write=lines.append),
        book=SimpleNamespace(current=5, lookahead=3, neighbours={"bank-1", "bank-2", "bank-3"}),
        machine=SimpleNamespace(phase_message=phase_message,
                                phases=secure_node.secure_phases("sum_only")),
        **_stores(tmp_path, cons.members))
    v = verifier_for(cons, ks[0], secure=True)
    seq = iter(range(1, 100))

    def deliver(r, step, body=b""):
        body = body or encode_secagg(SecAgg(step, ()))
        data = E.pack(ks[3], cons.id, E.KIND_SECAGG, r, next(seq), body)
        return secure_node.receive(node, v.verify(data, 5), 0.0, data, None)

    deliver(5, CHECK_PHASE)
    deliver(4, CHECK_PHASE)  # late: the machine drops it
    deliver(9, AGREE_PHASE)  # beyond the lookahead
    deliver(5, CHECK_PHASE, encode_secagg(SecAgg(CHECK_PHASE, (), (1,))))  # a second, different
    deliver(5, "enter")  # sum_only rounds have no entry step
    got = [(type(x).__name__, x.round, x.kind, getattr(x, "where", getattr(x, "reason", None)))
           for x in lines]
    assert got == [("Accepted", 5, "secagg", "check"), ("Refused", 4, "secagg", "late_check"),
                   ("Refused", 9, "secagg", "too_far"), ("Refused", 5, "secagg", "no_phase")], got
    assert node.counters.rejected == Counter({"late_check": 1, "too_far": 1, "no_phase": 1})


def test_re_signed_copies_of_a_step_message_get_one_accepted_line(tmp_path):
    """Review 2 F14: bank-3 (its real key) re-signs one check body 200 times with fresh
    sequence numbers; every copy verifies and bank-0's real RoundMachine files it without a
    refusal. Before, each wrote an `accepted` audit line (rotating the rounds' aggregate
    lines out of the audit); now one line per (sender, round, step), the copies counted."""
    from collections import Counter
    from types import SimpleNamespace

    from gossip import envelope as E
    from node.runtime import secure_node
    from tests.test_secure_round import SecureNet

    net = SecureNet(4, 1, variant="sum_only")
    me, hostile = net.members["bank-0"], net.members["bank-3"]
    for m in net.members.values():
        m.run(m.m.start(0.0))
    lines: list = []
    node = SimpleNamespace(
        secure=SimpleNamespace(signed={}, audited={}, rounds=SimpleNamespace(variant="sum_only")),
        counters=SimpleNamespace(rejected=Counter()), audit=SimpleNamespace(write=lines.append),
        book=SimpleNamespace(current=0, lookahead=2, neighbours={"bank-1", "bank-2", "bank-3"}),
        machine=me.m, **_stores(tmp_path, list(net.members)))
    body = encode_secagg(SecAgg(CHECK_PHASE, ()))
    for _ in range(200):
        data = hostile.pack(E.KIND_SECAGG, 0, body)  # a fresh seq each time
        secure_node.receive(node, me.verifier.verify(data, 0), 0.0, data, None)
    accepted = [x for x in lines if type(x).__name__ == "Accepted"]
    assert len(accepted) == 1 and accepted[0].member == "bank-3", lines[:3]
    assert node.counters.rejected["duplicate_step"] == 199


def _wrong_piece_for(victim: str, dealer: str = HOSTILE):
    """A dealer's tamper: one wrong value in `victim`'s vector piece, committed to."""
    def tamper_deal(net, m, r, deals):
        return deal_one_wrong_piece(net, m, r, deals, victim) if m == dealer else deals
    return tamper_deal


def test_a_dispute_is_settled_against_the_dealer_by_the_piece_it_signed():
    """bank-3 deals bank-2 a wrong value (committed to, so bank-2 holds it): bank-2's check
    disagrees, a dispute. bank-2 reveals the deal bank-3 signed for it with its agreement;
    every member checks it and names bank-3 (bad_dealing, a proof), not bank-2. Before,
    bank-2 was named with the dispute's claim and bank-3 not at all."""
    net = SecureNet(4, 1, variant="sum_only", tamper_deal=_wrong_piece_for(VICTIM)).run()
    for m in (A, B):
        o = net.outcome(m)
        assert o.ok, (o.reason, o.detail)
        assert o.named.get(HOSTILE, "").startswith("bad_dealing"), o.named
        assert VICTIM not in o.named, o.named


def test_a_false_dispute_is_settled_against_the_holder():
    """bank-2 (its real key) opens a wrong check of bank-0's honest dealing: a dispute. The
    deal bank-0 signed for bank-2, revealed, gives the check value the other holders agree
    on: bank-2 is named false_dispute, bank-0 not at all. Revealing nothing instead:
    dispute_unbacked."""
    def wrong_check(net, m, phase, body):
        if m != VICTIM or phase != CHECK_PHASE:
            return body
        msg = decode_secagg(body, 4)
        p = from_bytes(msg.pieces[0])
        vals = p.values.copy()
        vals[0] = (int(vals[0]) + 1) % F.P  # its check of bank-0's vector
        body = encode_secagg(SecAgg(CHECK_PHASE, (to_bytes(Piece(p.round, CHECK, 0, p.holder,
                                                                   vals)),), msg.held))
        net.members[m].secure.keep_own(0, CHECK_PHASE, body)  # what it sent is its own
        return body

    def and_no_reveal(net, m, phase, body):
        body = wrong_check(net, m, phase, body)
        if m == VICTIM and phase == AGREE_PHASE:
            msg = decode_secagg(body, 4)
            return encode_secagg(SecAgg(AGREE_PHASE, msg.pieces[:1]))
        return body

    for tamper, why in ((wrong_check, "false_dispute"), (and_no_reveal, "dispute_unbacked")):
        net = SecureNet(4, 1, variant="sum_only", tamper_open=tamper).run()
        for m in (A, B, HOSTILE):
            o = net.outcome(m)
            assert o.ok, (o.reason, o.detail)
            assert o.named.get(VICTIM, "").startswith(why), (why, o.named)
            assert A not in o.named, o.named


def test_a_sealed_deal_is_revealed_by_its_key_alone():
    """The seal's reveal (gossip/seal.py share_key, open_with_key): the recipient's key of one
    sealed deal opens it for anyone; a wrong key, or the body under another sender's or
    round's associated data, does not."""
    import pytest

    from gossip.errors import RemoteError
    from gossip.seal import PrekeyStore, SignedPrekey, open_with_key, seal, seal_ad, share_key

    store = PrekeyStore()
    private = store.rotate(0)
    pre = SignedPrekey(b"m" * 32, 0, bytes(private.public_key), b"s" * 64)
    head, ct = seal(b"the deal", {"bank-2": pre}, seal_ad(b"c" * 32, b"d" * 32, 4))
    body = head + ct
    key = share_key(body, store)
    assert open_with_key(body, key, seal_ad(b"c" * 32, b"d" * 32, 4)) == b"the deal"
    with pytest.raises(RemoteError, match="commits to"):
        open_with_key(body, bytes(32), seal_ad(b"c" * 32, b"d" * 32, 4))
    with pytest.raises(RemoteError, match="revealed key failed"):
        open_with_key(body, key, seal_ad(b"c" * 32, b"e" * 32, 4))


def test_the_node_reveals_a_sealed_deal_and_another_node_verifies_it(tmp_path):
    """node/runtime/secure_node.py with real sealing: bank-2 is in dispute with bank-3's
    dealing; its agreement carries the key of bank-3's sealed deal and the signed envelope;
    bank-0 reads back exactly the deal bank-3 signed. A reveal with another key, or a deal
    not signed by its sender, is no proof (the holder's fault), named by dealer."""
    from types import SimpleNamespace

    from gossip import envelope as E
    from gossip.seal import PrekeyStore, SignedPrekey, seal, seal_ad
    from node.runtime import secure_node
    from node.runtime.secure_round import SecureRounds
    from node.runtime.state import StateDir

    ks = keys(4)
    cons = consortium(ks)
    names = [m.name for m in cons.members]
    store = PrekeyStore()
    pre = SignedPrekey(bytes(ks[2].verify_key), 0, bytes(store.rotate(0).public_key), b"s" * 64)
    codec = SecureNet(4, 1).codec
    dealer = SecureRounds(names[3], names, 1, "sum_only", codec, cons.id)
    plain = dealer.deal(0, codec.encode(np.zeros(codec.dim)))[names[2]]
    sealed = seal(plain, {names[2]: pre}, seal_ad(cons.id, bytes(ks[3].verify_key), 0))
    data = E.pack(ks[3], cons.id, E.KIND_DEAL, 0, 1, sealed)
    acc = SimpleNamespace(envelope=E.decode_outer(data))

    holder = SecureRounds(names[2], names, 1, "sum_only", codec, cons.id)
    holder.round(0).disputes[(4, 3)] = {1: 0}  # bank-2 (3) disputes bank-3's (4) dealing
    node = SimpleNamespace(
        name=names[2], consortium=cons, secure=SimpleNamespace(rounds=holder, restored={}),
        state=StateDir(tmp_path / "state"),  # no stored deals: the book's alone
        book=SimpleNamespace(shares=lambda r: {names[3]: acc}),
        signer=SimpleNamespace(sealing=SimpleNamespace(own=store, peers={})))
    statement = bytes(32 * 9)
    body = secure_node.with_reveals(node, 0, encode_secagg(SecAgg(AGREE_PHASE, (statement,))))
    msg = decode_secagg(body, 4, dim=codec.dim)  # within the wire's bound for a reveal
    assert msg.pieces[0] == statement and len(msg.pieces) == 2
    got = secure_node.read_reveals(node, 0, {names[2]: body})
    assert got == {(3, 4): decode_secagg(plain, 4, deal=True)}

    wrong = encode_secagg(SecAgg(AGREE_PHASE, (statement, bytes(32) + msg.pieces[1][32:])))
    got = secure_node.read_reveals(node, 0, {names[2]: wrong})
    assert "no proof" in got[(3, 4)] and "commits to" in got[(3, 4)]
    forged = E.pack(ks[1], cons.id, E.KIND_DEAL, 0, 1, sealed)  # bank-1 signs bank-3's deal
    bad = encode_secagg(SecAgg(AGREE_PHASE, (statement, msg.pieces[1][:32] + forged)))
    got = secure_node.read_reveals(node, 0, {names[2]: bad})
    assert "no proof" in got[(3, 2)]  # the signer's deal: its seal's data does not open


def test_a_colluder_revealing_its_accomplices_deal_is_named_not_the_dealer():
    """Review 2 F2, part 2 (real keys, n = 7, t = 2): bank-6 opens a check whose bank-0
    column is off (a dispute with honest bank-0) and reveals the deal bank-0 signed for
    its accomplice bank-5. Before, every member named bank-0 `bad_dealing` with its own
    signature as the "proof" and dropped bank-6's claim; now the pieces miss bank-6's slot
    of bank-0's commitment: bank-6 chose them, `bad_reveal`, and bank-0 is not named."""
    from node.runtime.evidence import envelope_bytes

    hostile, accomplice, victim = "bank-6", "bank-5", "bank-0"

    def tamper(net, m, phase, body):
        if m != hostile:
            return body
        msg = decode_secagg(body, 7)
        if phase == CHECK_PHASE:
            p = from_bytes(msg.pieces[0])
            vals = p.values.copy()
            d = net.names.index(victim)
            vals[d] = (int(vals[d]) + 1) % F.P
            return encode_secagg(SecAgg(CHECK_PHASE, (to_bytes(Piece(p.round, p.kind, p.owner,
                                                                       p.holder, vals)),), msg.held))
        if phase == AGREE_PHASE:
            env = net.members[accomplice].book.shares(0)[victim].envelope
            return encode_secagg(SecAgg(AGREE_PHASE, (msg.pieces[0], bytes(32) + envelope_bytes(env))))
        return body

    net = SecureNet(7, 2, variant="sum_only", tamper_open=tamper).run()
    for m in ("bank-1", "bank-2", "bank-3", "bank-4", victim):
        o = net.outcome(m)
        assert victim not in o.named, (m, o.named)
        assert o.named.get(hostile, "").startswith("bad_reveal"), (m, o.named)


def test_a_reveal_of_a_deal_sealed_to_another_member_is_no_proof():
    """Review 2 F2, part 1 (real seal, bank-3's real key): bank-6's agreement carries the
    deal bank-3 sealed to bank-2, with its key (bank-2 handed it over). It is not bank-6's
    deal: read_reveals files it as bank-6's fault, never as bank-3's signed proof."""
    from types import SimpleNamespace

    from gossip import envelope as E
    from gossip.seal import PrekeyStore, SignedPrekey, seal, seal_ad, share_key
    from node.runtime import secure_node
    from node.runtime.evidence import envelope_bytes
    from node.runtime.secure_round import SecureRounds

    ks = keys(7)
    cons = consortium(ks)
    names = [m.name for m in cons.members]
    stores = {k: PrekeyStore() for k in (2, 6)}
    pre = {k: SignedPrekey(bytes(ks[k].verify_key), 0, bytes(s.rotate(0).public_key), b"s" * 64)
           for k, s in stores.items()}
    codec = SecureNet(7, 2).codec
    dealer = SecureRounds(names[3], names, 2, "sum_only", codec, cons.id)
    deals = dealer.deal(0, codec.encode(np.zeros(codec.dim)))
    ad = seal_ad(cons.id, bytes(ks[3].verify_key), 0)
    judge = SimpleNamespace(name=names[0], consortium=cons, signer=SimpleNamespace(
        sealing=SimpleNamespace(own=PrekeyStore(), peers={names[k]: {0: p} for k, p in pre.items()})))
    for k, expect in ((2, "sealed to another member"), (6, None)):  # bank-2's deal; bank-6's own
        env = E.decode_outer(E.pack(ks[3], cons.id, E.KIND_DEAL, 0, 1,
                                    seal(deals[names[k]], {names[k]: pre[k]}, ad)))
        key = share_key(env.body, stores[k])
        agree = encode_secagg(SecAgg(AGREE_PHASE, (bytes(32 * 15), key + envelope_bytes(env))))
        got = secure_node.read_reveals(judge, 0, {names[6]: agree})[(7, 4)]
        if expect is None:
            assert got == decode_secagg(deals[names[6]], 7, deal=True)
        else:
            assert isinstance(got, str) and expect in got, got


def test_the_sum_is_opened_off_the_event_loop(monkeypatch):
    """At Close the driver awaits closing.aggregate_off_loop: the sum's decoding (what the
    peers' pieces make it cost) runs in a worker thread, then the synchronous aggregate
    applies the outcome it left (secure_node.open_sum) on the loop."""
    import asyncio
    from types import SimpleNamespace

    from gossip.protocol import events as ev
    from node.runtime import closing, secure_node
    from node.runtime.secure_round import SecureOutcome

    seen: dict = {}

    class Rounds:
        def close(self, r, phases):
            seen["close"] = threading.get_ident()
            return SecureOutcome(r, False, reason="no_agreement")

    node = SimpleNamespace(secure=secure_node.Secure(rounds=Rounds(), codec=None, outcomes={}))
    monkeypatch.setattr(closing, "aggregate", lambda n, c: seen.setdefault(
        "aggregate", (threading.get_ident(), dict(n.secure.opened))))

    async def main():
        seen["loop"] = threading.get_ident()
        await closing.aggregate_off_loop(node, ev.Close(2, {}, (), "all"))

    asyncio.run(main())
    assert seen["close"] != seen["loop"]  # decoded in a worker thread
    thread, opened = seen["aggregate"]
    assert thread == seen["loop"] and opened[2].reason == "no_agreement"


def _frame_others(victims):
    """bank-6 (its real key) flips the check digest of each of `victims` in the agreement it
    sends every member but that victim (who alone could tell it is false): review 2 F1/F6."""
    def tamper_to(net, m, phase, to, body):
        if m != "bank-6" or phase != AGREE_PHASE:
            return body
        msg = decode_secagg(body, 7)
        st = bytearray(msg.pieces[0])
        for v in victims:
            if v != to:
                i = net.names.index(v) + 1
                st[32 * (1 + 2 * (i - 1))] ^= 1  # v's check digest
        return encode_secagg(SecAgg(AGREE_PHASE, (bytes(st), *msg.pieces[1:])))
    return tamper_to


def test_one_member_cannot_frame_an_honest_member_as_a_splitter():
    """Review 2 F1 (n = 7, t = 2): bank-6's agreement misreports honest bank-0's check.
    Before, bank-1..bank-5 named bank-0 `split_view` on bank-6's word and bank-6 nobody;
    now the claim is bank-6's (`split_claim`, about bank-0), bank-0 is named by nobody,
    and the round opens."""
    net = SecureNet(7, 2, variant="sum_only", tamper_to=_frame_others(["bank-0"])).run()
    for m in ("bank-1", "bank-2", "bank-3", "bank-4", "bank-5"):
        o = net.outcome(m)
        assert o.ok, (m, o.reason, o.detail)
        assert "bank-0" not in o.named, (m, o.named)
        assert o.named.get("bank-6", "").startswith("split_claim"), (m, o.named)
        assert o.claims["bank-6"] == ("bank-0",)


def test_framing_every_member_keeps_one_copy_of_the_claim_per_round(tmp_path):
    """Review 2 F6: bank-6 misreports every other member's check to each recipient. Before,
    bank-1 named bank-0, bank-2, ... bank-5 and wrote bank-6's agreement once per named
    member; now bank-6 alone is named and its signed agreement is stored once, under the
    round's folder, with the bodies it claims about as they reached bank-1."""
    from types import SimpleNamespace

    from node.runtime import secure_evidence
    from node.runtime.state import StateDir

    names = [f"bank-{k}" for k in range(6)]
    net = SecureNet(7, 2, variant="sum_only", tamper_to=_frame_others(names)).run()
    me, out = net.members["bank-1"], net.outcome("bank-1")
    assert out.ok and set(out.named) == {"bank-6"}, out.named
    assert set(out.claims["bank-6"]) == set(names) - {"bank-1"}
    (tmp_path / "state" / "outbox").mkdir(parents=True)
    verifier = verifier_for(net.cons, net.sks[1], secure=True)
    node = SimpleNamespace(name="bank-1", state=StateDir(tmp_path / "state"),
                           secure=SimpleNamespace(signed={}))
    secure_evidence.step_path(node, 0, AGREE_PHASE).write_bytes(me.sent[(0, AGREE_PHASE)])
    for _, to, data in net.delivered:
        if to == "bank-1" and decode_outer(data).kind == "secagg":
            secure_evidence.keep_signed_step(node, verifier.verify(data, 0), data)
    kept = secure_evidence.keep_evidence(node, 0, out, {})
    files = sorted(p.name for p in (tmp_path / "state" / "evidence").rglob("*") if p.is_file())
    assert set(kept) == {"bank-6"} and files.count("agree-bank-6") == 1, files
    assert {f"check-{m}" for m in set(names) - {"bank-1"}} <= set(files), files
    agree = (tmp_path / "state" / kept["bank-6"][0]).parent / "agree-bank-6"
    assert agree.read_bytes() == next(d for s, to, d in net.delivered if s == "bank-6" and
                                      to == "bank-1" and decode_outer(d).kind == "secagg" and
                                      decode_secagg(decode_outer(d).body, 7).step == AGREE_PHASE)


def test_secure_evidence_stops_at_its_byte_bound(tmp_path, monkeypatch):
    """Review 2 F6: the evidence folder's total bytes are bounded (not a count per member):
    past MAX_SECURE_EVIDENCE_BYTES nothing more is written, the earliest kept."""
    from types import SimpleNamespace

    from node.runtime import secure_evidence
    from node.runtime.secure_round import SecureOutcome
    from node.runtime.state import StateDir

    (tmp_path / "state" / "outbox").mkdir(parents=True)
    node = SimpleNamespace(name="bank-1", state=StateDir(tmp_path / "state"), secure=SimpleNamespace(
        signed={r: {("bank-6", AGREE_PHASE): bytes(300)} for r in range(3)}))
    monkeypatch.setattr(secure_evidence, "MAX_SECURE_EVIDENCE_BYTES", 700)
    out = SecureOutcome(0, True, named={"bank-6": "split_claim: x"}, disagreed={"bank-6": ("bank-6",)})
    kept = [secure_evidence.keep_evidence(node, r, out, {}) for r in range(3)]
    assert [bool(k) for k in kept] == [True, True, False]
    assert sum(p.stat().st_size for p in (tmp_path / "state" / "evidence").rglob("*")
               if p.is_file()) == 600


def test_a_proof_against_a_member_is_not_hidden_by_an_earlier_claim():
    """Review 2 F12's side note: `named` kept the first reason, so a `dispute:` claim hid a
    later proof. bank-6 (its real key) opens a wrong check of bank-0's dealing (a dispute,
    a claim) and its agreement reports its own check with another digest than it signed:
    every member names it `split_view` (the proof), not just `dispute`."""
    def tamper(net, m, phase, body):
        if m != "bank-6":
            return body
        msg = decode_secagg(body, 7)
        if phase == CHECK_PHASE:
            p = from_bytes(msg.pieces[0])
            vals = p.values.copy()
            vals[0] = (int(vals[0]) + 1) % F.P
            body = encode_secagg(SecAgg(CHECK_PHASE, (to_bytes(Piece(p.round, p.kind, p.owner,
                                                                       p.holder, vals)),), msg.held))
            net.members[m].secure.keep_own(0, CHECK_PHASE, body)
            return body
        if phase == AGREE_PHASE:
            st = bytearray(msg.pieces[0])
            st[32 * (1 + 2 * 6)] ^= 1  # its own check's digest
            return encode_secagg(SecAgg(AGREE_PHASE, (bytes(st),)))
        return body

    net = SecureNet(7, 2, variant="sum_only", tamper_open=tamper).run()
    for m in ("bank-0", "bank-1", "bank-2", "bank-3", "bank-4", "bank-5"):
        assert net.outcome(m).named.get("bank-6", "").startswith("split_view"), \
            (m, net.outcome(m).named)

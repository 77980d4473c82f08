"""The entry agreement before the degree-2 opening (issue 22; docs/privacy-secure.md "The
agreement step"), attacked through the real round (tests/test_secure_round.py's SecureNet:
real RoundMachines, every message signed with the member's own key).

The split check against a multi-Krum ("distances") consortium, n = 5, t = 1 (3t + 1 = 4
openers needed): the hostile bank-4 deals bank-2 a piece other than the one it committed
to (bank-2 refuses it, `bad_piece`: an honest member that genuinely lacks bank-4's dealing
and sends its check in time) and sends two correctly signed check messages: the honest one
to bank-0 and bank-3, and to bank-1 and bank-2 one that claims not to hold its own dealing.
In the first view bank-4's dealing is lacked by bank-2 alone (at most t: it may be a liar's
claim, so it is not dropped) and every dealer enters, opened by bank-0, bank-1, bank-3,
bank-4; in the second two check senders lack it (more than t: an honest one does) and it
stays out, opened by all five: bank-0 and bank-1 would open degree-2 pieces (norms and
pairwise distances) over two different entered sets. With the entry agreement neither view
has ceil((n + t + 1) / 2) = 4 matching agreements: no degree-2 piece leaves.

(Before review s5 R4 the split dropped an honest dealing, bank-2's, on bank-4's word alone;
the entry now drops only a dealing more than t check senders lack (secure_entry.py), so a
split can only move a dealing some honest member genuinely lacks: here the hostile's own.)"""

from __future__ import annotations

import numpy as np

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.envelope import decode_outer
from node.runtime.secure_round import (
    CHECK_PHASE,
    DEGREE2_PHASE,
    ENTER_PHASE,
    SUM_ONLY_PHASES,
    agreement_quorum,
    challenge,
    secure_phases,
)
from node.secagg import robust
from node.secagg.pieces import CHECK, Piece, to_bytes
from tests.test_secure_round import SecureNet, deal_one_refused_piece

HOSTILE, REFUSER = "bank-4", "bank-2"
DROPPED = HOSTILE  # the dealing the second view leaves out
VIEW_B = ("bank-1", "bank-2")  # get the check without bank-4's own dealing
HONEST = ("bank-0", "bank-1", "bank-2", "bank-3")


def _split_check(net, m, phase, to, body):
    if m != HOSTILE or phase != CHECK_PHASE or to not in VIEW_B:
        return body
    sr = net.members[m].secure.round(0)
    held = tuple(i for i in sorted(sr.vectors) if i != sr.index[DROPPED])
    total = np.zeros(2 * len(net.names), dtype=np.uint64)
    for i in held:  # an honest check of every other dealing: only the held list lies
        total += robust.check_piece(sr.params, sr.i, sr.vectors, sr.masks, (i,), challenge(
            net.cid, 0, i, sr.commitments[i])).values
    return encode_secagg(SecAgg(CHECK_PHASE, (to_bytes(Piece(0, CHECK, 0, sr.i, total)),), held))


def _refused_piece_for_refuser(net, m, r, deals):
    return deal_one_refused_piece(net, m, r, deals, REFUSER) if m == HOSTILE else deals


def _opened(net: SecureNet, m: str, step: str) -> bool:
    data = net.members[m].sent.get((0, step))
    return data is not None and bool(decode_secagg(decode_outer(data).body,
                                                   len(net.names)).pieces)


def test_a_split_check_never_opens_degree2_pieces_over_two_entered_sets():
    net = SecureNet(5, 1, variant="distances", tamper_deal=_refused_piece_for_refuser,
                    tamper_to=_split_check).run()
    outs = {m: net.outcome(m) for m in HONEST}
    # the split took: the two views entered different dealers, on a genuine lack
    assert outs[REFUSER].named.get(HOSTILE, "").startswith("bad_piece"), outs[REFUSER].named
    entered = {m: o.entered for m, o in outs.items()}
    assert entered["bank-0"] == entered["bank-3"] == tuple(net.names), entered
    assert entered["bank-1"] == entered["bank-2"] == HONEST, entered
    opened = {m: outs[m].entered for m in HONEST if _opened(net, m, DEGREE2_PHASE)}
    assert len(set(opened.values())) <= 1, f"degree-2 pieces over different entered sets: {opened}"
    assert agreement_quorum(5, 1) == 4
    for m in HONEST:  # neither view has a quorum: nothing opened, the round failed, named
        assert not _opened(net, m, DEGREE2_PHASE), m
        assert outs[m].reason == "no_agreement" and ENTER_PHASE in outs[m].detail, \
            (m, outs[m].reason, outs[m].detail)
        assert outs[m].missed == ()  # nobody opened the sum: nothing missed
    for m, other in (("bank-0", "bank-1"), ("bank-1", "bank-0")):  # each saw the other view's
        # entry agreement: the other's claim about bank-4's check, filed under the other
        # (review 2 F1), never a proof against a third member
        assert outs[m].named.get(other, "").startswith("split_claim"), outs[m].named
        assert HOSTILE in outs[m].claims[other]
        assert not any(why.startswith("split_view") for w, why in outs[m].named.items()
                       if w in HONEST), outs[m].named


def test_an_untampered_multi_krum_round_agrees_on_entry_and_opens():
    net = SecureNet(5, 1, variant="distances").run()
    for m in net.names:
        o = net.outcome(m)
        assert o.ok and not o.named, (o.reason, o.detail, o.named)
        assert _opened(net, m, ENTER_PHASE) and _opened(net, m, DEGREE2_PHASE)


def test_sum_only_has_no_entry_step():
    """DP on the sum opens no degree-2 value: no entry agreement, no extra exchange."""
    assert [p.name for p in secure_phases("sum_only")] == ["share", "check", "degree2",
                                                           "agree", "sum"]
    assert secure_phases("sum_only") == SUM_ONLY_PHASES
    for variant in ("distances", "norm_only"):
        assert [p.name for p in secure_phases(variant)] == ["share", "check", "enter",
                                                           "degree2", "agree", "sum"]
    net = SecureNet(4, 1, variant="sum_only").run()
    assert all(net.outcome(m).ok for m in net.names)
    assert not any(step == ENTER_PHASE for m in net.names for (_, step) in net.members[m].sent)


def test_a_member_whose_stored_entry_agreement_differs_opens_no_degree2_piece():
    """After a restart the round reads the stored entry agreement as ours (keep_own); when
    it is not the one computed now, the member opens no degree-2 piece (agreement_changed)
    and the others, seeing the same checks and another outcome, name it."""
    changed = "bank-1"

    def tamper(net, m, phase, body):
        if m != changed or phase != ENTER_PHASE:
            return body
        statement = bytearray(decode_secagg(body, 5).pieces[0])
        statement[0] ^= 1
        other = encode_secagg(SecAgg(ENTER_PHASE, (bytes(statement),)))
        net.members[m].secure.keep_own(0, ENTER_PHASE, other)  # as the node does on restart
        return other

    net = SecureNet(5, 1, variant="distances", tamper_open=tamper).run()
    o = net.outcome(changed)
    assert o.reason == "agreement_changed" and not _opened(net, changed, DEGREE2_PHASE), \
        (o.reason, o.detail)
    for m in net.names:
        if m != changed:
            assert net.outcome(m).named.get(changed, "").startswith("bad_agreement"), \
                net.outcome(m).named


def test_the_entry_split_is_kept_as_evidence_with_both_signed_sides(tmp_path):
    """The split above through the node's evidence (secure_node.keep_split_evidence): our
    signed entry agreement, each disagreeing member's, and bank-4's check as it reached us,
    whose digest differs from the one bank-1 signed in its entry agreement."""
    from types import SimpleNamespace

    from gossip.envelope import KIND_SECAGG, Accepted
    from node.runtime import secure_node
    from node.runtime.secure_round import body_digest
    from node.runtime.state import StateDir
    from tests.helpers import verifier_for

    net = SecureNet(5, 1, variant="distances", tamper_deal=_refused_piece_for_refuser,
                    tamper_to=_split_check).run()
    me, out = net.members["bank-0"], net.outcome("bank-0")
    claimants = [m for m, about in out.claims.items() if HOSTILE in about]
    assert set(claimants) == set(VIEW_B)
    (tmp_path / "state" / "outbox").mkdir(parents=True)
    node = SimpleNamespace(name="bank-0", state=StateDir(tmp_path / "state"),
                           secure=SimpleNamespace(signed={}))
    secure_node.step_path(node, 0, ENTER_PHASE).write_bytes(me.sent[(0, ENTER_PHASE)])
    verifier = verifier_for(net.cons, net.sks[0], secure=True)
    for _, to, data in net.delivered:  # what reached bank-0, as its node keeps it
        env = decode_outer(data)
        if to == "bank-0" and env.kind == KIND_SECAGG:
            acc = verifier.verify(data, 0)
            assert isinstance(acc, Accepted)
            secure_node.keep_signed_step(node, acc, data)
    kept = [p for m in VIEW_B for p in secure_node.keep_split_evidence(node, 0, m, out)]
    files = {p.rsplit("/", 1)[1]: (tmp_path / "state" / p).read_bytes() for p in kept}
    assert files["enter-bank-0"] == me.sent[(0, ENTER_PHASE)]
    for m in VIEW_B:
        assert files[f"enter-{m}"] == net.members[m].sent[(0, ENTER_PHASE)]
    theirs = decode_secagg(decode_outer(files["enter-bank-1"]).body, 5).pieces[0]
    got = body_digest(decode_outer(files[f"check-{HOSTILE}"]).body)
    assert len(theirs) == 32 * 6 and theirs[32 * 5:32 * 6] != got  # bank-4's entry: another


def test_an_entry_agreement_is_bounded_before_it_is_copied():
    """32 (1 + n) bytes at most (gossip/bodies.py secagg_piece_limits)."""
    import pytest

    from gossip.bodies import secagg_piece_limits
    from gossip.errors import RemoteError

    assert secagg_piece_limits(ENTER_PHASE, 4, None) == (32 * 5,)
    ok = encode_secagg(SecAgg(ENTER_PHASE, (bytes(32 * 5),)))
    assert decode_secagg(ok, 4).pieces == (bytes(32 * 5),)
    with pytest.raises(RemoteError):
        decode_secagg(encode_secagg(SecAgg(ENTER_PHASE, (bytes(32 * 5 + 1),))), 4, "bank-3")

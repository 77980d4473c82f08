"""The agreement step of a secure round (review finding C2, docs/privacy-secure.md "The
agreement step"), attacked through the real round (tests/test_secure_round.py's SecureNet:
each member's RoundMachine and SecureRounds, every message signed with the member's own
key and read by a real Verifier).

The split-view attack (the review's attack_split.py, made to work past the 3t + 1 opener
floor): n = 4, t = 1, variant sum_only. The hostile bank-3 deals bank-2 one wrong value
(committed to, so bank-2 holds it), then sends two different correctly signed check
messages: the honest one to bank-0 and bank-2 (bank-2's check of bank-3's dealing is off:
bank-2 is in dispute, bank-0 opens the sum of all four), and to bank-1 one that claims not
to hold bank-2's dealing and puts bank-3's check value on the line through bank-1's and
bank-2's (bank-0 in dispute: too few openers hold bank-2's dealing, so it is dropped and
bank-1 opens the sum of bank-0, bank-1, bank-3). From the two broadcast sum pieces and its
own, bank-3 decodes both sums (degree t = 1: two pieces each): their difference is
bank-2's contribution. With the agreement step no honest member opens for two selections,
and bank-3 is named."""

from __future__ import annotations

import numpy as np

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.envelope import decode_outer
from node.runtime.secure_round import (
    AGREE_PHASE,
    CHECK_PHASE,
    SUM_PHASE,
    agreement_quorum,
    challenge,
    piece_digest,
)
from node.secagg import field as F
from node.secagg import robust
from node.secagg.encoding import signed
from node.secagg.pieces import CHECK, SEED, Piece, from_bytes, to_bytes
from node.secagg.shamir import decode
from tests.test_secure_round import SecureNet

HOSTILE, VICTIM, A, B = "bank-3", "bank-2", "bank-0", "bank-1"


def _split_view_attack() -> tuple[SecureNet, dict]:
    dealt: dict = {}  # holder -> the vector piece bank-3 dealt it (expanded); "sr": its round

    def tamper_deal(net, m, r, deals):
        if m != HOSTILE:
            return deals
        sr = dealt["sr"] = net.members[m].secure.round(r)  # kept: its pieces after the close
        msgs = {to: decode_secagg(b, 4, deal=True) for to, b in deals.items()}
        v = from_bytes(msgs[VICTIM].pieces[0])
        vals = v.values.copy()
        vals[0] = (int(vals[0]) + 1) % F.P  # a seed or a full piece: either is now off
        newv = to_bytes(Piece(v.round, v.kind, v.owner, v.holder, vals))
        com = bytearray(msgs[VICTIM].pieces[2])
        j = sr.index[VICTIM]
        com[32 * (j - 1):32 * j] = piece_digest(newv, msgs[VICTIM].pieces[1])
        sr.commitments[sr.i] = bytes(com)
        out = {}
        for to, msg in msgs.items():
            vec = newv if to == VICTIM else msg.pieces[0]
            out[to] = encode_secagg(SecAgg("deal", (vec, msg.pieces[1], bytes(com))))
            p = from_bytes(vec)
            dealt[sr.index[to]] = robust.expand_seed_piece(sr.params, p) if p.kind == SEED else p
        return out

    def tamper_to(net, m, phase, to, body):
        if m != HOSTILE or phase != CHECK_PHASE or to != B:
            return body
        sr = net.members[m].secure.round(0)
        held = (1, 2, 4)  # claims not to hold bank-2's dealing
        total = np.zeros(8, dtype=np.uint64)
        for i in held:
            total += robust.check_piece(sr.params, sr.i, sr.vectors, sr.masks, (i,), challenge(
                net.cid, 0, i, sr.commitments[i])).values
        gv, _ = robust.challenge_vectors(sr.params, challenge(net.cid, 0, 4, sr.commitments[4]))
        y2, y3 = robust.check_value(dealt[2], gv), robust.check_value(dealt[3], gv)
        total[3] = (2 * y3 - y2) % F.P  # on the line through bank-1's and bank-2's values
        piece = Piece(0, CHECK, 0, sr.i, total)
        return encode_secagg(SecAgg(CHECK_PHASE, (to_bytes(piece),), held))

    net = SecureNet(4, 1, variant="sum_only", tamper_deal=tamper_deal, tamper_to=tamper_to).run()
    return net, dealt


def _opened(net: SecureNet, m: str) -> bool:
    """Whether member m broadcast a piece of the sum (not an empty "abstain")."""
    data = net.members[m].sent.get((0, SUM_PHASE))
    return data is not None and bool(decode_secagg(decode_outer(data).body, 4).pieces)


def test_a_split_view_never_opens_two_different_sums():
    """The attack above. Before the agreement step bank-0 opened its piece of the sum over
    all four and bank-1 its piece of the sum over bank-0, bank-1, bank-3: bank-3 recovered
    bank-2's contribution (checked below whenever two selections are opened). Now an
    honest member opens only with a quorum of matching agreements; the two views cannot
    both have one, and bank-3 is named by the members whose view it split."""
    net, dealt = _split_view_attack()
    honest = (A, B, VICTIM)
    outs = {m: net.outcome(m) for m in honest}
    opened = {m: outs[m].selected for m in honest if _opened(net, m)}
    if len(set(opened.values())) > 1:  # the leak: bank-3 decodes both sums, subtracts
        hs = dealt["sr"]
        sums = []
        for m, sel in opened.items():
            sel_i = tuple(net.names.index(s) + 1 for s in sel)
            theirs = from_bytes(decode_secagg(decode_outer(
                net.members[m].sent[(0, SUM_PHASE)]).body, 4).pieces[0])
            mine = robust.sum_piece(hs.params, hs.i, hs.vectors, sel_i)
            sums.append(decode({net.names.index(m) + 1: theirs.values, hs.i: mine.values},
                               1).value)  # t + 1 = 2 pieces of a degree-1 sharing
        leaked = signed(F.sub(sums[0], sums[1])) / net.codec.scale
        err = np.abs(leaked - net.vector(VICTIM, 0)).max()
        raise AssertionError(f"two selections opened {opened}: bank-3 recovers bank-2's "
                             f"contribution to {err:.1e}")
    for m in (A, B):  # bank-0 and bank-1 saw the other's agreement disagree on bank-3's check
        assert outs[m].named.get(HOSTILE, "").startswith("split_view"), outs[m].named
        # no honest member is blamed for the split (bank-2's dispute is the dealing's
        # claim, named before any agreement: settling it is the dealer-signed piece's job)
        assert not {w for w, why in outs[m].named.items() if w in honest
                    and why.startswith(("split_view", "bad_agreement"))}, outs[m].named
        assert outs[m].disagreed[HOSTILE]  # whose agreement showed it: the evidence
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

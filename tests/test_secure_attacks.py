"""The review of issue 22's attacks on the degree-2 opening (C3), replayed through the
real secure round (tests/test_secure_round.py's SecureNet: each member's RoundMachine and
SecureRounds, envelopes signed with the member's own key and read by a real Verifier).
The hostile members run the honest code and replace only their opened degree-2 piece.

Before the fix the decode corrected past what the redundancy allows (or trusted pieces
with none): a norm shifted at will was accepted, an honest member excluded from the sum
and another honest member named as a liar. Now: no wrong value accepted, nobody honest
excluded or named; the round fails with a named reason (failing a round is safe)."""

from __future__ import annotations

import numpy as np
import pytest

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from node.secagg import field as F
from node.secagg.errors import TooFewPieces, TooManyWrong
from node.secagg.pieces import DEGREE2, Piece, from_bytes, to_bytes
from node.secagg.shamir import decode, share
from tests.test_secure_round import SecureNet


def _shift_degree2(net: SecureNet, m: str, body: bytes, delta) -> bytes:
    """Member m's opened degree-2 piece with delta(sr, point) added to its values."""
    sr = net.members[m].secure.round(0)
    if sr.i not in sr.openers or not body:
        return body
    msg = decode_secagg(body, len(net.names), m)
    p = from_bytes(msg.pieces[0])
    vals = p.values.copy()
    for k, v in delta(sr).items():
        vals[k] = (int(vals[k]) + v) % F.P
    return encode_secagg(SecAgg("degree2", (to_bytes(Piece(p.round, DEGREE2, 0, p.holder, vals)),)))


def test_a_lone_opener_past_the_redundancy_cannot_exclude_an_honest_member():
    """attack_degree2.py case A: n = 4, t = 1, one honest member absent this round (a
    normal dropout), so 3 = 2t + 1 open the degree-2 values: no redundancy at all. The
    hostile bank-3 scales its piece so that bank-0's squared norm decodes above R^2. Before
    the fix bank-0 was excluded as norm_too_large; now the round needs 3t + 1 openers."""
    absent = "bank-2"

    def tamper(net, m, phase, body):
        if m != "bank-3" or phase != "degree2":
            return body

        def delta(sr):
            lam = F.lagrange_at(list(sr.openers), 0)[list(sr.openers).index(sr.i)]
            k = sr.params.norm_index(sr.index["bank-0"])
            return {k: 2 * net.codec.norm_bound_sq * F.inv(lam) % F.P}
        return _shift_degree2(net, m, body, delta)

    net = SecureNet(4, 1, variant="norm_only", tamper_open=tamper,
                    mute={p: (absent,) for p in ("check", "degree2", "sum")}).run()
    for o in net.honest_outcomes(["bank-0", "bank-1"]):
        assert "bank-0" not in o.excluded and "bank-0" not in o.named, (o.excluded, o.named)
        assert not o.ok and o.reason == "too_few_openers", (o.reason, o.detail)
        assert "3t + 1" in o.detail


def test_t_colluders_cannot_steer_the_degree2_decode_to_name_an_honest_member():
    """attack_t2.py: n = 7 = 3t + 1, t = 2, everyone present. The colluders bank-5, bank-6
    add to their pieces a degree-2t polynomial vanishing at bank-0..bank-3: the opened
    pieces are then within one error of another codeword, which lifts bank-0's norm above
    R^2 and disagrees only at the honest bank-4. Before the fix the decoder corrected that
    one "error": bank-0 excluded, bank-4 named. Now 2 spare pieces only detect."""
    colluders = ("bank-5", "bank-6")
    honest_pts = (1, 2, 3, 4)

    def tamper(net, m, phase, body):
        if m not in colluders or phase != "degree2":
            return body

        def delta(sr):
            num, den = 1, 1
            for h in honest_pts:
                num, den = num * (sr.i - h) % F.P, den * (0 - h) % F.P
            k = sr.params.norm_index(sr.index["bank-0"])
            return {k: 2 * net.codec.norm_bound_sq * num * F.inv(den) % F.P}
        return _shift_degree2(net, m, body, delta)

    net = SecureNet(7, 2, tamper_open=tamper).run()
    honest = [m for m in net.names if m not in colluders]
    for o in net.honest_outcomes(honest):
        assert not set(o.named) & set(honest), o.named
        assert "bank-0" not in o.excluded, o.excluded
        assert not o.ok and o.reason == "too_many_wrong", (o.reason, o.detail)


def test_the_same_round_without_the_attack_completes():
    """The test above can pass only because of the attack: untampered, 7 = 3t + 1 open."""
    net = SecureNet(7, 2).run()
    assert all(o.ok and not o.named for o in net.honest_outcomes(net.names))


def test_decode_corrects_at_most_max_errors_and_only_within_the_radius():
    """Degree 2t = 4, t = 2 liars (points 6, 7) adding a degree-4 polynomial that vanishes
    at the honest 1..4: from 7 pieces the old radius (1) decodes to the shifted codeword
    and names the honest 5; with max_errors = t it only detects, and with 9 pieces
    (>= 4 + 1 + 2t) it corrects the liars."""
    rng = np.random.default_rng(3)
    secret = F.uniform(4, rng)
    pieces = share(secret, 9, 4, rng)

    def shift(j):
        v = 1
        for h in (1, 2, 3, 4):
            v = v * (j - h) % F.P
        return np.uint64(v)

    lied = {j: pieces[j - 1].copy() for j in range(1, 10)}
    for j in (6, 7):
        lied[j] = (lied[j] + shift(j)) % F.P64
    seven = {j: lied[j] for j in range(1, 8)}
    steered = decode(seven, 4)  # the old radius: the attack works
    assert steered.wrong == (5,) and not (steered.value == secret).all()
    with pytest.raises(TooManyWrong, match="nobody named"):
        decode(seven, 4, max_errors=2)
    with pytest.raises(TooFewPieces):
        decode({j: lied[j] for j in range(1, 7)}, 4, max_errors=2)
    fixed = decode(lied, 4, max_errors=2)
    assert fixed.wrong == (6, 7) and (fixed.value == secret).all()


def _shift_check(body: bytes, n: int, m: str) -> bytes:
    """Member m's check body with every opened check value moved by one (a liar's check)."""
    msg = decode_secagg(body, n, m)
    if not msg.pieces:
        return body
    p = from_bytes(msg.pieces[0])
    vals = F.add(p.values, np.ones(p.values.size, dtype=np.uint64))
    return encode_secagg(SecAgg("check", (to_bytes(Piece(p.round, p.kind, 0, p.holder, vals)),),
                                msg.held))


def test_t_lying_checks_below_the_correction_radius_name_the_liars_and_enter_the_honest():
    """n = 7, t = 2: bank-5 and bank-6 both open wrong checks. The mask checks have one
    spare holder past t, so every dealing's own verdict is 'unresolved' (dealer or up to t
    holders at fault: robust.DealingVerdict). Without the round honouring that verdict every
    dealer entered on checks the liars had disowned; then nobody entered and the round
    failed naming nobody (review 2 F12). Now all dealers' checks together explain it
    (node/secagg/explain.py): the two are in every explanation and named, the honest
    dealings enter, nobody honest is named. The round (distances: 3t + 1 = 7 openers) still
    fails before anything is opened: the two named liars may not open."""
    colluders = ("bank-5", "bank-6")

    def tamper(net, m, phase, body):
        return _shift_check(body, len(net.names), m) if m in colluders and phase == "check" \
            else body

    net = SecureNet(7, 2, tamper_open=tamper).run()
    honest = [m for m in net.names if m not in colluders]
    for o in net.honest_outcomes(honest):
        assert not set(o.named) & set(honest), o.named
        assert all(o.named[c].startswith("mask_check_liar") for c in colluders), o.named
        assert not o.ok and o.reason == "too_few_openers", (o.reason, o.detail)
        assert o.detail.startswith("5 member(s) opened a usable check"), o.detail


def _claim_to_hold(liars: tuple[str, ...], dealers: tuple[int, ...]):
    """The liars' checks name only `dealers` (their check values unchanged: only the held
    list lies), and each signs its agreements over that body (its round reads it as its own)."""
    def tamper(net, m, phase, body):
        if m not in liars or phase != "check":
            return body
        msg = decode_secagg(body, len(net.names), m)
        edited = encode_secagg(SecAgg("check", msg.pieces, dealers))
        net.members[m].secure.keep_own(0, "check", edited)  # what it signs for
        return edited
    return tamper


def _opened_any(net: SecureNet, m: str) -> bool:
    """Whether member m sent a non-empty degree-2 or sum piece."""
    from gossip.envelope import decode_outer
    for step in ("degree2", "sum"):
        data = net.members[m].sent.get((0, step))
        if data is not None and decode_secagg(decode_outer(data).body, len(net.names)).pieces:
            return True
    return False


@pytest.mark.parametrize("variant", ["distances", "norm_only"])
def test_t_colluders_claiming_to_hold_one_honest_dealing_cannot_open_it_alone(variant):
    """Review s5 R4. n = 7, t = 2, no DP: bank-5 and bank-6 (their real keys) open checks
    claiming to hold only bank-0's dealing and their own, and sign their agreements over
    those bodies. Too few members then hold every dealing to open the degree-2 values
    (3t + 1 = 7 needed). Before, the entry dropped the least held dealings until enough did:
    every honest member agreed to open over (bank-0, bank-5, bank-6), and the opened sum was
    bank-0's vector plus the coalition's own: bank-0's exact update, "ok", nobody named.
    Now a dealing is dropped only when more than t check senders lack it (only two do, the
    liars): every honest dealing stays entered, too few can open it, and the round fails
    `too_few_openers` before any degree-2 or sum piece leaves."""
    liars = ("bank-5", "bank-6")
    net = SecureNet(7, 2, variant=variant, tamper_open=_claim_to_hold(liars, (1, 6, 7))).run()
    honest = [m for m in net.names if m not in liars]
    for m, o in zip(honest, net.honest_outcomes(honest), strict=True):
        honest_in = [x for x in o.entered if x not in liars]
        assert not o.ok or len(honest_in) >= 2, (o.entered, o.selected)  # the review's property
        assert o.reason == "too_few_openers" and "lacked by 2 of the 7" in o.detail, \
            (m, o.reason, o.detail)
        assert o.entered == tuple(net.names), o.entered  # no honest dealing dropped
        assert not set(o.named) & set(honest), o.named
        assert not _opened_any(net, m), m


def test_the_same_claim_with_an_honest_member_absent_cannot_open_one_dealing_either():
    """R4 with a dropout, variant sum_only (2t + 1 = 5 openers) and no floor: n = 7, t = 2,
    honest bank-4 dealt and then went silent (no check), bank-5 and bank-6 claim to hold
    only bank-0's dealing and theirs. Four honest members hold every dealing, fewer than 5.
    Before, the entry dropped bank-1..bank-4's dealings (each held by the four, the fewest)
    and opened bank-0's plus the liars'. An absent member is not a check sender: it neither
    holds nor lacks, so each honest dealing is lacked by the two liars only (of six senders)
    and stays; the round fails `too_few_openers`, nothing opened."""
    liars = ("bank-5", "bank-6")
    gone = ("bank-4",)
    net = SecureNet(7, 2, variant="sum_only", tamper_open=_claim_to_hold(liars, (1, 6, 7)),
                    mute={p: gone for p in ("check", "degree2", "agree", "sum")}).run()
    present = ("bank-0", "bank-1", "bank-2", "bank-3")
    for m, o in zip(present, net.honest_outcomes(present), strict=True):
        assert o.reason == "too_few_openers" and "lacked by 2 of the 6" in o.detail, \
            (m, o.reason, o.detail)
        assert "bank-4" in o.entered and len(o.entered) == 7, o.entered
        assert not _opened_any(net, m), m

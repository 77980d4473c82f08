"""A secure round end to end through the round machine (issue 22): n RoundMachines with
the secure phases (node/runtime/secure_round.py SECURE_PHASES) exchange real signed
envelopes (each member's own Ed25519 key; "secagg" messages verified by a real Verifier,
deals signed by their dealer), driven by the same glue the node uses (`SecureRounds`).
No transport, disk, torch or clock: time is the test's. Hostile members are honest
drivers with one part replaced (their dealing, or an opened piece), signing with their
real member key."""

from __future__ import annotations

import numpy as np
import pytest
from nacl.signing import VerifyKey

from gossip import envelope as E
from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.envelope import KIND_DEAL, KIND_HELLO, KIND_SECAGG, Accepted
from gossip.protocol import (
    Broadcast,
    Close,
    PhaseMessage,
    Presence,
    Refused,
    Released,
    RoundBook,
    RoundMachine,
    RoundParams,
    SendPhase,
    SendShare,
    SendTo,
    Sign,
    Signed,
    Train,
)
from node.runtime.evidence import envelope_bytes
from node.runtime.secure_round import SecureOutcome, SecureRounds, piece_digest, secure_phases
from node.secagg import field as F
from node.secagg.encoding import FixedPoint
from node.secagg.pieces import Piece, from_bytes, to_bytes
from tests.helpers import consortium, keys, verifier_for

DIM = 6
CLIP = 1.0
DEADLINE = 10.0



def deal_one_wrong_piece(net, m: str, r: int, deals: dict[str, bytes], victim: str
                         ) -> dict[str, bytes]:
    """Member m's deals of round r with one wrong value in `victim`'s vector piece (a seed
    or a full piece: either is then off its polynomial), committed to in every deal and in
    m's own round, so only the victim's check can disagree."""
    sr = net.members[m].secure.round(r)
    msgs = {to: decode_secagg(b, len(net.names), deal=True) for to, b in deals.items()}
    v = from_bytes(msgs[victim].pieces[0])
    vals = v.values.copy()
    vals[0] = (int(vals[0]) + 1) % F.P
    newv = to_bytes(Piece(v.round, v.kind, v.owner, v.holder, vals))
    com = bytearray(msgs[victim].pieces[2])
    j = sr.index[victim]
    com[32 * (j - 1):32 * j] = piece_digest(newv, msgs[victim].pieces[1])
    sr.commitments[sr.i] = bytes(com)
    return {to: encode_secagg(SecAgg("deal", (newv if to == victim else msg.pieces[0],
                                              msg.pieces[1], bytes(com))))
            for to, msg in msgs.items()}

def deal_one_refused_piece(net, m: str, r: int, deals: dict[str, bytes], victim: str
                           ) -> dict[str, bytes]:
    """Member m's deals of round r with `victim`'s vector piece changed after m committed to
    it: the victim refuses that deal at receipt (bad_piece: its pieces do not match m's
    commitment) and holds nothing of m's dealing. An honest member that genuinely lacks a
    dealing and still sends its check in time (a deal that never came would hold its check
    back until the share deadline, past the others' entry)."""
    msg = decode_secagg(deals[victim], len(net.names), deal=True)
    v = from_bytes(msg.pieces[0])
    vals = v.values.copy()
    vals[0] = (int(vals[0]) + 1) % F.P
    newv = to_bytes(Piece(v.round, v.kind, v.owner, v.holder, vals))
    return {**deals, victim: encode_secagg(SecAgg("deal", (newv, *msg.pieces[1:])))}


class Member:
    """One member: a RoundMachine and the secure glue, driven as Node drives them."""

    def __init__(self, net: SecureNet, name: str, sk) -> None:
        self.net, self.name, self.sk = net, name, sk
        others = [m for m in net.names if m != name]
        self.book = RoundBook(others, lookahead=3)
        # every member up before round 1 (min_members = n): the rounds start together
        self.m = RoundMachine(name, net.names, self.book,
                              RoundParams(net.rounds, DEADLINE, 1, len(net.names)),
                              keys={m: net.pub[m] for m in net.names},
                              phases=secure_phases(net.variant))
        self.secure = SecureRounds(name, net.names, net.t, net.variant, net.codec, net.cid)
        self.verifier = verifier_for(net.cons, sk, secure=True)
        self.seq = 0
        self.sent: dict[tuple[int, str], bytes] = {}  # (round, step) -> our signed message
        self.deals: dict[int, dict[str, bytes]] = {}
        self.outcomes: dict[int, SecureOutcome] = {}
        self.refused: list[Refused] = []
        self.presence: list[Presence] = []
        self.now = 0.0

    def pack(self, kind: str, r: int, body: bytes) -> bytes:
        self.seq += 1
        return E.pack(self.sk, self.net.cid, kind, r, self.seq, body)

    def run(self, actions: list) -> None:
        queue = list(actions)
        while queue:
            a = queue.pop(0)
            if isinstance(a, Refused):
                self.refused.append(a)
            elif isinstance(a, Presence):
                self.presence.append(a)
            elif isinstance(a, Train):
                if self.name in self.net.silent_from.get(a.round, ()):
                    continue  # crashed: trains and sends nothing more
                if self.name in self.net.no_deal.get(a.round, ()):  # nothing to deal
                    queue += self.m.released(Released(a.round, "non_finite"), self.now)
                    continue
                vec = self.net.vector(self.name, a.round)
                self.deals[a.round] = self.net.tamper_deal(
                    self.name, a.round, self.secure.deal(a.round, self.net.codec.encode(vec)))
                queue += self.m.released(Released(a.round, "new"), self.now)
            elif isinstance(a, SendShare) and not a.stored:
                data = {}
                for to in a.seal_for:
                    if to in self.deals[a.round]:
                        data[to] = self.pack(KIND_DEAL, a.round, self.deals[a.round][to])
                        self.net.post(self.name, [to], data[to])
                queue += self.m.signed(Signed(a.round, None), self.now)
            elif isinstance(a, SendPhase):
                if self.name in self.net.silent_from.get(a.round, ()) or (
                        self.name in self.net.mute.get(a.phase, ()) and a.round in self.net.mute_rounds):
                    continue
                deals = {s: acc.secagg for s, acc in self.book.shares(a.round).items()}
                reveals = self.read_reveals(a.round, a.got.get("agree", {})) \
                    if a.phase == "sum" else None
                body = self.secure.phase(a.round, a.phase, a.got, deals, reveals)
                if a.phase == "agree":
                    body = self.with_reveals(a.round, body)
                body = self.net.tamper_open(self.name, a.phase, body)
                data = self.pack(KIND_SECAGG, a.round, body)
                self.sent[(a.round, a.phase)] = data
                for to in a.peers:  # a split view: another signed body to some peers
                    other = self.net.tamper_to(self.name, a.phase, to, body)
                    self.net.post(self.name, [to], data if other == body
                                  else self.pack(KIND_SECAGG, a.round, other))
            elif isinstance(a, Broadcast | SendTo) and isinstance(a.message, Sign):
                s = a.message
                to = [m for m in self.net.names if m != self.name] if isinstance(a, Broadcast) \
                    else list(a.peers)
                if s.kind == KIND_HELLO:
                    self.net.post(self.name, to, self.pack(s.kind, s.round, s.body))
            elif isinstance(a, Close):
                self.outcomes[a.round] = self.secure.close(a.round, a.phases)
                queue += self.m.closed(a.round, dict(a.shares), self.now)

    def with_reveals(self, r: int, body: bytes) -> bytes:
        """As node/runtime/secure_node.py with_reveals, the deal unsealed on this test wire
        (the key: 32 zero bytes; the seal's own reveal is tested apart)."""
        sr = self.secure.round(r)
        msg = decode_secagg(body, len(self.net.names))
        shares = self.book.shares(r)
        reveals = [bytes(32) + envelope_bytes(shares[sr.members[i - 1]].envelope)
                   for i in sr.my_disputes() if sr.members[i - 1] in shares]
        if not msg.pieces or not reveals:
            return body
        body = encode_secagg(SecAgg("agree", (msg.pieces[0], *reveals)))
        self.secure.keep_own(r, "agree", body)
        return body

    def read_reveals(self, r: int, agreements) -> dict:
        """As node/runtime/secure_node.py read_reveals (the dealer's signature checked)."""
        out = {}
        for holder, body in agreements.items():
            for data in decode_secagg(body, len(self.net.names)).pieces[1:]:
                env = E.decode_outer(data[32:])
                VerifyKey(env.sender).verify(env.digest, env.sig)
                dealer = self.net.name_of[env.sender]
                out[(self.net.names.index(holder) + 1, self.net.names.index(dealer) + 1)] = \
                    decode_secagg(env.body, len(self.net.names), deal=True)
        return out

    def receive(self, data: bytes) -> None:
        outer = E._parse_outer(data, E.DEFAULT_MAX_ENVELOPE_BYTES)
        if outer.kind == KIND_DEAL:
            # A deal is sealed to its recipient on the wire (tests/test_golden.py and
            # test_secure_wire.py open real ones): here its signature is checked and its
            # plaintext read as the verifier does after opening.
            VerifyKey(outer.sender).verify(outer.digest, outer.sig)
            env = outer.envelope(bytes(outer.body), outer.digest)
            acc = Accepted(self.net.name_of[outer.sender], env, None,
                           secagg=decode_secagg(env.body, len(self.net.names), deal=True))
        else:
            acc = self.verifier.verify(data, self.book.current)
        if acc.envelope.kind == KIND_SECAGG:
            self.run(self.m.phase_message(PhaseMessage(acc.sender, acc.round, acc.secagg.step,
                                                       bytes(acc.envelope.body)), self.now))
        else:
            self.run(self.m.receive(acc, self.now))
        if (nd := self.m.next_deadline) is not None and nd <= self.now:
            self.run(self.m.tick(self.now))


class SecureNet:
    """n members exchanging real envelopes in FIFO order; time passes only when all is
    delivered (to the next deadline). `silent_from[r]`: members that crash at round r
    (send nothing from then on); `mute[phase]`: members whose message of that step is lost;
    `late`: member -> round whose deal it sends only after the others closed that round."""

    def __init__(self, n: int, t: int, *, variant: str = "distances", rounds: int = 1,
                 vectors=None, silent_from=None, mute=None, late=None,
                 tamper_deal=None, tamper_open=None, mute_rounds=(0,), no_deal=None,
                 tamper_to=None) -> None:
        self.sks = keys(n)
        self.cons = consortium(self.sks)
        self.cid = self.cons.id
        self.names = [m.name for m in self.cons.members]
        self.pub = {m.name: m.public_key for m in self.cons.members}
        self.name_of = {v: k for k, v in self.pub.items()}
        self.t, self.variant, self.rounds = t, variant, rounds
        self.codec = FixedPoint.choose(CLIP, DIM, n)
        self.vectors = vectors or {}
        self.silent_from = silent_from or {}
        self.mute, self.mute_rounds = mute or {}, mute_rounds
        self.no_deal = no_deal or {}
        self.late = late or {}
        self._tamper_deal = tamper_deal
        self._tamper_open = tamper_open
        self._tamper_to = tamper_to  # (net, sender, step, recipient, body) -> its body
        self.queue: list[tuple[str, str, bytes]] = []
        self.held_back: list[tuple[str, str, bytes]] = []
        self.delivered: list[tuple[str, str, bytes]] = []  # (sender, recipient, bytes)
        self.members = {m: Member(self, m, sk) for m, sk in zip(self.names, self.sks, strict=True)}
        self.now = 0.0

    def vector(self, m: str, r: int) -> np.ndarray:
        if m in self.vectors:
            return self.vectors[m]
        rng = np.random.default_rng(1000 * r + self.names.index(m))
        v = 0.3 + rng.normal(0, 0.02, DIM)  # honest members close together
        return v / max(1.0, float(np.linalg.norm(v)) / (0.9 * CLIP))

    def tamper_deal(self, m, r, deals):
        return deals if self._tamper_deal is None else self._tamper_deal(self, m, r, deals)

    def tamper_open(self, m, phase, body):
        return body if self._tamper_open is None else self._tamper_open(self, m, phase, body)

    def tamper_to(self, m, phase, to, body):
        return body if self._tamper_to is None else self._tamper_to(self, m, phase, to, body)

    def post(self, sender: str, to: list[str], data: bytes) -> None:
        for t in to:
            if self.late.get(sender) is not None and E._parse_outer(
                    data, E.DEFAULT_MAX_ENVELOPE_BYTES).kind == KIND_DEAL:
                self.held_back.append((sender, t, data))
            else:
                self.queue.append((sender, t, data))

    def run(self) -> SecureNet:
        for m in self.members.values():
            m.run(m.m.start(0.0))
        for _ in range(200):
            while self.queue:
                sender, to, data = self.queue.pop(0)
                self.delivered.append((sender, to, data))
                self.members[to].receive(data)
            alive = [m for m in self.members.values() if not m.m.done
                     and m.name not in self.silent_from.get(0, ())]
            if not alive:
                return self
            nds = [m.m.next_deadline for m in alive if m.m.next_deadline is not None]
            if not nds:
                return self
            self.now = max(self.now, min(nds))
            for m in self.members.values():
                m.now = self.now
                m.run(m.m.tick(self.now))
            if self.held_back and all(0 in m.outcomes for m in self.members.values()
                                      if m.name not in self.late):
                self.queue += self.held_back  # the late member's deals, after the round closed
                self.held_back = []
        raise AssertionError("the secure round never finished")

    def outcome(self, m: str, r: int = 0) -> SecureOutcome:
        return self.members[m].outcomes[r]

    def honest_outcomes(self, honest, r: int = 0) -> list[SecureOutcome]:
        return [self.outcome(m, r) for m in honest]


def field_sum(net: SecureNet, who) -> np.ndarray:
    return F.sum_mod(np.stack([net.codec.encode(net.vector(m, 0)) for m in who]), axis=0)


def test_the_aggregate_is_the_exact_field_sum_of_the_selected_members():
    """8 members, t = 2, multi-Krum: every member reconstructs the same aggregate, and it
    equals the plain sum of the selected members' encodings exactly in F_p."""
    net = SecureNet(8, 2).run()
    outs = net.honest_outcomes(net.names)
    assert all(o.ok for o in outs), [(o.reason, o.detail) for o in outs]
    sel = outs[0].selected
    assert len(sel) == 8 - 2 and all(o.selected == sel for o in outs)  # n - f kept by multi-Krum
    for o in outs:
        np.testing.assert_array_equal(o.field_sum, field_sum(net, sel))
        assert not o.named
    np.testing.assert_allclose(outs[0].total, sum(net.vector(m, 0) for m in sel), atol=1e-6)


def test_norm_variant_sums_every_member_within_the_bound():
    net = SecureNet(4, 1, variant="norm_only").run()
    for o in net.honest_outcomes(net.names):
        assert o.ok and o.selected == tuple(net.names)
        np.testing.assert_array_equal(o.field_sum, field_sum(net, net.names))


@pytest.mark.parametrize("attack", ["flip", "scale"])
def test_a_sign_flipping_or_scaling_member_is_left_out_by_the_selection(attack):
    """A member whose contribution is -10x (sign flip) or 3x the honest direction, still
    within the clip, is left out by multi-Krum on the exact distances; the others' sum is
    the aggregate."""
    honest = SecureNet(8, 2).vector("bank-1", 0)
    # flip: the opposite of an honest contribution; scale: an honest one blown up to the clip
    bad = -honest if attack == "flip" else honest / np.linalg.norm(honest) * 0.999 * CLIP
    net = SecureNet(8, 2, vectors={"bank-7": bad}).run()
    outs = net.honest_outcomes(net.names[:7])
    assert all(o.ok for o in outs)
    assert all("bank-7" not in o.selected and "bank-7" in o.excluded for o in outs)
    assert "krum_not_selected" in outs[0].excluded["bank-7"]
    np.testing.assert_array_equal(outs[0].field_sum, field_sum(net, outs[0].selected))


def inconsistent(deals: dict[str, bytes], commit: bool) -> dict[str, bytes]:
    """A hostile dealing: each holder's full vector piece moved off the polynomial by a
    different error (seed pieces sent as they are); `commit`: the dealer commits to the
    pieces it sends (else they do not match its commitment)."""
    pieces = {}
    for k, (to, body) in enumerate(sorted(deals.items())):
        msg = decode_secagg(body, 8, deal=True)
        p = from_bytes(msg.pieces[0])
        if p.kind == 1:
            vals = p.values.copy()
            vals[0] = (int(vals[0]) + 1 + k) % F.P
            p = type(p)(p.round, p.kind, p.owner, p.holder, vals)
        pieces[to] = (to_bytes(p), msg.pieces[1])
    c = bytearray(msg.pieces[2])
    if commit:
        for to, (v, mk) in pieces.items():
            j = int(to.split("-")[1])
            c[32 * j:32 * j + 32] = piece_digest(v, mk)
    return {to: encode_secagg(SecAgg("deal", (*pm, bytes(c)))) for to, pm in pieces.items()}


def test_pieces_that_do_not_match_their_commitment_are_refused_by_each_holder():
    """bank-3 sends pieces other than those it committed to: each holder of such a piece
    refuses it (bad_piece, naming it), too few hold its dealing for it to enter, the
    others' round completes."""
    net = SecureNet(8, 2, tamper_deal=lambda net, m, r, deals: deals if m != "bank-3"
                    else inconsistent(deals, commit=False)).run()
    honest = [m for m in net.names if m != "bank-3"]
    outs = net.honest_outcomes(honest)
    for o in outs:
        assert o.ok and "bank-3" not in o.entered
        np.testing.assert_array_equal(o.field_sum, field_sum(net, o.selected))
    # the 5 holders of full pieces name it (the t = 2 seeded holders got untouched seeds)
    named = [o for o in outs if "do not match its own commitment" in o.named.get("bank-3", "")]
    assert len(named) == 8 - 1 - 2


def test_a_member_dealing_inconsistent_pieces_is_named_and_the_round_completes():
    """bank-3 signs (with its real key) deals whose pieces lie on no degree-t polynomial:
    every other member refuses its dealing, names it, and aggregates the rest."""
    def tamper(net, m, r, deals):
        if m != "bank-3":
            return deals
        return inconsistent(deals, commit=True)

    net = SecureNet(8, 2, tamper_deal=tamper).run()
    honest = [m for m in net.names if m != "bank-3"]
    outs = net.honest_outcomes(honest)
    assert all(o.ok for o in outs), [(o.reason, o.detail) for o in outs]
    for o in outs:
        assert o.named.get("bank-3", "").startswith("inconsistent_pieces")
        assert "bank-3" not in o.entered and "bank-3" not in o.selected
        np.testing.assert_array_equal(o.field_sum, outs[0].field_sum)
    np.testing.assert_array_equal(outs[0].field_sum, field_sum(net, outs[0].selected))


def test_a_wrong_opened_piece_is_named_and_corrected():
    """bank-5 opens a wrong sum piece (signed): Reed-Solomon decoding names it and the
    others still reconstruct the exact aggregate."""
    def tamper(net, m, phase, body):
        if m != "bank-5" or phase != "sum":
            return body
        msg = decode_secagg(body, 8)
        p = from_bytes(msg.pieces[0])
        vals = p.values.copy()
        vals[2] = (int(vals[2]) + 12345) % F.P
        return encode_secagg(SecAgg("sum", (to_bytes(type(p)(p.round, p.kind, 0, p.holder,
                                                                   vals)),)))

    net = SecureNet(8, 2, tamper_open=tamper).run()
    for o in net.honest_outcomes([m for m in net.names if m != "bank-5"]):
        assert o.ok and o.named == {"bank-5": "wrong_sum_piece"}
        np.testing.assert_array_equal(o.field_sum, field_sum(net, o.selected))


def test_t_members_dropping_mid_round_and_a_late_member_is_excluded():
    """t = 2 members crash after dealing (no check, no opening): the round completes with
    the others (their dealings still enter: the others hold their pieces), 3t + 1 = 7 of
    n = 10 still opening. A third member deals only after the round closed: "stale",
    excluded."""
    net = SecureNet(10, 2, mute={"check": ("bank-7", "bank-8"), "degree2": ("bank-7", "bank-8"),
                                "sum": ("bank-7", "bank-8")}, late={"bank-6": 0})
    net.run()
    honest = [m for m in net.names if m not in ("bank-6", "bank-7", "bank-8")]
    outs = net.honest_outcomes(honest)
    assert all(o.ok for o in outs), [(o.reason, o.detail) for o in outs]
    for o in outs:
        assert "bank-6" not in o.dealt and "bank-6" not in o.entered
        assert {"bank-7", "bank-8"} <= set(o.entered)
        np.testing.assert_array_equal(o.field_sum, outs[0].field_sum)
    np.testing.assert_array_equal(outs[0].field_sum, field_sum(net, outs[0].selected))
    late = [r for m in honest for r in net.members[m].refused if r.member == "bank-6"]
    assert late and {r.reason for r in late} == {"stale"}


def test_more_dropouts_than_the_threshold_fail_the_round_with_a_named_reason():
    """4 of 8 (more than t = 2) deal, then never open anything: 4 openers < 2t + 1 = 5,
    the round fails 'too_few_openers' at every member left, and nothing is opened."""
    gone = ("bank-4", "bank-5", "bank-6", "bank-7")
    net = SecureNet(8, 2, mute={"check": gone, "degree2": gone, "sum": gone}).run()
    for o in net.honest_outcomes(net.names[:4]):
        assert not o.ok and o.reason == "too_few_openers" and o.field_sum is None


def test_a_failed_round_is_named_and_the_next_round_goes_on():
    """Round 1: 4 of 8 go silent after dealing ('too_few_openers'); round 2: they are back
    and the round opens the exact sum."""
    gone = ("bank-4", "bank-5", "bank-6", "bank-7")
    net = SecureNet(8, 2, rounds=2, mute={"check": gone, "degree2": gone, "sum": gone}).run()
    for m in net.names[:4]:
        assert net.outcome(m, 0).reason == "too_few_openers"
        o = net.outcome(m, 1)
        assert o.ok and len(o.selected) == 6
        expected = F.sum_mod(np.stack([net.codec.encode(net.vector(x, 1)) for x in o.selected]),
                             axis=0)
        np.testing.assert_array_equal(o.field_sum, expected)


def test_a_round_with_at_most_t_contributors_is_not_opened():
    """Only t = 1 of 4 members deals (the others crash before dealing; the dealer's pieces
    reach everyone): nothing is opened, 'too_few_contributors'."""
    net = SecureNet(4, 1, variant="norm_only",
                    silent_from={0: ("bank-1", "bank-2")})
    net.run()
    o = net.outcome("bank-0")
    assert not o.ok and o.reason in ("too_few_contributors", "too_few_openers")
    assert o.field_sum is None


@pytest.mark.parametrize("attack", ["garbage", "impersonate"])
def test_a_malformed_or_impersonating_opened_piece_is_named_and_left_out(attack):
    """bank-5's signed check carries garbage piece bytes, or its degree-2 piece claims to be
    bank-0's (holder 1): named (bad_check / bad_degree2), left out of the decoding, and the
    round completes with the exact sum."""
    def tamper(net, m, phase, body):
        if m != "bank-5":
            return body
        msg = decode_secagg(body, 8)
        if attack == "garbage" and phase == "check":
            return encode_secagg(SecAgg("check", (b"FLSA" + b"\xff" * 40,), msg.held))
        if attack == "impersonate" and phase == "degree2" and msg.pieces:
            p = from_bytes(msg.pieces[0])
            return encode_secagg(SecAgg("degree2", (to_bytes(type(p)(p.round, p.kind, 0, 1,
                                                                      p.values)),)))
        return body

    net = SecureNet(8, 2, tamper_open=tamper).run()
    why = "bad_check" if attack == "garbage" else "bad_degree2"
    for o in net.honest_outcomes([m for m in net.names if m != "bank-5"]):
        assert o.ok and o.named["bank-5"].startswith(why), o.named
        np.testing.assert_array_equal(o.field_sum, field_sum(net, o.selected))


def test_a_dealer_absent_for_a_round_is_back_when_it_deals_again():
    """bank-7 deals nothing in round 1: the others close it at the deadline and mark it
    absent (its later step messages are talk: waited for one more deadline); its deal in
    round 2 counts as a share, so it is fully back (a share lifts the absence for good,
    talk only once), and the round opens with it."""
    net = SecureNet(8, 2, rounds=2, no_deal={0: ("bank-7",)}).run()
    for m in net.names[:7]:
        kinds = [p.what for p in net.members[m].presence if p.member == "bank-7"]
        assert kinds[0] == "absent", kinds
        live = net.members[m].m.live
        assert "bank-7" not in live.absent and "bank-7" not in live.talked
        assert "bank-7" not in net.outcome(m, 0).dealt and "bank-7" in net.outcome(m, 1).dealt
        assert net.outcome(m, 1).ok


def test_a_restarted_member_missing_a_held_deal_abstains_and_does_not_crash():
    """Review 2 F10 (n = 7, t = 2, sum_only): bank-0 restarts after its check left (stored:
    it holds bank-6's dealing) and bank-6 never re-sends its deal. Before, the sum step
    raised SecAggError out of the node's worker thread (the process died, again on every
    restart); now bank-0's sum piece abstains (`lost_pieces`) and every member, bank-0
    too, decodes the same aggregate from the others' pieces."""
    from node.runtime.secure_round import SecureRound

    names = [f"bank-{i}" for i in range(7)]
    codec = FixedPoint.choose(1.0, 16, 7)
    cid = b"\x02" * 32
    rounds = {m: SecureRounds(m, names, 2, "sum_only", codec, cid) for m in names}
    deals = {m: rounds[m].deal(0, codec.encode(np.full(16, 0.05))) for m in names}
    got = {m: {s: decode_secagg(deals[s][m], 7, deal=True) for s in names if s != m} for m in names}
    checks = {m: rounds[m].phase(0, "check", {}, got[m]) for m in names}
    x, lost = "bank-0", "bank-6"
    before = rounds[x].round(0)
    again = SecureRound(x, names, 2, "sum_only", codec, 0, cid)  # the restart
    again.restore(before.own_pieces(), before.commitments[before.i])
    rounds[x].rounds[0] = again
    assert rounds[x].phase(0, "check", {}, {s: d for s, d in got[x].items() if s != lost})
    rounds[x].keep_own(0, "check", checks[x])  # the stored check (holds bank-6) is re-sent
    steps = {"check": checks}
    for step in ("degree2", "agree", "sum"):
        steps[step] = {m: rounds[m].phase(0, step, {k: {s: b for s, b in v.items() if s != m}
                                                    for k, v in steps.items()}, {}, {})
                       for m in names}
    assert not decode_secagg(steps["sum"][x], 7).pieces  # abstained, named
    outs = {m: rounds[m].close(0, {"sum": {s: b for s, b in steps["sum"].items() if s != m}})
            for m in names}
    assert outs[x].ok and outs[x].detail.startswith("lost_pieces"), (outs[x].reason, outs[x].detail)
    assert all(o.ok for o in outs.values()), {m: o.reason for m, o in outs.items()}
    assert len({o.field_sum.tobytes() for o in outs.values()}) == 1

"""A member's side of one secure round (issue 22): which pieces it sends at each step, and
what it makes of the others'. Pure: no I/O, clock or torch; the driver feeds it what the
round machine collected and sends what it returns.

Where the logic lives (the choice, and why). The round machine (gossip/protocol/) decides
"which messages from whom, by when": a secure round is the share phase followed by
generic later phases, `secure_phases(variant)`: (SHARE, check, enter, degree2, agree, sum),
without enter for sum_only (it opens no degree-2 value: no extra exchange); gossip never imports
node, so the machine carries opaque bodies and knows no field arithmetic. This module does
the math, by calling node/secagg (robust.py's steps), at the machine's `SendPhase` actions:

  share    (the machine's share phase, unchanged) each member deals: a degree-t Shamir
           sharing of its encoded contribution (plus a blinding coordinate; range: and its
           witness) and its mask sharing; holder j's pieces go in ONE "deal" sealed to j's
           prekey and signed (KIND_DEAL), filed by the round book as the sender's share
           (closing rule, equivocation, staleness: a late member is excluded, unchanged).
           A member proven at fault in an earlier round (`mask_check_liar`) is dealt nothing
           and its deal refused (secure_kept.py: KEPT_OUT in its commitment slot voids its
           claims on our dealing at every member).
  check    each holder opens its blinded check of every dealing it holds (broadcast, naming
           the dealers it holds). Every member judges every dealer from its holders' checks
           (Reed-Solomon): one whose pieces disagree beyond what the code corrects is REFUSED
           and named ("inconsistent pieces", the signed deal kept as evidence); a holder whose
           check disagrees with a decodable dealing is a DISPUTE (both named as a claim; the
           holder does not open). Entering: the consistent dealers; openers: holders whose
           check came, that hold every entering dealer's pieces and are in no dispute; while
           fewer than the openers needed remain, the entering dealer held by the fewest
           holders (ties: the highest index) is dropped, but only when more than t check
           senders lack it (secure_entry.py: never on t liars' word; else the round fails).
           Every member computes the same.
  enter    (not sum_only) every member broadcasts its entry agreement: a hash of (round,
           entered, openers) and the digest of every member's check body as it used them.
  degree2  once `agreement_quorum` entry agreements equal its own (else `no_agreement`,
           nothing opened: no two honest members open over different entered sets), each
           opener opens its masked pieces of the squared norms (and, for multi-Krum,
           the pairwise squared distances; range: the one-bit range checks,
           node/runtime/secure_range.py) of the entering dealers; others abstain (an empty
           message: "I have nothing to open", so nobody waits for them). Decoded with
           correction (n >= 3t + 1): an opener whose piece is wrong is named.
  agree    every member runs the same selection on the decoded integers (node/secagg
           robust.select: the norm bound, then multi-Krum at f = t, or the norm bound only;
           range: the dealers in range, the others excluded as "norm_out_of_range")
           and broadcasts its agreement (review finding C2): a hash of (round, entered,
           openers, selected, sum openers) and the digest of every member's check and
           degree2 body as it used them. A disagreeing agreement names its sender only:
           `split_view` (its own body misreported), `split_claim` (a third's), `bad_agreement`.
  sum      a member opens its piece of the selected members' sum (if it is an opener, minus
           the wrong degree-2 openers) only once `agreement_quorum` = ceil((n + t + 1) / 2)
           agreements equal its own, its own included (any two quorums share an honest
           member, who signs one agreement: no two honest members open for different
           sets); else the round fails, `no_agreement`, nothing opened. Decoded with
           correction: a wrong piece is named. Every member reconstructs the same aggregate.

Refusals (the round fails with a named `SecureOutcome.reason`; the next round goes on): fewer than
t + 2 entering dealers or selected members ("too_few_contributors": an opening over m <= t + 1
contributions could hold one honest one only; nobody opens), fewer than 2t + 1 (3t + 1) openers
("too_few_openers": more than t members dropped, or the entry would drop a dealing on t
members' word), more wrong pieces than the code corrects ("too_many_wrong"), no quorum of
matching agreements ("no_agreement"), our agreement stored before a restart not the one we compute
now ("agreement_changed"), an aggregate failing its exact norm check ("aggregate_out_of_bounds"),
fewer selected than `floor` ("below_charged_floor": with DP on the sum, the contributors the ledger
charged the round for). Variant "sum_only" (DP on the sum) opens nothing per member: the degree-2
step abstains and every entered dealer is summed (robust.select_without_opening).

What a member learns (docs/privacy-secure.md): the aggregate of the selected members, the
squared norms and distances (variants distances, norm_only) or one bit per member (range:
node/runtime/secure_range.py), who entered, was selected, was named and why. The check's
challenge (Fiat-Shamir on each deal's commitment) and the disputes: secure_disputes.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from hashlib import blake2b

import numpy as np

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.errors import LocalError, RemoteError
from gossip.protocol.phases import SHARE, PhaseSpec
from node.runtime import secure_blame, secure_entry, secure_explain, secure_kept, secure_range
from node.runtime.secure_agree import (
    AGREE_BYTES,
    AGREE_NONE,
    AGREE_STEPS,
    ENTER_STEPS,
    agreement_quorum,
    body_digest,
    opened_elsewhere,
)
from node.runtime.secure_disputes import COMMIT_BYTES, challenge, piece_digest, settle
from node.secagg import robust
from node.secagg.encoding import AggregateOutOfBounds, FixedPoint, IntegerCodec
from node.secagg.errors import PieceError, SecAggError, TooFewPieces, TooManyWrong
from node.secagg.pieces import CHECK, DEGREE2, MASK, SEED, SUM, VECTOR, Piece, from_bytes, to_bytes
from node.secagg.range_check import OutOfRange, RangeParams

CHECK_PHASE, ENTER_PHASE, DEGREE2_PHASE, AGREE_PHASE, SUM_PHASE = (
    "check", "enter", "degree2", "agree", "sum")
assert AGREE_STEPS == (CHECK_PHASE, DEGREE2_PHASE)  # the steps an agreement's table names
SECURE_PHASES = (SHARE, PhaseSpec(CHECK_PHASE), PhaseSpec(ENTER_PHASE), PhaseSpec(DEGREE2_PHASE),
                 PhaseSpec(AGREE_PHASE), PhaseSpec(SUM_PHASE))
# sum_only opens no degree-2 value: no entry agreement, no extra exchange
SUM_ONLY_PHASES = tuple(p for p in SECURE_PHASES if p.name != ENTER_PHASE)


def secure_phases(variant: str) -> tuple[PhaseSpec, ...]:
    """The round machine's phases for the variant (from the consortium's [rules])."""
    return SUM_ONLY_PHASES if variant == "sum_only" else SECURE_PHASES


# Deal seeded (see `SecureRound.deal`): measured at 8 members, t = 2, d = 4,810 (digits MLP),
# memory transport: 475 KB sent per member and round seeded, 552 KB unseeded, against 153 KB
# for today's sealed plain round (docs/privacy-secure.md "What is wired").
SEEDED_DEALING = True
REASONS = ("too_few_contributors", "too_few_openers", "too_many_wrong",
           "aggregate_out_of_bounds", "below_charged_floor", "no_agreement",
           "agreement_changed", "aggregate_too_large")


@dataclass
class SecureOutcome:
    """What a secure round gave this member: `ok` and the aggregate (the field sum of the
    selected members' encodings, and its decoding), or the named `reason` it failed; who
    dealt, entered, was selected, and who was named for what (member -> why)."""

    round: int
    ok: bool
    reason: str | None = None
    detail: str = ""
    field_sum: np.ndarray | None = None
    total: np.ndarray | None = None
    dealt: tuple[str, ...] = ()
    entered: tuple[str, ...] = ()
    selected: tuple[str, ...] = ()
    excluded: dict[str, str] = field(default_factory=dict)  # left out by the selection
    named: dict[str, str] = field(default_factory=dict)  # members at fault (or disputed)
    # member -> the senders whose agreement (or dispute reveal) shows it at fault: evidence
    disagreed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    claims: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split_claim: about whom
    # our round failed, these (> t) opened the sum: our model differs (opened_elsewhere)
    missed: tuple[str, ...] = ()


class SecureRound:
    """Member `me`'s round r among `members` (sorted: member i is evaluation point i + 1)."""

    def __init__(self, me: str, members: tuple[str, ...] | list[str], threshold: int,
                 variant: str, codec: FixedPoint | IntegerCodec, r: int, consortium_id: bytes,
                 floor: int = 0, l2_bound: float | None = None,
                 range_params: RangeParams | None = None) -> None:
        self.members = tuple(sorted(members))
        # DP on the sum: the L2 bound of an honest aggregate (secure_bounds.sum_l2_bound)
        self.l2_bound = l2_bound
        # the least contributors a sum opens with: DP on the sum, the ledger's charged
        # count (SecurePlan.min_contributors; fewer under-count epsilon: may_open_round)
        self.floor = floor
        if me not in self.members:
            raise LocalError(f"{me!r} is not a member of the secure round")
        self.me, self.r = me, r
        self.index = {m: i + 1 for i, m in enumerate(self.members)}
        self.i = self.index[me]
        self.params = robust.RoundParams(r, len(self.members), threshold, codec, variant,
                                         witness=range_params.width if range_params else 0)
        self.rp, self.x_commitment, self.witness_of = range_params, b"", secure_range.dealer_witness
        self.consortium_id = consortium_id
        self.commitments: dict[int, bytes] = {}  # dealer -> its commitment, as we received it
        self.vectors: dict[int, Piece] = {}  # dealer -> its VECTOR piece for us
        self.masks: dict[int, Piece] = {}
        self.out = SecureOutcome(r, False)
        self._bodies: dict[str, bytes] = {}  # our own body per step
        self._used: dict[str, dict[int, bytes]] = {}  # step -> member -> digest of its body
        self._statement: bytes | None = None  # the agreement we computed (None: none)
        self._entry_statement: bytes | None = None  # the entry agreement we computed
        # (dealer, holder) -> piece kind -> the check value the holder's piece must give
        self.disputes: dict[tuple[int, int], dict[int, int]] = {}
        # members we keep out (proven at fault before: secure_kept.py), and where this round
        # records the ones it proves (SecureRounds shares one record across rounds)
        self.kept_out: Mapping[str, str] = {}
        self.proven: dict[str, str] = {}
        self.entered: tuple[int, ...] = ()
        self.openers: tuple[int, ...] = ()
        self.selected: tuple[int, ...] = ()
        self.sum_openers: tuple[int, ...] = ()

    # --- the share phase: deal ------------------------------------------------------------
    def deal(self, encoded: np.ndarray) -> dict[str, bytes]:
        """Our dealing of `encoded` (a field vector of length d: codec.encode of the clipped
        contribution): recipient -> its deal body (the driver seals it to the recipient and
        signs it); our own pieces are kept."""
        # Seeded: t holders get a 32-byte seed instead of d + 1 values (robust.deal_encoded):
        # t / (n - 1) of the dealing's bytes saved; their pieces' hiding is then
        # computational (SHAKE-256), the others' information-theoretic.
        try:
            pieces = robust.deal_encoded(self.params, self.i, encoded, seeded=SEEDED_DEALING,
                                         witness=self.rp and self.witness_of(self, encoded))
        except OutOfRange as exc:  # our own vector fails its range: we do not deal (one bit)
            self.out.detail = f"norm_out_of_range: {exc}"
            return {}
        raw = {j: (to_bytes(vec), to_bytes(mask)) for j, (vec, mask) in pieces.items()}
        out_of = secure_kept.kept_out_points(self)  # dealt nothing: KEPT_OUT in their slot
        commitment = b"".join(secure_kept.KEPT_OUT if j in out_of else piece_digest(*raw[j])
                              for j in sorted(raw)) + self.x_commitment
        self.commitments[self.i] = commitment
        out = {}
        for m, j in self.index.items():
            if m == self.me:
                self.vectors[j], self.masks[j] = pieces[j]
            elif j not in out_of:
                out[m] = encode_secagg(SecAgg("deal", (*raw[j], commitment)))
        return out

    def own_pieces(self) -> tuple[bytes, bytes] | None:
        """Our own pieces of our dealing (None: we have not dealt), to store with the deals."""
        if self.i not in self.vectors:
            return None
        return to_bytes(self.vectors[self.i]), to_bytes(self.masks[self.i])

    def restore(self, own: tuple[bytes, bytes], commitment: bytes) -> None:
        """Our own pieces of a dealing stored before a restart (re-sent, never redrawn)."""
        p = self.params
        self.commitments[self.i] = commitment
        vec = from_bytes(own[0], expected_count=p.width, expected_kind=VECTOR)
        mask = from_bytes(own[1], expected_count=p.opened + 1, expected_kind=MASK)
        if vec.key != (self.r, VECTOR, self.i, self.i) or mask.key != (self.r, MASK, self.i, self.i):
            raise LocalError(f"stored dealing of round {self.r} is not ours (keys {vec.key}, "
                             f"{mask.key}): the state dir is another member's?")
        self.vectors[self.i], self.masks[self.i] = vec, mask

    def file_deal(self, sender: str, msg: SecAgg) -> str | None:
        """A dealer's deal for us (decoded and opened by the verifier). None if filed; the
        reason (the dealer's fault) if its pieces are unusable: then it is not held."""
        j = self.index.get(sender)
        if j is None or msg.step != "deal" or len(msg.pieces) != 3:
            return f"not a deal of a member of this round ({sender})"
        if sender in self.kept_out:  # not held: our check does not name its dealing
            self.out.named.setdefault(sender, f"kept_out: {self.kept_out[sender]}")
            return self.out.named[sender]
        p = self.params
        try:
            commitment = msg.pieces[2]
            if len(commitment) != secure_range.commit_bytes(p):
                raise PieceError(f"a commitment of {len(commitment)} bytes, expected "
                                 f"{secure_range.commit_bytes(p)}", j)
            mine = commitment[COMMIT_BYTES * (self.i - 1):COMMIT_BYTES * self.i]
            if piece_digest(msg.pieces[0], msg.pieces[1]) != mine:
                raise PieceError("its pieces for us do not match its own commitment", j)
            vec = from_bytes(msg.pieces[0], sender=j)
            if vec.kind == SEED:
                vec = robust.expand_seed_piece(p, vec)
            mask = from_bytes(msg.pieces[1], expected_count=p.opened + 1, expected_kind=MASK,
                              sender=j)
            for piece, kind, size in ((vec, VECTOR, p.width), (mask, MASK, p.opened + 1)):
                if (piece.round, piece.kind, piece.owner, piece.holder) != (self.r, kind, j, self.i):
                    raise PieceError(f"piece keyed {piece.key}, expected {(self.r, kind, j, self.i)}", j)
                if piece.values.size != size:
                    raise PieceError(f"{piece.values.size} values, expected {size}", j)
            if self.rp and (fault := secure_range.deal_fault(self, vec, commitment)):
                raise PieceError(fault, j)
        except SecAggError as exc:
            self.out.named[sender] = f"bad_piece: {exc}"
            return f"bad_piece: {exc}"
        self.vectors[j], self.masks[j], self.commitments[j] = vec, mask, commitment
        return None

    # --- check ------------------------------------------------------------------------------
    def check(self) -> bytes:
        """Our check body: the blinded checks of every dealing we hold, naming the dealers."""
        held = tuple(sorted(self.vectors))
        if not held:
            body = encode_secagg(SecAgg(CHECK_PHASE, ()))
        else:  # each dealing checked under its own challenge (its commitment's hash)
            total = np.zeros(2 * self.params.members, dtype=np.uint64)
            for i in held:
                one = robust.check_piece(self.params, self.i, self.vectors, self.masks, (i,),
                                         challenge(self.consortium_id, self.r, i,
                                                   self.commitments[i]))
                total += one.values  # entries of other dealers are 0: no overflow
            piece = Piece(self.r, CHECK, 0, self.i, total)
            body = encode_secagg(SecAgg(CHECK_PHASE, (to_bytes(piece),), held))
        self._bodies[CHECK_PHASE] = body
        return body

    # --- degree2 ----------------------------------------------------------------------------
    def degree2(self, checks: Mapping[str, bytes]) -> bytes:
        """Variant sum_only (no entry step: nothing per member is opened): judge the
        dealings from the checks, then abstain (an empty degree-2 body)."""
        return self._entry(checks, DEGREE2_PHASE) or self._abstain(DEGREE2_PHASE)

    def enter(self, checks: Mapping[str, bytes]) -> bytes:
        """Judge the dealings from the checks (the peers' that the machine collected; ours
        is added), then our entry agreement: the entered dealers and openers, and the
        digest of every check body we used (empty: we open nothing). No degree-2 piece
        leaves before the entry agreements are compared (`open_degree2`)."""
        failed = self._entry(checks, ENTER_PHASE)
        if failed is not None:
            return failed
        self._entry_statement = self._agreement(b"flnode-sa-enter", ENTER_STEPS,
                                                (self.entered, self.openers))
        body = encode_secagg(SecAgg(ENTER_PHASE, (self._entry_statement,)))
        self._bodies[ENTER_PHASE] = body
        return body

    def open_degree2(self, enters: Mapping[str, bytes]) -> bytes:
        """Our degree-2 body once a quorum of entry agreements (ours included) matches ours,
        as for the sum: no two honest members open degree-2 pieces over different entered
        sets; else empty, and the round fails (`no_agreement`, nothing opened)."""
        if self.out.reason is not None:
            return self._abstain(DEGREE2_PHASE)
        failed = self._quorum(DEGREE2_PHASE, ENTER_PHASE, enters, self._entry_statement,
                              ENTER_STEPS, "the entered dealers")
        if failed is not None:
            return failed
        if self.i not in self.openers:
            return self._abstain(DEGREE2_PHASE)
        piece = secure_range.degree2_piece(self) if self.rp else \
            robust.degree2_piece(self.params, self.i, self.vectors, self.masks, self.entered)
        body = encode_secagg(SecAgg(DEGREE2_PHASE, (to_bytes(piece),)))
        self._bodies[DEGREE2_PHASE] = body
        return body

    def _entry(self, checks: Mapping[str, bytes], step: str) -> bytes | None:
        """Judge the dealings from the checks: the entered dealers and the openers (None),
        or the failed `step`'s empty body."""
        self._used[CHECK_PHASE] = self._digests(CHECK_PHASE, checks)
        got = self._read(CHECK_PHASE, checks, CHECK, 2 * self.params.members)
        held = secure_kept.void_claims(self.commitments, {j: set(m.held) for j, (m, _) in got.items()})
        pieces = {j: piece for j, (_, piece) in got.items() if piece is not None}
        self.out.dealt = tuple(self.members[i - 1] for i in sorted(  # held by another member
            {i for j, h in held.items() for i in h if i != j}))
        consistent, disputed = self._judge(held, pieces)
        entered = set(consistent)
        t = self.params.threshold
        able = [j for j in pieces if j not in disputed]
        # Openers needed: the degree-2t values with up to t lying openers need 3t + 1 (2t + 1
        # determine them, t more detect t wrong: robust.open_degree2); the degree-t sum
        # alone 2t + 1. Fewer fail the round: never a decode steered by the liars.
        need, rule = (2 * t + 1, "2t + 1") if self.params.variant == "sum_only" else \
            (3 * t + 1, "3t + 1")
        if len(able) < need:
            return self._fail(step, "too_few_openers",
                              f"{len(able)} member(s) opened a usable check, {rule} = "
                              f"{need} needed (too many dropped out or are in dispute)")
        # a dealing is dropped only when more than t check senders lack it (secure_entry)
        entered, openers, kept = secure_entry.enter(held, able, consistent, t, need)
        self.entered, self.openers = tuple(sorted(entered)), openers
        self.out.entered = tuple(self.members[i - 1] for i in self.entered)
        if (few := secure_entry.too_few(len(self.entered), t, "dealing(s) entered")) is not None:
            return self._fail(step, "too_few_contributors", few)
        if len(openers) < need:
            return self._fail(step, "too_few_openers",
                              f"{len(openers)} member(s) can open, {rule} = {need} needed "
                              f"(too many dropped out or are in dispute; {kept})")
        return None

    def _judge(self, held: dict[int, set[int]], pieces: dict[int, Piece]
               ) -> tuple[list[int], set[int]]:
        """Per dealer, from the checks of the holders that hold it: consistent dealers, and
        the holders in dispute with one (both named as a claim)."""
        consistent, disputed = [], set()
        for i in sorted(set().union(*held.values()) if held else ()):
            holders = {j: pieces[j] for j in pieces if i in held[j]}
            try:
                verdict = robust.judge_dealings(self.params, holders, (i,))
            except TooFewPieces:  # too few holders hold it (lost, or dealt to few): not entered
                continue
            except (TooManyWrong, PieceError) as exc:
                self.out.named.setdefault(self.members[i - 1], f"inconsistent_pieces: {exc}")
                continue
            if i in verdict.refused:
                self.out.named.setdefault(self.members[i - 1],
                                          f"inconsistent_pieces: {verdict.refused[i]}")
                continue
            if i in verdict.unresolved:  # too few checks to tell dealer from holders: all
                continue                 # dealers' checks at once decide (secure_explain)
            consistent.append(i)
            for (_, j, kind), expected in verdict.disputes.items():
                self.disputes.setdefault((i, j), {})[kind] = expected
                disputed.add(j)
                self.out.named.setdefault(self.members[j - 1], (
                    f"dispute: its check of {self.members[i - 1]}'s dealing disagrees (it, or "
                    "that dealer, sent a wrong value: a claim, not a proof)"))
        return secure_explain.unresolved(self, held, pieces, consistent, disputed)

    # --- agree ----------------------------------------------------------------------------
    def agree(self, degree2: Mapping[str, bytes]) -> bytes:
        """Open the degree-2 values, select (every member the same way), then our agreement:
        what we open the sum for, and the digest of every check and degree2 body we used
        (empty: we open nothing). No sum piece leaves before the agreements compare (`sum`)."""
        if self.out.reason is not None:
            return self._abstain(AGREE_PHASE)
        self._used[DEGREE2_PHASE] = self._digests(DEGREE2_PHASE, degree2)
        wrong: tuple[int, ...] = ()
        if self.params.variant == "sum_only":  # nothing per member opened: every entered dealer
            sel = robust.select_without_opening(self.params, self.entered)
        else:
            got = self._read(DEGREE2_PHASE, degree2, DEGREE2, self.params.opened, self.openers)
            opened = {j: piece for j, (_, piece) in got.items() if piece is not None}
            try:
                if self.rp:  # one bit per entered dealer: in range or not
                    sel, wrong = secure_range.select(self, opened)
                else:
                    values = robust.open_degree2(self.params, opened, self.entered)
                    sel, wrong = robust.select(self.params, values), values.wrong
            except (TooFewPieces, TooManyWrong) as exc:
                return self._fail(AGREE_PHASE, "too_few_openers" if isinstance(exc, TooFewPieces)
                                  else "too_many_wrong", str(exc))
            self._name(wrong, "wrong_degree2_piece")
        self.selected = sel.selected
        self.out.selected = tuple(self.members[i - 1] for i in sel.selected)
        self.out.excluded = {self.members[i - 1]: why for i, why in sel.excluded.items()}
        t = self.params.threshold
        if (few := secure_entry.too_few(len(sel.selected), t, "member(s) selected")) is not None:
            return self._fail(AGREE_PHASE, "too_few_contributors", few)
        if len(sel.selected) < self.floor:
            return self._fail(AGREE_PHASE, "below_charged_floor",
                              f"{len(sel.selected)} member(s) selected, fewer than the "
                              f"{self.floor} the privacy ledger charged the round for: opening "
                              "their sum would under-count epsilon; not opened")
        self.sum_openers = tuple(j for j in self.openers if j not in wrong)
        self._statement = self._agreement(b"flnode-sa-agree", AGREE_STEPS, (
            self.entered, self.openers, self.selected, self.sum_openers))
        body = encode_secagg(SecAgg(AGREE_PHASE, (self._statement,)))
        self._bodies[AGREE_PHASE] = body
        return body

    def _digests(self, step: str, bodies: Mapping[str, bytes]) -> dict[int, bytes]:
        """member -> digest of its `step` body as we use it (ours included)."""
        own = self._bodies.get(step)
        out = {self.index[s]: body_digest(b) for s, b in bodies.items() if s in self.index}
        if own is not None:
            out[self.i] = body_digest(own)
        return out

    def _agreement(self, person: bytes, steps: tuple[str, ...],
                   sets: tuple[tuple[int, ...], ...]) -> bytes:
        """A statement: hash(consortium, round, the sets, the digests), then the digests:
        per member its body's of each of `steps` (agree: (entered, openers, selected, sum
        openers), check and degree2; enter: (entered, openers), check)."""
        table = b"".join(self._used.get(step, {}).get(i, AGREE_NONE)
                         for i in range(1, self.params.members + 1) for step in steps)
        packed = b"".join(len(x).to_bytes(4, "little") + b"".join(i.to_bytes(4, "little") for i in x)
                          for x in sets)
        h = blake2b(self.consortium_id + self.r.to_bytes(8, "little") + packed + table,
                    digest_size=AGREE_BYTES, person=person).digest()
        return h + table

    # --- sum ----------------------------------------------------------------------------------
    def my_disputes(self) -> tuple[int, ...]:
        """The dealers whose dealing our check disagrees with: we reveal their signed deal."""
        return tuple(sorted(i for (i, j) in self.disputes if j == self.i))

    def sum(self, agreements: Mapping[str, bytes],
            reveals: Mapping[tuple[int, int], SecAgg | str] | None = None) -> bytes:
        """Our sum body once a quorum of agreements (ours included) matches ours
        (`agreement_quorum`); else empty, and the round fails (`no_agreement`): nothing of
        the sum is opened. A mismatching agreement names who split the views."""
        if self.out.reason is not None:
            return self._abstain(SUM_PHASE)
        failed = self._quorum(SUM_PHASE, AGREE_PHASE, agreements, self._statement, AGREE_STEPS,
                              "what we would open", reveals or {})
        if failed is not None:
            return failed
        if self.i not in self.sum_openers:
            return self._abstain(SUM_PHASE)
        piece = robust.sum_piece(self.params, self.i, self.vectors, self.selected)
        body = encode_secagg(SecAgg(SUM_PHASE, (to_bytes(piece),)))
        self._bodies[SUM_PHASE] = body
        return body

    def _quorum(self, step: str, kind: str, agreements: Mapping[str, bytes],
                statement: bytes | None, steps: tuple[str, ...], what: str,
                reveals: Mapping[tuple[int, int], SecAgg | str] | None = None) -> bytes | None:
        """None once `agreement_quorum` agreements of `kind` (ours included) equal our
        `statement`; else `step` failed (`no_agreement`, or `agreement_changed`: the one we
        signed before a restart is not the one we compute now), its empty body. A
        mismatching agreement names who split the views; `reveals` (the sum step's) settle
        the disputes among the members that agree."""
        own = self._bodies.get(kind)
        signed = decode_secagg(own, self.params.members).pieces[:1] if own else ()
        if statement is None or signed != (statement,):
            # a run before a restart agreed to something else: never open
            return self._fail(step, "agreement_changed",
                              f"the {kind} agreement we signed before a restart is not the one "
                              "we compute now (our view of the round changed): not opened")
        q = agreement_quorum(self.params.members, self.params.threshold)
        matching = [self.me]
        for sender, body in sorted(agreements.items()):
            if sender == self.me or sender not in self.index:
                continue
            try:
                msg = decode_secagg(body, self.params.members, sender)
                if msg.step != kind or msg.held:
                    raise PieceError(f"a {msg.step} message where an agreement was expected",
                                     self.index[sender])
                if msg.pieces and len(msg.pieces[0]) != len(statement):
                    raise PieceError(f"an agreement of {len(msg.pieces[0])} bytes, "
                                     f"{len(statement)} expected", self.index[sender])
            except (RemoteError, SecAggError) as exc:
                self.out.named.setdefault(sender, f"bad_{kind}: {exc}")
                continue
            if not msg.pieces:
                continue  # it opens nothing this round: not counted either way
            if msg.pieces[0] == statement:
                matching.append(sender)
            else:
                secure_blame.disagree(self, sender, msg.pieces[0], statement, steps)
        if reveals is not None:
            settle(self, reveals, {self.index[m] for m in matching})
        if len(matching) < q:
            return self._fail(step, "no_agreement",
                              f"{len(matching)} member(s) agree on {what} ({', '.join(matching)}"
                              f"; {kind} step), {q} = ceil((n + t + 1) / 2) needed: the "
                              "members' views of the round differ, nothing opened")
        return None

    def finish(self, sums: Mapping[str, bytes]) -> SecureOutcome:
        """The aggregate from the sum pieces (the same at every member), or the reason (and
        who opened the sum all the same: `missed`)."""
        if self.out.reason is not None:
            self.out.missed = opened_elsewhere(sums, self.me, self.members, self.params.threshold)
            return self.out
        got = self._read(SUM_PHASE, sums, SUM, self.params.codec.dim, self.sum_openers)
        opened = {j: piece for j, (_, piece) in got.items() if piece is not None}
        try:
            agg = robust.open_sum(self.params, opened, self.selected)
        except (TooFewPieces, TooManyWrong) as exc:
            self._fail(SUM_PHASE, "too_few_openers" if isinstance(exc, TooFewPieces)
                       else "too_many_wrong", str(exc))
            return self.out
        except AggregateOutOfBounds as exc:
            self._fail(SUM_PHASE, "aggregate_out_of_bounds", str(exc))
            return self.out
        self._name(agg.wrong, "wrong_sum_piece")
        if self.l2_bound is not None:
            norm = float(np.linalg.norm(np.asarray(agg.total, dtype=np.float64)))
            if not norm <= self.l2_bound:
                self._fail(SUM_PHASE, "aggregate_too_large",
                           f"the sum of {len(self.selected)} has L2 norm {norm:.6g} > "
                           f"{self.l2_bound:.6g}, the bound of an honest sum (its sampled rows "
                           "at the clip plus the noise's tail, failing at most 3 x 2^-40): "
                           "some member added more than its rows and noise explain")
                return self.out
        self.out.ok, self.out.field_sum, self.out.total = True, agg.field_sum, agg.total
        return self.out

    # --- helpers --------------------------------------------------------------------------------
    def _read(self, step: str, bodies: Mapping[str, bytes], kind: int, count: int,
              allowed: tuple[int, ...] | None = None) -> dict[int, tuple[SecAgg, Piece | None]]:
        """The step's messages (ours included) decoded: holder -> (message, piece or None:
        abstained). A malformed one is named and left out; a piece from a member not
        allowed to open at this step is ignored (named: it opened when it should not)."""
        out: dict[int, tuple[SecAgg, Piece | None]] = {}
        own = self._bodies.get(step)
        for sender, body in sorted({**bodies, **({self.me: own} if own else {})}.items()):
            j = self.index.get(sender)
            if j is None:
                continue
            try:
                msg = decode_secagg(body, self.params.members, sender)
                piece = None
                if msg.pieces:
                    piece = from_bytes(msg.pieces[0], expected_count=count, expected_kind=kind,
                                       sender=j)
                    if (piece.round, piece.owner, piece.holder) != (self.r, 0, j):
                        raise PieceError(f"piece keyed {piece.key}, expected "
                                         f"{(self.r, kind, 0, j)}", j)
            except (RemoteError, SecAggError) as exc:
                self.out.named.setdefault(sender, f"bad_{step}: {exc}")
                continue
            if piece is not None and allowed is not None and j not in allowed:
                self.out.named.setdefault(sender, f"unexpected_{step}: it opened a piece "
                                                  "while not an opener of this step")
                continue
            out[j] = (msg, piece)
        return out

    def _name(self, wrong: tuple[int, ...], why: str) -> None:
        for j in wrong:
            self.out.named.setdefault(self.members[j - 1], why)

    def _fail(self, step: str, reason: str, detail: str) -> bytes:
        self.out.ok, self.out.reason, self.out.detail = False, reason, detail
        return self._abstain(step)

    def _abstain(self, step: str) -> bytes:
        body = encode_secagg(SecAgg(step, ()))
        self._bodies[step] = body
        return body


class SecureRounds:
    """The driver's glue between the round machine's actions and `SecureRound`, the same for
    the node and the tests: one SecureRound per round, created when the round trains."""
    round_class: type[SecureRound] = SecureRound  # a subclass's rounds (secure_open.py)

    def __init__(self, me: str, members: tuple[str, ...] | list[str], threshold: int,
                 variant: str, codec: FixedPoint | IntegerCodec, consortium_id: bytes,
                 floor: int = 0, l2_bound: float | None = None,
                 range_params: RangeParams | None = None) -> None:
        self.me, self.members, self.range_params = me, tuple(sorted(members)), range_params
        self.threshold, self.variant, self.codec = threshold, variant, codec
        self.consortium_id, self.floor, self.l2_bound = consortium_id, floor, l2_bound
        self.rounds: dict[int, SecureRound] = {}
        self.proven: dict[str, str] = {}  # member -> why: kept out of the rounds created later

    def round(self, r: int) -> SecureRound:
        if r not in self.rounds:
            self.rounds = {k: v for k, v in self.rounds.items() if k >= r}  # bounded memory
            self.rounds[r] = self.round_class(self.me, self.members, self.threshold, self.variant,
                                              self.codec, r, self.consortium_id, self.floor,
                                              self.l2_bound, self.range_params)
            # the members proven at fault in the rounds before (secure_kept.py)
            self.rounds[r].kept_out, self.rounds[r].proven = dict(self.proven), self.proven
        return self.rounds[r]

    def deal(self, r: int, encoded: np.ndarray) -> dict[str, bytes]:
        """At `Train(r)`: our deal bodies, recipient -> body (seal, sign, send at SendShare)."""
        return self.round(r).deal(encoded)

    def phase(self, r: int, phase: str, got: Mapping[str, Mapping[str, bytes]],
              deals: Mapping[str, SecAgg],
              reveals: Mapping[tuple[int, int], SecAgg | str] | None = None) -> bytes:
        """At `SendPhase(r, phase)`: our body for the step. `deals`: the deals the round
        book holds for r (sender -> opened deal), filed at the check. The bodies of the
        steps before come from the machine (`SendPhase.got`). Our own pieces unable to make
        the step (a restart lost a deal our stored check holds: review 2 F10) abstain from
        it, `lost_pieces` in the outcome's detail: the others decode without us."""
        sr = self.round(r)
        try:
            return self._phase(sr, phase, got, deals, reveals)
        except SecAggError as exc:
            sr.out.detail = f"lost_pieces: our {phase} piece abstained: {exc}"
            return sr._abstain(phase)

    def _phase(self, sr: SecureRound, phase: str, got: Mapping[str, Mapping[str, bytes]],
               deals: Mapping[str, SecAgg], reveals: Mapping[tuple[int, int], SecAgg | str] | None
               ) -> bytes:
        if phase == CHECK_PHASE:
            for sender, msg in sorted(deals.items()):
                sr.file_deal(sender, msg)
            return sr.check()
        if phase == ENTER_PHASE:
            return sr.enter(got.get(CHECK_PHASE, {}))
        if phase == DEGREE2_PHASE and self.variant == "sum_only":
            return sr.degree2(got.get(CHECK_PHASE, {}))
        if phase == DEGREE2_PHASE:
            return sr.open_degree2(got.get(ENTER_PHASE, {}))
        if phase == AGREE_PHASE:
            return sr.agree(got.get(DEGREE2_PHASE, {}))
        if phase == SUM_PHASE:
            return sr.sum(got.get(AGREE_PHASE, {}), reveals)
        raise LocalError(f"secure round: no step {phase!r}")

    def keep_own(self, r: int, phase: str, body: bytes) -> None:
        """Our body of a step as a run before a restart sent it (node/runtime/secure_node.py
        stores each step's signed message before it leaves): the round reads that one as
        ours, so it never opens a second, different piece of the same step."""
        self.round(r)._bodies[phase] = bytes(body)

    def close(self, r: int, phases: Mapping[str, Mapping[str, bytes]]) -> SecureOutcome:
        """At `Close(r)`: the round's outcome (the aggregate, or why it failed)."""
        out = self.round(r).finish(phases.get(SUM_PHASE, {}))
        self.rounds.pop(r, None)
        return out

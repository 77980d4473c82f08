"""The optimistic sum opening (issue 22's bytes goal): a secure round's last steps, after
the agreement, when n - 1 > 2t. Pure, like node/runtime/secure_round.py, whose `sum` step
it reuses (the agreement quorum, then our piece of the selected members' sum).

  sum       our sum piece goes to our 2t ring neighbours only, members i +- 1..t
            (robust.sum_recipients; a symmetric relation, so a `PhaseSpec` with those peers
            sends and waits for the same members): every member holds 2t + 1 pieces, its
            own included, instead of n. Today's round sent each piece to the n - 1 others.
  confirm   (broadcast, 32 bytes) each member decodes from its 2t + 1 pieces WITHOUT
            correcting (2t + 1 points on one degree-t polynomial include t + 1 honest ones,
            so agreeing pieces give the true sum whatever t liars sent; any disagreement or
            missing piece is detected): "ok" with the digest of the aggregate it decoded
            (round, selected, field sum), or "need" (an empty piece), or nothing (its round
            already failed: it opens nothing, no fallback is owed to it).
  fallback  (to the n - 1 - 2t others) if any member that opens the sum said "need", was
            silent (its confirm missing: it may not hold its pieces), sent a malformed
            confirm, or an "ok" with another digest than ours (a liar: honest decodes are
            equal, named `bad_confirm`), or we need ourselves: our sum piece, the same bytes
            as our "sum" piece; else nothing (an empty message, so nobody waits for us).
            Everyone holding fallback pieces decodes from all its pieces as today's round
            did (correcting t, naming the wrong: `wrong_sum_piece`).

Why no liar gets more than the fallback: an honest member applies either its own
detecting decode of 2t + 1 agreeing pieces or a correcting decode of all pieces, each
the true sum when at most t lie; both together and differing (more than t liars) fails
the round, `too_many_wrong`. A lying "ok", "need" or silence only makes the honest members
send the fallback pieces (today's bytes); a member that holds a wrong piece is named by the
members it sent it to. Split outcomes: an honest member that needs says so to every
member, and every honest member then sends it its piece: it decodes from at least the
n - t honest pieces, as today. What is left as today: a member whose "need" arrives after
another's confirm step closed (its deadline) gets no piece from that member.

Restart: the node stores each step's signed message before it leaves and re-sends it byte
for byte (node/runtime/secure_node.py send_phase); the round reads the stored confirm as
ours, so a stored "need" still makes us send the fallback piece the others expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b

import numpy as np

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.errors import RemoteError
from gossip.protocol.phases import PhaseSpec
from node.runtime.secure_round import (
    SUM_PHASE,
    SecureOutcome,
    SecureRound,
    SecureRounds,
    secure_phases,
)
from node.secagg import robust
from node.secagg.encoding import AggregateOutOfBounds
from node.secagg.errors import SecAggError, TooFewPieces, TooManyWrong
from node.secagg.pieces import SUM, Piece
from node.secagg.shamir import decode

CONFIRM_PHASE, FALLBACK_PHASE = "confirm", "fallback"
CONFIRM_BYTES = 32  # the digest of the aggregate a member decoded (blake2b-256)
NEED = b""  # a confirm's piece when the member could not decode from its 2t + 1 pieces
# Rounds whose opening path `OptimisticRounds.paths` keeps (tests, the bench): bounded memory
KEPT_PATHS = 64


def optimistic(members: int, threshold: int) -> bool:
    """Whether the ring opening sends fewer pieces than everyone-to-everyone."""
    return members - 1 > 2 * threshold


def ring(members: tuple[str, ...] | list[str], threshold: int, me: str
         ) -> tuple[frozenset[str], frozenset[str]]:
    """(our 2t ring neighbours, the others but us): the sum's and the fallback's peers."""
    names = tuple(sorted(members))
    n, i = len(names), names.index(me) + 1
    near = {(i - 1 + k) % n for k in (*range(1, threshold + 1), *range(-threshold, 0))}
    return (frozenset(names[k] for k in near),
            frozenset(m for k, m in enumerate(names) if k not in near and m != me))


def open_phases(variant: str, me: str, members: tuple[str, ...] | list[str],
                threshold: int) -> tuple[PhaseSpec, ...]:
    """Member `me`'s phases: `secure_phases(variant)` with the sum sent to the ring, then
    confirm and fallback (today's phases when n - 1 <= 2t: the ring is everyone)."""
    base = secure_phases(variant)
    if not optimistic(len(members), threshold):
        return base
    near, far = ring(members, threshold, me)
    return (*(PhaseSpec(SUM_PHASE, near) if p.name == SUM_PHASE else p for p in base),
            PhaseSpec(CONFIRM_PHASE), PhaseSpec(FALLBACK_PHASE, far))


class OptimisticRound(SecureRound):
    """A SecureRound whose sum is opened by the ring first (module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        t = self.params.threshold
        self.near = robust.sum_recipients(self.params, self.i)
        self.early: np.ndarray | None = None  # the field sum of our 2t + 1 pieces, if they agree
        self.early_why = ""  # why we could not decode it (our "need")
        self.digest: bytes | None = None
        self.fallback_why: list[str] = []  # why we sent the fallback piece (empty: we did not)
        self.held_pieces = 2 * t + 1

    def _digest(self, value: np.ndarray) -> bytes:
        sel = b"".join(i.to_bytes(4, "little") for i in self.selected)
        return blake2b(self.consortium_id + self.r.to_bytes(8, "little") + sel
                       + np.ascontiguousarray(value, dtype="<u8").tobytes(),
                       digest_size=CONFIRM_BYTES, person=b"flnode-sa-conf").digest()

    def _decode(self, opened: Mapping[int, Piece], correct: bool) -> tuple[np.ndarray, tuple[int, ...]]:
        pieces = robust._opened(self.params, opened, SUM, self.params.codec.dim)
        got = decode(pieces, self.params.threshold, what="sum of the selected vectors",
                     expected=tuple(range(1, self.params.members + 1)), correct=correct,
                     max_errors=self.params.threshold)
        return got.value, got.wrong

    def _pieces(self, step: str, bodies: Mapping[str, bytes]) -> dict[int, Piece]:
        """The sum pieces of `step`: the sum's from our ring and us, the fallback's from
        the others (the round machine drops any other sender's as not a phase peer)."""
        got = self._read(step, bodies, SUM, self.params.codec.dim, self.sum_openers)
        ring = (j == self.i or j in self.near for j in got)
        return {j: piece for (j, (_, piece)), near in zip(got.items(), ring, strict=True)
                if piece is not None and near == (step == SUM_PHASE)}

    # --- confirm ----------------------------------------------------------------------------
    def confirm(self, sums: Mapping[str, bytes]) -> bytes:
        """"ok" and the digest of the sum our 2t + 1 pieces agree on, or "need"."""
        if self.out.reason is not None:
            return self._abstain(CONFIRM_PHASE)
        opened = self._pieces(SUM_PHASE, sums)
        if len(opened) < self.held_pieces:
            self.early_why = (f"{len(opened)} sum piece(s) of our ring and us, "
                              f"{self.held_pieces} = 2t + 1 needed to detect t wrong")
        else:
            try:
                self.early, _ = self._decode(opened, correct=False)
            except (TooFewPieces, TooManyWrong, SecAggError) as exc:
                self.early_why = f"our ring's sum pieces disagree: {exc}"
        if self.early is None:
            body = encode_secagg(SecAgg(CONFIRM_PHASE, (NEED,)))
        else:
            self.digest = self._digest(self.early)
            body = encode_secagg(SecAgg(CONFIRM_PHASE, (self.digest,)))
        self._bodies[CONFIRM_PHASE] = body
        return body

    # --- fallback ---------------------------------------------------------------------------
    def fallback(self, confirms: Mapping[str, bytes]) -> bytes:
        """Our sum piece for the members outside our ring if anyone may need it, else an
        empty message."""
        if self.out.reason is not None:
            return self._abstain(FALLBACK_PHASE)
        why = self.fallback_why
        own = self._bodies.get(CONFIRM_PHASE)  # the one we sent (a restart's stored one)
        if self.early is None or (own is not None and self._said(own) == NEED):
            why.append(f"we need it ({self.early_why or 'our stored confirm said need'})")
        # a missing confirm counts from the members whose check came (alive at the check:
        # they decode the sum too); any member's confirm is read
        alive = set(self.openers) | set(self._used.get("check", {}))
        for j in range(1, self.params.members + 1):
            sender = self.members[j - 1]
            if j == self.i:
                continue
            body = confirms.get(sender)
            if body is None:
                if j in alive:
                    why.append(f"{sender}'s confirm is missing")
                continue
            try:
                said = self._said(body, sender)
            except (RemoteError, SecAggError) as exc:
                self.out.named.setdefault(sender, f"bad_{CONFIRM_PHASE}: {exc}")
                why.append(f"{sender}'s confirm is malformed")
                continue
            if said is None:
                continue  # its round failed: it opens nothing, it applies nothing
            if said == NEED:
                why.append(f"{sender} needs it")
            elif self.digest is not None and said != self.digest:
                self.out.named.setdefault(sender, f"bad_{CONFIRM_PHASE}: its ok carries another "
                                          "aggregate's digest than the one we decoded from 2t + 1 "
                                          "agreeing pieces (honest decodes are equal)")
                why.append(f"{sender}'s digest differs from ours")
        sent = decode_secagg(self._bodies.get(SUM_PHASE, b""), self.params.members) \
            if self._bodies.get(SUM_PHASE) else None
        if why and sent is not None and sent.pieces:
            body = encode_secagg(SecAgg(FALLBACK_PHASE, (sent.pieces[0],)))
        else:
            body = encode_secagg(SecAgg(FALLBACK_PHASE, ()))
        self._bodies[FALLBACK_PHASE] = body
        return body

    def _said(self, body: bytes, sender: str | None = None) -> bytes | None:
        msg = decode_secagg(body, self.params.members, sender)
        if msg.step != CONFIRM_PHASE:
            raise SecAggError(f"a {msg.step} message where a confirm was expected")
        if not msg.pieces:
            return None
        if msg.pieces[0] not in (NEED,) and len(msg.pieces[0]) != CONFIRM_BYTES:
            raise SecAggError(f"a confirm of {len(msg.pieces[0])} bytes, 0 or "
                              f"{CONFIRM_BYTES} expected")
        return msg.pieces[0]

    def _missed(self, phases: Mapping[str, Mapping[str, bytes]]) -> SecureOutcome:
        """Our round failed: who opened the sum all the same (a sum or fallback piece, or an
        "ok"), named in `missed` when more than t did (secure_agree.opened_elsewhere)."""
        opened = set()
        for step in (SUM_PHASE, CONFIRM_PHASE, FALLBACK_PHASE):
            for sender, body in phases.get(step, {}).items():
                if sender == self.me or sender not in self.index:
                    continue
                try:
                    msg = decode_secagg(body, self.params.members, sender)
                except RemoteError:
                    continue
                if msg.step == step and msg.pieces and msg.pieces[0] != NEED:
                    opened.add(sender)
        self.out.missed = tuple(sorted(opened)) if len(opened) > self.params.threshold else ()
        return self.out

    # --- the outcome ------------------------------------------------------------------------
    def finish_open(self, phases: Mapping[str, Mapping[str, bytes]]) -> SecureOutcome:
        """The aggregate: our early decode, or all pieces decoded with correction (the
        fallback), the same at every honest member."""
        sums, late = phases.get(SUM_PHASE, {}), phases.get(FALLBACK_PHASE, {})
        if self.out.reason is not None:
            return self._missed(phases)
        if self.early is None and not self._bodies.get(CONFIRM_PHASE):
            self.confirm(sums)  # no confirm step reached (a test driving finish only)
        value = self.early
        others = self._pieces(FALLBACK_PHASE, late)
        if any(j != self.i for j in others):
            opened = {**self._pieces(SUM_PHASE, sums), **others}
            try:
                full, wrong = self._decode(opened, correct=True)
            except (TooFewPieces, TooManyWrong, SecAggError) as exc:
                if value is None:
                    self._fail(FALLBACK_PHASE, "too_few_openers" if isinstance(exc, TooFewPieces)
                               else "too_many_wrong", str(exc))
                    return self.out
            else:
                self._name(wrong, "wrong_sum_piece")
                if value is not None and not np.array_equal(value, full):
                    self._fail(FALLBACK_PHASE, "too_many_wrong",
                               "our ring's 2t + 1 agreeing pieces and all pieces decode to "
                               "different sums: more than t members lied; not applied")
                    return self.out
                value = full
        if value is None:
            self._fail(FALLBACK_PHASE, "too_few_openers" if "piece(s)" in self.early_why
                       else "too_many_wrong", f"{self.early_why}; no fallback pieces came")
            return self.out
        try:
            total = self.params.codec.decode_sum(value, len(self.selected))
        except AggregateOutOfBounds as exc:
            self._fail(SUM_PHASE, "aggregate_out_of_bounds", str(exc))
            return self.out
        if self.l2_bound is not None:
            norm = float(np.linalg.norm(np.asarray(total, dtype=np.float64)))
            if not norm <= self.l2_bound:
                self._fail(SUM_PHASE, "aggregate_too_large",
                           f"the sum of {len(self.selected)} has L2 norm {norm:.6g} > "
                           f"{self.l2_bound:.6g}, the bound of an honest sum")
                return self.out
        self.out.ok, self.out.field_sum, self.out.total = True, value, total
        return self.out


class OptimisticRounds(SecureRounds):
    """SecureRounds with the optimistic opening: the node's when n - 1 > 2t."""
    round_class = OptimisticRound

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # round -> "optimistic", or "fallback: why" (the last KEPT_PATHS rounds)
        self.paths: dict[int, str] = {}

    def _phase(self, sr: SecureRound, phase: str, got: Mapping[str, Mapping[str, bytes]],
               deals: Mapping[str, SecAgg], reveals: Mapping[tuple[int, int], SecAgg | str] | None
               ) -> bytes:
        assert isinstance(sr, OptimisticRound)
        if phase == CONFIRM_PHASE:
            return sr.confirm(got.get(SUM_PHASE, {}))
        if phase == FALLBACK_PHASE:
            return sr.fallback(got.get(CONFIRM_PHASE, {}))
        return super()._phase(sr, phase, got, deals, reveals)

    def close(self, r: int, phases: Mapping[str, Mapping[str, bytes]]) -> SecureOutcome:
        sr = self.round(r)
        assert isinstance(sr, OptimisticRound)
        out = sr.finish_open(phases)
        self.paths[r] = ("fallback: " + "; ".join(sr.fallback_why) if sr.fallback_why
                         else "optimistic")
        self.paths = dict(sorted(self.paths.items())[-KEPT_PATHS:])
        self.rounds.pop(r, None)
        return out

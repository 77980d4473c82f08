"""The round machine: when rounds start, wait, close and end. Sans-IO (h11 style).

Events in, actions out: the driver calls `start`, `receive`, `rejected`, `released`,
`signed`, `phase_message`, `closed` and `tick`, each with the time `now` (seconds on
any monotonic clock the driver owns), and carries out the returned actions in order
(gossip/protocol/events.py). The machine never reads a clock, sleeps, opens a file,
imports torch or node; `next_deadline` says when to call `tick` if nothing arrives
first, `done` when to stop.

A run: start barrier -> (federated normalization: votes, then statistics) -> rounds
-> after the last round: the others' seen reports, then their final model digests.

A round is a sequence of named phases (`PhaseSpec`), each an exchange with a set of
peers and a deadline. The first is always "share": Train -> Released -> (sealing: wait
for prekeys) -> SendShare -> Signed -> collect the members' shares (the RoundBook) until
the closing rule holds. Later phases (the echo) each send one message to their peers
(`SendPhase`, the body is the driver's) and collect theirs (`phase_message`) until all
came or the phase's deadline; then `Close` carries what each phase collected. The peers
of a phase are a parameter: today everyone (broadcast); a topology gives each node its
neighbours (`neighbours=`), and the machine then sends to those by name.

The phase "echo" (ECHO, issue 19 item 2) is run by the machine itself: it signs and
sends the digests of the shares it holds (kind "echo"), files the peers' echoes (given to
`receive` like any message), and Close.shares is the set `agree` decides (echo.py: the
rule and its guarantees), Close.echo who was excluded and why. Issue 22's secure
aggregation is several phases (masks, masked shares, unmasking), each a PhaseSpec.

The closing rule of the share phase (runner.py 1117, 1150-1152, `_collect` 1627): the round
closes when every neighbour still in it has sent its share ("all"), or the missing ones
have moved on to later rounds ("moved_on"), or the rest are absent and may be ignored
("absent", liveness.py), or at the round deadline ("deadline"). The round deadline is
restarted where runner.py restarts it: when a stored release is re-sent (1190), when
training produced nothing finite (1272), when a new share is about to be packed (1290)
and when a sealed share is signed (1376); later phases restart it when they begin.

How a driver calls the machine (the wiring of node's Node): gossip/protocol/__init__.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gossip.bodies import encode_seen
from gossip.envelope import HELLO_ASK, HELLO_REPLY, KIND_ECHO, KIND_HELLO, KIND_SEEN, Accepted
from gossip.errors import LocalError, RemoteError
from gossip.protocol.book import RoundBook
from gossip.protocol.echo import EchoState
from gossip.protocol.events import (
    Abort,
    Ack,
    Action,
    AdoptRange,
    Advanced,
    Broadcast,
    Checkpoint,
    Close,
    Combine,
    Equivocation,
    Filed,
    Finals,
    FinalSeenMissing,
    ForgetPrekeys,
    Joined,
    Message,
    PhaseMessage,
    Presence,
    Refused,
    Rejected,
    Released,
    Retire,
    RotatePrekeys,
    SendFinal,
    SendPhase,
    SendShare,
    SendStats,
    SendTo,
    SendVote,
    Sign,
    Signed,
    Stored,
    Train,
    Waiting,
    WaitOver,
)
from gossip.protocol.hello import HelloLimiter
from gossip.protocol.liveness import Liveness, StartBarrier, members_needed
from gossip.protocol.phases import ECHO, SHARE, PhaseSpec, RoundParams, Wait
from gossip.protocol.seen import FINAL_SEEN_WAIT_S, SeenReports
from gossip.protocol.stats import Normalization, StatsAgreement

# Rejections that can only follow a member's valid signature on a message that is
# fresh (never accepted before, so not a replay by someone else): the member is up.
# A stale share (a round we have closed) counts too: it is how a member that fell
# behind shows it is up. (A never-delivered old share replayed by a relay can only
# make us wait for its sender one more deadline.)
AUTHENTIC_REASONS = frozenset({"bad_body", "shape", "dtype", "non_finite", "bad_seal",
                               "no_prekey", "unsealed", "seal_off", "bad_prekey",
                               "equivocation", "stale", "late_echo", "wrong_kind"})
# A wait (round shares, prekeys, statistics, the start barrier) is reported after this
# long, then every WAIT_REPORT_EVERY_S: who is still awaited and for how long. Short
# waits stay quiet; a node started alone says so instead of waiting in silence.
WAIT_REPORT_FIRST_S = 10.0
WAIT_REPORT_EVERY_S = 30.0
# Stage changes one input can cause (a closed round may end the run at once); a bound
# so that a bug shows as an error, never as a hung driver.
MAX_STEPS_PER_INPUT = 64


class RoundMachine:
    """One node's side of the protocol. `book` is the driver's RoundBook (built from the
    checkpoint: its round, its neighbours minus the retired, the same `neighbours` as
    given here); `restarted`: the book is past round 0 or a stored release exists (the
    start barrier then waits for a majority, runner.py 1477-1478); `keys`: member ->
    public key (a seen report names members by key); `prekeys_missing(r, peers)`: with
    sealing, the peers whose prekey for round r we lack (Sealing.recipients(r, peers)[1]);
    None without sealing. Raises LocalError for settings that could never run and for
    calls out of order (a driver bug), never for what a peer sends."""

    def __init__(self, me: str, members: Iterable[str], book: RoundBook, params: RoundParams,
                 *, keys: Mapping[str, bytes] | None = None, restarted: bool = False,
                 neighbours: Iterable[str] | None = None, phases: Sequence[PhaseSpec] = (SHARE,),
                 prekeys_missing: Callable[[int, list[str]], list[str]] | None = None,
                 normalization: Normalization | None = None, faulty: int = 1) -> None:
        self.me = me
        self.members = frozenset(members)
        if me not in self.members:
            raise LocalError(f"{me!r} is not a member of the consortium")
        self.book = book
        self.params = params
        self.keys = dict(keys or {})
        # None: today's full mesh, every message is a broadcast.
        self.peers = None if neighbours is None else tuple(sorted(set(neighbours)))
        if not phases or phases[0] != SHARE or len({p.name for p in phases}) != len(phases):
            raise LocalError("a round's phases start with the share phase and have distinct "
                             "names")
        self.phases = tuple(phases)
        self.echo = EchoState(me, self.members, self.keys, faulty) if any(
            p.name == ECHO.name for p in phases) else None  # faulty: the echo rule's f
        self.sealed = prekeys_missing is not None
        self._prekeys_missing = prekeys_missing
        self.norm = normalization
        self.agreement = None if normalization is None else StatsAgreement(
            self.members - {me}, normalization.implausible)
        self.live = Liveness(params.absent_after)
        self.seen = SeenReports(me, book.lookahead)
        self.hello = HelloLimiter()
        self.barrier = StartBarrier(params.min_members, len(self.members), restarted, 0.0,
                                    params.round_deadline_s)
        self.finals: dict[str, bytes] = {}  # each member's first final message
        self.deadline = 0.0  # when the current round's collection ends (runner.py 354)
        self.stage = "new"
        self._now, self._on_message = 0.0, False
        self._wait: Wait | None = None
        self._announced = False
        self._ignorable_before: set[str] = set()
        self._phase = 0
        self._phase_peers: tuple[str, ...] = ()
        # (round, phase) -> member -> body: later phases' messages, rounds in our window
        self._phase_got: dict[tuple[int, str], dict[str, bytes]] = {}
        self._final_round = -1
        self._expect: set[str] = set()
        self._unacked: dict[int, list[Any]] = {}
        self._norm_end = 0.0
        self._share_closed: tuple[tuple[str, ...], str, dict[str, Accepted]] = ((), "all", {})

    # --- state the driver reads ----------------------------------------------------------
    @property
    def current(self) -> int:
        """The round we are in (the verifier refuses older ones as stale)."""
        return self.book.current

    @property
    def done(self) -> bool:
        return self.stage == "done"

    @property
    def next_deadline(self) -> float | None:
        """When to call `tick` if no event comes first (None: only an event moves on)."""
        if self.stage == "barrier":
            assert self._wait is not None
            if self.barrier.passed(self.live.up, self.book.start_peers(), self._now):
                return self._now  # decided at the next tick (_step)
            return self.barrier.next_time(self.live.up, self.book.start_peers(), self._now,
                                          self._wait.next_report)
        w = self._wait
        if w is None:
            return None
        ends = [w.end] if w.end is not None else []
        if w.what is not None:
            ends.append(w.next_report)
        return min(ends) if ends else None

    def ignorable(self) -> set[str]:
        return self.live.ignorable(self.book.neighbours)

    def configure(self, params: RoundParams) -> None:
        """The run's timing again before `start` (a driver's settings when its run starts)."""
        if self.stage != "new":
            raise LocalError("RoundMachine.configure called after start")
        self.params = params
        self.live.absent_after = params.absent_after

    # --- inputs -------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """Say hello (and announce prekeys), then wait at the start barrier."""
        if self.stage != "new":
            raise LocalError("RoundMachine.start called twice")
        self._now = now
        out: list[Action] = []
        if self.book.current >= self.params.rounds:  # restarted after the last round
            self._end(out)
            return out
        if self.sealed:
            out.append(RotatePrekeys(self.book.current, hello=True))
            self._announced = True
        out.append(self._send(Sign(KIND_HELLO, self.book.current, HELLO_ASK), "hello"))
        self.barrier = StartBarrier(self.params.min_members, len(self.members), self.barrier.restarted,
                                    now, self.params.round_deadline_s, self.book.start_peers())
        self.stage = "barrier"
        self._wait = Wait(None, now, None, now + WAIT_REPORT_FIRST_S)
        return out + self._step(now)

    def receive(self, acc: Accepted, now: float, *, data: bytes = b"",
                token: Any = None) -> list[Action]:
        """A message the verifier accepted (verified against `current`). `data`: its
        bytes as received (kept as evidence of a seen report); `token`: the transport's
        ack, returned in an `Ack` once the message is used or checkpointed."""
        self._now = now
        out: list[Action] = []
        try:
            where = self.book.add(acc)
        except RemoteError as exc:
            if token is not None:
                out.append(Ack((token,)))
            out.append(Refused(self.book.current, exc.peer or acc.sender, exc.reason,
                               exc.detail, hashlib.blake2b(data, digest_size=32).hexdigest()))
            if exc.reason == "equivocation":
                out.append(Equivocation(self.book.held(acc.sender, acc.round), acc))
                if self.echo is not None:
                    self.echo.proven.add((acc.round, acc.sender))
            self._heard(exc.peer if exc.reason in AUTHENTIC_REASONS else None, False, out)
            return out + self._step(now, message=True)
        if token is not None:
            cur, echoes = self.book.current, self._phase_got.get((acc.round, ECHO.name), {})
            if acc.share is not None and where == "buffered" or where == "echo" and cur <= acc.round \
                    <= cur + self.book.lookahead and acc.sender not in echoes:
                # Redelivered after a crash till its round's checkpoint (echo_due.py: (2)); not far-ahead
                self._unacked.setdefault(acc.round, []).append(token)
            else:
                out.append(Ack((token,)))
        self._heard(acc.sender, (acc.share or acc.secagg) is not None and where in ("buffered", "ahead"), out)
        if self.echo is not None:  # who was in which round: whose echo is owed (echo_due.py)
            self.echo.due.heard(acc, where, self.book.current, self.book.lookahead)
        if where == "prekey":
            self.live.prekey_came(acc.sender)
        if acc.hello:  # it has just started: tell it our prekeys / our round
            self._answer_hello(acc.sender, where, now, out)
        if where == "seen":
            out += self.seen.report(acc, data, self.book.current)
        elif where in ("stats", "norm") and self.agreement is not None:
            refused = (self.agreement.statistics(acc) if where == "stats"
                       else self.agreement.vote(acc))
            if refused is not None:
                out.append(Refused(acc.round, acc.sender, refused[0], refused[1],
                                   acc.envelope.digest.hex(), acc))
        elif where == "final":
            self.finals.setdefault(acc.sender, bytes(acc.envelope.body))
        elif where == "echo" and (no := self._phase_in(acc.sender, acc.round, ECHO.name,
                                                       acc.envelope.body, acc)):
            return out + no + self._step(now)  # refused (named), not filed
        out.append(Filed(acc, where))
        return out + self._step(now, message=True)

    def rejected(self, rej: Rejected, now: float) -> list[Action]:
        """A message the verifier refused: counted and audited; its signed round noted;
        its sender up, if the reason proves the message is its own (AUTHENTIC_REASONS)."""
        self._now = now
        out: list[Action] = [Ack((rej.token,))] if rej.token is not None else []
        out.append(Refused(self.book.current, rej.peer or rej.hint or "unknown", rej.reason,
                           rej.detail, rej.digest))
        if rej.signed_round is not None and rej.peer is not None:
            self.book.note(rej.peer, rej.signed_round)  # we cannot read it, but it is there
        self._heard(rej.peer if rej.reason in AUTHENTIC_REASONS else None, False, out)
        return out + self._step(now, message=True)

    def released(self, ev: Released, now: float) -> list[Action]:
        """The outcome of `Train(round)`."""
        self._now = now
        r = self._expect_stage("train", ev.round, "released")
        out: list[Action] = []
        if ev.outcome == "stopped":
            out.append(Retire(r, ev.why))
            self._end(out)
            return out
        self._restart(now)
        if ev.outcome == "stored":
            if ev.own is not None:
                self.seen.released(r, ev.own)
            out.append(SendShare(r, tuple(self.book.still_in(r)), self.peers, stored=True))
            self._collect(now)
        elif ev.outcome == "non_finite":
            self._collect(now)
        elif self.sealed:
            self.stage = "prekeys"
            self._wait = Wait(f"round {r + 1} prekeys", now, self.deadline,
                               now + WAIT_REPORT_FIRST_S)
        else:
            out.append(SendShare(r, tuple(self.book.still_in(r)), self.peers))
            self.stage, self._wait = "sign", None
        return out + self._step(now)

    def signed(self, ev: Signed, now: float) -> list[Action]:
        """Our share for the round is signed (and sent), or was not (nobody to seal for)."""
        self._now = now
        r = self._expect_stage("sign", ev.round, "signed")
        if ev.own is not None:
            self.seen.released(r, ev.own)
        if self.sealed and (ev.own is not None or ev.dealt):  # the prekey wait may have
            self._restart(now)  # used the deadline: collecting gets a full one from here
        self._collect(now)
        return self._step(now)

    def phase_message(self, msg: PhaseMessage, now: float) -> list[Action]:
        """A member's message for a later phase (verified by the driver)."""
        self._now = now
        out = self._phase_in(msg.sender, msg.round, msg.phase, msg.body)
        self._heard(msg.sender, False, out)
        return out + self._step(now, message=True)

    def _phase_in(self, sender: str, r: int, phase: str, body: bytes,
                  acc: Accepted | None = None) -> list[Action]:
        """File a phase message (an echo comes as `acc`, its signed envelope: a second,
        different one is refused and both are kept as the proof)."""
        spec = next((p for p in self.phases[1:] if p.name == phase), None)
        allowed = self.book.neighbours & (spec.peers or self.book.neighbours) if spec else set()
        cur, ahead = self.book.current, self.book.current + self.book.lookahead
        why = ("no_phase", f"our rounds have no {phase} phase") if spec is None else (
            "not_phase_peer", f"not a peer of our {phase} phase") if sender not in allowed \
            else (f"late_{phase}", f"{phase} for round {r}, we are at round {cur}") if r < cur else (
                "too_far", f"{phase} for round {r}, beyond round {ahead}") if r > ahead else None
        if why is not None:  # dropped (bounded memory), named
            return [] if acc is None else [Refused(r, sender, *why, acc.envelope.digest.hex(), acc)]
        got = self._phase_got.setdefault((r, phase), {})
        held = got.get(sender)
        if held is not None and held != body:
            return [Refused(r, sender, "equivocation", f"a second, different {phase} message",
                            "" if acc is None else acc.envelope.digest.hex(), acc),
                    *([] if acc is None or self.echo is None else
                      [Equivocation(self.echo.echoes.get((r, sender)), acc)])]
        got.setdefault(sender, body)
        if held is None and acc is not None and self.echo is not None:
            self.echo.file(r, sender, acc)
        return []

    def closed(self, r: int, used: Mapping[str, Accepted], now: float,
               took_part: Iterable[str] | None = None) -> list[Action]:
        """Round r is aggregated with the shares `used` (Close.shares minus those refused on
        what they say; a secure round: who `took_part`, seen.py): report, move on, checkpoint, ack."""
        self._now = now
        self._expect_stage("closing", r, "closed")
        got = {m: (a.envelope.seq, a.envelope.digest, a.envelope.sig) for m, a in used.items()}
        out: list[Action] = list(self.seen.close(r, got, took_part))
        if used and len(self.members) >= 3 and self.keys:  # a third member can compare
            body = encode_seen([(self.keys[m], used[m].envelope.digest) for m in sorted(used)])
            out.append(self._send(Sign(KIND_SEEN, r, body), f"seen-{r}"))
        nxt = self.book.advance()
        out += [Advanced(r, nxt), Checkpoint(self.book.current)]
        self._ack_before(self.book.current, out)
        self._phase_got = {k: v for k, v in self._phase_got.items() if k[0] >= nxt}
        if self.echo is not None:
            self.echo.forget_before(nxt)
        self._begin_round(now, out)
        return out + self._step(now)

    def tick(self, now: float) -> list[Action]:
        """Time has passed (`next_deadline` reached, or any time): deadlines and reports."""
        self._now = now
        return self._step(now)

    # --- the stages -----------------------------------------------------------------------
    def _step(self, now: float, message: bool = False) -> list[Action]:
        # The start barrier is decided on start and tick, never inside a message: the driver
        # ticks once it has filed all that arrived together (as runner.py's _await_start looked
        # when it woke), so a restart joins the rounds that batch tells (a member's seen report
        # for the round it just closed may come just before its hello saying the next one).
        self._on_message = message
        out: list[Action] = []
        for _ in range(MAX_STEPS_PER_INPUT):
            if not self._advance(now, out):
                return out
        raise LocalError(f"round machine: no settled stage after {MAX_STEPS_PER_INPUT} steps "
                         f"(stage {self.stage}): a bug")

    def _advance(self, now: float, out: list[Action]) -> bool:
        """One stage change if its condition or deadline holds; False while waiting."""
        handler = getattr(self, f"_stage_{self.stage}", None)
        return False if handler is None else handler(now, out)

    def _stage_barrier(self, now: float, out: list[Action]) -> bool:
        b, w = self.barrier, self._wait
        assert w is not None
        if self._on_message:
            return False
        neighbours = self.book.start_peers()  # every member at full mesh (gossip/sparse.py)
        if b.passed(self.live.up, neighbours, now):
            if w.reported:
                out.append(WaitOver())
            ahead = self.book.quorum_round(neighbours)
            if ahead > self.book.current:  # joined where a majority is (after a restart)
                out.append(Joined(self.book.current, ahead))
                self.book.join(ahead)
                out.append(Checkpoint(self.book.current))
            self._begin_normalization(now, out)
            return True
        up = len(self.live.up & neighbours)
        if up < b.need and now >= w.next_report:  # the same report as any long wait
            n = len(self.members)
            asked = (f"gossip.min_members = {self.params.min_members}"
                     if self.params.min_members != "majority" else
                     f"gossip.min_members = \"majority\" ({members_needed('majority', n)} of {n})")
            out.append(Waiting(f"{asked} before round {self.book.current + 1} ({up + 1} up)",
                               tuple(sorted(set(neighbours) - self.live.up)), w.start, None))
            w.next_report, w.reported = now + WAIT_REPORT_EVERY_S, True
        return False

    def _stage_votes(self, now: float, out: list[Action]) -> bool:
        a, n = self.agreement, self.norm
        assert a is not None and n is not None
        got = self._check(now, not a.votes_missing(), a.votes_missing, out)
        if got is None:
            return False
        if got == "timeout":
            out.append(Abort(
                f"federated normalization: no vote from {', '.join(a.votes_missing())} within "
                f"gossip.normalize_wait_s = {self.params.normalize_wait_s:g} s; every member's "
                "vote (statistics usable, or range scaling) is needed before round 1. Start "
                "them (or check they can reach us), or use normalize = \"declared\" or "
                "\"range\". Nothing was trained, nothing charged: our statistics are computed "
                "only once every member has voted"))
            self._stop()
            return False
        fallback = a.fallback(self.me, n.vote_range)
        if fallback:
            out.append(AdoptRange(tuple(sorted(self.members)), tuple(fallback)))
            self._begin_round(now, out)
            return True
        self._await_stats(now, out)
        return True

    def _stage_stats(self, now: float, out: list[Action]) -> bool:
        a = self.agreement
        assert a is not None
        got = self._check(now, not a.stats_missing(), a.stats_missing, out)
        if got is None:
            return False
        if got == "timeout":
            out.append(Abort(
                f"federated normalization: no statistics from {', '.join(a.stats_missing())} "
                f"within gossip.normalize_wait_s = {self.params.normalize_wait_s:g} s; every "
                "member's are needed before round 1 (so that all combine the same messages). "
                "Start them, or use normalize = \"declared\". Nothing was trained; our "
                "statistics are stored and re-sent as they are on restart"))
            self._stop()
            return False
        out.append(Combine(a.messages()))
        self._begin_round(now, out)
        return True

    def _stage_prekeys(self, now: float, out: list[Action]) -> bool:
        r = self.book.current
        got = self._check(now, not self._prekeys_pending(r), lambda: self._prekeys_pending(r), out)
        if got is None:
            return False
        if now >= self.deadline:  # not waited for again until they announce
            self.live.silent.update(self._prekeys_of(r))
        out.append(SendShare(r, tuple(self.book.still_in(r)), self.peers))
        self.stage, self._wait = "sign", None
        return True

    def _stage_collect(self, now: float, out: list[Action]) -> bool:
        r = self.book.current
        got = self._check(now, self.book.complete(r, ignore=self.ignorable()),
                          lambda: sorted(set(self.book.waiting_for(r)) - self.ignorable()), out)
        if got is None:
            return False
        for m, missed in self.live.note_absent(self.book.waiting_for(r)):
            out.append(Presence(m, "absent", missed))
        self._next_phase(now, out)
        return True

    def _stage_phase(self, now: float, out: list[Action]) -> bool:
        got = self._check(now, not self._phase_waiting(), self._phase_waiting, out)
        if got is None:
            return False
        self._next_phase(now, out)
        return True

    def _stage_final_seen(self, now: float, out: list[Action]) -> bool:
        r = self._final_round
        if self._check(now, self.seen.all_reported(r, self._expect), None, out) is None:
            return False
        if not self.seen.all_reported(r, self._expect):
            out.append(FinalSeenMissing(r, tuple(sorted(
                m for m in self._expect if (r, m) not in self.seen.reported))))
        out.append(SendFinal(r))
        self._expect = self.seen.expected_final(r, self.book.neighbours)
        self.stage = "finals"
        self._wait = Wait(None, now, now + self._final_wait_s(), now)
        return True

    def _stage_finals(self, now: float, out: list[Action]) -> bool:
        if self._check(now, self._expect <= set(self.finals), None, out) is None:
            return False
        out.append(Finals(self._final_round, dict(self.finals), tuple(sorted(self._expect))))
        self._end(out)
        return True

    # --- transitions ------------------------------------------------------------------------
    def _begin_normalization(self, now: float, out: list[Action]) -> None:
        n = self.norm
        if n is None or n.agreed:
            self._begin_round(now, out)
            return
        self._norm_end = now + self.params.normalize_wait_s
        out.append(SendVote())
        if n.stats_stored:  # every vote was "usable" when we charged them: not reopened
            self._await_stats(now, out)
            return
        self.stage = "votes"
        self._wait = Wait("votes on normalization (before any statistics are computed and "
                           "charged)", now, self._norm_end, now + WAIT_REPORT_FIRST_S)

    def _await_stats(self, now: float, out: list[Action]) -> None:
        out.append(SendStats())
        self.stage = "stats"
        self._wait = Wait("statistics", now, self._norm_end, now + WAIT_REPORT_FIRST_S)

    def _begin_round(self, now: float, out: list[Action]) -> None:
        r = self.book.current
        if r >= self.params.rounds:
            self._finish(now, out)
            return
        if self.sealed:
            out.append(RotatePrekeys(r))
        out.append(Train(r))
        self.stage, self._wait, self._phase = "train", None, 0

    def _collect(self, now: float) -> None:
        r = self.book.current
        # Who was ignorable before the collection began: a round that closes without them
        # closed because they are "absent" (not because the deadline passed).
        self._ignorable_before = set(self.ignorable())
        self.stage = "collect"
        self._wait = Wait(f"round {r + 1} shares", now, self.deadline, now + WAIT_REPORT_FIRST_S)

    def _next_phase(self, now: float, out: list[Action]) -> None:
        self._phase += 1
        r = self.book.current
        if self._phase >= len(self.phases):
            self._close(out)
            return
        spec = self.phases[self._phase]
        # The echo also waits for peers still in their share phase (until our share deadline).
        self.deadline = (max(now, self.deadline) if spec.name == ECHO.name else now) + (
            spec.deadline_s if spec.deadline_s is not None else self.params.round_deadline_s)
        peers = self.book.neighbours if spec.peers is None else spec.peers & self.book.neighbours
        self._phase_peers = tuple(sorted(peers))
        if self._phase == 1:  # the share phase is over: what it closed with, what we hold
            self._share_closed = self._closing_rule(r)
        if spec.name == ECHO.name and self.echo is not None:  # the digests we hold (echo.py)
            own = self.seen.own.get(r)
            msg = Sign(KIND_ECHO, r, self.echo.ours(r, self._share_closed[2], own and own[1],
                                                    self._phase_peers))
            out.append(Broadcast(msg, f"echo-{r}") if self.peers is None and spec.peers is None
                       else SendTo(self._phase_peers, msg, f"echo-{r}"))
        else:
            out.append(SendPhase(r, spec.name, self._phase_peers, {p.name: dict(self._phase_got.get(
                (r, p.name), {})) for p in self.phases[1:self._phase]}))
        self.stage = "phase"
        self._wait = Wait(f"round {r + 1} {spec.name}", now, self.deadline,
                           now + WAIT_REPORT_FIRST_S)

    def _closing_rule(self, r: int) -> tuple[tuple[str, ...], str, dict[str, Accepted]]:
        missing = self.book.missing(r)
        why = ("all" if not missing else "moved_on" if self.book.complete(r)
               else "absent" if self.book.complete(r, ignore=self._ignorable_before)
               else "deadline")
        return tuple(missing), why, self.book.shares(r)

    def _close(self, out: list[Action]) -> None:
        r = self.book.current
        missing, why, shares = (self._share_closed if len(self.phases) > 1
                                else self._closing_rule(r))
        phases = {p.name: dict(self._phase_got.get((r, p.name), {})) for p in self.phases[1:]}
        agreed = None
        if self.echo is not None:
            shares, agreed = self.echo.decide(r, self.params.absent_after)
        out.append(Close(r, shares, missing, why, phases, agreed))
        self.stage, self._wait = "closing", None

    def _finish(self, now: float, out: list[Action]) -> None:
        """No round left: wait for the others' seen reports of our last closed round (no later
        round carries them; a secure round has none), then compare final models; else end."""
        if not self.seen.closed:
            self._end(out)
            return
        self._final_round = r = max(self.seen.closed)
        self._expect = self.seen.expected_final(r, self.book.neighbours)
        self.stage = "final_seen"
        self._wait = Wait(None, now, now + self._final_wait_s(), now)

    def _end(self, out: list[Action]) -> None:
        """Nothing left to read a share in: forget prekeys, ack everything left."""
        if self.sealed:
            out.append(ForgetPrekeys())
        self._ack_before(None, out)
        self._stop()

    def _stop(self) -> None:
        self.stage, self._wait = "done", None

    # --- helpers ------------------------------------------------------------------------------
    def _check(self, now: float, done: bool, who: Callable[[], list[str]] | None,
               out: list[Action]) -> str | None:
        """runner.py `_wait_until`: "done", "timeout" or None (still waiting; a long wait
        reported once WAIT_REPORT_FIRST_S has passed, then every WAIT_REPORT_EVERY_S)."""
        w = self._wait
        assert w is not None
        if done or (w.end is not None and now >= w.end):
            if w.reported:
                out.append(WaitOver())
            return "done" if done else "timeout"
        if w.what is not None and who is not None and now >= w.next_report:
            out.append(Waiting(w.what, tuple(who()), w.start, w.end))
            w.reported, w.next_report = True, now + WAIT_REPORT_EVERY_S
        return None

    def _expect_stage(self, stage: str, r: int, what: str) -> int:
        if self.stage != stage or r != self.book.current:
            raise LocalError(f"RoundMachine.{what}({r}) in stage {self.stage!r} at round "
                             f"{self.book.current}: the driver called it out of order")
        return r

    def _restart(self, now: float) -> None:
        self.deadline = now + self.params.round_deadline_s

    def _final_wait_s(self) -> float:
        return min(FINAL_SEEN_WAIT_S, self.params.round_deadline_s)

    def _prekeys_of(self, r: int) -> list[str]:
        assert self._prekeys_missing is not None
        return list(self._prekeys_missing(r, self.book.still_in(r)))

    def _prekeys_pending(self, r: int) -> list[str]:
        return sorted(set(self._prekeys_of(r)) - self.live.silent)

    def _phase_waiting(self) -> list[str]:
        r, name = self.book.current, self.phases[self._phase].name
        got, still = self._phase_got.get((r, name), {}), set(self.book.still_in(r))
        echo = self.echo if name == ECHO.name else None  # a peer past r heard in r owes its
        # echo (echo_due.py); not one absent from the share phase or whose echoes stopped
        ignore = self.ignorable() | (echo.silent | self.live.absent if echo else set())
        return sorted(p for p in self._phase_peers if p not in got and p not in ignore
                      and (p in still or (echo and echo.due.owes(p, r) and self.book.past(p, r))))

    def _send(self, message: Message, what: str) -> Broadcast | SendTo:
        return Broadcast(message, what) if self.peers is None else SendTo(self.peers, message, what)

    def _heard(self, member: str | None, shared: bool, out: list[Action]) -> None:
        if member is None:
            return
        change = self.live.heard(member, shared)
        if change is not None:
            out.append(Presence(member, change))

    def _answer_hello(self, member: str, where: str, now: float, out: list[Action]) -> None:
        """Our prekeys (its prekey hello) or our round (its hello), at most once per member
        and kind every HELLO_INTERVAL_S; with federated normalization also our stored vote
        and statistics, exactly as first sent (it needs every member's)."""
        if not self.hello.due(member, where, now):
            return
        if where == "prekey":
            if not (self.sealed and self._announced):
                return
            messages: list[Message] = [Stored("announcement")]
        else:
            messages = [Sign(KIND_HELLO, self.book.current, HELLO_REPLY)]
            if self.norm is not None:
                messages += [Stored("norm"), Stored("stats")]
        self.hello.answered(member, where, now)
        out.extend(SendTo((member,), m, f"hello-reply-{member}") for m in messages)

    def _ack_before(self, round_: int | None, out: list[Action]) -> None:
        tokens = []
        for r in sorted(r for r in self._unacked if round_ is None or r < round_):
            tokens += self._unacked.pop(r)
        if tokens:
            out.append(Ack(tuple(tokens)))

"""The round loop that ties the node together (asyncio).

One round: train -> clip + noise -> charge the ledger -> sign -> store the
release -> broadcast -> collect until every neighbour's share for the round
has arrived or the deadline (counted from our own release) passes -> combine
our own *released* share with the received ones -> evaluate -> checkpoint.
The release (train -> DP -> charge -> sign -> store) is the Releaser's
(node/runtime/release.py), signing and the prekey files the Signer's
(node/runtime/signer.py); a rehearsal wraps them (node/rehearsal/), never this file.
The parts are built and checked by node/runtime/build.py; the checkpoint codec is
checkpoint.py, the audit/metrics records audit.py, evidence findings.py, federated
normalization's files normalization.py, the final model comparison finals.py. Who is
up or absent, seen reports, hello limits, normalization votes and the start barrier are
decided by gossip/protocol's parts (Liveness, SeenReports, HelloLimiter,
StatsAgreement, StartBarrier); the waits and the round loop are still here (issue 21:
the next step runs gossip/protocol's RoundMachine instead).

A background task reads the transport and runs every message through
`envelope.Verifier` and the `RoundBook`; rejections are counted by reason,
written to the audit log and logged once per (peer, reason). Nothing a peer
sends can stop the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import torch

from gossip import bodies, envelope
from gossip.bodies import Stats
from gossip.envelope import (
    BENIGN_REASONS,
    HELLO_ASK,
    HELLO_REPLY,
    KIND_FINAL,
    KIND_HELLO,
    KIND_PREKEY,
    KIND_RETIRE,
    KIND_SEALED,
    KIND_SEEN,
    KIND_SHARE,
    Accepted,
)
from gossip.errors import LocalError, RemoteError
from gossip.protocol import machine as protocol
from gossip.protocol.hello import HelloLimiter
from gossip.protocol.liveness import Liveness, StartBarrier
from gossip.protocol.machine import AUTHENTIC_REASONS
from gossip.protocol.seen import FINAL_SEEN_WAIT_S, SeenReports
from gossip.protocol.stats import StatsAgreement
from gossip.transports.base import Incoming, Transport, TransportFailed
from node.learn.models import get_flat, named_to_flat, set_flat
from node.learn.normalize import (
    Agreed,
    combine,
    implausible,
    numeric_columns,
    range_agreed,
)
from node.learn.train import evaluate
from node.ops.intervals import metric_intervals
from node.privacy.mechanisms import NoiseSource
from node.runtime import activity, audit, checkpoint, finals, normalization
from node.runtime.audit import AuditLog, NodeCounters
from node.runtime.build import Compose, Parts, build_node
from node.runtime.config import NodeConfig
from node.runtime.findings import Findings
from node.runtime.normalization import LocalData
from node.runtime.release import NotReleased, Releaser, Stopped, blake
from node.runtime.round_report import RoundReport
from node.strategy import WeightedShare

log = logging.getLogger("flnode.node")

class Node:
    def __init__(self, parts: Parts, transport: Transport, noise: NoiseSource,
                 counters: NodeCounters, *,
                 rows_transform: Callable[[LocalData], LocalData] | None = None,
                 compose: Compose | None = None) -> None:
        """The parts built and checked from the node's files (node/runtime/build.py).
        `rows_transform`, if given, is applied to the training rows each time they are
        set (at start, and once normalization is agreed), `compose` wraps the releaser
        and signer: only a rehearsal gives them (node/rehearsal/build.py)."""
        self.cfg = cfg = parts.cfg
        self.identity, self.name = parts.identity, parts.identity.name
        self.consortium, self.schema = parts.consortium, parts.schema
        self._rows_transform = rows_transform
        self._set_data(parts.train, parts.held_out)
        self.transport, self.noise, self.counters = transport, noise, counters
        self.state, self.ledger, self.budget = parts.state, parts.ledger, parts.budget
        self.audit = AuditLog(self.state, self.name)  # audit.jsonl, metrics.jsonl
        # Proofs of equivocation and seen-report claims, kept and counted (findings.py)
        self.findings = Findings(self.name, self.state, self.audit, counters)
        self.evidence = self.findings.store
        self.strategy, self.strategy_params = parts.strategy, parts.strategy_params
        self.model, self.metric, self.control = parts.model, parts.metric, parts.control
        self.sealing, self.verifier, self.book = parts.sealing, parts.verifier, parts.book
        self.stopped: str | None = None  # why this node stopped sharing early, if it did
        # Federated normalization (the schema's normalize = "federated"): the rows as read,
        # the agreed statistics once known (state/normalization.json), what came in.
        self._tables = parts.tables
        self.normalization: Agreed | None = None
        # Every member's vote, then statistics (the first of each counts; implausible ones
        # are refused and left out by every honest member alike): gossip/protocol/stats.py.
        # Our vote: range when our check at start failed and the schema allows the fallback
        # (`norm_fallback` says why).
        k = len(numeric_columns(self.schema))
        self.norm_votes = StatsAgreement(
            {m.name for m in self.consortium.members} - {self.name},
            lambda st: implausible(st, None if self.budget.plan is None
                                   else self.budget.plan.normalize_sigma, k))
        self._norm_fallback = parts.norm_fallback
        # What this member signs (the sequence number on disk first) and releases (charged
        # first): node/runtime/signer.py, release.py. A rehearsal wraps them (compose).
        self.signer = parts.signer
        self.releaser: Releaser = Releaser(
            cfg, self.name, self.model, self.verifier.spec, self.state, self.ledger,
            self.budget, noise, self.control, lambda: (self.train_data.X, self.train_data.y),
            self._norm, self._pack_share)
        if compose is not None:
            self.releaser, self.signer = compose(self.releaser, self.signer, transport)
        # Seen reports: the digests we accepted per closed round (member -> (seq, digest,
        # sig), our own release included), and reports for rounds we have not closed yet.
        # Seen reports: the digests we accepted per closed round, our own release included,
        # and reports for rounds we have not closed yet (gossip/protocol/seen.py).
        self.seen = SeenReports(self.name, cfg.gossip.lookahead)
        self._announcement: bytes | None = None  # our current prekey message, once sent
        # The run's TaskGroup: every task the node starts (receiver, hello replies) is
        # owned and awaited by it.
        self._tg: asyncio.TaskGroup | None = None
        self._arrived = asyncio.Event()
        self._deadline = 0.0  # loop time when the current round's collection ends
        # Who is up, absent (rounds close without waiting for it), silent (no prekey by a
        # deadline: we seal without waiting for it): gossip/protocol/liveness.py.
        self.liveness = Liveness(cfg.gossip.absent_after)
        # Each member's final model digest (its first final message only: one per member).
        self._finals: dict[str, bytes] = {}
        self.hellos = HelloLimiter()  # how often a member's hello is answered
        # Acks of accepted shares, by round: sent once the round is closed and
        # checkpointed, so a node killed before that gets them redelivered (MQTT).
        self._unacked: dict[int, list[Callable[[], None]]] = {}
        # The last closed round's metrics, bytes and duration (node/metrics.py reads it).
        self.last_round: dict[str, Any] | None = None
        if self._tables is not None and (agreed_before := normalization.load_agreed(
                self.state, self.schema)) is not None:
            self._adopt(agreed_before, saved=True)
        checkpoint.resume(self)

    @classmethod
    def from_config(cls, cfg: NodeConfig, transport: Transport,
                    noise: NoiseSource | None = None) -> Node:
        """build_node for this class (tests build subclasses through it)."""
        return build_node(cfg, transport, noise=noise, node_cls=cls)

    def _set_data(self, train: LocalData, held: LocalData) -> None:
        if self._rows_transform is not None:
            train = self._rows_transform(train)
        self.train_data, self.held_out = train, held

    # --- federated normalization (node/normalize.py) ---------------------------------
    NORMALIZATION_FILE = normalization.NORMALIZATION_FILE
    STATS_FILE = normalization.STATS_FILE
    VOTE_FILE = normalization.VOTE_FILE

    def _own_stats(self) -> tuple[Stats, bytes]:
        return normalization.own_stats(self.state, self.cfg, self.schema, self._tables,
                                       self.budget, self.ledger, self.noise, self._sign)

    def _own_vote(self) -> tuple[bool, bytes]:
        return normalization.own_vote(self.state, self.cfg.gossip.max_envelope_bytes,
                                      self._norm_fallback is not None, self._sign)

    def _adopt(self, agreed: Agreed, saved: bool = False) -> None:
        """Encode our rows with the agreed statistics (saved: read back on restart)."""
        if not saved:
            normalization.save_agreed(self.state, agreed)
        assert self._tables is not None
        self._set_data(*self._tables.encode(self.schema.with_stats(agreed.stats)))
        self.normalization = agreed

    def _on_norm(self, acc: Accepted, filed: tuple[str, str] | None) -> None:
        if filed is not None:  # refused: (reason, detail)
            self._reject_accepted(acc, *filed)

    def _norm(self) -> bytes | None:
        """What our shares say we encode with: the agreed statistics' digest, if any."""
        return None if self.normalization is None else self.normalization.digest

    def _reject_accepted(self, acc: Accepted, reason: str, detail: str) -> None:
        """A message that passed the verifier but that we refuse on what it says."""
        self.counters.rejected[reason] += 1
        self.audit.write(audit.Refused(acc.round, acc.sender, acc.envelope.digest.hex(),
                                       acc.envelope.kind, reason, detail))
        if self.audit.once(acc.sender, reason):
            log.warning("%s: refused %s's %s: %s: %s (further are counted, not logged)",
                        self.name, acc.sender, acc.envelope.kind, reason, detail)

    async def _agree_normalization(self) -> None:
        """Before round 1: send our vote and wait for every member's (node/normalize.py);
        if any votes for range scaling, scale by the declared ranges, nothing computed or
        charged; else send our statistics, wait for every member's, combine them
        identically and encode our rows with the result."""
        if self._tables is None or self.normalization is not None:
            return
        members, agreement = set(self.norm_votes.members), self.norm_votes
        end = asyncio.get_running_loop().time() + self.cfg.gossip.normalize_wait_s
        ours, vote = self._own_vote()
        await self._in_background(self._broadcast(0, vote), "norm")
        # Our stored statistics mean every vote was "usable" when we charged them: a vote
        # arriving after a restart cannot reopen that decision.
        if not (self.state.path / self.STATS_FILE).exists():
            if not await self._wait_until(
                    lambda: not agreement.votes_missing(), end, waiting=(
                        "votes on normalization (before any statistics are computed and "
                        "charged)", agreement.votes_missing)):
                raise LocalError(
                    f"federated normalization: no vote from "
                    f"{', '.join(agreement.votes_missing())} within "
                    f"gossip.normalize_wait_s = {self.cfg.gossip.normalize_wait_s:g} s; every "
                    "member's vote (statistics usable, or range scaling) is needed before "
                    "round 1. Start them (or check they can reach us), or use normalize = "
                    "\"declared\" or \"range\". Nothing was trained, nothing charged: our "
                    "statistics are computed only once every member has voted")
            fallback = agreement.fallback(self.name, ours)
            if fallback:
                why = (f"{', '.join(fallback)} voted for range scaling (its check at start "
                       "found the agreed statistics would be too noisy; normalize_fallback = "
                       "\"range\"): every member scales by the declared ranges, nothing "
                       "released or charged for normalization")
                agreed = range_agreed(self.schema, tuple(members | {self.name}),
                                      tuple(fallback), why)
                self._adopt(agreed)
                log.warning("%s: normalization: %s", self.name, why)
                self.audit.write(audit.Normalization(self.name, agreed.to_json()))
                return
        own, data = self._own_stats()
        await self._in_background(self._broadcast(0, data), "stats")
        if not await self._wait_until(
                lambda: not agreement.stats_missing(), end,
                waiting=("statistics", agreement.stats_missing)):
            missing = agreement.stats_missing()
            raise LocalError(
                f"federated normalization: no statistics from {', '.join(missing)} within "
                f"gossip.normalize_wait_s = {self.cfg.gossip.normalize_wait_s:g} s; every "
                "member's are needed before round 1 (so that all combine the same "
                "messages). Start them, or use normalize = \"declared\". Nothing was "
                "trained; our statistics are stored and re-sent as they are on restart")
        messages = agreement.messages()
        messages[self.name] = own
        agreed = combine(messages, self.schema, self.strategy_params.get("max_weight_fraction"))
        self._adopt(agreed)
        for m, f in sorted(agreed.capped.items()):
            log.warning("%s: federated normalization: %s's row count is above the weight "
                        "cap (max_weight_fraction): its statistics weigh %.3g of the result, "
                        "less than its share of the rows (the largest member, or one "
                        "overstating its rows)", self.name, m, f)
        log.info("%s: federated normalization agreed with %d members (digest %s)", self.name,
                 len(agreed.members), agreed.digest.hex()[:16])
        self.audit.write(audit.Normalization(self.name, agreed.to_json()))

    # --- receiving ---------------------------------------------------------------
    async def _receive(self) -> None:
        async for msg in self.transport.incoming():
            self.handle(msg)

    def handle(self, msg: Incoming) -> Accepted | None:
        """Verify one incoming byte string and file it. Never raises for peer faults."""
        accepted: Accepted | None = None
        try:
            accepted = self.verifier.verify(msg.data, self.book.current, msg.peer_hint)
            where = self.book.add(accepted)
        except RemoteError as exc:
            if msg.ack is not None:
                msg.ack()
            self._reject(msg, exc)
            if exc.reason == "equivocation" and accepted is not None:
                self.findings.equivocation(self.book.held(accepted.sender, accepted.round),
                                           accepted, self.book.current)
            if exc.signed_round is not None and exc.peer is not None:
                self.book.note(exc.peer, exc.signed_round)  # we cannot read it, but it is
            if exc.reason in AUTHENTIC_REASONS and exc.peer is not None:
                self._heard(exc.peer)  # signed and fresh enough to be its own: it is up
            return None
        if msg.ack is not None:
            if accepted.share is not None and where == "buffered":
                # Redelivered after a crash until its round is checkpointed. A far-ahead
                # share ("ahead") is acked at once: a member claiming ever higher rounds
                # must not grow this table, and a round we skip to needs no redelivery.
                self._unacked.setdefault(accepted.round, []).append(msg.ack)
            else:
                msg.ack()
        self.counters.accepted[accepted.sender] += 1
        self._heard(accepted.sender, shared=accepted.share is not None
                    and where in ("buffered", "ahead"))
        if where == "prekey":
            self.liveness.prekey_came(accepted.sender)
        if accepted.hello:  # it has just started: tell it our prekeys / our round
            self._answer_hello(accepted.sender, where)
        if where == "seen":
            self._on_seen(accepted, msg.data)
        elif where == "stats":
            self._on_norm(accepted, self.norm_votes.statistics(accepted))
        elif where == "norm":
            self._on_norm(accepted, self.norm_votes.vote(accepted))
        elif where == "final":
            self._finals.setdefault(accepted.sender, bytes(accepted.envelope.body))
        if where == "retired":
            log.warning("%s: %s has stopped sharing (retire message); rounds no longer wait "
                        "for it", self.name, accepted.sender)
        self.audit.write(audit.Accepted(accepted.round, accepted.sender, accepted.envelope.seq,
                                        accepted.envelope.digest.hex(), accepted.envelope.kind,
                                        where))
        self._arrived.set()
        return accepted

    def _heard(self, member: str, shared: bool = False) -> None:
        """An authentic message from `member`: it is up. A share (for our round or a later
        one) re-arms the wait for it; talk alone (`shared` False) only once per absence,
        for one deadline (issue 19: one hello per round held every round to the deadline)."""
        change = self.liveness.heard(member, shared)
        if change == "back":
            log.info("%s: a share from %s again; rounds wait for it again", self.name, member)
        elif change == "heard":
            log.info("%s: heard from %s again (no share yet); rounds wait for it for one "
                     "deadline, then only once its shares arrive", self.name, member)

    def _reject(self, msg: Incoming, exc: RemoteError) -> None:
        self.counters.rejected[exc.reason] += 1
        peer = exc.peer or msg.peer_hint or "unknown"
        self.audit.write(audit.Rejected(self.book.current, peer, blake(msg.data), exc.reason,
                                        exc.detail))
        level = logging.DEBUG if exc.reason in BENIGN_REASONS else logging.WARNING
        if self.audit.once(peer, exc.reason):
            log.log(level, "%s: %s (further %r from %s are counted, not logged)",
                    self.name, exc, exc.reason, peer)

    # --- the round loop ---------------------------------------------------------
    async def run(self, on_round: Callable[[RoundReport], None] | None = None) -> list[RoundReport]:
        reports: list[RoundReport] = []
        await self.transport.start()
        try:
            await self._run_rounds(reports, on_round)
        except BaseExceptionGroup as group:
            # The TaskGroup wraps what ended the run (e.g. a dead transport in the
            # receiver): one operator error is raised as itself; a bug stays a group.
            local, rest = group.split(LocalError)
            if local is not None and rest is None:
                first: BaseException = local
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            raise
        return reports

    async def _run_rounds(self, reports: list[RoundReport],
                          on_round: Callable[[RoundReport], None] | None) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                receiver = tg.create_task(self._receive(), name=f"{self.name}-receive")
                try:
                    if self.book.current < self.cfg.training.rounds:
                        await self._rotate_prekeys(self.book.current, announce=True)
                        await self._in_background(self._broadcast(self.book.current, self._sign(
                            KIND_HELLO, self.book.current, HELLO_ASK)), "hello")
                        await self._await_start()
                        await self._agree_normalization()
                    while self.book.current < self.cfg.training.rounds:
                        report = await self._round()
                        if report is None:  # stopped sharing (budget spent)
                            if on_round is not None:
                                on_round(RoundReport(self.name, self.book.current, {},
                                                     self.epsilon(), [], [], float("nan"), 0.0,
                                                     stopped=self.stopped))
                            break
                        reports.append(report)
                        if on_round is not None:
                            on_round(report)
                    if self.book.current >= self.cfg.training.rounds and self.seen.closed:
                        await self._await_final_seen(max(self.seen.closed))
                        await self._compare_final_models(max(self.seen.closed))
                    # No round left to read a share in (finished, or stopped sharing):
                    # nothing on this disk may open recorded traffic any more, and
                    # nothing needs redelivering.
                    self.signer.forget_prekeys()
                    self._ack_before(None)
                finally:
                    self._tg = None  # no new tasks; the group awaits what it owns
                    receiver.cancel()
                    self.signer.close()
        finally:
            checkpoint.save(self)
            await self.transport.close()

    # --- seen reports: comparing what each member was sent ----------------------------
    async def _close_seen(self, r: int, received: dict[str, Accepted]) -> None:
        """Round r is closed: keep the digests we accepted, check the reports that came
        early, and tell the others what we accepted (a seen message) so a member that
        signed a different share for each peer is noticed by every one of them."""
        for found in self.seen.close(r, {m: (a.envelope.seq, a.envelope.digest, a.envelope.sig)
                                         for m, a in received.items()}):
            self.findings.mismatch(found)
        if received and len(self.consortium.members) >= 3:  # a third member can compare
            keys = {m.name: m.public_key for m in self.consortium.members}
            body = bodies.encode_seen([(keys[m], received[m].envelope.digest)
                                       for m in sorted(received)])
            await self._in_background(self._broadcast(r, self._sign(KIND_SEEN, r, body)),
                                      f"seen-{r}")

    async def _await_final_seen(self, r: int) -> None:
        """After the last round, the others' seen reports for it (no later round will
        carry them in): until each member whose share we used has reported, at most
        FINAL_SEEN_WAIT_S (a member that stops right after its last share costs that)."""
        expect = self.seen.expected_final(r, self.book.neighbours)
        end = asyncio.get_running_loop().time() + min(FINAL_SEEN_WAIT_S,
                                                      self.cfg.gossip.round_deadline_s)
        if not await self._wait_until(lambda: self.seen.all_reported(r, expect), end):
            log.info("%s: no seen report for the last round from %s", self.name,
                     ", ".join(sorted(m for m in expect if (r, m) not in self.seen.reported)))

    async def _compare_final_models(self, r: int) -> None:
        """After the last round: tell the members our final model's digest, wait (as for
        the seen reports) for theirs from each member whose share we used, and say which
        ended with a different model. Logged, and kept in final.json for `flnode status`."""
        ours = finals.model_digest(self.model)
        await self._in_background(self._broadcast(r, self._sign(KIND_FINAL, r, ours)), "final")
        expect = self.seen.expected_final(r, self.book.neighbours)
        end = asyncio.get_running_loop().time() + min(FINAL_SEEN_WAIT_S,
                                                      self.cfg.gossip.round_deadline_s)
        await self._wait_until(lambda: expect <= set(self._finals), end)
        finals.record(self.state, self.name, r, ours, self._finals, expect)

    def _on_seen(self, acc: Accepted, data: bytes) -> None:
        """A member's seen report: compared now, or once we close its round."""
        for found in self.seen.report(acc, data, self.book.current):
            self.findings.mismatch(found)

    async def _round(self) -> RoundReport | None:
        r = self.book.current
        t0 = time.perf_counter()
        await self._rotate_prekeys(r)
        # What every honest member started this round from (up to the disagreement the
        # rounds allow): the strategy measures shares' distances from it.
        reference = get_flat(self.model).clone()
        result = await self.releaser.release(r)
        if isinstance(result, Stopped):
            self.stopped = result.reason
            await self._retire(r)
            return None
        if isinstance(result, NotReleased):
            self.counters.rejected["non_finite_local"] += 1
            self._restart_deadline()
            data, own, norm, resent = None, result.own, float("nan"), False
        else:
            data, own, resent = result.data, result.own, result.resent
            norm = float("nan") if result.norm is None else result.norm  # RoundReport's
            if resent:  # the stored release: the collection's deadline counts from now
                self._restart_deadline()
                assert result.sent is not None
                self.signer.seq = max(self.signer.seq, result.sent[0] + 1)
            if result.sent is not None:
                self.seen.released(r, result.sent)
        if data is not None:
            sends = self.signer.outgoing(r, data, sorted(self.book.still_in(r)))
            if sends is None:
                # Not awaited here: a member that is down must not hold up collecting the
                # others' shares (a send waits for a connection to it once).
                await self._in_background(self._broadcast(r, data), f"share-{r}")
            else:  # a rehearsal's own sends (node/rehearsal/attacks.py), in order
                for peer, message in sends:
                    await (self._broadcast(r, message) if peer is None
                           else self._send(peer, message))
                self.signer.after_send(r, data)
        ignorable_before = set(self._ignorable())
        await self._collect(r, deadline=self._deadline)
        self._note_absent(r)
        received = self.book.shares(r)
        for member, acc in sorted(received.items()):
            if acc.share.norm != self._norm():  # encoded with other statistics than ours
                del received[member]
                theirs, ours = acc.share.norm, self._norm()
                self._reject_accepted(acc, "norm_mismatch", (
                    f"its share is encoded with normalization "
                    f"{theirs.hex()[:16] if theirs else 'none'}, ours is "
                    f"{ours.hex()[:16] if ours else 'none'}: the members combined different "
                    "statistics (or one sent different ones to different members)"))
        shares = {s.sender: WeightedShare(s.sender, s.share.weight,
                                          named_to_flat(self.model, s.share.tensors))
                  for s in received.values()}
        agg = self.strategy.aggregate(r, own, shares, set(self.book.missing(r)),
                                      reference=reference)
        diagnostics = agg.to_json()
        self.audit.aggregate(r, diagnostics, self.counters.aggregation)
        await self._close_seen(r, received)
        combined = agg.vector
        if bool(torch.isfinite(combined).all()):
            set_flat(self.model, combined)
        else:  # the strategy never returns one; never carried on if it did
            log.error("%s: round %d: the %s of %d share(s) is not finite; keeping our own "
                      "released share as the model", self.name, r + 1, agg.rule, len(shares) + 1)
            self.counters.rejected["non_finite_aggregate"] += 1
            set_flat(self.model, own.vector)
        metrics = evaluate(self.model, self.held_out.X, self.held_out.y)
        missing = self.book.missing(r)
        # How the round closed: "all" shares came, the missing had "moved_on", were
        # "absent" (silent since an earlier deadline: not waited for), or the "deadline" passed.
        closed = ("all" if not missing else "moved_on" if self.book.complete(r)
                  else "absent" if self.book.complete(r, ignore=ignorable_before)
                  else "deadline")
        if missing:  # rounds are 0-based inside, 1-based for people
            why = {"moved_on": "they had moved on to later rounds",
                   "absent": "not waited for: silent since an earlier deadline",
                   "deadline": "deadline passed"}[closed]
            log.warning("%s: round %d closed without %s (%s)", self.name, r + 1,
                        ", ".join(missing), why)
        nxt = self.book.advance()
        if nxt != r + 1:
            log.warning("%s: behind the consortium: skipping round(s) %d-%d, going on at "
                        "round %d", self.name, r + 2, nxt, nxt + 1)
        eps = self.epsilon()
        intervals = metric_intervals(metrics, self.held_out.y.tolist())
        report = RoundReport(self.name, r, metrics, eps, sorted(received), missing, norm,
                             time.perf_counter() - t0, resent, nxt, intervals=intervals,
                             eval_rows=len(self.held_out.y))
        # Metrics before the checkpoint: a crash in between re-runs the round
        # and appends a second line for it (readers take the last), rather than
        # losing the round's line.
        self.last_round = self.audit.write(audit.RoundMetrics(
            r, metrics, eps, report.received, report.seconds, intervals, len(self.held_out.y),
            len(self.train_data.y), missing, closed,
            {k: diagnostics[k] for k in ("rule", "used", "excluded", "clipped", "weight_capped",
                                         "fallbacks") if diagnostics[k] or k in ("rule", "used")},
            self._traffic(r)))
        checkpoint.save(self)
        self._ack_before(self.book.current)
        return report

    async def _pack_share(self, r: int, body: bytes) -> bytes | None:
        """Sign the share (the Releaser's last step before it charges), sealed to every
        active member's prekey for round r if sealing is on. None if sealing is on and no
        member's prekey arrived before the deadline."""
        # The round's deadline counts from here: waiting for prekeys and for shares share it.
        self._restart_deadline()
        kind = KIND_SHARE
        if self.sealing is not None:
            recipients, missing = await self._await_prekeys(r)
            if missing:
                log.warning("%s: round %d: no prekey for epoch %d from %s by the deadline; "
                            "they cannot read our share", self.name, r + 1,
                            self.sealing.epoch(r), ", ".join(missing))
            if not recipients:
                if missing:
                    log.error("%s: round %d: no member's prekey arrived; our share is not "
                              "sent", self.name, r + 1)
                else:
                    log.info("%s: round %d: every member has moved past it; our share is "
                             "not sent", self.name, r + 1)
                return None
            sealed = self.signer.seal(r, body, recipients)
            if sealed is None:
                return None
            body, kind = sealed, KIND_SEALED
            # Collecting the others' shares gets a full deadline from our release on.
            self._restart_deadline()
        return self._sign(kind, r, body)

    def _sign(self, kind: str, r: int, body: bytes | Sequence[bytes]) -> bytes:
        """Signed with the next sequence number, on disk first (Signer.sign)."""
        return self.signer.sign(kind, r, body)

    def _restart_deadline(self) -> None:
        self._deadline = asyncio.get_running_loop().time() + self.cfg.gossip.round_deadline_s

    async def _await_prekeys(self, r: int) -> tuple[dict, list[str]]:
        """The prekeys of the members still in round r (one that has left it would only
        refuse our share as stale), waiting for missing ones until the deadline; members
        that already let a deadline pass without one are not waited for again."""
        sealing = self.sealing
        assert sealing is not None

        def pending() -> list[str]:
            return sorted(set(sealing.recipients(r, self.book.still_in(r))[1])
                          - self.liveness.silent)

        # a long wait is reported like the shares' (log line, activity.json)
        await self._wait_until(lambda: not pending(), self._deadline,
                               waiting=(f"round {r + 1} prekeys", pending))
        recipients, missing = sealing.recipients(r, self.book.still_in(r))
        if asyncio.get_running_loop().time() >= self._deadline:
            self.liveness.silent.update(missing)
        return recipients, missing

    async def _rotate_prekeys(self, r: int, announce: bool = False) -> None:
        """Hold prekeys for the epochs round r may need, delete older ones, and tell the
        members when that changed (and always at start: we may have missed theirs)."""
        # The announcement for replies, and on start a "hello" one that asks for theirs.
        messages = self.signer.rotate_prekeys(r, announce)
        if not messages:
            return
        packed = [self._sign(KIND_PREKEY, r, body) for body in messages]
        self._announcement = packed[0]
        await self._in_background(self._broadcast(r, packed[-1]), f"prekeys-{r}")

    def _answer_hello(self, member: str, where: str) -> None:
        """A member has just (re)started: send it our prekeys (its prekey hello) or our
        round (its hello). At most once per member and kind every HELLO_INTERVAL_S (a
        member that keeps saying hello gets no more than that); one small message."""
        now = time.monotonic()
        if not self.hellos.due(member, where, now):
            return
        if where == "prekey":
            if self.sealing is None or self._announcement is None:
                return
            data = self._announcement
        else:
            data = self._sign(KIND_HELLO, self.book.current, HELLO_REPLY)
        self.hellos.answered(member, where, now)
        if self._tg is not None:  # owned and awaited by the run's TaskGroup
            self._tg.create_task(self._send(member, data),
                                 name=f"{self.name}-hello-reply-{member}")
            for what, file in (("norm", self.VOTE_FILE), ("stats", self.STATS_FILE)):
                stored = self.state.path / file
                if where == "hello" and self._tables is not None and stored.exists():
                    # It needs every member's vote and statistics (federated
                    # normalization): ours, exactly as first sent.
                    self._tg.create_task(self._send(member, stored.read_bytes()),
                                         name=f"{self.name}-{what}-reply-{member}")

    async def _in_background(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Hand a send to the run's TaskGroup (which awaits it, or cancels it with the
        run) and go on; outside a run (a test driving one step) it is simply awaited."""
        if self._tg is not None:
            self._tg.create_task(coro, name=f"{self.name}-{what}")
        else:
            await coro

    async def _await_start(self) -> None:
        """Before our first round: wait for `gossip.min_members` (if set), and, after a
        restart, up to one round deadline for a majority of the others to say where they
        are; then join the newest round a majority has reached, if it is ahead of ours
        (the same rule as skipping ahead: one lying member cannot drag us forward)."""
        g = self.cfg.gossip
        loop = asyncio.get_running_loop()
        restarted = self.book.current > 0 or \
            self.state.stored_release(self.book.current) is not None
        n, t0 = len(self.consortium.members), loop.time()
        # The decision (gossip/protocol/liveness.py): min_members, and after a restart a
        # majority of the members still sharing, recounted on every arrival.
        barrier = StartBarrier(g.min_members, n, restarted, t0, g.round_deadline_s)
        asked = (f"gossip.min_members = {g.min_members}" if g.min_members != "majority" else
                 f"gossip.min_members = \"majority\" ({barrier.need + 1} of {n})")
        next_report, reported = t0 + protocol.WAIT_REPORT_FIRST_S, False
        while True:
            self._arrived.clear()
            up, now = self.liveness.up, loop.time()
            if barrier.passed(up, self.book.neighbours, now):
                break
            n_up = len(up & self.book.neighbours)
            if n_up < barrier.need and now >= next_report:  # the same report as any long wait
                self._report_wait(
                    f"{asked} before round {self.book.current + 1} ({n_up + 1} up)",
                    sorted(set(self.book.neighbours) - up), now - t0, None)
                next_report, reported = now + protocol.WAIT_REPORT_EVERY_S, True
            end = barrier.next_time(up, self.book.neighbours, now, next_report)
            await self._wait_arrival(max((now if end is None else end) - now, 0.01))
        if reported:
            self._write_activity(None)
        ahead = self.book.quorum_round()
        if ahead > self.book.current:
            log.warning("%s: the others are at round %d; joining them there (rounds %d-%d "
                        "skipped)", self.name, ahead + 1, self.book.current + 1, ahead)
            self.book.join(ahead)
            checkpoint.save(self)

    def _ack_before(self, round_: int | None) -> None:
        """Acknowledge the shares of rounds before round_ (all if None): used or skipped,
        and checkpointed."""
        for r in [r for r in self._unacked if round_ is None or r < round_]:
            for ack in self._unacked.pop(r):
                ack()

    async def _send(self, peer: str, data: bytes) -> None:
        try:
            await self.transport.send(peer, data)
        except TransportFailed:
            raise  # the transport is dead, not one peer: the run ends with this error
        except LocalError as exc:
            log.warning("%s: could not send to %s: %s", self.name, peer, exc)

    async def _retire(self, r: int) -> None:
        """Say once, clearly, that we stop sharing; tell the members; keep the model."""
        log.warning("%s: %s", self.name, self.stopped)
        await self._broadcast(r, self._sign(KIND_RETIRE, r, b""))
        self.audit.write(audit.StoppedMetrics(r, self.stopped, self.epsilon(), self._traffic(r)))
        checkpoint.save(self)

    def _traffic(self, r: int) -> audit.Traffic:
        """The running counters for a metrics line (and the flood audit lines)."""
        t = self.transport.stats
        return self.audit.traffic(r, self.rejected(), t.bytes_sent, t.bytes_received,
                                  t.flood_by_sender)

    async def _broadcast(self, r: int, data: bytes) -> None:
        """A message the transport refuses (e.g. a share over the broker's packet limit) is
        logged and counted; the round goes on with what the others send."""
        try:
            await self.transport.broadcast(data)
        except TransportFailed:
            raise  # the transport is dead, not one peer: the run ends with this error
        except LocalError as exc:
            self.counters.send_failed += 1
            log.error("%s: round %d: our %s was not sent: %s", self.name, r + 1,
                      envelope.decode_outer(data).kind, exc)

    def _ignorable(self) -> set[str]:
        """The absent members rounds may close without: only while the members still
        heard from, ourselves included, are a majority of the consortium. Otherwise we
        are as likely to be the one cut off (a partition, our own link): closing rounds
        without the others would race us ahead of them, so each deadline is waited out."""
        return self.liveness.ignorable(self.book.neighbours)

    def _note_absent(self, r: int) -> None:
        """Members still in round r whose share did not come by its deadline: after
        `gossip.absent_after` such deadlines in a row, stop waiting for them."""
        for m, missed in self.liveness.note_absent(self.book.waiting_for(r)):
            log.warning("%s: %s sent no share by %d deadline(s) in a row; rounds no "
                        "longer wait for it until its shares arrive again", self.name, m, missed)

    async def _collect(self, r: int, deadline: float) -> None:
        ignore = self._ignorable
        await self._wait_until(
            lambda: self.book.complete(r, ignore=ignore()), deadline,
            waiting=(f"round {r + 1} shares",
                     lambda: sorted(set(self.book.waiting_for(r)) - ignore())))

    async def _wait_until(self, done: Callable[[], bool], end: float,
                          waiting: tuple[str, Callable[[], list[str]]] | None = None) -> bool:
        """Until done() holds (checked again after each message handle() files) or the
        loop time `end`; False if the time ran out first. With `waiting` (what, and who
        is still awaited) a long wait is reported (protocol.WAIT_REPORT_FIRST_S, then every
        protocol.WAIT_REPORT_EVERY_S)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        next_report = start + protocol.WAIT_REPORT_FIRST_S
        reported = False
        while True:
            self._arrived.clear()
            if done():
                if reported:
                    self._write_activity(None)
                return True
            now = loop.time()
            remaining = end - now
            if remaining <= 0:
                if reported:  # a message woke us after the end: clear the wait all the same
                    self._write_activity(None)
                return done()
            if waiting is not None and now >= next_report:
                self._report_wait(waiting[0], waiting[1](), now - start, remaining)
                reported = True
                next_report = now + protocol.WAIT_REPORT_EVERY_S
            step = remaining if waiting is None else min(remaining, next_report - now)
            if not await self._wait_arrival(step) and loop.time() >= end:
                if reported:
                    self._write_activity(None)
                return done()

    def _report_wait(self, what: str, who: list[str], waited: float,
                     remaining: float | None) -> None:
        heard = self.liveness.up & {m.name for m in self.consortium.members}
        activity.report_wait(self.state.path, self.name, what, who, waited, remaining,
                             bool(heard))

    def _write_activity(self, waiting: dict[str, Any] | None) -> None:
        activity.write(self.state.path, self.name, waiting)

    async def _wait_arrival(self, seconds: float) -> bool:
        """Until handle() files something (the caller cleared `_arrived` before it last
        looked), at most `seconds`; False if the time ran out."""
        try:
            async with asyncio.timeout(seconds):
                await self._arrived.wait()
        except TimeoutError:
            return False
        return True

    def rejected(self) -> dict[str, int]:
        """Rejections by reason: ours (envelope, round book) plus the transport's refusals."""
        out = Counter(self.counters.rejected)
        out.update(self.transport.stats.refused)
        return dict(out)

    def epsilon(self) -> float | None:
        if self.cfg.privacy.mode == "off":
            return None
        return self.ledger.epsilon(self.cfg.privacy.delta)



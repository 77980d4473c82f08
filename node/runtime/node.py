"""The thin asyncio driver of one node: it carries out what the round machine decides.

gossip/protocol's RoundMachine (sans-IO) decides when rounds start, wait, close and end
(start barrier, normalization's votes and statistics, prekeys, closing rule, absence, seen
reports, hellos, finals). This file feeds it (messages through `envelope.Verifier`,
rejections, our release's outcome, the clock) and carries out each action it returns
(gossip/protocol/__init__.py maps every action to the method here). The release is the
Releaser's (release.py), signing and prekey files the Signer's (signer.py); a rehearsal
wraps them (node/rehearsal/), never this file. Parts: build.py; our release task, sealing
and sends: sharing.py; a round's aggregation and report: closing.py; a secure round's
steps: secure_node.py; bookkeeping actions: bookkeeping.py; checkpoint.py, audit.py,
findings.py, normalization.py, finals.py, activity.py. Nothing a peer sends stops the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import node.runtime.secure_node as secure_node
from gossip.bodies import Stats
from gossip.envelope import KIND_ECHO, KIND_FINAL, Accepted
from gossip.errors import LocalError, RemoteError
from gossip.protocol import events as ev
from gossip.protocol.machine import RoundMachine
from gossip.protocol.phases import RoundParams
from gossip.transports.base import Incoming, Transport
from node.learn.models import get_flat
from node.learn.normalize import Agreed
from node.privacy.mechanisms import NoiseSource
from node.runtime import audit, bookkeeping, checkpoint, closing, echo_round, finals, normalization, sharing
from node.runtime.audit import AuditLog, NodeCounters
from node.runtime.build import Compose, Parts, build_node
from node.runtime.closing import RoundState
from node.runtime.config import NodeConfig
from node.runtime.findings import Findings
from node.runtime.normalization import LocalData
from node.runtime.release import Releaser, blake
from node.runtime.round_report import RoundReport

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
        self.cfg = parts.cfg
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
        # The digest echo's audit lines, evidence and counters (echo_round.py)
        self.echo_records = echo_round.EchoRecords(self.name, self.state, self.audit)
        self.strategy, self.strategy_params = parts.strategy, parts.strategy_params
        self.model, self.metric, self.control = parts.model, parts.metric, parts.control
        self.sealing, self.verifier, self.book = parts.sealing, parts.verifier, parts.book
        self.stopped: str | None = None  # why this node stopped sharing early, if it did
        # Federated normalization: the rows as read, the agreed statistics once known.
        self._tables = parts.tables
        self.normalization: Agreed | None = None
        self._norm_fallback = parts.norm_fallback  # our vote: range, and why
        # What this member signs (the sequence number on disk first) and releases (charged
        # first): signer.py, release.py. A rehearsal wraps them (compose).
        self.signer = parts.signer
        parts.releaser.bind(lambda: (self.train_data.X, self.train_data.y), self._norm,
                            functools.partial(sharing.pack_share, self))
        self.releaser: Releaser = parts.releaser
        if compose is not None:
            self.releaser, self.signer = compose(self.releaser, self.signer, transport)
        self._announcement: bytes | None = None  # our current prekey message, once sent
        self._tg: asyncio.TaskGroup | None = None  # the run's: owns every task we start
        self._queue: list[ev.Action] = []  # actions waiting for the driver, in order
        self._wakeup = asyncio.Event()
        self._go: asyncio.Future[tuple[str, ...]] | None = None  # SendShare's recipients
        self._round: RoundState | None = None  # the current round (closing.py)
        self._reports: list[RoundReport] = []
        self._on_round: Callable[[RoundReport], None] | None = None
        self._own_stats_msg: Stats | None = None
        self._final_ours = b""
        # The last closed round's metrics, bytes and duration (node/metrics.py reads it).
        self.last_round: dict[str, Any] | None = None
        if self._tables is not None and (agreed_before := normalization.load_agreed(
                self.state, self.schema)) is not None:
            self._adopt(agreed_before, saved=True)
        checkpoint.resume(self)
        self.secure = secure_node.setup(self)  # the consortium's secure mode, if any
        self.machine = RoundMachine(
            self.name, [m.name for m in self.consortium.members], self.book, self._params(),
            keys={m.name: m.public_key for m in self.consortium.members},
            restarted=self.book.current > 0
            or self.state.stored_release(self.book.current) is not None,
            prekeys_missing=None if self.sealing is None
            else lambda r, peers: self.sealing.recipients(r, peers)[1],
            normalization=normalization.machine_settings(
                self.state, self.schema, self.budget, self._tables is not None,
                self.normalization is not None, self._norm_fallback is not None),
            **secure_node.machine_args(self.consortium, self.strategy_params, self.name))
        # The machine's parts, by the names operators' tests read.
        self.liveness, self.seen = self.machine.live, self.machine.seen
        self.hellos, self.norm_votes = self.machine.hello, self.machine.agreement

    def _params(self) -> RoundParams:
        """The rounds and timing of self.cfg (read again when a run starts)."""
        g = self.cfg.gossip
        return RoundParams(self.cfg.training.rounds, g.round_deadline_s, g.absent_after,
                           g.min_members, g.normalize_wait_s)

    @classmethod
    def from_config(cls, cfg: NodeConfig, transport: Transport,
                    noise: NoiseSource | None = None) -> Node:
        """build_node for this class (tests build subclasses through it)."""
        return build_node(cfg, transport, noise=noise, node_cls=cls)

    def _set_data(self, train: LocalData, held: LocalData) -> None:
        if self._rows_transform is not None:
            train = self._rows_transform(train)
        self.train_data, self.held_out = train, held

    # --- federated normalization (node/learn/normalize.py) ---------------------------
    NORMALIZATION_FILE = normalization.NORMALIZATION_FILE
    STATS_FILE = normalization.STATS_FILE
    VOTE_FILE = normalization.VOTE_FILE

    def _own_stats(self) -> tuple[Stats, bytes]:
        return normalization.own_stats(self.state, self.cfg, self.schema, self._tables,
                                       self.budget, self.ledger, self.noise, self._sign)

    def _adopt(self, agreed: Agreed, saved: bool = False) -> None:
        """Encode our rows with the agreed statistics (saved: read back on restart)."""
        if not saved:
            normalization.save_agreed(self.state, agreed)
        assert self._tables is not None
        self._set_data(*self._tables.encode(self.schema.with_stats(agreed.stats)))
        self.normalization = agreed

    def _norm(self) -> bytes | None:
        """What our shares say we encode with: the agreed statistics' digest, if any."""
        return None if self.normalization is None else self.normalization.digest

    def _own_vote(self) -> tuple[bool, bytes]:
        return normalization.own_vote(self.state, self.cfg.gossip.max_envelope_bytes,
                                      self._norm_fallback is not None, self._sign)

    async def _send_vote(self) -> None:
        """Our vote (the stored one after a restart); the machine decides on the vote we
        actually sent."""
        ours, vote = self._own_vote()
        m = self.machine
        if m.norm is not None and m.norm.vote_range != ours:
            m.norm = dataclasses.replace(m.norm, vote_range=ours)
        await self._in_background(self._broadcast(0, vote), "norm")

    def _agreed(self, agreed: Agreed, what: str) -> None:
        self._adopt(agreed)
        log.log(logging.WARNING if agreed.mode == "range" else logging.INFO,
                "%s: normalization: %s", self.name, what)
        self.audit.write(audit.Normalization(self.name, agreed.to_json()))

    # --- receiving ---------------------------------------------------------------
    async def _receive(self) -> None:
        async for msg in self.transport.incoming():
            self.handle(msg)

    def handle(self, msg: Incoming) -> Accepted | None:
        """Verify one incoming byte string and feed it to the machine. Never raises for
        peer faults."""
        now = bookkeeping.loop_time()  # the machine's clock: the loop's (a simulation's)
        try:
            accepted = self.verifier.verify(msg.data, self.book.current, msg.peer_hint)
        except RemoteError as exc:
            self._feed(self.machine.rejected(ev.Rejected(
                exc.reason, exc.detail, exc.peer, exc.signed_round, msg.peer_hint,
                blake(msg.data), msg.ack), now))
            return None
        actions = secure_node.receive(self, accepted, now, msg.data, msg.ack)
        self._feed(actions)
        filed = any(isinstance(a, ev.Filed) for a in actions)
        return accepted if filed else None

    def _feed(self, actions: list[ev.Action]) -> None:
        """Carry out the bookkeeping at once, until the first action that needs the
        driver; that one and all after it wait for it. Always in the order the machine
        returned them: the answer to a Close goes after what messages filed while Close
        waited (a second equivocating copy is counted in the round's metrics line)."""
        i = 0
        while i < len(actions) and not self._queue and isinstance(actions[i], bookkeeping.AT_ONCE):
            bookkeeping.carry_out(self, actions[i])
            i += 1
        self._queue.extend(actions[i:])
        self._wakeup.set()  # any input may move the machine's next deadline

    # --- the run ------------------------------------------------------------------
    async def run(self, on_round: Callable[[RoundReport], None] | None = None) -> list[RoundReport]:
        self._reports, self._on_round = [], on_round
        await self.transport.start()
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    receiver = tg.create_task(self._receive(), name=f"{self.name}-receive")
                    try:
                        await self._drive()
                    finally:
                        self._tg = None  # no new tasks; the group awaits what it owns
                        receiver.cancel()
                        self.signer.close()
            finally:
                checkpoint.save(self)
                await self.transport.close()
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
        return self._reports

    async def _drive(self) -> None:
        """Carry out what waits, then sleep until the machine's next deadline or an event."""
        loop, m = asyncio.get_running_loop(), self.machine
        m.configure(self._params())  # self.cfg as it is now (a test may have changed it)
        self._feed(m.start(loop.time()))
        while True:
            while self._queue:
                a = self._queue.pop(0)
                await self._do(a)
            if m.done:
                return
            self._wakeup.clear()
            nd = m.next_deadline
            try:
                async with asyncio.timeout(None if nd is None else max(nd - loop.time(), 0)):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            if not self._queue:
                self._feed(m.tick(loop.time()))

    async def _do(self, a: ev.Action) -> None:
        now = asyncio.get_running_loop().time()
        match a:
            case ev.Broadcast(msg, what):
                data = self._message(msg)
                if data is not None:
                    await self._in_background(self._broadcast(self.book.current, data), what)
            case ev.SendTo(peers, msg, what):
                data = self._message(msg)
                for peer in peers if data is not None else ():
                    await self._in_background(self._send(peer, data), f"{what}-{peer}")
            case ev.RotatePrekeys(r, hello):
                await self._rotate_prekeys(r, announce=hello)
            case ev.ForgetPrekeys():
                # No round left to read a share in: nothing on this disk may open
                # recorded traffic any more.
                self.signer.forget_prekeys()
            case ev.Train(r):
                self._round = RoundState(get_flat(self.model).clone(), time.perf_counter())
                assert self._tg is not None
                self._tg.create_task(self._release(r), name=f"{self.name}-release-{r}")
            case ev.SendShare(r, seal_for, _, stored):
                if stored:
                    result = self._round.result
                    self.signer.seq = max(self.signer.seq, result.sent[0] + 1)
                    await self._in_background(self._broadcast(r, result.data), f"share-{r}")
                elif self._go is not None and not self._go.done():
                    self._go.set_result(seal_for)
            case ev.SendPhase():  # a secure round's step (secure_node.py)
                await secure_node.send_phase(self, a)
            case ev.Close():
                if a.echo is not None:  # the echo's audit lines and evidence first
                    self.echo_records.closed(a.round, a.echo)
                self._feed(await closing.closed(self, a, now))
            case ev.Advanced(r, nxt):
                self._reports.append(report := closing.report(self, r, nxt))
                if self._on_round is not None:
                    self._on_round(report)
            case ev.Joined(r, nxt):
                log.warning("%s: the others are at round %d; joining them there (rounds "
                            "%d-%d skipped)", self.name, nxt + 1, r + 1, nxt)
            case ev.Checkpoint():
                checkpoint.save(self)
            case ev.Retire(r, why):
                report = await closing.retire(self, r, why)
                if self._on_round is not None:
                    self._on_round(report)
            case ev.SendFinal(r):
                self._final_ours = finals.model_digest(self.model)
                await self._in_background(
                    self._broadcast(r, self._sign(KIND_FINAL, r, self._final_ours)), "final")
            case ev.Finals(r, got, expected):
                finals.record(self.state, self.name, r, self._final_ours, dict(got),
                              set(expected))
            case ev.FinalSeenMissing(_, members):
                log.info("%s: no seen report for the last round from %s", self.name,
                         ", ".join(members))
            case ev.SendVote():
                await self._send_vote()
            case ev.SendStats():
                self._own_stats_msg, data = self._own_stats()
                await self._in_background(self._broadcast(0, data), "stats")
            case ev.AdoptRange(members, fallback):
                self._agreed(*normalization.by_range(self.schema, members, fallback))
            case ev.Combine(messages):
                assert self._own_stats_msg is not None
                self._agreed(*normalization.combined(
                    self.name, self.schema, {**dict(messages), self.name: self._own_stats_msg},
                    self.strategy_params.get("max_weight_fraction")))
            case ev.Abort(why):
                raise LocalError(why)
            case _ if isinstance(a, bookkeeping.AT_ONCE):
                bookkeeping.carry_out(self, a)
            case _:
                raise LocalError(f"{self.name}: the driver cannot carry out {a!r}: a bug")

    def _message(self, msg: ev.Message) -> bytes | None:
        if isinstance(msg, ev.Sign):
            data = self._sign(msg.kind, msg.round, msg.body)
            if msg.kind == KIND_ECHO:
                self.echo_records.signed(msg.round, data)
            return data
        if msg.name == "announcement":
            return self._announcement
        stored = self.state.path / {"norm": self.VOTE_FILE, "stats": self.STATS_FILE}[msg.name]
        return stored.read_bytes() if stored.exists() else None

    # --- our share ------------------------------------------------------------------
    async def _release(self, r: int) -> None:
        await (sharing.release if self.secure is None else secure_node.release)(self, r)

    def _sign(self, kind: str, r: int, body: bytes | Sequence[bytes]) -> bytes:
        """Signed with the next sequence number, on disk first (Signer.sign)."""
        return self.signer.sign(kind, r, body)

    async def _rotate_prekeys(self, r: int, announce: bool = False) -> None:
        await sharing.rotate_prekeys(self, r, announce)

    # --- sending ---------------------------------------------------------------------
    async def _in_background(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        await sharing.in_background(self, coro, what)

    async def _send(self, peer: str, data: bytes) -> None:
        await sharing.send(self, peer, data)

    async def _broadcast(self, r: int, data: bytes) -> None:
        await sharing.broadcast(self, r, data)

    def _traffic(self, r: int) -> audit.Traffic:
        """The running counters for a metrics line (and the flood audit lines)."""
        t = self.transport.stats
        return self.audit.traffic(r, self.rejected(), t.bytes_sent, t.bytes_received,
                                  t.flood_by_sender)

    def rejected(self) -> dict[str, int]:
        """Rejections by reason: ours (envelope, round book) plus the transport's refusals."""
        out = Counter(self.counters.rejected)
        out.update(self.transport.stats.refused)
        return dict(out)

    def epsilon(self) -> float | None:
        if self.cfg.privacy.mode == "off":
            return None
        return self.ledger.epsilon(self.cfg.privacy.delta)

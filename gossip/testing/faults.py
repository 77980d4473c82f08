"""Network faults for rehearsals: a wrapper around any transport that drops or delays
what this member receives.

Used by both simulators (`flnode simulate`, `scripts/simulate_network.py`) through a
node config's `[faults]` section; a real deployment leaves it out. Faults act on the
receiving side, per message, so each member sees its own losses:

- `loss`: each incoming message is dropped with this probability;
- `delay_s`, `jitter_s`: each is delivered after delay + uniform(-jitter, +jitter) s
  (never below 0), so messages can also be reordered;
- `partitions`: while a message's round is in [start, start + rounds), a message from
  a member on the other side of the cut is dropped; it heals afterwards.

Which member sent a message and for which round come from the envelope's outer
fields as the receiver sees them (unauthenticated: enough to decide what a rehearsal
drops, never used for trust). Dropped messages are acknowledged (lost in the network,
not redelivered) and counted in `stats.refused["fault_loss"]` / `["fault_partition"]`.
The random choices come from a seed (the simulation's), not from the OS: the same
seed drops the same messages.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from gossip.envelope import decode_outer
from gossip.errors import RemoteError
from gossip.transports.base import Incoming, Transport

_CLOSED = object()


@dataclass(frozen=True)
class Partition:
    side: frozenset[str]  # these members on one side, everybody else on the other
    start: int  # first round (0-based) of the cut
    rounds: int  # how many rounds it lasts

    def cuts(self, a: str, b: str, round_: int) -> bool:
        return self.start <= round_ < self.start + self.rounds and \
            (a in self.side) != (b in self.side)


@dataclass(frozen=True)
class FaultPlan:
    loss: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    partitions: tuple[Partition, ...] = ()
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(self.loss or self.delay_s or self.jitter_s or self.partitions)


def parse_network_partition(spec: str) -> Partition:
    """"A,B@ROUND:ROUNDS" (ROUND 1-based): A and B cut off from the rest for ROUNDS rounds."""
    try:
        names, when = spec.split("@")
        start, rounds = when.split(":")
        side = frozenset(n.strip() for n in names.split(",") if n.strip())
        part = Partition(side, int(start) - 1, int(rounds))
    except ValueError:
        raise ValueError(f"partition {spec!r}: expected A,B@ROUND:ROUNDS, e.g. "
                         "bank-0,bank-1@5:3") from None
    if not side or part.start < 0 or part.rounds < 1:
        raise ValueError(f"partition {spec!r}: needs at least one member, ROUND >= 1 and "
                         "ROUNDS >= 1")
    return part


class FaultyTransport(Transport):
    def __init__(self, inner: Transport, me: str, plan: FaultPlan,
                 members: Mapping[bytes, str] | None = None) -> None:
        self.inner = inner
        self.me = me
        self.plan = plan
        self.members = dict(members or {})  # public key -> name, to name the sender
        self.stats = inner.stats
        self._rng = random.Random(f"{plan.seed}:{me}")
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._timers: set[asyncio.TimerHandle] = set()
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.inner.start()

    async def broadcast(self, data: bytes) -> None:
        await self.inner.broadcast(data)

    async def send(self, peer: str, data: bytes) -> None:
        await self.inner.send(peer, data)

    def _origin(self, msg: Incoming) -> tuple[str | None, int | None]:
        try:
            env = decode_outer(msg.data)
        except RemoteError:
            return msg.peer_hint, None
        return self.members.get(env.sender, msg.peer_hint), env.round

    def _drop(self, msg: Incoming, reason: str) -> None:
        self.stats.refused[reason] += 1
        if msg.ack is not None:
            msg.ack()

    def _admit(self, msg: Incoming) -> None:
        sender, round_ = self._origin(msg)
        if round_ is not None and sender is not None and any(
                p.cuts(self.me, sender, round_) for p in self.plan.partitions):
            self._drop(msg, "fault_partition")
            return
        if self.plan.loss and self._rng.random() < self.plan.loss:
            self._drop(msg, "fault_loss")
            return
        wait = self.plan.delay_s
        if self.plan.jitter_s:
            wait += self._rng.uniform(-self.plan.jitter_s, self.plan.jitter_s)
        if wait <= 0:
            self._queue.put_nowait(msg)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def deliver() -> None:
            self._timers.discard(handle)  # type: ignore[arg-type]
            self._queue.put_nowait(msg)

        handle = loop.call_later(wait, deliver)
        self._timers.add(handle)

    async def _forward(self) -> None:
        try:
            async for msg in self.inner.incoming():
                self._admit(msg)
        finally:
            self._queue.put_nowait(_CLOSED)

    async def incoming(self) -> AsyncIterator[Incoming]:
        self._pump = asyncio.get_running_loop().create_task(self._forward())
        try:
            while True:
                item = await self._queue.get()
                if item is _CLOSED:
                    return
                assert isinstance(item, Incoming)
                yield item
        finally:
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass

    async def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        await self.inner.close()


def fault_plan(loss: float, delay_ms: float, jitter_ms: float, partitions: Sequence[str],
               seed: int) -> FaultPlan:
    return FaultPlan(loss, delay_ms / 1000, jitter_ms / 1000,
                     tuple(parse_network_partition(p) for p in partitions), seed)

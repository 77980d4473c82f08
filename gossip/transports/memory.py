"""In-memory transport: delivery between members inside one process.

For simulations of many members and for tests. A `MemoryHub` plays the
network: each member attaches under its name and the hub delivers a byte
string to the other attached members. It does not copy (bytes are
immutable) and it is not a trusted component: the bytes still go through
`envelope.verify` on arrival, exactly as over a real network.

Intake is fair per sender, as on MQTT and libp2p (`FairInbox` in base.py): the
hub names the sender by the name it attached under (the in-process equivalent
of the broker's ACL or the Noise-authenticated peer id: a member cannot send
under another's name), and a sender over its rate (`sender_rate`, default 50
messages a second, burst 256), its queued messages or its queued bytes has the
excess dropped before it is parsed, counted in `stats.refused["flood"]` and per
member in `stats.flood_by_sender`; nobody else's message is affected, and the
receiver takes the senders' messages in turn. The rate is a token bucket on the
monotonic clock: an honest member sends a few messages a round, far under the
burst and the rate, so it never bites normal traffic and seeded runs stay
reproducible; only a flooder (`--attack flood`) is limited by it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

from gossip.errors import LocalError
from gossip.transports.base import (
    SENDER_QUEUE_ENVELOPES,
    FairInbox,
    Incoming,
    RateBudget,
    Transport,
    TransportStats,
)

log = logging.getLogger(__name__)

# The per-sender byte bound is SENDER_QUEUE_ENVELOPES envelopes of this size: the
# default of gossip.max_envelope_bytes (node/runtime/config.py); `flnode simulate` passes the
# consortium's own.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class MemoryHub:
    def __init__(self) -> None:
        self._members: dict[str, MemoryTransport] = {}

    def attach(self, name: str, neighbours: Iterable[str], *,
               max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               sender_rate: RateBudget | None = None) -> MemoryTransport:
        if name in self._members:
            raise LocalError(f"member {name!r} is already attached to this hub")
        transport = MemoryTransport(self, name, list(neighbours),
                                    max_message_bytes=max_message_bytes, sender_rate=sender_rate)
        self._members[name] = transport
        return transport

    async def deliver(self, sender: str, peer: str, data: bytes) -> bool:
        """Hand `data` to `peer`'s intake as coming from `sender` (the name it attached
        under). False if `peer` is not attached (like a closed socket); True once
        delivered, even if the receiver's fair intake then drops it (a flooder's
        excess: the receiver counts it, as over a network)."""
        transport = self._members.get(peer)
        if transport is None:
            return False
        transport._receive(sender, bytes(data))  # noqa: SLF001 - the hub is the wire
        return True

    def detach(self, name: str) -> None:
        """`name` leaves the hub: nothing more reaches it; its `incoming()` yields what
        was already queued, then ends."""
        transport = self._members.pop(name, None)
        if transport is not None:
            transport._end()  # noqa: SLF001


class MemoryTransport(Transport):
    def __init__(self, hub: MemoryHub, name: str, neighbours: list[str], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 sender_rate: RateBudget | None = None) -> None:
        self.hub = hub
        self.name = name
        self.neighbours = [n for n in neighbours if n != name]
        self.stats = TransportStats()
        self._fair = FairInbox(self.neighbours,
                               max_bytes=SENDER_QUEUE_ENVELOPES * max_message_bytes,
                               rate=sender_rate)
        self._arrived = asyncio.Event()  # set when a message is queued or we leave the hub
        self._ended = False  # detached: no more arrivals
        self._closed = False
        self._logged: set[str] = set()

    def _receive(self, sender: str, data: bytes) -> None:
        if self._ended:
            return
        if not self._fair.knows(sender):
            # Attached to the hub but not one of our neighbours (a test's outsider): it
            # gets a budget of its own, like any sender; the hub's names are finite.
            self._fair.add_sender(sender)
        if not self._fair.admit(sender, len(data)):
            self.stats.flood_by_sender[sender] += 1
            self.stats.refused["flood"] += 1
            if sender not in self._logged:
                self._logged.add(sender)
                log.warning("%s: %s sends more than its share of our intake (%g messages/s, "
                            "%d or %d bytes queued): excess dropped before verification "
                            "(counted in flood_by_sender; further are counted, not logged)",
                            self.name, sender, self._fair.rate.rate, self._fair.max_messages,
                            self._fair.max_bytes)
            return
        self._fair.put(sender, data, len(data))
        self._arrived.set()

    def _end(self) -> None:
        self._ended = True
        self._arrived.set()

    async def start(self) -> None:
        return None

    async def broadcast(self, data: bytes) -> None:
        for peer in self.neighbours:
            await self.send(peer, data)

    async def send(self, peer: str, data: bytes) -> None:
        if self._closed:
            raise LocalError(f"transport of {self.name!r} is closed")
        if await self.hub.deliver(self.name, peer, data):
            self.stats.bytes_sent += len(data)
            self.stats.messages_sent += 1
        else:
            self.stats.dropped += 1

    def queued_from(self, sender: str) -> int:
        """Messages from `sender` waiting in this member's intake (not yet read)."""
        return self._fair.queued(sender) if self._fair.knows(sender) else 0

    async def incoming(self) -> AsyncIterator[Incoming]:
        while True:
            got = self._fair.pop()
            if got is None:
                if self._ended:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            sender, data = got
            self.stats.bytes_received += len(data)
            self.stats.messages_received += 1
            yield Incoming(data, sender)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hub.detach(self.name)

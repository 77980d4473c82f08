"""In-memory transport: asyncio queues inside one process.

For simulations of many members and for tests. A `MemoryHub` plays the
network: each member attaches under its name and the hub delivers a byte
string to the other attached members' queues. It does not copy (bytes are
immutable) and it is not a trusted component: the bytes still go through
`envelope.verify` on arrival, exactly as over a real network.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from gossip.errors import LocalError
from gossip.transports.base import Incoming, Transport, TransportStats

# Deep enough that lock-step rounds of hundreds of members never block on it;
# a full queue applies back-pressure to the sender rather than dropping.
QUEUE_DEPTH = 4096
_CLOSED = object()


class MemoryHub:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[object]] = {}

    def attach(self, name: str, neighbours: Iterable[str]) -> MemoryTransport:
        if name in self._queues:
            raise LocalError(f"member {name!r} is already attached to this hub")
        self._queues[name] = asyncio.Queue(QUEUE_DEPTH)
        return MemoryTransport(self, name, list(neighbours))

    async def deliver(self, sender: str, peer: str, data: bytes) -> bool:
        queue = self._queues.get(peer)
        if queue is None:
            return False  # peer not (or no longer) attached: like a closed socket
        await queue.put(Incoming(bytes(data), sender))
        return True

    def detach(self, name: str) -> None:
        queue = self._queues.pop(name, None)
        if queue is None:
            return
        while queue.full():  # closing drops what was not read yet
            queue.get_nowait()
        queue.put_nowait(_CLOSED)

    def queue_of(self, name: str) -> asyncio.Queue[object]:
        return self._queues[name]


class MemoryTransport(Transport):
    def __init__(self, hub: MemoryHub, name: str, neighbours: list[str]) -> None:
        self.hub = hub
        self.name = name
        self.neighbours = [n for n in neighbours if n != name]
        self.stats = TransportStats()
        self._queue = hub.queue_of(name)
        self._closed = False

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

    async def incoming(self) -> AsyncIterator[Incoming]:
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                return
            assert isinstance(item, Incoming)
            self.stats.bytes_received += len(item.data)
            self.stats.messages_received += 1
            yield item

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hub.detach(self.name)

"""The one interface every transport implements: start, broadcast, send, incoming, close.

Peers are named by member name; how a name maps to an address is the
transport's business (it gets the members' `addresses` tables). What a
transport says about who sent a message (`Incoming.peer_hint`) is only a
hint for logs: the sender is whoever signed the envelope.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gossip.errors import LocalError


class TransportFailed(LocalError):
    """The transport itself has stopped working (its thread or connection task died),
    not one peer: nothing more can be sent or received through it. `incoming()` raises
    it, and so do `send` and `broadcast`; the node must end (non-zero exit), not go on
    as if alone. The message names the cause."""


@dataclass(frozen=True)
class Incoming:
    data: bytes
    peer_hint: str | None  # transport-level origin, unauthenticated
    # Transports that redeliver what was not acknowledged (MQTT QoS 1 with a
    # persistent session) pass this; the node calls it once the message no longer
    # needs redelivering (used and checkpointed, or refused). None: nothing to do.
    ack: Callable[[], None] | None = None


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    dropped: int = 0  # outgoing messages that could not be delivered
    # Incoming traffic the transport refused before envelope.verify saw it,
    # by reason (e.g. "non_member_peer", "too_large"): counted like rejections.
    refused: Counter[str] = field(default_factory=Counter)


class Transport(abc.ABC):
    """A member's connection to its neighbours."""

    stats: TransportStats

    @abc.abstractmethod
    async def start(self) -> None:
        """Listen and connect. Returns once the transport can send."""

    @abc.abstractmethod
    async def broadcast(self, data: bytes) -> None:
        """Deliver `data` to every neighbour (best effort, at least once)."""

    @abc.abstractmethod
    async def send(self, peer: str, data: bytes) -> None:
        """Deliver `data` to one neighbour by member name.

        A neighbour that cannot be reached (refused, gone, too slow) is counted in
        `stats.dropped` and the call returns. Raises `LocalError` for what the caller
        got wrong (unknown peer, message over the cap, transport closed),
        `TransportFailed` if the transport is dead, and lets anything else (a bug)
        propagate. Cancelling the call stops the transfer before it returns."""

    @abc.abstractmethod
    def incoming(self) -> AsyncIterator[Incoming]:
        """Messages as they arrive, until the transport is closed (then it ends).

        Raises `TransportFailed` if the transport dies. A transport whose inbox is
        full stops taking messages (back-pressure) rather than drop one it would
        have to acknowledge."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every background task and release every resource. Idempotent."""

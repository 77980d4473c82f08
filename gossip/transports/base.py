"""The one interface every transport implements: start, broadcast, send, incoming, close.

Peers are named by member name; how a name maps to an address is the
transport's business (it gets the members' `addresses` tables). What a
transport says about who sent a message (`Incoming.peer_hint`) is only a
hint for logs: the sender is whoever signed the envelope.
"""

from __future__ import annotations

import abc
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
    # Of those, messages dropped because their sender was over its share of the intake
    # (rate, queued messages or bytes: `FairInbox`), by the member the transport
    # attributes them to (MQTT topic, libp2p peer id). Names the flooding member.
    flood_by_sender: Counter[str] = field(default_factory=Counter)


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


# --- fair intake per sender -----------------------------------------------------------
#
# Why the claimed sender may key a budget applied *before* the signature is checked:
# the transport names the sender from something the member cannot forge for another
# member's traffic. On MQTT it is the topic, and the broker's ACL lets each member
# account publish under its own prefix only; on libp2p it is the peer id Noise
# authenticated, and only members get past the handshake. A member can therefore only
# spend its *own* budget: excess dropped here costs the flooder (or a member whose
# account was taken over) its own messages, never another member's. The sender the
# envelope names is still verified later, on what passes. (A broker that ignored the
# ACL could spend any member's budget; it can already drop any member's traffic.)

# Messages one sender may have queued for the node, and bytes: an honest member has a
# few per round outstanding (share, seen report, hello or prekey answers, the shares
# of the rounds it is ahead by, at most lookahead + 1), so 256 is far above what it
# needs and bounds a flooder's queue. Bytes: two full-size envelopes per sender.
SENDER_QUEUE_MESSAGES = 256
SENDER_QUEUE_ENVELOPES = 2
# Messages per second one sender may have verified, sustained, and the burst above
# that. Measured (scripts/bench_flood.py, clean runs): an honest member sends 2-3
# messages a round (its share, its seen report, a hello now and then), and rounds of
# the 4-member demo over loopback take 0.1-0.2 s, so 15-30 a second at most; 50/s
# is twice that, and the burst covers a member catching up on many rounds at once. A
# flooder's excess is dropped before anything is parsed or verified, so it costs the
# node at most this rate of signature checks (plus, on libp2p, a stream set-up each),
# plus reading it off the wire until the node stops listening to it. At 200/s a
# Python libp2p flooder (~110 messages/s) stayed under the budget and cost the
# honest members 1.6-2.2x their round time.
SENDER_RATE_PER_S = 50.0
SENDER_BURST = 256


class RateBudget:
    """Token buckets per sender (messages per second and a burst). Pure: the clock is
    passed in, so tests drive it. Not thread-safe: one thread per instance."""

    def __init__(self, rate_per_s: float = SENDER_RATE_PER_S, burst: int = SENDER_BURST,
                 clock: Callable[[], float] | None = None) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise LocalError(f"sender rate must be > 0 and burst >= 1, not {rate_per_s}, {burst}")
        self.rate, self.burst = rate_per_s, float(burst)
        self._clock = clock or time.monotonic
        self._tokens: dict[str, tuple[float, float]] = {}  # sender -> (tokens, at)

    def take(self, sender: str) -> bool:
        """One message's worth from `sender`'s bucket; False if it is empty (drop it)."""
        now = self._clock()
        tokens, at = self._tokens.get(sender, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._tokens[sender] = (tokens, now)
            return False
        self._tokens[sender] = (tokens - 1.0, now)
        return True


class FairInbox:
    """Incoming messages queued per sender and handed out round-robin, so one sender's
    backlog never delays another's messages by more than one of its own.

    `admit` decides before the message is parsed: a sender over its rate, its queued
    message count or its queued bytes is refused (`dropped[sender]` counts it) and
    nobody else's message is affected. Pure and single-threaded (the transport's event
    loop); `senders` is the fixed set of names the transport can attribute traffic to.
    """

    def __init__(self, senders: Iterable[str], *, max_messages: int = SENDER_QUEUE_MESSAGES,
                 max_bytes: int, rate: RateBudget | None = None) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise LocalError(f"per-sender queue limits must be >= 1, not {max_messages} "
                             f"messages, {max_bytes} bytes")
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.rate = rate if rate is not None else RateBudget()
        self._queues: dict[str, deque[tuple[Any, int]]] = {s: deque() for s in senders}
        self._bytes: Counter[str] = Counter()
        self._turn: deque[str] = deque()  # senders with something queued, next first
        self.dropped: Counter[str] = Counter()  # sender -> messages refused by admit
        self.drop_reasons: Counter[str] = Counter()  # "rate" / "queue" -> messages

    def add_sender(self, sender: str) -> None:
        """One more name the transport can attribute traffic to (an empty budget of its
        own); nothing if it has one already."""
        self._queues.setdefault(sender, deque())

    def knows(self, sender: str) -> bool:
        return sender in self._queues

    def admit(self, sender: str, nbytes: int) -> bool:
        """Room and rate for one more message of `nbytes` from `sender` (consumes a
        token when it says yes). `sender` must be one of the transport's senders."""
        queue = self._queues[sender]
        if len(queue) >= self.max_messages or self._bytes[sender] + nbytes > self.max_bytes:
            why = "queue"
        elif not self.rate.take(sender):
            why = "rate"
        else:
            return True
        self.dropped[sender] += 1
        self.drop_reasons[why] += 1
        return False

    def put(self, sender: str, item: Any, nbytes: int) -> None:
        queue = self._queues[sender]
        if not queue:
            self._turn.append(sender)
        queue.append((item, nbytes))
        self._bytes[sender] += nbytes

    def pop(self) -> tuple[str, Any] | None:
        """The next message, taking senders in turn; None if nothing is queued."""
        if not self._turn:
            return None
        sender = self._turn.popleft()
        queue = self._queues[sender]
        item, nbytes = queue.popleft()
        self._bytes[sender] -= nbytes
        if queue:
            self._turn.append(sender)
        return sender, item

    def queued(self, sender: str | None = None) -> int:
        if sender is not None:
            return len(self._queues[sender])
        return sum(len(q) for q in self._queues.values())

    def queued_bytes(self, sender: str) -> int:
        return self._bytes[sender]

    def clear(self) -> list[Any]:
        out = [item for q in self._queues.values() for item, _ in q]
        for q in self._queues.values():
            q.clear()
        self._bytes.clear()
        self._turn.clear()
        return out

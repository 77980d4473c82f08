"""What any one peer can make a libp2p node hold, and whether it may hold more.

Pure bookkeeping: no trio, no libp2p, no clock of its own (the quench is given the
time). The trio side (`gate.py`, `stream.py`) asks and records here and does the
waiting; the numbers are read by tests and logs through the transport. All limits
are constructor parameters of `Libp2pTransport`; each refusal is counted in
`stats.refused` under the name in brackets and logged once per (peer, reason); for
handshakes the "peer" is the remote IP.

- Handshakes (before Noise has said who the peer is). At most
  `max_pending_handshakes` (16) inbound security handshakes at once, and at
  most `max_handshakes_per_ip` (4) from one IP address (not applied to
  loopback, where a rehearsal runs every member, unless `per_ip_on_loopback`);
  a connection over
  either is closed at once [`handshake_limit`]. A handshake that has not
  finished within `handshake_timeout_s` (10 s) is closed
  [`handshake_timeout`]. A peer that completes Noise with a key that is not a
  member's is closed before muxing [`non_member_peer`], so a non-member holds
  at most a handshake slot, for at most `handshake_timeout_s`. (Our own dials
  are not limited. A flood from one address can delay members that dial *us*
  from the same address; members also dial each other, so the connection is
  made from our side.) py-libp2p itself allows 3 connections per peer id.
- Concurrent inbound transfers (streams of `/flnode/share/1`) per member:
  `max_streams_per_peer` (4), counted across that member's connections, from
  the moment the stream is handed to us until it is done, waiting included;
  one more is reset at once [`too_many_streams`]. Our own sends to one member
  stay below it (`MAX_OUT_STREAMS_PER_PEER`, 2) and start in the order they
  were sent, so an honest node never trips it and a round's share never
  overtakes the previous round's.
- Bytes in flight. A transfer's declared length is reserved before a byte of
  its body is read, against a per-member budget `max_peer_inflight_bytes`
  (default max_message_bytes + 1 MiB: one full-size share plus small
  messages) and a global one `max_inflight_bytes` (default max(2 x
  max_message_bytes, 256 MiB)). A transfer that does not fit waits, reading
  nothing (the sender is held by yamux flow control, 256 KiB per stream), up
  to `budget_wait_s` (20 s, below the sender's own 30 s base timeout) for
  others to finish, then is reset [`busy`]. Waiters are not served in order.
  So the bodies we buffer never exceed `max_inflight_bytes`, and one member
  never holds more than `max_peer_inflight_bytes` of it.
- Rate, measured on bytes actually received (not on the length the sender
  declares): the 8-byte length must arrive within `rate_window_s` (20 s) of
  the stream being handed to us, and after the reservation every
  `min_rate_bytes_per_s` x `rate_window_s` bytes (64 KiB/s x 20 s = 1.25 MiB,
  or the rest of the message if less) must arrive within `rate_window_s` of
  the previous such mark; otherwise the stream is reset and its reservation
  freed [`too_slow`]. A transfer therefore lasts at most about
  n / min_rate + rate_window_s, however it trickles. Our acknowledgement byte
  must also go out within `rate_window_s`. The clock is wall time: a receiver
  whose own thread is starved for a whole window (the GIL held elsewhere for
  20 s) can cut an honest sender, who then counts the share as not delivered.

Fair intake per member (`gossip.transports.base`). Once the length prefix is
read, and before a byte of the body is, a transfer over its member's rate
(`sender_rate`, default 50 messages a second, burst 256) is reset [`flood`],
counted per member in `stats.flood_by_sender`. The peer id that names the member
was authenticated by Noise and only members get past the handshake, so a member
can spend only its own budget; the envelope's signer is still checked later.
The member is then quenched (`quench` here, acted on in `gate.py`): our
connections with it are closed and new ones refused after Noise [`quenched`] for
30 s, doubling each time it floods again, so a flood costs us one handshake per
attempt instead of one stream per message.
A transfer is then acknowledged only once its message has a place in its
member's own queue for the node (`inbox_depth` messages, default 256, and two
full-size envelopes of bytes). If that member's queue is full, the stream holds
(reading nothing more, its sender waiting for the acknowledgement) until the
node takes one of that member's messages, for at most `rate_window_s`; then it
is reset [`inbox_full`] and the sender counts the share as not delivered. A
message is never acknowledged and then dropped. The node takes messages
round-robin across members, so one member's backlog delays another's message
by at most one of its own, and a member holding its queue full (at most
`max_streams_per_peer` streams) holds nobody else's.

What the transport holds does not grow with the number of members. Besides each
member's own queue, all queues together hold at most `max_queued_bytes` (default
max(2 x max_message_bytes, 256 MiB), like the in-flight budget): past it, a
received transfer waits for room as above, whoever's message the node takes next
makes room, and after `rate_window_s` it is reset [`inbox_full`]. So the bodies
received and not yet taken by the node stay under max_inflight_bytes +
max_queued_bytes (512 MiB at the default 64 MiB envelope cap) with 3 members or
300; per member, only the bookkeeping above and py-libp2p's connection (~0.1-0.2
MB measured, docs/results/memory.md) remain.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from gossip.errors import LocalError
from gossip.transports.base import SENDER_QUEUE_ENVELOPES, SENDER_QUEUE_MESSAGES

# Inbound limits (module docstring); all can be set per transport.
MAX_PENDING_HANDSHAKES = 16
MAX_HANDSHAKES_PER_IP = 4
HANDSHAKE_TIMEOUT_S = 10.0
MAX_STREAMS_PER_PEER = 4
MIN_INFLIGHT_BYTES = 256 * 1024 * 1024
# A member's in-flight budget beside one full-size share: room for its small
# messages (a seen report, a hello) at the same time. 1 MiB.
SMALL_MESSAGES_BYTES = 1024 * 1024
BUDGET_WAIT_S = 20.0
MIN_RATE_BYTES_PER_S = 64 * 1024
RATE_WINDOW_S = 20.0
# Incoming messages from one member waiting for the node; past this its transfer
# waits for room before it is acknowledged (module docstring).
INBOX_DEPTH = SENDER_QUEUE_MESSAGES
# The least the queues of all members together may hold (bytes acknowledged and not yet
# taken by the node), whatever max_message_bytes: without a total, each member's own
# two envelopes made the worst case grow with the members (300 members x 128 MiB).
MIN_QUEUED_BYTES = 256 * 1024 * 1024
# A member over its message rate: no connection with it for this long, doubling each
# time it floods again, up to QUENCH_MAX_S (`Admission.quench`; MQTT does the same).
QUENCH_S = 30.0
QUENCH_MAX_S = 3600.0


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class Admission:
    """The limits, and what each peer holds now: handshakes in progress (by IP),
    inbound transfers (by member), bytes reserved and buffered, messages acknowledged
    and not yet taken by the node, quenches. One thread (the trio thread) writes;
    others only read the counters."""

    def __init__(self, max_message_bytes: int, *,
                 max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
                 max_handshakes_per_ip: int = MAX_HANDSHAKES_PER_IP,
                 per_ip_on_loopback: bool = False,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
                 max_peer_inflight_bytes: int | None = None,
                 max_inflight_bytes: int | None = None,
                 budget_wait_s: float = BUDGET_WAIT_S,
                 min_rate_bytes_per_s: int = MIN_RATE_BYTES_PER_S,
                 rate_window_s: float = RATE_WINDOW_S,
                 inbox_depth: int = INBOX_DEPTH,
                 max_queued_bytes: int | None = None) -> None:
        if max_peer_inflight_bytes is None:
            max_peer_inflight_bytes = max_message_bytes + SMALL_MESSAGES_BYTES
        if max_inflight_bytes is None:
            max_inflight_bytes = max(2 * max_message_bytes, MIN_INFLIGHT_BYTES)
        if max_queued_bytes is None:
            max_queued_bytes = max(2 * max_message_bytes, MIN_QUEUED_BYTES)
        if max_queued_bytes < max_message_bytes:
            raise LocalError(f"libp2p limits: need max_message_bytes ({max_message_bytes}) <= "
                             f"max_queued_bytes ({max_queued_bytes})")
        if not max_message_bytes <= max_peer_inflight_bytes <= max_inflight_bytes:
            raise LocalError(f"libp2p limits: need max_message_bytes ({max_message_bytes}) <= "
                             f"max_peer_inflight_bytes ({max_peer_inflight_bytes}) <= "
                             f"max_inflight_bytes ({max_inflight_bytes})")
        if min(max_pending_handshakes, max_handshakes_per_ip, max_streams_per_peer,
               min_rate_bytes_per_s, inbox_depth) < 1 or min(handshake_timeout_s, budget_wait_s,
                                                rate_window_s) <= 0:
            raise LocalError("libp2p limits must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_pending_handshakes = max_pending_handshakes
        self.max_handshakes_per_ip = max_handshakes_per_ip
        self.per_ip_on_loopback = per_ip_on_loopback
        self.handshake_timeout_s = handshake_timeout_s
        self.max_streams_per_peer = max_streams_per_peer
        self.max_peer_inflight_bytes = max_peer_inflight_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.budget_wait_s = budget_wait_s
        self.min_rate_bytes_per_s = min_rate_bytes_per_s
        self.rate_window_s = rate_window_s
        self.inbox_depth = inbox_depth
        self.max_queue_bytes = SENDER_QUEUE_ENVELOPES * max_message_bytes  # one member's
        self.max_queued_bytes = max_queued_bytes  # all members' queues together
        self.handshakes = 0  # inbound security handshakes in progress
        self.handshakes_by_ip: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()  # member -> inbound transfers in progress
        self.reserved: Counter[str] = Counter()  # member -> declared bytes admitted
        self.reserved_total = 0
        self.buffered = 0  # body bytes received and held by unfinished transfers
        # Per member, messages and bytes acknowledged and not yet taken by the node.
        self.queued: Counter[str] = Counter()
        self.queued_bytes: Counter[str] = Counter()
        self.queued_total = 0  # the sum of queued_bytes
        self.waiting_for_room = 0  # transfers received in full, waiting for an inbox place
        self.quenched_until: dict[str, float] = {}  # member -> trio time
        self.quenches: Counter[str] = Counter()

    # --- handshakes (by remote IP) ----------------------------------------------------
    def handshake_over_limit(self, ip: str) -> bool:
        """One more inbound handshake from `ip` would go over a limit. Loopback peers
        are processes on this host (a rehearsal runs every member on 127.0.0.1): only
        the global cap applies to them."""
        per_ip = self.per_ip_on_loopback or not is_loopback(ip)
        return self.handshakes >= self.max_pending_handshakes or (
            per_ip and self.handshakes_by_ip[ip] >= self.max_handshakes_per_ip)

    def handshake_started(self, ip: str) -> None:
        self.handshakes += 1
        self.handshakes_by_ip[ip] += 1

    def handshake_ended(self, ip: str) -> None:
        self.handshakes -= 1
        self.handshakes_by_ip[ip] -= 1
        if self.handshakes_by_ip[ip] <= 0:
            del self.handshakes_by_ip[ip]

    # --- inbound transfers (by member) ------------------------------------------------
    def stream_over_limit(self, peer: str) -> bool:
        return self.streams[peer] >= self.max_streams_per_peer

    def stream_opened(self, peer: str) -> None:
        self.streams[peer] += 1

    def stream_closed(self, peer: str) -> None:
        self.streams[peer] -= 1
        if self.streams[peer] <= 0:
            del self.streams[peer]

    # --- bytes in flight --------------------------------------------------------------
    def fits(self, peer: str, n: int) -> bool:
        return (self.reserved[peer] + n <= self.max_peer_inflight_bytes
                and self.reserved_total + n <= self.max_inflight_bytes)

    def reserve(self, peer: str, n: int) -> None:
        """Take n bytes of both budgets (the caller has checked `fits`)."""
        self.reserved[peer] += n
        self.reserved_total += n

    def release(self, peer: str, n: int) -> None:
        self.reserved[peer] -= n
        if self.reserved[peer] <= 0:
            del self.reserved[peer]
        self.reserved_total -= n

    # --- the member's queue for the node ----------------------------------------------
    def has_room(self, peer: str, n: int) -> bool:
        return (self.queued[peer] < self.inbox_depth
                and self.queued_bytes[peer] + n <= self.max_queue_bytes
                and self.queued_total + n <= self.max_queued_bytes)

    def queue(self, peer: str, n: int) -> None:
        self.queued[peer] += 1
        self.queued_bytes[peer] += n
        self.queued_total += n

    def room_taken(self, peer: str, n: int) -> None:
        """The node took (or we never acknowledged) one of `peer`'s n-byte messages."""
        self.queued[peer] -= 1
        self.queued_bytes[peer] -= n
        self.queued_total -= n
        if self.queued[peer] <= 0:  # no entry kept for a member with nothing queued
            del self.queued[peer]
            del self.queued_bytes[peer]

    # --- quench -----------------------------------------------------------------------
    def quenched(self, peer: str, now: float) -> bool:
        return self.quenched_until.get(peer, 0.0) > now

    def quench(self, peer: str, now: float) -> float | None:
        """`peer` flooded at `now`: seconds it is quenched for (QUENCH_S, doubling each
        time, at most QUENCH_MAX_S), or None if it is quenched already."""
        if self.quenched(peer, now):
            return None
        seconds = min(QUENCH_MAX_S, QUENCH_S * 2 ** self.quenches[peer])
        self.quenched_until[peer] = now + seconds
        self.quenches[peer] += 1
        return seconds

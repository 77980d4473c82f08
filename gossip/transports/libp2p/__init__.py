"""libp2p transport: shares over a direct, length-prefixed stream protocol.

`Libp2pTransport` is the asyncio face; the work is split by concern:

- `bridge.py`: the trio thread the transport owns (py-libp2p is built on trio,
  flnode on asyncio) and the two hops across it; a dead thread is `TransportFailed`.
- `stream.py`: `/flnode/share/1` (one stream per share, an 8-byte length, the
  bytes, a one-byte acknowledgement), whole-frame writes, the receiving side.
- `admission.py`: what any one peer can make us hold (handshakes, streams,
  bytes in flight, rate, per-member queue, quench), pure bookkeeping; its
  docstring lists every limit and the name each refusal is counted under.
- `gate.py`: members only, right after Noise; the handshake limits; the quench.
- `trim.py`: py-libp2p without its mDNS, UPnP and AutoTLS code (applied here,
  before libp2p's first import).

Why a stream and not GossipSub: GossipSub silently drops messages over 1 MiB
(a constant, not a parameter), keeps 32-slot queues that overflow silently
and signs every message with the host key (2.3 s on 50 MB). Shares are
signed once by `gossip.envelope`, so they travel over our own protocol
`/flnode/share/1`.

Sending (here): a member that cannot be reached misses the share (`UNREACHABLE`,
counted in `stats.dropped`); our transfers to one member start in the order they
were sent, at most `MAX_OUT_STREAMS_PER_PEER` at once; a member that is not
connected yet is waited for once (`CONNECT_WAIT_S`), not once per round.
Receiving: messages are queued per member (`FairInbox`) and handed to the node
round-robin; the trio side acknowledges one only once it has a place there.
"""

from __future__ import annotations

# ruff: noqa: E402  (trim.leave_out() must run before libp2p's first import)
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gossip.transports.libp2p.trim import leave_out

leave_out()  # before libp2p's first import: no mDNS, UPnP, AutoTLS code in a node

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import RetryConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from gossip.errors import LocalError, describe
from gossip.membership import Member
from gossip.transports.base import (
    FairInbox,
    Incoming,
    RateBudget,
    Transport,
    TransportFailed,
    TransportStats,
)
from gossip.transports.libp2p.admission import (
    BUDGET_WAIT_S,
    HANDSHAKE_TIMEOUT_S,
    INBOX_DEPTH,
    MAX_HANDSHAKES_PER_IP,
    MAX_PENDING_HANDSHAKES,
    MAX_STREAMS_PER_PEER,
    MIN_RATE_BYTES_PER_S,
    RATE_WINDOW_S,
    Admission,
)
from gossip.transports.libp2p.bridge import START_TIMEOUT_S, TrioBridge, root_cause
from gossip.transports.libp2p.gate import gate_members, quench
from gossip.transports.libp2p.stream import (
    SHARE_PROTOCOL,
    Intake,
    transfer,
    upgrade_with_whole_frames,
)

log = logging.getLogger("flnode.libp2p")
# py-libp2p logs routine churn (a refused dial, a peer that went away) at
# ERROR, and with no handler of its own Python's last-resort handler prints it
# to stderr. flnode reports what matters on its own logger; py-libp2p's own
# LIBP2P_DEBUG variable still turns its logging back on.
if not os.environ.get("LIBP2P_DEBUG"):
    _libp2p_log = logging.getLogger("libp2p")
    _libp2p_log.setLevel(logging.CRITICAL)
    _libp2p_log.addHandler(logging.NullHandler())

# Redial backoff for members that are not up yet (or went away).
DIAL_BACKOFF_MIN_S = 0.2
DIAL_BACKOFF_MAX_S = 5.0
# A send to a member that is not connected yet (all nodes starting at once, or
# one restarting) waits this long for the dialer to reach it before the share
# is given up for that member; later sends to it fail at once until a connection
# to it exists again (a member that is down costs one wait, not one per round).
CONNECT_WAIT_S = 10.0
# Our own transfers to one member at a time: below its MAX_STREAMS_PER_PEER, so an
# honest node's background sends (a share, a seen report, hello replies) never trip
# the limit that stops a greedy member; the rest queue in order (trio's semaphore is
# fair) behind them, each still bounded by its own transfer timeout.
MAX_OUT_STREAMS_PER_PEER = 2
# (peer, reason) pairs logged; past this, refusals are only counted (peer ids and
# addresses are the sender's choice, so the set of them must not grow forever).
MAX_LOGGED = 4096
# What "this peer could not be reached, or went away mid-transfer" looks like from
# `_send_trio`; `send` counts these as dropped and lets anything else propagate.
# BaseLibp2pError is py-libp2p's own family: SwarmException (no connection, dial
# failed, refused after Noise), StreamFailure and ProtocolNotSupportedError
# (stream or protocol negotiation refused), MuxedStreamError/StreamError (the
# stream was reset or closed, yamux window timeout), UpgradeFailure, IOException.
# trio.TooSlowError is our transfer timeout; EOFError the stream ending before the
# receiver's acknowledgement (it refused: too large, busy, inbox full); OSError and
# trio's Broken/ClosedResourceError a socket that went away underneath.
UNREACHABLE: tuple[type[BaseException], ...] = (
    BaseLibp2pError, trio.TooSlowError, EOFError, OSError, trio.BrokenResourceError,
    trio.ClosedResourceError)


def peer_id_of(public_key: bytes) -> ID:
    """The libp2p peer id of an Ed25519 public key (identity multihash)."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


def _admitted(name: str) -> Any:
    """A limit or counter of the transport's `Admission`, read (and set) through."""
    return property(lambda self: getattr(self.admission, name),
                    lambda self, value: setattr(self.admission, name, value))


class Libp2pTransport(TrioBridge, Transport):
    # Limits and inbound counters (admission.py), on the transport for tests and logs.
    max_message_bytes = _admitted("max_message_bytes")
    max_pending_handshakes = _admitted("max_pending_handshakes")
    max_handshakes_per_ip = _admitted("max_handshakes_per_ip")
    per_ip_on_loopback = _admitted("per_ip_on_loopback")
    handshake_timeout_s = _admitted("handshake_timeout_s")
    max_streams_per_peer = _admitted("max_streams_per_peer")
    max_peer_inflight_bytes = _admitted("max_peer_inflight_bytes")
    max_inflight_bytes = _admitted("max_inflight_bytes")
    budget_wait_s = _admitted("budget_wait_s")
    min_rate_bytes_per_s = _admitted("min_rate_bytes_per_s")
    rate_window_s = _admitted("rate_window_s")
    inbox_depth = _admitted("inbox_depth")
    max_queue_bytes = _admitted("max_queue_bytes")
    max_queued_bytes = _admitted("max_queued_bytes")
    queued_total = _admitted("queued_total")
    handshakes = _admitted("handshakes")
    streams = _admitted("streams")
    reserved = _admitted("reserved")
    reserved_total = _admitted("reserved_total")
    buffered = _admitted("buffered")
    waiting_for_room = _admitted("waiting_for_room")
    quenches = _admitted("quenches")

    def __init__(self, seed: bytes, name: str, members: Sequence[Member],
                 max_message_bytes: int, *,
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
                 max_queued_bytes: int | None = None,
                 sender_rate: RateBudget | None = None) -> None:
        me = [m for m in members if m.name == name]
        if not me:
            raise LocalError(f"{name!r} is not a member of the consortium")
        TrioBridge.__init__(self)
        self.name = name
        self.listen = self._address(me[0])
        # Inbound state, trio thread only (read elsewhere for tests and logs).
        self.admission = Admission(
            max_message_bytes, max_pending_handshakes=max_pending_handshakes,
            max_handshakes_per_ip=max_handshakes_per_ip, per_ip_on_loopback=per_ip_on_loopback,
            handshake_timeout_s=handshake_timeout_s, max_streams_per_peer=max_streams_per_peer,
            max_peer_inflight_bytes=max_peer_inflight_bytes, max_inflight_bytes=max_inflight_bytes,
            budget_wait_s=budget_wait_s, min_rate_bytes_per_s=min_rate_bytes_per_s,
            rate_window_s=rate_window_s, inbox_depth=inbox_depth,
            max_queued_bytes=max_queued_bytes)
        # Members a send already waited CONNECT_WAIT_S for in vain: until the dialer
        # (or the member) makes a connection, sends to them fail at once instead of
        # waiting again, so a member that is down does not cost every round a wait.
        self._unreachable: set[Any] = set()
        # When the current wait for a connection to a member ends (trio clock): every
        # send to it while one is waiting shares that one wait, not a fresh one each.
        self._connect_by: dict[Any, float] = {}
        self._out_slots: dict[Any, trio.Semaphore] = {}  # peer id -> our transfers to it
        self._out_order: dict[Any, trio.Lock] = {}  # peer id -> transfers start in order
        self._rate = sender_rate if sender_rate is not None else RateBudget()  # trio side
        self.peers = {m.name: (peer_id_of(m.public_key), self._address(m))
                      for m in members if m.name != name}
        self.names_by_id = {pid: n for n, (pid, _) in self.peers.items()}
        self._undeliverable: set[str] = set()  # members whose last send failed (logged once)
        self._seed = seed
        self.stats = TransportStats()
        # Asyncio side: per member, what the node has not taken yet (bounded by the
        # trio side's per-member room), handed out round-robin.
        self._fair = FairInbox(self.peers, max_messages=inbox_depth,
                               max_bytes=self.admission.max_queue_bytes)
        self._arrived = asyncio.Event()  # a message was queued, or we stop
        self._intake = Intake(
            name, self.admission, self.names_by_id, self._rate, refuse=self._refuse,
            count=lambda reason: self._on_loop(self._count_refusal, reason),
            flooded=lambda peer: self._on_loop(self._count_flood, peer),
            deliver=lambda data, peer: self._on_loop(self._deliver, data, peer),
            quench=self._quench, named=self.named)
        self._logged: set[tuple[str, str]] = set()
        self.host: Any = None

    @staticmethod
    def _address(member: Member) -> multiaddr.Multiaddr:
        text = member.addresses.get("libp2p")
        if not text:
            raise LocalError(f"member {member.name!r} has no addresses.libp2p in the consortium "
                             "file (e.g. \"/ip4/127.0.0.1/tcp/4001\")")
        try:
            return multiaddr.Multiaddr(text)
        except Exception as exc:  # noqa: BLE001 - multiaddr raises several types
            raise LocalError(f"member {member.name!r}: addresses.libp2p {text!r} is not a "
                             f"multiaddr: {exc}") from None

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    # --- asyncio side ----------------------------------------------------------
    async def start(self) -> None:
        ok = await self._start_thread()
        if self._startup_error is not None:
            raise LocalError(f"libp2p host for {self.name!r} could not listen on "
                             f"{self.listen}: {describe(root_cause(self._startup_error))}"
                             ) from None
        if not ok:
            raise LocalError(f"libp2p host for {self.name!r} did not start in "
                             f"{START_TIMEOUT_S:.0f} s")
        log.info("%s: libp2p %s listening on %s", self.name, self.peer_id, self.listen)

    async def broadcast(self, data: bytes) -> None:
        """One send per neighbour, concurrently; all are awaited (or cancelled) here."""
        self._check_sendable(data)
        try:
            async with asyncio.TaskGroup() as tg:
                for peer in self.peers:
                    tg.create_task(self.send(peer, data), name=f"{self.name}-send-{peer}")
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    def named(self, text: str) -> str:
        """`text` (an error from py-libp2p) with each member's peer id replaced by the
        member's name: logs name members, the short id only to match libp2p's own logs."""
        for pid, name in self.names_by_id.items():
            full = str(pid)
            if full in text:
                text = text.replace(full, f"{name} (peer id …{full[-6:]})")
        return text

    def _check_sendable(self, data: bytes) -> None:
        self._check_usable()
        if len(data) > self.max_message_bytes:
            raise LocalError(f"message of {len(data)} bytes exceeds the cap of "
                             f"{self.max_message_bytes} (gossip.max_envelope_bytes)")

    async def send(self, peer: str, data: bytes) -> None:
        """Best effort: a member that cannot be reached misses this share (counted in
        stats.dropped; `UNREACHABLE` says what that means). Anything else propagates."""
        if peer not in self.peers:
            raise LocalError(f"{peer!r} is not a neighbour of {self.name!r}")
        self._check_sendable(data)
        try:
            await self._run(self._send_trio, self.peers[peer][0], data)
        except UNREACHABLE as exc:
            self.stats.dropped += 1
            if peer not in self._undeliverable:  # once per outage, not once per message
                self._undeliverable.add(peer)
                log.warning("%s: could not deliver %d bytes to %s: %s (further failures to "
                            "%s are counted, not logged, until a send gets through)", self.name,
                            len(data), peer, self.named(describe(exc)), peer)
            return
        if peer in self._undeliverable:
            self._undeliverable.discard(peer)
            log.info("%s: delivering to %s again", self.name, peer)
        self.stats.bytes_sent += len(data)
        self.stats.messages_sent += 1

    async def incoming(self) -> AsyncIterator[Incoming]:
        """Messages as they arrive; ends at close(); raises TransportFailed if the
        trio thread dies."""
        while True:
            if self._failure is not None:
                raise TransportFailed(self._failure)
            if self._closed:
                return
            nxt = self._fair.pop()
            if nxt is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            peer, item = nxt
            assert isinstance(item, Incoming)
            # The node has taken one of `peer`'s messages: room for one more of its own.
            self._to_trio(self._intake.room_taken, peer, len(item.data))
            yield item
            await asyncio.sleep(0)  # a sender whose queue never empties must not hog the loop

    def queued(self, peer: str | None = None) -> int:
        """Messages received and not yet taken by the node (from `peer`, or all)."""
        return self._fair.queued(peer)

    async def wait_connected(self, peers: Sequence[str], timeout: float) -> None:
        """Until every named peer has a live connection (for benchmarks and tests)."""
        async with asyncio.timeout(timeout):
            while not all(self.connected(p) for p in peers):
                await asyncio.sleep(0.05)

    def connected(self, peer: str) -> bool:
        return bool(self.host and self.host.get_network().get_connections(self.peers[peer][0]))

    async def close(self) -> None:
        """Stop the host and join its thread (every trio task ends with it)."""
        if self._closed:
            return
        self._closed = True
        await self._stop_thread()
        self._fair.clear()
        self._arrived.set()

    # --- counters, updated on the asyncio thread -----------------------------
    def _wake(self) -> None:
        self._arrived.set()

    def _count_refusal(self, reason: str) -> None:
        self.stats.refused[reason] += 1

    def _refuse(self, reason: str, peer: str, detail: str) -> None:
        """Count a refusal (on the asyncio thread) and log it once per (peer, reason).
        Called from the trio thread; `peer` is a member name, a peer id or an IP."""
        self._on_loop(self._count_refusal, reason)
        key = (peer, reason)
        if key not in self._logged and len(self._logged) < MAX_LOGGED:
            self._logged.add(key)
            log.warning("%s: refused libp2p %s: %s: %s (further ones are counted, not logged)",
                        self.name, peer, reason, self.named(detail))

    def _deliver(self, data: bytes, peer: str) -> None:
        """On the asyncio thread; the trio side holds an inbox slot for it."""
        if self._closed or self._failure is not None:
            return
        self.stats.bytes_received += len(data)
        self.stats.messages_received += 1
        self._fair.put(peer, Incoming(data, peer), len(data))
        self._arrived.set()

    def _count_flood(self, peer: str) -> None:
        self.stats.flood_by_sender[peer] += 1

    # --- trio side --------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _hosting(self) -> AsyncIterator[None]:
        """The host: built with our key, gated, serving `/flnode/share/1` on our
        address; closed properly when the bridge stops."""
        key_pair = create_new_key_pair(self._seed)
        noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            # Said, not left to defaults: their code is not even loaded (trim.py).
            enable_mDNS=False, enable_upnp=False, enable_autotls=False,
        )
        # Our dialer retries with its own backoff; the swarm's internal retries
        # would multiply every attempt (and every refusal count) by four.
        network = self.host.get_network()
        network.retry_config = RetryConfig(max_retries=0)
        # Our own handshake timeout fires first (and is counted); the swarm's covers
        # the muxer negotiation after it.
        network.connection_config.inbound_upgrade_timeout = self.handshake_timeout_s + 5.0
        gate_members(network.upgrader, self.admission, self.names_by_id, self._refuse)
        upgrade_with_whole_frames(network.upgrader)
        self.host.set_stream_handler(SHARE_PROTOCOL, self._intake.on_stream)
        self._intake.start()
        async with self.host.run(listen_addrs=[self.listen]):
            try:
                yield
            finally:
                # Leaving host.run() cancels the swarm but leaves its sockets open
                # until trio.run returns; close() shuts connections down properly.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self.host.close()
                    except Exception as exc:  # noqa: BLE001 - stopping anyway
                        log.debug("%s: host.close(): %s", self.name, describe(exc))

    def _services(self, nursery: trio.Nursery) -> None:
        for name in self.peers:
            nursery.start_soon(self._keep_dialed, name)

    async def _quench(self, peer: str, remote: Any) -> None:
        await quench(self.host.get_network(), self.admission, peer, remote, who=self.name,
                     rate=self._rate.rate)

    async def _keep_dialed(self, name: str) -> None:
        peer_id, addr = self.peers[name]
        backoff = DIAL_BACKOFF_MIN_S
        while True:
            if self.host.get_network().get_connections(peer_id):
                self._unreachable.discard(peer_id)
                self._connect_by.pop(peer_id, None)
                backoff = DIAL_BACKOFF_MIN_S
                await trio.sleep(0.5)
                continue
            try:
                # A failed dial puts the peer in the swarm's 60 s negative
                # cache; our own backoff decides when to try again.
                self.host.get_network().unblock_peer(peer_id)
                with trio.fail_after(10):
                    await self.host.connect(PeerInfo(peer_id, [addr]))
                log.info("%s: connected to %s", self.name, name)
                backoff = DIAL_BACKOFF_MIN_S
            except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - retried with backoff
                log.debug("%s: dial %s failed (%s); retry in %.1f s", self.name, name,
                          describe(exc), backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, DIAL_BACKOFF_MAX_S)

    async def _send_trio(self, peer_id: ID, data: bytes) -> None:
        """Transfers to one member start in the order they were sent (a fair lock over
        the connect wait and the slot): a round's share never overtakes the previous
        round's on its way to a member that is just coming up, which would make the
        member think we had moved on and close that round without our share."""
        order = self._out_order.setdefault(peer_id, trio.Lock())
        slots = self._out_slots.setdefault(peer_id, trio.Semaphore(MAX_OUT_STREAMS_PER_PEER))
        async with order:
            await self._await_connection(peer_id)
            await slots.acquire()
        try:
            await transfer(self.host, peer_id, data)
        finally:
            slots.release()

    async def _await_connection(self, peer_id: ID) -> None:
        network = self.host.get_network()
        if peer_id in self._unreachable and not network.get_connections(peer_id):
            raise SwarmException("not connected, and the last send already waited "
                                 f"{CONNECT_WAIT_S:g} s for it in vain (still dialling)")
        if not network.get_connections(peer_id):
            until = self._connect_by.setdefault(peer_id, trio.current_time() + CONNECT_WAIT_S)
            with trio.move_on_at(until):
                while not network.get_connections(peer_id):
                    await trio.sleep(0.05)
        if not network.get_connections(peer_id):
            self._unreachable.add(peer_id)
            self._connect_by.pop(peer_id, None)
            network.unblock_peer(peer_id)  # dial now, negative cache or not
        else:
            self._unreachable.discard(peer_id)
            self._connect_by.pop(peer_id, None)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """What broadcast raises when sends failed: a bug before a LocalError, a dead
    transport before a refused call (each send raises at most one)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for kind in (lambda e: not isinstance(e, LocalError), lambda e: isinstance(e, TransportFailed)):
        for e in leaves:
            if kind(e):
                return e
    return leaves[0]


__all__ = ["Libp2pTransport", "peer_id_of"]

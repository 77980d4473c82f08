"""libp2p transport: shares over a direct, length-prefixed stream protocol.

Why a thread and not trio-asyncio: py-libp2p is built on trio, flnode on
asyncio. `trio-asyncio` (0.16) installs but wants trio to own the main loop,
which would turn the whole node inside out. Instead the host runs under
`trio.run` in one dedicated thread that this transport owns: asyncio -> trio
calls go through `TrioToken.run_sync_soon` into a nursery, trio -> asyncio
results and incoming messages through `loop.call_soon_threadsafe`. `close()`
stops the trio side and joins the thread. Measured through this bridge
(`scripts/bench_transport.py`, loopback, 2 cores): 50 MB shares at 120-137
MB/s, about 0.6x asyncio TLS on the same run; a one-byte share costs ~4 ms
(new stream, protocol negotiation, acknowledgement, two thread hops).

Whole frames: a trio cancellation inside a write to a Noise-secured connection
(a frame encrypted, its nonce spent, half sent) would corrupt the connection
for every later share; measured, one cancelled transfer made the next send to
that member fail. Each yamux frame write is shielded (`_whole_frames`) and
cancellation takes effect between frames; a frame that cannot be written in
FRAME_WRITE_TIMEOUT_S (30 s) closes the connection instead.

Structured concurrency across the bridge. Every trio task a call starts
(`_run`) is owned by the asyncio task that awaits it: cancelling that asyncio
task cancels the trio task (a transfer in progress is reset, so the receiver
sees a reset, not a short message) and waits until it has really ended before
the cancellation goes on; nothing is left running in the trio thread. The
thread is owned by the transport (`close()` stops and joins it). If the
thread dies on its own (the trio loop crashed, or its services ended), that
is `TransportFailed`, not a quiet log line: `incoming()` raises it with the
cause, and so do `send` and `broadcast`; the node's run ends with it.

Why a stream and not GossipSub: GossipSub silently drops messages over 1 MiB
(a constant, not a parameter), keeps 32-slot queues that overflow silently
and signs every message with the host key (2.3 s on 50 MB). Shares are
signed once by `gossip.envelope`, so they travel over our own protocol
`/flnode/share/1`: one stream per share, an 8-byte big-endian length, then
the bytes. A length over the cap resets the stream before anything is
buffered (counted as `too_large`).

Trust: the host's key is the member's Ed25519 identity, so its peer id is
derived from the public key in the consortium file. Security is Noise only
(py-libp2p's default list also offers plaintext and secio: not here), the
muxer yamux. Identify and ping are served as by any libp2p host. Once Noise
has authenticated a remote peer id, a peer that is not a member is closed
before muxing (counted as `non_member_peer`): py-libp2p 0.8.1's connection
gater filters only IP addresses, so we wrap the upgrader's
`upgrade_security`.

Limits on what any one peer can make us hold (all constructor parameters;
each refusal is counted in `stats.refused` under the name in brackets and
logged once per (peer, reason); for handshakes the "peer" is the remote IP):

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
The member is then quenched: our connections with it are closed and new ones
refused after Noise [`quenched`] for 30 s, doubling each time it floods again,
so a flood costs us one handshake per attempt instead of one stream per message.
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

Memory: a finished transfer is joined into one `bytes` (momentarily twice its
size). py-libp2p 0.8.1's yamux does not enforce its receive window (a peer
that ignores it is logged, and its data buffered anyway), so a member running
a modified yamux can still make us buffer beyond these limits; that is below
this transport and not bounded here.
"""

from __future__ import annotations

# ruff: noqa: E402  (libp2p_trim.leave_out() must run before libp2p's first import)
import asyncio
import contextlib
import ipaddress
import logging
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from gossip.transports.libp2p_trim import leave_out

leave_out()  # before libp2p's first import: no mDNS, UPnP, AutoTLS code in a node

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.config import RetryConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import SecurityUpgradeFailure

from gossip.errors import LocalError, describe
from gossip.membership import Member
from gossip.transports.base import (
    SENDER_QUEUE_ENVELOPES,
    SENDER_QUEUE_MESSAGES,
    FairInbox,
    Incoming,
    RateBudget,
    Transport,
    TransportFailed,
    TransportStats,
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

SHARE_PROTOCOL = TProtocol("/flnode/share/1")
LENGTH_PREFIX = 8
# Writes and reads in 1 MiB pieces: large enough to amortize yamux framing and
# the Noise frame per write, small enough to keep memory flat.
CHUNK = 1024 * 1024
# Incoming messages from one member waiting for the node; past this its transfer
# waits for room before it is acknowledged (module docstring).
INBOX_DEPTH = SENDER_QUEUE_MESSAGES
# A transfer we send may take this long plus one second per MB (loopback does
# 35-70 MB/s; a WAN link between banks far less) before it is abandoned. What we
# receive is bounded by the rate rule instead (module docstring), never by the
# length the sender declares.
BASE_TIMEOUT_S = 30.0
SECONDS_PER_MB = 1.0
# Redial backoff for members that are not up yet (or went away).
DIAL_BACKOFF_MIN_S = 0.2
DIAL_BACKOFF_MAX_S = 5.0
START_TIMEOUT_S = 30.0
# A send to a member that is not connected yet (all nodes starting at once, or
# one restarting) waits this long for the dialer to reach it before the share
# is given up for that member; later sends to it fail at once until a connection
# to it exists again (a member that is down costs one wait, not one per round).
CONNECT_WAIT_S = 10.0
# Inbound limits (module docstring); all can be set per transport.
MAX_PENDING_HANDSHAKES = 16
MAX_HANDSHAKES_PER_IP = 4
HANDSHAKE_TIMEOUT_S = 10.0
MAX_STREAMS_PER_PEER = 4
# Our own transfers to one member at a time: below its MAX_STREAMS_PER_PEER, so an
# honest node's background sends (a share, a seen report, hello replies) never trip
# the limit that stops a greedy member; the rest queue in order (trio's semaphore is
# fair) behind them, each still bounded by its own transfer timeout.
MAX_OUT_STREAMS_PER_PEER = 2
MIN_INFLIGHT_BYTES = 256 * 1024 * 1024
BUDGET_WAIT_S = 20.0
MIN_RATE_BYTES_PER_S = 64 * 1024
# A member over its message rate: no connection with it for this long, doubling each
# time it floods again, up to QUENCH_MAX_S (`_quench`; MQTT does the same).
QUENCH_S = 30.0
QUENCH_MAX_S = 3600.0
RATE_WINDOW_S = 20.0
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
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


UNREACHABLE: tuple[type[BaseException], ...] = (
    BaseLibp2pError, trio.TooSlowError, EOFError, OSError, trio.BrokenResourceError,
    trio.ClosedResourceError)
# How long close() waits for the trio thread to finish (host.close() has 5 s).
JOIN_TIMEOUT_S = 15.0
# How long resetting a stream we abandon may take (a frame on a stuck connection).
RESET_TIMEOUT_S = 5.0
# How long one yamux frame may take to be written (module docstring, "whole frames").
FRAME_WRITE_TIMEOUT_S = 30.0


def _whole_frames(conn: Yamux) -> None:
    """Make every frame write of this yamux connection whole.

    A cancellation that lands inside a frame write (trio's send_all, after Noise has
    encrypted the frame and spent its nonce) leaves the connection in an unknown state:
    the peer fails to authenticate what follows ("Failed authentication of message")
    and every later share to it fails (measured: one cancelled transfer, then "failed
    to open a stream"). So each frame write is shielded and cancellation takes effect
    between frames. A frame that cannot be written within FRAME_WRITE_TIMEOUT_S (the
    peer has stopped reading the whole connection) closes the connection instead of
    hanging. py-libp2p 0.8.1 builds `Yamux` itself (muxer_multistream.new_conn), so
    this wraps the instance's method rather than subclassing."""
    write_frame = conn._write_frame  # noqa: SLF001 - the method being made whole

    async def _write_frame(data: bytes) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FRAME_WRITE_TIMEOUT_S
            await write_frame(data)
        if scope.cancelled_caught:
            with trio.CancelScope(shield=True), trio.move_on_after(RESET_TIMEOUT_S):
                try:
                    await conn.secured_conn.close()
                except Exception:  # noqa: BLE001 - already broken
                    pass
            raise ConnectionClosedError(f"a yamux frame could not be written within "
                                        f"{FRAME_WRITE_TIMEOUT_S:g} s: connection closed")
        await trio.lowlevel.checkpoint()  # where a pending cancellation takes effect

    conn._write_frame = _write_frame  # type: ignore[method-assign]  # noqa: SLF001


def peer_id_of(public_key: bytes) -> ID:
    """The libp2p peer id of an Ed25519 public key (identity multihash)."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


def transfer_timeout(nbytes: int) -> float:
    return BASE_TIMEOUT_S + SECONDS_PER_MB * nbytes / 1e6


class Libp2pTransport(Transport):
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
                 sender_rate: RateBudget | None = None) -> None:
        me = [m for m in members if m.name == name]
        if not me:
            raise LocalError(f"{name!r} is not a member of the consortium")
        self.name = name
        self.listen = self._address(me[0])
        self.max_message_bytes = max_message_bytes
        if max_peer_inflight_bytes is None:
            max_peer_inflight_bytes = max_message_bytes + CHUNK
        if max_inflight_bytes is None:
            max_inflight_bytes = max(2 * max_message_bytes, MIN_INFLIGHT_BYTES)
        if not max_message_bytes <= max_peer_inflight_bytes <= max_inflight_bytes:
            raise LocalError(f"libp2p limits: need max_message_bytes ({max_message_bytes}) <= "
                             f"max_peer_inflight_bytes ({max_peer_inflight_bytes}) <= "
                             f"max_inflight_bytes ({max_inflight_bytes})")
        if min(max_pending_handshakes, max_handshakes_per_ip, max_streams_per_peer,
               min_rate_bytes_per_s, inbox_depth) < 1 or min(handshake_timeout_s, budget_wait_s,
                                                rate_window_s) <= 0:
            raise LocalError("libp2p limits must be positive")
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
        # Inbound state, trio thread only (read elsewhere for tests and logs).
        self.handshakes = 0  # inbound security handshakes in progress
        self._handshakes_by_ip: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()  # member -> inbound transfers in progress
        # Members a send already waited CONNECT_WAIT_S for in vain: until the dialer
        # (or the member) makes a connection, sends to them fail at once instead of
        # waiting again, so a member that is down does not cost every round a wait.
        self._unreachable: set[Any] = set()
        # When the current wait for a connection to a member ends (trio clock): every
        # send to it while one is waiting shares that one wait, not a fresh one each.
        self._connect_by: dict[Any, float] = {}
        self._out_slots: dict[Any, trio.Semaphore] = {}  # peer id -> our transfers to it
        self._out_order: dict[Any, trio.Lock] = {}  # peer id -> transfers start in order
        self.reserved: Counter[str] = Counter()  # member -> declared bytes admitted
        self.reserved_total = 0
        self.buffered = 0  # body bytes received and held by unfinished transfers
        self._budget_freed: trio.Event | None = None
        self.inbox_depth = inbox_depth
        self.max_queue_bytes = SENDER_QUEUE_ENVELOPES * max_message_bytes
        # Trio side: per member, messages and bytes acknowledged and not yet taken by
        # the node, and an event set when the node takes one of them.
        self._queued: Counter[str] = Counter()
        self._queued_bytes: Counter[str] = Counter()
        self._room_freed: dict[str, trio.Event] = {}
        self._rate = sender_rate if sender_rate is not None else RateBudget()  # trio side
        self._quenched_until: dict[str, float] = {}  # member -> trio time (trio side)
        self.quenches: Counter[str] = Counter()
        self.waiting_for_room = 0  # transfers received in full, waiting for an inbox place
        # Bridge calls (_run) whose trio task has started and not yet ended (trio
        # thread writes; read by tests: 0 once every send has returned).
        self.trio_calls = 0
        self.peers = {m.name: (peer_id_of(m.public_key), self._address(m))
                      for m in members if m.name != name}
        self.names_by_id = {pid: n for n, (pid, _) in self.peers.items()}
        self._undeliverable: set[str] = set()  # members whose last send failed (logged once)
        self._seed = seed
        self.stats = TransportStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Asyncio side: per member, what the node has not taken yet (bounded by the
        # trio side's per-member room), handed out round-robin.
        self._fair = FairInbox(self.peers, max_messages=inbox_depth,
                               max_bytes=self.max_queue_bytes)
        self._arrived = asyncio.Event()  # a message was queued, or we stop
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        # Set on the asyncio thread once the trio thread has ended; `_failure` says why
        # if it ended without close().
        self._thread_done: asyncio.Event | None = None
        self._failure: str | None = None
        self._calls: set[asyncio.Future[tuple[bool, Any]]] = set()  # bridge calls in flight
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._closed = False
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
        self._loop = asyncio.get_running_loop()
        self._thread_done = asyncio.Event()
        self._thread = threading.Thread(target=self._thread_main, name=f"libp2p-{self.name}",
                                        daemon=True)
        self._thread.start()
        ok = await asyncio.to_thread(self._ready.wait, START_TIMEOUT_S)
        if self._startup_error is not None:
            raise LocalError(f"libp2p host for {self.name!r} could not listen on "
                             f"{self.listen}: {describe(_root_cause(self._startup_error))}"
                             ) from None
        if not ok:
            raise LocalError(f"libp2p host for {self.name!r} did not start in "
                             f"{START_TIMEOUT_S:.0f} s")
        log.info("%s: libp2p %s listening on %s", self.name, self.peer_id, self.listen)

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise TransportFailed(self._failure)
        if self._closed:
            raise LocalError(f"transport of {self.name!r} is closed")

    async def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """`await fn(*args)` as a task in the host's nursery, from asyncio.

        The trio task is owned by the calling asyncio task: its result or exception
        comes back here; if the caller is cancelled (or times out), the trio task is
        cancelled and this waits until it has ended before the cancellation goes on.
        A host that stops under the call raises `TransportFailed` (the thread died) or
        `ConnectionAbortedError` (close() was called: the transfer did not finish)."""
        self._check_usable()
        assert self._loop is not None and self._token is not None
        loop, token = self._loop, self._token
        done: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        scope = trio.CancelScope()

        def settle(ok: bool, value: Any) -> None:
            self._calls.discard(done)
            if not done.done():
                done.set_result((ok, value))

        async def runner() -> None:
            self.trio_calls += 1
            ok, value = False, _STOPPED
            try:
                with scope:
                    value = await fn(*args)
                    ok = True
                if scope.cancelled_caught:
                    ok, value = False, _CANCELLED
            except Exception as exc:  # noqa: BLE001 - handed to the asyncio caller as is
                value = exc
            finally:
                # trio.Cancelled from outside our scope (the nursery: the host is
                # stopping) leaves value = _STOPPED and propagates.
                self.trio_calls -= 1
                try:  # settle from the run loop, once this task has exited
                    token.run_sync_soon(self._on_loop, settle, ok, value)
                except trio.RunFinishedError:
                    self._on_loop(settle, ok, value)

        def spawn() -> None:  # in the trio thread: must not raise (it would crash trio)
            nursery = self._nursery
            try:
                if nursery is None:  # stopping
                    raise RuntimeError("no nursery")
                nursery.start_soon(runner, name=f"{self.name}-{getattr(fn, '__name__', 'call')}")
            except RuntimeError:  # None, or closed to new arrivals: the host is stopping
                self._on_loop(settle, False, _STOPPED)

        self._calls.add(done)
        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            self._calls.discard(done)
            settle(False, _STOPPED)
        try:
            ok, value = await asyncio.shield(done)
        except asyncio.CancelledError:
            try:
                token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass  # the thread is gone; _on_thread_exit settles `done`
            while not done.done():  # until the trio task has really ended
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    continue
            raise
        if ok:
            return value
        if value is _STOPPED or value is _CANCELLED:
            # Stopped under us: say why once the thread has finished.
            assert self._thread_done is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(JOIN_TIMEOUT_S):
                    await self._thread_done.wait()
            if self._failure is not None:
                raise TransportFailed(self._failure)
            raise ConnectionAbortedError(f"libp2p host of {self.name!r} closed during the call")
        raise value

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
            self._free_slot(peer, len(item.data))
            yield item
            await asyncio.sleep(0)  # a sender whose queue never empties must not hog the loop

    def _free_slot(self, peer: str, n: int) -> None:
        """The node has taken one of `peer`'s messages: room for one more of its own."""
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(self._room_taken, peer, n)
        except trio.RunFinishedError:
            pass

    def _room_taken(self, peer: str, n: int) -> None:
        """Trio side of _free_slot."""
        self._queued[peer] -= 1
        self._queued_bytes[peer] -= n
        event = self._room_freed.pop(peer, None)
        if event is not None:
            event.set()

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
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("%s: libp2p thread did not stop within %.0f s", self.name,
                          JOIN_TIMEOUT_S)
        self._fair.clear()
        self._arrived.set()

    # --- counters, updated on the asyncio thread -----------------------------
    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed between the check and the call
                pass

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

    def _on_thread_exit(self, error: BaseException | None) -> None:
        """On the asyncio thread, once trio.run has returned or raised."""
        assert self._thread_done is not None
        if self._closed:
            if error is not None:
                log.warning("%s: libp2p thread ended with an error while closing: %s",
                            self.name, describe(_root_cause(error)))
        else:
            cause = (f"its trio loop crashed: {describe(_root_cause(error))}" if error is not None
                     else "its trio loop ended on its own (the host's services stopped)")
            self._failure = (f"libp2p transport of {self.name!r} stopped: {cause}; nothing can "
                             "be sent or received any more (restart the node)")
            log.error("%s", self._failure)
            self._arrived.set()
        self._thread_done.set()
        for call in list(self._calls):  # never started: the thread ended first
            if not call.done():
                call.set_result((False, _STOPPED))
        self._calls.clear()

    # --- trio side --------------------------------------------------------------
    def _thread_main(self) -> None:
        error: BaseException | None = None
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # noqa: BLE001 - reported to start() or to the node
            error = exc
        finally:
            if not self._ready.is_set():
                self._startup_error = error or RuntimeError("the trio loop ended before listening")
                self._ready.set()
            else:
                self._on_loop(self._on_thread_exit, error)

    async def _trio_main(self) -> None:
        key_pair = create_new_key_pair(self._seed)
        noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            # Said, not left to defaults: their code is not even loaded (libp2p_trim).
            enable_mDNS=False, enable_upnp=False, enable_autotls=False,
        )
        # Our dialer retries with its own backoff; the swarm's internal retries
        # would multiply every attempt (and every refusal count) by four.
        network = self.host.get_network()
        network.retry_config = RetryConfig(max_retries=0)
        # Our own handshake timeout fires first (and is counted); the swarm's covers
        # the muxer negotiation after it.
        network.connection_config.inbound_upgrade_timeout = self.handshake_timeout_s + 5.0
        self._gate_members()
        upgrader = network.upgrader
        upgrade_connection = upgrader.upgrade_connection

        async def upgrade_with_whole_frames(conn: Any, peer_id: ID) -> Any:
            muxed = await upgrade_connection(conn, peer_id)
            if isinstance(muxed, Yamux):
                _whole_frames(muxed)
            return muxed

        upgrader.upgrade_connection = upgrade_with_whole_frames
        self.host.set_stream_handler(SHARE_PROTOCOL, self._on_stream)
        self._stop = trio.Event()
        self._budget_freed = trio.Event()
        async with self.host.run(listen_addrs=[self.listen]):
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._token = trio.lowlevel.current_trio_token()
                    for name in self.peers:
                        nursery.start_soon(self._keep_dialed, name)
                    self._ready.set()
                    try:
                        await self._stop.wait()
                    finally:  # stopping, or a task in the nursery crashed
                        self._nursery = None
                    nursery.cancel_scope.cancel()
            finally:
                # Leaving host.run() cancels the swarm but leaves its sockets open
                # until trio.run returns; close() shuts connections down properly.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self.host.close()
                    except Exception as exc:  # noqa: BLE001 - stopping anyway
                        log.debug("%s: host.close(): %s", self.name, describe(exc))

    def _gate_members(self) -> None:
        """Bound inbound handshakes, and close connections to peer ids outside the
        consortium right after Noise."""
        upgrader = self.host.get_network().upgrader
        original = upgrader.upgrade_security
        allowed = set(self.names_by_id)

        async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: ID | None = None
                                   ) -> Any:
            ip: str | None = None
            if not is_initiator:
                try:
                    address = raw_conn.get_remote_address()
                except Exception:  # noqa: BLE001 - a socket already gone
                    address = None
                ip = str(address[0]) if address else "unknown"
                # Loopback peers are processes on this host (a rehearsal runs every
                # member on 127.0.0.1): only the global cap applies to them.
                per_ip = self.per_ip_on_loopback or not _is_loopback(ip)
                if self.handshakes >= self.max_pending_handshakes or (
                        per_ip and self._handshakes_by_ip[ip] >= self.max_handshakes_per_ip):
                    self._refuse("handshake_limit", ip,
                                 f"{self.handshakes} inbound handshakes in progress "
                                 f"({self._handshakes_by_ip[ip]} from this address; limits "
                                 f"{self.max_pending_handshakes}, {self.max_handshakes_per_ip})")
                    try:
                        await raw_conn.close()
                    except Exception:  # noqa: BLE001 - already closed
                        pass
                    raise SecurityUpgradeFailure("too many inbound handshakes")
                self.handshakes += 1
                self._handshakes_by_ip[ip] += 1
            try:
                if is_initiator:
                    secure = await original(raw_conn, is_initiator, peer_id)
                else:
                    with trio.fail_after(self.handshake_timeout_s):
                        secure = await original(raw_conn, is_initiator, peer_id)
            except trio.TooSlowError:
                self._refuse("handshake_timeout", ip or "?",
                             f"no Noise handshake within {self.handshake_timeout_s:g} s")
                raise SecurityUpgradeFailure("handshake timed out") from None
            finally:
                if ip is not None:
                    self.handshakes -= 1
                    self._handshakes_by_ip[ip] -= 1
                    if self._handshakes_by_ip[ip] <= 0:
                        del self._handshakes_by_ip[ip]
            remote = secure.get_remote_peer()
            if remote not in allowed:
                await secure.close()
                self._refuse("non_member_peer", str(remote), "not a consortium member")
                raise SecurityUpgradeFailure(f"peer {remote} is not a consortium member")
            name = self.names_by_id[remote]
            if self._quenched_until.get(name, 0.0) > trio.current_time():
                await secure.close()
                self._refuse("quenched", name, "it flooded us: no connection with it until "
                             "its quench ends")
                raise SecurityUpgradeFailure(f"member {name} is quenched (it flooded)")
            return secure

        upgrader.upgrade_security = upgrade_security

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
            await self._transfer(peer_id, data)
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

    async def _transfer(self, peer_id: ID, data: bytes) -> None:
        with trio.fail_after(transfer_timeout(len(data))):
            stream = await self.host.new_stream(peer_id, [SHARE_PROTOCOL])
            try:
                await stream.write(len(data).to_bytes(LENGTH_PREFIX, "big"))
                view = memoryview(data)
                for i in range(0, len(data), CHUNK):
                    await stream.write(bytes(view[i:i + CHUNK]))
                # Wait for the receiver's one-byte acknowledgement: it has every
                # byte, so closing cannot cut the transfer short.
                await _read_exactly(stream, 1)
            except BaseException:
                # Cancelled (from the asyncio side, or at close), timed out, or failed:
                # reset, or the receiver would wait for the rest until its rate rule
                # cuts it. Shielded, and bounded in case the connection is stuck.
                with trio.CancelScope(shield=True), trio.move_on_after(RESET_TIMEOUT_S):
                    await _reset(stream)
                raise
            await stream.close()

    async def _on_stream(self, stream: Any) -> None:
        # An exception escaping a stream handler kills py-libp2p's whole swarm
        # service: everything below is caught.
        remote: Any = None
        peer: str | None = None
        counted = False
        reserved = 0
        try:
            remote = stream.muxed_conn.peer_id
            peer = self.names_by_id.get(remote)
            if peer is None:  # the gate should have closed it already
                self._refuse("non_member_peer", str(remote), "stream from a non-member")
                await _reset(stream)
                return
            if self.streams[peer] >= self.max_streams_per_peer:
                self._refuse("too_many_streams", peer,
                             f"{self.streams[peer]} transfers already in progress (limit "
                             f"{self.max_streams_per_peer}): stream reset")
                await _reset(stream)
                return
            self.streams[peer] += 1
            counted = True
            prefix = b""
            with trio.move_on_after(self.rate_window_s):
                prefix = await _read_exactly(stream, LENGTH_PREFIX)
            if len(prefix) != LENGTH_PREFIX:
                self._refuse("too_slow", peer, f"no length prefix within {self.rate_window_s:g} s")
                await _reset(stream)
                return
            n = int.from_bytes(prefix, "big")
            if not self._rate.take(peer):
                # Over its rate: reset before a byte of the body is read (the member is
                # Noise-authenticated, so this spends its own budget only), and no more
                # connections with it for a while (`_quench`).
                self._on_loop(self._count_flood, peer)
                self._refuse("flood", peer, f"over {self._rate.rate:g} messages/s (burst "
                             f"{self._rate.burst:g}): stream reset before reading")
                await _reset(stream)
                await self._quench(peer, remote)
                return
            if n > self.max_message_bytes:
                self._refuse("too_large", peer, f"announced {n} bytes, over the cap of "
                             f"{self.max_message_bytes}: stream reset before reading")
                await _reset(stream)
                return
            if not await self._reserve(peer, n):
                self._refuse("busy", peer, f"{n} bytes did not fit the in-flight budget "
                             f"(this member {self.reserved[peer]} of "
                             f"{self.max_peer_inflight_bytes}, all {self.reserved_total} of "
                             f"{self.max_inflight_bytes}) within {self.budget_wait_s:g} s")
                await _reset(stream)
                return
            reserved = n
            data = await self._read_body(stream, n)
            if data is None:
                self._refuse("too_slow", peer, f"under {self.min_rate_bytes_per_s} B/s over "
                             f"{self.rate_window_s:g} s (declared {n} bytes)")
                await _reset(stream)
                return
            # Acknowledge only what has a place in this member's queue (back-pressure:
            # never acknowledge and then drop).
            slot = False
            self.waiting_for_room += 1
            try:
                with trio.move_on_after(self.rate_window_s):
                    while (self._queued[peer] >= self.inbox_depth
                           or self._queued_bytes[peer] + n > self.max_queue_bytes):
                        await self._room_freed.setdefault(peer, trio.Event()).wait()
                    slot = True
            finally:
                self.waiting_for_room -= 1
            if not slot:
                self._refuse("inbox_full", peer, f"the node took none of its messages "
                             f"({self._queued[peer]} waiting) within {self.rate_window_s:g} s: "
                             "stream reset, the sender counts it as not delivered")
                await _reset(stream)
                return
            self._queued[peer] += 1
            self._queued_bytes[peer] += n
            try:
                with trio.fail_after(self.rate_window_s):
                    await stream.write(b"\x01")
            except BaseException:
                self._room_taken(peer, n)
                raise
            self._on_loop(self._deliver, data, peer)
        except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - a peer's broken stream
            self._on_loop(self._count_refusal, "stream_error")
            log.debug("%s: stream from %s failed: %s", self.name, peer or remote,
                      self.named(describe(exc)))
            await _reset(stream)
        finally:
            if counted and peer is not None:
                self.streams[peer] -= 1
                if self.streams[peer] <= 0:
                    del self.streams[peer]
            if reserved and peer is not None:
                self._release(peer, reserved)
            try:
                await stream.close()
            except Exception:  # noqa: BLE001 - already closed or reset
                pass

    async def _quench(self, peer: str, remote: Any) -> None:
        """Close our connections with a member over its rate and refuse new ones (after
        Noise, in the gate) for QUENCH_S, doubling each time it floods again: resetting
        each of its streams still costs us a stream setup per message, a closed
        connection costs it a Noise handshake per attempt, bounded by the handshake
        limits. Its shares are lost to us meanwhile, and ours to it; nobody else's."""
        now = trio.current_time()
        if self._quenched_until.get(peer, 0.0) > now:
            return
        seconds = min(QUENCH_MAX_S, QUENCH_S * 2 ** self.quenches[peer])
        self._quenched_until[peer] = now + seconds
        self.quenches[peer] += 1
        log.warning("%s: %s sends more than its share (%g messages/s): connections with it "
                    "closed and refused for %.0f s (counted in flood_by_sender)", self.name,
                    peer, self._rate.rate, seconds)
        try:
            await self.host.get_network().close_peer(remote)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("%s: closing %s: %s", self.name, peer, describe(exc))

    def _fits(self, peer: str, n: int) -> bool:
        return (self.reserved[peer] + n <= self.max_peer_inflight_bytes
                and self.reserved_total + n <= self.max_inflight_bytes)

    async def _reserve(self, peer: str, n: int) -> bool:
        """Reserve n bytes of the in-flight budgets, waiting up to budget_wait_s."""
        if n == 0:
            return True
        with trio.move_on_after(self.budget_wait_s):
            while not self._fits(peer, n):
                assert self._budget_freed is not None
                await self._budget_freed.wait()
            self.reserved[peer] += n
            self.reserved_total += n
            return True
        return False

    def _release(self, peer: str, n: int) -> None:
        self.reserved[peer] -= n
        if self.reserved[peer] <= 0:
            del self.reserved[peer]
        self.reserved_total -= n
        if self._budget_freed is not None:  # wake every waiter; each checks again
            self._budget_freed.set()
            self._budget_freed = trio.Event()

    async def _read_body(self, stream: Any, n: int) -> bytes | None:
        """n bytes, or None if they come slower than the rate rule allows: every
        min_rate x window bytes (or the rest) within rate_window_s of the last mark."""
        quota = max(1, int(self.min_rate_bytes_per_s * self.rate_window_s))
        chunks: list[bytes] = []
        got = mark = 0
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.rate_window_s) as scope:
                while got < n:
                    chunk = await stream.read(min(CHUNK, n - got))
                    if not chunk:
                        raise EOFError(f"stream ended after {got} of {n} bytes")
                    chunks.append(chunk)
                    got += len(chunk)
                    self.buffered += len(chunk)
                    if got - mark >= min(quota, n - mark):
                        mark = got
                        scope.deadline = trio.current_time() + self.rate_window_s
            if scope.cancelled_caught:
                return None
            return b"".join(chunks)
        finally:
            self.buffered -= got


# Outcomes of a bridge call that did not return or raise on its own.
_STOPPED = object()  # the host stopped under it (close(), or the thread died)
_CANCELLED = object()  # cancelled from the asyncio side


def _root_cause(exc: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: what trio.run actually raised."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


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


async def _reset(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # noqa: BLE001 - already broken
        pass


async def _read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(CHUNK, n - len(buf)))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


__all__ = ["Libp2pTransport", "peer_id_of"]

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
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import SecurityUpgradeFailure

from gossip.errors import LocalError, describe
from gossip.membership import Member
from gossip.transports.base import Incoming, Transport, TransportStats

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
# Incoming messages waiting for the node; past this the transport drops (and
# counts) rather than grow without bound if the node stalls.
INBOX_DEPTH = 1024
# A transfer may take this long plus one second per MB (loopback does
# 35-70 MB/s; a WAN link between banks far less) before it is abandoned.
BASE_TIMEOUT_S = 30.0
SECONDS_PER_MB = 1.0
# Redial backoff for members that are not up yet (or went away).
DIAL_BACKOFF_MIN_S = 0.2
DIAL_BACKOFF_MAX_S = 5.0
START_TIMEOUT_S = 30.0
# A send to a member that is not connected yet (all nodes starting at once, or
# one restarting) waits this long for the dialer to reach it before the share
# is given up for that member.
CONNECT_WAIT_S = 10.0


def peer_id_of(public_key: bytes) -> ID:
    """The libp2p peer id of an Ed25519 public key (identity multihash)."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


def transfer_timeout(nbytes: int) -> float:
    return BASE_TIMEOUT_S + SECONDS_PER_MB * nbytes / 1e6


class Libp2pTransport(Transport):
    def __init__(self, seed: bytes, name: str, members: Sequence[Member],
                 max_message_bytes: int) -> None:
        me = [m for m in members if m.name == name]
        if not me:
            raise LocalError(f"{name!r} is not a member of the consortium")
        self.name = name
        self.listen = self._address(me[0])
        self.max_message_bytes = max_message_bytes
        self.peers = {m.name: (peer_id_of(m.public_key), self._address(m))
                      for m in members if m.name != name}
        self.names_by_id = {pid: n for n, (pid, _) in self.peers.items()}
        self._seed = seed
        self.stats = TransportStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[Incoming] = asyncio.Queue(INBOX_DEPTH)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._closed = False
        self._refused_logged: set[ID] = set()
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
        self._thread = threading.Thread(target=self._thread_main, name=f"libp2p-{self.name}",
                                        daemon=True)
        self._thread.start()
        ok = await asyncio.to_thread(self._ready.wait, START_TIMEOUT_S)
        if self._startup_error is not None:
            raise LocalError(f"libp2p host for {self.name!r} could not listen on "
                             f"{self.listen}: {self._startup_error}") from None
        if not ok:
            raise LocalError(f"libp2p host for {self.name!r} did not start in "
                             f"{START_TIMEOUT_S:.0f} s")
        log.info("%s: libp2p %s listening on %s", self.name, self.peer_id, self.listen)

    def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> asyncio.Future[Any]:
        """Run an async trio function in the host's nursery; await its result here."""
        assert self._loop is not None and self._token is not None
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        async def runner() -> None:
            try:
                result = await fn(*args)
            except Exception as exc:  # noqa: BLE001 - handed to the asyncio caller
                loop.call_soon_threadsafe(settle, None, exc)
            except BaseException:
                # trio.Cancelled at shutdown: the asyncio caller must not wait forever.
                loop.call_soon_threadsafe(settle, None,
                                          ConnectionAbortedError("libp2p host shut down"))
                raise
            else:
                loop.call_soon_threadsafe(settle, result)

        def spawn() -> None:
            if self._nursery is None:
                loop.call_soon_threadsafe(settle, None, LocalError("libp2p host is closed"))
                return
            self._nursery.start_soon(runner)

        try:
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            fut.set_exception(LocalError("libp2p host is closed"))
        return fut

    async def broadcast(self, data: bytes) -> None:
        await asyncio.gather(*(self.send(peer, data) for peer in self.peers))

    async def send(self, peer: str, data: bytes) -> None:
        """Best effort: a member that cannot be reached misses this share (counted)."""
        if self._closed:
            raise LocalError(f"transport of {self.name!r} is closed")
        if peer not in self.peers:
            raise LocalError(f"{peer!r} is not a neighbour of {self.name!r}")
        if len(data) > self.max_message_bytes:
            raise LocalError(f"message of {len(data)} bytes exceeds the cap of "
                             f"{self.max_message_bytes} (gossip.max_envelope_bytes)")
        try:
            await self._call(self._send_trio, self.peers[peer][0], data)
        except Exception as exc:  # noqa: BLE001 - any failure means "not delivered"
            self.stats.dropped += 1
            log.warning("%s: could not deliver %d bytes to %s: %s", self.name, len(data), peer,
                        describe(exc))
            return
        self.stats.bytes_sent += len(data)
        self.stats.messages_sent += 1

    async def incoming(self) -> AsyncIterator[Incoming]:
        while True:
            msg = await self._inbox.get()
            if msg.data is None:  # type: ignore[comparison-overlap] - close sentinel
                return
            yield msg

    async def wait_connected(self, peers: Sequence[str], timeout: float) -> None:
        """Until every named peer has a live connection (for benchmarks and tests)."""
        async with asyncio.timeout(timeout):
            while not all(self.connected(p) for p in peers):
                await asyncio.sleep(0.05)

    def connected(self, peer: str) -> bool:
        return bool(self.host and self.host.get_network().get_connections(self.peers[peer][0]))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 15)
        while self._inbox.full():
            self._inbox.get_nowait()
        self._inbox.put_nowait(Incoming(None, None))  # type: ignore[arg-type]

    # --- counters, updated on the asyncio thread -----------------------------
    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _refuse(self, reason: str) -> None:
        self.stats.refused[reason] += 1

    def _deliver(self, data: bytes, peer: str) -> None:
        if self._closed:
            return
        if self._inbox.full():
            self.stats.refused["inbox_full"] += 1
            return
        self.stats.bytes_received += len(data)
        self.stats.messages_received += 1
        self._inbox.put_nowait(Incoming(data, peer))

    # --- trio side --------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._ready.is_set():
                self._startup_error = exc
                self._ready.set()
            else:
                log.error("%s: libp2p thread ended: %s", self.name, describe(exc))

    async def _trio_main(self) -> None:
        key_pair = create_new_key_pair(self._seed)
        noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        )
        # Our dialer retries with its own backoff; the swarm's internal retries
        # would multiply every attempt (and every refusal count) by four.
        self.host.get_network().retry_config = RetryConfig(max_retries=0)
        self._gate_members()
        self.host.set_stream_handler(SHARE_PROTOCOL, self._on_stream)
        self._stop = trio.Event()
        async with self.host.run(listen_addrs=[self.listen]):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                for name in self.peers:
                    nursery.start_soon(self._keep_dialed, name)
                self._ready.set()
                await self._stop.wait()
                self._nursery = None
                nursery.cancel_scope.cancel()
            # Leaving host.run() cancels the swarm but leaves its sockets open
            # until trio.run returns; close() shuts connections down properly.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.host.close()

    def _gate_members(self) -> None:
        """Close connections to peer ids outside the consortium right after Noise."""
        upgrader = self.host.get_network().upgrader
        original = upgrader.upgrade_security
        allowed = set(self.names_by_id)

        async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: ID | None = None
                                   ) -> Any:
            secure = await original(raw_conn, is_initiator, peer_id)
            remote = secure.get_remote_peer()
            if remote not in allowed:
                await secure.close()
                self._on_loop(self._refuse, "non_member_peer")
                if remote not in self._refused_logged:
                    self._refused_logged.add(remote)
                    log.warning("%s: refused libp2p peer %s: not a consortium member (further "
                                "attempts are counted, not logged)", self.name, remote)
                raise SecurityUpgradeFailure(f"peer {remote} is not a consortium member")
            return secure

        upgrader.upgrade_security = upgrade_security

    async def _keep_dialed(self, name: str) -> None:
        peer_id, addr = self.peers[name]
        backoff = DIAL_BACKOFF_MIN_S
        while True:
            if self.host.get_network().get_connections(peer_id):
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
        with trio.move_on_after(CONNECT_WAIT_S):
            while not self.host.get_network().get_connections(peer_id):
                await trio.sleep(0.05)
        if not self.host.get_network().get_connections(peer_id):
            self.host.get_network().unblock_peer(peer_id)  # dial now, negative cache or not
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
                with trio.CancelScope(shield=True):
                    try:
                        await stream.reset()  # the receiver sees no reset otherwise
                    except Exception:  # noqa: BLE001 - already broken
                        pass
                raise
            await stream.close()

    async def _on_stream(self, stream: Any) -> None:
        # An exception escaping a stream handler kills py-libp2p's whole swarm
        # service: everything below is caught.
        remote: Any = None
        peer: str | None = None
        try:
            remote = stream.muxed_conn.peer_id
            peer = self.names_by_id.get(remote)
            if peer is None:  # the gate should have closed it already
                self._on_loop(self._refuse, "non_member_peer")
                await stream.reset()
                return
            with trio.fail_after(BASE_TIMEOUT_S):
                n = int.from_bytes(await _read_exactly(stream, LENGTH_PREFIX), "big")
            if n > self.max_message_bytes:
                self._on_loop(self._refuse, "too_large")
                log.warning("%s: %s announced %d bytes, over the cap of %d: stream reset "
                            "before reading", self.name, peer, n, self.max_message_bytes)
                await stream.reset()
                return
            with trio.fail_after(transfer_timeout(n)):
                data = await _read_exactly(stream, n)
                await stream.write(b"\x01")
            self._on_loop(self._deliver, data, peer)
        except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - a peer's broken stream
            self._on_loop(self._refuse, "stream_error")
            log.debug("%s: stream from %s failed: %s", self.name, peer or remote, describe(exc))
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001 - already broken
                pass
        finally:
            try:
                await stream.close()
            except Exception:  # noqa: BLE001 - already closed or reset
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

"""`/flnode/share/1`: one stream per message, whole-frame writes, and what a receiver
reads (trio side).

Framing: an 8-byte big-endian length, then the bytes, then the receiver's one-byte
acknowledgement once it holds every byte and has a place for the message in its
sender's queue for the node. A length over the cap resets the stream before
anything is buffered (counted as `too_large`). What the receiver admits, and how
long it waits, is decided in `admission.py` (its docstring lists the limits).

Whole frames: a trio cancellation inside a write to a Noise-secured connection
(a frame encrypted, its nonce spent, half sent) would corrupt the connection
for every later share; measured, one cancelled transfer made the next send to
that member fail. Each yamux frame write is shielded (`whole_frames`) and
cancellation takes effect between frames; a frame that cannot be written in
FRAME_WRITE_TIMEOUT_S (30 s) closes the connection instead.

Memory: a finished transfer is joined into one `bytes` (momentarily twice its
size). py-libp2p 0.8.1's yamux does not enforce its receive window (a peer
that ignores it is logged, and its data buffered anyway), so a member running
a modified yamux can still make us buffer beyond these limits; that is below
this transport and not bounded here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from gossip.errors import describe
from gossip.transports.base import RateBudget
from gossip.transports.libp2p.admission import Admission

log = logging.getLogger("flnode.libp2p")

SHARE_PROTOCOL = TProtocol("/flnode/share/1")
LENGTH_PREFIX = 8
# Writes and reads in 1 MiB pieces: large enough to amortize yamux framing and
# the Noise frame per write, small enough to keep memory flat.
CHUNK = 1024 * 1024
# A transfer we send may take this long plus one second per MB (loopback does
# 35-70 MB/s; a WAN link between banks far less) before it is abandoned. What we
# receive is bounded by the rate rule instead (admission.py), never by the
# length the sender declares.
BASE_TIMEOUT_S = 30.0
SECONDS_PER_MB = 1.0
# How long resetting a stream we abandon may take (a frame on a stuck connection).
RESET_TIMEOUT_S = 5.0
# How long one yamux frame may take to be written (module docstring, "whole frames").
FRAME_WRITE_TIMEOUT_S = 30.0


def transfer_timeout(nbytes: int) -> float:
    return BASE_TIMEOUT_S + SECONDS_PER_MB * nbytes / 1e6


def whole_frames(conn: Yamux) -> None:
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


def upgrade_with_whole_frames(upgrader: Any) -> None:
    """Every yamux connection the upgrader makes writes whole frames (`whole_frames`)."""
    upgrade_connection = upgrader.upgrade_connection

    async def upgrade(conn: Any, peer_id: ID) -> Any:
        muxed = await upgrade_connection(conn, peer_id)
        if isinstance(muxed, Yamux):
            whole_frames(muxed)
        return muxed

    upgrader.upgrade_connection = upgrade


async def transfer(host: Any, peer_id: ID, data: bytes) -> None:
    """Send one message on a new stream and wait for the receiver's acknowledgement."""
    with trio.fail_after(transfer_timeout(len(data))):
        stream = await host.new_stream(peer_id, [SHARE_PROTOCOL])
        try:
            await stream.write(len(data).to_bytes(LENGTH_PREFIX, "big"))
            view = memoryview(data)
            for i in range(0, len(data), CHUNK):
                await stream.write(bytes(view[i:i + CHUNK]))
            # Wait for the receiver's one-byte acknowledgement: it has every
            # byte, so closing cannot cut the transfer short.
            await read_exactly(stream, 1)
        except BaseException:
            # Cancelled (from the asyncio side, or at close), timed out, or failed:
            # reset, or the receiver would wait for the rest until its rate rule
            # cuts it. Shielded, and bounded in case the connection is stuck.
            with trio.CancelScope(shield=True), trio.move_on_after(RESET_TIMEOUT_S):
                await reset(stream)
            raise
        await stream.close()


class Intake:
    """The receiving side of `/flnode/share/1` (trio thread): each inbound stream is
    admitted (`Admission`), read, and acknowledged once its message has a place in
    its member's queue; then `deliver` hands it to the asyncio side.

    The callbacks are the transport's: `refuse(reason, peer, detail)` counts and logs a
    refusal, `count(reason)` only counts one, `flooded(peer)` counts a message over the
    member's rate, `deliver(data, peer)` queues it for the node (each safe to call from
    the trio thread), `quench(peer, remote)` stops listening to a flooding member, and
    `named(text)` puts member names in place of peer ids."""

    def __init__(self, name: str, admission: Admission, names_by_id: dict[Any, str],
                 rate: RateBudget, *, refuse: Callable[[str, str, str], None],
                 count: Callable[[str], None], flooded: Callable[[str], None],
                 deliver: Callable[[bytes, str], None],
                 quench: Callable[[str, Any], Awaitable[None]],
                 named: Callable[[str], str]) -> None:
        self.name = name
        self.admission = admission
        self.names_by_id = names_by_id
        self.rate = rate
        self._refuse, self._count, self._flooded = refuse, count, flooded
        self._deliver, self._quench, self._named = deliver, quench, named
        # Created in the trio thread (`start`): set (and replaced) when in-flight budget,
        # or room in the queues for the node, frees. One event for all members: room
        # in the total (`max_queued_bytes`) is freed by whoever's message the node takes.
        self._budget_freed: trio.Event | None = None
        self._room_freed: trio.Event | None = None

    def start(self) -> None:
        """In the trio thread, before the first stream."""
        self._budget_freed = trio.Event()
        self._room_freed = trio.Event()

    async def on_stream(self, stream: Any) -> None:
        # An exception escaping a stream handler kills py-libp2p's whole swarm
        # service: everything below is caught.
        a = self.admission
        remote: Any = None
        peer: str | None = None
        counted = False
        reserved = 0
        try:
            remote = stream.muxed_conn.peer_id
            peer = self.names_by_id.get(remote)
            if peer is None:  # the gate should have closed it already
                self._refuse("non_member_peer", str(remote), "stream from a non-member")
                await reset(stream)
                return
            if a.stream_over_limit(peer):
                self._refuse("too_many_streams", peer,
                             f"{a.streams[peer]} transfers already in progress (limit "
                             f"{a.max_streams_per_peer}): stream reset")
                await reset(stream)
                return
            a.stream_opened(peer)
            counted = True
            prefix = b""
            with trio.move_on_after(a.rate_window_s):
                prefix = await read_exactly(stream, LENGTH_PREFIX)
            if len(prefix) != LENGTH_PREFIX:
                self._refuse("too_slow", peer, f"no length prefix within {a.rate_window_s:g} s")
                await reset(stream)
                return
            n = int.from_bytes(prefix, "big")
            if not self.rate.take(peer):
                # Over its rate: reset before a byte of the body is read (the member is
                # Noise-authenticated, so this spends its own budget only), and no more
                # connections with it for a while (`gate.quench`).
                self._flooded(peer)
                self._refuse("flood", peer, f"over {self.rate.rate:g} messages/s (burst "
                             f"{self.rate.burst:g}): stream reset before reading")
                await reset(stream)
                await self._quench(peer, remote)
                return
            if n > a.max_message_bytes:
                self._refuse("too_large", peer, f"announced {n} bytes, over the cap of "
                             f"{a.max_message_bytes}: stream reset before reading")
                await reset(stream)
                return
            if not await self._reserve(peer, n):
                self._refuse("busy", peer, f"{n} bytes did not fit the in-flight budget "
                             f"(this member {a.reserved[peer]} of "
                             f"{a.max_peer_inflight_bytes}, all {a.reserved_total} of "
                             f"{a.max_inflight_bytes}) within {a.budget_wait_s:g} s")
                await reset(stream)
                return
            reserved = n
            data = await self._read_body(stream, n)
            if data is None:
                self._refuse("too_slow", peer, f"under {a.min_rate_bytes_per_s} B/s over "
                             f"{a.rate_window_s:g} s (declared {n} bytes)")
                await reset(stream)
                return
            # Acknowledge only what has a place in this member's queue (back-pressure:
            # never acknowledge and then drop).
            slot = False
            a.waiting_for_room += 1
            try:
                with trio.move_on_after(a.rate_window_s):
                    while not a.has_room(peer, n):
                        assert self._room_freed is not None
                        await self._room_freed.wait()
                    slot = True
            finally:
                a.waiting_for_room -= 1
            if not slot:
                self._refuse("inbox_full", peer, f"no room for its {n} bytes in the queues "
                             f"for the node within {a.rate_window_s:g} s ({a.queued[peer]} of "
                             f"its messages, {a.queued_bytes[peer]} bytes waiting; all members "
                             f"{a.queued_total} of {a.max_queued_bytes}): stream reset, the "
                             "sender counts it as not delivered")
                await reset(stream)
                return
            a.queue(peer, n)
            try:
                with trio.fail_after(a.rate_window_s):
                    await stream.write(b"\x01")
            except BaseException:
                self.room_taken(peer, n)
                raise
            self._deliver(data, peer)
        except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - a peer's broken stream
            self._count("stream_error")
            log.debug("%s: stream from %s failed: %s", self.name, peer or remote,
                      self._named(describe(exc)))
            await reset(stream)
        finally:
            if counted and peer is not None:
                a.stream_closed(peer)
            if reserved and peer is not None:
                self._release(peer, reserved)
            try:
                await stream.close()
            except Exception:  # noqa: BLE001 - already closed or reset
                pass

    def room_taken(self, peer: str, n: int) -> None:
        """The node has taken one of `peer`'s messages (or it was never acknowledged):
        room for one more of its own; wakes a transfer waiting for it."""
        self.admission.room_taken(peer, n)
        if self._room_freed is not None:  # wake every waiter; each checks again
            self._room_freed.set()
            self._room_freed = trio.Event()

    async def _reserve(self, peer: str, n: int) -> bool:
        """Reserve n bytes of the in-flight budgets, waiting up to budget_wait_s."""
        if n == 0:
            return True
        a = self.admission
        with trio.move_on_after(a.budget_wait_s):
            while not a.fits(peer, n):
                assert self._budget_freed is not None
                await self._budget_freed.wait()
            a.reserve(peer, n)
            return True
        return False

    def _release(self, peer: str, n: int) -> None:
        self.admission.release(peer, n)
        if self._budget_freed is not None:  # wake every waiter; each checks again
            self._budget_freed.set()
            self._budget_freed = trio.Event()

    async def _read_body(self, stream: Any, n: int) -> bytes | None:
        """n bytes, or None if they come slower than the rate rule allows: every
        min_rate x window bytes (or the rest) within rate_window_s of the last mark."""
        a = self.admission
        quota = max(1, int(a.min_rate_bytes_per_s * a.rate_window_s))
        chunks: list[bytes] = []
        got = mark = 0
        try:
            with trio.CancelScope(deadline=trio.current_time() + a.rate_window_s) as scope:
                while got < n:
                    chunk = await stream.read(min(CHUNK, n - got))
                    if not chunk:
                        raise EOFError(f"stream ended after {got} of {n} bytes")
                    chunks.append(chunk)
                    got += len(chunk)
                    a.buffered += len(chunk)
                    if got - mark >= min(quota, n - mark):
                        mark = got
                        scope.deadline = trio.current_time() + a.rate_window_s
            if scope.cancelled_caught:
                return None
            return b"".join(chunks)
        finally:
            a.buffered -= got


async def reset(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # noqa: BLE001 - already broken
        pass


async def read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(CHUNK, n - len(buf)))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)

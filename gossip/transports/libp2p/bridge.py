"""The trio thread a libp2p transport owns, and the two hops across it.

Why a thread and not trio-asyncio: py-libp2p is built on trio, flnode on
asyncio. `trio-asyncio` (0.16) installs but wants trio to own the main loop,
which would turn the whole node inside out. Instead the host runs under
`trio.run` in one dedicated thread that the transport owns: asyncio -> trio
calls go through `TrioToken.run_sync_soon` into a nursery (`_run`, `_to_trio`),
trio -> asyncio results and incoming messages through
`loop.call_soon_threadsafe` (`_on_loop`). `close()` stops the trio side and
joins the thread. Measured through this bridge (`scripts/bench_transport.py`,
loopback, 2 cores): 50 MB shares at 120-137 MB/s, about 0.6x asyncio TLS on the
same run; a one-byte share costs ~4 ms (new stream, protocol negotiation,
acknowledgement, two thread hops).

Structured concurrency across the bridge. Every trio task a call starts
(`_run`) is owned by the asyncio task that awaits it: cancelling that asyncio
task cancels the trio task (a transfer in progress is reset, so the receiver
sees a reset, not a short message) and waits until it has really ended before
the cancellation goes on; nothing is left running in the trio thread. The
thread is owned by the transport (`close()` stops and joins it). If the
thread dies on its own (the trio loop crashed, or its services ended), that
is `TransportFailed`, not a quiet log line: `incoming()` raises it with the
cause, and so do `send` and `broadcast`; the node's run ends with it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gossip.errors import LocalError, describe
from gossip.transports.base import TransportFailed

log = logging.getLogger("flnode.libp2p")

START_TIMEOUT_S = 30.0
# How long close() waits for the trio thread to finish (host.close() has 5 s).
JOIN_TIMEOUT_S = 15.0

# Outcomes of a bridge call that did not return or raise on its own.
_STOPPED = object()  # the host stopped under it (close(), or the thread died)
_CANCELLED = object()  # cancelled from the asyncio side


class TrioBridge(abc.ABC):
    """A trio loop in a thread of its own, driven from asyncio. The subclass says what
    runs in it: `_hosting()` (set up, serve while the body runs, tear down) and
    `_services(nursery)` (background tasks, started once the nursery is open);
    `_wake()` is called on the asyncio thread when the thread has died on its own."""

    name: str

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
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
        # Bridge calls (_run) whose trio task has started and not yet ended (trio
        # thread writes; read by tests: 0 once every send has returned).
        self.trio_calls = 0

    @abc.abstractmethod
    def _hosting(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Trio side: what the thread serves while it runs."""

    @abc.abstractmethod
    def _services(self, nursery: trio.Nursery) -> None:
        """Trio side: start the background tasks in the bridge's nursery."""

    @abc.abstractmethod
    def _wake(self) -> None:
        """Asyncio side: the thread died on its own; wake whoever waits for messages."""

    # --- asyncio side ----------------------------------------------------------
    async def _start_thread(self) -> bool:
        """Start the trio thread and wait until it serves; False if it did not within
        START_TIMEOUT_S. A failure to start is left in `_startup_error`."""
        self._loop = asyncio.get_running_loop()
        self._thread_done = asyncio.Event()
        self._thread = threading.Thread(target=self._thread_main, name=f"libp2p-{self.name}",
                                        daemon=True)
        self._thread.start()
        return await asyncio.to_thread(self._ready.wait, START_TIMEOUT_S)

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

    def _to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """`fn(*args)` soon in the trio thread, if it still runs (fire and forget)."""
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    async def _stop_thread(self) -> None:
        """Stop the trio loop and join its thread (every trio task ends with it)."""
        if self._stop is not None:
            self._to_trio(self._stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("%s: libp2p thread did not stop within %.0f s", self.name,
                          JOIN_TIMEOUT_S)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """`fn(*args)` soon on the asyncio thread (from the trio thread)."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _on_thread_exit(self, error: BaseException | None) -> None:
        """On the asyncio thread, once trio.run has returned or raised."""
        assert self._thread_done is not None
        if self._closed:
            if error is not None:
                log.warning("%s: libp2p thread ended with an error while closing: %s",
                            self.name, describe(root_cause(error)))
        else:
            cause = (f"its trio loop crashed: {describe(root_cause(error))}" if error is not None
                     else "its trio loop ended on its own (the host's services stopped)")
            self._failure = (f"libp2p transport of {self.name!r} stopped: {cause}; nothing can "
                             "be sent or received any more (restart the node)")
            log.error("%s", self._failure)
            self._wake()
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
        self._stop = trio.Event()
        async with self._hosting(), trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._services(nursery)
            self._ready.set()
            try:
                await self._stop.wait()
            finally:  # stopping, or a task in the nursery crashed
                self._nursery = None
            nursery.cancel_scope.cancel()


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: what trio.run actually raised."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc

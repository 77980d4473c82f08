"""A virtual-time asyncio loop for in-process simulations: no wall-clock deadline.

In one process, N members share two cores: a member whose share is late only because
the other N - 1 were being served first would be "absent" at a wall-clock deadline,
and which shares a round closes with would depend on the host's load. On this loop:

- `loop.time()` is a virtual clock. It stands still while anything is ready to run
  and, when nothing is, jumps to the next timer (asyncio.sleep, asyncio.timeout,
  call_later: every deadline of the node and the round machine is on loop.time()).
  So a deadline passes only when every member is waiting for it.
- `run_in_executor` (asyncio.to_thread: local training) runs the function inline, in
  the loop's thread, and returns a finished future: no thread finishes at a moment of
  the OS's choosing. With the ready queue served in FIFO order, a seeded run is the
  same run every time.

Only for transports without file descriptors (the MemoryHub): a real socket would
never be read while the clock jumps. Used by scripts/bench_scale.py (`--clock virtual`).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The real selector for the loop's own self-pipe; a timeout is never waited out:
    the virtual clock jumps by it instead."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            # Nothing ready, no timer: only another thread could wake us (none here).
            return super().select(None)
        self.clock += max(timeout, 0.0)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.clock

    def run_in_executor(self, executor: Any, func: Callable[..., Any],
                        *args: Any) -> asyncio.Future[Any]:
        fut = self.create_future()
        try:
            fut.set_result(func(*args))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            fut.set_exception(exc)
        return fut


def run(coro: Any) -> Any:
    """asyncio.run(coro) on a VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)

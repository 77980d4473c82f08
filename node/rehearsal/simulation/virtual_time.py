"""A virtual-time asyncio loop for simulations: no wall-clock deadline inside a process.

In one process, N members share two cores: a member whose share is late only because
the other N - 1 were being served first would be "absent" at a wall-clock deadline,
and which shares a round closes with would depend on the host's load. On this loop
(`flnode simulate`, in process and under --backend ray; scripts/bench_scale.py):

- `loop.time()` is a virtual clock. It stands still while anything is ready to run or
  any work handed to the executor is still out, and only when nothing is does it jump
  to the next timer (asyncio.sleep, asyncio.timeout, call_later: every deadline of the
  node and the round machine is on loop.time(): round deadlines, hello and liveness,
  the start barrier, rehearsed delays). So a deadline passes only when every member is
  waiting for it and no message or training is under way.
- Work handed to the executor (`asyncio.to_thread`: local training, a secure round's
  steps) takes WORK_S virtual seconds, however long it really takes: its result is handed
  to the awaiting task by a timer at submit time + WORK_S, so a member is late only by
  what the scenario says (a straggler: node/rehearsal/faults.py), never by the host's load.
  Without an executor set the work runs inline in the loop's thread when submitted;
  with one (--backend ray's RayTraining) it runs there and the clock waits for it, so
  the two give the same order of events and the same run.
- Ties (timers due at the same virtual time) go in the order they were set, and the
  ready queue is FIFO: a seeded run is the same run every time.

Only for transports without file descriptors (the MemoryHub): a real socket would
never be read while the clock jumps. `flnode run` keeps asyncio's own loop (the wall clock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import selectors
from collections.abc import Callable
from typing import Any

# Virtual seconds one piece of executor work (a member's local training) takes: far
# under the default round deadline (120 s), so an honest member always makes its
# round; a straggler's factor F makes it (F - 1) * WORK_S later (SlowReleaser).
WORK_S = 1.0


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The real selector for the loop's own self-pipe; a timeout is never waited out:
    the virtual clock jumps by it instead, unless executor work is out (`busy`): then
    the wait is real, until a worker's call_soon_threadsafe wakes the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0
        self.busy = 0  # executor jobs submitted and not finished

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None or self.busy:
            # Nothing ready: only another thread can wake us (an executor job finishing).
            return super().select(None)
        self.clock += timeout
        return []


class _OrderedTimer(asyncio.TimerHandle):
    """A timer ordered by (due time, order set): asyncio's compare the due time only, and
    its heap pops timers due at the same time in an order that depends on its history."""

    __slots__ = ("_order",)

    def __init__(self, order: int, *args: Any) -> None:
        super().__init__(*args)
        self._order = order

    def __lt__(self, other: Any) -> bool:
        if isinstance(other, _OrderedTimer) and self._when == other._when:
            return self._order < other._order
        return super().__lt__(other)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        self._order = itertools.count()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.clock

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: Any = None) -> asyncio.TimerHandle:
        """asyncio's call_at (Python 3.11-3.13) with an _OrderedTimer."""
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()
        timer = _OrderedTimer(next(self._order), when, callback, args, self, context)
        heapq.heappush(self._scheduled, timer)
        timer._scheduled = True
        return timer

    def run_in_executor(self, executor: Any, func: Callable[..., Any],
                        *args: Any) -> asyncio.Future[Any]:
        fut = self.create_future()
        due = self.time() + WORK_S
        executor = executor if executor is not None else self._default_executor
        if executor is None:  # inline, now; handed over at `due`
            job: concurrent.futures.Future = concurrent.futures.Future()
            try:
                job.set_result(func(*args))
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                job.set_exception(exc)
        else:
            job = executor.submit(func, *args)  # may raise (a pool shut down): not out then
            self._jumping.busy += 1
            job.add_done_callback(lambda _: self.call_soon_threadsafe(self._finished))
        self.call_at(due, _hand_over, job, fut)
        return fut

    def _finished(self) -> None:
        self._jumping.busy -= 1


def _hand_over(job: concurrent.futures.Future, fut: asyncio.Future[Any]) -> None:
    """At its due time: the job's outcome to the awaiting task. The job is done: the clock
    cannot reach `due` (> submit time) while it is out."""
    if fut.cancelled():
        return
    if job.cancelled():  # a pool shut down with cancel_futures: the task sees it cancelled
        fut.cancel()
        return
    exc = job.exception()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(job.result())


def run(coro: Any) -> Any:
    """asyncio.run(coro) on a VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)

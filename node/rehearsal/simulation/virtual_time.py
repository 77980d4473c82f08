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
- A job that never returns (a deadlocked Ray actor) would stop the clock for every member:
  while one is out, the loop logs every WATCH_LOG_S real seconds which member's job it
  waits for, and after JOB_LIMIT_S real seconds fails the run with JobHungError naming it.
- Ties (timers due at the same virtual time) go in the order they were set, and the
  ready queue is FIFO: a seeded run is the same run every time.

Only for transports without file descriptors (the MemoryHub): a real socket would
never be read while the clock jumps. `flnode run` keeps asyncio's own loop (the wall clock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import heapq
import itertools
import logging
import selectors
import time
from collections.abc import Callable
from typing import Any

from gossip.errors import LocalError

log = logging.getLogger("flnode.node")

# Virtual seconds one piece of executor work (a member's local training) takes: far
# under the default round deadline (120 s), so an honest member always makes its
# round; a straggler's factor F makes it (F - 1) * WORK_S later (SlowReleaser).
WORK_S = 1.0
# Real seconds between "still waiting for <member>'s job" log lines while a job is out and
# nothing else can move: a person watching a stalled `flnode simulate` sees why.
WATCH_LOG_S = 30.0
# Real seconds one executor job may be out before the run fails (JobHungError): a member's
# local training takes seconds at the sizes simulated here, even queued behind 10,000
# members on one Ray actor takes minutes; an hour is only reached by a job that will never
# return (a deadlocked actor), which would otherwise freeze every member's clock forever.
JOB_LIMIT_S = 3600.0
# How many of the jobs out (the oldest) a "waits for" line names (300 members train at once).
_NAMED = 5


class JobHungError(LocalError):
    """An executor job (a member's training) was out longer than the limit: the virtual
    clock cannot move without it, so the run stops instead of hanging."""


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The real selector for the loop's own self-pipe; a timeout is never waited out:
    the virtual clock jumps by it instead, unless executor work is out (`busy`): then
    the wait is real, until a worker's call_soon_threadsafe wakes the loop (watched: a
    job out longer than `limit_s` real seconds raises JobHungError)."""

    def __init__(self, log_every_s: float = WATCH_LOG_S, limit_s: float = JOB_LIMIT_S) -> None:
        super().__init__()
        self.clock = 0.0
        # executor jobs submitted and not finished: job -> (who submitted it, real start)
        self.out: dict[concurrent.futures.Future, tuple[str, float]] = {}
        self.log_every_s, self.limit_s = log_every_s, limit_s
        self.gave_up = False  # a job was given up as hung: the run is failing

    @property
    def busy(self) -> int:
        return len(self.out)

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if self.out:
            return self._wait_for_jobs()
        if timeout is None:
            # Nothing ready, no timer: only another thread can wake us.
            return super().select(None)
        self.clock += timeout
        return []

    def _wait_for_jobs(self) -> list[Any]:
        """Wait (really) until a job finishes; say every log_every_s whose job it is, and
        raise JobHungError once the oldest has been out limit_s."""
        while True:
            now = time.monotonic()
            since = min(t for _, t in self.out.values())
            if now - since >= self.limit_s:
                hung = sorted({w for w, t in self.out.values() if now - t >= self.limit_s})
                # Given up: the clock may move again (the loop's close cancels the tasks)
                self.gave_up = True
                self.out = {j: w for j, w in self.out.items() if now - w[1] < self.limit_s}
                raise JobHungError(
                    f"simulate: {', '.join(hung)}: its executor job (local training) has not "
                    f"returned after {self.limit_s:g} real seconds (virtual_time.JOB_LIMIT_S): "
                    "the simulated clock cannot move without it, so the run stops (under "
                    "--backend ray: is that member's actor deadlocked or its node gone? "
                    "`ray status`, `ray list actors`)")
            ready = super().select(min(self.log_every_s, since + self.limit_s - now))
            if ready or not self.out:
                return ready
            waited = time.monotonic() - min(t for _, t in self.out.values())
            if waited >= self.log_every_s:
                oldest = sorted(self.out.values(), key=lambda w: w[1])
                jobs = [f"{w} (out {time.monotonic() - t:.1f} s)" for w, t in oldest[:_NAMED]]
                more = f" and {len(oldest) - _NAMED} more" if len(oldest) > _NAMED else ""
                log.warning("simulate: the virtual clock waits for %d executor job(s) out: "
                            "%s%s; the run fails after %g s", len(oldest), ", ".join(jobs),
                            more, self.limit_s)


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
    def __init__(self, log_every_s: float = WATCH_LOG_S, limit_s: float = JOB_LIMIT_S) -> None:
        self._jumping = _JumpingSelector(log_every_s, limit_s)
        self._order = itertools.count()
        self._executor: Any = None
        super().__init__(self._jumping)

    def set_default_executor(self, executor: Any) -> None:
        super().set_default_executor(executor)
        self._executor = executor

    async def shutdown_default_executor(self, *args: Any) -> None:
        """asyncio's, unless a job was given up as hung: its join would wait for that job
        forever, so the executor is shut down without waiting (RayTraining kills its actors)."""
        if self._jumping.gave_up and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        await super().shutdown_default_executor(*args)

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
            task = asyncio.current_task(self)
            who = task.get_name() if task is not None else "a job outside any task"
            self._jumping.out[job] = (f"{who}: {_named(func)}", time.monotonic())
            job.add_done_callback(self._done)
        self.call_at(due, _hand_over, job, fut)
        return fut

    def _done(self, job: concurrent.futures.Future) -> None:  # in the worker's thread
        try:
            self.call_soon_threadsafe(self._jumping.out.pop, job, None)
        except RuntimeError:  # the loop closed: the run failed on this hung job; nobody waits
            pass


def _named(func: Any) -> str:
    """The function a job runs (asyncio.to_thread hands partial(context.run, f, ...))."""
    while isinstance(func, functools.partial):
        func = func.args[0] if func.func.__name__ == "run" and func.args else func.func
    return getattr(func, "__qualname__", type(func).__name__)


def _hand_over(job: concurrent.futures.Future, fut: asyncio.Future[Any]) -> None:
    """At its due time: the job's outcome to the awaiting task. The job is done: the clock
    cannot reach `due` (> submit time) while it is out."""
    if fut.cancelled():
        return
    if not job.done():  # given up as hung (JobHungError): the run is failing
        fut.set_exception(JobHungError("an executor job given up as hung"))
        return
    if job.cancelled():  # a pool shut down with cancel_futures: the task sees it cancelled
        fut.cancel()
        return
    exc = job.exception()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(job.result())


def run(coro: Any, log_every_s: float = WATCH_LOG_S, limit_s: float = JOB_LIMIT_S) -> Any:
    """asyncio.run(coro) on a VirtualTimeLoop (JobHungError if an executor job is out more
    than limit_s real seconds)."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(log_every_s, limit_s)) as runner:
        return runner.run(coro)

"""node/rehearsal/simulation/virtual_time.py: deadlines on a virtual clock that jumps only
when every task waits, work handed to a thread run inline; a seeded in-process run on it
is the same run twice."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from node.rehearsal.simulation import virtual_time


def test_the_clock_jumps_to_the_next_timer_and_stands_still_while_work_is_ready():
    async def main():
        loop = asyncio.get_running_loop()
        t0, wall = loop.time(), time.monotonic()
        order = []

        async def sleeper(name, s):
            await asyncio.sleep(s)
            order.append((name, loop.time() - t0))

        async def busy():
            x = 0
            for _ in range(200_000):  # real work: the virtual clock does not move
                x += 1
            order.append(("busy", loop.time() - t0))

        await asyncio.gather(sleeper("late", 3600.0), sleeper("early", 600.0), busy())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(120.0):
                await asyncio.Event().wait()
        # work handed to a thread runs inline at once and is handed back WORK_S later
        got = await asyncio.to_thread(lambda: ("inline", loop.time() - t0))
        return order, got, loop.time() - t0, time.monotonic() - wall

    order, got, virtual, wall = virtual_time.run(main())
    assert order == [("busy", 0.0), ("early", 600.0), ("late", 3600.0)]
    assert got == ("inline", 3720.0) and virtual == 3720.0 + virtual_time.WORK_S
    assert wall < 30  # an hour and two minutes of deadlines, not waited out


def test_an_exception_in_the_inline_executor_reaches_the_awaiting_task():
    def boom():
        raise ValueError("no")

    async def main():
        with pytest.raises(ValueError, match="no"):
            await asyncio.to_thread(boom)
        return True

    assert virtual_time.run(main())


@pytest.mark.slow
def test_a_seeded_sparse_run_on_virtual_time_is_the_same_run_twice(tmp_path):
    """Six members on a ring in process (random-out draws from the consortium id, which holds
    the fresh keys of each run): the members' final models are bit for bit
    those of the same seeded run again (no wall-clock deadline, no thread decides)."""
    import torch

    from node.learn.models import get_flat
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.run import run_consortium
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)

    def run(sub):
        spec = SimulationSpec(dataset="default", nodes=6, partition="dirichlet:0.5", rounds=3,
                              seed=3, out=tmp_path / sub, model="logreg", privacy="off",
                              topology="ring")
        nodes = virtual_time.run(run_consortium(spec, prepare(spec)))
        return {n.name: get_flat(n.model).numpy().copy() for n in nodes}

    a, b = run("a"), run("b")
    assert set(a) == set(b) and all(np.array_equal(a[m], b[m]) for m in a)
    assert len({a[m].tobytes() for m in a}) > 1  # sparse: the members' models differ


def test_an_executor_refusing_a_job_leaves_the_clock_free_to_jump():
    """An executor whose submit raises (shut down; --backend ray's actor gone) must not
    count a job as out: the clock would wait forever for a job that never started, and the
    run would hang at the next timer instead of ending."""
    import concurrent.futures
    import threading

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pool.shutdown()

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(pool)
        with pytest.raises(RuntimeError, match="shutdown"):
            await asyncio.to_thread(lambda: 1)
        await asyncio.sleep(600.0)  # hangs if the refused job is still counted as out
        return loop.time()

    got: list = []
    runner = threading.Thread(target=lambda: got.append(virtual_time.run(main())), daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert not runner.is_alive(), "the virtual clock hung on a job the executor refused"
    assert got == [600.0]


def test_a_job_that_never_returns_fails_the_run_naming_the_member(caplog):
    """Review s4 F3: one executor job that never returns (a deadlocked Ray actor) stood the
    virtual clock still for every member, silently and forever. The loop now says whose job
    it waits for and, past the limit, fails the run with an error naming the member."""
    import concurrent.futures
    import logging
    import threading

    ev = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def member():
        async with asyncio.timeout(120):  # a virtual deadline: cannot pass while the job is out
            await asyncio.to_thread(ev.wait)

    async def main():
        asyncio.get_running_loop().set_default_executor(pool)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(member(), name="node-bank3")

    got: list = []

    def go():
        try:
            virtual_time.run(main(), log_every_s=0.05, limit_s=1.0)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            got.append(exc)

    caplog.set_level(logging.WARNING, logger="flnode.node")
    runner = threading.Thread(target=go, daemon=True)
    started = time.monotonic()
    runner.start()
    try:
        runner.join(timeout=30)
        assert not runner.is_alive(), "the virtual clock hung on a job that never returns"
    finally:
        ev.set()  # let the worker thread go (the interpreter joins it at exit)
        pool.shutdown(wait=True)
    assert time.monotonic() - started >= 1.0
    assert len(got) == 1 and isinstance(got[0], virtual_time.JobHungError), got
    assert "node-bank3" in str(got[0]) and "1 real seconds" in str(got[0])
    waits = [r.getMessage() for r in caplog.records if "waits for" in r.getMessage()]
    assert waits and "node-bank3: Event.wait" in waits[0], waits  # the member and the job


def test_a_job_that_returns_in_time_is_not_given_up():
    """The watchdog fires on the job's real time out, not the virtual clock's: jobs that
    come back (one after another, each under the limit) never fail the run."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def main():
        asyncio.get_running_loop().set_default_executor(pool)
        for _ in range(3):
            await asyncio.to_thread(time.sleep, 0.3)
        return asyncio.get_running_loop().time()

    assert virtual_time.run(main(), log_every_s=0.05, limit_s=0.9) == 3 * virtual_time.WORK_S

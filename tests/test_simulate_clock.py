"""`flnode simulate` on a virtual clock (node/rehearsal/simulation/virtual_time.py): no
wall-clock deadline inside the process, so a seeded run with a dropout and a straggler
is the same run on a loaded machine, and a member whose training really outlasts the
round deadline is waited for (its training takes WORK_S simulated seconds)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import torch

from node.cli import main
from node.rehearsal.simulation import virtual_time

# A seeded scenario: site-4 never starts (a dropout), site-1 trains 200 times slower
# (199 * WORK_S = 199 simulated seconds late, past the 120 s round deadline: left out of
# the others' rounds at their deadline, at the same simulated time on any machine).
SCENARIO = ["simulate", "--dataset", "digits", "--nodes", "5", "--rounds", "3", "--model",
            "logreg", "--seed", "3", "--privacy", "off", "--absent", "site-4",
            "--straggler", "site-1:200"]
# Round-record fields that are wall times (each member's training seconds).
WALL_TIME_FIELDS = ("seconds",)
BUSY_LOOPS = 2


def _spin(counter) -> None:
    while True:
        with counter.get_lock():
            counter.value += 1


@pytest.fixture
def busy_machine():
    """Two processes spinning on the CPU beside the test (this machine has two cores),
    running before the fixture returns; killed in teardown."""
    ctx = multiprocessing.get_context("fork")  # a bare loop: nothing to import
    counters = [ctx.Value("q", 0) for _ in range(BUSY_LOOPS)]
    procs = [ctx.Process(target=_spin, args=(c,), daemon=True) for c in counters]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 60
        while not all(c.value > 1000 for c in counters):  # each loop is spinning
            assert time.monotonic() < deadline, "the busy loops did not start"
            time.sleep(0.01)
        yield counters
    finally:
        for p in procs:
            p.kill()
            p.join(10)


def _records(run: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted((run / "state").glob("*/metrics.jsonl")):
        out[f.parent.name] = [{k: v for k, v in json.loads(x).items()
                               if k not in WALL_TIME_FIELDS}
                              for x in f.read_text().splitlines()]
    return out


@pytest.mark.slow  # two simulate runs of 3 rounds (~6 s each idle; more beside the loops)
def test_a_seeded_run_with_a_dropout_and_a_straggler_is_the_same_beside_busy_loops(
        tmp_path, request):
    torch.set_num_threads(1)
    assert main([*SCENARIO, "--out", str(tmp_path / "idle")]) == 0
    counters = request.getfixturevalue("busy_machine")
    before = [c.value for c in counters]
    assert main([*SCENARIO, "--out", str(tmp_path / "busy")]) == 0
    assert all(c.value > b for c, b in zip(counters, before, strict=True))  # they ran beside it
    idle = (tmp_path / "idle" / "summary.json").read_bytes()
    assert idle == (tmp_path / "busy" / "summary.json").read_bytes()  # bit for bit, bytes too
    records = _records(tmp_path / "idle")
    assert records == _records(tmp_path / "busy")
    # The scenario did what it says: site-4 never ran; site-1 is late for the others'
    # round 1 at its deadline, in both runs alike.
    assert sorted(records) == ["site-0", "site-1", "site-2", "site-3"]
    first = records["site-0"][0]
    assert first["closed"] == "deadline" and first["missing"] == ["site-1", "site-4"]
    assert "site-1" not in first["aggregation"]["used"]
    assert json.loads(idle)["faults"]["stragglers"] == {"site-1": 200.0}


def test_a_member_whose_training_really_outlasts_the_deadline_is_waited_for(
        tmp_path, monkeypatch):
    """site-1's first training sleeps 3 real seconds, past a 2 s round deadline. On the
    wall clock (asyncio.run) the others close round 1 at their deadline without it
    (checked by hand: "deadline", missing site-1); on the virtual clock its training
    takes WORK_S simulated seconds like anyone's: every round closes on "all"."""
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.run import MEMBER, simulate_members
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime import release

    torch.set_num_threads(1)
    slept = []
    real_train = release.train_local

    def slow_train(*args, **kwargs):
        if MEMBER.get(None) == "site-1" and not slept:
            slept.append(time.monotonic())
            time.sleep(3.0)  # real time: longer than the round deadline
        return real_train(*args, **kwargs)

    monkeypatch.setattr(release, "train_local", slow_train)
    spec = SimulationSpec(dataset="digits", nodes=3, partition="iid", rounds=2, seed=3,
                          out=tmp_path, model="logreg", privacy="off", round_deadline_s=2.0)
    assert virtual_time.WORK_S < spec.round_deadline_s < 3.0
    nodes = simulate_members(spec, prepare(spec))
    assert slept  # the slow training ran
    for node in nodes:
        lines = [json.loads(x) for x in
                 (node.state.path / "metrics.jsonl").read_text().splitlines()]
        assert [x["closed"] for x in lines] == ["all", "all"], node.name
        assert all(x["aggregation"]["used"] == ["site-0", "site-1", "site-2"] for x in lines)


def test_executor_work_holds_the_clock_until_it_ends_and_lands_work_s_later():
    """The --backend ray path: work on another thread (here a real pool) that takes real
    time; a timer due sooner than WORK_S does not fire while it is out, and the result
    reaches the task at submit time + WORK_S, as inline work's does."""
    release_job = threading.Event()
    seen = []

    def job():
        assert release_job.wait(30)
        return "done"

    async def main_():
        loop = asyncio.get_running_loop()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        loop.set_default_executor(pool)

        async def early():
            await asyncio.sleep(virtual_time.WORK_S / 10)
            seen.append(("timer", loop.time(), release_job.is_set()))

        async def let_go():  # the loop keeps running tasks while the job is out
            for _ in range(50):
                await asyncio.sleep(0)
            seen.append(("ran meanwhile", loop.time(), False))
            threading.Timer(0.2, release_job.set).start()

        t0 = loop.time()
        task, other = asyncio.create_task(early()), asyncio.create_task(let_go())
        got = await asyncio.to_thread(job)
        seen.append((got, loop.time() - t0, True))
        await task
        await other
        pool.shutdown()

    virtual_time.run(main_())
    assert seen == [("ran meanwhile", 0.0, False), ("timer", virtual_time.WORK_S / 10, True),
                    ("done", virtual_time.WORK_S, True)]


def test_timers_due_at_the_same_time_fire_in_the_order_they_were_set():
    """asyncio's heap orders timers by due time only: equal ones came out in an order
    that depends on the heap's history (which a Ray job's wake-ups change)."""
    async def main_():
        loop = asyncio.get_running_loop()
        fired = []
        handles = [loop.call_at(5.0 + (i % 3 == 0), fired.append, i) for i in range(60)]
        for h in handles[::7]:
            h.cancel()
        await asyncio.sleep(10)
        return fired, {i for i in range(60) if i % 7 == 0}

    fired, cancelled = virtual_time.run(main_())
    at5 = [i for i in range(60) if i % 3 and i not in cancelled]
    at6 = [i for i in range(60) if i % 3 == 0 and i not in cancelled]
    assert fired == at5 + at6


def test_a_failed_or_cancelled_executor_job_reaches_the_awaiting_task():
    """A job that fails on its worker (an actor lost) raises in the member's task; one
    cancelled by its executor cancels it: neither leaves the task waiting for ever."""
    class Fails(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            f = concurrent.futures.Future()
            f.set_exception(RuntimeError("actor lost"))
            return f

    class Cancels(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            f = concurrent.futures.Future()
            f.cancel()
            return f

    async def main_():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(Fails())
        with pytest.raises(RuntimeError, match="actor lost"):
            await asyncio.to_thread(print)
        loop.set_default_executor(Cancels())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.to_thread(print)
        return loop.time()

    assert virtual_time.run(main_()) == 2 * virtual_time.WORK_S

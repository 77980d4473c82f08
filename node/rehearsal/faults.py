"""Rehearsed faults (`[faults]`, node/rehearsal/config.py FaultsConfig), as wrappers around
an honest node's parts (node/rehearsal/build.py): what the member receives is dropped,
delayed or cut off (`faulty_transport`: gossip/testing/faults.py FaultyTransport), and
its local training is slower (`SlowReleaser`: a straggler).

Never imported by the runtime (node/runtime/node.py, node/runtime/daemon.py).
"""

from __future__ import annotations

import asyncio
import logging

from gossip.membership import Consortium
from gossip.testing.faults import FaultyTransport, fault_plan
from gossip.transports.base import Transport
from node.rehearsal.attacks import WrappedReleaser
from node.rehearsal.config import FaultsConfig
from node.runtime.release import Releaser, Result, Trained

log = logging.getLogger("flnode.node")


def faulty_transport(transport: Transport, name: str, consortium: Consortium,
                     faults: FaultsConfig) -> Transport:
    """`transport`, dropping and delaying what member `name` receives as `faults` says
    (itself if they drop and delay nothing)."""
    plan = fault_plan(faults.loss, faults.delay_ms, faults.jitter_ms, faults.partition,
                      faults.seed)
    if not plan.active:
        return transport
    return FaultyTransport(transport, name, plan, {m.public_key: m.name for m in consortium.members})


class SlowReleaser(WrappedReleaser):
    """A straggler: after each round's local training, waits (straggle - 1) times as long
    as the training took, so it trains `straggle` times slower (the rest is unchanged).
    Both on the loop's clock: in `flnode simulate` a virtual one, where a training takes
    a fixed time (node/rehearsal/simulation/virtual_time.py WORK_S), so the straggler is
    late by the same amount on a loaded machine as on an idle one."""

    def __init__(self, inner: Releaser | WrappedReleaser, straggle: float) -> None:
        super().__init__(inner)
        self.straggle = straggle

    async def train(self, r: int) -> Trained | Result:
        loop = asyncio.get_running_loop()
        start = loop.time()
        trained = await self.inner.train(r)
        if isinstance(trained, Trained):
            await asyncio.sleep((self.straggle - 1) * (loop.time() - start))
        return trained

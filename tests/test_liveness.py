"""A member is waited for only while its shares arrive (issue 19, item 4): talk without a
share (hellos, prekeys, seen reports) does not keep it "heard from" round after round."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from gossip import bodies, envelope
from gossip.envelope import HELLO_ASK, HELLO_REPLY, KIND_HELLO, KIND_SEEN, KIND_SHARE
from gossip.transports.base import Incoming
from gossip.transports.memory import MemoryHub
from node.privacy.mechanisms import SeededNoise
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.config import load_config
from node.runtime.identity import load_identity
from node.runtime.node import Node
from node.runtime.state import read_jsonl


def make(tmp_path, rounds=3, deadline=10.0):
    spec = SimulationSpec(dataset="default", nodes=4, partition="iid", rounds=rounds, seed=0,
                          out=tmp_path, privacy="off", seal="off", round_deadline_s=deadline)
    return prepare(spec)


def node_of(prep, i, hub):
    return Node.from_config(load_config(prep.config_paths[i]),
                            hub.attach(prep.names[i], prep.names), SeededNoise(i))


def test_talk_without_shares_rearms_the_wait_once_a_share_every_time(tmp_path):
    prep = make(tmp_path)
    node = node_of(prep, 0, MemoryHub())
    talker = prep.names[3]
    key = load_identity(tmp_path / "keys" / f"{talker}.key").signing_key
    seq = itertools.count()

    def signed(kind, body, r=0):
        return Incoming(envelope.pack(key, prep.consortium.id, kind, r, next(seq), body), talker)

    node.liveness.note_absent(node.book.waiting_for(0))  # its share did not come by round 1's deadline
    assert talker in node.liveness.absent
    node.handle(signed(KIND_HELLO, HELLO_REPLY))  # it (re)started: waited for once more
    assert talker not in node.liveness.absent
    node.liveness.note_absent(node.book.waiting_for(0))  # ... and no share came by that deadline either
    assert talker in node.liveness.absent
    for _ in range(5):  # a hello every round: on 819e161 each one re-armed the wait
        node.handle(signed(KIND_HELLO, HELLO_REPLY))
        ignorable = node.liveness.ignorable(node.book.neighbours)
        assert talker in node.liveness.absent and talker in ignorable | {talker}
    body = bodies.encode_share(
        [(s.name, np.zeros(s.shape, "<f4")) for s in node.verifier.spec], 10.0)
    assert node.handle(signed(KIND_SHARE, body)) is not None  # a share: waited for again
    assert talker not in node.liveness.absent
    node.liveness.note_absent(node.book.waiting_for(1))
    node.handle(signed(KIND_HELLO, HELLO_REPLY, r=1))  # and talk re-arms once again
    assert talker not in node.liveness.absent


@pytest.mark.slow
async def test_a_member_that_says_hello_every_round_but_never_shares_costs_few_deadlines(
        tmp_path):
    """Three members run; the fourth only says hello (signed) each time the others close a
    round. On
    819e161 every round waited out its deadline for it; now at most two do (the first
    deadline, and one more after its first hello), the rest close as soon as the three
    shares are in."""
    rounds, deadline = 5, 8.0
    prep = make(tmp_path, rounds=rounds, deadline=deadline)
    hub = MemoryHub()
    nodes = [node_of(prep, i, hub) for i in range(3)]
    talker = prep.names[3]
    key = load_identity(tmp_path / "keys" / f"{talker}.key").signing_key
    transport = hub.attach(talker, prep.names)
    hellos: list[int] = []

    async def talk() -> None:
        await transport.start()
        async for msg in transport.incoming():
            env = envelope.decode_outer(msg.data)
            # The first seen report of a round: the others have closed it and are training
            # the next. A hello now ("I am at the round you closed") reaches them before
            # they collect the next round's shares.
            if env.kind == KIND_SEEN and env.round not in hellos:
                hellos.append(env.round)
                await transport.broadcast(envelope.pack(key, prep.consortium.id, KIND_HELLO,
                                                        env.round, len(hellos), HELLO_ASK))

    talking = asyncio.create_task(talk())
    try:
        async with asyncio.TaskGroup() as tg:
            for n in nodes:
                tg.create_task(n.run())
    finally:
        talking.cancel()
    assert len(hellos) >= rounds - 1
    for n in nodes:
        lines = read_jsonl(n.state.path / "metrics.jsonl")
        closed = [x["closed"] for x in lines]
        assert len(closed) == rounds and closed.count("deadline") <= 2, (n.name, closed)
        assert closed[-2:] == ["absent", "absent"], (n.name, closed)
        assert all(x["missing"] == [talker] for x in lines)
        assert n.counters.accepted[talker] >= rounds - 1  # its hellos were accepted

"""The machine's liveness decisions against today's Node (node/runtime/node.py at 7782560) for
the same inputs, differentially: a real Node (memory transport, a prepared 4-member
consortium) and gossip/protocol's Liveness are fed the same sequence of missed deadlines,
shares and talk; who is absent, missed, talked-to, up and ignorable must agree after
every step. Once Node is wired to the machine (issue 21, the next step) both sides are
the same code and this module goes; the unit tests (test_protocol_*) stay."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.protocol import Liveness
from gossip.transports.memory import MemoryHub
from node.privacy.mechanisms import SeededNoise
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.config import load_config
from node.runtime.node import Node


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    out = tmp_path_factory.mktemp("vs-runner")
    prep = prepare(SimulationSpec(dataset="default", nodes=4, partition="iid", rounds=3, seed=0,
                                  out=out, privacy="off", seal="off", round_deadline_s=10.0))
    cfg = load_config(prep.config_paths[0])
    return Node.from_config(cfg, MemoryHub().attach(prep.names[0], prep.names), SeededNoise(0))


STEP = st.one_of(
    st.tuples(st.just("miss"), st.sets(st.integers(1, 3))),
    st.tuples(st.just("heard"), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("retire"), st.integers(1, 3)),
)


@pytest.mark.slow  # building a Node (prepare, torch) is most of its ~20 s
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(STEP, max_size=30), st.integers(1, 3))
def test_liveness_decides_as_node_does(node, steps, absent_after):
    """runner.py 751-769 (`_heard`), 1603-1612 (`_ignorable`), 1614-1625 (`_note_absent`)."""
    others = sorted(node.book.neighbours | {m.name for m in node.consortium.members}
                    - {node.name})
    g = node.cfg.gossip.model_copy(update={"absent_after": absent_after})
    node.cfg = node.cfg.model_copy(update={"gossip": g})
    node._absent, node._missed, node._talked, node._up = set(), type(node._missed)(), set(), set()
    node.book.neighbours = frozenset(others)
    live = Liveness(absent_after)
    for step in steps:
        if step[0] == "miss":  # a deadline passed without these members' shares
            waiting = [others[i - 1] for i in sorted(step[1])]
            node.book.waiting_for = lambda r, w=waiting: w  # the book's answer, fixed
            node._note_absent(0)
            live.note_absent(waiting)
        elif step[0] == "heard":
            member = others[step[1] - 1]
            node._heard(member, shared=step[2])
            live.heard(member, shared=step[2])
        else:
            node.book.neighbours = node.book.neighbours - {others[step[1] - 1]}
        assert (live.absent, dict(live.missed), live.talked, live.up) == \
            (node._absent, dict(node._missed), node._talked, node._up)
        assert live.ignorable(node.book.neighbours) == node._ignorable()
    node.__dict__["book"].__dict__.pop("waiting_for", None)

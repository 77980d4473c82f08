"""The round loop on the memory hub: hostile traffic, missing members, restarts."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import torch
from nacl.signing import SigningKey

from gossip import bodies, envelope
from gossip.transports.memory import MemoryHub
from node.learn.models import get_flat
from node.privacy.mechanisms import SeededNoise
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.config import load_config
from node.runtime.identity import load_identity
from node.runtime.node import Node
from node.runtime.release import Release


def make(tmp_path, nodes=3, rounds=3, privacy="update", deadline=30.0):
    spec = SimulationSpec(dataset="default", nodes=nodes, partition="iid", rounds=rounds, seed=0,
                          out=tmp_path, privacy=privacy, clip=0.1, sigma=1.0,
                          round_deadline_s=deadline)
    return spec, prepare(spec)


def build(prep, hub, which=None, rounds=None):
    nodes = []
    for i, (name, path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        if which is not None and i not in which:
            continue
        cfg = load_config(path)
        if rounds is not None:
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
                update={"rounds": rounds})})
        nodes.append(Node.from_config(cfg, hub.attach(name, prep.names), SeededNoise(i)))
    return nodes


async def run_all(nodes):
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(n.run()) for n in nodes]
    return [t.result() for t in tasks]


async def test_all_members_end_each_round_with_the_same_model_from_released_shares(tmp_path):
    _, prep = make(tmp_path)
    nodes = build(prep, MemoryHub())
    reports = await run_all(nodes)
    assert all(len(r) == 3 for r in reports)
    # Every node averaged the same released (noised) shares, its own included,
    # so all hold the same model. Had one used its un-noised local model, they
    # would differ.
    first = get_flat(nodes[0].model)
    for n in nodes[1:]:
        assert torch.equal(get_flat(n.model), first)
    for n in nodes:
        assert len(n.ledger.records) == 3 and n.epsilon() > 0
        assert sum(n.counters.rejected.values()) == 0


async def test_nodes_finish_despite_hostile_traffic_and_count_every_reason(tmp_path):
    _, prep = make(tmp_path)
    hub = MemoryHub()
    nodes = build(prep, hub)
    mallory = hub.attach("mallory", prep.names)
    outsider = SigningKey.generate()
    stolen = load_identity(tmp_path / "keys" / f"{prep.names[1]}.key").signing_key
    w = [(name, np.full(a.shape, np.nan, "<f4")) for name, a in
         [(s.name, np.zeros(s.shape)) for s in nodes[0].verifier.spec]]
    good_body = bodies.encode_share(
        [(s.name, np.zeros(s.shape, "<f4")) for s in nodes[0].verifier.spec], 10.0)
    attacks = [
        b"",
        os.urandom(5000),
        envelope.pack(outsider, prep.consortium.id, "share", 0, 0, good_body),
        envelope.pack(stolen, prep.consortium.id, "share", 0, 10**6,
                      bodies.encode_share(w, 10.0)),
        envelope.pack(outsider, prep.consortium.id, "share", 0, 1, good_body)[:-7],
    ]

    for _ in range(3):  # queued before the nodes start, so every copy is read
        for data in attacks:
            await mallory.broadcast(data)
    reports = await run_all(nodes)
    assert all(len(r) == 3 for r in reports)
    for n in nodes:
        assert n.counters.rejected["non_member"] >= 3
        assert n.counters.rejected["malformed"] >= 6
        if n.name != prep.names[1]:
            assert n.counters.rejected["non_finite"] >= 1
        outcomes = {json.loads(line)["outcome"]
                    for line in (n.state.path / "audit.jsonl").read_text().splitlines()}
        assert {"accepted", "non_member", "malformed"} <= outcomes


async def test_members_go_on_without_a_silent_member_after_the_deadline(tmp_path):
    # A deadline a loaded machine cannot miss: the silent member costs one of it (it is
    # not waited for again), the present ones always make it.
    _, prep = make(tmp_path, deadline=10.0)
    hub = MemoryHub()
    nodes = build(prep, hub, which={0, 1})
    reports = await run_all(nodes)
    for rep in reports:
        assert [r.missing for r in rep] == [[prep.names[2]]] * 3
        assert len(rep) == 3


async def test_restart_resumes_at_the_checkpointed_round_without_reusing_seqs(tmp_path):
    _, prep = make(tmp_path, nodes=2)
    await run_all(build(prep, MemoryHub(), rounds=2))
    nodes = build(prep, MemoryHub(), rounds=4)
    assert [n.book.current for n in nodes] == [2, 2]
    reports = await run_all(nodes)
    assert [[r.round for r in rep] for rep in reports] == [[2, 3], [2, 3]]
    for n in nodes:
        assert [r.round for r in n.ledger.records] == [0, 1, 2, 3]
        assert sum(n.counters.rejected.values()) == 0  # no seq_reuse, no replay
        assert n.state.load_checkpoint().next_round == 4


async def test_a_release_stored_before_a_crash_is_resent_not_redrawn(tmp_path):
    _, prep = make(tmp_path, nodes=2)
    node = build(prep, MemoryHub(), which={0})[0]
    first = await node.releaser.release(0)  # crash right after this
    assert isinstance(first, Release) and not first.resent and len(node.ledger.records) == 1
    again = build(prep, MemoryHub(), which={0})[0]
    second = await again.releaser.release(0)
    assert isinstance(second, Release) and second.resent and second.data == first.data
    assert torch.equal(second.own.vector, first.own.vector) and second.norm is None
    assert len(again.ledger.records) == 1  # no second charge, no second noise draw
    assert again.signer.seq == 1

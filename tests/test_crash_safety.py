"""Crash safety: the ledger, the plan, sequence numbers, durable writes, local input.

Each test reproduces a fault a careful read or a real run found (issue 10) and
fails on the code before its fix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

from gossip import bodies, envelope
from gossip.errors import LocalError
from gossip.transports.memory import MemoryHub
from node.data.encode import encode
from node.data.schema import FeatureSchema
from node.learn.models import get_flat
from node.privacy.accountant import LedgerRecord
from node.privacy.ledger import Ledger, weight_digest
from node.privacy.mechanisms import SeededNoise
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime import state as state_mod
from node.runtime.config import load_config, validate_config
from node.runtime.identity import load_identity
from node.runtime.node import Node
from node.runtime.state import StateDir, atomic_write, read_jsonl
from tests.helpers import SCHEMA
from tests.test_runner import build, make, run_all


def record(r: int, sigma: float = 1.0) -> LedgerRecord:
    return LedgerRecord(round=r, mode="update", noise_multiplier=sigma, sample_rate=1.0, steps=1,
                        clip_norm=1.0, share_digest=f"{r:064x}")


def tear(path, r: int, keep: int = 25) -> None:
    """A crash mid-append: the first `keep` bytes of round r's line, no newline."""
    with open(path, "ab") as f:
        f.write(json.dumps(record(r).__dict__, sort_keys=True).encode()[:keep])


# --- the ledger ------------------------------------------------------------------
def test_a_torn_last_line_is_cut_off_on_load_and_the_next_charge_survives_a_restart(tmp_path):
    path = tmp_path / "ledger.jsonl"
    first = Ledger(path, repair=True)
    first.charge(record(0))
    first.charge(record(1))
    tear(path, 2)
    again = Ledger(path, repair=True)
    assert [r.round for r in again.records] == [0, 1]
    assert again.recovered and "torn last line" in again.recovered[0]
    assert path.read_bytes().endswith(b"\n")  # the fragment is gone from the file
    again.charge(record(2))  # the real charge of the round that was torn
    third = Ledger(path, repair=True)  # one restart later: the node must start
    assert [r.round for r in third.records] == [0, 1, 2]
    assert not third.recovered


def test_a_ledger_already_bricked_by_a_glued_line_is_recovered_and_counts_the_charge(tmp_path):
    """What the old code left: a fragment with the next record appended onto it. The
    record after the fragment is a real charge: kept and counted."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.charge(record(0))
    tear(path, 1, keep=40)
    with open(path, "ab") as f:  # the old append, onto the fragment
        f.write(json.dumps(record(1).__dict__, sort_keys=True).encode() + b"\n")
    with open(path, "ab") as f:
        f.write(json.dumps(record(2).__dict__, sort_keys=True).encode() + b"\n")
    before = path.read_bytes()
    reader = Ledger(path)  # `flnode status` and scripts never write
    assert [r.round for r in reader.records] == [0, 1, 2]
    assert path.read_bytes() == before
    node_side = Ledger(path, repair=True)
    assert [r.round for r in node_side.records] == [0, 1, 2]
    assert any("torn record" in w for w in node_side.recovered)
    assert (tmp_path / "ledger.jsonl.damaged").read_bytes() == before
    assert len(path.read_bytes().splitlines()) == 3
    assert Ledger(path, repair=True).epsilon(1e-5) == Ledger(path).epsilon(1e-5) > 0


def test_a_corrupt_line_that_is_not_a_torn_record_still_refuses(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    for r in range(3):
        ledger.charge(record(r))
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"{garbage" + lines[1][3:]  # damaged inside, no whole record in it
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LocalError, match="line 2 is corrupt"):
        Ledger(path, repair=True)


def test_charging_a_new_ledger_fsyncs_its_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "new" / "ledger.jsonl"
    Ledger(path, repair=True).charge(record(0))
    assert str(path) in synced and str(path.parent) in synced and str(tmp_path) in synced
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- durable writes --------------------------------------------------------------
def test_atomic_write_loops_over_short_writes(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    payload = os.urandom(1000)
    atomic_write(tmp_path / "f", payload)
    monkeypatch.setattr(os, "write", real)
    assert (tmp_path / "f").read_bytes() == payload


def test_jsonl_files_are_0600_and_the_audit_log_rotates_with_readers_following(tmp_path):
    sd = StateDir(tmp_path / "s", rotate_bytes=2000, rotate_keep=2)
    for i in range(200):
        sd.append_jsonl("audit.jsonl", {"i": i, "pad": "x" * 40})
    files = state_mod.jsonl_files(sd.path / "audit.jsonl")
    assert [f.name for f in files] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    assert all(f.stat().st_size <= 2000 for f in files)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    got = [r["i"] for r in read_jsonl(sd.path / "audit.jsonl")]
    assert got == list(range(200 - len(got), 200)) and 100 > len(got) > 40  # newest, in order
    sd.append_jsonl("metrics.jsonl", {"round": 0})
    assert stat.S_IMODE((sd.path / "metrics.jsonl").stat().st_mode) == 0o600


# --- the node: plan, sequence numbers, outbox ------------------------------------
def _with(cfg, section: str, **update):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=update)})


def test_the_plan_pins_what_a_round_costs(tmp_path):
    """Raising training.epochs after a first start would make each round dearer than
    the plan the budget was checked against."""
    _, prep = make(tmp_path, privacy="record")
    cfg = load_config(prep.config_paths[0])
    cfg = _with(cfg, "privacy", sigma=None, epsilon=3.0)
    Node.from_config(cfg, MemoryHub().attach(prep.names[0], prep.names))
    fewer = tmp_path / "fewer.parquet"  # another data file: the sample rate changes
    pd.read_parquet(cfg.data.path).iloc[::2].to_parquet(fewer)
    for section, key, value, label in (("training", "epochs", 3, "training.epochs"),
                                       ("training", "batch_size", 8, "training.batch_size"),
                                       ("data", "path", fewer, "row count")):
        changed = _with(cfg, section, **{key: value})
        with pytest.raises(LocalError, match=label):
            Node.from_config(changed, MemoryHub().attach(prep.names[0], prep.names))
    Node.from_config(_with(cfg, "training", rounds=50),  # more rounds: the budget stops it
                     MemoryHub().attach(prep.names[0], prep.names))


async def test_a_round_dearer_than_the_plan_is_discarded_before_release(tmp_path):
    """Defence in depth: the charge record mode actually makes is checked against the
    budget before anything is charged or sent. Here the pre-training estimate is made
    to lie (a planning bug); the round's share must never leave, nor be carried on."""
    _, prep = make(tmp_path, nodes=2, rounds=3, privacy="record")
    nodes = []
    for i, path in enumerate(prep.config_paths):
        cfg = _with(load_config(path), "privacy", sigma=None, epsilon=1.0)
        nodes.append(Node.from_config(cfg, MemoryHub().attach(prep.names[i], prep.names)))
    hub = MemoryHub()
    nodes = [Node.from_config(n.cfg, hub.attach(n.name, prep.names)) for n in nodes]
    victim = nodes[0]
    cheap = victim.budget.next_release(0)[0]
    victim.budget.next_release = lambda r: [LedgerRecord(r, "record", cheap.noise_multiplier,
                                                         cheap.sample_rate, 0, cheap.clip_norm, "")]
    charged = len(victim.ledger.records)
    eps0 = victim.ledger.epsilon(1e-5)
    # Spend almost the whole budget so one real round no longer fits.
    while victim.budget.would_exceed(victim.budget.plan and [LedgerRecord(
            0, "record", cheap.noise_multiplier, cheap.sample_rate, cheap.steps, cheap.clip_norm,
            "")]) is None:
        victim.ledger.charge(LedgerRecord(-2, "record", cheap.noise_multiplier,
                                          cheap.sample_rate, cheap.steps, cheap.clip_norm, "x"))
    spent = len(victim.ledger.records)
    assert spent > charged and victim.ledger.epsilon(1e-5) > eps0
    before = get_flat(victim.model).clone()
    sent = []
    real_broadcast = victim.transport.broadcast

    async def spy(data):
        sent.append(envelope.decode_outer(data).kind)
        await real_broadcast(data)

    victim.transport.broadcast = spy
    for n in nodes[1:]:
        n.cfg = _with(n.cfg, "gossip", round_deadline_s=5.0)
    await asyncio.wait_for(run_all(nodes), 120)
    assert victim.stopped and "discarded" in victim.stopped
    assert len(victim.ledger.records) == spent  # nothing charged for the discarded round
    assert victim.ledger.epsilon(1e-5) <= 1.0 * (1 + 1e-9)
    assert "share" not in sent and "retire" in sent
    assert torch.equal(get_flat(victim.model), before)  # never carried on


async def test_every_signed_message_leaves_only_after_its_seq_is_on_disk(tmp_path):
    """Shares, announcements and the retire message (which used to be sent first and
    persisted after): at the moment any signed message is handed to the transport,
    the next free sequence number on disk is already above its seq."""
    _, prep = make(tmp_path, nodes=2, rounds=2, privacy="update")
    hub = MemoryHub()
    cfgs = [_with(load_config(p), "privacy", sigma=None, epsilon=20.0) for p in prep.config_paths]
    # Planned for 2 rounds, then asked for 4: the budget runs out and each retires.
    for i, cfg in enumerate(cfgs):
        Node.from_config(cfg, MemoryHub().attach(prep.names[i], prep.names))
    nodes = [Node.from_config(_with(cfg, "training", rounds=4), hub.attach(n, prep.names))
             for cfg, n in zip(cfgs, prep.names, strict=True)]
    violations, seen = [], []

    def make_spy(node, real):
        async def spy(*args):
            env = envelope.decode_outer(args[-1])
            seen.append(env.kind)
            if StateDir(node.state.path).reserved_seq() <= env.seq:
                violations.append((node.name, env.kind, env.seq))
            await real(*args)
        return spy

    for n in nodes:
        for attr in ("broadcast", "send"):
            setattr(n.transport, attr, make_spy(n, getattr(n.transport, attr)))
    await asyncio.wait_for(run_all(nodes), 120)
    assert all(n.stopped for n in nodes)
    assert {"retire", "share"} <= set(seen)
    assert not violations, violations


async def test_the_outbox_keeps_only_what_a_restart_needs(tmp_path):
    _, prep = make(tmp_path, nodes=2, rounds=4, privacy="update")
    nodes = build(prep, MemoryHub())
    await asyncio.wait_for(run_all(nodes), 120)
    for n in nodes:
        left = sorted(p.name for p in (n.state.path / "outbox").glob("round-*"))
        assert left == [], left  # every round is closed: nothing to re-send
        ledger_digests = {r.share_digest for r in n.ledger.records}
        assert len(ledger_digests) == 4  # what an audit needs is in the ledger


# --- non-finite models and shares ------------------------------------------------
async def test_a_member_sending_huge_finite_values_crashes_nobody(tmp_path):
    """Attack 2 of the hostile-member issue, as the member would do it: shares signed
    with its own valid key, every value 1e30 (finite, so they pass the body checks).
    Averaged by `mean` they used to give a model whose evaluation raised."""
    _, prep = make(tmp_path, nodes=3, rounds=2, privacy="off", deadline=4.0)
    hub = MemoryHub()
    honest = build(prep, hub, which={1, 2})
    key = load_identity(load_config(prep.config_paths[0]).identity.key).signing_key
    spec = honest[0].verifier.spec
    body = bodies.encode_share([(t.name, np.full(t.shape, 1e30, dtype="<f4")) for t in spec],
                               1e12)
    attacker = hub.attach(prep.names[0], prep.names)
    for r in range(2):
        await attacker.broadcast(envelope.pack(key, prep.consortium.id, "share", r, r, body))
    await asyncio.wait_for(run_all(honest), 120)
    for n in honest:
        lines = read_jsonl(n.state.path / "metrics.jsonl")
        assert [x["round"] for x in lines] == [0, 1]
        assert np.isfinite(get_flat(n.model).numpy()).all()


@pytest.mark.parametrize("privacy", ["update", "record"])
async def test_a_local_result_dropped_as_non_finite_is_still_charged(tmp_path, privacy):
    """Privacy audit: a member whose local result is non-finite releases nothing, yet its
    peers see that no share came that round, an output of a mechanism that ran on its
    rows. The round is charged all the same (over-counting is safe), a noised count too.
    A short deadline: the others wait it out for the share that never comes; nothing
    checked here depends on who else made it."""
    torch.set_num_threads(1)
    spec = SimulationSpec(dataset="default", nodes=3, partition="iid", rounds=2, seed=0,
                          out=tmp_path, privacy=privacy, clip=0.1, sigma=1.0,
                          weight="noised", aggregation="mean", round_deadline_s=2.0)
    prep = prepare(spec)
    hub = MemoryHub()
    nodes = []
    for i, (name, path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        cfg = load_config(path)
        if i == 0:  # an absurd learning rate (past the config's bound): training diverges
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
                update={"lr": 1e30})})
        nodes.append(Node.from_config(cfg, hub.attach(name, prep.names), SeededNoise(i)))
    await asyncio.wait_for(run_all(nodes), 300)
    bad = nodes[0]
    assert bad.counters.rejected["non_finite_local"] == 2  # nothing released, both rounds
    assert not (bad.state.path / "outbox").exists() or not any(
        (bad.state.path / "outbox").iterdir())
    for n in nodes[1:]:  # no share of it ever arrived
        assert not [a for a in read_jsonl(n.state.path / "audit.jsonl")
                    if a["member"] == bad.name and a.get("kind") in ("share", "sealed")]
    ledger = Ledger(bad.state.path / "ledger.jsonl")  # as `flnode status` reads it
    charged = [(r.round, r.mode) for r in ledger.records]
    if privacy == "update":
        assert charged == [(0, "update"), (1, "update")]
    else:  # the noised count once (stored, reused), then what DP-SGD did each round
        assert charged == [(0, "count"), (0, "record"), (1, "record")]
        weight = json.loads((bad.state.path / "released_weight.json").read_text())["weight"]
        assert ledger.records[0].share_digest.split()[1] == weight_digest(weight)
    assert all(r.share_digest.startswith("not-released:") for r in ledger.records)
    assert ledger.epsilon(1e-5) > 0
    assert ledger.epsilon(1e-5) == pytest.approx(nodes[1].epsilon(), rel=0.2)


# --- local input ------------------------------------------------------------------
def test_local_input_that_used_to_give_a_traceback_is_a_named_error(tmp_path):
    schema = FeatureSchema.from_dict(SCHEMA, "s")
    empty = pd.DataFrame({"student": [], "balance": [], "income": [], "default": []})
    with pytest.raises(LocalError, match="no rows"):
        encode(empty, schema, "bank.csv")
    huge = pd.DataFrame({"student": ["No"], "balance": [1e308], "income": [1.0],
                         "default": ["No"]})
    with pytest.raises(LocalError, match="'balance'.*standard deviations"):
        encode(huge, schema, "bank.csv")
    doc = {"state_dir": "s", "identity": {"key": "k"}, "consortium": {"path": "c"},
           "data": {"path": "d.csv"}, "privacy": {"mode": "off"}, "training": {"rounds": True}}
    with pytest.raises(LocalError, match="rounds = true: expected a number"):
        validate_config(doc, "node.toml")


# --- liveness ----------------------------------------------------------------------
async def test_a_member_that_never_starts_costs_one_deadline_not_one_per_round(tmp_path):
    """4 members, 4 rounds, one never starts: each running node waits out one
    deadline for it, then closes rounds without waiting until it is heard from."""
    # A deadline the present members always make, even on a loaded machine.
    _, prep = make(tmp_path, nodes=4, rounds=4, privacy="off", deadline=10.0)
    nodes = build(prep, MemoryHub(), which={0, 1, 2})
    await asyncio.wait_for(run_all(nodes), 600)
    for n in nodes:
        closed = [x["closed"] for x in read_jsonl(n.state.path / "metrics.jsonl")]
        assert closed == ["deadline"] + ["absent"] * 3, (n.name, closed)
        assert all(x["missing"] == ["bank-3"] for x in read_jsonl(n.state.path / "metrics.jsonl"))



async def test_an_absent_member_is_waited_for_again_once_it_is_heard_from(tmp_path):
    _, prep = make(tmp_path, nodes=3, rounds=4, privacy="off", deadline=4.0)
    hub = MemoryHub()
    early = build(prep, hub, which={0, 1})
    late_cfg = load_config(prep.config_paths[2])
    started = asyncio.Event()

    async def late_start():
        # Join once the others have given up on it (both closed round 1 without it).
        while not all(n.liveness.absent for n in early):
            await asyncio.sleep(0.05)
        node = Node.from_config(late_cfg, hub.attach(prep.names[2], prep.names))
        started.set()
        return await node.run()

    async with asyncio.TaskGroup() as tg:
        for n in early:
            tg.create_task(n.run())
        late = tg.create_task(late_start())
    assert started.is_set() and late.result()
    for n in early:
        lines = read_jsonl(n.state.path / "metrics.jsonl")
        assert lines[0]["closed"] == "deadline"
        assert lines[-1]["closed"] == "all" and "bank-2" in lines[-1]["received"], lines
        assert not n.liveness.absent


async def test_a_restarted_node_joins_the_round_a_majority_is_in(tmp_path):
    """Checkpointed at round 1, restarted while the others are at round 4: it asks where
    they are (hello), joins round 4 with them instead of closing rounds 1-3 alone."""
    # 10 rounds: the others race on without bank-0, so on a loaded machine its restart
    # must still land well before their last round (it is built before they start).
    _, prep = make(tmp_path, nodes=3, rounds=10, privacy="off", deadline=30.0)
    hub = MemoryHub()
    first = build(prep, hub, which={0})
    cp = first[0].state.load_checkpoint()
    first[0].state.save_checkpoint(dataclasses.replace(cp, next_round=1))
    hub.detach(prep.names[0])
    others = build(prep, hub, which={1, 2})
    node = build(prep, MemoryHub(), which={0})[0]  # down: on the hub only once restarted
    assert node.book.current == 1

    async def restart_when_others_reach(round_):
        while not all(n.book.current >= round_ for n in others):
            await asyncio.sleep(0.05)
        node.transport = hub.attach(prep.names[0], prep.names)
        return node, await node.run()

    for n in others:  # bank-0 is down: they stop waiting for it after one deadline
        n.cfg = _with(n.cfg, "gossip", round_deadline_s=5.0)
    async with asyncio.TaskGroup() as tg:
        for n in others:
            tg.create_task(n.run())
        back = tg.create_task(restart_when_others_reach(4))
    node, reports = back.result()
    rounds = [r.round for r in reports]
    assert rounds[0] >= 4, rounds  # joined them, did not replay rounds 1-3
    assert all("bank-0" in x["received"] for n in others
               for x in read_jsonl(n.state.path / "metrics.jsonl")[-1:]), "not waited for again"


async def test_min_members_holds_round_one_until_a_quorum_is_up(tmp_path):
    _, prep = make(tmp_path, nodes=3, rounds=2, privacy="off", deadline=30.0)
    hub = MemoryHub()
    cfgs = [_with(load_config(p), "gossip", min_members=3, round_deadline_s=30.0)
            for p in prep.config_paths]
    early = [Node.from_config(c, hub.attach(n, prep.names))
             for c, n in zip(cfgs[:2], prep.names[:2], strict=True)]
    tasks = [asyncio.create_task(n.run()) for n in early]
    while not all(len(n.liveness.up) == 1 for n in early):  # each has heard the other's hello
        await asyncio.sleep(0.05)
    assert all(n.ledger.records == [] and not (n.state.path / "metrics.jsonl").exists()
               for n in early)  # nobody trained or released: 2 of 3 are up
    last = Node.from_config(cfgs[2], hub.attach(prep.names[2], prep.names))
    reports = await asyncio.wait_for(asyncio.gather(last.run(), *tasks), 300)
    assert all(len(r) == 2 for r in reports)
    for n in [*early, last]:
        assert [x["closed"] for x in read_jsonl(n.state.path / "metrics.jsonl")] == ["all", "all"]
    with pytest.raises(LocalError, match="min_members = 4 but the consortium has 3"):
        Node.from_config(_with(cfgs[0], "gossip", min_members=4), MemoryHub().attach(
            prep.names[0], prep.names))

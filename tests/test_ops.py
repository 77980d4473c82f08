"""What an operator reads: `flnode status` (running / exited / killed / stale pid, last
activity, who a node waits for, final model digests), the wait and divergence log lines,
and logs that name members rather than libp2p peer ids."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest
import torch

from gossip.protocol import machine as protocol_machine
from gossip.transports.memory import MemoryHub
from node.learn.models import get_flat, set_flat
from node.ops.status import collect, final_line, process_line, render, waiting_line
from node.runtime import pidfile
from node.runtime.activity import ACTIVITY_FILE
from node.runtime.finals import compare_finals
from tests.test_runner import build, make, run_all


def write_pid(state, **doc):
    state.mkdir(parents=True, exist_ok=True)
    (state / pidfile.PID_FILE).write_text(json.dumps(doc))


def test_a_live_process_with_its_recorded_start_time_is_running(tmp_path):
    me = os.getpid()
    write_pid(tmp_path, pid=me, proc_start=pidfile.proc_start(me), boot_id=pidfile.boot_id(),
              started=time.time() - 5)
    st = pidfile.process_state(tmp_path)
    assert st["state"] == "running" and st["pid"] == me
    assert process_line(st, time.time()).startswith(f"running (pid {me}, started ")


def test_a_reused_pid_is_stale_not_running(tmp_path):
    """The pid is alive but started at another time: another process got the number."""
    me = os.getpid()
    write_pid(tmp_path, pid=me, proc_start=pidfile.proc_start(me) - 1, boot_id=pidfile.boot_id())
    st = pidfile.process_state(tmp_path)
    assert st["state"] == "stale_pid"
    assert "pid reused" in process_line(st, time.time())


def test_a_gone_pid_without_an_exit_is_killed_and_a_recorded_exit_is_exited(tmp_path):
    gone = 2**22 + 17  # above Linux's pid_max default range in use here
    assert pidfile.proc_start(gone) is None
    write_pid(tmp_path, pid=gone, proc_start=123, boot_id=pidfile.boot_id())
    st = pidfile.process_state(tmp_path)
    assert st["state"] == "killed" and "killed" in process_line(st, time.time())
    write_pid(tmp_path, pid=gone, proc_start=123, boot_id=pidfile.boot_id(), exited=time.time(),
              code=143)
    line = process_line(pidfile.process_state(tmp_path), time.time())
    assert line.startswith("not running: exited") and "SIGTERM" in line


def test_another_boot_and_a_foreign_pid_file_are_said_as_such(tmp_path):
    write_pid(tmp_path, pid=os.getpid(), proc_start=1, boot_id="not-this-boot")
    assert pidfile.process_state(tmp_path)["state"] == "rebooted"
    (tmp_path / pidfile.PID_FILE).write_text("{torn")
    st = pidfile.process_state(tmp_path)
    assert st["state"] == "unknown" and "not JSON" in st["detail"]


def test_a_second_node_on_a_running_state_dir_is_refused(tmp_path):
    import subprocess
    import sys

    # A live process that is not us (a pid file naming ourselves would be re-claimed).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_pid(tmp_path, pid=other.pid, proc_start=pidfile.proc_start(other.pid),
                  boot_id=pidfile.boot_id())
        from gossip.errors import LocalError

        try:
            pidfile.claim(tmp_path)
        except LocalError as exc:
            assert f"in use by a running node (pid {other.pid}" in str(exc)
        else:
            raise AssertionError("claimed a state dir a live node holds")
    finally:
        other.kill()
        other.wait()
    # Now it is gone (and reaped): claiming works and records our process.
    pidfile.claim(tmp_path)
    assert pidfile.process_state(tmp_path)["pid"] == os.getpid()
    pidfile.record_exit(tmp_path, 0)
    assert pidfile.process_state(tmp_path)["state"] == "exited"


def test_compare_finals_names_who_differs_and_who_was_not_heard():
    a, b = bytes(32), bytes([1]) * 32
    got = compare_finals(a, {"bank-1": a, "bank-2": b}, {"bank-1", "bank-2", "bank-3"})
    assert got == {"digest": a.hex(), "same": ["bank-1"], "different": {"bank-2": b.hex()},
                   "not_heard": ["bank-3"]}
    line = final_line(got)
    assert "DIFFERENT final model from bank-2" in line and "no final digest from bank-3" in line


async def test_a_node_started_alone_says_so_early_and_status_shows_whom_it_waits_for(
        tmp_path, monkeypatch, caplog):
    """It used to wait out the whole deadline in silence."""
    monkeypatch.setattr(protocol_machine, "WAIT_REPORT_FIRST_S", 0.2)
    monkeypatch.setattr(protocol_machine, "WAIT_REPORT_EVERY_S", 0.5)
    _, prep = make(tmp_path, nodes=3, rounds=1, privacy="off", deadline=1.5)
    [alone] = build(prep, MemoryHub(), which={0})
    caplog.set_level(logging.WARNING, logger="flnode.node")
    seen: list[dict] = []

    async def watch():  # what `flnode status` shows while the node waits
        path = alone.state.path / ACTIVITY_FILE
        while not seen:
            if path.exists():
                doc = json.loads(path.read_text())
                if doc.get("waiting_for"):
                    seen.append(doc)
            await asyncio.sleep(0.02)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(asyncio.wait_for(watch(), 60))
        tg.create_task(alone.run())
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waits and "round 1 shares from bank-1, bank-2" in waits[0], waits
    assert "no other member heard from since this node started (started alone?" in waits[0]
    assert len(waits) <= 4, waits  # every 0.5 s over a 1.5 s deadline: not a flood
    assert seen[0]["waiting_for"] == ["bank-1", "bank-2"] and seen[0]["what"] == "round 1 shares"
    # Once the wait is over the file says so: status shows no stale "waiting".
    assert json.loads((alone.state.path / ACTIVITY_FILE).read_text())[
        "waiting_for"] == []
    assert collect(alone.state.path)["waiting"] is None


@pytest.mark.parametrize("quorum,asked", [
    (3, "gossip.min_members = 3"), ("majority", 'gossip.min_members = "majority" (2 of 3)')])
async def test_the_min_members_wait_is_reported_and_shown_by_status(tmp_path, monkeypatch,
                                                                     caplog, quorum, asked):
    """gossip.min_members = 3 with the others down: the node said nothing for a round
    deadline and status showed no wait. Now the same report as any long wait, within
    WAIT_REPORT_FIRST_S; once the others start, the wait clears and the round runs."""
    from node.privacy.mechanisms import SeededNoise
    from node.runtime.config import load_config
    from node.runtime.node import Node

    monkeypatch.setattr(protocol_machine, "WAIT_REPORT_FIRST_S", 0.2)
    monkeypatch.setattr(protocol_machine, "WAIT_REPORT_EVERY_S", 0.5)
    _, prep = make(tmp_path, nodes=3, rounds=1, privacy="off", deadline=30.0)
    hub = MemoryHub()
    cfg = load_config(prep.config_paths[0])
    cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(
        update={"min_members": quorum})})
    first = Node.from_config(cfg, hub.attach(prep.names[0], prep.names), SeededNoise(0))
    caplog.set_level(logging.WARNING, logger="flnode.node")
    path = first.state.path / ACTIVITY_FILE

    async def waiting() -> dict:
        while True:
            if path.exists():
                doc = json.loads(path.read_text())
                if doc.get("waiting_for"):
                    return doc
            await asyncio.sleep(0.02)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(first.run())
        doc = await asyncio.wait_for(waiting(), 60)
        assert doc["waiting_for"] == ["bank-1", "bank-2"] and doc["gives_up"] is None
        assert doc["what"] == f"{asked} before round 1 (1 up)"
        assert collect(first.state.path)["waiting"]["waiting_for"] == ["bank-1", "bank-2"]
        assert waiting_line(doc, time.time()).startswith(
            f"for bank-1, bank-2 ({asked} before round 1 (1 up))")
        assert first.last_round is None and not task.done()  # nothing trained or released
        others = build(prep, hub, which={1, 2})
        tasks = [tg.create_task(n.run()) for n in others]
    assert all(len(t.result()) == 1 for t in [task, *tasks])
    waits = [r.getMessage() for r in caplog.records if "gossip.min_members" in r.getMessage()]
    assert waits and f"waiting 0 s for {asked} before round 1 (1 up) from " \
        "bank-1, bank-2 (no time limit); no other member heard from" in waits[0], waits
    assert collect(first.state.path)["waiting"] is None


async def test_members_that_end_with_different_models_are_told_so(tmp_path, caplog):
    """bank-2 resumes from another model than the others (as after a kill and a restart
    from an older checkpoint): the server step starts from it, so it ends elsewhere.
    Every member says who differs, in the log and in `flnode status`."""
    _, prep = make(tmp_path, nodes=3, rounds=2, privacy="off")
    nodes = build(prep, MemoryHub())
    set_flat(nodes[2].model, get_flat(nodes[2].model) + 0.05)
    caplog.set_level(logging.INFO, logger="flnode.node")
    await asyncio.wait_for(run_all(nodes), 300)
    assert torch.equal(get_flat(nodes[0].model), get_flat(nodes[1].model))
    assert not torch.equal(get_flat(nodes[0].model), get_flat(nodes[2].model))
    s0 = collect(nodes[0].state.path)
    assert s0["final"]["same"] == ["bank-1"] and list(s0["final"]["different"]) == ["bank-2"]
    assert "DIFFERENT final model from bank-2" in render(s0)
    s2 = collect(nodes[2].state.path)
    assert sorted(s2["final"]["different"]) == ["bank-0", "bank-1"] and s2["final"]["same"] == []
    logs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("bank-0: final models differ: bank-2 (") for m in logs), logs
    assert any(m.startswith("bank-1: final models differ: bank-2 (") for m in logs), logs
    assert any(m.startswith("bank-2: final models differ: bank-0 (") for m in logs), logs


async def test_members_with_the_same_model_say_identical(tmp_path, caplog):
    _, prep = make(tmp_path, nodes=3, rounds=1, privacy="off")
    nodes = build(prep, MemoryHub())
    caplog.set_level(logging.INFO, logger="flnode.node")
    await asyncio.wait_for(run_all(nodes), 300)
    for n in nodes:
        f = collect(n.state.path)["final"]
        assert f["different"] == {} and len(f["same"]) == 2 and f["not_heard"] == []
    assert any("final model identical to" in r.getMessage() for r in caplog.records)


def test_libp2p_errors_name_the_member_not_its_peer_id():
    """py-libp2p's errors carry peer ids ("unable to connect to 12D3KooW…"): the log
    line names the member, with the id's tail only to match libp2p's own logs."""
    from nacl.signing import SigningKey

    from gossip.membership import Member
    from gossip.transports.libp2p import Libp2pTransport, peer_id_of

    keys = [SigningKey.generate() for _ in range(2)]
    members = tuple(Member(f"bank-{i}", bytes(k.verify_key), {"libp2p": "/ip4/127.0.0.1/tcp/9"})
                    for i, k in enumerate(keys))
    t = Libp2pTransport(bytes(keys[0]), "bank-0", members, 1 << 20)
    pid = str(peer_id_of(bytes(keys[1].verify_key)))
    text = t.named(f"SwarmDialAllFailedError: unable to connect to {pid}, no addresses")
    assert pid not in text and f"bank-1 (peer id …{pid[-6:]})" in text


async def test_a_node_alone_charges_nothing_for_its_statistics(tmp_path, monkeypatch, caplog):
    """Federated normalization under record-level DP: a node that hears no member
    computes and charges no statistics; it says whom it never heard from."""
    from gossip.errors import LocalError
    from node.privacy.mechanisms import SeededNoise
    from node.runtime.config import load_config
    from node.runtime.node import Node
    from tests.test_normalize import make as make_federated

    monkeypatch.setattr(protocol_machine, "WAIT_REPORT_FIRST_S", 0.2)
    prep, _ = make_federated(tmp_path, nodes=3, privacy="record")
    cfg = load_config(prep.config_paths[0])
    cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(
        update={"normalize_wait_s": 1.0})})
    node = Node.from_config(cfg, MemoryHub().attach(prep.names[0], prep.names), SeededNoise(0))
    caplog.set_level(logging.WARNING, logger="flnode.node")
    with pytest.raises(LocalError) as info:
        await asyncio.wait_for(node.run(), 120)
    assert "no vote from bank-1, bank-2" in str(info.value)
    assert "nothing charged" in str(info.value)
    assert node.ledger.records == [] and not (node.state.path / Node.STATS_FILE).exists()
    assert any("votes on normalization (before any statistics are computed and charged) "
               "from bank-1, bank-2" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_status_of_a_real_node_running_then_sigkilled(tmp_path):
    """`flnode run` alone (its one peer never starts): `flnode status` says running with
    its pid; the node says early that it hears nobody; after SIGKILL status says killed,
    not running, and a restart on the same state dir is allowed."""
    import selectors
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec

    root = Path(__file__).resolve().parent.parent
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=1, seed=0,
                          out=tmp_path, transport="libp2p", round_deadline_s=120,
                          privacy="off")
    prep = prepare(spec, {"bank-0": {"libp2p": "/ip4/127.0.0.1/tcp/0"},
                          "bank-1": {"libp2p": "/ip4/127.0.0.1/tcp/9"}})  # never starts
    state = tmp_path / "state" / "bank-0"
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--config",
                             str(prep.config_paths[0])], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=root)
    out = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + 120
        while time.monotonic() < end and not any("started alone?" in x for x in out):
            if sel.select(timeout=1):
                line = proc.stdout.readline()
                if not line:
                    break
                out.append(line)
        wait_line = next((x for x in out if "started alone?" in x), None)
        assert wait_line and "waiting" in wait_line and "round 1 shares from bank-1" in \
            wait_line, "".join(out)
        st = collect(state)
        assert st["process"]["state"] == "running" and st["process"]["pid"] == proc.pid
        assert st["waiting"]["waiting_for"] == ["bank-1"]
        text = render(st)
        assert f"running (pid {proc.pid}" in text and "waiting     for bank-1" in text
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    st = collect(state)
    assert st["process"]["state"] == "killed", st["process"]
    assert "not running" in render(st) and "killed" in render(st)
    pidfile.claim(state)  # a restart is not refused by the dead node's pid file


def test_status_of_a_node_that_has_started_but_closed_nothing_yet(tmp_path, capsys):
    """No checkpoint yet but a pid file: it is starting (waiting for the others), not
    "no state dir here"."""
    from node.cli import main

    pidfile.claim(tmp_path)
    (tmp_path / ACTIVITY_FILE).write_text(json.dumps({
        "time": time.time(), "what": "statistics", "waiting_for": ["bank-2"],
        "since": time.time() - 42}))
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"running (pid {os.getpid()}" in out and "none yet (no checkpoint" in out
    assert "waiting     for bank-2 (statistics), 42 s so far" in out
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["process"]["state"] == "running" and doc["starting"] is True


def test_a_members_final_message_is_checked_and_its_first_digest_kept():
    """Attack with a member's key: a final body of the wrong size is refused (bad_body);
    a second, different final does not replace the first."""
    from gossip import envelope
    from gossip.envelope import KIND_FINAL
    from gossip.errors import RemoteError
    from gossip.protocol.book import RoundBook
    from tests.helpers import consortium, keys, verifier_for

    ks = keys(3)
    cons = consortium(ks)
    v = verifier_for(cons, ks[0])
    book = RoundBook({"bank-1", "bank-2"}, 3)
    for bad in (b"", bytes(31), bytes(33), bytes(1 << 16)):
        data = envelope.pack(ks[1], cons.id, KIND_FINAL, 2, len(bad), bad)
        with pytest.raises(RemoteError) as info:
            v.verify(data, 0)
        assert info.value.reason == "bad_body" and "32-byte model digest" in info.value.detail
    acc = v.verify(envelope.pack(ks[1], cons.id, KIND_FINAL, 2, 100, bytes([7]) * 32), 0)
    assert book.add(acc) == "final" and acc.envelope.body == bytes([7]) * 32


def test_a_node_keeps_a_members_first_final_digest_only(tmp_path):
    from gossip import envelope
    from gossip.envelope import KIND_FINAL
    from gossip.transports.base import Incoming
    from node.runtime.config import load_config
    from node.runtime.identity import load_identity

    _, prep = make(tmp_path, nodes=3, rounds=1, privacy="off")
    node = build(prep, MemoryHub(), which={0})[0]
    bank1 = load_identity(load_config(prep.config_paths[1]).identity.key)
    for seq, digest in ((5, bytes([7]) * 32), (6, bytes([9]) * 32)):
        data = envelope.pack(bank1.signing_key, node.consortium.id, KIND_FINAL, 0, seq, digest)
        assert node.handle(Incoming(data, "bank-1")) is not None
    bad = envelope.pack(bank1.signing_key, node.consortium.id, KIND_FINAL, 0, 7, bytes(8))
    assert node.handle(Incoming(bad, "bank-1")) is None
    assert node.machine.finals == {"bank-1": bytes([7]) * 32}
    assert node.rejected() == {"bad_body": 1}


async def test_status_and_report_name_a_flooding_member_with_its_count(tmp_path):
    """mallory (on the hub, not a member) sends bank-0 300 messages before the run: bank-0's
    intake holds 256 (its per-sender queue) and drops 44 unparsed. The node writes them to
    metrics.jsonl as flood_by_sender; `flnode status` and `flnode report --state-dir` name
    mallory with the 44 messages (before: only `flood 44` under rejected, nobody named)."""
    from gossip.transports.base import SENDER_QUEUE_MESSAGES
    from node.ops.report_member import write_member_report

    _, prep = make(tmp_path, nodes=3, rounds=2, privacy="off")
    hub = MemoryHub()
    nodes = build(prep, hub)
    hub.attach("mallory", prep.names)
    for i in range(300):
        await hub.deliver("mallory", "bank-0", b"stale %d" % i)
    await asyncio.wait_for(run_all(nodes), 300)
    dropped = 300 - SENDER_QUEUE_MESSAGES
    st = collect(nodes[0].state.path)
    assert st["flood"] == {"mallory": {"dropped": dropped, "last_round": 0}}
    text = render(st)
    assert f"rejected    flood {dropped}," in text
    assert (f"flood       mallory: {dropped} messages dropped before verification, over its "
            "share of our intake (50/s, burst 256, 256 queued); last in round 1") in text
    assert "bank-1" not in text.split("flood       ")[1].split("\n")[0]
    await asyncio.to_thread(write_member_report, nodes[0].state.path)
    html = (nodes[0].state.path / "report.html").read_text()
    assert f"flood: {dropped} messages dropped before verification" in html
    assert json.loads((nodes[0].state.path / "report.json").read_text()
                      )["peers"]["mallory"]["flood_dropped"] == dropped
    from node.rehearsal.simulation.results import seen_by  # the simulator's per-attacker lines: messages too

    assert seen_by(nodes[0].state.path, ["mallory"])["mallory"]["rejected"]["flood"] == dropped


def test_flood_counts_add_up_across_restarts_and_ignore_foreign_values():
    """metrics.jsonl counts are since the process started: a restart (bytes_sent or the
    count going down) adds the earlier run's last count, it does not replace it."""
    from node.ops.status import flood_by_member

    lines = [
        {"round": 0, "bytes_sent": 10},
        {"round": 1, "bytes_sent": 20, "flood_by_sender": {"b": 100}},
        {"round": 2, "bytes_sent": 30, "flood_by_sender": {"b": 150, "c": 5}},
        {"round": 3, "bytes_sent": 5, "flood_by_sender": {"b": 150}},  # restart, b again
        {"round": 4, "bytes_sent": 9, "flood_by_sender": {"b": 150, "c": 2, "x": -1,
                                                         "y": True, "z": "9"}},
        {"round": 5, "bytes_sent": 12, "flood_by_sender": {"b": 3}},  # restart, bytes up
    ]
    assert flood_by_member(lines) == {"b": {"dropped": 303, "last_round": 5},
                                      "c": {"dropped": 7, "last_round": 4}}
    assert flood_by_member([{"round": 0, "bytes_sent": 1}]) == {}


def test_status_reads_a_rehearsal_members_config_and_says_so(tmp_path, capsys):
    """`flnode run` refuses [attack] / [faults]; `flnode status --config` on such a member
    (run by `python -m node.rehearsal.member`) still reads the planned rounds from it and
    names the sections it set aside. A typo in a production section is still refused."""
    import shutil
    from pathlib import Path

    from gossip.errors import LocalError
    from node.cli import main
    from node.runtime.config import load_config

    golden = Path(__file__).parent / "golden" / "run" / "state" / "telco-0"
    state = tmp_path / "state"
    shutil.copytree(golden, state)  # a finished member's state dir (never the golden files)
    text = (golden.parent.parent / "nodes" / "telco-0.toml").read_text()
    text = text.replace("rounds = 2", "rounds = 7")
    rehearsal = tmp_path / "hostile.toml"
    rehearsal.write_text(text + '\n[attack]\nkind = "sign-flip"\n\n[faults]\nloss = 0.1\n')
    with pytest.raises(LocalError, match=r"\[attack\] is a rehearsal section"):
        load_config(rehearsal)  # what `flnode run` does with it

    assert main(["status", "--state-dir", str(state), "--config", str(rehearsal)]) == 0
    out = capsys.readouterr().out
    assert "of 7 rounds completed" in out  # the config's planned rounds, not the plan's
    assert "rehearsal   the config is a rehearsal member's ([attack], [faults]" in out
    assert main(["status", "--state-dir", str(state), "--config", str(rehearsal), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["planned_rounds"] == 7 and doc["rehearsal_sections"] == ["[attack]", "[faults]"]

    production = tmp_path / "node.toml"
    production.write_text(text)
    assert main(["status", "--state-dir", str(state), "--config", str(production)]) == 0
    assert "\nrehearsal " not in capsys.readouterr().out
    production.write_text(text.replace("rounds = 7", "rounds = 7\nrondus = 1"))
    assert main(["status", "--state-dir", str(state), "--config", str(production)]) == 2
    assert "training.rondus: unknown key" in capsys.readouterr().err

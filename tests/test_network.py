"""Real OS processes: `flnode run` daemons over libp2p on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from gossip import envelope
from node.rehearsal.simulation.output import simulate
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.state import read_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def simulate_network(out: Path, *extra: str, rounds: int = 10) -> tuple[dict, str]:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate_network.py"), "--dataset", "default",
         "--nodes", "4", "--partition", "dirichlet:0.5", "--rounds", str(rounds), "--seed", "0",
         "--out", str(out), *extra], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), r.stdout


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> dict:
    """The in-process run both libp2p runs below must match (5 rounds, seal "auto"): one
    run for the module, each test reads its own facts of it."""
    return simulate(SimulationSpec(dataset="default", nodes=4, partition="dirichlet:0.5",
                                   rounds=5, seed=0, out=tmp_path_factory.mktemp("mem")),
                    Console(quiet=True))


def test_four_processes_over_libp2p_match_the_in_process_simulation(tmp_path, in_process):
    net, stdout = simulate_network(tmp_path / "net", rounds=5)
    assert "round   5/5" in stdout
    mem = in_process
    assert net["transport"] == "libp2p" and mem["transport"] == "memory"
    assert set(net) >= set(mem) - {"consortium_id"}
    for name, auc in mem["consortium"]["per_node"].items():
        assert abs(net["consortium"]["per_node"][name] - auc) <= 0.01, (name, auc)
    assert net["rejected"] == {}
    assert all(p["exit_codes"] == [0] for p in net["processes"].values())
    assert (tmp_path / "net" / "accuracy.png").exists()


def test_sealing_is_optional_over_libp2p_and_changes_the_bytes_not_the_model(tmp_path,
                                                                               in_process):
    """gossip.seal = "on" over libp2p (Noise already encrypts each hop; sealing adds
    end-to-end encryption and forward secrecy): 4 processes, the same models as the
    in-process run without sealing, every released share sealed."""
    net, _ = simulate_network(tmp_path / "net", "--seal", "on", rounds=5)
    mem = in_process
    assert net["transport"] == "libp2p" and net["seal"] == "on" and mem["seal"] == "auto"
    for name, auc in mem["consortium"]["per_node"].items():
        assert abs(net["consortium"]["per_node"][name] - auc) <= 0.01, (name, auc)
    assert net["rejected"] == {}
    for name in mem["consortium"]["per_node"]:  # what each member accepted from the others
        accepted = [a for a in read_jsonl(tmp_path / "net" / "state" / name / "audit.jsonl")
                    if a["outcome"] == "accepted" and a["kind"] in ("share", "sealed")]
        assert len(accepted) == 3 * 5 and {a["kind"] for a in accepted} == {"sealed"}


def test_sigkilled_node_rejoins_and_nobody_hangs_or_double_releases(tmp_path):
    out = tmp_path / "net"
    net, stdout = simulate_network(out, "--kill", "bank-2@3", "--round-deadline", "5",
                                   "--privacy", "update", "--clip", "0.1", "--sigma", "0.5")
    assert "SIGKILL bank-2" in stdout and "restarted bank-2" in stdout
    procs = net["processes"]
    assert procs["bank-2"]["starts"] == 2 and procs["bank-2"]["exit_codes"][-1] == 0
    assert all(p["exit_codes"] == [0] for n, p in procs.items() if n != "bank-2")
    for name in ("bank-0", "bank-1", "bank-3"):
        assert net["rounds_done"][name] == 10
    # bank-2 finished the run (it may have skipped rounds it missed: on a loaded box the
    # kill can land late and the others finish first; it then joins them at the end) ...
    log = (out / "logs" / "bank-2.log").read_text()
    assert "finished at round 10/10" in log, log[-2000:]
    lines = [json.loads(x) for x in
             (out / "state" / "bank-2" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["round"] >= 3, [x["round"] for x in lines]  # past the kill
    # ... its privacy spend was never under-counted: every released round has a
    # ledger record (a kill between charge and release may leave a second record
    # for a round: over-counting is allowed, under-counting is not) ...
    # (The ledger names each release by its envelope digest, the one every receiver
    # writes to its audit log: what left a member is matched to what it charged.)
    for name in net["processes"]:
        ledger = {json.loads(x)["share_digest"] for x in
                  (out / "state" / name / "ledger.jsonl").read_text().splitlines()}
        released = {a["digest"] for other in net["processes"] if other != name
                    for a in read_jsonl(out / "state" / other / "audit.jsonl")
                    if a["member"] == name and a["outcome"] == "accepted"
                    and a["kind"] == "share"}
        assert released and released <= ledger
    # ... and no member ever accepted two different shares from it for one round.
    for name in ("bank-0", "bank-1", "bank-3"):
        digests: dict[int, set[str]] = {}
        for rec in read_jsonl(out / "state" / name / "audit.jsonl"):
            if rec["member"] == "bank-2" and rec["outcome"] == "accepted" and \
                    rec["kind"] == "share":
                digests.setdefault(rec["round"], set()).add(rec["digest"])
        assert digests and all(len(d) == 1 for d in digests.values())
        assert "equivocation" not in net["rejected_per_node"][name]
    # ... and it ended with the others' model (the update-level noise here comes from the
    # OS: an unlucky draw can set the whole consortium back, so its quality against
    # local-only training is the noise-free tests' to check, not this one's).
    per = net["consortium"]["per_node"]
    assert max(per.values()) - min(per.values()) < 0.05, per


def test_summary_epsilon_is_recomputed_from_the_ledger_not_the_last_metrics_line(tmp_path):
    """Privacy audit: simulate_network.py took each member's ε from its last metrics line.
    A member stopped after charging a round and before writing that round's line was
    under-reported (and one with no line yet shown as "∞ (no DP)"). Here bank-2 never
    starts: bank-0 and bank-1 charge round 1, release and wait out a long deadline for
    it; the run's --timeout stops them there (SIGTERM). The summary's ε is the ledger's,
    as `flnode status` computes it."""
    from node.ops.status import collect
    from node.privacy.ledger import Ledger

    out = tmp_path / "net"
    # Not a fixed --timeout to sit out: once each has charged round 1 and accepted the
    # other's share, the test stops both (SIGTERM, what the run's --timeout would send).
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "simulate_network.py"), "--dataset", "default",
         "--nodes", "3", "--partition", "iid", "--rounds", "2", "--seed", "0", "--privacy",
         "record", "--epsilon", "3", "--absent", "bank-2", "--round-deadline", "600",
         "--timeout", "500", "--out", str(out)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        running = ("bank-0", "bank-1")

        def charged_and_heard(name: str, other: str) -> bool:
            state = out / "state" / name
            return bool(read_jsonl(state / "ledger.jsonl")) and any(
                a.get("member") == other and a.get("outcome") == "accepted"
                and a.get("kind") in ("share", "sealed") for a in read_jsonl(state / "audit.jsonl"))

        deadline = time.monotonic() + 450  # generous: only a hung run gets near it
        while not (charged_and_heard(*running) and charged_and_heard(*running[::-1])):
            assert proc.poll() is None and time.monotonic() < deadline, "no charge + share"
            time.sleep(0.2)
        pids = dict(line.split() for line in (out / "pids").read_text().splitlines())
        for name in running:  # both sit in round 1, waiting for bank-2's share
            os.kill(int(pids[name]), signal.SIGTERM)
        stdout = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1, stdout[-3000:]  # stopped, not finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"]["delta"] == 1e-5 and summary["noise"] == "os"
    for name in ("bank-0", "bank-1"):
        state = out / "state" / name
        ledger = Ledger(state / "ledger.jsonl")
        lines = read_jsonl(state / "metrics.jsonl")
        # Not vacuous: the ledger holds a round no metrics line reports.
        assert len(ledger.records) == len(lines) + 1, (ledger.records, lines)
        eps = ledger.epsilon(1e-5)
        assert eps > 0
        assert summary["epsilon"]["per_node"][name] == eps
        st = collect(state)  # `flnode status`
        assert st["privacy"]["epsilon_spent"] == eps
        # traffic as `flnode status` reads it (the checkpoint), not a metrics line's
        # (there is none: it would say 0 B)
        assert st["bytes_sent"] > 0
        assert summary["bytes"][name] == {"sent": st["bytes_sent"],
                                          "received": st["bytes_received"]}


def test_daemon_stops_cleanly_on_sigterm_and_resumes_with_the_stored_release(tmp_path):
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=1, seed=0,
                          out=tmp_path, transport="libp2p", round_deadline_s=60,
                          privacy="update", clip=0.1, sigma=1.0)
    addresses = {"bank-0": {"libp2p": "/ip4/127.0.0.1/tcp/0"},
                 "bank-1": {"libp2p": "/ip4/127.0.0.1/tcp/9"}}  # bank-1 never starts
    prep = prepare(spec, addresses)
    config = prep.config_paths[0]
    state = tmp_path / "state" / "bank-0"
    cmd = [sys.executable, "-m", "node.cli", "run", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    try:
        first = proc.stdout.readline()
        assert "starting at round 1/1" in first, first
        outbox = state / "outbox" / "round-00000000.env"
        deadline = time.monotonic() + 60
        while not outbox.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert outbox.exists()
        released = outbox.read_bytes()
        proc.send_signal(signal.SIGTERM)  # mid-round: waiting for bank-1's share
        rest = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "SIGTERM: stopped during round 1; checkpoint saved" in rest
    assert (state / "checkpoint.msgpack").exists()
    assert len((state / "ledger.jsonl").read_text().splitlines()) == 1

    # Restart (with a short deadline, bank-1 is still away): the same bytes go
    # out again, nothing new is charged, and the run finishes.
    config.write_text(config.read_text().replace("round_deadline_s = 60", "round_deadline_s = 1"))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "starting at round 1/1" in r.stdout and "(resent stored release)" in r.stdout
    ledger = [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]
    assert [x["share_digest"] for x in ledger] == [envelope.decode_outer(released).digest.hex()]
    assert not outbox.exists()  # round 1 is closed: no restart will need it again


def test_daemon_refuses_the_memory_transport_with_a_clear_message(tmp_path):
    prep = prepare(SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=1, seed=0,
                                  out=tmp_path))
    r = subprocess.run([sys.executable, "-m", "node.cli", "run", "--config",
                        str(prep.config_paths[0])], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2 and "only works inside `flnode simulate`" in r.stderr


def test_random_sigkills_never_undercount_epsilon_nor_double_release(tmp_path):
    """A few kills here; `scripts/crash_test.py --kills 20` is the long version."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "crash_test.py"), "--kills", "3",
                        "--min", "0", "--max", "2", "--seed", "1", "--out", str(tmp_path),
                        "--json"], capture_output=True, text=True, timeout=600)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and result["ok"], result
    assert result["rounds_released_by_victim"] >= 1  # not vacuous: shares did get out
    assert result["released_without_ledger_record"] == []
    assert result["rounds_with_two_different_shares"] == []
    eps = result["epsilon_reported_after_each_kill"]
    assert eps == sorted(eps) and eps[-1] > 0

"""Real OS processes: four `flnode run` daemons gossiping through a real mosquitto."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from node.simulation import SimulationSpec, simulate
from tests.mqtt_support import require_mosquitto

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def simulate_mqtt(out: Path, *extra: str) -> tuple[dict, str]:
    require_mosquitto()
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate_network.py"), "--transport", "mqtt",
         "--dataset", "churn", "--nodes", "4", "--partition", "column:state", "--rounds", "10",
         "--seed", "0", "--out", str(out), *extra], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), r.stdout


def test_four_processes_over_mosquitto_match_the_in_process_simulation(tmp_path):
    net, stdout = simulate_mqtt(tmp_path / "net")
    assert "round  10/10" in stdout
    pid = int(re.search(r"mosquitto pid (\d+) on mqtt://127\.0\.0\.1:\d+", stdout).group(1))
    assert f"stopped mosquitto (pid {pid})" in stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    mem = simulate(SimulationSpec(dataset="churn", nodes=4, partition="column:state", rounds=10,
                                  seed=0, out=tmp_path / "mem"), Console(quiet=True))
    assert net["transport"] == "mqtt"
    for name, auc in mem["consortium"]["per_node"].items():
        assert abs(net["consortium"]["per_node"][name] - auc) <= 0.01, (name, auc)
    assert net["rejected"] == {}
    assert all(p["exit_codes"] == [0] for p in net["processes"].values())
    # Each node's config points at its own password file (0600) from the generated set.
    for name in net["processes"]:
        pw = tmp_path / "net" / "broker" / f"{name}.password"
        assert pw.stat().st_mode & 0o777 == 0o600


def test_a_killed_node_gets_the_shares_published_while_it_was_down(tmp_path):
    out = tmp_path / "net"
    net, stdout = simulate_mqtt(out, "--kill", "telco-2@3", "--restart-after", "4")
    assert "SIGKILL telco-2" in stdout and "restarted telco-2" in stdout
    procs = net["processes"]
    assert procs["telco-2"]["starts"] == 2 and procs["telco-2"]["exit_codes"][-1] == 0
    assert all(net["rounds_done"][n] == 10 for n in procs)
    # A restarted node may re-send the release it stored before the kill: the
    # others already hold it, and count the copy as a benign duplicate.
    assert set(net["rejected"]) <= {"duplicate"}
    log = (out / "logs" / "telco-2.log").read_text()
    hms = re.findall(r"--- start 2 at (\d\d:\d\d:\d\d) ---", log)[0]
    today = datetime.date.today()
    restarted = datetime.datetime.combine(today, datetime.time.fromisoformat(hms)).timestamp()
    audit = [json.loads(x) for x in (out / "state" / "telco-2" / "audit.jsonl").read_text()
             .splitlines()]
    queued = [a for a in audit if a["outcome"] == "accepted" and a["time"] >= restarted and
              (out / "state" / a["member"] / "outbox" / f"round-{a['round']:08d}.env")
              .stat().st_mtime < restarted - 1]
    # Shares the others released (and published) while telco-2 was down, which
    # the broker kept in telco-2's session and handed to the new process.
    assert queued, audit

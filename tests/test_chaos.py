"""scripts/chaos.py, small: random SIGKILL/restarts and message loss over libp2p, checked.

One real run (3 members, 5 rounds, 3 kills, 10 % loss, no fault-free twin, so no
metric comparison): what it must show is that every process finishes, no
checkpoint or ledger is ever unreadable, and that the kills really happened.
Generous limits only; nothing here depends on how fast the machine is. A 2 s round
deadline (not simulate_network's 20 s): the members cut off by the partition wait one
out per round they are apart, and a killed member one, and those waits were most of
the run's time at 5 s; a missed deadline only leaves a share out, which none of the
checks below is about. Seed 0's kills come 0-1.5 s after rounds 1 and 2 of 5, while
the partition (rounds 1-3) holds the run back: a faster run still has them land.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_chaos_run_finishes_with_readable_state_and_real_kills(tmp_path):
    out = tmp_path / "chaos"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--nodes", "3", "--rounds", "5",
         "--kills", "3", "--loss", "0.1", "--seeds", "0", "--dp-check", "--epsilon", "8",
         "--sample-every", "1", "--round-deadline", "2", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.stdout.startswith("{"), r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report == json.loads((out / "chaos.json").read_text())
    (seed,) = report["seeds"]
    run = seed["chaos"]
    assert run["summary"] and not run["timed_out"], run.get("log_tail")
    assert run["finished"] and run["exit_code"] == 0, (run["unfinished"], run["members"])
    assert all(m["exit_codes"][-1] == 0 for m in run["members"].values())
    assert run["samples"] >= 2  # at least one load while it ran, and the one after
    assert run["unreadable"] == [] and run["ledger_shrank"] == []
    assert run["checkpoint_went_back"] == []
    # Not vacuous: kills happened (a kill planned after a member's last round can
    # find it already finished), and each one was followed by a restart.
    assert 1 <= run["sigkills"] <= 3
    assert sum(m["starts"] for m in run["members"].values()) == 3 + run["sigkills"]
    assert sum(code == -9 for m in run["members"].values() for code in m["exit_codes"]) == \
        run["sigkills"]
    # The ε part of --dp-check: nothing a peer accepted is missing from a ledger.
    assert run["released_without_ledger_record"] == {} and run["epsilon_mismatch"] == {}
    assert sum(run["rounds_released"].values()) > 0
    assert r.returncode == (0 if report["ok"] else 1), seed["failures"]
    assert report["ok"], seed["failures"]

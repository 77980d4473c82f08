"""End-to-end simulations on the real demo tables (the numbers the first slice promises)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from rich.console import Console

from node.rehearsal.simulation.output import simulate
from node.rehearsal.simulation.spec import SimulationSpec

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"dataset", "metric", "nodes", "rounds", "centralized", "local_only", "consortium",
                "pr_auc", "history", "epsilon", "rejected"}


def quiet() -> Console:
    return Console(quiet=True)


def test_default_consortium_matches_centralized_and_beats_local_only(tmp_path):
    """The acceptance run, through the real command line: 10 rounds already reach the
    centralized model (the 30-round figures are scripts/bench_privacy.py's "off" rows)."""
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", "--dataset", "default", "--nodes", "4",
         "--partition", "dirichlet:0.5", "--rounds", "10", "--seed", "0", "--privacy", "off",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "round  10/10" in r.stdout and "centralized" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["metric"] == "roc_auc" and summary["nodes"] == 4 and summary["rounds"] == 10
    assert list(summary["consortium"]["per_node"]) == ["bank-0", "bank-1", "bank-2", "bank-3"]
    assert len(summary["history"]) == 10
    assert set(summary["pr_auc"]) == {"local_only", "consortium"}
    cons, central = summary["consortium"]["mean"], summary["centralized"]
    assert abs(cons - central) <= 0.01, (cons, central)
    assert cons > summary["local_only"]["mean"]
    assert summary["epsilon"]["mode"] == "off" and summary["rejected"] == {}
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(v["sent"] > 0 and v["received"] > 0 for v in summary["bytes"].values())


def test_churn_by_state_beats_local_only(tmp_path):
    # 10 rounds: within 0.001 of centralized already (30 rounds: bench_privacy.py)
    s = simulate(SimulationSpec(dataset="churn", nodes=4, partition="column:state", rounds=10,
                                seed=0, out=tmp_path), quiet())
    assert s["consortium"]["mean"] > s["local_only"]["mean"]
    assert abs(s["consortium"]["mean"] - s["centralized"]) <= 0.02


def test_update_privacy_reports_finite_epsilon_from_the_accountant(tmp_path):
    from node.privacy.accountant import LedgerRecord, epsilon_of

    s = simulate(SimulationSpec(dataset="default", nodes=4, partition="dirichlet:0.5", rounds=5,
                                seed=0, out=tmp_path, privacy="update", clip=0.1, sigma=1.0),
                 quiet())
    expected = epsilon_of([LedgerRecord(r, "update", 1.0, 1.0, 1, 0.1, "") for r in range(5)],
                          1e-5)
    assert s["epsilon"]["accountant"] == "rdp" and s["epsilon"]["mode"] == "update"
    for eps in s["epsilon"]["per_node"].values():
        assert math.isfinite(eps) and eps == pytest.approx(expected, abs=1e-9)


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    def run(seed, sub):
        return simulate(SimulationSpec(dataset="digits", nodes=3, partition="dirichlet:0.5",
                                       rounds=3, seed=seed, out=tmp_path / sub,
                                       privacy="update", clip=1.0, sigma=0.5), quiet())

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    for key in ("history", "consortium", "local_only", "centralized", "rows"):
        assert a[key] == b[key]
    assert a["history"] != c["history"]


def test_record_level_epsilon_3_stays_in_budget_and_close_to_no_dp(tmp_path):
    """The issue's acceptance run (4 members, Default, ε = 3 per member), over 15 rounds:
    the fewest the default recipe is tuned for (fewer are warned about); the budget is
    planned over the run's own horizon, so every member still ends just under ε = 3.
    The 30-round figure is scripts/bench_privacy.py's (default, ε 3 vs off).

    "No DP" is the run's own centralized model (the same rows pooled, the same epochs, no
    noise), which the consortium without DP matches within 0.01
    (test_default_consortium_matches_centralized_and_beats_local_only): a second,
    privacy-off consortium run to compare with cost a fifth of this test's time and
    measured within 0.001 of it (0.9613 vs centralized 0.9611, seed 0, 15 rounds)."""
    rec = simulate(SimulationSpec(dataset="default", nodes=4, partition="dirichlet:0.5",
                                  rounds=15, seed=0, out=tmp_path / "rec", privacy="record",
                                  epsilon=3.0, sigma=None), quiet())
    assert rec["epsilon"]["mode"] == "record" and rec["epsilon"]["budget"] == 3.0
    for eps in rec["epsilon"]["per_node"].values():
        assert 2.9 <= eps <= 3.0
    assert abs(rec["consortium"]["mean"] - rec["centralized"]) <= 0.03
    assert rec["consortium"]["mean"] > rec["local_only"]["mean"]
    # privacy.weight = "auto" under the default rule for 4 members (trimmed_mean, which
    # never reads a declared weight): no row count released or charged
    assert rec["epsilon"]["weight"] == "uniform (1 per member): no row count released"
    assert set(rec["epsilon"]["weight_per_node"].values()) == {"uniform"}

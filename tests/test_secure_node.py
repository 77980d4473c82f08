"""Secure rounds in the real node (node/runtime/secure_node.py), through `flnode simulate
--secure`: in-process members on the memory transport, sealing on, real training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gossip.errors import LocalError


def _simulate(out: Path, **kw) -> dict:
    from rich.console import Console

    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    return simulate(SimulationSpec(**{"dataset": "digits", "nodes": 5, "partition": "dirichlet:0.5",
                                      "rounds": 3, "seed": 0, "out": out, **kw}),
                    console=Console(quiet=True))


def test_simulate_secure_every_member_reconstructs_the_same_model(tmp_path):
    """5 members x 3 secure rounds plus the local-only baselines: ~7 s idle."""
    summary = _simulate(tmp_path / "run", secure=True)
    rules = summary["rules"]
    assert (rules["secure"], rules["secure_threshold"], rules["secure_select"]) == \
        (True, 1, "multi-krum")
    assert summary["rejected"] == {}
    # every member applied the same opened sum: one model, one accuracy
    assert len(set(summary["consortium"]["per_node"].values())) == 1
    for state in sorted((tmp_path / "run" / "state").iterdir()):
        lines = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
        agg = [x for x in lines if x.get("kind") == "aggregate"]
        assert [x["round"] for x in agg] == [0, 1, 2]
        for x in agg:  # opened, multi-Krum kept n - f = 4 of 5, nobody named
            assert x["rule"] == "secure" and x["secure"]["ok"], x["secure"]
            assert len(x["used"]) == 4 and x["secure"]["named"] == {}
        # no member's share crossed the wire: only deals (sealed) and opened steps
        kinds = {x.get("kind") for x in lines if x.get("outcome") == "accepted"}
        assert "share" not in kinds and "sealed" not in kinds and "deal" in kinds


def test_secure_with_dp_is_refused_by_name_until_dp_on_the_sum_is_wired(tmp_path):
    with pytest.raises(LocalError, match="privacy.mode"):
        _simulate(tmp_path / "dp", secure=True, privacy="record", epsilon=3.0, rounds=1)

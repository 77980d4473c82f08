"""Rehearsed attacks in a secure consortium (node/rehearsal/attacks.py HostileCodec) and the
table code of scripts/bench_secure.py --grid (its long runs are never run here)."""

from __future__ import annotations

import json

import numpy as np

from node.rehearsal.attacks import SECURE_HUGE, hostile_codec
from node.rehearsal.config import AttackConfig
from node.rehearsal.simulation.output import simulate
from node.rehearsal.simulation.spec import SimulationSpec
from node.secagg.encoding import FixedPoint, IntegerCodec, signed
from scripts import bench_secure


def test_hostile_codec_keeps_the_codec_type_and_attacks_only_the_encoding():
    fp = FixedPoint.choose(1.0, 6, 8)
    x = np.full(6, 0.1)
    honest = signed(fp.encode(x))
    flip = hostile_codec(fp, AttackConfig(kind="sign-flip"), 1.0)
    assert isinstance(flip, FixedPoint) and flip.scale_bits == fp.scale_bits
    assert (signed(flip.encode(x)) == -honest).all()
    scaled = signed(hostile_codec(fp, AttackConfig(kind="scale"), 1.0).encode(x))
    assert (scaled == np.rint(-1000 * x * fp.scale)).all()  # past the clip: no bound check
    assert (signed(hostile_codec(fp, AttackConfig(kind="label-flip"), 1.0).encode(x))
            == honest).all()  # the rows carry that one
    huge = hostile_codec(fp, AttackConfig(kind="huge"), 1.0).encode(x)
    assert (huge == SECURE_HUGE).all()
    ic = IntegerCodec(8, 6, 10**6)
    noisy = hostile_codec(ic, AttackConfig(kind="noise", param=2.0), 400.0)
    assert isinstance(noisy, IntegerCodec)
    a, b = signed(noisy.encode(np.zeros(6, np.int64))), signed(noisy.encode(np.zeros(6, np.int64)))
    assert (a != b).any()  # a fresh draw per contribution
    assert 10 < np.abs(a).mean() < 1000  # SIGMA / n x units = 100 per coordinate
    assert (noisy.decode_sum(ic.encode(np.arange(6)), 1) == np.arange(6)).all()


def test_a_scaling_member_of_a_secure_consortium_is_excluded_by_the_norm_bound(tmp_path):
    """Without HostileCodec a secure attacker dealt its honest update (no share body goes
    on the wire): the selection never saw an attack."""
    spec = SimulationSpec(dataset="digits", nodes=5, partition="iid", rounds=2, seed=0,
                          out=tmp_path / "run", privacy="off", secure=True,
                          attacks=("scale:site-4",))
    summary = simulate(spec, console=None)
    seen = summary["attack"]["seen_by"]
    assert set(seen) == {"site-0", "site-1", "site-2", "site-3"}
    for by in seen.values():
        assert by["site-4"]["excluded"] == {"norm_too_large": 2}, by


def test_grid_rows_and_tables():
    args = bench_secure.argparse.Namespace(epsilon=3.0, attacker="site-1", robust_rounds=30,
                                           cost_rounds=4, tables="digits", seeds=2, rounds=30,
                                           by_kind=False)
    robust = bench_secure.grid_rows("robust", args)
    assert [r[0] for r in robust][:2] == ["multi-krum, no DP: clean",
                                          "multi-krum, no DP: sign-flip"]
    assert ["--attack", "label-flip:site-1"] == robust[-1][1][-2:]
    cost = bench_secure.grid_rows("cost", args)  # plain, secure, secure DP per size and n
    assert len(cost) == 3 * len(bench_secure.COST_MEMBERS) * len(bench_secure.COST_SIZES) == 24
    assert len(bench_secure.grid_rows("quality", args)) == 4
    row = {"honest": 0.9, "consortium": 0.9, "centralized": 0.95, "metric": "accuracy",
           "member_rounds_without_aggregate": 0, "member_rounds": 8, "epsilon": None,
           "wall_seconds": 1.0, "load_before": [1.0], "round_seconds": 0.5,
           "bytes_per_member_per_round": 1000.0, "rounds": 2}
    doc = {"grid": "robust", "rows": [
        {**row, "label": "m: clean"},
        {**row, "label": "m: scale", "honest": 0.85, "attacker_excluded": {"x": {"n": 1}}},
        {"label": "m: noise", "error": "timeout", "wall_seconds": 9.0, "load_before": [2.0]}]}
    text = bench_secure.table_text(doc)
    assert "| m: scale | 0.8500 | -0.0500 | NOT met |" in text and "FAILED: timeout" in text
    cost = {"grid": "cost", "rows": [{**row, "label": "cost n=8 5k: plain sealed"},
                                     {**row, "label": "cost n=8 5k: secure",
                                      "bytes_per_member_per_round": 2500.0}]}
    assert "| n=8 5k | secure | 0.500 | 2.5 | 2.50 | 1.00 |" in bench_secure.table_text(cost)
    json.dumps(doc)

"""`flnode simulate --secure` papercuts: the DP plan's rounds against --rounds, the
selection "sum" without DP, what the network simulator says about sealing."""

from __future__ import annotations

import pytest

from gossip.errors import LocalError
from node.rehearsal.simulation.scenario import build_spec

SECURE_DP = {"nodes": 5, "secure": True, "privacy": "record", "epsilon": 3.0}


def test_an_explicit_rounds_the_dp_plan_overrides_is_refused(tmp_path, capsys):
    """--rounds 4 with --secure --privacy record: the plan would run hundreds of rounds;
    refused (naming the plan's count) before anything is written, so --out stays usable."""
    from node.cli import main

    out = tmp_path / "run"
    argv = ["simulate", "--nodes", "5", "--secure", "--privacy", "record", "--epsilon", "3",
            "--out", str(out)]
    assert main([*argv, "--rounds", "4"]) == 2
    err = capsys.readouterr().err
    assert "--rounds 4" in err and "DP plan runs" in err and "leave out --rounds" in err
    assert not (out / "keys").exists() or not any((out / "keys").iterdir())
    sc = tmp_path / "s.toml"
    sc.write_text('members = 5\nsecure = true\nrounds = 4\n'
                  '[privacy]\nmode = "record"\nepsilon = 3.0\n')
    with pytest.raises(LocalError, match="scenario file's rounds"):
        from node.rehearsal.simulation.prepare import prepare

        prepare(build_spec(sc, {"out": tmp_path / "o2"}))


def test_without_rounds_the_plan_s_rounds_are_said_first(tmp_path):
    from node.rehearsal.simulation.prepare import prepare

    spec = build_spec(None, {**SECURE_DP, "out": tmp_path / "o"})
    assert not spec.rounds_given
    prep = prepare(spec)
    assert prep.rounds is not None and prep.rounds != spec.rounds
    assert f"DP plan runs {prep.rounds} rounds" in prep.notes[0]
    assert f"not --rounds' default {spec.rounds}" in prep.notes[0]
    # the plan's own count, given explicitly, is accepted
    again = build_spec(None, {**SECURE_DP, "rounds": prep.rounds, "out": tmp_path / "o3"})
    assert again.rounds_given and prepare(again).rounds == prep.rounds


def test_secure_select_sum_without_dp_from_the_file_and_the_flag(tmp_path, capsys):
    """secure_select = "sum" (open nothing but the sum) without DP: the scenario file and
    --secure-select reach the consortium's [rules]; a selection without secure, or a value
    the rules do not know, is refused naming the key."""
    from node.cli import build_parser
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.scenario import spec_from_args

    sc = tmp_path / "s.toml"
    sc.write_text('members = 5\nsecure = true\nsecure_select = "sum"\nrounds = 2\n')
    prep = prepare(build_spec(sc, {"out": tmp_path / "o"}))
    assert prep.consortium.rules["secure_select"] == "sum"
    assert prep.rounds is None  # no DP: --rounds stands
    args = build_parser().parse_args(["simulate", "--secure", "--secure-select", "sum",
                                      "--out", str(tmp_path / "o2")])
    assert spec_from_args(args).secure_select == "sum"
    with pytest.raises(LocalError, match="secure_select .* secure is not"):
        build_spec(None, {"secure_select": "sum", "out": tmp_path / "o3"})
    sc.write_text('secure = true\nsecure_select = "median"\n')
    with pytest.raises(LocalError, match="secure_select"):
        build_spec(sc, {"out": tmp_path / "o4"})


def test_secure_runs_record_and_say_sealed_as_their_nodes_do(tmp_path):
    """--secure over libp2p: every node's config says seal = on, and the spec's node_seal
    (what summary.json's "seal" and scripts/simulate_network.py's header use) agrees;
    --seal off with --secure is refused rather than overridden silently."""
    import tomllib

    from node.rehearsal.simulation.prepare import prepare
    from node.runtime.config import seals

    spec = build_spec(None, {"nodes": 5, "secure": True, "rounds": 1, "transport": "libp2p",
                             "out": tmp_path / "o"})
    prep = prepare(spec)
    for path in prep.config_paths:
        assert tomllib.loads(path.read_text())["gossip"]["seal"] == spec.node_seal == "on"
    assert seals(spec.node_seal, spec.transport)
    plain = build_spec(None, {"rounds": 1, "transport": "libp2p", "out": tmp_path / "p"})
    assert plain.node_seal == "auto" and not seals(plain.node_seal, plain.transport)
    with pytest.raises(LocalError, match="seal = off .* secure"):
        build_spec(None, {"secure": True, "seal": "off", "out": tmp_path / "q"})


def test_the_built_nodes_are_frozen_out_of_the_collector_while_they_run(tmp_path):
    """run_consortium freezes what exists once the nodes are built (gc.freeze: full
    collections skip it) and unfreezes when they end."""
    import asyncio
    import gc

    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.run import run_consortium

    spec = build_spec(None, {"nodes": 2, "rounds": 1, "model": "logreg",
                             "out": tmp_path / "o"})
    prep = prepare(spec)
    frozen: list[int] = []
    assert gc.get_freeze_count() == 0
    nodes = asyncio.run(run_consortium(spec, prep,
                                       lambda rep: frozen.append(gc.get_freeze_count())))
    assert len(nodes) == 2 and frozen and min(frozen) > 0
    assert gc.get_freeze_count() == 0

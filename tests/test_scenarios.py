"""Scenario files: one TOML reproduces a run; flags given on the command line override it;
an unknown key is refused, naming it and the file; relative paths are the file's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gossip.errors import LocalError
from node.cli import main as cli_main
from node.rehearsal.simulation.scenario import build_spec
from tests.test_data_dir import make_dir

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "network_configs" / "scenarios"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_shipped_scenarios_say_what_they_promise(tmp_path):
    banks = build_spec(SCENARIOS / "banks-4-default.toml", {"out": tmp_path / "a"})
    assert (banks.dataset, banks.nodes, banks.partition, banks.rounds) == \
        ("default", 4, "dirichlet:0.5", 30)
    assert (banks.privacy, banks.epsilon, banks.sigma, banks.delta) == ("record", 3.0, None, 1e-5)
    assert banks.transport == "memory" and banks.data_dir is None
    telecom = build_spec(SCENARIOS / "telecom-8-churn.toml", {"out": tmp_path / "b"},
                         network=True)
    assert (telecom.dataset, telecom.nodes, telecom.partition, telecom.privacy) == \
        ("churn", 8, "column:state", "off")
    assert telecom.transport == "libp2p"


def test_a_scenario_round_trip_with_a_flag_override(tmp_path, capsys):
    """Data dir, schema-less, relative paths (to the file); --rounds on the command line
    wins over the file's rounds; what ran is what summary.json says."""
    make_dir(tmp_path / "files" / "banks", test=True)
    sc = tmp_path / "sc" / "mine.toml"
    sc.parent.mkdir()
    sc.write_text('description = "three banks on their own files"\n'
                  'rounds = 3\nseed = 5\nout = "../runs/mine"\n'
                  '[data]\ndir = "../files/banks"\nlabel = "label"\n'
                  '[model]\nkind = "logreg"\nbatch_size = 64\n'
                  '[privacy]\nmode = "off"\n'
                  '[aggregation]\nrule = "mean"\n')
    assert cli_main(["simulate", str(sc), "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "mine"
    s = json.loads((run / "summary.json").read_text())
    assert s["rounds"] == 2 and len(s["history"]) == 2  # the flag won
    assert s["seed"] == 5 and s["model"] == "logreg"  # the file's
    assert s["aggregation"]["rule"] == "mean" and s["data_dir"] == str(tmp_path / "files" / "banks")
    assert s["common_test"] is True and set(s["own_rows"]) == {"bank-a", "bank-b", "bank-c"}
    node_cfg = (run / "nodes" / "bank-a.toml").read_text()
    assert "batch_size = 64" in node_cfg and 'kind = "logreg"' in node_cfg
    assert "round   2/2" in out
    # the same file again, the same flags, a new out: the same run
    assert cli_main(["simulate", str(sc), "--rounds", "2", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    for key in ("history", "own_rows", "consortium", "local_only", "centralized"):
        assert again[key] == s[key], key


def test_flags_replace_what_the_file_says(tmp_path):
    sc = tmp_path / "s.toml"
    sc.write_text('dataset = "digits"\nmembers = 5\nrounds = 7\nattacks = ["nan:site-1"]\n'
                  '[privacy]\nmode = "update"\nsigma = 0.5\n'
                  '[faults]\nloss = 0.1\nstragglers = { site-1 = 2.0 }\n')
    s = build_spec(sc, {"out": tmp_path / "o"})
    assert (s.nodes, s.rounds, s.sigma, s.epsilon, s.loss) == (5, 7, 0.5, None, 0.1)
    assert s.stragglers == (("site-1", 2.0),) and s.attacks == ("nan:site-1",)
    s = build_spec(sc, {"out": tmp_path / "o", "epsilon": 2.0, "rounds": 3})
    assert (s.epsilon, s.sigma, s.rounds) == (2.0, None, 3)  # the budget replaced whole
    data = make_dir(tmp_path / "d")
    s = build_spec(sc, {"out": tmp_path / "o", "data_dir": data})
    assert s.data_dir == data and s.source == "d" and s.nodes == 4  # the file's 5: dropped
    with pytest.raises(LocalError, match="--nodes does not apply with --data-dir"):
        build_spec(sc, {"out": tmp_path / "o", "data_dir": data, "nodes": 3})


@pytest.mark.parametrize("text, says", [
    ('rounds = 3\nround = 4\n', "unknown key 'round'"),
    ('[privacy]\nmode = "record"\nepsillon = 3\n', "unknown key 'privacy.epsillon'"),
    ('[faults]\nlos = 0.1\n', "unknown key 'faults.los'"),
    ('dataset = "default"\n[data]\ndir = "x"\n', "dataset (a built-in table) or [data]"),
    ('members = 3\n[data]\ndir = "x"\n', "members: does not apply with [data]"),
    ('rounds = 0\n', "rounds: Input should be greater than or equal to 1"),
    ('[privacy]\nepsilon = 3\nsigma = 1\n', "not both"),
    ('dataset = "mnist"\n', "dataset: Input should be"),
    ('rounds = [\n', "not valid TOML"),
])
def test_a_bad_scenario_is_refused_naming_the_key_and_the_file(tmp_path, text, says):
    sc = tmp_path / "bad.toml"
    sc.write_text(text)
    with pytest.raises(LocalError) as exc:
        build_spec(sc, {"out": tmp_path / "o"})
    assert says in str(exc.value) and str(sc) in str(exc.value)


def test_no_out_anywhere_is_refused(tmp_path, capsys):
    sc = tmp_path / "s.toml"
    sc.write_text("rounds = 2\n")
    assert cli_main(["simulate", str(sc)]) == 2
    assert "no run directory: give --out DIR" in capsys.readouterr().err


def test_help_says_flags_override_the_file():
    for argv in ([sys.executable, "-m", "node.cli", "simulate", "--help"],
                 [sys.executable, str(ROOT / "scripts" / "simulate_network.py"), "--help"]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        assert "flags given on the command line override the file's values" in text
        assert "--data-dir" in text and "--schema" in text


def test_network_script_takes_the_file_transport_and_its_own_defaults(tmp_path):
    """scripts/simulate_network.py: the file's transport; its own defaults (10 rounds,
    20 s deadline) under the file; the in-process simulator keeps the memory hub."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from node.rehearsal.simulation.scenario import spec_from_args
    from scripts.simulate_network import parse_args

    sc = tmp_path / "s.toml"
    sc.write_text('transport = "mqtt"\nmembers = 3\n')
    spec = spec_from_args(parse_args(["--scenario", str(sc), "--out", str(tmp_path / "o")]),
                          network=True)
    assert (spec.transport, spec.nodes, spec.rounds, spec.round_deadline_s) == ("mqtt", 3, 10, 20.0)
    spec = spec_from_args(parse_args(["--scenario", str(sc), "--out", str(tmp_path / "o"),
                                      "--transport", "libp2p", "--rounds", "4"]), network=True)
    assert (spec.transport, spec.rounds, spec.nodes) == ("libp2p", 4, 3)
    notes: list[str] = []
    spec = build_spec(sc, {"out": tmp_path / "o"}, notes=notes)
    assert spec.transport == "memory" and "applies to scripts/simulate_network.py" in notes[0]


def test_training_options_and_the_dp_recipe_come_from_the_file_and_the_flags(tmp_path):
    """lr_decay, control_variates ([model]) and recipe ([privacy]) reach the spec from a
    scenario file and from flags; a recipe without record-level DP is refused."""
    from node.rehearsal.simulation.scenario import build_spec

    sc = tmp_path / "s.toml"
    sc.write_text('out = "run"\n[model]\nlr_decay = 0.9\ncontrol_variates = true\n'
                  '[privacy]\nmode = "record"\nepsilon = 3.0\nrecipe = "auto"\n')
    spec = build_spec(sc, {})
    assert (spec.lr_decay, spec.control_variates, spec.recipe) == (0.9, True, "auto")
    assert build_spec(sc, {"recipe": "fixed", "lr_decay": 1.0}).recipe == "fixed"
    with pytest.raises(LocalError, match="recipe 'auto'.*--privacy record"):
        build_spec(sc, {"privacy": "update"})
    sc.write_text('out = "run"\n[model]\nlr_decay = 1.5\n')
    with pytest.raises(LocalError, match="lr_decay"):
        build_spec(sc, {})

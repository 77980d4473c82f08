"""`flnode simulate --model KIND` for every model kind, and dropout that repeats from --seed
in a simulation (node/learn/nets.py seed_dropout)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from node.cli import build_parser, main
from node.learn.nets import Dropout, deep_mlp, seed_dropout
from node.rehearsal.simulation.scenario import build_spec
from tests.model_kind_cases import PLUGIN_KIND, plugin_importable


@pytest.mark.parametrize("kind", ["logreg", "mlp", "deep_mlp", "res_mlp", PLUGIN_KIND])
def test_simulate_takes_every_kind_by_name(kind):
    args = build_parser().parse_args(["simulate", "--model", kind, "--out", "x"])
    assert args.model == kind


@pytest.mark.parametrize("kind", ["resnet", "os:system;rm", "a b:c", "pkg.mod:"])
def test_simulate_refuses_a_kind_that_is_none_naming_the_choices(kind, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--model", kind, "--out", "x"])
    err = capsys.readouterr().err
    assert "argument --model" in err and "choose one of logreg, mlp, deep_mlp, res_mlp" in err


def test_the_flag_kind_takes_the_scenario_files_options_it_has(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[model]\nkind = "deep_mlp"\nhidden = 16\ndepth = 3\nnorm = "group"\n'
                    'groups = 4\ndropout = 0.2\n')
    notes: list[str] = []
    spec = build_spec(path, {"out": tmp_path / "o", "model": "deep_mlp"}, notes=notes)
    assert (spec.model, spec.hidden, dict(spec.model_options)) == (
        "deep_mlp", 16, {"depth": 3, "norm": "group", "groups": 4, "dropout": 0.2})
    assert notes == []
    spec = build_spec(path, {"out": tmp_path / "o", "model": "res_mlp"}, notes=notes)
    assert (spec.model, dict(spec.model_options)) == (
        "res_mlp", {"norm": "group", "groups": 4, "dropout": 0.2})  # depth is deep_mlp's
    assert len(notes) == 1 and "depth are deep_mlp's, not res_mlp's" in notes[0]
    spec = build_spec(path, {"out": tmp_path / "o", "model": PLUGIN_KIND}, notes=notes)
    assert (spec.model, dict(spec.model_options)) == (PLUGIN_KIND, {})
    path.write_text(f'[model]\nkind = "{PLUGIN_KIND}"\n[model.options]\nwidth = 8\n')
    spec = build_spec(path, {"out": tmp_path / "o", "model": PLUGIN_KIND})
    assert dict(spec.model_options) == {"width": 8}
    spec = build_spec(path, {"out": tmp_path / "o", "model": "deep_mlp"})
    assert (spec.model, dict(spec.model_options)) == ("deep_mlp", {})


def test_a_seeded_dropout_repeats_and_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    a, b = deep_mlp(6, 2, hidden=8, depth=2, norm="none", dropout=0.5), None
    b = copy.deepcopy(a)
    assert seed_dropout(a, 7) == seed_dropout(b, 7) == 2
    x = torch.ones(16, 6)
    state = torch.random.get_rng_state()
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    assert torch.equal(torch.random.get_rng_state(), state)  # drawn from its own generator
    # a round trains a deep copy: it continues the member's stream, not round 0's again
    c = copy.deepcopy(a)
    assert c[2].generator is a[2].generator and isinstance(a[2], Dropout)
    assert not torch.equal(c(x), ya)
    a.eval()
    assert torch.equal(a(x), a(x))  # the identity in eval mode (what the exports run)


def test_seed_dropout_takes_a_plugins_plain_dropout_too():
    plugin_importable()
    from gated_mlp import build  # network_configs/examples/plugins

    net = build(6, 2, width=8, layers=2, dropout=0.3)
    assert any(type(m) is nn.Dropout for m in net.modules())
    assert seed_dropout(net, 1) == 2
    assert all(isinstance(m, Dropout) for m in net.modules() if isinstance(m, nn.Dropout))
    assert set(net.state_dict()) == set(build(6, 2, width=8, layers=2, dropout=0.3)
                                        .state_dict())  # the same parameters


def _simulate(out, scenario) -> dict:
    rc = main(["simulate", str(scenario), "--model", "deep_mlp", "--dataset", "default",
               "--nodes", "2", "--partition", "iid", "--rounds", "2", "--seed", "3",
               "--out", str(out)])
    assert rc == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # ~12 s: two in-process runs, 2 members, 2 rounds
def test_two_seeded_simulate_runs_with_dropout_give_the_same_metrics(tmp_path, monkeypatch):
    """Without seed_dropout the masks come from torch's global generator, which the first
    run advanced and the members' training threads share: the second run's metrics differ."""
    torch.set_num_threads(1)
    scenario = tmp_path / "s.toml"
    scenario.write_text('[model]\nkind = "deep_mlp"\nhidden = 16\ndepth = 2\ndropout = 0.5\n')
    first = _simulate(tmp_path / "a", scenario)
    second = _simulate(tmp_path / "b", scenario)
    assert first["model"] == "deep_mlp" and first["model_options"] == {"depth": 2,
                                                                       "dropout": 0.5}
    for key in ("history", "consortium", "centralized", "local_only", "own_rows", "pr_auc",
                "centralized_pr_auc"):
        assert first[key] == second[key], key


def test_simulate_refuses_a_plugin_it_cannot_import_naming_it(tmp_path, capsys):
    rc = main(["simulate", "--model", "no_such_plugin_mod:build", "--nodes", "2", "--rounds",
               "1", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "model.kind 'no_such_plugin_mod:build': cannot import 'no_such_plugin_mod'" in \
        capsys.readouterr().err


# ~15 s: a simulated run, two exports (torch's ONNX exporter), predict. The plug-in only,
# to spare the suite's time: it goes through the pin as every kind but logreg and mlp
# does; res_mlp (group norm, dropout) passed here too (44 s on a loaded machine), and
# tests/test_export_kinds.py checks every kind's export graph.
@pytest.mark.slow
@pytest.mark.parametrize("model", [
    f'[model]\nkind = "{PLUGIN_KIND}"\n[model.options]\nwidth = 8\nlayers = 1\ndropout = 0.2\n',
], ids=["plugin"])
def test_a_simulated_kind_exports_and_predicts_what_the_node_evaluates(model, tmp_path):
    """The whole path a member takes, for a kind beyond mlp (tests/test_export.py has the
    mlp's): `flnode simulate --model KIND` trains it, `flnode export` writes ONNX and
    TorchScript from bank-0's state dir, and `flnode predict` scores 1,000 of the node's
    held-out rows within 1e-5 of the node's own probabilities."""
    import pandas as pd

    from node.data.encode import encode
    from node.data.table import read_table
    from node.ops.export import load_member, reference
    from node.runtime.config import load_config
    from tests.test_export import TOL

    torch.set_num_threads(1)
    plugin_importable()
    scenario = tmp_path / "s.toml"
    scenario.write_text(model)
    kind = model.split('"')[1]
    sim = tmp_path / "sim"
    assert main(["simulate", str(scenario), "--model", kind, "--nodes", "2", "--rounds", "1",
                 "--partition", "iid", "--out", str(sim)]) == 0
    state = sim / "state" / "bank-0"
    member = load_member(state)
    cfg = load_config(sim / "nodes" / "bank-0.toml")
    held = read_table(cfg.data.eval_path)
    want = reference(member.network, encode(held, member.schema, "held-out")[0])[:1000]
    pd.read_parquet(cfg.data.eval_path).iloc[:1000].to_csv(tmp_path / "new.csv", index=False)
    for fmt in ("onnx", "torchscript"):
        assert main(["export", str(state), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
        manifest = json.loads((tmp_path / fmt / "manifest.json").read_text())
        assert manifest["model"]["kind"] == kind
        assert main(["predict", "--model", str(tmp_path / fmt), "--data",
                     str(tmp_path / "new.csv"), "--out", str(tmp_path / f"{fmt}.csv")]) == 0
        got = pd.read_csv(tmp_path / f"{fmt}.csv")[["p_No", "p_Yes"]].to_numpy()
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= TOL, fmt

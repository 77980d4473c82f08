"""The conformance suite every model kind passes (tests/model_kind_cases.py MODEL_KINDS:
the built-in kinds, the deeper ones with their options, and the example plug-in), and
the consortium's [model] pin: a member whose network differs is refused at start.

Per kind: it trains (the loss drops); DP-SGD runs through the engine the node picks for
it (`case.engine`: the closed-form fast path or Opacus' hooks) and really clips each
example's gradient (one step against torch.func's per-example gradients); two members'
parameters aggregate under the default rule; a checkpoint saved and restored gives the
same network. Tiny data: the whole parametrized suite takes seconds.
"""

from __future__ import annotations

import copy
import sys
import tomllib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gossip.errors import LocalError
from gossip.membership import load_consortium, save_consortium
from node.learn.dpsgd import dp_engine, train_local_dp_fast
from node.learn.kinds import compare, parameter_digest, read_pin
from node.learn.models import agreed_model, build_model, get_flat, parameter_shapes, pin_for, set_flat
from node.learn.train import evaluate, train_local, train_local_dp
from node.privacy.accountant import steps_per_epoch
from node.privacy.mechanisms import OsNoise, SeededNoise
from node.runtime.config import ModelConfig
from node.runtime.state import Checkpoint, StateDir
from node.strategy.consortium_rules import build_strategy, pin_rules, rules_table
from node.strategy.types import WeightedShare
from tests.helpers import consortium, keys
from tests.model_kind_cases import MODEL_KINDS, PLUGIN_KIND, KindCase, plugin_importable

torch.set_num_threads(1)

N_IN, N_OUT = 6, 2
ROOT = Path(__file__).resolve().parent.parent
GOLDEN_CONSORTIUM = ROOT / "tests" / "golden" / "consortium.toml"


def rows(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A separable table: the label is the sign of a linear score."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_IN)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] - 0.3 * X[:, 2] > 0).astype(np.int64)
    return X, y


@torch.no_grad()
def loss(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float(nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y)))


def without_dropout(model: nn.Module) -> nn.Module:
    """A copy whose dropout draws nothing: the engine's forward pass and the reference's
    would draw different masks; every other layer is unchanged."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def per_example_grads(model: nn.Module, X: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """(n, d): each example's gradient, in state_dict order, by torch.func (the oracle)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, t):
        out = functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(out, t[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, torch.from_numpy(X), torch.from_numpy(y))
    return torch.cat([g[k].reshape(len(X), -1) for k in model.state_dict()], 1)


IDS = [c.id for c in MODEL_KINDS]


# --- the conformance suite ---------------------------------------------------------------

@pytest.fixture(autouse=True)
def _seeded_dropout():
    """Dropout draws its masks from torch's global generator: seeded for each test, so a
    kind's loss and AUC checks do not depend on what earlier tests drew from it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.mark.parametrize("case", MODEL_KINDS, ids=IDS)
def test_every_kind_trains_and_its_loss_drops(case: KindCase):
    X, y = rows()
    model = case.build(N_IN, N_OUT)
    before = loss(model, X, y)
    train_local(model, X, y, epochs=10, batch_size=32, lr=0.2,
                generator=torch.Generator().manual_seed(0))
    after = loss(model, X, y)
    assert after < 0.5 * before, (case.id, before, after)
    assert evaluate(model, X, y)["roc_auc"] > 0.9


@pytest.mark.parametrize("case", MODEL_KINDS, ids=IDS)
def test_every_kind_clips_each_example_under_dp_sgd_in_the_engine_the_node_picks(case: KindCase):
    """One DP-SGD step through the node's engine for this kind (release.py dispatches
    with dp_engine), every row sampled (q = 1) and noise negligible (sigma 1e-9): the step
    is lr / n times the sum of the per-example gradients each clipped to C, as torch.func
    computes them; and not the unclipped sum (clipping binds for most rows)."""
    X, y = rows(64, seed=1)
    model = without_dropout(case.build(N_IN, N_OUT))
    assert dp_engine(model, "fast") == case.engine
    assert dp_engine(model, "functorch") == "functorch"  # a mode asked by name is kept
    g = per_example_grads(model, X, y)
    clip, lr, n = 0.05, 0.5, len(X)
    norms = g.norm(dim=1)
    assert (norms > clip).float().mean() > 0.5  # clipping binds
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped, plain = (g * factor[:, None]).sum(0), g.sum(0)
    start = get_flat(model)
    assert steps_per_epoch(n, n) == 1
    kwargs = dict(epochs=1, batch_size=n, lr=lr, clip_norm=clip, noise_multiplier=1e-9)
    if case.engine == "fast":
        history = train_local_dp_fast(model, X, y, **kwargs, noise=SeededNoise(0))
    else:
        history = train_local_dp(model, X, y, **kwargs, generator=torch.Generator().manual_seed(0),
                                 grad_sample_mode=case.engine)
    assert history == [(1e-9, 1.0, 1)]
    step = (start - get_flat(model)) * n / lr
    assert torch.allclose(step, clipped, rtol=1e-4, atol=1e-5), (step - clipped).abs().max()
    assert not torch.allclose(step, plain, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("case", MODEL_KINDS, ids=IDS)
def test_every_kind_trains_under_dp_sgd_with_real_noise(case: KindCase):
    """The node's engine over a few Poisson-sampled steps with sigma 1: the history the
    ledger charges, finite parameters that moved."""
    X, y = rows(128, seed=2)
    model = case.build(N_IN, N_OUT)
    start = get_flat(model)
    kwargs = dict(epochs=2, batch_size=32, lr=0.1, clip_norm=1.0, noise_multiplier=1.0)
    if dp_engine(model, "fast") == "fast":
        history = train_local_dp_fast(model, X, y, **kwargs, noise=SeededNoise(3))
    else:
        history = train_local_dp(model, X, y, **kwargs, generator=torch.Generator().manual_seed(3),
                                 grad_sample_mode="hooks")
    assert [(s, round(q, 6), k) for s, q, k in history] == [(1.0, 0.25, 8)]
    after = get_flat(model)
    assert torch.isfinite(after).all() and not torch.equal(after, start)
    # Opacus' hooks are gone: the network runs as before (node/learn/train.py _close)
    assert model(torch.zeros(1, N_IN)).shape == (1, N_OUT)


@pytest.mark.parametrize("case", MODEL_KINDS, ids=IDS)
def test_two_members_parameters_aggregate_under_the_default_rule(case: KindCase):
    X, y = rows(256, seed=4)
    start = case.build(N_IN, N_OUT)
    members = []
    for half in (slice(0, 128), slice(128, 256)):
        m = copy.deepcopy(start)
        train_local(m, X[half], y[half], epochs=10, batch_size=32, lr=0.2,
                    generator=torch.Generator().manual_seed(0))
        members.append(get_flat(m))
    cons = consortium(keys(2))
    cons = replace(cons, rules=pin_rules(rules_table(2), 2))
    agreed = build_strategy(cons, None, "off", 1.0)
    assert agreed.agreed and agreed.params["rule"] == "mean"
    out = agreed.strategy.aggregate(0, WeightedShare("bank-0", 1.0, members[0]),
                                    {"bank-1": WeightedShare("bank-1", 1.0, members[1])},
                                    reference=get_flat(start))
    assert set(out.used) == {"bank-0", "bank-1"}
    assert torch.allclose(out.vector.float(), (members[0] + members[1]) / 2, atol=1e-6)
    merged = case.build(N_IN, N_OUT)
    set_flat(merged, out.vector.float())
    assert evaluate(merged, X, y)["roc_auc"] > 0.9


@pytest.mark.parametrize("case", MODEL_KINDS, ids=IDS)
def test_a_checkpoint_saved_and_restored_gives_the_same_network(case: KindCase, tmp_path):
    """The checkpoint codec (node/runtime/state.py) as a restart uses it
    (node/runtime/checkpoint.py resume: build from the seed, then load the flat model)."""
    X, y = rows(128, seed=5)
    model = case.build(N_IN, N_OUT, seed=11)
    train_local(model, X, y, epochs=1, batch_size=32, lr=0.1,
                generator=torch.Generator().manual_seed(0))
    StateDir(tmp_path / "state").save_checkpoint(Checkpoint(
        next_round=3, model=get_flat(model).numpy().astype("<f4").tobytes(), seq=7))
    cp = StateDir(tmp_path / "state").load_checkpoint()
    assert cp is not None and cp.next_round == 3
    restarted = case.build(N_IN, N_OUT, seed=11)
    assert not torch.equal(get_flat(restarted), get_flat(model))
    set_flat(restarted, torch.from_numpy(np.frombuffer(cp.model, dtype="<f4").copy()))
    for (k, a), (k2, b) in zip(model.state_dict().items(), restarted.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)
    model.eval()
    restarted.eval()
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(X)), restarted(torch.from_numpy(X)))


@pytest.mark.parametrize("case", MODEL_KINDS, ids=IDS)
def test_every_kind_pins_and_builds_the_pinned_network(case: KindCase):
    model = case.build(N_IN, N_OUT)
    section = case.model_section()
    cfg = ModelConfig.model_validate(section)
    pin = pin_for(cfg.kind, cfg.resolved(), N_IN, N_OUT)
    kind, options, params = read_pin(pin, "c.toml")
    assert (kind, options) == (case.kind, cfg.resolved())
    assert params == parameter_shapes(model)
    assert pin["digest"] == parameter_digest(params)
    # the table survives TOML (what a consortium file holds)
    again = tomllib.loads(tomli_w.dumps({"model": pin}))["model"]
    built = agreed_model(cfg.kind, cfg.resolved(), True, again, N_IN, N_OUT, 0, "c.toml")
    assert parameter_shapes(built) == params
    # ... and a member with no [model] of its own builds the pinned one
    built = agreed_model("mlp", {"hidden": 64}, False, again, N_IN, N_OUT, 0, "c.toml")
    assert parameter_shapes(built) == params


# --- the consortium file's [model] table --------------------------------------------------

def test_a_consortium_file_without_model_keeps_its_id_and_bytes():
    """tests/golden/consortium.toml: no [model], the id it always had; what loading and
    saving write is the same file (no empty [model] table appears)."""
    c = load_consortium(GOLDEN_CONSORTIUM)
    assert c.model == {} and "model" not in c.digests()
    assert "model" not in c.to_toml_dict()
    assert tomllib.loads(GOLDEN_CONSORTIUM.read_text())["consortium"]["id"] == c.id.hex()


def test_the_model_table_enters_the_id_and_a_changed_table_is_detected(tmp_path):
    base = consortium(keys(2))
    pin = pin_for("deep_mlp", {"hidden": 8, "depth": 2, "norm": "layer", "dropout": 0.0}, 3, 2)
    pinned = replace(base, model=pin)
    assert pinned.id != base.id and "model" in pinned.digests()
    path = tmp_path / "c.toml"
    save_consortium(pinned, path)
    assert load_consortium(path).id == pinned.id
    doc = tomllib.loads(path.read_text())
    doc["model"]["options"]["dropout"] = 0.5  # edited after it was agreed
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(LocalError, match=r"rules \(and model\) hash to"):
        load_consortium(path)
    doc["model"]["options"]["dropout"] = float("nan")
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(LocalError, match="not a finite number"):
        load_consortium(path)


def test_a_pin_whose_digest_does_not_match_its_parameters_is_refused():
    pin = pin_for("mlp", {"hidden": 8}, 3, 2)
    pin["parameters"][0] = "0.weight 9x3"
    with pytest.raises(LocalError, match=r"\[model\]\.digest .* the table was edited"):
        read_pin(pin, "c.toml")


def test_a_built_network_that_differs_names_each_parameter_with_both_shapes():
    agreed = [("0.weight", (16, 6)), ("0.bias", (16,)), ("2.weight", (2, 16))]
    built = [("0.weight", (8, 6)), ("0.bias", (8,)), ("2.weight", (2, 8)), ("extra", ())]
    with pytest.raises(LocalError) as err:
        compare(agreed, built, "x:y", "c.toml")
    text = str(err.value)
    for part in ("0.weight: agreed shape 16x6, built 8x6", "0.bias: agreed shape 16, built 8",
                 "2.weight: agreed shape 2x16, built 2x8", "extra: built scalar, not agreed"):
        assert part in text
    with pytest.raises(LocalError, match="another order"):
        compare(agreed, agreed[::-1], "x:y", "c.toml")
    compare(agreed, list(agreed), "x:y", "c.toml")  # the same: no error


# --- options and plug-ins: bad input is a named error --------------------------------------

@pytest.mark.parametrize("section, key", [
    ({"kind": "resnet"}, "model.kind"),
    ({"kind": "os.system"}, "model.kind"),  # not package.module:factory
    ({"kind": "a.b:c; rm -rf"}, "model.kind"),
    ({"kind": "deep_mlp", "norm": "batch"}, "BatchNorm mixes the examples"),
    ({"kind": "deep_mlp", "norm": "instance"}, "norm = 'instance'"),
    ({"kind": "deep_mlp", "depth": 0}, "depth = 0"),
    ({"kind": "deep_mlp", "depth": 1000}, "depth = 1000"),
    ({"kind": "deep_mlp", "dropout": 1.0}, "dropout = 1.0"),
    ({"kind": "res_mlp", "norm": "group", "groups": 5}, "groups = 5 does not divide hidden = 64"),
    ({"kind": "res_mlp", "groups": 4}, "groups: only with norm = \"group\""),
    ({"kind": "mlp", "depth": 3}, "depth: an option of deep_mlp, not of mlp"),
    ({"kind": "res_mlp", "depth": 3}, "depth: an option of deep_mlp, not of res_mlp"),
    ({"kind": "mlp", "options": {"x": 1}}, "[model.options] is a plug-in's"),
    ({"kind": "a.b:c", "hidden": 8}, "hidden: a plug-in takes its options"),
    ({"kind": "a.b:c", "options": {"x": [[1]]}}, "options.x[0]: nested"),
    ({"kind": "deep_mlp", "depth": "3"}, "model.depth"),
    ({"kind": "deep_mlp", "depth": True}, "depth = true: expected a number"),
])
def test_bad_model_options_are_named_errors(tmp_path, section, key):
    from node.ops.model_pin import model_section

    path = tmp_path / "m.toml"
    path.write_text(tomli_w.dumps({"model": section}))
    with pytest.raises(LocalError) as err:
        model_section(path)
    assert key in str(err.value) and str(path) in str(err.value)


def _plugin(tmp_path: Path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text("import torch\nfrom torch import nn\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return f"{name}:build"


@pytest.mark.parametrize("body, match", [
    ("def build(n_in, n_out):\n    return nn.Sequential(nn.Linear(n_in, 4), nn.BatchNorm1d(4),"
     " nn.Linear(4, n_out))\n", "BatchNorm1d: running statistics"),
    ("class M(nn.Module):\n    def __init__(s, a, b):\n        super().__init__()\n"
     "        s.l = nn.Linear(a, b)\n        s.register_buffer('seen', torch.zeros(1))\n"
     "    def forward(s, x):\n        return s.l(x)\n"
     "def build(n_in, n_out):\n    return M(n_in, n_out)\n", "not parameters of their own \\(seen\\)"),
    ("def build(n_in, n_out):\n    return nn.Linear(n_in, n_out + 1)\n",
     "gives \\(2, 3\\), expected logits of shape \\(2, 2\\)"),
    ("def build(n_in, n_out):\n    return nn.Linear(n_in, n_out).double()\n", "torch.float64"),
    ("def build(n_in, n_out):\n    return 'a model'\n", "returned a str, not a torch.nn.Module"),
    ("def build(n_in, n_out):\n    raise RuntimeError('no GPU')\n", "raised RuntimeError: no GPU"),
    ("def build(n_in, n_out, *, width=4):\n    return nn.Linear(n_in, n_out)\n",
     "refused its arguments"),
    ("build = 3\n", "has no callable 'build'"),
    ("class M(nn.Module):\n    def __init__(s, a, b):\n        super().__init__()\n"
     "        s.l = nn.Linear(a, b)\n        s.w = nn.Parameter(torch.zeros([1] * 9))\n"
     "    def forward(s, x):\n        return s.l(x) + s.w.sum()\n"
     "def build(n_in, n_out):\n    return M(n_in, n_out)\n", "9 dimensions"),
    ("raise ImportError('broken')\n", "cannot import"),
])
def test_a_plugin_flnode_cannot_train_is_refused_naming_why(tmp_path, monkeypatch, body, match):
    kind = _plugin(tmp_path, monkeypatch, f"plug_{abs(hash(body)) % 10**8}", body)
    with pytest.raises(LocalError, match=match) as err:
        build_model(kind, 3, 2, options={"colour": "red"} if "width" in body else None)
    assert kind in str(err.value)


def test_a_plugin_module_that_is_not_installed_is_a_named_error():
    with pytest.raises(LocalError, match="cannot import 'no_such_plugin_xyz.nets'.*PYTHONPATH"):
        build_model("no_such_plugin_xyz.nets:build", 3, 2)


# --- at a node's start: the consortium's pin against what this member builds -------------

def _prepared(tmp_path: Path, kind: str, options: dict, hidden: int = 64):
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec

    return prepare(SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=1, seed=0,
                                  out=tmp_path / "run", model=kind, hidden=hidden,
                                  model_options=options))


GATED_V1 = ("def build(n_in, n_out, *, width=16):\n"
            "    return nn.Sequential(nn.Linear(n_in, width), nn.LayerNorm(width), nn.ReLU(),"
            " nn.Linear(width, n_out))\n")


def test_a_member_whose_plugin_builds_another_network_is_refused_at_start(tmp_path, monkeypatch):
    """Both members' configs say the same kind and options; member 1 has another version of
    the plug-in installed (its hidden layer is 8 wide, not 16): refused at start, naming
    each parameter with the agreed and the built shape, before anything is released."""
    from node.runtime.build import build_parts
    from node.runtime.config import load_config

    kind = _plugin(tmp_path, monkeypatch, "plug_versions", GATED_V1)
    prep = _prepared(tmp_path, kind, {"width": 16})
    pinned = load_consortium(prep.config_paths[0].parent.parent / "consortium.toml").model
    assert pinned["kind"] == kind and pinned["options"] == {"width": 16}
    assert "0.weight 16x" in " ".join(pinned["parameters"])
    parts = build_parts(load_config(prep.config_paths[0]), Counter(), OsNoise())  # v1: starts
    assert parameter_shapes(parts.model)[0] == ("0.weight", (16, prep.schema.n_features))
    # member 1's plug-in: another version, same name, same options
    (tmp_path / "plug_versions.py").write_text(
        "import torch\nfrom torch import nn\n" + GATED_V1.replace("width)", "width // 2)")
        .replace("(width, n_out)", "(width // 2, n_out)"))
    monkeypatch.delitem(sys.modules, "plug_versions")
    cfg = load_config(prep.config_paths[1])
    with pytest.raises(LocalError) as err:
        build_parts(cfg, Counter(), OsNoise())
    text = str(err.value)
    n = prep.schema.n_features
    assert f"0.weight: agreed shape 16x{n}, built 8x{n}" in text
    assert "1.weight: agreed shape 16, built 8" in text
    assert "3.weight: agreed shape 2x16, built 2x8" in text
    assert not cfg.state_dir.exists()  # refused before its state dir or ledger exist


def test_a_node_config_contradicting_the_pinned_model_is_refused(tmp_path):
    """layer and group norm have the same shapes: the options are pinned too."""
    from node.runtime.build import build_parts
    from node.runtime.config import load_config

    prep = _prepared(tmp_path, "deep_mlp", {"depth": 2}, hidden=16)
    path = prep.config_paths[0]
    doc = tomllib.loads(path.read_text())
    assert doc["model"] == {"kind": "deep_mlp", "hidden": 16, "depth": 2}
    doc["model"].update(norm="group", groups=4)
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(LocalError, match="this node's config says kind 'deep_mlp' with .*'group'"
                                         ".* but the consortium agreed 'deep_mlp' with"):
        build_parts(load_config(path), Counter(), OsNoise())
    del doc["model"]  # no [model] of its own: the consortium's is built
    path.write_text(tomli_w.dumps(doc))
    parts = build_parts(load_config(path), Counter(), OsNoise())
    assert isinstance(parts.model[1], nn.LayerNorm) and len(parts.model) == 7


def test_model_pin_writes_the_table_and_a_member_without_its_own_model_builds_it(tmp_path,
                                                                                 capsys):
    from node.ops.model_pin import main
    from node.runtime.build import build_parts
    from node.runtime.config import load_config

    plugin_importable()
    prep = _prepared(tmp_path, "mlp", {}, hidden=8)
    path = tmp_path / "run" / "consortium.toml"
    before = load_consortium(path).id
    snippet = ROOT / "network_configs/examples/model-plugin.toml"
    assert main([str(path), "--model", str(snippet)]) == 0  # prints, writes nothing
    assert 'kind = "gated_mlp:build"' in capsys.readouterr().out
    assert load_consortium(path).id == before
    assert main([str(path), "--model", str(snippet), "--write"]) == 0
    assert f"{before.hex()} -> " in capsys.readouterr().out
    pinned = load_consortium(path)
    assert pinned.id != before and pinned.model["kind"] == PLUGIN_KIND
    config = prep.config_paths[0]
    doc = tomllib.loads(config.read_text())
    with pytest.raises(LocalError, match="this node's config says kind 'mlp'"):
        build_parts(load_config(config), Counter(), OsNoise())
    del doc["model"]
    config.write_text(tomli_w.dumps(doc))
    parts = build_parts(load_config(config), Counter(), OsNoise())
    assert [n for n, _ in parameter_shapes(parts.model)][:2] == ["blocks.0.norm.weight",
                                                                 "blocks.0.norm.bias"]
    assert main([str(path), "--model", str(tmp_path / "none.toml")]) == 2
    assert "cannot read model file" in capsys.readouterr().err


def test_legacy_kinds_are_not_pinned_so_simulated_runs_keep_their_ids(tmp_path):
    prep = _prepared(tmp_path, "mlp", {}, hidden=8)
    assert prep.consortium.model == {}


# --- flnode simulate -------------------------------------------------------------------

def test_a_scenario_file_takes_every_kind_and_names_a_bad_option(tmp_path):
    from node.rehearsal.simulation.scenario import read_scenario

    path = tmp_path / "s.toml"
    path.write_text('[model]\nkind = "res_mlp"\nhidden = 16\nblocks = 3\ndropout = 0.1\n')
    fields, _ = read_scenario(path)
    assert fields["model"] == "res_mlp" and fields["model_options"] == {"blocks": 3,
                                                                         "dropout": 0.1}
    path.write_text(f'[model]\nkind = "{PLUGIN_KIND}"\n[model.options]\nwidth = 8\n')
    fields, _ = read_scenario(path)
    assert fields["model"] == PLUGIN_KIND and fields["model_options"] == {"width": 8}
    from node.rehearsal.simulation.scenario import build_spec

    path.write_text('[model]\nkind = "res_mlp"\nhidden = 16\nblocks = 3\n')
    spec = build_spec(path, {"out": tmp_path / "o"})
    assert (spec.model, spec.hidden, spec.model_options) == ("res_mlp", 16, {"blocks": 3})
    spec = build_spec(path, {"out": tmp_path / "o", "model": "mlp"})  # --model mlp
    assert (spec.model, spec.model_options) == ("mlp", {})  # the file's options were res_mlp's
    path.write_text('[model]\nkind = "res_mlp"\ndepth = 3\n')
    with pytest.raises(LocalError, match="s.toml: model: depth: an option of deep_mlp"):
        read_scenario(path)
    path.write_text('[model]\nkind = "resnet"\n')
    with pytest.raises(LocalError, match="'resnet': choose one of"):
        read_scenario(path)


@pytest.mark.slow  # ~10 s: two real nodes, two rounds, Opacus
def test_simulate_trains_a_pinned_res_mlp_under_record_dp_through_opacus(tmp_path, caplog):
    """The real node (in process): a consortium pinned to res_mlp, record-level DP; the
    node says at start that DP-SGD goes through Opacus, and every member finishes."""
    import logging

    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec

    caplog.set_level(logging.INFO, logger="flnode")
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=2, seed=0,
                          out=tmp_path / "run", model="res_mlp", hidden=16,
                          model_options={"blocks": 1}, privacy="record", sigma=1.0,
                          batch_size=256)
    summary = simulate(spec)
    assert summary["model"] == "res_mlp" and summary["model_options"] == {"blocks": 1}
    assert "model" in load_consortium(tmp_path / "run" / "consortium.toml").digests()
    assert "DP-SGD through Opacus (hooks)" in caplog.text
    assert summary["rounds_done"] == {"bank-0": 2, "bank-1": 2}
    assert summary["rejected"] == {}  # every share had the agreed shapes
    assert all(0 < e < float("inf") for e in summary["epsilon"]["per_node"].values())
    assert all(0 <= v <= 1 for v in summary["consortium"]["per_node"].values())


def test_model_kind_cases_cover_every_builtin_kind_and_the_example_plugin():
    from node.learn.kinds import BUILTIN_KINDS

    plugin_importable()
    assert {c.kind for c in MODEL_KINDS} == {*BUILTIN_KINDS, PLUGIN_KIND}
    # the example config snippet is the plug-in case's [model]
    doc = tomllib.loads((ROOT / "network_configs/examples/model-plugin.toml").read_text())
    assert doc["model"]["kind"] == PLUGIN_KIND
    build_model(PLUGIN_KIND, N_IN, N_OUT, options=doc["model"]["options"])

"""The signed model card (node/ops/model_card.py) and `flnode verify` (node/ops/model_verify.py).

A real export of the golden unfinished run (tests/golden/resume: telco-0, logreg, record-level
DP, its TEST keys) is attacked: weights, manifest and card changed; a card re-signed with
the other member's real key; a card re-signed by the member itself over a wrong parameter
digest; a hostile audit log at export. The card's ε is compared with the accountant's value
from the ledger."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from gossip.errors import LocalError
from node.cli import main as cli
from node.ops import export_onnx, model_card
from node.ops.export import export, model_digest, preprocessing
from node.ops.model_verify import VerifyError, onnx_initializers, verify, weights_digest
from node.privacy.accountant import epsilon_of
from node.privacy.budget import PrivacyPlan
from node.privacy.ledger import Ledger
from node.runtime.identity import load_identity
from tests.golden import make_golden as G
from tests.model_kind_cases import MODEL_KINDS
from tests.test_export import MIXED

MEMBER = "telco-0"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One ONNX export of the golden run's telco-0 (the run beside it: keys, consortium)."""
    torch.set_num_threads(1)
    run = G.copy_resume(tmp_path_factory.mktemp("card") / "run")
    export(run / "state" / MEMBER, run / "onnx")
    return run


@pytest.fixture
def run(exported, tmp_path) -> Path:
    """A copy of the run and its export that a test may damage."""
    dest = tmp_path / "run"
    shutil.copytree(exported, dest)
    for key in (dest / "keys").glob("*.key"):
        key.chmod(0o600)
    return dest


def card_doc(model: Path) -> dict:
    return json.loads((model / "model_card.json").read_text())


def write_card(model: Path, doc: dict) -> None:
    (model / "model_card.json").write_text(json.dumps(doc))


def reason(model: Path, consortium: Path | None = None) -> str:
    with pytest.raises(VerifyError) as exc:
        verify(model, consortium)
    return exc.value.reason


def test_an_untouched_export_verifies_and_the_card_says_what_the_state_dir_holds(run):
    model, cons = run / "onnx", run / "consortium.toml"
    v = verify(model, cons)
    assert (v.member, v.files) == (MEMBER, ["model.onnx"])
    assert v.warnings == []  # the key came from the consortium file
    manifest = json.loads((model / "manifest.json").read_text())
    card = card_doc(model)["card"]
    assert card["parameters"]["digest"] == manifest["model"]["digest"] == v.parameter_digest
    assert card["consortium"]["id"] == manifest["consortium"]["id"]
    assert [m["name"] for m in card["consortium"]["members"]] == ["telco-0", "telco-1"]
    assert card["rounds"] == {"completed": 1, "planned": 2, "finished": False}
    # the audit log's Aggregate line of round 0 (printed 1-based)
    assert card["shares_used"]["rounds"] == [
        {"round": 1, "rule": "mean", "used": ["telco-0", "telco-1"], "excluded": {}}]
    assert card["aggregation"]["rules"]["aggregation"] == "mean"
    assert card["aggregation"]["topology"] == "full mesh"
    assert card["evaluation"]["metrics"]["roc_auc"] == pytest.approx(0.7128609053905663)
    assert card["evaluation"]["rows"] == 1000
    others = card["privacy"]["others"]
    assert list(others) == ["telco-1"] and others["telco-1"]["epsilon"] is None
    # without --consortium: the card's own key, with the warning that it proves no origin
    v = verify(model)
    assert "not that 'telco-0' signed them" in v.warnings[0]


def test_the_cards_epsilon_is_the_accountants_from_the_ledger(run):
    own = card_doc(run / "onnx")["card"]["privacy"]["own"]
    state = run / "state" / MEMBER
    plan = PrivacyPlan.load(state / "privacy_plan.json")
    records = Ledger(state / "ledger.jsonl").records
    assert len(records) == own["releases"] == 3
    assert own["delta"] == plan.delta
    assert own["epsilon"] == epsilon_of(records, plan.delta)  # exact: the same arithmetic
    # the model is after round 1: the round-2 release (charged, not sent) is not in it
    assert own["epsilon_model_rounds"] == epsilon_of([r for r in records if r.round < 1],
                                                     plan.delta) < own["epsilon"]
    assert 0 < own["epsilon"] <= plan.epsilon


def test_a_tampered_weight_file_fails_verify(run):
    model = run / "onnx"
    data = bytearray((model / "model.onnx").read_bytes())
    data[-20] ^= 1
    (model / "model.onnx").write_bytes(bytes(data))
    assert reason(model, run / "consortium.toml") == "file_digest"
    assert reason(model) == "file_digest"
    # the forger updates the manifest's SHA-256 too: the card signed the old manifest
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert reason(model) == "manifest_digest"
    # and the card's manifest digest: the signature no longer covers the card
    doc = card_doc(model)
    doc["card"]["manifest"]["sha256"] = hashlib.sha256(
        (model / "manifest.json").read_bytes()).hexdigest()
    write_card(model, doc)
    assert reason(model) == "bad_signature"
    # the CLI: non-zero, the reason named
    assert cli(["verify", str(model)]) == 1


@pytest.mark.parametrize("field,value", [
    (("privacy", "own", "epsilon"), 0.1),
    (("shares_used", "rounds"), []),
    (("evaluation", "metrics", "roc_auc"), 0.99),
    (("member",), "telco-1"),
])
def test_a_tampered_card_field_fails_verify(run, field, value, capsys):
    model = run / "onnx"
    doc = card_doc(model)
    at = doc["card"]
    for k in field[:-1]:
        at = at[k]
    at[field[-1]] = value
    if field == ("member",):
        doc["signature"]["signer"] = value
    write_card(model, doc)
    assert reason(model, run / "consortium.toml") == "bad_signature"
    assert reason(model) == "bad_signature"
    assert cli(["verify", str(model), "--consortium", str(run / "consortium.toml")]) == 1
    assert "verify failed (bad_signature)" in capsys.readouterr().err


def test_a_card_signed_by_another_members_real_key_fails_with_the_consortium_file(run):
    model, cons = run / "onnx", run / "consortium.toml"
    other = load_identity(run / "keys" / "telco-1.key")  # a real member's key
    doc = card_doc(model)
    forged = model_card.sign(doc["card"], other)  # still says member telco-0
    forged["signature"]["signer"] = MEMBER
    write_card(model, forged)
    assert reason(model, cons) == "bad_signature"
    # without the consortium file it "verifies" -- with the key it declares, and the
    # warning that this proves no origin: the reason --consortium exists
    v = verify(model)
    assert v.fingerprint == other.fingerprint and v.warnings
    # a card signed by a key in no consortium entry for its signer's name
    card = dict(doc["card"], member="mallory")
    forged = model_card.sign(card, other)
    forged["signature"]["signer"] = "mallory"
    write_card(model, forged)
    assert reason(model, cons) == "signer_unknown"


def test_a_card_the_member_signed_over_other_weights_fails_on_the_parameter_digest(run):
    """The member's own key, a valid signature, but the digest is not the weights'."""
    model, cons = run / "onnx", run / "consortium.toml"
    me = load_identity(run / "keys" / f"{MEMBER}.key")
    card = card_doc(model)["card"]
    card["parameters"]["digest"] = "00" * 32
    write_card(model, model_card.sign(card, me))
    assert reason(model, cons) == "parameter_digest"


def test_hostile_card_files_are_named(run):
    model = run / "onnx"
    (model / "model_card.json").write_bytes(b"[1, 2]")
    assert reason(model) == "card_unreadable"
    (model / "model_card.json").write_bytes(b"{" * 10_000_000)
    assert reason(model) == "card_unreadable"  # over the size bound: never parsed
    (model / "model_card.json").unlink()
    assert reason(model) == "card_missing"


@pytest.mark.parametrize("line,match", [
    (b'{"outcome": "aggregate", "round": 0, "used": "telco-0", "rule": "mean"}\n',
     r"audit log .*audit.jsonl: line 7: field 'used' is 'telco-0', not a list of member names"),
    (b'{"outcome": "aggregate", "round": "0", "used": [], "rule": "mean"}\n',
     r"line 7: field 'round' is '0', not a round number"),
    (b'{"outcome": "aggregate", "round": 0, "used": [], "rule": "mean", "pad": "'
     + b"x" * (2 << 20) + b'"}\n', r"line 7 is over 1048576 bytes"),
    (b"not json\n", r"line 7 is not JSON"),
    (b"[1]\n", r"line 7 is list, not a JSON object"),
])
def test_a_hostile_audit_log_is_a_named_error_at_export(line, match, tmp_path):
    run = G.copy_resume(tmp_path / "run")
    state = run / "state" / MEMBER
    with open(state / "audit.jsonl", "ab") as f:
        f.write(line + b'{"outcome": "aggregate", "round": 0, "used": [], "rule": "mean"}\n')
    with pytest.raises(LocalError, match=match):
        export(state, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_state_dict_and_torchscript_exports_verify_from_their_weights(run, tmp_path):
    state, cons = run / "state" / MEMBER, run / "consortium.toml"
    for fmt in ("state_dict", "torchscript"):
        export(state, tmp_path / fmt, fmt)
        v = verify(tmp_path / fmt, cons)
        assert v.parameter_digest == card_doc(run / "onnx")["card"]["parameters"]["digest"]
    weights = tmp_path / "state_dict" / "weights.pt"
    w = torch.load(weights, weights_only=True)
    w["bias"] += 1.0
    torch.save(w, weights)
    assert reason(tmp_path / "state_dict", cons) == "file_digest"


def test_onnx_initializers_merged_by_the_optimizer_are_found():
    """An untrained deep_mlp's LayerNorms hold identical weights: torch's ONNX optimizer
    keeps one initializer for them; the card names it, and the digest is the network's."""
    case = next(c for c in MODEL_KINDS if c.id == "deep_mlp")
    schema = MIXED.for_encoding()
    net = case.build(schema.n_features, schema.n_classes)
    net.eval()
    with tempfile.TemporaryDirectory() as d:
        files = export_onnx.write(net, preprocessing(schema), Path(d))
        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        where = onnx_initializers(Path(d) / files[0], state)
        assert any(v != "net/" + k for k, v in where.items())  # some were merged
        manifest = {"format": "onnx", "files": [{"path": files[0]}],
                    "model": {"shapes": {k: list(v.shape) for k, v in state.items()}}}
        params = {"onnx_initializers": where, "order": list(state)}
        assert weights_digest(Path(d), manifest, params) == model_digest(net)


def test_report_html_shows_the_exports_signed_card_else_the_state_dirs_data(tmp_path):
    from node.ops.report_member import write_member_report

    run = G.copy_resume(tmp_path / "run")
    state = run / "state" / MEMBER
    html, doc = write_member_report(state, tmp_path / "before.html")
    text = html.read_text()
    assert "<h2>Model card</h2>" in text and "none: no export of this member found" in text
    assert json.loads(doc.read_text())["model_card"]["signed"] is False
    export(state, tmp_path / "m", "state_dict")
    html, doc = write_member_report(state, tmp_path / "after.html")
    card = json.loads(doc.read_text())["model_card"]
    assert card["signed"] is True and card["card"] == card_doc(tmp_path / "m")["card"]
    assert "valid, by telco-0" in html.read_text()
    # the card changed after the export: not shown as signed, and said why
    doc2 = card_doc(tmp_path / "m")
    doc2["card"]["privacy"]["own"]["epsilon"] = 0.01
    write_card(tmp_path / "m", doc2)
    html, doc = write_member_report(state, tmp_path / "later.html")
    assert json.loads(doc.read_text())["model_card"]["signed"] is False
    assert "changed since the export wrote it" in html.read_text()


def test_an_identity_key_that_is_not_the_members_entry_is_refused_at_export(tmp_path):
    from node.runtime.identity import Identity, save_identity

    run = G.copy_resume(tmp_path / "run")
    (run / "keys" / "telco-0.key").unlink()
    (run / "keys" / "telco-0.pub").unlink()
    save_identity(Identity.generate("telco-0"), run / "keys")  # same name, another key
    with pytest.raises(LocalError, match=r"telco-0.key \(telco-0, ed25519:.*\) is not a "
                                         r"member's key in the consortium file"):
        export(run / "state" / MEMBER, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shares_used_follow_rotation_name_exclusions_and_never_guess_a_round(tmp_path):
    def agg(r: int, used: list[str], excluded: dict) -> str:
        return json.dumps({"outcome": "aggregate", "round": r, "rule": "trimmed_mean",
                           "used": used, "excluded": excluded}) + "\n"

    (tmp_path / "audit.jsonl.1").write_text(
        agg(0, ["a", "b", "c"], {}) + '{"outcome": "accepted", "round": 0}\n')
    (tmp_path / "audit.jsonl").write_text(
        agg(1, ["a", "c"], {"b": {"reason": "far", "detail": "x" * 500}})
        + agg(3, ["a"], {})  # after the model's rounds: not in this model
        + '{"outcome": "aggregate", "round": 4, "used": [')  # torn last line: skipped
    got = model_card.shares_used(tmp_path, rounds=3)
    assert got["rounds"] == [
        {"round": 1, "rule": "trimmed_mean", "used": ["a", "b", "c"], "excluded": {}},
        {"round": 2, "rule": "trimmed_mean", "used": ["a", "c"], "excluded": {"b": "far"}}]
    assert got["not_in_audit_log"] == [3] and "not guessed" in got["note"]


def test_a_hostile_metrics_log_is_a_named_error_at_export(tmp_path):
    run = G.copy_resume(tmp_path / "run")
    state = run / "state" / MEMBER
    with open(state / "metrics.jsonl", "ab") as f:
        f.write(b'{"round": 0, "metrics": {"accuracy": "high"}, "eval_rows": 10}\n')
    with pytest.raises(LocalError, match=r"metrics log .*metrics.jsonl: line 2: field 'metrics' "
                                         r"is .*, not a table of numbers"):
        export(state, tmp_path / "out")

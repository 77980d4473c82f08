"""Golden contracts (issue 21, step 0): bytes and files deployed nodes and operators hold.

Each test compares today's code with files written once by tests/golden/make_golden.py.
A failure here means a contract moved: the wire format, the consortium id, the
checkpoint or privacy files a restart must read, or the CLI's help. If that is on
purpose, regenerate with make_golden.py and say so in the commit message; if not, the
change breaks deployed nodes. Pure: no network, no broker, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from gossip import bodies as B
from gossip import envelope as E
from gossip.membership import load_consortium
from gossip.seal import Sealing, decode_announcement
from node.privacy.accountant import epsilon_of
from node.privacy.budget import PrivacyPlan
from node.privacy.calibrate import plan_history
from node.privacy.ledger import Ledger
from node.runtime.config import load_config
from node.runtime.identity import load_identity
from node.runtime.state import (
    CHECKPOINT_KEYS,
    CHECKPOINT_OPTIONAL_KEYS,
    Checkpoint,
    StateDir,
    decode_checkpoint,
)
from tests.golden import make_golden as G

GOLDEN = Path(__file__).parent / "golden"
WIRE = json.loads((GOLDEN / "wire.json").read_text())
RUN = json.loads((GOLDEN / "run.json").read_text())
STATE = GOLDEN / "run" / "state" / "telco-0"


def _keys() -> dict[str, SigningKey]:
    return {n: SigningKey(bytes.fromhex(s)) for n, s in WIRE["seeds"].items()}


def _members() -> dict[bytes, str]:
    return {bytes(k.verify_key): n for n, k in _keys().items()}


def _spec() -> list[B.TensorSpec]:
    return [B.TensorSpec(n, a.shape, a.dtype.str) for n, a in G.share_tensors()]


def _verifier(sealing: Sealing | None = None, secure: bool = False) -> E.Verifier:
    alice = _keys()["alice"]
    return E.Verifier(bytes.fromhex(WIRE["consortium_id"]), _members(), bytes(alice.verify_key),
                      _spec(), sealing=sealing, stats_columns=G.STATS_COLUMNS, secure=secure)


def _alice_sealing() -> Sealing:
    """Alice's sealing state holding the stored private prekey the golden share is sealed to."""
    s = Sealing(bytes.fromhex(WIRE["consortium_id"]), _keys()["alice"], _members(),
                rotate_every=G.ROTATE_EVERY, lookahead=0)
    s.own.keys[WIRE["round"]] = PrivateKey(bytes.fromhex(WIRE["alice_prekey_private"]))
    return s


# --- wire ----------------------------------------------------------------------------

def test_the_list_of_message_kinds_is_frozen():
    """A new kind must get a golden envelope (make_golden.bodies) and a conscious update."""
    assert sorted(E.KINDS) == WIRE["kinds"]
    assert sorted(WIRE["envelopes"]) == WIRE["kinds"]


@pytest.mark.parametrize("kind", sorted(WIRE["envelopes"]))
def test_envelope_of_every_kind_is_byte_exact(kind):
    golden = WIRE["envelopes"][kind]
    body = bytes.fromhex(golden["body"])
    sealed = bytes.fromhex(WIRE["sealed_body"])
    if kind not in (E.KIND_SEALED, E.KIND_DEAL):  # sealed bodies are random: stored
        assert G.bodies(sealed)[kind] == body, f"today's {kind} body differs from the golden one"
    packed = E.pack(_keys()[WIRE["sender"]], bytes.fromhex(WIRE["consortium_id"]), kind,
                    WIRE["round"], golden["seq"], body)
    assert packed.hex() == golden["bytes"]


@pytest.mark.parametrize("kind", sorted(set(WIRE["envelopes"]) - {E.KIND_SEALED, E.KIND_DEAL}))
def test_golden_envelope_is_accepted_by_a_plain_verifier(kind):
    data = bytes.fromhex(WIRE["envelopes"][kind]["bytes"])
    acc = _verifier(secure=kind in E.SECURE_KINDS).verify(data, current_round=WIRE["round"])
    assert (acc.sender, acc.envelope.kind, acc.round) == (WIRE["sender"], kind, WIRE["round"])
    if kind == E.KIND_SHARE:
        assert acc.share.weight == 120.0
        for name, array in G.share_tensors():
            np.testing.assert_array_equal(acc.share.tensors[name], array)
    elif kind == E.KIND_PREKEY:
        assert acc.hello and [p.epoch for p in acc.prekeys] == sorted(G.PREKEY_SEEDS)
    elif kind == E.KIND_SEEN:
        assert acc.seen == (("carol", bytes(range(32, 64))),)
    elif kind == E.KIND_ECHO:
        assert acc.seen == (("alice", bytes(range(96, 128))), ("bob", bytes(range(128, 160))))
    elif kind == E.KIND_STATS:
        assert acc.stats.rows == 500.0 and list(acc.stats.sumsq) == [10.25, 8.0]
    elif kind == E.KIND_NORM:
        assert acc.norm_range is False
    elif kind == E.KIND_SECAGG:
        assert (acc.secagg.step, acc.secagg.held) == ("check", (1, 2, 3))
        assert acc.secagg.pieces == (G.secagg_piece(),)


def test_stored_deal_opens_with_the_stored_prekey_and_only_so():
    """A secure round's deal (issue 22) is sealed to its one recipient: alice reads bob's
    two pieces; a node without sealing refuses it (seal_off), never reads it."""
    data = bytes.fromhex(WIRE["envelopes"][E.KIND_DEAL]["bytes"])
    acc = _verifier(_alice_sealing(), secure=True).verify(data, current_round=WIRE["round"])
    assert acc.secagg.step == "deal"
    assert acc.secagg.pieces == (G.secagg_piece(1, 2, 1, 5), G.secagg_piece(2, 2, 1, 7),
                                 G.DEAL_COMMITMENT)
    with pytest.raises(E.RemoteError) as exc:
        _verifier(secure=True).verify(data, current_round=WIRE["round"])
    assert exc.value.reason == "seal_off"


def test_prekey_announcement_is_byte_exact_and_verifies():
    body = bytes.fromhex(WIRE["envelopes"][E.KIND_PREKEY]["body"])
    bob = _keys()["bob"]
    prekeys, hello = decode_announcement(body, bytes.fromhex(WIRE["consortium_id"]),
                                         bytes(bob.verify_key), _members())
    assert hello is True
    assert [(p.epoch, p.x25519) for p in prekeys] == [
        (int(e), bytes(PrivateKey(bytes.fromhex(s)).public_key))
        for e, s in sorted(WIRE["prekey_seeds"].items(), key=lambda kv: int(kv[0]))]


def test_stored_sealed_share_opens_with_the_stored_prekey():
    data = bytes.fromhex(WIRE["envelopes"][E.KIND_SEALED]["bytes"])
    acc = _verifier(_alice_sealing()).verify(data, current_round=WIRE["round"])
    assert acc.share.weight == 120.0
    for name, array in G.share_tensors():
        np.testing.assert_array_equal(acc.share.tensors[name], array)


def test_stored_sealed_share_does_not_open_without_the_prekey():
    """The test above can fail: a receiver without alice's prekey gets no_prekey."""
    s = _alice_sealing()
    s.own.keys[WIRE["round"]] = PrivateKey(bytes(32 * [7]))
    with pytest.raises(E.RemoteError) as exc:
        _verifier(s).verify(bytes.fromhex(WIRE["envelopes"][E.KIND_SEALED]["bytes"]),
                            current_round=WIRE["round"])
    assert exc.value.reason == "no_prekey"


# --- consortium ------------------------------------------------------------------------

def test_golden_consortium_loads_under_its_stated_id():
    c = load_consortium(GOLDEN / "consortium.toml")
    stated = (GOLDEN / "consortium.toml").read_text().split('id = "', 1)[1][:64]
    assert c.id.hex() == stated == "9fd6b01b714cc8101429a7e5aaa7916f121f65c8a5943802cebfde3a576c7eea"
    assert [m.name for m in c.members] == ["alice", "bob", "carol"]
    assert {m.name: m.public_key for m in c.members} == {
        n: bytes(k.verify_key) for n, k in _keys().items()}


def test_golden_consortium_edited_is_refused(tmp_path):
    text = (GOLDEN / "consortium.toml").read_text().replace("192.0.2.2", "192.0.2.9")
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(E.LocalError, match="edited after it was built"):
        load_consortium(tmp_path / "c.toml")


def test_run_config_identity_and_consortium_load(tmp_path):
    """The golden run's node config, its key and its consortium file: what a restart reads
    before the state dir."""
    shutil.copytree(GOLDEN / "run", tmp_path / "run")
    (tmp_path / "run" / "keys" / "telco-0.key").chmod(0o600)  # git keeps no 0600
    cfg = load_config(tmp_path / "run" / "nodes" / "telco-0.toml")
    assert (cfg.model.kind, cfg.training.rounds, cfg.privacy.mode, cfg.privacy.epsilon,
            cfg.gossip.seal) == ("logreg", 2, "record", 3.0, "on")
    me = load_identity(cfg.identity.key)
    c = load_consortium(cfg.consortium.path)
    assert sorted(m.name for m in c.members) == ["telco-0", "telco-1"]
    assert c.by_name(me.name).public_key == bytes(me.signing_key.verify_key)


# --- state dir: checkpoint, ledger, privacy plan ------------------------------------------

@pytest.fixture
def state(tmp_path) -> StateDir:
    """A copy of the golden state dir (StateDir() chmods what it opens: not the repo's)."""
    shutil.copytree(STATE, tmp_path / "state")
    return StateDir(tmp_path / "state")


def test_checkpoint_keys_are_frozen():
    raw = msgpack.unpackb((STATE / "checkpoint.msgpack").read_bytes(), raw=False)
    assert list(raw) == RUN["checkpoint_keys"]


def test_checkpoint_codec_names_every_attribute():
    """A new Checkpoint attribute without a key in the codec would silently not be saved."""
    assert ["version", *CHECKPOINT_KEYS] == RUN["checkpoint_keys"]
    # ... or in CHECKPOINT_OPTIONAL_KEYS (written only when set: the golden bytes stay)
    assert sorted([*CHECKPOINT_KEYS.values(), *CHECKPOINT_OPTIONAL_KEYS.values()]) == \
        sorted(f.name for f in dataclasses.fields(Checkpoint))


@pytest.mark.parametrize(("edit", "complaint"), [
    (lambda d: d.update(surprise=1), "unknown keys"),
    (lambda d: d.update(version=2), "unknown version"),
    (lambda d: d.pop("seq"), "missing keys")])
def test_checkpoint_codec_refuses_what_it_does_not_know(tmp_path, edit, complaint):
    doc = msgpack.unpackb((STATE / "checkpoint.msgpack").read_bytes(), raw=False)
    edit(doc)
    (tmp_path / "checkpoint.msgpack").write_bytes(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(E.LocalError, match=complaint):
        StateDir(tmp_path).load_checkpoint()


def test_golden_checkpoint_loads_with_its_values(state):
    cp = state.load_checkpoint()
    assert isinstance(cp, Checkpoint)
    assert cp == decode_checkpoint((STATE / "checkpoint.msgpack").read_bytes())
    want = RUN["checkpoint"]
    assert (cp.next_round, cp.seq, len(cp.model), cp.planned_rounds, cp.ledger_records,
            cp.ledger_digest) == (want["next_round"], want["seq"], want["model_bytes"],
                                  want["planned_rounds"], want["ledger_records"],
                                  want["ledger_digest"])
    assert list(cp.peer_prekeys) == ["telco-1"] and cp.replay and cp.strategy


def test_golden_checkpoint_saves_back_byte_for_byte(state):
    """Load and save again: the same bytes (same keys, order and values)."""
    state.save_checkpoint(state.load_checkpoint())
    assert state.checkpoint_path.read_bytes() == (STATE / "checkpoint.msgpack").read_bytes()


def test_golden_ledger_and_plan_give_the_stored_epsilon(state):
    plan = PrivacyPlan.load(STATE / "privacy_plan.json")
    assert json.loads((STATE / "privacy_plan.json").read_text()) == RUN["plan"]
    ledger = Ledger(STATE / "ledger.jsonl")
    assert not ledger.recovered and len(ledger.records) == RUN["ledger_records"]
    eps = ledger.epsilon(plan.delta)
    assert math.isclose(eps, RUN["epsilon"], rel_tol=1e-12)
    assert eps <= plan.epsilon
    # The plan's own history (what it was calibrated on) stays within its budget too.
    assert epsilon_of(plan_history(plan.mode, plan.noise_multiplier, plan.sample_rate,
                                   plan.steps_per_round, plan.rounds, plan.count_sigma,
                                   plan.normalize_sigma), plan.delta) <= plan.epsilon * (1 + 1e-6)
    # The checkpoint was written with this ledger: a restart's check passes.
    cp = state.load_checkpoint()
    ledger.check_covers(cp.ledger_records, cp.ledger_digest, "golden checkpoint")


def test_golden_seq_file_reads(state):
    assert state.reserved_seq() >= RUN["checkpoint"]["seq"]


# --- CLI help ----------------------------------------------------------------------------

def test_every_subcommand_has_a_golden_help():
    assert sorted(G.help_file(a).name for a in G.help_commands()) == \
        sorted(p.name for p in (GOLDEN / "help").glob("*.txt"))


@pytest.mark.parametrize("argv", G.help_commands(), ids=lambda a: " ".join(["flnode", *a]))
def test_help_is_frozen(argv):
    assert G.help_text(argv) == G.help_file(argv).read_text()

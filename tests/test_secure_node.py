"""Secure rounds in the real node (node/runtime/secure_node.py), through `flnode simulate
--secure`: in-process members on the memory transport, sealing on, real training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

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


@pytest.mark.slow  # 5 members x 3 secure rounds plus the local-only baselines: 7-10 s
def test_simulate_secure_every_member_reconstructs_the_same_model(tmp_path):
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


def test_secure_with_update_dp_or_no_budget_is_refused_by_name(tmp_path):
    """DP on the secure sum is per record, planned from a budget: the simulator refuses
    --privacy update (and record without --epsilon) before building anything, and the node
    itself refuses update mode (a config written by hand), naming the setting; a secure
    node without sealing is refused too."""
    from gossip.membership import Consortium
    from node.runtime import secure_node
    from node.strategy.consortium_rules import pin_rules, rules_table
    from tests.helpers import consortium, keys

    with pytest.raises(LocalError, match="--privacy update"):
        _simulate(tmp_path / "dp", secure=True, privacy="update", epsilon=3.0, rounds=1)
    with pytest.raises(LocalError, match="without --epsilon"):
        _simulate(tmp_path / "dp2", secure=True, privacy="record", sigma=1.0, rounds=1)
    base = consortium(keys(5))
    cons = Consortium(base.name, base.schema, base.members, pin_rules(rules_table(5, secure=True), 5))
    node = SimpleNamespace(consortium=cons, sealing=object(), name="bank-0",
                           cfg=SimpleNamespace(privacy=SimpleNamespace(mode="update")))
    with pytest.raises(LocalError, match="privacy.mode = 'update'"):
        secure_node.setup(node)
    node.sealing = None
    with pytest.raises(LocalError, match="gossip.seal"):
        secure_node.setup(node)


def test_a_member_dealing_inconsistent_pieces_is_named_with_its_signed_deal_kept(
        tmp_path, monkeypatch):
    """site-4 (its real key, its real node) deals pieces that lie on no degree-t polynomial
    (a different error for each holder): every other member refuses its dealing, names it in
    the round's audit line, keeps its signed deal as evidence, and the round completes with
    the others, the same model at every honest member."""
    from gossip.bodies import SecAgg, decode_secagg, encode_secagg
    from gossip.envelope import KIND_DEAL, decode_outer
    from node.runtime.secure_round import SecureRounds, piece_digest
    from node.secagg import field as F
    from node.secagg.pieces import Piece, from_bytes, to_bytes

    honest_deal = SecureRounds.deal

    def deal(self, r, encoded):
        deals = honest_deal(self, r, encoded)
        if self.me != "site-4":
            return deals
        pieces = {}
        for k, (to, body) in enumerate(sorted(deals.items())):
            msg = decode_secagg(body, 5, deal=True)
            p = from_bytes(msg.pieces[0])
            if p.kind == 1:  # a full piece (a seed piece is sent as it is)
                vals = p.values.copy()
                vals[0] = (int(vals[0]) + 7 + k) % F.P
                p = Piece(p.round, p.kind, p.owner, p.holder, vals)
            pieces[to] = (to_bytes(p), msg.pieces[1])
        # it commits to the pieces it sends (else each holder refuses them as bad_piece)
        commit = bytearray(msg.pieces[2])
        for to, (v, mk) in pieces.items():
            j = int(to.split("-")[1])
            commit[32 * j:32 * j + 32] = piece_digest(v, mk)
        return {to: encode_secagg(SecAgg("deal", (*pm, bytes(commit))))
                for to, pm in pieces.items()}

    monkeypatch.setattr(SecureRounds, "deal", deal)
    summary = _simulate(tmp_path / "run", secure=True, rounds=2)
    honest = ["site-0", "site-1", "site-2", "site-3"]
    assert len({summary["consortium"]["per_node"][m] for m in honest}) == 1
    for m in honest:
        state = tmp_path / "run" / "state" / m
        lines = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
        for x in (x for x in lines if x.get("kind") == "aggregate"):
            sec = x["secure"]
            assert sec["ok"] and "site-4" not in x["used"] and "site-4" not in sec["entered"]
            assert sec["named"]["site-4"].startswith("inconsistent_pieces")
            kept = decode_outer((state / sec["evidence"]["site-4"]).read_bytes())
            assert kept.kind == KIND_DEAL and kept.round == x["round"]


def test_our_dealing_is_stored_before_it_is_sent_and_restores_byte_for_byte(tmp_path,
                                                                             monkeypatch):
    """Each member stores its dealing (its own pieces, every recipient's body and the signed
    deal sent to each) before sending: the deal each peer accepted is the stored envelope,
    byte for byte, so a restart re-sends it instead of dealing again (a second, different
    deal would be an equivocation to the others)."""
    from gossip.envelope import decode_outer
    from node.runtime import secure_node
    from node.runtime.secure_round import SecureRound
    from node.runtime.state import StateDir

    monkeypatch.setattr(StateDir, "prune_outbox", lambda *a, **k: None)  # keep every file
    _simulate(tmp_path / "run", secure=True, rounds=1)
    states = tmp_path / "run" / "state"
    accepted = {}
    for m in sorted(p.name for p in states.iterdir()):
        for x in (json.loads(x) for x in (states / m / "audit.jsonl").read_text().splitlines()):
            if x.get("kind") == "deal" and x.get("outcome") == "accepted":
                accepted[(x["member"], m)] = x["digest"]
    node = SimpleNamespace(state=StateDir(states / "site-0"))
    doc = secure_node.stored_deals(node, 0)
    assert sorted(doc["sent"]) == sorted(doc["bodies"]) == ["site-1", "site-2", "site-3", "site-4"]
    for peer, data in doc["sent"].items():
        assert decode_outer(data).digest.hex() == accepted[("site-0", peer)]
    members = [f"site-{i}" for i in range(5)]
    from gossip.membership import load_consortium
    from node.secagg.encoding import FixedPoint

    cons = load_consortium(tmp_path / "run" / "consortium.toml")
    codec = FixedPoint.choose(1.0, 4810, 5)
    again = SecureRound("site-0", members, 1, "distances", codec, 0, cons.id)
    again.restore(doc["own"][:2], doc["own"][2])
    assert again.own_pieces() == doc["own"][:2]
    with pytest.raises(LocalError, match="not ours"):
        SecureRound("site-1", members, 1, "distances", codec, 0, cons.id).restore(
            doc["own"][:2], doc["own"][2])

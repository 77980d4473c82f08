"""Rehearsed attacks ([attack], --attack): a hostile member is a real node with a valid
key that releases, signs and sends what the attack says. The honest nodes must keep
running, name what they refused, and keep the evidence."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from nacl.signing import VerifyKey

from gossip import envelope
from gossip.errors import LocalError
from gossip.transports.memory import MemoryHub
from node.cli import build_parser
from node.learn.models import get_flat
from node.privacy.mechanisms import SeededNoise
from node.rehearsal.build import build_rehearsal_node
from node.rehearsal.config import AttackConfig, load_rehearsal_config
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.results import summarize
from node.rehearsal.simulation.spec import SimulationSpec, parse_attacks
from node.runtime.config import load_config
from node.runtime.evidence import verify_equivocation
from node.runtime.node import Node
from node.runtime.state import read_jsonl
from scripts.bench_robust import run_cell
from tests.test_runner import run_all

NAMES = ["bank-0", "bank-1", "bank-2", "bank-3"]


def make(tmp_path, attacks, nodes=4, rounds=2, seal="auto", aggregation="trimmed_mean",
         deadline=10.0, echo=True):
    spec = SimulationSpec(dataset="default", nodes=nodes, partition="iid", rounds=rounds,
                          seed=0, out=tmp_path, privacy="off", round_deadline_s=deadline,
                          seal=seal, aggregation=aggregation, attacks=tuple(attacks),
                          echo=echo)
    return spec, prepare(spec)


def build(prep):
    hub = MemoryHub()
    return [build_rehearsal_node(load_rehearsal_config(p), hub.attach(n, prep.names),
                                 SeededNoise(i))
            for i, (n, p) in enumerate(zip(prep.names, prep.config_paths, strict=True))]


def audit(node):
    return read_jsonl(node.state.path / "audit.jsonl")


def honest_finished(nodes, attacker, rounds):
    honest = [n for n in nodes if n.name != attacker]
    for n in honest:
        lines = read_jsonl(n.state.path / "metrics.jsonl")
        assert [x["round"] for x in lines] == list(range(rounds)), n.name
        assert np.isfinite(get_flat(n.model).numpy()).all()
    return honest


# --- syntax and config -------------------------------------------------------------
def test_attack_syntax_goes_into_the_attackers_configs_only(tmp_path):
    got = parse_attacks(["sign-flip=4:bank-1,bank-2", "weight:bank-1", "scale:10:bank-3"],
                        NAMES, seed=0)
    assert got["bank-1"]["kind"] == "sign-flip" and got["bank-1"]["param"] == 4.0
    assert got["bank-1"]["weight"] == 1e12  # weight combines with another kind
    assert got["bank-3"] == {"kind": "scale", "param": 10.0, "seed": 3}
    assert AttackConfig.model_validate(got["bank-1"]).describe() == \
        "sign-flip=4 with declared weight 1e+12"
    for bad, match in (("flip:bank-1", "no attack kind"), ("huge=3:bank-1", "no parameter"),
                       ("noise=x:bank-1", "must be a number"), ("huge:mallory", "no such"),
                       ("huge", "expected"), ("noise=-1:bank-1", "SIGMA")):
        with pytest.raises(LocalError, match=match):
            parse_attacks([bad], NAMES)
    with pytest.raises(LocalError, match="one kind"):
        parse_attacks(["huge:bank-1", "nan:bank-1"], NAMES)
    _, prep = make(tmp_path, ["huge:bank-2"])
    cfgs = {n: load_rehearsal_config(p) for n, p in zip(prep.names, prep.config_paths,
                                                          strict=True)}
    assert cfgs["bank-2"].attack is not None and cfgs["bank-2"].attack.kind == "huge"
    assert all(c.attack is None for n, c in cfgs.items() if n != "bank-2")
    args = build_parser().parse_args(["simulate", "--out", "x", "--attack", "nan:bank-1",
                                      "--attack", "replay:bank-2"])
    assert args.attack == ["nan:bank-1", "replay:bank-2"]


def test_zero_prekey_needs_sealing(tmp_path):
    with pytest.raises(LocalError, match="sealed"):
        make(tmp_path, ["zero-prekey:bank-0"], seal="off")


def test_an_attacker_logs_loudly(tmp_path, caplog):
    _, prep = make(tmp_path, ["label-flip:bank-0"])
    node = build(prep)[0]
    assert "ATTACKS THE CONSORTIUM" in caplog.text and "label-flip" in caplog.text
    # label-flip: the attacker trains on flipped labels, evaluates on the real ones
    assert set(np.unique(node.train_data.y)) <= {0, 1}


# --- protocol attacks: the honest nodes go on, with a named reason -------------------
async def test_zero_prekey_is_refused_as_bad_prekey_and_crashes_nobody(tmp_path):
    _, prep = make(tmp_path, ["zero-prekey:bank-0"], seal="on", deadline=5.0)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    for n in honest_finished(nodes, "bank-0", 2):
        assert n.rejected().get("bad_prekey", 0) >= 1
        assert any(x.get("outcome") == "bad_prekey" and x["member"] == "bank-0"
                   for x in audit(n))
        assert "bank-0" not in n.sealing.peers or not n.sealing.peers["bank-0"]
    # A restart of an honest node loads its checkpoint (no zero key was saved).
    again = Node.from_config(load_config(prep.config_paths[1]),
                             MemoryHub().attach(prep.names[1], prep.names), SeededNoise(1))
    assert again.book.current == 2


async def test_replayed_messages_are_refused_as_duplicates(tmp_path):
    _, prep = make(tmp_path, ["replay:bank-0"], rounds=3)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    for n in honest_finished(nodes, "bank-0", 3):
        refused = [x["outcome"] for x in audit(n) if x["member"] == "bank-0"
                   and x.get("outcome") not in ("accepted", None)]
        assert refused and set(refused) <= {"duplicate", "replay", "stale"}
        # its one real share per round was used: the replays changed nothing
        accepted = [x for x in audit(n) if x["member"] == "bank-0"
                    and x.get("outcome") == "accepted" and x["kind"] == "share"]
        assert sorted(x["round"] for x in accepted) == [0, 1, 2]


async def test_an_equivocation_is_refused_and_kept_as_signed_evidence(tmp_path):
    _, prep = make(tmp_path, ["equivocate:bank-0"])
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    key = VerifyKey(prep.consortium.by_name("bank-0").public_key)
    for n in honest_finished(nodes, "bank-0", 2):
        assert n.rejected()["equivocation"] == 2
        evidence = [x for x in audit(n) if x.get("kind") == "evidence"
                    and x.get("outcome") == "equivocation"]
        assert [e["round"] for e in evidence] == [0, 1]
        for e in evidence:
            first, second = e["first"], e["second"]
            assert first["digest"] != second["digest"] and first["seq"] != second["seq"]
            # the first: the member's signature over its digest
            key.verify(bytes.fromhex(first["digest"]), bytes.fromhex(first["sig"]))
            # both whole signed envelopes, kept apart from the audit log: a proof anyone
            # with the member's public key can check
            proof = (n.state.path / e["proof"]).read_bytes()
            assert verify_equivocation(proof, bytes(key), prep.consortium.id) == \
                (e["round"], "share")
        assert n.counters.equivocation == {"bank-0": 2}  # proven, once per round
        # with the digest echo ([rules] echo, what flnode writes): no version is used,
        # by anyone (without it each honest node used the version it got first)
        used = [x for x in audit(n) if x.get("kind") == "aggregate"]
        assert used and all("bank-0" not in x["used"] for x in used)


@pytest.mark.parametrize("seal", ["off", "auto"])
async def test_a_split_equivocation_is_noticed_by_every_honest_member(tmp_path, seal):
    """Each member gets its own version of the attacker's share and never a second one:
    no member can refuse anything, but the seen reports (what each accepted) differ.
    Without the digest echo (a consortium built before it): with it, nobody combines it
    (tests/test_echo_node.py)."""
    _, prep = make(tmp_path, ["equivocate-split:bank-0"], seal=seal, echo=None)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    for n in honest_finished(nodes, "bank-0", 2):
        assert "equivocation" not in n.rejected()  # nobody held two versions
        found = [x for x in audit(n) if x.get("outcome") == "digest_mismatch"]
        # both other honest members reported a different bank-0 share, in both rounds
        pairs = {(x["round"], x["reporter"]) for x in found if x["accused"] == "bank-0"}
        others = {m for m in ("bank-1", "bank-2", "bank-3") if m != n.name}
        assert pairs == {(r, m) for r in (0, 1) for m in others}, (n.name, found)
        assert not [x for x in found if x["accused"] != "bank-0"]  # nobody else is accused
        # a claim, counted under its reporter; nothing is proven against anyone
        assert all(x["kind"] == "claim" and x["member"] == x["reporter"] for x in found)
        assert n.counters.digest_mismatch == {m: 2 for m in others}
        assert not n.counters.equivocation
        for x in found:  # the report, as signed by its reporter, is kept
            assert x["reported"] != x["ours"]["digest"]
            env = envelope.decode_outer((n.state.path / x["report"]["file"]).read_bytes())
            assert env.kind == "seen" and env.round == x["round"]
            VerifyKey(prep.consortium.by_name(x["reporter"]).public_key).verify(env.digest,
                                                                               env.sig)


async def test_honest_members_seen_reports_agree(tmp_path):
    """Without an attacker every member's seen report matches: no mismatch anywhere."""
    _, prep = make(tmp_path, [], seal="auto")
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    for n in nodes:
        assert not n.counters.digest_mismatch
        assert n.counters.accepted and n.rejected().get("bad_body", 0) == 0
        assert not [x for x in audit(n) if x.get("outcome") == "digest_mismatch"]


async def test_a_non_finite_share_is_refused_as_non_finite(tmp_path):
    _, prep = make(tmp_path, ["nan:bank-0"], deadline=5.0)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    for n in honest_finished(nodes, "bank-0", 2):
        assert n.rejected()["non_finite"] == 2
        assert all("bank-0" not in x["used"] for x in audit(n) if x.get("kind") == "aggregate")


async def test_summary_names_attackers_and_reports_honest_members_apart(tmp_path):
    spec, prep = make(tmp_path, ["huge:bank-3"], aggregation="trimmed_mean")
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    from node.rehearsal.simulation.results import result_of

    metric = "roc_auc"
    s = summarize(spec, prep, [result_of(n, prep.test) for n in nodes], {},
                  {metric: 0.9, "pr_auc": 0.5}, {n: {metric: 0.5, "pr_auc": 0.5}
                                                 for n in prep.names})
    json.dumps(s)
    assert s["attack"]["attackers"] == {"bank-3": "huge"}
    assert set(s["honest"]["per_node"]) == {"bank-0", "bank-1", "bank-2"}
    assert s["honest"]["mean"] > 0.9
    seen = s["attack"]["seen_by"]["bank-0"]["bank-3"]
    # 1e30 values: left out before the rule (the far filter), every round
    assert seen["rounds"] == 2 and seen["excluded"] == {"far_outlier": 2}
    assert s["rules"]["aggregation"] == "trimmed_mean"


# --- a small version of bench_robust ---------------------------------------------------
def test_small_bench_trimmed_mean_holds_where_the_plain_mean_fails(tmp_path):
    """4 members, 3 rounds (digits, iid): a sign-flipping member (K = 4) and the same
    with a declared weight of 1e12. The plain mean visibly degrades (shown, not hidden);
    trimmed_mean (f = 1) stays near its clean run. Bounds are loose: no timing, and the
    numbers are from seeded runs."""
    def cell(rule, attack):
        c = run_cell("digits", rule, 1, attack, seed=0, rounds=3, nodes=4, partition="iid",
                     workdir=str(tmp_path))
        assert "crash" not in c, c
        return c["mean"]

    clean_mean, clean_trimmed = cell("mean", None), cell("trimmed_mean", None)
    for attack in ("sign-flip", "weight"):
        assert cell("mean", attack) < clean_mean - 0.1, attack
        assert cell("trimmed_mean", attack) > clean_trimmed - 0.1, attack

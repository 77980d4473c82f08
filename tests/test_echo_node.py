"""The digest echo on real nodes (issue 19: members agree on what they aggregate).

Real Node objects (node/runtime/node.py) over the memory transport, the consortium's
[rules] echo = true as `flnode simulate` writes it: a split equivocator (a different
signed share to each member, never two to one) is left out by every honest member, with
its signed envelopes kept as evidence, and the honest members end with one model
(their final digests, node/runtime/finals.py); the same run without the echo ends with
different models. Hostile echoes are signed with members' keys."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest
from nacl.signing import VerifyKey

from gossip import bodies, envelope
from gossip.envelope import KIND_ECHO
from gossip.membership import load_consortium
from gossip.protocol import ECHO, SHARE
from node.runtime.evidence import verify_equivocation
from node.runtime.metrics import NodeCollector
from node.runtime.state import read_jsonl
from node.strategy.consortium_rules import echo_rule, rules_table
from tests.test_attacks import build, honest_finished, make
from tests.test_evidence import Members
from tests.test_liveness import node_of
from tests.test_runner import run_all

ATTACKER = "bank-4"


def finals(node) -> dict:
    return json.loads((node.state.path / "final.json").read_text())


def audit(node, kind: str) -> list[dict]:
    return [x for x in read_jsonl(node.state.path / "audit.jsonl") if x.get("kind") == kind]


async def _split_run(tmp_path, echo: bool):
    spec, prep = make(tmp_path, [f"equivocate-split:{ATTACKER}"], nodes=5, seal="off",
                      aggregation="auto", echo=echo)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    return prep, nodes, honest_finished(nodes, ATTACKER, 2)


async def test_a_split_equivocator_is_left_out_by_every_honest_member_who_end_alike(tmp_path):
    prep, nodes, honest = await _split_run(tmp_path, echo=True)
    assert echo_rule(prep.consortium) and honest[0].machine.phases == (SHARE, ECHO)
    assert honest[0].machine.echo.faulty == 1  # the rule's f, as resolved for 5 members
    key = VerifyKey(prep.consortium.by_name(ATTACKER).public_key)
    digests = set()
    for n in honest:
        # every round: its share left out, for a conflict between the honest echoes
        ex = audit(n, "exclusion")
        assert [(x["round"], x["member"], x["why"]) for x in ex] == \
            [(r, ATTACKER, "conflict") for r in (0, 1)], ex
        assert all(ATTACKER not in x["used"] for x in audit(n, "aggregate"))
        assert all(x["entered"] == sorted(m.name for m in honest) for x in audit(n, "agreement"))
        for x in ex:  # the evidence, as signed: our copy of its share, the others' echoes
            doc = msgpack.unpackb((n.state.path / x["file"]).read_bytes(), raw=False)
            held = envelope.decode_outer(doc["held"])
            key.verify(held.digest, held.sig)
            assert held.kind == "share" and held.digest.hex() == x["held"]["digest"]
            assert len(doc["claims"]) == len(x["claims"]) >= 3
            for c in map(envelope.decode_outer, doc["claims"]):
                echoer = prep.consortium.by_key(c.sender).name
                VerifyKey(c.sender).verify(c.digest, c.sig)
                named = dict(bodies.decode_echo(c.body, {m.public_key: m.name for m in
                                                         prep.consortium.members}))
                assert c.kind == KIND_ECHO and named[ATTACKER] != held.digest, echoer
        assert n.echo_records.excluded == {f"{ATTACKER}:conflict": 2}
        assert not n.counters.digest_mismatch  # nobody combined it: the reports agree
        f = finals(n)
        assert f["different"].keys() <= {ATTACKER}, f
        digests.add(f["digest"])
    assert len(digests) == 1  # the honest members hold one model
    families = {m.name: m for m in NodeCollector(honest[0]).collect()}
    assert families["flnode_echo_excluded"].samples[0].labels == {"member": ATTACKER,
                                                                  "reason": "conflict"}
    assert families["flnode_echo_bytes_sent"].samples[0].value > 0


async def test_without_the_echo_the_same_split_ends_with_different_models(tmp_path):
    """The counterpart: a consortium without the key (built before it) forks."""
    prep, _, honest = await _split_run(tmp_path, echo=None)
    assert "echo" not in load_consortium(tmp_path / "consortium.toml").rules
    assert honest[0].machine.phases == (SHARE,)
    assert len({finals(n)["digest"] for n in honest}) > 1
    assert all(not audit(n, "exclusion") for n in honest)


def test_a_consortium_file_without_the_key_keeps_its_id_and_runs_without_the_echo():
    assert "echo" not in rules_table(4, echo=None)
    assert rules_table(4)["echo"] is True  # what flnode writes from now on


# --- hostile echoes through a real node -------------------------------------------------
@pytest.fixture
def one(tmp_path):
    _, prep = make(tmp_path, [], nodes=4, seal="off")
    from gossip.transports.memory import MemoryHub
    return prep, node_of(prep, 0, MemoryHub()), Members(prep, tmp_path)


@pytest.mark.parametrize("what,reason,detail", [
    ("non_member", "bad_body", "not a member's"),
    ("duplicate", "bad_body", "two entries"),
    ("too_many", "bad_body", "more than 4 members'"),
    ("huge", "bad_body", "more than 4 members'"),
    ("far_round", "too_far", "beyond round"),
])
def test_a_member_signed_hostile_echo_is_refused_by_name_and_kept_nowhere(one, what, reason,
                                                                         detail):
    prep, node, who = one
    pub, d = who.pub, b"\x05" * 32
    bodies_ = {
        "non_member": bodies.encode_echo([(b"\x09" * 32, d)]),
        "duplicate": bodies.encode_echo([(pub("bank-2"), d)] * 2),
        "too_many": bodies.encode_echo([(pub("bank-2"), d)] * 5),
        "huge": b"\x91" + b"\x00" * 2_000_000,
        "far_round": bodies.encode_echo([(pub("bank-2"), d)]),
    }
    r = 10_000 if what == "far_round" else 0
    node.handle(who.msg("bank-1", KIND_ECHO, r, bodies_[what]))
    assert node.rejected() == {reason: 1}
    line = read_jsonl(node.state.path / "audit.jsonl")[-1]
    assert line["member"] == "bank-1" and line["outcome"] == reason and detail in line["detail"]
    assert not node.machine.echo.echoes


def test_two_different_echoes_of_one_member_are_refused_and_kept_as_a_proof(one):
    prep, node, who = one
    first = who.msg("bank-1", KIND_ECHO, 0, bodies.encode_echo([(who.pub("bank-2"),
                                                                 b"\x01" * 32)]))
    second = who.msg("bank-1", KIND_ECHO, 0, bodies.encode_echo([(who.pub("bank-2"),
                                                                  b"\x02" * 32)]))
    node.handle(first)
    node.handle(second)
    assert node.rejected() == {"equivocation": 1}
    assert node.counters.equivocation == {"bank-1": 1}
    [proof] = node.evidence.proofs()
    assert verify_equivocation(proof.read_bytes(), who.pub("bank-1"),
                               prep.consortium.id) == (0, KIND_ECHO)
    assert dict(node.machine.echo.echoes[(0, "bank-1")].seen) == {"bank-2": b"\x01" * 32}


# --- flnode simulate ------------------------------------------------------------------
@pytest.mark.slow  # about 9 s + 6 s here
@pytest.mark.parametrize("echo", ["on", "off"])
def test_simulate_a_split_equivocator_among_six_ends_with_equal_honest_metrics(tmp_path, echo):
    """`flnode simulate --nodes 6 --attack equivocate-split:bank-5` (3 rounds): with the
    echo (the default) every honest member reports the same final metric in summary.json;
    with --echo off (a consortium built before it) they differ (the fork of issue 19)."""
    import torch

    from node.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["simulate", "--nodes", "6", "--attack", "equivocate-split:bank-5",
                     "--rounds", "3", "--seed", "0", "--echo", echo,
                     "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    per_node = summary["honest"]["per_node"]
    assert sorted(per_node) == [f"bank-{i}" for i in range(5)]
    seen = summary["attack"]["seen_by"]
    if echo == "on":
        assert len(set(per_node.values())) == 1, per_node
        assert all(s["bank-5"]["used"] == 0 and s["bank-5"]["rejected"] == {"echo_excluded": 3}
                   for s in seen.values()), seen
    else:
        assert len(set(per_node.values())) > 1, per_node

"""Secure rounds in the real node (node/runtime/secure_node.py), through `flnode simulate
--secure`: in-process members on the memory transport, sealing on, real training."""

from __future__ import annotations

import json
from collections import Counter
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
        # the optimistic sum opening (node/runtime/secure_open.py): a sum piece from the 2t
        # ring neighbours only, a confirm and a fallback message from the others, per round
        steps = Counter((x["round"], x["where"]) for x in lines
                        if x.get("outcome") == "accepted" and x.get("kind") == "secagg")
        for r in range(3):
            assert (steps[(r, "sum")], steps[(r, "confirm")], steps[(r, "fallback")]) == (2, 4, 2)
        # the final models compared (node/runtime/finals.py): every other member took part,
        # so each one's final digest was awaited and found the same as ours
        final = json.loads((state / "final.json").read_text())
        others = sorted(m.name for m in (tmp_path / "run" / "state").iterdir() if m != state)
        assert (final["same"], final["different"], final["not_heard"]) == (others, {}, [])
        assert sorted(x["member"] for x in lines if x.get("kind") == "final") == others


def test_a_secure_member_whose_final_model_differs_is_named_by_every_other(tmp_path,
                                                                          monkeypatch):
    """After the last secure round every member compares its final model digest with those
    of the members that took part: one member's final digest is made wrong (as a model that
    applied another sum would give); each other member names it in final.json and lists the
    rest as the same, and it names them all."""
    from node.runtime import finals

    honest_digest, made = finals.model_digest, []

    def digest(model):
        d = honest_digest(model)
        if made:
            return d
        made.append(d)
        return bytes(b ^ 0xFF for b in d)  # the first member to send its final: wrong

    monkeypatch.setattr(finals, "model_digest", digest)
    _simulate(tmp_path / "run", secure=True, nodes=4, rounds=1)
    got = {s.name: json.loads((s / "final.json").read_text())
           for s in (tmp_path / "run" / "state").iterdir()}
    [odd] = [m for m, f in got.items() if f["digest"] != made[0].hex()]
    honest = sorted(set(got) - {odd})
    assert len(honest) == 3
    for m in honest:
        assert got[m]["same"] == [x for x in honest if x != m] and not got[m]["not_heard"]
        assert got[m]["different"] == {odd: got[odd]["digest"]}
    assert got[odd]["same"] == [] and sorted(got[odd]["different"]) == honest


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
                           model=torch.nn.Linear(4, 3),
                           cfg=SimpleNamespace(privacy=SimpleNamespace(mode="update"),
                                               gossip=SimpleNamespace(max_envelope_bytes=1 << 26)))
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


# --- DP on the secure sum (issue 22) --------------------------------------------------------

def test_a_sum_with_fewer_contributors_than_the_charged_floor_is_not_opened():
    """8 members, t = 2, variant sum_only with integer contributions (IntegerCodec), floor
    n - t = 6 (what the ledger charged for): 6 dealers open the exact integer sum; with 5
    dealers (enough openers, 5 > t) nobody opens it: "below_charged_floor"."""
    import numpy as np

    from node.secagg.encoding import IntegerCodec
    from tests.test_secure_round import SecureNet

    def run(silent):
        vectors = {f"bank-{i}": np.arange(6, dtype=np.int64) * (i + 1) - 7 for i in range(8)}
        net = SecureNet(8, 2, variant="sum_only", vectors=vectors, silent_from={0: silent})
        net.codec = IntegerCodec(8, 6, 1000)
        for m in net.members.values():
            m.secure.codec, m.secure.floor = net.codec, 6
        net.run()
        honest = [m for m in net.names if m not in silent]
        return [net.outcome(m) for m in honest], vectors, honest

    outs, vectors, honest = run(("bank-6", "bank-7"))
    for o in outs:
        assert o.ok, (o.reason, o.detail)
        np.testing.assert_array_equal(o.total, sum(vectors[m] for m in honest))
    outs, _, _ = run(("bank-5", "bank-6", "bank-7"))
    for o in outs:
        assert not o.ok and o.reason == "below_charged_floor" and o.field_sum is None, o


def _short_plans(monkeypatch, epochs):
    """secure_plan at fewer epochs (so a test runs a few rounds), everywhere it is called."""
    from node.privacy import secure
    from node.runtime import secure_node

    real = secure.secure_plan

    def plan(**kw):
        return real(**{**kw, "epochs": epochs})

    monkeypatch.setattr(secure, "secure_plan", plan)
    monkeypatch.setattr(secure_node, "secure_plan", plan)


@pytest.mark.slow  # 5 members x 3 secure DP rounds and the baselines: 15-40 s on a busy machine
def test_secure_dp_rounds_charge_before_dealing_and_a_spent_member_stops_by_name(
        tmp_path, monkeypatch):
    """`simulate --secure --privacy record --epsilon 3` on digits, 5 members (t = 1, floor
    4), the plan shortened to 3 rounds: every round is charged ("secure" records, at the
    floor, the plan's digest) before the member's dealing exists outside memory; site-4's
    plan allows one round: it stops dealing with "budget_exhausted" named, the others go on
    at the floor. Every member applies the same step; epsilon is the accountant's; no local
    DP-SGD plan is run; every member pinned the same plan."""
    import dataclasses

    from node.privacy.accountant import epsilon_of
    from node.privacy.ledger import Ledger
    from node.runtime import secure_node

    _short_plans(monkeypatch, 0.5)
    seen = []
    real_store = secure_node._store_deals

    def store(node, r, doc):  # the first time anything of the dealing leaves memory
        on_disk = [x.round for x in Ledger(node.state.ledger_path).records]
        seen.append((node.name, r, r in on_disk))
        real_store(node, r, doc)

    monkeypatch.setattr(secure_node, "_store_deals", store)
    real_plan_for = secure_node.plan_for

    def plan_for(node, select):
        plan = real_plan_for(node, select)
        if node.name == "site-4":
            return dataclasses.replace(plan, epsilon=plan.epsilon_after(1) * (1 + 1e-6))
        return plan

    monkeypatch.setattr(secure_node, "plan_for", plan_for)
    summary = _simulate(tmp_path / "run", secure=True, privacy="record", epsilon=3.0)
    rules = summary["rules"]
    assert rules["secure_select"] == "range" and rules["secure_epsilon"] == 3.0  # the default
    assert rules["secure_rows"] == sum(summary["rows"].values())  # the training rows of all
    assert seen and all(ok for _, _, ok in seen), seen
    assert summary["stopped"].get("site-4", "").startswith("budget_exhausted"), summary["stopped"]
    states = tmp_path / "run" / "state"
    plans = {(states / m / "secure_plan.json").read_text() for m in summary["consortium"]["per_node"]}
    assert len(plans) == 1
    plan = json.loads(plans.pop())
    n = plan["steps"]
    assert n >= 3 and summary["rounds"] == n  # the plan chose the length of training
    honest = ["site-0", "site-1", "site-2", "site-3"]
    assert len({summary["consortium"]["per_node"][m] for m in honest}) == 1
    for m in honest + ["site-4"]:
        assert not (states / m / "privacy_plan.json").exists()  # no local DP-SGD plan
        records = Ledger(states / m / "ledger.jsonl").records
        want = 1 if m == "site-4" else n
        assert [r.round for r in records] == list(range(want))
        assert all(r.mode == "secure" and r.secure["contributors"] == 4 and
                   r.secure["reveal"] == "sum" for r in records)
        eps = epsilon_of(records, 1e-5)
        assert summary["epsilon"]["per_node"][m] == pytest.approx(eps) and eps <= 3.0
    for m in honest:
        lines = [json.loads(x) for x in (states / m / "audit.jsonl").read_text().splitlines()]
        agg = [x for x in lines if x.get("kind") == "aggregate"]
        assert [x["secure"]["ok"] for x in agg] == [True] * n, [x["secure"] for x in agg]
        assert [len(x["used"]) for x in agg] == [5] + [4] * (n - 1)
    assert summary["noise"] == "os"


@pytest.mark.slow  # two runs of 5 members: ~10 s
def test_two_seeded_secure_dp_runs_draw_different_noise(tmp_path, monkeypatch):
    """The same --seed twice: the same data, plan and charges, different models (the
    sampling and the noise shares come from the OS, never the seed)."""
    _short_plans(monkeypatch, 0.1)
    a = _simulate(tmp_path / "a", secure=True, privacy="record", epsilon=3.0)
    b = _simulate(tmp_path / "b", secure=True, privacy="record", epsilon=3.0)
    assert a["rounds"] == b["rounds"] <= 2
    fa = json.loads((tmp_path / "a" / "state" / "site-0" / "final.json").read_text())
    fb = json.loads((tmp_path / "b" / "state" / "site-0" / "final.json").read_text())
    assert fa["digest"] != fb["digest"]  # the model's digest
    assert a["epsilon"]["per_node"] == b["epsilon"]["per_node"]


def test_consortium_build_pins_the_secure_dp_plan_inputs(tmp_path, capsys):
    """`flnode consortium build --secure --secure-rows R --secure-epsilon E --secure-delta D`
    writes the plan's inputs with the "sum" selection; a partial set is refused by name."""
    import tomli_w

    from gossip.membership import load_consortium
    from node.cli import main
    from tests.helpers import SCHEMA

    for i in range(4):
        assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", f"bank-{i}"]) == 0
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(SCHEMA))
    argv = ["consortium", "build", "--name", "c", "--schema", str(tmp_path / "schema.toml"),
            "--secure", "--secure-rows", "1000", "--secure-epsilon", "3", "--clip", "1"]
    for i in range(4):
        argv += ["--member", str(tmp_path / "keys" / f"bank-{i}.pub")]
    assert main([*argv, "--secure-delta", "1e-5", "--out", str(tmp_path / "c.toml")]) == 0
    rules = load_consortium(tmp_path / "c.toml").rules
    assert (rules["secure_select"], rules["secure_rows"], rules["secure_epsilon"],
            rules["secure_delta"]) == ("range", 1000, 3.0, 1e-5)  # the new default
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "d.toml")]) != 0
    assert "rules.secure_delta is missing" in capsys.readouterr().err
    no_clip = [a for a in argv if a not in ("--clip", "1")]  # review 2 F11: refused by name
    assert main([*no_clip, "--secure-delta", "1e-5", "--out", str(tmp_path / "e.toml")]) != 0
    assert "need --clip" in capsys.readouterr().err


def test_every_member_plans_from_the_rules_and_a_disagreeing_member_is_refused(tmp_path):
    """plan_for: the plan's inputs come from the [rules]; a member whose privacy.epsilon
    differs is refused naming it; a federated-normalization schema is refused (its
    statistics are not in the secure plan's budget); the plan is pinned in the state dir
    and a later start whose [rules] give another plan is refused."""
    from gossip.membership import Consortium
    from node.runtime import secure_node
    from node.strategy.consortium_rules import pin_rules, rules_table
    from tests.helpers import consortium, keys

    def cons(rows, clip=1.0):
        base = consortium(keys(5))
        dp = {"secure_rows": rows, "secure_epsilon": 3.0, "secure_delta": 1e-5}
        return Consortium(base.name, base.schema, base.members,
                          pin_rules(rules_table(5, secure=True, secure_dp=dp, clip=clip), 5))

    def node(c, epsilon=3.0, schema="declared"):
        return SimpleNamespace(
            consortium=c, name="bank-0", model=torch.nn.Linear(4, 3),
            schema=SimpleNamespace(mode=schema), state=SimpleNamespace(path=tmp_path),
            cfg=SimpleNamespace(privacy=SimpleNamespace(mode="record", epsilon=epsilon,
                                                        delta=1e-5, clip=1.0)))

    with pytest.raises(LocalError, match="pin no clip"):  # review 2 F11: the clip was local
        secure_node.plan_for(node(cons(1000, clip=None)), "sum")
    with pytest.raises(LocalError, match="privacy.epsilon = 2.0 but the consortium"):
        secure_node.plan_for(node(cons(1000), epsilon=2.0), "sum")
    with pytest.raises(LocalError, match="statistics exchange is not part.*normalize = \"range\""):
        secure_node.plan_for(node(cons(1000), schema="federated"), "sum")
    plan = secure_node.plan_for(node(cons(1000)), "sum")
    assert (plan.rows_total, plan.members, plan.coalition, plan.dim) == (1000, 5, 1, 15)
    assert secure_node.plan_for(node(cons(1000)), "sum") == plan  # the pinned one
    assert (tmp_path / secure_node.SECURE_PLAN_FILE).exists()
    with pytest.raises(LocalError, match="the pinned secure plan"):
        secure_node.plan_for(node(cons(2000)), "sum")


def test_a_member_pushing_the_dp_sum_out_of_bounds_fails_the_round_by_name():
    """sum_only has no per-member check: a member (its real key) whose integer vector is
    within the per-coordinate bound but pushes the sum past the bound of an honest sum
    makes the round fail "aggregate_out_of_bounds" at every member: nothing is applied (the
    robustness of DP on the sum is this aggregate check, docs/privacy-secure.md)."""
    import numpy as np

    from node.secagg.encoding import IntegerCodec
    from tests.test_secure_round import SecureNet

    vectors = {f"bank-{i}": np.full(6, 3, dtype=np.int64) for i in range(8)}
    vectors["bank-7"] = np.full(6, 1000, dtype=np.int64)  # at the bound alone: accepted
    net = SecureNet(8, 2, variant="sum_only", vectors=vectors)
    net.codec = IntegerCodec(8, 6, 1000)
    for m in net.members.values():
        m.secure.codec, m.secure.floor = net.codec, 6
    net.run()
    for m in net.names[:7]:
        o = net.outcome(m)
        assert not o.ok and o.reason == "aggregate_out_of_bounds" and o.total is None, o


def test_a_step_message_is_stored_before_it_leaves_and_a_restart_resends_it(tmp_path):
    """Review finding H2: a member's check/degree2/sum message is stored (outbox/round-N.<step>)
    before it is sent; after a restart, whatever the round's state computes now, the stored
    message is re-sent byte for byte and read as ours: never a second, different sum piece
    (two sum pieces over different selections reveal their difference)."""
    import asyncio

    from gossip.envelope import KIND_SECAGG, decode_outer, pack
    from gossip.protocol import events as ev
    from node.runtime import secure_node
    from node.runtime.state import StateDir
    from tests.helpers import keys

    key = keys(1)[0]
    seq = iter(range(100))

    class Rounds:  # the round's own computation of the step: another body after the restart
        def __init__(self, body: bytes):
            self.body, self.kept = body, {}

        def phase(self, r, phase, got, deals, reveals=None):
            return self.body

        def keep_own(self, r, phase, body):
            self.kept[(r, phase)] = bytes(body)

    def run(body: bytes) -> tuple[list[bytes], Rounds]:
        sent: list[bytes] = []
        rounds = Rounds(body)

        async def broadcast(r, data):
            sent.append(data)

        async def in_background(coro, what):
            await coro

        node = SimpleNamespace(
            name="site-0", state=StateDir(tmp_path / "state"),
            secure=SimpleNamespace(rounds=rounds, restored={}),
            book=SimpleNamespace(shares=lambda r: {}, neighbours={"site-1", "site-2"}),
            _sign=lambda kind, r, b: pack(key, b"c" * 32, kind, r, next(seq), b),
            _broadcast=broadcast, _in_background=in_background)
        asyncio.run(secure_node.send_phase(node, ev.SendPhase(3, "sum", ("site-1", "site-2"))))
        return sent, rounds

    (tmp_path / "state" / "outbox").mkdir(parents=True)
    first, _ = run(b"sum piece over {a, b, c}")
    path = secure_node.step_path(SimpleNamespace(state=StateDir(tmp_path / "state")), 3, "sum")
    assert path.read_bytes() == first[0]
    env = decode_outer(first[0])
    assert (env.kind, env.round, bytes(env.body)) == (KIND_SECAGG, 3, b"sum piece over {a, b, c}")
    again, rounds = run(b"sum piece over {a, b}")  # the restarted member's view changed
    assert again == first  # the stored message, byte for byte, not a second piece
    assert rounds.kept == {(3, "sum"): b"sum piece over {a, b, c}"}


def test_a_member_with_privacy_off_in_a_dp_consortium_is_refused_by_name(tmp_path):
    """The [rules] plan DP on the sum; one member's own config says privacy.mode = "off".
    setup took the plain path: a FixedPoint codec and no noise share under the same
    consortium id as the others' IntegerCodec and noise, so its vector entered everyone's
    sum at another scale, unnoised, while the others' ledgers charged the plan, which counts
    it among the noise contributors. Refused at the start, naming the setting (review s5)."""
    from gossip.membership import Consortium
    from node.runtime import secure_node
    from node.strategy.consortium_rules import pin_rules, rules_table
    from tests.helpers import consortium, keys

    base = consortium(keys(5))
    dp = {"secure_rows": 1000, "secure_epsilon": 3.0, "secure_delta": 1e-5}
    cons = Consortium(base.name, base.schema, base.members,
                      pin_rules(rules_table(5, secure=True, secure_dp=dp, clip=1.0), 5))
    node = SimpleNamespace(consortium=cons, sealing=object(), name="bank-0",
                           model=torch.nn.Linear(4, 3), state=SimpleNamespace(path=tmp_path),
                           cfg=SimpleNamespace(privacy=SimpleNamespace(mode="off"),
                                               gossip=SimpleNamespace(max_envelope_bytes=1 << 26)))
    with pytest.raises(LocalError, match="privacy.mode = 'off'.*secure_rows"):
        secure_node.setup(node)
    assert not (tmp_path / secure_node.SECURE_PLAN_FILE).exists()

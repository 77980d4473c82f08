"""Write the golden files of tests/golden/ with today's code (tests/test_golden.py checks them).

Run ONLY when a contract changes on purpose (a new message kind, a new checkpoint
field, a reworded --help), never to make a failing golden test pass by accident: every
file here is what deployed nodes and their operators already hold. Say in the commit
message which contract changed and why. From the repository root:

    PYTHONPATH=$PWD python tests/golden/make_golden.py \
        [--only wire,consortium,run,help,records,resume,prometheus,echo,secure,compressed]

What it writes (all small, KBs):

  wire.json         one fixed-key envelope of every kind in gossip.envelope.KINDS (Ed25519
                    signatures are deterministic, so the bytes are exact), a prekey
                    announcement (fixed X25519 keys: exact), and a sealed share made once
                    (sealing draws a fresh key and nonce from the OS: stored, and checked
                    to open with the stored prekey)
  consortium.toml   a consortium file built from fixed keys; its id line is the contract
  run/              a 2-member, 2-round logreg run of `flnode simulate` (churn, record-level
                    DP, sealing on): the consortium file, member telco-0's config and keys
                    (TEST KEYS, published here, never use them), and its state dir
                    (checkpoint, ledger, privacy plan, seq); the data is not kept (the same
                    seed regenerates it)
  run.json          what loading run/ must give: checkpoint keys, plan fields, epsilon
  help/*.txt        `flnode ... --help` of every (sub)command at COLUMNS=100
  records.json      a seeded 3-member `flnode simulate` run with two hostile members
                    (SIM_ARGV): the key set and value types of each audit.jsonl and
                    metrics.jsonl writer, the stable values of every line but the
                    accepted ones, and its summary.json (minus the volatile fields); plus
                    the shape of the two audit writers that run does not reach (federated
                    normalization, a member's message refused on content: federated_run)
  resume/           an UNFINISHED run (the run/ settings, both members, their data): both
                    closed round 0 of 2 and stopped; telco-0 then released its round-1
                    share (charged, in its outbox) and stopped again before sending it
  resume.json       what completing resume/ with today's node gives: ledger records, ε
  prometheus.json   the Prometheus metric families a node exposes (name, type, labels)
  echo_records.json the audit writers of the digest echo ([rules] echo = true): the key
                    set and value types of the "agreement" and "exclusion" lines of a
                    seeded 3-member run with a split equivocator (ECHO_ARGV)
  secure_ledger.jsonl  the privacy ledger's "secure" record kind (issue 22): two secure-round
                    charges of a fixed plan (SECURE_PLAN: no calibration, exact bytes), one
                    per reveal ("sum", "per_member"), after a "count" charge
  secure_ledger.json   what reading it must give: records, epsilon at delta
  compressed.json   a share body and its envelope (bob, the wire.json keys and round) per
                    compressed codec (gossip/compress.py: fp16, int8, topk:0.5 in top-k's
                    wire version 2) of COMPRESSED_UPDATE, the stochastic rounding fed
                    fixed uniform numbers (COMPRESSED_UNIFORM): exact bytes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import msgpack
import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

HERE = Path(__file__).resolve().parent
HELP_COLUMNS = "100"
WIRE_ROUND = 3
# The seeds of the fixed keys; never a real member's.
SEEDS = {"alice": b"flnode golden alice".ljust(32, b"\x00"),
         "bob": b"flnode golden bob".ljust(32, b"\x00"),
         "carol": b"flnode golden carol".ljust(32, b"\x00")}
PREKEY_SEEDS = {3: b"flnode golden bob prekey 3".ljust(32, b"\x00"),
                4: b"flnode golden bob prekey 4".ljust(32, b"\x00")}
ROTATE_EVERY = 1  # epoch = round
CONSORTIUM_ID = bytes(range(32))  # the envelopes' consortium id (a fixed value, not a file's)
STATS_COLUMNS = 2
# The files of run/ that are the state-dir contract (audit.jsonl and metrics.jsonl are
# still changing, and final.json and released_weight.json belong with them: not frozen yet).
STATE_FILES = ("checkpoint.msgpack", "ledger.jsonl", "privacy_plan.json", "seq")
# The run of run/ (and of resume/, stopped half way).
RUN_ARGV = ["simulate", "--nodes", "2", "--rounds", "2", "--model", "logreg",
            "--dataset", "churn", "--partition", "iid", "--privacy", "record",
            "--epsilon", "3", "--seal", "on", "--seed", "0"]


def keys() -> dict[str, SigningKey]:
    return {n: SigningKey(s) for n, s in SEEDS.items()}


def prekeys() -> dict[int, PrivateKey]:
    return {e: PrivateKey(s) for e, s in PREKEY_SEEDS.items()}


def share_tensors() -> list[tuple[str, np.ndarray]]:
    return [("weight", np.arange(6, dtype="<f4").reshape(2, 3) / 4),
            ("bias", np.array([0.5, -1.25], dtype="<f2"))]


def bodies(sealed_body: bytes, deal_body: bytes | None = None) -> dict[str, bytes]:
    """One body per kind; the sealed ones are given (they are random): the sealed share,
    and the secure round's deal (None: wire.json's stored one)."""
    from gossip import bodies as B
    from gossip import envelope as E
    from gossip.seal import encode_announcement, sign_prekey

    k = keys()
    announce = encode_announcement(
        [sign_prekey(k["bob"], CONSORTIUM_ID, e, p.public_key) for e, p in sorted(prekeys().items())],
        hello=True)
    out = {
        E.KIND_SHARE: B.encode_share(share_tensors(), 120.0),
        E.KIND_SEALED: sealed_body,
        E.KIND_PREKEY: announce,
        E.KIND_RETIRE: b"",
        E.KIND_HELLO: E.HELLO_ASK,
        E.KIND_SEEN: B.encode_seen([(bytes(k["carol"].verify_key), bytes(range(32, 64)))]),
        E.KIND_STATS: B.encode_stats(B.Stats(500.0, np.array([1.5, -2.0]),
                                             np.array([10.25, 8.0]))),
        E.KIND_NORM: B.NORM_USABLE,
        E.KIND_FINAL: bytes(range(64, 96)),
        E.KIND_ECHO: B.encode_echo([(bytes(k["alice"].verify_key), bytes(range(96, 128))),
                                    (bytes(k["bob"].verify_key), bytes(range(128, 160)))]),
        E.KIND_DEAL: deal_body if deal_body is not None else bytes.fromhex(
            json.loads((HERE / "wire.json").read_text())["sealed_deal"]),
        E.KIND_SECAGG: B.encode_secagg(B.SecAgg("check", (secagg_piece(),), (1, 2, 3))),
    }
    assert set(out) == set(E.KINDS), "a kind without a golden body: add it here"
    return out


def secagg_piece(kind: int = 3, owner: int = 0, holder: int = 2, count: int = 6) -> bytes:
    """A secure-aggregation piece's bytes (node/secagg/pieces.py's layout, written out here
    so the golden needs no numpy field code): bob (member 2) opening a check of 3 members."""
    import struct

    head = struct.pack("<4sBBHHHQI", b"FLSA", 2, kind, owner, holder, 0, WIRE_ROUND, count)
    # version 2: the values 1000 + i packed at 61 bits (value i at bits 61i .. 61i + 60)
    packed = sum((1000 + i) << (61 * i) for i in range(count))
    return head + packed.to_bytes((61 * count + 7) // 8, "little")


# A deal's commitment for the golden deal: 3 holders x 32 bytes (fixed, not computed: the
# golden freezes the frame, node/runtime/secure_round.py checks the digests).
DEAL_COMMITMENT = bytes(range(96))


def make_sealed_deal() -> bytes:
    """Bob's deal for alice (his VECTOR and MASK pieces for holder 1 and his commitment)
    sealed to alice's prekey (epoch = WIRE_ROUND)."""
    from gossip import bodies as B
    from gossip.seal import seal, seal_ad, sign_prekey

    k = keys()
    alice_prekey = PrivateKey(PREKEY_SEEDS[WIRE_ROUND][::-1])
    signed = sign_prekey(k["alice"], CONSORTIUM_ID, WIRE_ROUND, alice_prekey.public_key)
    body = B.encode_secagg(B.SecAgg("deal", (secagg_piece(1, 2, 1, 5), secagg_piece(2, 2, 1, 7),
                                             DEAL_COMMITMENT)))
    head, ct = seal(body, {"alice": signed}, seal_ad(CONSORTIUM_ID, bytes(k["bob"].verify_key),
                                                     WIRE_ROUND))
    return head + ct


def make_sealed_body() -> bytes:
    """A plain share body sealed by bob for alice's prekeys (epoch = WIRE_ROUND)."""
    from gossip import bodies as B
    from gossip.seal import seal, seal_ad, sign_prekey

    k = keys()
    alice_prekey = PrivateKey(PREKEY_SEEDS[WIRE_ROUND][::-1])  # alice's own, not bob's
    signed = sign_prekey(k["alice"], CONSORTIUM_ID, WIRE_ROUND, alice_prekey.public_key)
    head, ct = seal(B.encode_share(share_tensors(), 120.0), {"alice": signed},
                    seal_ad(CONSORTIUM_ID, bytes(k["bob"].verify_key), WIRE_ROUND))
    return head + ct


def make_wire() -> None:
    from gossip import envelope as E

    old = HERE / "wire.json"
    # The sealed body is random: keep the stored one unless asked to make a new one.
    if old.exists() and "--reseal" not in sys.argv:
        sealed = bytes.fromhex(json.loads(old.read_text())["sealed_body"])
    else:
        sealed = make_sealed_body()
    stored = json.loads(old.read_text()) if old.exists() else {}
    deal = (bytes.fromhex(stored["sealed_deal"]) if "sealed_deal" in stored
            and "--reseal" not in sys.argv else make_sealed_deal())
    k = keys()
    doc = {
        "kinds": sorted(E.KINDS),
        "consortium_id": CONSORTIUM_ID.hex(),
        "round": WIRE_ROUND,
        "seeds": {n: s.hex() for n, s in SEEDS.items()},
        "sender": "bob",
        "prekey_seeds": {str(e): s.hex() for e, s in PREKEY_SEEDS.items()},
        "alice_prekey_private": PREKEY_SEEDS[WIRE_ROUND][::-1].hex(),
        "sealed_body": sealed.hex(),
        "sealed_deal": deal.hex(),
        "envelopes": {},
    }
    # A kind keeps the seq it was frozen with (a new kind takes the next free one), so a
    # new kind adds a golden envelope and changes none of the others' bytes.
    frozen = json.loads(old.read_text())["envelopes"] if old.exists() else {}
    seqs = {kind: e["seq"] for kind, e in frozen.items()}
    for kind in sorted(set(E.KINDS) - set(seqs)):
        seqs[kind] = max(seqs.values(), default=-1) + 1
    for kind, body in sorted(bodies(sealed, deal).items()):
        seq = seqs[kind]
        doc["envelopes"][kind] = {
            "seq": seq, "body": body.hex(),
            "bytes": E.pack(k["bob"], CONSORTIUM_ID, kind, WIRE_ROUND, seq, body).hex()}
    (HERE / "wire.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def make_consortium() -> None:
    from gossip.membership import Consortium, Member, save_consortium

    k = keys()
    schema = {"label": "outcome", "classes": ["no", "yes"],
              "columns": [{"name": "age", "kind": "numeric", "min": 18.0, "max": 99.0},
                          {"name": "region", "kind": "categorical",
                           "vocabulary": ["east", "west"]}]}
    members = tuple(
        Member(n, bytes(k[n].verify_key),
               {"mqtt": "mqtts://broker.example:8883",
                "libp2p": f"/ip4/192.0.2.{i + 1}/tcp/4001"})
        for i, n in enumerate(sorted(k)))
    c = Consortium("golden", schema, members, {"aggregation": "mean"})
    save_consortium(c, HERE / "consortium.toml")


def make_run() -> None:
    from node.cli import main
    from node.privacy.budget import PrivacyPlan
    from node.privacy.ledger import Ledger
    from node.runtime.state import StateDir

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        rc = main([*RUN_ARGV, "--out", str(out)])
        assert rc == 0, f"flnode simulate failed ({rc})"
        dest = HERE / "run"
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "state" / "telco-0").mkdir(parents=True)
        (dest / "keys").mkdir()
        (dest / "nodes").mkdir()
        shutil.copy(out / "consortium.toml", dest / "consortium.toml")
        shutil.copy(out / "nodes" / "telco-0.toml", dest / "nodes" / "telco-0.toml")
        for f in ("telco-0.key", "telco-0.pub", "telco-1.pub"):
            shutil.copy(out / "keys" / f, dest / "keys" / f)
        for f in STATE_FILES:
            shutil.copy(out / "state" / "telco-0" / f, dest / "state" / "telco-0" / f)

    state = StateDir(dest / "state" / "telco-0")
    cp = state.load_checkpoint()
    raw = msgpack.unpackb(state.checkpoint_path.read_bytes(), raw=False)
    plan = PrivacyPlan.load(state.path / "privacy_plan.json")
    assert cp is not None and plan is not None
    doc = {
        "checkpoint_keys": list(raw),  # in the order written
        "checkpoint": {"next_round": cp.next_round, "seq": cp.seq,
                       "model_bytes": len(cp.model), "planned_rounds": cp.planned_rounds,
                       "ledger_records": cp.ledger_records, "ledger_digest": cp.ledger_digest},
        "plan": json.loads((state.path / "privacy_plan.json").read_text()),
        "ledger_records": len(Ledger(state.ledger_path).records),
        "epsilon": Ledger(state.ledger_path).epsilon(plan.delta),
    }
    (HERE / "run.json").write_text(json.dumps(doc, indent=1) + "\n")


# --- audit.jsonl / metrics.jsonl records and summary.json: one seeded simulate run ------

# A 3-member, 2-round seeded run on the memory transport (in-process `flnode simulate`):
# record-level DP (the accountant), trimmed_mean aggregation, control variates, and two
# hostile members with valid keys: bank-1 equivocates (evidence + equivocation
# rejections), bank-2 equivocates split (seen-report claims). Every round closes on
# "all", so no deadline is waited for. Without the digest echo ("--echo off": a
# consortium built before [rules] echo; the run frozen here predates it): with it,
# bank-2's split share would be left out and no seen report would disagree.
SIM_ARGV = ["simulate", "--dataset", "default", "--nodes", "3", "--partition", "iid",
            "--echo", "off", "--rounds", "2", "--model", "logreg", "--privacy", "record", "--epsilon", "3",
            "--control-variates", "--aggregation", "trimmed_mean", "--seed", "0",
            "--attack", "equivocate:bank-1", "--attack", "equivocate-split:bank-2"]
# summary.json fields left out of the seeded run's contract. Byte counts: hello answers
# depend on who started first. The consortium id is no longer volatile: on a built-in table
# simulate derives every member key from --seed (prepare.py member_identity), and two runs
# of SIM_ARGV gave the same id (a34b22ad73eb1316…, 2026-12-07); it stays out only so the
# golden summary's bytes do not change (pinning it would be a deliberate regeneration).
SUMMARY_VOLATILE = ("consortium_id", "bytes")
# Record fields whose values change run to run (wall clock, fresh keys, arrival order).
RECORD_VOLATILE = frozenset({"time", "digest", "sig", "reported", "seconds", "bytes_sent",
                             "bytes_received", "round_bytes_sent", "round_bytes_received",
                             "where", "seq"})
SEQ_IN_TEXT = re.compile(r"(seq ?)\d+(?: and \d+)?")
# Nested dicts of fixed keys inside a record (the others are keyed by member or reason).
RECORD_NESTED = ("first", "second", "ours", "report", "intervals", "aggregation")
# Audit lines the node writes about itself, by their "kind" field (runner.py).
OWN_KINDS = ("evidence", "claim", "aggregate", "control", "normalization", "agreement",
             "exclusion")


def audit_writer(line: dict) -> str:
    """Which writer made an audit.jsonl line: the contract is one key set per writer."""
    if line.get("outcome") == "accepted":
        return "accepted"
    if line.get("kind") in OWN_KINDS:
        return line["kind"]
    if line.get("outcome") == "flood":
        return "flood"
    # refused: passed the verifier, refused on what it says; rejected: the verifier's no
    return "refused" if "kind" in line else "rejected"


def metrics_writer(line: dict) -> str:
    return "round" if "closed" in line else "stopped" if "stopped" in line else "unknown"


def json_type(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", int: "int",
            float: "float", type(None): "null"}[type(v)]


def record_shape(line: dict) -> dict:
    """Key -> JSON type, and the key sets of nested fixed-key objects."""
    shape: dict = {"keys": {k: json_type(v) for k, v in sorted(line.items())}}
    nested = {k: sorted(line[k]) for k in RECORD_NESTED if isinstance(line.get(k), dict)}
    if nested:
        shape["nested"] = nested
    return shape


def stable(v: object) -> object:
    """A record without its run-to-run volatile fields (recursively); a sequence number
    inside a text ("seq 3 and 4", "...-seq5.envelope") becomes "seq #" ("seq#"): how many hellos a
    member answered before depends on who started first."""
    if isinstance(v, dict):
        return {k: stable(x) for k, x in sorted(v.items()) if k not in RECORD_VOLATILE}
    if isinstance(v, list):
        return [stable(x) for x in v]
    if isinstance(v, str):
        return SEQ_IN_TEXT.sub(r"\1#", v)
    return v


def stable_lines(lines: list[dict], skip_accepted: bool) -> list[object]:
    """The stable values of a member's lines, in an order arrival cannot change (two
    members' reports of one round may come in either order)."""
    def order(x: dict) -> str:
        return json.dumps({k: v for k, v in x.items() if not isinstance(v, float)},
                          sort_keys=True)
    kept = [stable(x) for x in lines if not (skip_accepted and audit_writer(x) == "accepted")]
    return sorted(kept, key=order)


def read_records(run: Path) -> dict[str, dict[str, list[dict]]]:
    """{"audit"|"metrics": {member: [line, ...]}} of a simulate run directory."""
    out: dict[str, dict[str, list[dict]]] = {"audit": {}, "metrics": {}}
    for d in sorted((run / "state").iterdir()):
        for what in out:
            out[what][d.name] = [json.loads(x) for x in
                                 (d / f"{what}.jsonl").read_text().splitlines()]
    return out


def record_contract(run: Path) -> dict:
    """What records.json freezes from one run: each writer's shape, and the stable values
    of every line but the accepted ones (those are per message: shape only)."""
    recs = read_records(run)
    shapes: dict[str, dict] = {"audit": {}, "metrics": {}}
    for what, writer in (("audit", audit_writer), ("metrics", metrics_writer)):
        for lines in recs[what].values():
            for line in lines:
                shapes[what].setdefault(writer(line), record_shape(line))
    values = {
        "audit": {m: stable_lines(lines, True) for m, lines in recs["audit"].items()},
        "metrics": {m: stable_lines(lines, False) for m, lines in recs["metrics"].items()},
        "accepted_kinds": sorted({x["kind"] for lines in recs["audit"].values()
                                  for x in lines if audit_writer(x) == "accepted"}),
    }
    summary = json.loads((run / "summary.json").read_text())
    for k in SUMMARY_VOLATILE:
        summary.pop(k)
    return {"argv": SIM_ARGV, "shapes": shapes, "values": values, "summary": summary}


def run_flnode(argv: list[str], out: Path) -> None:
    """`flnode ARGV --out OUT` in-process on one torch thread (as the tests run it),
    threads restored."""
    import torch

    from node.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main([*argv, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, f"flnode {argv[0]} failed ({rc})"


def run_simulate(out: Path) -> None:
    run_flnode(SIM_ARGV, out)


# The audit writers the simulate run above does not reach: federated normalization (a
# consortium whose schema says normalize = "federated"; privacy off, 3 members, 1 round)
# and a message a member signed that passed the verifier but is refused on what it says
# (statistics no honest member could send, signed with bank-1's key, fed to bank-0).
FEDERATED_RANGES = {"balance": [0.0, 3000.0], "income": [0.0, 80000.0]}
FEDERATED_WRITERS = ("normalization", "refused", "flood")
# ... and a flood: bank-1 is made to have sent bank-0 this many messages more than its
# fair share of bank-0's intake before bank-0 reads any (the transport drops them unparsed
# and names bank-1: a flood audit line and the round's flood_by_sender in metrics.jsonl).
FLOOD_OVER = 100


def federated_run(out: Path) -> Path:
    """Run FEDERATED in `out`; returns bank-0's state dir (its audit.jsonl has both)."""
    from gossip import bodies as B
    from gossip import envelope as E
    from gossip.membership import Consortium, load_consortium, save_consortium
    from gossip.transports.base import SENDER_QUEUE_MESSAGES, Incoming, RateBudget
    from gossip.transports.memory import MemoryHub
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime.config import load_config
    from node.runtime.identity import load_identity
    from node.runtime.node import Node

    spec = SimulationSpec(dataset="default", nodes=3, partition="iid", rounds=1, seed=0,
                          out=out, privacy="off", sigma=1.0, model="logreg")
    prep = prepare(spec)
    c = prep.consortium
    columns = [{k: v for k, v in col.items() if k not in ("mean", "std")}
               | {"range": FEDERATED_RANGES[col["name"]]} if col["kind"] == "numeric"
               else col for col in c.schema["columns"]]
    save_consortium(Consortium(c.name, {**c.schema, "columns": columns,
                                        "normalize": "federated"}, c.members, c.rules),
                    out / "consortium.toml")
    hub = MemoryHub()
    # Only the queue bound drops here (a rate budget no flood of this size exhausts), and
    # bank-0 reads the whole queued flood before the others start: bank-1's own vote and
    # statistics then always find room. Otherwise, on a busy machine, they were dropped as
    # over its share and both members waited out the statistics deadline (300 s).
    roomy = RateBudget(rate_per_s=1e6, burst=10 * (SENDER_QUEUE_MESSAGES + FLOOD_OVER))
    transports = [hub.attach(n, prep.names, sender_rate=roomy if n == "bank-0" else None)
                  for n in prep.names]
    nodes = [Node.from_config(load_config(p), t)
             for p, t in zip(prep.config_paths, transports, strict=True)]

    async def run() -> None:
        for i in range(SENDER_QUEUE_MESSAGES + FLOOD_OVER):
            await hub.deliver("bank-1", "bank-0", b"flood %d" % i)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(nodes[0].run())
            while transports[0].queued_from("bank-1"):
                await asyncio.sleep(0.01)  # an event poll: bank-0 drains what was queued
            for n in nodes[1:]:
                tg.create_task(n.run())

    asyncio.run(run())
    bank1 = load_identity(out / "keys" / "bank-1.key").signing_key
    stats = B.encode_stats(B.Stats(5.0, np.array([1.0, 2.0]), np.array([3.0, 9.0])))
    cid = load_consortium(out / "consortium.toml").id
    nodes[0].handle(Incoming(E.pack(bank1, cid, E.KIND_STATS, 0, 1000, stats), "bank-1"))
    return out / "state" / prep.names[0]


def make_records() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_simulate(Path(tmp) / "run")
        doc = record_contract(Path(tmp) / "run")
        state = federated_run(Path(tmp) / "federated")
        audit = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
        for w in FEDERATED_WRITERS:
            doc["shapes"]["audit"][w] = record_shape(next(x for x in audit
                                                         if audit_writer(x) == w))
        # A round line of a round with a flood has one key more: flood_by_sender.
        doc["flooded_round"] = record_shape(
            json.loads((state / "metrics.jsonl").read_text().splitlines()[0]))
    (HERE / "records.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


# --- an unfinished run: resumed by today's node ----------------------------------------

RESUME_CRASH_ROUND = 0  # both members close round 0 of 2 and stop (a crash after it)
# The member that, restarted, released its round-1 share (trained, noised, charged,
# stored in its outbox) and crashed again before sending it: resuming must re-send
# those bytes, never re-train them (the privacy invariant).
RESUME_RELEASED = "telco-0"


# Resumed, this member is configured for one round more than its privacy plan (an operator
# raising training.rounds): it must stop sharing at the budget, not overspend it, and say
# so in a "stopped" metrics.jsonl line and a retire message.
RESUME_OVER_BUDGET = "telco-1"


class _Crash(Exception):
    """What make_resume raises to stop a member after a round, as a kill would."""


async def _crash_after(nodes: list) -> None:
    def stop(report) -> None:
        if report.round == RESUME_CRASH_ROUND:
            raise _Crash

    async def one(node) -> None:
        try:
            await node.run(stop)
        except* _Crash:
            pass

    await asyncio.gather(*(one(n) for n in nodes))


def resume_nodes(run: Path, hub, noise=None) -> list:
    """Today's nodes of the members of a copied resume/ dir, on one memory hub."""
    from node.runtime.config import load_config
    from node.runtime.node import Node

    names = sorted(p.stem for p in (run / "nodes").glob("*.toml"))
    return [Node.from_config(load_config(run / "nodes" / f"{n}.toml"), hub.attach(n, names),
                             None if noise is None else noise(i))
            for i, n in enumerate(names)]


def make_resume() -> None:
    from gossip.transports.memory import MemoryHub
    from node.cli import build_parser
    from node.privacy.mechanisms import SeededNoise
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.scenario import spec_from_args

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        spec = spec_from_args(build_parser().parse_args([*RUN_ARGV, "--out", str(out)]))
        prepare(spec)
        asyncio.run(_crash_after(resume_nodes(out, MemoryHub(), SeededNoise)))
        again = next(n for n in resume_nodes(out, MemoryHub(), SeededNoise)
                     if n.name == RESUME_RELEASED)
        released = asyncio.run(again._release(RESUME_CRASH_ROUND + 1))  # noqa: SLF001
        assert released is not None and not released[3], "round 1 was not released afresh"
        dest = HERE / "resume"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(out, dest)
    # The run's own output that is not part of the state a restart reads.
    for p in dest.glob("*.png"):
        p.unlink()
    make_resume_json()


def copy_resume(dest: Path) -> Path:
    """A copy of resume/ a node may write to (git keeps no 0600 on the keys)."""
    shutil.copytree(HERE / "resume", dest)
    for key in (dest / "keys").glob("*.key"):
        key.chmod(0o600)
    return dest


def finish_resume(run: Path) -> list:
    """Complete a copy of resume/ with today's nodes (OS noise, as a restart has),
    RESUME_OVER_BUDGET given one round more than its plan."""
    from gossip.transports.memory import MemoryHub

    over = run / "nodes" / f"{RESUME_OVER_BUDGET}.toml"
    text = over.read_text()
    assert "\nrounds = 2\n" in text
    over.write_text(text.replace("\nrounds = 2\n", "\nrounds = 3\n"))
    nodes = resume_nodes(run, MemoryHub())

    async def both() -> None:
        async with asyncio.TaskGroup() as tg:
            for n in nodes:
                tg.create_task(n.run())

    asyncio.run(both())
    return nodes


def ledger_of(state: Path) -> dict:
    from node.privacy.budget import PrivacyPlan
    from node.privacy.ledger import Ledger

    plan = PrivacyPlan.load(state / "privacy_plan.json")
    ledger = Ledger(state / "ledger.jsonl")
    return {"records": len(ledger.records), "rounds": [r.round for r in ledger.records],
            "epsilon": ledger.epsilon(plan.delta)}


def make_resume_json() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_resume(Path(tmp) / "run")
        finish_resume(run)
        doc = {d.name: ledger_of(d) for d in sorted((run / "state").iterdir())}
        lines = (run / "state" / RESUME_OVER_BUDGET / "metrics.jsonl").read_text().splitlines()
        stopped = json.loads(lines[-1])
        assert metrics_writer(stopped) == "stopped"
        doc["stopped"] = {"shape": record_shape(stopped), "line": stable(stopped)}
    (HERE / "resume.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def prometheus_families(node) -> dict[str, dict]:
    """name -> type and label names of every family a node's collector yields."""
    from node.runtime.metrics import NodeCollector

    out = {}
    for fam in NodeCollector(node).collect():
        labels = set(getattr(fam, "_labelnames", ()))  # declared, even with no sample
        for sample in fam.samples:
            labels |= set(sample.labels)
        out[fam.name] = {"type": fam.type, "labels": sorted(labels)}
    return out


def make_prometheus() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        node = finish_resume(copy_resume(Path(tmp) / "run"))[0]
        doc = prometheus_families(node)
    (HERE / "prometheus.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def help_commands() -> list[list[str]]:
    """argv prefixes of flnode and every subcommand, walked from the parser itself."""
    from node.cli import build_parser

    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        found.append(prefix)
        for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                for name, child in action.choices.items():
                    walk(child, [*prefix, name])

    walk(build_parser(), [])
    return found


def help_text(argv: list[str]) -> str:
    """What `flnode ARGV --help` prints, at COLUMNS=HELP_COLUMNS."""
    from node.cli import main

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main([*argv, "--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return buf.getvalue()


def help_file(argv: list[str]) -> Path:
    return HERE / "help" / ("-".join(["flnode", *argv]) + ".txt")


def make_help() -> None:
    shutil.rmtree(HERE / "help", ignore_errors=True)
    (HERE / "help").mkdir()
    for argv in help_commands():
        help_file(argv).write_text(help_text(argv))


# --- the digest echo's records (issue 19): a run with [rules] echo = true ----------------

# 3 members, 2 rounds, bank-2 sends each member its own version of its share (split
# equivocation): both honest members leave it out ("exclusion" lines with the evidence
# file) and write one "agreement" line per round.
ECHO_ARGV = ["simulate", "--dataset", "default", "--nodes", "3", "--partition", "iid",
             "--rounds", "2", "--model", "logreg", "--privacy", "off", "--seed", "0",
             "--attack", "equivocate-split:bank-2"]
ECHO_WRITERS = ("agreement", "exclusion")


def echo_contract(run: Path) -> dict:
    """The shapes of the echo's audit writers in `run` (bank-0's audit.jsonl)."""
    lines = read_records(run)["audit"]["bank-0"]
    return {"argv": ECHO_ARGV, "shapes": {w: record_shape(next(x for x in lines
                                                               if audit_writer(x) == w))
                                          for w in ECHO_WRITERS}}


def run_echo(out: Path) -> None:
    run_flnode(ECHO_ARGV, out)


def make_echo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_echo(Path(tmp) / "run")
        doc = echo_contract(Path(tmp) / "run")
    (HERE / "echo_records.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


# --- the ledger's "secure" record kind (issue 22) ---------------------------------------------

# A plan with every number fixed (8 members, coalition 2, the digits MLP's 4,810 parameters,
# granularity C / 2^9): the record bytes depend on nothing calibrated.
SECURE_PLAN = {"epsilon": 3.0, "delta": 1e-5, "members": 8, "coalition": 2, "min_contributors": 6,
               "variant": "sum_only", "dim": 4810, "clip_norm": 1.0, "granularity": 2.0 ** -9,
               "noise_multiplier": 4.0, "sample_rate": 0.25, "steps": 40, "rows_total": 1437,
               "lr": 0.8}


def secure_ledger(path: Path) -> dict:
    """Write the golden secure ledger at `path` with today's code; what reading it gives."""
    import dataclasses

    from node.privacy.accountant import LedgerRecord
    from node.privacy.ledger import Ledger
    from node.privacy.secure import SecurePlan, charge_secure_round

    plan = SecurePlan(**SECURE_PLAN)
    ledger = Ledger(path)
    ledger.charge(LedgerRecord(-1, "count", 10.0, 1.0, 1, 1.0, "weight:golden"))
    charge_secure_round(ledger, plan, round_=0, digest="golden-0")
    charge_secure_round(ledger, dataclasses.replace(plan, variant="distances"), round_=1,
                        contributors=8, digest="golden-1")
    return {"records": len(ledger.records), "modes": [r.mode for r in ledger.records],
            "epsilon": Ledger(path).epsilon(plan.delta), "delta": plan.delta}


# compressed.json (issue 24): the update every codec encodes, and the "uniform" numbers
# its stochastic rounding reads (fixed, so the bytes are exact; a node draws them from
# the OS). 12 values of one tensor and 2 of another: top-k at 0.5 keeps 6 and 1.
COMPRESSED_CODECS = ("fp16", "int8", "topk:0.5")
COMPRESSED_UNIFORM = 0.25


def compressed_update() -> list[tuple[str, np.ndarray]]:
    return [("weight", (np.arange(12, dtype="<f4").reshape(3, 4) - 5.5) / 8),
            ("bias", np.array([0.75, -0.125], dtype="<f4"))]


def compressed_bodies() -> dict[str, bytes]:
    from gossip import bodies as B
    from gossip import compress as C

    out = {}
    for name in COMPRESSED_CODECS:
        codec = C.parse_codec(name)
        comp = C.compress(codec, compressed_update(),
                          lambda n: np.full(n, COMPRESSED_UNIFORM))
        out[name] = B.encode_compressed_share(codec, comp, 120.0)
    return out


def make_compressed() -> None:
    from gossip import envelope as E

    k = keys()
    doc = {"codecs": {}, "round": WIRE_ROUND, "sender": "bob",
           "consortium_id": CONSORTIUM_ID.hex()}
    for seq, (name, body) in enumerate(sorted(compressed_bodies().items())):
        doc["codecs"][name] = {
            "seq": seq, "body": body.hex(),
            "bytes": E.pack(k["bob"], CONSORTIUM_ID, E.KIND_SHARE, WIRE_ROUND, seq, body).hex()}
    (HERE / "compressed.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def make_secure() -> None:
    out = HERE / "secure_ledger.jsonl"
    out.unlink(missing_ok=True)
    doc = secure_ledger(out)
    (HERE / "secure_ledger.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only",
                   default="wire,consortium,run,help,records,resume,prometheus,echo,secure,"
                           "compressed")
    p.add_argument("--reseal", action="store_true",
                   help="make a new sealed share (otherwise the stored one is kept)")
    args = p.parse_args()
    parts = {"wire": make_wire, "consortium": make_consortium, "run": make_run, "help": make_help,
             "records": make_records, "resume": make_resume, "prometheus": make_prometheus,
             "echo": make_echo, "secure": make_secure, "compressed": make_compressed}
    for name in args.only.split(","):
        parts[name]()
        print(f"wrote {name}")


if __name__ == "__main__":
    main()

"""Write the golden files of tests/golden/ with today's code (tests/test_golden.py checks them).

Run ONLY when a contract changes on purpose (a new message kind, a new checkpoint
field, a reworded --help), never to make a failing golden test pass by accident: every
file here is what deployed nodes and their operators already hold. Say in the commit
message which contract changed and why. From the repository root:

    PYTHONPATH=$PWD python tests/golden/make_golden.py [--only wire,consortium,run,help]

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
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
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


def keys() -> dict[str, SigningKey]:
    return {n: SigningKey(s) for n, s in SEEDS.items()}


def prekeys() -> dict[int, PrivateKey]:
    return {e: PrivateKey(s) for e, s in PREKEY_SEEDS.items()}


def share_tensors() -> list[tuple[str, np.ndarray]]:
    return [("weight", np.arange(6, dtype="<f4").reshape(2, 3) / 4),
            ("bias", np.array([0.5, -1.25], dtype="<f2"))]


def bodies(sealed_body: bytes) -> dict[str, bytes]:
    """One body per kind; the sealed one is given (it is random)."""
    from gossip import envelope as E
    from gossip.seal import encode_announcement, sign_prekey

    k = keys()
    announce = encode_announcement(
        [sign_prekey(k["bob"], CONSORTIUM_ID, e, p.public_key) for e, p in sorted(prekeys().items())],
        hello=True)
    out = {
        E.KIND_SHARE: E.encode_share(share_tensors(), 120.0),
        E.KIND_SEALED: sealed_body,
        E.KIND_PREKEY: announce,
        E.KIND_RETIRE: b"",
        E.KIND_HELLO: E.HELLO_ASK,
        E.KIND_SEEN: E.encode_seen([(bytes(k["carol"].verify_key), bytes(range(32, 64)))]),
        E.KIND_STATS: E.encode_stats(E.Stats(500.0, np.array([1.5, -2.0]),
                                             np.array([10.25, 8.0]))),
        E.KIND_NORM: E.NORM_USABLE,
        E.KIND_FINAL: bytes(range(64, 96)),
    }
    assert set(out) == set(E.KINDS), "a kind without a golden body: add it here"
    return out


def make_sealed_body() -> bytes:
    """A plain share body sealed by bob for alice's prekeys (epoch = WIRE_ROUND)."""
    from gossip import envelope as E
    from gossip.seal import seal, seal_ad, sign_prekey

    k = keys()
    alice_prekey = PrivateKey(PREKEY_SEEDS[WIRE_ROUND][::-1])  # alice's own, not bob's
    signed = sign_prekey(k["alice"], CONSORTIUM_ID, WIRE_ROUND, alice_prekey.public_key)
    head, ct = seal(E.encode_share(share_tensors(), 120.0), {"alice": signed},
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
        "envelopes": {},
    }
    for seq, (kind, body) in enumerate(sorted(bodies(sealed).items())):
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
        rc = main(["simulate", "--nodes", "2", "--rounds", "2", "--model", "logreg",
                   "--dataset", "churn", "--partition", "iid", "--privacy", "record",
                   "--epsilon", "3", "--seal", "on", "--seed", "0", "--out", str(out)])
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="wire,consortium,run,help")
    p.add_argument("--reseal", action="store_true",
                   help="make a new sealed share (otherwise the stored one is kept)")
    args = p.parse_args()
    parts = {"wire": make_wire, "consortium": make_consortium, "run": make_run, "help": make_help}
    for name in args.only.split(","):
        parts[name]()
        print(f"wrote {name}")


if __name__ == "__main__":
    main()

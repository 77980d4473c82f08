#!/usr/bin/env python3
"""SIGKILL a node at random moments, restart it, and check what a security officer asks.

Two members run as `flnode run` processes over libp2p on 127.0.0.1 (record-
level DP by default). The victim is killed with SIGKILL at a uniformly random
moment (--min/--max seconds after it started), restarted on the same state
dir, again and again. Each kill waits for the state it needs first (a new
release charged to the victim's ledger since it started), then a random
--min..--max seconds more, so a loaded machine's slow start never turns a
kill into a no-op. Afterwards, using only what left the victim (the
peer's audit log) and what the victim wrote (its ledger):

1. every round for which the peer accepted a share from the victim has a
   ledger record in the victim's state dir, charged before it was sent; so
   the epsilon the victim reports (recomputed from its ledger) is never
   below the epsilon of what it actually released;
2. the peer never accepted two different shares from the victim for one
   round (no equivocation, no sequence reuse);
3. the epsilon the victim reports never goes down across restarts.

Prints a table, writes DIR/crash_test.json; --json prints only the JSON.
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.ops.status import collect  # noqa: E402
from node.rehearsal.simulation.prepare import prepare  # noqa: E402
from node.rehearsal.simulation.spec import SimulationSpec  # noqa: E402
from node.runtime.state import read_jsonl  # noqa: E402
from scripts.ports import free_ports  # noqa: E402


def start(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ledger_records(state: Path) -> list[dict]:
    return read_jsonl(state / "ledger.jsonl")


def wait_for_release(proc: subprocess.Popen, state: Path, before: int, timeout: float) -> bool:
    """Until the victim has charged a new release (or died, or `timeout` passed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if len(ledger_records(state)) > before:
            return True
        time.sleep(0.05)
    return False


def reported_epsilon(state: Path) -> float:
    if not (state / "checkpoint.msgpack").exists():
        return 0.0
    return collect(state)["privacy"].get("epsilon_spent", 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--min", type=float, default=0.0,
                   help="earliest kill, s after the victim's first new release")
    p.add_argument("--max", type=float, default=3.0,
                   help="latest kill, s after the victim's first new release")
    p.add_argument("--wait", type=float, default=300.0,
                   help="give up on a start that releases nothing for this long")
    p.add_argument("--privacy", choices=["update", "record"], default="record")
    p.add_argument("--seed", type=int, default=0, help="data split and kill times (not noise)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out).resolve()
    ports = free_ports(2)
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=10_000,
                          seed=args.seed, out=out, privacy=args.privacy, clip=1.0,
                          epsilon=8.0, sigma=None, round_deadline_s=1.5, transport="libp2p")
    names = ["bank-0", "bank-1"]
    prep = prepare(spec, {n: {"libp2p": f"/ip4/127.0.0.1/tcp/{port}"}
                          for n, port in zip(names, ports, strict=True)})
    victim_cfg, peer_cfg = prep.config_paths
    victim_state, peer_state = out / "state" / "bank-0", out / "state" / "bank-1"
    (out / "logs").mkdir(exist_ok=True)
    peer = start(peer_cfg, out / "logs" / "bank-1.log")
    reported: list[float] = []
    kill_times = []
    stalled = 0
    t0 = time.monotonic()
    try:
        for k in range(args.kills):
            before = len(ledger_records(victim_state))
            victim = start(victim_cfg, out / "logs" / "bank-0.log")
            if not wait_for_release(victim, victim_state, before, args.wait):
                stalled += 1
            delay = rng.uniform(args.min, args.max)
            time.sleep(delay)
            victim.kill()
            victim.wait()
            kill_times.append(round(delay, 2))
            reported.append(reported_epsilon(victim_state))
            if not args.json:
                print(f"  kill {k + 1:>2}/{args.kills} after {delay:.2f} s: victim reports "
                      f"ε {reported[-1]:.4f}", flush=True)
        before = len(ledger_records(victim_state))
        victim = start(victim_cfg, out / "logs" / "bank-0.log")  # a last, clean stretch
        wait_for_release(victim, victim_state, before, args.wait)
        time.sleep(args.max)
        stop(victim)
        reported.append(reported_epsilon(victim_state))
    finally:
        stop(peer)
    elapsed = time.monotonic() - t0

    accepted: dict[int, set[str]] = {}
    for rec in read_jsonl(peer_state / "audit.jsonl"):  # follows its rotation
        if rec["member"] == "bank-0" and rec["outcome"] == "accepted" and \
                rec.get("kind", "share") in ("share", "sealed"):
            accepted.setdefault(rec["round"], set()).add(rec["digest"])
    peer_rejections = collect(peer_state)["rejected"] if \
        (peer_state / "checkpoint.msgpack").exists() else {}
    ledger = ledger_records(victim_state)
    ledger_rounds = {x["round"] for x in ledger}
    ledger_digests = {x["share_digest"] for x in ledger}
    # A release the peer accepted must be in the ledger: by digest (what the signature
    # covers; the ledger names releases by it), and so by round.
    unledgered = sorted(r for r, ds in accepted.items()
                        if r not in ledger_rounds or not ds <= ledger_digests)
    doubled = sorted(r for r, d in accepted.items() if len(d) > 1)
    decreases = [i for i in range(1, len(reported)) if reported[i] < reported[i - 1] - 1e-12]
    result = {
        "kills": args.kills, "privacy": args.privacy, "seconds": round(elapsed, 1),
        "kill_after_s": kill_times,
        "rounds_released_by_victim": len(accepted),
        "ledger_records": len(ledger),
        "starts_that_released_nothing": stalled,
        "epsilon_reported_after_each_kill": [round(e, 6) for e in reported],
        "released_without_ledger_record": unledgered,
        "rounds_with_two_different_shares": doubled,
        "peer_rejections": peer_rejections,
        "epsilon_decreases": decreases,
        "ok": bool(accepted) and not unledgered and not doubled and not decreases
        and not peer_rejections.get("equivocation") and not peer_rejections.get("seq_reuse"),
    }
    (out / "crash_test.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n{args.kills} SIGKILLs in {elapsed:.0f} s; the victim released "
              f"{len(accepted)} rounds that its peer accepted, with {result['ledger_records']} "
              f"ledger records")
        print(f"  released without a ledger record: {unledgered or 'none'}")
        print(f"  rounds with two different shares:  {doubled or 'none'}")
        print(f"  reported ε ever decreased:         {'yes ' + str(decreases) if decreases else 'no'}"
              f" (final {reported[-1]:.4f})")
        print(f"  peer's rejections of the victim:   {peer_rejections or 'none'}")
        print("  OK" if result["ok"] else "  FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

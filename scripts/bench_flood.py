#!/usr/bin/env python3
"""One member floods; do the honest members still get each other's shares? (issue 19)

Writes JSON to --out (default runs/bench/flood.json). Per transport (MQTT through a
mosquitto of this run's own with per-member accounts and ACL, and libp2p), two runs of
the demo consortium (4 members, `default`, 10 rounds, privacy off), one after the other:

Clean and flood runs alternate, `--repeats` pairs per transport (a shared machine's load
drifts); round times are pooled per run kind.

- clean: bank-0..2 as `flnode run` processes; bank-3 never starts;
- flood: the same, and bank-3's key in a separate flooder process that opens the real
  transport (`node.runtime.daemon.open_transport`, bank-3's broker account or libp2p host) and
  broadcasts validly signed 2 KB envelopes (a pool of POOL distinct ones, fresh sequence
  numbers, cycled) as fast as it can. libp2p: `broadcast` with many sends in flight.
  MQTT: by default (`--mqtt-flood raw`) QoS 0 publishes straight into the transport's
  own paho client on bank-3's connection and topic, without waiting for any ack (the
  highest rate one process reaches here); `--mqtt-flood transport` uses `broadcast`
  (QoS 1, each publish acknowledged by the broker).
  The envelopes are signed by bank-3 for another consortium id, so the honest nodes
  reject the ones they verify (`consortium`) and bank-3 counts as silent in both runs
  (a member that talks without sharing is finding 4, measured elsewhere); the
  transports' per-sender budget cannot tell them from any other bank-3 message.

Reported per honest member: the honest members' shares it received per round (goal:
both others, every round), its round seconds (median, flood / clean: goal <= 1.5), its
peak RSS in each run (growth goal <= 50 MB), what its transport dropped from bank-3
(`flood_by_sender`), and the flooder's achieved rate (messages/s sent).

    python scripts/bench_flood.py [--transport mqtt|libp2p|both] [--rounds 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from scripts.bench_node import (  # noqa: E402
    Mosquitto,
    child_env,
    prepare_mode,
    run_rounds,
)

HONEST = ["bank-0", "bank-1", "bank-2"]
FLOODER = "bank-3"
FLOOD_BYTES = 2048
# Publishes the flooder keeps in flight: enough that it is never waiting on one ack.
IN_FLIGHT = 512
POOL = 10_000
# Raw MQTT flood: paho's outgoing queue may hold this many packets before we let it drain.
RAW_BACKLOG = 2000
# A round waits this long for a missing member (bank-3 silent): the first round of
# each run waits it out, then bank-3 is absent (absent_after 1) in both runs alike.
ROUND_DEADLINE_S = 5.0
GOALS = {"round_time_ratio_max": 1.5, "rss_growth_mb_max": 50.0}


# --- the flooder (a child process) -----------------------------------------------------
async def flood(config: Path, stats_path: Path, raw: bool) -> None:
    from gossip import envelope
    from gossip.membership import load_consortium
    from node.runtime.config import load_config
    from node.runtime.daemon import open_transport
    from node.runtime.identity import load_identity

    cfg = load_config(config)
    ident = load_identity(cfg.identity.key)
    cons = load_consortium(cfg.consortium.path)
    transport = open_transport(cfg, ident, cons)
    await transport.start()
    other_id = bytes(32)  # valid signature, another consortium: rejected after verify
    body = os.urandom(FLOOD_BYTES - 200)
    pool = [envelope.pack(ident.signing_key, other_id, envelope.KIND_SHARE, 0, seq, body)
            for seq in range(POOL)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sent = 0
    slots = asyncio.Semaphore(IN_FLIGHT)
    t0 = time.monotonic()

    async def one(seq: int) -> None:
        nonlocal sent
        try:
            await transport.broadcast(pool[seq % POOL])
            sent += 1
        finally:
            slots.release()

    if raw:  # MQTT: QoS 0 on bank-3's own connection and topic, no ack awaited
        from gossip.transports.mqtt.broker import share_topic

        paho = transport._client._client  # noqa: SLF001 - the flooder's own connection
        topic = share_topic(cons.id, ident.name)
        while not stop.is_set():
            for _ in range(100):
                paho.publish(topic, pool[sent % POOL], qos=0)
                sent += 1
            while len(paho._out_packet) > RAW_BACKLOG and not stop.is_set():  # noqa: SLF001
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)
            if sent % 10_000 == 0:
                stats_path.write_text(json.dumps({"sent": sent, "seconds":
                                                  time.monotonic() - t0}))
    async with asyncio.TaskGroup() as tg:
        seq = 0
        while not stop.is_set() and not raw:
            await slots.acquire()
            tg.create_task(one(seq))
            seq += 1
            if seq % 1000 == 0:
                stats_path.write_text(json.dumps({"sent": sent, "seconds":
                                                  time.monotonic() - t0}))
    seconds = time.monotonic() - t0
    stats_path.write_text(json.dumps({"sent": sent, "seconds": seconds, "raw_qos0": raw,
                                      "dropped": transport.stats.dropped}))
    await transport.close()


# --- the bench -------------------------------------------------------------------------
def set_deadline(configs: list[Path]) -> None:
    for cfg in configs:
        doc = tomllib.loads(cfg.read_text())
        doc["gossip"]["round_deadline_s"] = ROUND_DEADLINE_S
        doc["gossip"]["absent_after"] = 1
        cfg.write_text(tomli_w.dumps(doc))


def read_metrics(config: Path) -> list[dict]:
    doc = tomllib.loads(config.read_text())
    state = (config.parent / doc["state_dir"]).resolve()
    lines = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines() if x]
    by_round = {ln["round"]: ln for ln in lines if "seconds" in ln}  # the last line wins
    return [by_round[r] for r in sorted(by_round)]


def one_run(transport: str, phase: str, rounds: int, work: Path, raw: bool) -> dict:
    prep = prepare_mode("off", transport, rounds, work / phase, "csv")
    configs = {c.stem: c for c in prep["configs"]}
    set_deadline(list(configs.values()))
    logs = work / phase / transport / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(prep["broker"], logs / "mosquitto.log") if transport == "mqtt" else None
    flooder = None
    stats_path = logs / "flooder.json"
    try:
        if broker is not None:
            broker.__enter__()
        if phase.startswith("flood"):
            flooder = subprocess.Popen(
                [sys.executable, __file__, "--flood", str(configs[FLOODER]), "--stats",
                 str(stats_path), *(["--raw"] if raw else [])], stdout=open(logs / "flooder.log", "w"),
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(),
                start_new_session=True)
            deadline = time.monotonic() + 60
            while not stats_path.exists():  # flooding before the honest members start
                if flooder.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the flooder did not start; log {logs / 'flooder.log'}")
                time.sleep(0.1)
        t0 = time.monotonic()
        procs = run_rounds([configs[n] for n in HONEST], logs, timeout=600)
        wall = time.monotonic() - t0
    finally:
        if flooder is not None:
            flooder.send_signal(signal.SIGTERM)
            try:
                flooder.wait(30)
            except subprocess.TimeoutExpired:
                flooder.kill()
                flooder.wait()
        if broker is not None:
            broker.__exit__()
    out: dict = {"wall_s": round(wall, 2), "members": {}}
    for name in HONEST:
        lines = read_metrics(configs[name])
        others = [m for m in HONEST if m != name]
        out["members"][name] = {
            "exit_code": procs[name]["exit_code"],
            "peak_rss_mb": procs[name]["peak_rss_mb"],
            "rounds": len(lines),
            "honest_shares_per_round": [sum(m in ln["received"] for m in others)
                                        for ln in lines],
            "every_honest_share": all(set(others) <= set(ln["received"]) for ln in lines)
            and len(lines) == rounds,
            "round_s": [round(ln["seconds"], 3) for ln in lines],
            # The first round waits out bank-3 (silent in both runs): judged without it.
            "round_s_median_after_first": round(statistics.median(
                [ln["seconds"] for ln in lines[1:]]), 3) if len(lines) > 1 else None,
            "flood_by_sender": lines[-1].get("flood_by_sender", {}) if lines else {},
            "rejected": lines[-1].get("rejected", {}) if lines else {},
        }
    if phase.startswith("flood"):
        stats = json.loads(stats_path.read_text())
        stats["rate_per_s"] = round(stats["sent"] / max(stats["seconds"], 1e-9), 1)
        out["flooder"] = stats
    return out


def judge(cleans: list[dict], floods: list[dict]) -> dict:
    """Per honest member, over every pair: every honest share in every flood run; the
    median round time (first round left out) of all flood runs over all clean runs; the
    largest peak-RSS growth of a flood run over the clean run before it."""
    verdict = {}
    for name in HONEST:
        clean_s = statistics.median(x for r in cleans for x in r["members"][name]["round_s"][1:])
        flood_s = statistics.median(x for r in floods for x in r["members"][name]["round_s"][1:])
        ratio = flood_s / clean_s
        growth = max(f["members"][name]["peak_rss_mb"] - c["members"][name]["peak_rss_mb"]
                     for c, f in zip(cleans, floods, strict=True))
        every = all(f["members"][name]["every_honest_share"] for f in floods)
        verdict[name] = {
            "every_honest_share_every_round": every,
            "round_s_median_clean": round(clean_s, 3), "round_s_median_flood": round(flood_s, 3),
            "round_time_ratio": round(ratio, 2),
            "rss_growth_mb": round(growth, 1),
            "ok": bool(every and ratio <= GOALS["round_time_ratio_max"]
                       and growth <= GOALS["rss_growth_mb_max"]),
        }
    return verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transport", choices=["mqtt", "libp2p", "both"], default="both")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="clean/flood pairs per transport")
    p.add_argument("--mqtt-flood", choices=["raw", "transport"], default="raw")
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default="runs/bench/flood-work")
    p.add_argument("--out", default="runs/bench/flood.json")
    p.add_argument("--flood", help=argparse.SUPPRESS)  # child: flood with this config
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flood:
        asyncio.run(flood(Path(args.flood), Path(args.stats), args.raw))
        return 0
    work = Path(args.work).resolve()
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty; remove it or choose another")
    result: dict = {"rounds": args.rounds, "flood_bytes": FLOOD_BYTES, "goals": GOALS,
                    "round_deadline_s": ROUND_DEADLINE_S, "transports": {}}
    transports = ["mqtt", "libp2p"] if args.transport == "both" else [args.transport]
    for transport in transports:
        raw = transport == "mqtt" and args.mqtt_flood == "raw"
        cleans, floods = [], []
        for i in range(args.repeats):
            cleans.append(one_run(transport, f"clean-{i}", args.rounds, work, raw))
            floods.append(one_run(transport, f"flood-{i}", args.rounds, work, raw))
        result["transports"][transport] = {"clean": cleans, "flood": floods,
                                           "verdict": judge(cleans, floods)}
        print(json.dumps({transport: result["transports"][transport]["verdict"],
                          "flooder": [f.get("flooder") for f in floods]}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

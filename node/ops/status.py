"""`flnode status --state-dir DIR`: what a node has done, read from its state dir only.

Every epsilon printed here is recomputed from the ledger by the accountant,
never read from a cached figure. Only files are read: no torch, no training
code (tests/test_lean.py checks that `flnode status` never imports torch).
The planned number of rounds comes from the privacy plan, or from the node's
config when one is given (a node without privacy keeps no plan). A rehearsal member's
config (`python -m node.rehearsal.member`) is read too: status runs nothing, so its
[attack] / [faults] sections are set aside (named in the output), not refused as
`flnode run` refuses them; status never imports the rehearsal. Whether the node
runs comes from node.pid (node/runtime/pidfile.py), its last activity from its files'
modification times, whom it waits for from activity.json and the final model
comparison from final.json (both written by node/runtime/node.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from gossip.membership import read_toml
from gossip.transports.base import SENDER_BURST, SENDER_QUEUE_MESSAGES, SENDER_RATE_PER_S
from node.ops.report_html.secure import delta_text, load_plan, read_secure
from node.privacy import secure_record
from node.privacy.accountant import ACCOUNTANT, epsilon_of
from node.privacy.budget import PLAN_FILE, WEIGHT_FILE, PrivacyPlan
from node.privacy.ledger import Ledger
from node.privacy.skellam import finite_number
from node.runtime.config import REHEARSAL_SECTIONS, NodeConfig, validate_config
from node.runtime.pidfile import PID_FILE, process_state
from node.runtime.state import StateDir, loads_json, read_jsonl

# Written by the node (node/runtime/node.py): who it waits for, and the members' final digests.
ACTIVITY_FILE = "activity.json"
FINAL_FILE = "final.json"


# Files a node writes as it works: the newest modification time among them is its last
# activity (audit.jsonl gets a line for every message received, activity.json one
# every WAIT_REPORT_S while it waits).
ACTIVITY_FILES = ("audit.jsonl", "metrics.jsonl", "checkpoint.msgpack", "ledger.jsonl",
                  ACTIVITY_FILE, FINAL_FILE, PID_FILE)


def last_activity(path: Path) -> float | None:
    times = []
    for name in ACTIVITY_FILES:
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            continue
    return max(times) if times else None


def _small_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object the node wrote (activity.json, final.json), None if absent or
    not one (a torn write: the node rewrites it atomically, so only a foreign file)."""
    try:
        raw = path.read_bytes()[:MAX_SMALL_JSON_BYTES + 1]
        doc = loads_json(raw)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _waiting(path: Path) -> dict[str, Any] | None:
    """What activity.json says the node waits for; None once the wait is over."""
    doc = _small_json(path / ACTIVITY_FILE)
    return doc if doc and isinstance(doc.get("waiting_for"), list) and doc["waiting_for"] \
        else None


# activity.json and final.json are a few hundred bytes; more is not ours.
MAX_SMALL_JSON_BYTES = 1 << 20


def flood_by_member(metrics: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per member, the messages our transport dropped unparsed because it was over its
    share of our intake (`flood_by_sender` in metrics.jsonl), and the last round (0-based)
    in which that count grew. A line's counts are since its process started, so a count
    that goes down (or `bytes_sent`, also since the start, going down) is a restart: the
    run's last count is kept and the new run's added to it."""
    done: dict[str, int] = {}  # counts of earlier runs (processes)
    run: dict[str, int] = {}  # this run's counts, as of the latest line
    last: dict[str, int] = {}
    prev_sent = -1
    for line in metrics:
        sent = line.get("bytes_sent")
        if _count(sent):
            if sent < prev_sent:  # a new process: its counters start at 0
                for m, c in run.items():
                    done[m] = done.get(m, 0) + c
                run = {}
            prev_sent = sent
        flood = line.get("flood_by_sender")
        if not isinstance(flood, dict):
            continue
        for member, count in flood.items():
            if not isinstance(member, str) or not _count(count):
                continue  # not the node's own writing: ignored
            before = run.get(member, 0)
            if count < before:  # restarted without bytes_sent showing it
                done[member] = done.get(member, 0) + before
                before = 0
            if count > before and _count(line.get("round")):
                last[member] = line["round"]
            run[member] = count
    totals = {m: done.get(m, 0) + run.get(m, 0) for m in set(done) | set(run)}
    return {m: {"dropped": c, "last_round": last.get(m, -1)}
            for m, c in sorted(totals.items()) if c > 0}


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_config(config: str | Path) -> tuple[NodeConfig, list[str]]:
    """The node's config, and the rehearsal sections it holds, set aside: status reads
    `training.rounds` from it and acts on nothing, so a rehearsal member's config (with
    [attack] or [faults], refused by `flnode run`) is as good as a production one."""
    path = Path(config)
    doc = read_toml(path, "node config")
    rehearsal = [f"[{name}]" for name in REHEARSAL_SECTIONS if name in doc]
    production = {k: v for k, v in doc.items() if k not in REHEARSAL_SECTIONS}
    return validate_config(production, str(path)), rehearsal


def _pinned_secure_plan(pinned: Path) -> dict[str, Any]:
    """The secure plan a node pinned at its first start ({} if none), through the node's own
    checked loader (node/privacy/secure.py SecurePlan.load): a file flnode did not write
    (hand-edited, torn) is a LocalError naming it, never a crash. The plan is written before
    anything is charged, so a node with a plan and an empty ledger is a DP node that has spent
    0, not a node without privacy."""
    if not pinned.exists():
        return {}
    try:
        sp = load_plan(pinned)
    except (OSError, UnicodeDecodeError, LocalError) as exc:
        raise LocalError(f"{pinned}: unreadable secure plan ({exc}); the node refuses to "
                         "start with it too: restore it") from None
    assert sp is not None
    return {"epsilon": sp.epsilon, "delta": sp.delta, "accounting_delta": sp.accounting_delta,
            "steps": sp.steps, "members": sp.members, "coalition": sp.coalition,
            "min_contributors": sp.min_contributors, "variant": sp.variant,
            "noise_multiplier": sp.noise_multiplier, "sample_rate": sp.sample_rate,
            "clip_norm": sp.clip_norm}


def _secure_rounds(path: Path) -> dict[str, Any]:
    """Which secure rounds opened and which failed, and why, from the node's audit lines (the
    same reader as `flnode report`'s "Each secure round" table): a charged round is not an
    opened one (a round is charged before anything is dealt, and a failed round stays
    charged). Rounds 1-based."""
    view = read_secure(path, str(path))
    rounds = view.rounds if view is not None else {}
    failed: dict[str, list[int]] = {}
    for r, sr in sorted(rounds.items()):
        if sr.ok is False:
            failed.setdefault(sr.reason or "?", []).append(r + 1)
    return {"rounds": len(rounds), "opened": sum(1 for sr in rounds.values() if sr.ok is True),
            "failed": {why: rs for why, rs in sorted(failed.items())},
            "no_outcome": [r + 1 for r, sr in sorted(rounds.items())
                           if sr.ok is None and sr.unreadable is None],
            "unreadable": [r + 1 for r, sr in sorted(rounds.items()) if sr.unreadable]}


def _normalization(agreed_file: Path, ledger: Ledger,
                   plan: PrivacyPlan | None) -> dict[str, Any] | None:
    """What normalization.json says the consortium agreed (None: no file). A file flnode
    did not write (hand-edited, torn, hostile: wrong types, huge numbers, deep nesting) is
    shown as {"mode": "unreadable", "error": why}, never a crash: status is what an
    operator runs to find out what is wrong (the node itself refuses to start with it)."""
    if not agreed_file.exists():
        return None

    def unreadable(why: str) -> dict[str, Any]:
        return {"mode": "unreadable", "error": f"{agreed_file}: {why}; the node refuses to "
                "start with it: restore it, or start a new state dir"}

    try:
        raw = agreed_file.read_bytes()[:MAX_NORMALIZATION_BYTES + 1]
        if len(raw) > MAX_NORMALIZATION_BYTES:
            return unreadable(f"larger than {MAX_NORMALIZATION_BYTES} bytes (not one flnode "
                              "wrote)")
        agreed = loads_json(raw)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, too deep, a too-long int
        return unreadable(f"unreadable ({exc})")
    if not isinstance(agreed, dict):
        return unreadable(f"a JSON {type(agreed).__name__}, not an object")

    def strings(key: str) -> bool:
        v = agreed.get(key)
        return v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))

    def flat(key: str, ok: Any) -> bool:  # {column: value}, value checked by ok
        v = agreed.get(key)
        return v is None or (isinstance(v, dict) and all(ok(x) for x in v.values()))

    bad = [k for k in ("mode", "why", "digest") if not isinstance(agreed.get(k, ""), str | None)]
    bad += [k for k in ("fallback_by", "members") if not strings(k)]
    if not flat("stats", lambda v: isinstance(v, list) and len(v) == 2
                and all(finite_number(x) for x in v)):
        bad.append("stats")  # {column: [mean, std]}
    if not flat("capped", finite_number):
        bad.append("capped")  # {member: its weight after the cap}
    if bad:
        return unreadable(f"key {bad[0]!r} has the wrong type (not one flnode wrote)")
    charges = [r for r in ledger.records if r.mode == "normalize"]
    return {
        # "range": the consortium fell back to range scaling (a member's vote), why
        "mode": agreed.get("mode") or "federated", "fallback_by": agreed.get("fallback_by"),
        "why": agreed.get("why"), "members": agreed.get("members"),
        "digest": agreed.get("digest"), "stats": agreed.get("stats"),
        "capped": agreed.get("capped"),
        "noise_multiplier": charges[0].noise_multiplier if charges else None,
        # its own ε (alone; what it adds to the total under composition is less)
        "epsilon_alone": epsilon_of(charges, plan.delta) if charges and plan else None}


# normalization.json: a few statistics per numeric column, a few KB; more is not ours.
MAX_NORMALIZATION_BYTES = 1 << 20


def collect(state_dir: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    path = Path(state_dir)
    if not (path / "checkpoint.msgpack").exists():
        if not path.is_dir():
            raise LocalError(f"{path}: no such directory; is this a node's state_dir?")
        proc = process_state(path)
        if proc["state"] != "no_pid_file":  # started, but no checkpoint yet
            return {"state_dir": str(path), "process": proc, "last_activity":
                    last_activity(path), "waiting": _waiting(path), "starting": True}
        raise LocalError(f"{path}: no checkpoint.msgpack here; is this a node's state_dir?")
    state = StateDir(path)
    cp = state.load_checkpoint()
    assert cp is not None
    plan = PrivacyPlan.load(path / PLAN_FILE)
    ledger = Ledger(state.ledger_path)
    # lines the node wrote are objects; a hand-edited one that is not is left out
    metrics = [m for m in read_jsonl(path / "metrics.jsonl") if isinstance(m, dict)]
    rounds = [m for m in metrics if isinstance(m.get("metrics"), dict)]
    stopped = next((m["stopped"] for m in reversed(metrics) if "stopped" in m), None)
    peers: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl(path / "audit.jsonl"):
        # a line the node did not write (hand-edited: not an object, no member or round)
        # is not counted; `flnode report --state-dir` names it
        if (isinstance(rec, dict) and rec.get("outcome") == "accepted"
                and isinstance(rec.get("member"), str) and _count(rec.get("round"))):
            p = peers.setdefault(rec["member"], {"accepted": 0, "last_round": -1})
            # shares, not hellos; a secure round's deal is its share (issue 22)
            if rec.get("kind", "share") in ("share", "sealed", "deal"):
                p["accepted"] += 1
            p["last_round"] = max(p["last_round"], rec["round"])
    planned = cp.planned_rounds if cp.planned_rounds is not None else (
        plan.rounds if plan is not None else None)
    rehearsal: list[str] = []
    if config is not None:
        cfg, rehearsal = read_config(config)
        planned = cfg.training.rounds
    weight = None
    if (path / WEIGHT_FILE).exists():
        weight = json.loads((path / WEIGHT_FILE).read_text())["weight"]
    privacy: dict[str, Any] = {"mode": plan.mode if plan else "off"}
    if plan is not None:
        privacy.update(
            accountant=ACCOUNTANT, delta=plan.delta, epsilon_spent=ledger.epsilon(plan.delta),
            epsilon_budget=plan.epsilon, noise_multiplier=plan.noise_multiplier,
            clip_norm=plan.clip_norm, sample_rate=plan.sample_rate, releases=len(ledger.records),
            planned_rounds=plan.rounds, weight=plan.weight, released_weight=weight)
    secure = secure_record.summary(ledger.records)  # issue 22: secure rounds' charges
    # DP on the secure sum: no local plan; the pinned secure plan (node/runtime/secure_node.py
    # SECURE_PLAN_FILE), written at the first start before any charge
    pinned = _pinned_secure_plan(path / "secure_plan.json") if plan is None else {}
    outcomes = _secure_rounds(path)  # also of a secure consortium without DP (no charges)
    if secure is not None or pinned or outcomes["rounds"]:
        privacy["secure"] = {**(secure or {}), "rounds_charged": (secure or {}).get(
            "rounds_charged", 0), "plan": pinned or None, **outcomes}
    if plan is None and (secure is not None or pinned):
        # the accountant charges at the plan's δ less what the range check's bits may add
        # (SecurePlan.accounting_delta, the δ each charge records); the guarantee is
        # (ε at that δ, the plan's δ): the δ the node's round line and the budget state
        acc_delta = secure["delta"] if secure is not None else pinned["accounting_delta"]
        last = secure or pinned
        privacy.update(
            mode="secure", accountant=ACCOUNTANT, delta=pinned.get("delta", acc_delta),
            accounting_delta=acc_delta, epsilon_spent=ledger.epsilon(acc_delta),
            epsilon_budget=pinned.get("epsilon"), noise_multiplier=last["noise_multiplier"],
            clip_norm=last["clip_norm"], sample_rate=last["sample_rate"],
            releases=len(ledger.records), planned_rounds=pinned.get("steps"),
            weight="uniform", released_weight=None)
    normalization = _normalization(path / "normalization.json", ledger, plan)
    return {
        "state_dir": str(path),
        "process": process_state(path),
        "last_activity": last_activity(path),
        "waiting": _waiting(path),
        "final": _small_json(path / FINAL_FILE),
        "next_round": cp.next_round,
        "rounds_done": len({m["round"] for m in rounds}),
        "planned_rounds": planned,
        "last_metrics": rounds[-1]["metrics"] if rounds else None,
        "stopped": stopped,
        "privacy": privacy,
        "normalization": normalization,
        "peers_heard_from": peers,
        "rejected": cp.rejected,
        "flood": flood_by_member(metrics),
        "bytes_sent": cp.bytes_sent,
        "bytes_received": cp.bytes_received,
        # a rehearsal member's config: the sections status set aside (empty otherwise)
        "rehearsal_sections": rehearsal,
    }


def round_line(s: dict[str, Any]) -> str:
    """"30 of 30 rounds completed (finished)"; rounds are counted from 1, as the node prints
    them. `next_round` is the checkpoint's 0-based next round (30 once round 30 closed)."""
    done, total, nxt = s["rounds_done"], s.get("planned_rounds"), s["next_round"]
    if total is None:
        where = "" if done == nxt else f"; the next is round {nxt + 1}"
        return (f"{done} round{'s' if done != 1 else ''} completed{where} (the planned number "
                "is in the node's config: pass --config)")
    if nxt >= total:
        return f"{done} of {total} rounds completed (finished" + (
            f"; {total - done} closed without a result here, e.g. skipped while catching up)"
            if done < total else ")")
    return f"{done} of {total} rounds completed; in round {nxt + 1}"


def _when(t: Any, now: float) -> str:
    if not isinstance(t, int | float) or isinstance(t, bool):
        return "?"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    return f"{stamp} ({_ago(now - t)})"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h {s % 3600 // 60} min ago"


def process_line(proc: dict[str, Any], now: float) -> str:
    """"running (pid 4242, started ...)", "not running: killed or crashed (...)", ..."""
    st, pid = proc["state"], proc.get("pid")
    if st == "running":
        return f"running (pid {pid}, started {_when(proc.get('started'), now)})"
    if st == "exited":
        code = proc.get("code")
        how = {0: "finished or stopped early", 2: "an error (see its log)",
               130: "stopped by SIGINT", 143: "stopped by SIGTERM"}.get(code, "see its log")
        return (f"not running: exited {_when(proc.get('exited'), now)} with code {code} "
                f"({how}; pid was {pid})")
    if st in ("killed", "stale_pid", "rebooted"):
        return f"not running: {proc['detail']} (pid was {pid})"
    return f"unknown: {proc['detail']}"


def waiting_line(w: dict[str, Any], now: float) -> str:
    who = w.get("waiting_for") or []
    since = w.get("since")
    so_far = f", {int(now - since)} s so far" if isinstance(since, int | float) and not \
        isinstance(since, bool) else ""
    return (f"for {', '.join(str(m) for m in who)} ({w.get('what', '?')}){so_far}; "
            f"written {_when(w.get('time'), now)}")


def final_line(f: dict[str, Any]) -> str:
    digest = str(f.get("digest", ""))[:16]
    differ = f.get("different") or {}
    same = f.get("same") or []
    silent = f.get("not_heard") or []
    parts = []
    if differ:
        parts.append("DIFFERENT final model from " + ", ".join(
            f"{m} ({str(d)[:16]}…)" for m, d in sorted(differ.items()))
            + f"; ours {digest}…")
    if same:
        parts.append(f"same final model as {', '.join(sorted(same))} (digest {digest}…)")
    if silent:
        parts.append(f"no final digest from {', '.join(sorted(silent))}")
    return "; ".join(parts) or f"digest {digest}… (no other member to compare with)"


def flood_line(member: str, f: dict[str, int]) -> str:
    """"bank-3: 4,550 messages dropped before verification (over 50/s or its queue), last
    in round 5". The rate is the transports' per-sender budget (gossip/transports/base.py);
    when the transport stopped listening to the member (and until when) is in the node's
    log, not its files."""
    last = f"; last in round {f['last_round'] + 1}" if f["last_round"] >= 0 else ""
    return (f"{member[:64]}: {f['dropped']:,} messages dropped before verification, over its "
            f"share of our intake ({SENDER_RATE_PER_S:g}/s, burst {SENDER_BURST}, "
            f"{SENDER_QUEUE_MESSAGES} queued){last}")


# Round numbers listed per reason on the secure line; the report's table has every round.
MAX_ROUNDS_LISTED = 8


def secure_privacy_line(p: dict[str, Any]) -> str:
    """DP on the secure sum: spent and budget (the accountant's over the ledger), the plan."""
    budget = f" of budget {p['epsilon_budget']:g}" if p["epsilon_budget"] else " (no budget set)"
    spent = (f"ε spent 0{budget} (nothing charged yet)" if not p["releases"] else
             f"ε spent {p['epsilon_spent']:.4f}{budget}")
    plan = p["secure"].get("plan")
    rounds = f", {plan['steps']} rounds planned" if plan else ""
    return (f"DP on the secure sum, {spent} at {delta_text(p['delta'], p['accounting_delta'])} "
            f"({p['accountant']} accountant, {p['releases']} ledger records); σ "
            f"{p['noise_multiplier']:.4g} on the sum, C {p['clip_norm']:g}, "
            f"q {p['sample_rate']:.4g}{rounds}")


def secure_line(sec: dict[str, Any]) -> str:
    """Rounds charged, opened and failed (by reason): a round is charged before its deals, so
    a failed round is charged too."""
    def rounds(rs: list[int]) -> str:
        shown = ", ".join(map(str, rs[:MAX_ROUNDS_LISTED]))
        more = f" and {len(rs) - MAX_ROUNDS_LISTED} more" if len(rs) > MAX_ROUNDS_LISTED else ""
        return f"round{'s' if len(rs) > 1 else ''} {shown}{more}"

    failed = sum(len(rs) for rs in sec["failed"].values())
    parts = [f"{sec['opened']} opened", f"{failed} failed" + (" (" + "; ".join(
        f"{why}: {rounds(rs)}" for why, rs in sec["failed"].items()) + ")" if failed else "")]
    if sec["no_outcome"]:
        parts.append(f"{len(sec['no_outcome'])} without an outcome yet "
                     f"({rounds(sec['no_outcome'])})")
    if sec["unreadable"]:
        parts.append(f"unreadable audit line for {rounds(sec['unreadable'])}")
    if sec.get("members") is None:  # nothing charged: a plan pinned, or no DP on the sum
        plan = sec["plan"]
        if plan is None:
            return (f"{sec['rounds']} secure round(s): {', '.join(parts)} (no DP on the sum: "
                    "nothing charged)")
        return (f"no secure round charged yet (plan pinned: n {plan['members']}, coalition t "
                f"{plan['coalition']}, at least {plan['min_contributors']} contributors, "
                f"check {plan['variant']})")
    return (f"{sec['rounds_charged']} secure round(s) charged: {', '.join(parts)} (opens "
            f"{sec['reveal']}; n {sec['members']}, coalition t {sec['coalition']}, charged for "
            f"{sec['contributors_charged']} contributors each), part of ε spent")


def render(s: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"state dir   {s['state_dir']}", f"process     {process_line(s['process'], now)}"]
    if s.get("last_activity") is not None:
        lines.append(f"activity    last {_when(s['last_activity'], now)}")
    if s.get("waiting") and s["process"]["state"] == "running":
        lines.append(f"waiting     {waiting_line(s['waiting'], now)}")
    if s.get("starting"):
        lines.append("round       none yet (no checkpoint: the node is starting)")
        return "\n".join(lines)
    p = s["privacy"]
    lines.append(f"round       {round_line(s)}")
    if s.get("rehearsal_sections"):
        lines.append(f"rehearsal   the config is a rehearsal member's ({', '.join(s['rehearsal_sections'])}"
                     "; run by `python -m node.rehearsal.member`): read without those sections")
    if s["stopped"]:
        lines.append(f"stopped     {s['stopped']}")
    if p["mode"] == "off":
        lines.append("privacy     off (no differential privacy)")
    elif p["mode"] == "secure":
        lines.append(f"privacy     {secure_privacy_line(p)}")
    else:
        budget = f" of budget {p['epsilon_budget']:g}" if p["epsilon_budget"] else " (no budget set)"
        lines.append(f"privacy     {p['mode']}-level, ε spent {p['epsilon_spent']:.4f}{budget} at "
                     f"δ {p['delta']:g} ({p['accountant']} accountant, {p['releases']} ledger "
                     f"records); σ {p['noise_multiplier']:.4f}, C {p['clip_norm']:g}, "
                     f"q {p['sample_rate']:.4g}; weight {p['weight']}"
                     + (f" ({p['released_weight']:.1f} released)" if p["released_weight"] else ""))
    if p.get("secure"):  # issue 22
        lines.append(f"secure      {secure_line(p['secure'])}")
    norm = s.get("normalization")
    if norm and norm.get("mode") == "unreadable":
        lines.append(f"normalize   UNREADABLE: {norm['error']}")
    elif norm and norm.get("mode") == "range":
        lines.append(f"normalize   range: scaled by the declared ranges, as the consortium "
                     f"decided ({', '.join(norm.get('fallback_by') or [])} voted for it: their "
                     "agreed statistics would be too noisy); no statistics released or charged")
    elif norm:
        cost = ("no DP (privacy off: exact sums)" if norm["noise_multiplier"] is None else
                f"σ {norm['noise_multiplier']:g} x sensitivity, ε {norm['epsilon_alone']:.4f} "
                "alone (in the ledger, part of ε spent)")
        lines.append(f"normalize   federated, agreed with {len(norm['members'] or [])} members "
                     f"(digest {str(norm['digest'])[:16]}…); {cost}"
                     + (f"; capped: {', '.join(sorted(norm['capped']))}" if norm["capped"] else ""))
    if s["last_metrics"]:
        lines.append("metrics     " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                sorted(s["last_metrics"].items())))
    peers = s["peers_heard_from"]
    lines.append("peers       " + (", ".join(
        f"{n} ({v['accepted']} accepted, last round {v['last_round'] + 1})"
        for n, v in sorted(peers.items())) or "none yet"))
    rej = s["rejected"]
    lines.append("rejected    " + (", ".join(f"{k} {v}" for k, v in sorted(rej.items())) or "none"))
    for i, (member, f) in enumerate(sorted((s.get("flood") or {}).items())):
        lines.append(("flood       " if i == 0 else " " * 12) + flood_line(member, f))
    lines.append(f"traffic     {s['bytes_sent']} bytes sent, {s['bytes_received']} received")
    if s.get("final"):
        lines.append(f"final       {final_line(s['final'])}")
    return "\n".join(lines)

"""`flnode report --state-dir DIR`: one member's own report, from its own files only.

A real member has no summary.json (only a simulator sees every member); what it has
is its state dir: metrics.jsonl (a line per round: metrics with their 95 % interval,
ε, shares received and missing, bytes), the checkpoint (round, traffic, rejections),
the privacy ledger, audit.jsonl (every message received, by member and outcome),
node.pid, activity.json and final.json. This module reads those (through
`node.ops.status.collect`, so every ε is the accountant's over the ledger, exactly what
`flnode status` prints) and renders them with `node.ops.report_html`'s pieces: the
member's row of the simulator report's table, its plots, and per member it heard
from what it accepted and refused. It writes report.html and report.json (the same
facts, for scripts). No torch; everything read is the node's own but is still
checked (a torn last line is skipped and noted).
"""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from node.ops.report_html.card import card_html, find_card
from node.ops.report_html.plots import plots
from node.ops.report_html.reader import Run, _count, _jsonl_lines, _members, _Summary, read_metrics
from node.ops.report_html.render import CSS, MAX_NOTES, _bytes, _e, _fmt, _table, write_text_atomic
from node.ops.report_html.secure import read_secure
from node.ops.report_html.secure import to_json as secure_json
from node.ops.report_html.secure_html import secure_section
from node.ops.status import collect
from node.ops.status import render as status_render
from node.privacy.budget import PLAN_FILE, PrivacyPlan
from node.runtime.state import read_jsonl

# Outcomes in audit.jsonl that are the node's own records, not a message it refused.
OWN_RECORDS = frozenset({"accepted", "aggregate", "normalization"})


def member_name(path: Path, notes: list[str]) -> str:
    """The member's own name: its aggregate lines in audit.jsonl say it (a state dir
    holds no key); the directory's name before any round closed."""
    for rec in read_jsonl(path / "audit.jsonl"):
        if isinstance(rec, dict) and rec.get("outcome") in ("aggregate", "normalization") and isinstance(
                rec.get("member"), str):
            return rec["member"]
    notes.append(f"no round aggregated yet: the member is named after its directory, "
                 f"{path.name!r}")
    return path.name


def peer_table(path: Path, own: str) -> dict[str, dict[str, Any]]:
    """Per other member: shares and other messages accepted, the last round heard, and
    refusals by reason (audit.jsonl, rotated parts included)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl(path / "audit.jsonl"):
        if not isinstance(rec, dict):  # hand-edited (the secure section names the line)
            continue
        member, outcome = rec.get("member"), rec.get("outcome")
        if not isinstance(member, str) or member == own or not isinstance(outcome, str):
            continue
        if rec.get("kind") == "evidence":
            e = out.setdefault(member, _peer())
            e["evidence"] += 1
            continue
        if outcome in ("aggregate", "normalization"):
            continue
        e = out.setdefault(member, _peer())
        if outcome == "accepted":
            kind = rec.get("kind", "share")
            # a secure round's "deal" is the member's share of it (its pieces for us)
            key = "shares" if kind in ("share", "sealed", "deal") else "other"
            e[key] += 1
            if isinstance(rec.get("round"), int):
                e["last_round"] = max(e["last_round"], rec["round"])
        else:
            e["refused"][outcome] = e["refused"].get(outcome, 0) + 1
    return dict(sorted(out.items()))


def _peer() -> dict[str, Any]:
    return {"shares": 0, "other": 0, "last_round": -1, "refused": {}, "evidence": 0}


def round_rows(path: Path, metric: str, notes: list[str]) -> list[dict[str, Any]]:
    """One row per round the member closed (the last line for a round re-run after a
    restart)."""
    rows: dict[int, dict[str, Any]] = {}
    for _, rec in _jsonl_lines(path / "metrics.jsonl", [], "metrics.jsonl"):
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            continue
        r = rec.get("round")
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            continue
        iv = rec.get("intervals") if isinstance(rec.get("intervals"), dict) else {}
        rows[r] = {"round": r + 1, metric: rec["metrics"].get(metric),
                   "interval": iv.get(metric), "eval_rows": rec.get("eval_rows"),
                   "train_rows": rec.get("train_rows"),
                   "epsilon": rec.get("epsilon"), "received": rec.get("received") or [],
                   "missing": rec.get("missing") or [], "closed": rec.get("closed")}
    return [rows[r] for r in sorted(rows)]


def load_member(state_dir: str | Path, config: str | Path | None = None
                ) -> tuple[Run, dict[str, Any]]:
    path = Path(state_dir)
    st = collect(path, config)
    if st.get("starting"):
        raise LocalError(f"{path}: the node has started but closed no round and wrote no "
                         "checkpoint yet: nothing to report (see `flnode status`)")
    notes: list[str] = []
    name = member_name(path, notes)
    last = st["last_metrics"] or {}
    metric = "roc_auc" if "roc_auc" in last else "accuracy"
    p = st["privacy"]
    final = last.get(metric)
    doc: dict[str, Any] = {
        "dataset": f"member {name}", "metric": metric, "rounds": st["planned_rounds"],
        "consortium": {"per_node": {name: final if isinstance(final, int | float) else None}},
        "bytes": {name: {"sent": st["bytes_sent"], "received": st["bytes_received"]}},
        "rejected_per_node": {name: st["rejected"]},
        "rounds_done": {name: st["rounds_done"]},
        "epsilon": {"mode": p["mode"]},
    }
    if p["mode"] != "off":
        doc["epsilon"].update(
            budget=p["epsilon_budget"], delta=p["delta"], accountant=p["accountant"],
            sigma=p["noise_multiplier"], clip=p["clip_norm"], weight=p["weight"],
            per_node={name: p["epsilon_spent"]},
            noise_multiplier_per_node={name: p["noise_multiplier"]})
    if st["stopped"]:
        doc["stopped"] = {name: st["stopped"]}
    summary = _Summary(path / "metrics.jsonl", doc)
    members = _members(summary)
    log = path / "metrics.jsonl"
    if log.is_file():
        read_metrics(members[0], log, metric, notes, "metrics.jsonl")
    else:
        notes.append("no metrics.jsonl: no round closed yet")
    rounds = round_rows(path, metric, notes)
    # Its own row counts, from its last round's line (a log from before train_rows was
    # recorded: the training rows pinned in its privacy plan, if it has one).
    last_round = rounds[-1] if rounds else {}
    plan = PrivacyPlan.load(path / PLAN_FILE)
    members[0].rows = _count(last_round.get("train_rows")) if last_round.get(
        "train_rows") is not None else (_count(plan.rows) if plan is not None else None)
    members[0].held_rows = _count(last_round.get("eval_rows"))
    peers = peer_table(path, name)
    for member, f in (st.get("flood") or {}).items():  # messages, not audit lines
        peers.setdefault(member, _peer())["flood_dropped"] = f["dropped"]
    secure = read_secure(path, "state dir", name)  # issue 22: None for a plain consortium
    if secure is not None:
        notes.extend(secure.notes)
    st = {**st, "member": name, "metric": metric, "peers": dict(sorted(peers.items())),
          "rounds": rounds, "model_card": find_card(path, st["rounds_done"]),
          "secure": secure_json(secure) if secure is not None else None}
    st["_secure_view"] = secure
    return Run(path, summary, metric, members, notes), st


def _status_facts(st: dict[str, Any]) -> str:
    """`flnode status`'s lines as a definition list: one source for both."""
    items = []
    for line in status_render(st).splitlines():
        key, _, value = line.partition("  ")  # "state dir   /x": the label ends at 2 spaces
        items.append((key.strip(), value.strip()))
    return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>"
                                          for k, v in items) + "</dl>"


def _peers_html(st: dict[str, Any]) -> str:
    peers = st["peers"]
    if not peers:
        return '<p class="sub">No message from another member yet.</p>'
    final = st.get("final") or {}
    rows = []
    for m, e in peers.items():
        refused = ", ".join(f"{_e(k)} {v}" for k, v in sorted(e["refused"].items())
                            if k != "flood")
        if e.get("flood_dropped"):  # the audit log has a flood line per round; say messages
            refused += (", " if refused else "") + (
                f'<span class="neg">flood: {e["flood_dropped"]:,} messages dropped before '
                "verification</span>")
        refused = refused or "none"
        digest = ("same" if m in (final.get("same") or []) else
                  '<span class="neg">different</span>' if m in (final.get("different") or {})
                  else "not heard" if m in (final.get("not_heard") or []) else
                  '<span class="muted">—</span>')
        rows.append(f'<tr><td class="l name" title="{_e(m)}">{_e(m)}</td><td>{e["shares"]}</td>'
                    f"<td>{e['other']}</td>"
                    f"<td>{e['last_round'] + 1 if e['last_round'] >= 0 else '—'}</td>"
                    f'<td class="wrap">{refused}</td><td>{e["evidence"]}</td>'
                    f'<td class="l">{digest}</td></tr>')
    return ('<div class="scroll"><table><thead><tr><th class="l">member</th><th>shares '
            "accepted</th><th>other messages accepted</th><th>last round heard</th>"
            '<th class="l">refused, by reason</th><th>evidence kept</th>'
            '<th class="l">final model</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table></div>")


def _rounds_html(st: dict[str, Any]) -> str:
    metric = st["metric"]
    rows = []
    for r in st["rounds"]:
        v = r.get(metric)
        iv = r.get("interval")
        iv_text = (f"{iv[0]:.3f} – {iv[1]:.3f}" if isinstance(iv, list) and len(iv) == 2
                   and all(isinstance(x, int | float) for x in iv) else "—")
        eps = r.get("epsilon")
        rows.append(
            f"<tr><td>{r['round']}</td>"
            f"<td>{_fmt(float(v)) if isinstance(v, int | float) else '—'}</td>"
            f"<td>{iv_text}</td><td>{_e(r.get('eval_rows') or '—')}</td>"
            f"<td>{_fmt(float(eps), 3) if isinstance(eps, int | float) else 'no DP'}</td>"
            f'<td class="wrap">{_e(", ".join(map(str, r["received"])) or "none")}</td>'
            f'<td class="wrap">{_e(", ".join(map(str, r["missing"])) or "none")}</td>'
            f'<td class="l">{_e(r.get("closed") or "—")}</td></tr>')
    metric_head = metric.replace("_", "-").upper() if metric != "accuracy" else "accuracy"
    return ('<div class="scroll"><table><thead><tr><th>round</th>'
            f"<th>{_e(metric_head)}</th><th>95 % interval</th><th>held-out rows</th>"
            '<th>ε after</th><th class="l">shares from</th><th class="l">missing</th>'
            '<th class="l">closed</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table></div>")


def render_member(run: Run, st: dict[str, Any]) -> str:
    name = st["member"]
    title = f"flnode report: member {name}"
    figures = plots(run, where=f"{name}'s held-out rows")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">state dir <code>{_e(run.run_dir.resolve())}</code> · report written '
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} · from this member's own files only "
        "(no other member's rows, metrics or ε)</p>",
        "<h2>Node</h2>", _status_facts(st),
        "<h2>This member</h2>",
        '<p class="sub">consortium: its model after its last round, scored on its own '
        "held-out rows; ε spent from its privacy ledger by the accountant (as "
        "<code>flnode status</code> prints it); shares released: the rounds it closed; "
        "received: the other members' shares it accepted; rejected: messages it refused, "
        f"by reason. Traffic: {_bytes(st['bytes_sent'])} sent, "
        f"{_bytes(st['bytes_received'])} received.</p>",
        _table(run, own=True),
        "<h2>Members it heard from</h2>", _peers_html(st),
        secure_section([st["_secure_view"]]) if st.get("_secure_view") is not None else "",
        "<h2>Model card</h2>", card_html(st["model_card"]),
    ]
    if run.notes:
        shown = run.notes[:MAX_NOTES]
        more = len(run.notes) - len(shown)
        parts.append('<h2>Notes</h2><div class="notes"><ul>'
                     + "".join(f"<li>{_e(n)}</li>" for n in shown)
                     + (f"<li>… and {more} more</li>" if more else "") + "</ul></div>")
    parts.append("<h2>Per round</h2>")
    parts.append('<p class="sub">The metric on this member\'s held-out rows after each round, '
                 "with its 95 % interval (Wilson for accuracy, Newcombe's score interval for "
                 "ROC-AUC; "
                 "node/ops/intervals.py): on a few dozen rows a swing inside the interval is the "
                 "rows, not the model.</p>")
    parts.append(_rounds_html(st))
    for fig_name, caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{_e(fig_name)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_member_report(state_dir: str | Path, out: str | Path | None = None,
                        config: str | Path | None = None) -> tuple[Path, Path]:
    """report.html and report.json for the member whose state dir this is (default:
    in the state dir); returns both paths."""
    run, st = load_member(state_dir, config)
    target = Path(out) if out is not None else Path(state_dir) / "report.html"
    if not target.parent.is_dir():
        raise LocalError(f"--out {target}: directory {target.parent} does not exist")
    if target.is_dir():
        raise LocalError(f"--out {target}: is a directory; name a file, e.g. {target}/report.html")
    write_text_atomic(target, render_member(run, st))
    doc = target.with_suffix(".json")
    st = {k: v for k, v in st.items() if k != "_secure_view"}  # its JSON is st["secure"]
    write_text_atomic(doc, json.dumps(_json_safe(st), indent=1, sort_keys=True) + "\n")
    return target, doc

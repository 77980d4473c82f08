"""`flnode report RUN_DIR`: one self-contained `report.html` for a run directory.

A run directory is what `flnode simulate --out DIR` or `scripts/simulate_network.py
--out DIR` leaves: `summary.json` (written when the run ends) and `state/<member>/
metrics.jsonl` (one line per round a member closed, appended as it goes). The
report holds the summary table (per member: final metric, local-only level, ε spent
of its budget, shares released / received / rejected, bytes), the aggregation rule
and any attackers, and PNG plots embedded as base64 data URIs: the metric per round
per member with the centralized and local-only levels, ε spent per round, bytes per
round. No external URL, no script: the file opens offline, anywhere.

Everything read from the run dir is hostile input. `summary.json` must be a JSON
object whose fields, where present, have the types the simulators write; a field of
the wrong type is a `LocalError` naming the file and the field. A member's
`metrics.jsonl` may be cut short (a node killed mid-run) or end in a torn line: what
parses is shown and each skipped line is listed under "Notes". Member names and
every other string from the run dir are HTML-escaped and never used to build a
path (state dirs are found by listing `state/`). matplotlib (Agg) is imported only
when the plots are drawn; torch is never imported.
"""

from __future__ import annotations

import base64
import html
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from node.ops.report_html.plots import plots
from node.ops.report_html.reader import Member, Run, _cut, _num_or_none, load_run
from node.ops.report_html.secure import SecureView, read_secure
from node.ops.report_html.secure_html import secure_section
from node.runtime.config import seals

MAX_NOTES = 50


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;
 margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:#fff;
 box-shadow:0 0 0 1px #e3e5e8}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;
 border-bottom:1px solid #e3e5e8;padding-bottom:4px}
.sub{color:#5f6368;margin:0 0 18px;overflow-wrap:anywhere}
table{border-collapse:collapse;font-size:13.5px}
th,td{padding:5px 9px;border-bottom:1px solid #eceef0;text-align:right;white-space:nowrap}
th{background:#f1f3f5;font-weight:600;white-space:normal;vertical-align:bottom;
 min-width:48px;max-width:92px}
td.l,th.l{text-align:left}td.name{max-width:240px;overflow:hidden;text-overflow:ellipsis}
td.wrap{white-space:normal;max-width:260px;overflow-wrap:anywhere;text-align:left}
tr.sum td{font-weight:600;background:#fafbfc}tr.attacker td{background:#fff3f2}
.pos{color:#137333}.neg{color:#b3261e}.muted{color:#80868b}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0}
dl.facts dt{color:#5f6368}dl.facts dd{margin:0;overflow-wrap:anywhere}
.scroll{overflow-x:auto}figure{margin:18px 0}figure img{max-width:100%;height:auto;
 border:1px solid #eceef0}figcaption{color:#5f6368;font-size:13.5px;max-width:900px}
.notes{background:#fff8e1;border:1px solid #f3d36b;padding:8px 14px;border-radius:4px}
.notes li{overflow-wrap:anywhere}code{font-size:13px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or math.isnan(v):
        return '<span class="muted">—</span>'
    return "∞" if math.isinf(v) else f"{v:.{digits}f}"


def _signed(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return '<span class="muted">—</span>'
    cls = "pos" if v > 0 else "neg" if v < 0 else ""
    return f'<span class="{cls}">{v:+.4f}</span>'


def _bytes(n: int | None) -> str:
    if n is None:
        return '<span class="muted">—</span>'
    x = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return str(n)


def _count_cell(n: int | None) -> str:
    return '<span class="muted">—</span>' if n is None else str(n)


def _eps_cell(m: Member, mode: str | None, budget: float | None) -> str:
    if mode == "off" or (mode is None and m.epsilon is None):
        return '<span class="muted">no DP</span>'
    spent = _fmt(m.epsilon, 2)
    return spent + (f" / {budget:g}" if budget is not None and math.isfinite(budget) else "")


def _exit(code: Any) -> str:
    """An exit code as a person reads it: -9 is SIGKILL."""
    if isinstance(code, int) and not isinstance(code, bool) and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return _e(code)


def _process_cell(proc: dict[str, Any] | None) -> str:
    if not proc:
        return '<span class="muted">—</span>'
    starts = proc.get("starts")
    codes = proc.get("exit_codes")
    codes = ", ".join(_exit(c) for c in codes) if isinstance(codes, list) else "?"
    plural = "s" if starts != 1 else ""
    return f"{_e(starts)} start{plural}, exit {codes or 'none yet'}"


def _table(run: Run, own: bool = False) -> str:
    """The summary table; `own`: one real member's report, which has its training and
    held-out row counts but no local-only baseline (so no gain): those columns go."""
    s = run.summary
    mode = s.text("epsilon", "mode")
    budget = s.num("epsilon", "budget")
    procs = any(m.process for m in run.members)
    cols = ["member", "rows", "local-only", "consortium", "gain", "ε spent" +
            (" /\u00a0budget" if budget is not None else ""), "rounds", "shares released",
            "shares received", "rejected", "bytes sent", "bytes received"]
    if own:
        cols[1:5] = ["training rows", "held-out rows", "consortium"]
    if procs:
        cols.append("process")
    head = "".join(f'<th class="{"l" if c in ("member", "rejected", "process") else ""}">'
                   f"{_e(c)}</th>" for c in cols)
    body = []
    for m in run.members:
        gain = (m.final - m.local_only if m.final is not None and m.local_only is not None
                else None)
        rej = ", ".join(f"{_e(k)} {v}" for k, v in sorted((m.rejected or {}).items()))
        status = []
        if m.attack:
            status.append(f'<div class="neg">attacker: {_e(m.attack)}</div>')
        if m.stopped:
            status.append(f'<div class="neg">stopped: {_e(m.stopped)}</div>')
        rounds = m.rounds_done if m.rounds_done is not None else (
            len([p for p in m.rounds.values() if p.metric is not None]) if m.rounds else None)
        cells = [f'<td class="l name" title="{_e(m.name)}">{_e(m.name)}{"".join(status)}</td>',
                 f"<td>{_count_cell(m.rows)}</td>", f"<td>{_fmt(m.local_only)}</td>",
                 f"<td>{_fmt(m.final)}</td>", f"<td>{_signed(gain)}</td>",
                 f"<td>{_eps_cell(m, mode, budget)}</td>", f"<td>{_count_cell(rounds)}</td>",
                 f"<td>{_count_cell(m.released)}</td>",
                 f"<td>{_count_cell(m.shares_received)}</td>",
                 f'<td class="wrap">{rej or ("none" if m.rejected is not None else "—")}</td>',
                 f"<td>{_bytes(m.bytes_sent)}</td>", f"<td>{_bytes(m.bytes_received)}</td>"]
        if own:
            cells[1:5] = [f"<td>{_count_cell(m.rows)}</td>", f"<td>{_count_cell(m.held_rows)}</td>",
                          f"<td>{_fmt(m.final)}</td>"]
        if procs:
            cells.append(f'<td class="l">{_process_cell(m.process)}</td>')
        cls = ' class="attacker"' if m.attack else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    if own:  # no baseline, mean or centralized row: one member knows none of them
        return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table></div>")
    pad = len(cols) - 5
    lo, co = s.num("local_only", "mean"), s.num("consortium", "mean")
    rows = [m.rows for m in run.members if m.rows is not None]
    total = str(sum(rows)) if rows else "—"
    if lo is not None or co is not None:
        gain = co - lo if lo is not None and co is not None else None
        body.append(f'<tr class="sum"><td class="l">mean</td><td>{total}</td><td>{_fmt(lo)}</td>'
                    f"<td>{_fmt(co)}</td><td>{_signed(gain)}</td>" + "<td></td>" * pad + "</tr>")
    hm = s.num("honest", "mean")
    if s.obj("attack", "attackers") and hm is not None:
        body.append('<tr class="sum"><td class="l">honest members\' mean</td><td></td><td></td>'
                    f"<td>{_fmt(hm)}</td>" + "<td></td>" * (pad + 1) + "</tr>")
    central = s.num("centralized")
    if central is not None:
        body.append(f'<tr class="sum"><td class="l">centralized</td><td>{total}</td><td></td>'
                    f'<td>{_fmt(central)}</td><td></td><td><span class="muted">no DP</span>'
                    "</td>" + "<td></td>" * (pad - 1) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _value(v: Any) -> str:
    """A value from summary.json as a person reads it: floats to 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _facts(run: Run) -> str:
    s = run.summary
    eps = s.obj("epsilon")
    items: list[tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        if value is not None and value != "":
            items.append((label, _e(value)))

    add("dataset", s.text("dataset"))
    test_rows = s.get("test_rows")
    add("metric", f"{run.metric} on the consortium test set"
        + (f" ({_cut(test_rows, 20)} rows)" if test_rows is not None else ""))
    add("members", len(run.members))
    add("rounds", s.get("rounds"))
    add("partition", s.text("partition"))
    add("model", s.text("model"))
    add("seed", s.get("seed"))
    add("transport", s.text("transport"))
    mode = s.text("epsilon", "mode")
    rules = s.obj("rules")
    secure = rules.get("secure") is True  # issue 22: the section "Secure aggregation" below
    # a secure node refuses to start without sealing (node/runtime/secure_node.py setup):
    # the simulators' "auto" (on for MQTT only) was overridden for every member
    add("sealed shares", "on: each deal sealed to its one recipient (a secure node requires it)"
        if secure else _sealed(s.text("seal"), s.text("transport")))
    if mode == "off":
        add("privacy", "off (no differential privacy)")
    elif mode and secure:  # DP on the sum: no member-side plan, σ or share weight
        parts = [f"{mode}-level DP on the secure sum (distributed DP-SGD: one consortium step "
                 "per round, the plan under Secure aggregation)"]
        for key, label in (("budget", "budget ε"), ("delta", "δ"), ("clip", "clip C")):
            v = s.num("epsilon", key)
            if v is not None:
                parts.append(f"{label} {v:g}")
        if isinstance(eps.get("accountant"), str):
            parts.append(f"accountant {eps['accountant']}")
        add("privacy", ", ".join(parts))
    elif mode:
        parts = [f"{mode}-level DP"]
        for key, label in (("budget", "budget ε"), ("delta", "δ"), ("sigma", "σ"),
                           ("clip", "clip C")):
            v = s.num("epsilon", key)
            if v is not None:
                parts.append(f"{label} {v:g}")
        if isinstance(eps.get("accountant"), str):
            parts.append(f"accountant {eps['accountant']}")
        if isinstance(eps.get("weight"), str):
            parts.append(f"share weight: {eps['weight']}")
        add("privacy", ", ".join(parts))
        sig = {m.name: m.noise_multiplier for m in run.members if m.noise_multiplier is not None}
        if sig:
            add("σ per member", ", ".join(f"{n} {v:.3f}" for n, v in sig.items()))
    training = s.obj("training")
    dp_sum = secure and mode not in (None, "off")
    if training:  # local training every member ran (FedProx, LR decay, control variates)
        add("local training", ("not run: with DP on the secure sum a member computes its "
                               "clipped, noised gradient sum on the plan's sample instead "
                               "(configured: " if dp_sum else "")
            + ", ".join(f"{k} = {_value(v)}" for k, v in training.items() if v is not None)
            + (")" if dp_sum else ""))
    agg = s.obj("aggregation")
    if secure:  # the rule's settings are not what combines a secure round's contributions
        t, select = rules.get("secure_threshold"), rules.get("secure_select")
        add("aggregation", f"secure (t = {_value(t)}, selection {_value(select)}): the sum of "
            "the selected members' contributions, computed from their pieces"
            + (f"; the configured rule {agg.get('rule', '?')} is not used"
               if agg.get("rule") else ""))
    elif agg:
        text = str(agg.get("rule", "?"))
        extra = [f"{k} = {_value(v)}" for k, v in sorted(agg.items())
                 if k != "rule" and v is not None]
        add("aggregation", text + (" (" + ", ".join(extra) + ")" if extra else ""))
    if rules:
        add("consortium [rules]", ", ".join(f"{k} = {_value(v)}" for k, v in sorted(rules.items())))
    attackers = s.obj("attack", "attackers")
    add("attackers", ", ".join(f"{n} ({d})" for n, d in attackers.items()) if attackers
        else "none")
    faults = s.obj("faults")
    active = {k: v for k, v in faults.items() if v not in (0, 0.0, [], {}, None, "")}
    if active:
        add("faults", ", ".join(f"{k} = {_value(v)}" for k, v in sorted(active.items())))
    kills = s.get("sigkills")
    if kills:
        add("SIGKILLs", _value(kills))
    add("wall time", f"{s.get('seconds')} s" if s.get("seconds") is not None else None)
    add("consortium id", s.text("consortium_id"))
    return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>"
                                          for k, v in items) + "</dl>"


def _seen_by(run: Run) -> str:
    seen = run.summary.obj("attack", "seen_by")
    if not seen:
        return ""
    rows = []
    for honest, per in seen.items():
        if not isinstance(per, dict):
            raise run.summary._fail(["attack", "seen_by", honest], "an object", per)
        for attacker, e in per.items():
            if not isinstance(e, dict):
                raise run.summary._fail(["attack", "seen_by", honest, attacker], "an object", e)
            acts = []
            for what in ("excluded", "clipped", "weight_capped", "down_weighted", "rejected"):
                got = e.get(what)
                if isinstance(got, dict):
                    acts += [f"{what} ({r}) {n}" for r, n in sorted(got.items())]
            mw = _num_or_none(e.get("mean_weight"))
            rows.append(f'<tr><td class="l">{_e(honest)}</td><td class="l">{_e(attacker)}</td>'
                        f"<td>{_e(e.get('used'))} / {_e(e.get('rounds'))}</td>"
                        f"<td>{_fmt(mw, 3)}</td>"
                        f'<td class="wrap">{_e(", ".join(acts)) or "nothing"}</td>'
                        f"<td>{_e(e.get('evidence', 0))}</td></tr>")
    return ("<h3>What the honest members did about the attackers</h3>"
            '<div class="scroll"><table><thead><tr><th class="l">honest member</th>'
            '<th class="l">attacker</th><th>rounds its share was used</th>'
            '<th>mean weight</th><th class="l">excluded / clipped / capped / rejected</th>'
            "<th>equivocation evidence</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


# Fewer rounds than this: the consortium model may still be near its start (the 4-bank demo
# at ε 3 reached ROC-AUC 0.95 only after 10 rounds; node/strategy/consortium_rules.py few_rounds_warning).
FEW_ROUNDS = 10


def _sealed(seal: str | None, transport: str | None) -> str | None:
    """What the nodes did with shares, not the setting: gossip.seal "auto" seals on MQTT only
    (node/runtime/config.py seals), so an "auto" run over memory or libp2p sent them
    unsealed, as its terminal said."""
    if seal not in ("auto", "on", "off") or transport is None:
        return seal
    did = seals(seal, transport)
    how = "on: each share sealed to its recipient" if did else "off: shares signed, not sealed"
    return how + (f" (gossip.seal = auto: sealed on MQTT only; this run's transport is "
                  f"{transport})" if seal == "auto" else "")


def negative_gain_note(summary: dict[str, Any]) -> str | None:
    """Why members lose on their own rows, when the mean gain there is negative: the
    two models are not trained alike (local-only has no DP and fits only the member's
    own distribution), and the members who lose are those with the most rows of their
    own. None when the mean gain is not negative."""
    own = summary.get("own_rows") if isinstance(summary.get("own_rows"), dict) else {}
    gains = {n: r.get("gain") for n, r in own.items() if isinstance(r, dict)}
    defined = {n: g for n, g in gains.items() if isinstance(g, int | float) and math.isfinite(g)}
    mean = own_mean_gain(summary)
    if mean is None or mean >= 0:
        return None
    eps = summary.get("epsilon") if isinstance(summary.get("epsilon"), dict) else {}
    mode, budget = eps.get("mode"), eps.get("budget")
    parts = []
    if mode and mode != "off":
        parts.append(f"the consortium model is trained under {mode}-level DP"
                     + (f" (ε {budget:g})" if isinstance(budget, int | float) else "")
                     + "; local-only trains without DP")
    partition = summary.get("partition")
    if summary.get("data_dir") or (isinstance(partition, str) and partition != "iid"):
        parts.append("a member's own held-out rows come from its own distribution, which its "
                     "local-only model fits alone while the consortium model fits every "
                     "member's rows" + (f" ({partition})" if isinstance(partition, str)
                                        and not summary.get("data_dir") else ""))
    rows = summary.get("rows") if isinstance(summary.get("rows"), dict) else {}
    counts = {n: v for n, v in rows.items() if isinstance(v, int)}
    total = sum(counts.values())
    big = [n for n, g in defined.items() if g < 0 and counts.get(n, 0) * len(counts) > total]
    if big and total:
        parts.append("a member with more rows than the average has the least to gain: "
                     + ", ".join(f"{n} ({counts[n]} of {total} training rows, "
                                 f"{defined[n]:+.4f})" for n in big[:4]))
    planned = summary.get("rounds")
    if isinstance(planned, int) and planned < FEW_ROUNDS:
        parts.append(f"after {planned} rounds the consortium model is still near its start")
    parts.append("on fewer than ~100 own rows a difference of a few hundredths is within the "
                 "rows' own noise (the 95 % intervals: `flnode report --state-dir`)")
    # named as the own-rows table's "mean gain" row: the consortium test set's table has a
    # mean gain of its own (often positive), printed beside it
    return (f"why the mean gain on the members' own rows is negative ({mean:+.4f}): "
            + "; ".join(parts) + ".")


def own_mean_gain(summary: dict[str, Any]) -> float | None:
    """The mean of the members' gains on their own held-out rows (summary.json `own_rows`),
    over the members where the metric is defined: the own-rows tables' "mean gain" row (the
    terminal's, node/rehearsal/simulation/output.py, and the report's). None: no such gain."""
    own = summary.get("own_rows") if isinstance(summary.get("own_rows"), dict) else {}
    gains = [r.get("gain") for r in own.values() if isinstance(r, dict)]
    defined = [g for g in gains if isinstance(g, int | float) and not isinstance(g, bool)
               and math.isfinite(g)]
    return sum(defined) / len(defined) if defined else None


def _own_rows(run: Run) -> str:
    """Each member's local-only model and the consortium's on the member's OWN held-out rows
    (summary.json `own_rows`, written by the simulators): the gain a member's manager asks
    for. Nothing when the run has no such figures."""
    s = run.summary
    own = s.obj("own_rows")
    if not own:
        return ""
    rows = []
    for name, e in own.items():
        if not isinstance(e, dict):
            raise s._fail(["own_rows", name], "an object", e)
        where = ["own_rows", name]
        n = s.check_count([*where, "rows"], e.get("rows"))
        lo = s.check_num([*where, "local_only"], e.get("local_only"))
        co = s.check_num([*where, "consortium"], e.get("consortium"))
        gain = co - lo if lo is not None and co is not None else None
        rows.append(f'<tr><td class="l name" title="{_e(name)}">{_e(name)}</td>'
                    f"<td>{_count_cell(n)}</td><td>{_fmt(lo)}</td><td>{_fmt(co)}</td>"
                    f"<td>{_signed(gain)}</td></tr>")
    mean = own_mean_gain(s.doc)
    if mean is not None:  # the row the note below the heading speaks of
        rows.append('<tr><td class="l name">mean gain</td><td></td><td></td><td></td>'
                    f"<td>{_signed(mean)}</td></tr>")
    source = s.text("own_rows_source")
    return ("<h3>On each member's own held-out rows</h3>"
            '<p class="sub">The member\'s local-only model and its consortium model, both '
            "scored on rows the member held out of its own data"
            + (f" ({_e(source)})" if source else "") + "; gain = consortium − local-only. "
            "A metric that is undefined there (one class only) shows as —.</p>"
            + (f'<p class="sub">{_e(why)}</p>' if (why := negative_gain_note(s.doc)) else "")
            + '<div class="scroll"><table><thead><tr><th class="l">member</th><th>held-out rows'
            "</th><th>local-only</th><th>consortium</th><th>gain</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>")


def secure_views(run: Run) -> list[SecureView]:
    """Each member's view of the secure rounds (issue 22), in the summary's member order;
    empty for a plain consortium. What a state dir holds that cannot be read becomes a note."""
    views = []
    for m in run.members:
        d = run.state_dirs.get(m.name)
        view = read_secure(d, f"state/{m.name}", m.name) if d is not None else None
        if view is not None:
            views.append(view)
            run.notes.extend(view.notes)
    return views


def render(run: Run) -> str:
    s = run.summary
    figures = plots(run)
    secure = secure_section(secure_views(run), s.obj("rules"), [m.name for m in run.members])
    dataset = s.text("dataset") or "run"
    title = f"flnode report: {dataset}, {len(run.members)} members"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">run directory <code>{_e(run.run_dir.resolve())}</code> · report '
        f"written {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>",
        "<h2>Run</h2>", _facts(run),
        "<h2>Members</h2>",
        '<p class="sub">local-only: the member trained alone on its own rows for as many '
        "epochs; consortium: its model after the last round; gain = consortium − local-only; "
        "every metric on the same consortium test set. Shares released: the rounds the member "
        "closed (each opens with its own release); received: the other members' shares it "
        "accepted; rejected: messages it refused, by reason.</p>",
        _table(run), _own_rows(run), _seen_by(run), secure,
    ]
    if run.notes:
        shown = run.notes[:MAX_NOTES]
        more = len(run.notes) - len(shown)
        parts.append("<h2>Notes</h2><div class=\"notes\"><ul>"
                     + "".join(f"<li>{_e(n)}</li>" for n in shown)
                     + (f"<li>… and {more} more</li>" if more else "") + "</ul></div>")
    parts.append("<h2>Per round</h2>")
    if not any(t.startswith("ε") for t, _, _ in figures):
        parts.append('<p class="sub">No ε plot: privacy was off, nothing was spent.</p>'
                     if s.text("epsilon", "mode") == "off" else
                     '<p class="sub">No ε plot: no member recorded ε per round.</p>')
    for name, caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)



def write_text_atomic(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary file, fsync'd, then renamed over it:
    a reader sees the old file or the new one, never half of one."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LocalError(f"{target}: cannot write: {exc.strerror}") from None


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render RUN_DIR's report; write it to `out` (default RUN_DIR/report.html) atomically."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    if not target.parent.is_dir():
        raise LocalError(f"--out {target}: directory {target.parent} does not exist")
    if target.is_dir():
        raise LocalError(f"--out {target}: is a directory; name a file, e.g. {target}/report.html")
    write_text_atomic(target, render(run))
    return target

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
import io
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.errors import LocalError

SUMMARY = "summary.json"
MAX_SUMMARY_BYTES = 64 << 20
MAX_JSONL_BYTES = 256 << 20
MAX_ROUND = 1 << 31
MAX_NOTES = 50
LABEL_CHARS = 40


# --------------------------------------------------------------------------- reading


def _where(path: list[str]) -> str:
    return ".".join(path) if path else "(top level)"


def _cut(value: Any, n: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "…"


class _Summary:
    """Typed, checked access to summary.json: a missing field is None, a wrong one an error."""

    def __init__(self, path: Path, doc: Any) -> None:
        self.path = path
        if not isinstance(doc, dict):
            raise LocalError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        self.doc = doc

    def _fail(self, where: list[str], what: str, value: Any) -> LocalError:
        return LocalError(f"{self.path}: {_where(where)}: expected {what}, got {_cut(value)}")

    def get(self, *where: str) -> Any:
        node: Any = self.doc
        for i, key in enumerate(where):
            if node is None:
                return None
            if not isinstance(node, dict):
                raise self._fail(list(where[:i]), "an object", node)
            node = node.get(key)
        return node

    def obj(self, *where: str) -> dict[str, Any]:
        value = self.get(*where)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._fail(list(where), "an object", value)
        return value

    def text(self, *where: str) -> str | None:
        value = self.get(*where)
        if value is None or isinstance(value, str):
            return value
        raise self._fail(list(where), "a string", value)

    def num(self, *where: str) -> float | None:
        return self.check_num(list(where), self.get(*where))

    def check_num(self, where: list[str], value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(where, "a number", value)
        return float(value)

    def check_count(self, where: list[str], value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._fail(where, "a count (an integer ≥ 0)", value)
        return value

    def per_node(self, *where: str) -> dict[str, float | None]:
        return {name: self.check_num([*where, name], v) for name, v in self.obj(*where).items()}


@dataclass
class RoundPoint:
    metric: float | None = None
    epsilon: float | None = None
    sent: int = 0          # bytes this member sent during the round
    received: int = 0      # bytes it received during the round
    shares_in: int = 0     # members whose share it received for the round
    closed: bool = False   # the member closed the round (it released a share for it)
    low: float | None = None   # the metric's 95 % interval on the member's held-out rows
    high: float | None = None  # (metrics.jsonl "intervals", node/ops/intervals.py)
    eval_rows: int | None = None


@dataclass
class Member:
    name: str
    rows: int | None = None
    held_rows: int | None = None  # a member's own report only: its held-out rows
    final: float | None = None
    local_only: float | None = None
    epsilon: float | None = None
    noise_multiplier: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    rejected: dict[str, int] | None = None
    rounds_done: int | None = None
    stopped: str | None = None
    attack: str | None = None
    process: dict[str, Any] | None = None
    rounds: dict[int, RoundPoint] = field(default_factory=dict)
    has_log: bool = False
    bytes_per_round_field: bool = False

    @property
    def released(self) -> int | None:
        return sum(p.closed for p in self.rounds.values()) if self.has_log else None

    @property
    def shares_received(self) -> int | None:
        return sum(p.shares_in for p in self.rounds.values()) if self.has_log else None


@dataclass
class Run:
    run_dir: Path
    summary: _Summary
    metric: str
    members: list[Member]
    notes: list[str]


def load_summary(run_dir: Path) -> _Summary:
    path = run_dir / SUMMARY
    if not run_dir.is_dir():
        raise LocalError(f"{run_dir}: no such directory (expected a run directory from "
                         "`flnode simulate --out DIR` or `scripts/simulate_network.py --out DIR`)")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LocalError(f"{path}: missing. The simulators write {SUMMARY} when a run ends; "
                         "is this a run directory, and did its run finish?") from None
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    if size > MAX_SUMMARY_BYTES:
        raise LocalError(f"{path}: {size} bytes, more than the {MAX_SUMMARY_BYTES} a summary "
                         "can be")
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise LocalError(f"{path}: not valid JSON: {exc}") from None
    return _Summary(path, doc)


def _members(s: _Summary) -> list[Member]:
    names: dict[str, None] = {}
    for where in (("rows",), ("consortium", "per_node"), ("local_only", "per_node"),
                  ("epsilon", "per_node"), ("bytes",), ("rounds_done",)):
        names.update(dict.fromkeys(s.obj(*where)))
    for r, per in s.obj("history").items():
        if not isinstance(per, dict):
            raise s._fail(["history", r], "an object", per)
        names.update(dict.fromkeys(per))
    final = s.per_node("consortium", "per_node")
    local = s.per_node("local_only", "per_node")
    eps = s.per_node("epsilon", "per_node")
    sigma = s.per_node("epsilon", "noise_multiplier_per_node")
    attackers = s.obj("attack", "attackers")
    processes = s.obj("processes")
    out = []
    for name in names:
        m = Member(name, final=final.get(name), local_only=local.get(name),
                   epsilon=eps.get(name), noise_multiplier=sigma.get(name))
        m.rows = s.check_count(["rows", name], s.obj("rows").get(name))
        b = s.obj("bytes").get(name)
        if b is not None:
            if not isinstance(b, dict):
                raise s._fail(["bytes", name], "an object", b)
            m.bytes_sent = s.check_count(["bytes", name, "sent"], b.get("sent"))
            m.bytes_received = s.check_count(["bytes", name, "received"], b.get("received"))
        rej = s.obj("rejected_per_node").get(name)
        if rej is not None:
            if not isinstance(rej, dict):
                raise s._fail(["rejected_per_node", name], "an object", rej)
            m.rejected = {str(k): s.check_count(["rejected_per_node", name, k], v) or 0
                          for k, v in rej.items()}
        m.rounds_done = s.check_count(["rounds_done", name], s.obj("rounds_done").get(name))
        m.stopped = s.text("stopped", name)
        if name in attackers:
            desc = attackers[name]
            m.attack = desc if isinstance(desc, str) else json.dumps(desc, sort_keys=True)
        proc = processes.get(name)
        if proc is not None:
            if not isinstance(proc, dict):
                raise s._fail(["processes", name], "an object", proc)
            m.process = proc
        out.append(m)
    return out


def _jsonl_lines(path: Path, notes: list[str], label: str) -> list[tuple[int, Any]]:
    """(line number, parsed value) of a JSONL file; unreadable lines become notes."""
    try:
        size = path.stat().st_size
        if size > MAX_JSONL_BYTES:
            notes.append(f"{label}: {size} bytes, more than {MAX_JSONL_BYTES}: not read")
            return []
        raw = path.read_bytes()
    except OSError as exc:
        notes.append(f"{label}: cannot read: {exc.strerror}")
        return []
    out = []
    lines = raw.split(b"\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except ValueError:
            torn = i == len(lines) or (i == len(lines) - 1 and not lines[-1])
            notes.append(f"{label} line {i}: not JSON"
                         + (" (a torn last line: the node stopped mid-write)" if torn else "")
                         + "; skipped")
    return out


def _num_or_none(v: Any) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def read_metrics(m: Member, path: Path, metric: str, notes: list[str], label: str) -> None:
    """Fill m.rounds from one member's metrics.jsonl. A round re-run after a restart
    has two lines: the last one's metric and ε count; the bytes of both are added."""
    m.has_log = True
    last_cum: tuple[int, int] | None = None
    last_rejected: dict[str, int] | None = None
    bad = 0
    for lineno, rec in _jsonl_lines(path, notes, label):
        r = rec.get("round") if isinstance(rec, dict) else None
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < MAX_ROUND:
            bad += 1
            if bad <= 3:
                notes.append(f"{label} line {lineno}: no valid round number; skipped")
            continue
        point = m.rounds.setdefault(r, RoundPoint())
        metrics = rec.get("metrics")
        if isinstance(metrics, dict):  # a round it closed (a retire line has none)
            point.closed = True
            point.metric = _num_or_none(metrics.get(metric))
            iv = rec.get("intervals")
            iv = iv.get(metric) if isinstance(iv, dict) else None
            if isinstance(iv, list) and len(iv) == 2:
                point.low, point.high = _num_or_none(iv[0]), _num_or_none(iv[1])
            point.eval_rows = _count(rec.get("eval_rows"))
        if rec.get("epsilon") is not None:
            point.epsilon = _num_or_none(rec["epsilon"])
        if isinstance(rec.get("received"), list):
            point.shares_in = len(rec["received"])
        if isinstance(rec.get("stopped"), str) and m.stopped is None:
            m.stopped = rec["stopped"]
        per_round = rec.get("bytes")
        cum = (_count(rec.get("bytes_sent")), _count(rec.get("bytes_received")))
        if isinstance(per_round, dict) and _count(per_round.get("sent")) is not None:
            m.bytes_per_round_field = True
            point.sent += _count(per_round.get("sent")) or 0
            point.received += _count(per_round.get("received")) or 0
        elif cum[0] is not None and cum[1] is not None:
            prev = last_cum or (0, 0)
            # A counter below the last one was reset (bytes lost with a crash): count
            # from zero rather than draw a negative round.
            point.sent += cum[0] - prev[0] if cum[0] >= prev[0] else cum[0]
            point.received += cum[1] - prev[1] if cum[1] >= prev[1] else cum[1]
        if cum[0] is not None and cum[1] is not None:
            last_cum = (cum[0], cum[1])
        if isinstance(rec.get("rejected"), dict):
            last_rejected = {str(k): v for k, v in rec["rejected"].items()
                             if _count(v) is not None}
    if m.rejected is None:  # summary.json's figure first, else the last line's counters
        m.rejected = last_rejected
    if bad > 3:
        notes.append(f"{label}: {bad} lines without a valid round number in all; skipped")


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    s = load_summary(run_dir)
    metric = s.text("metric") or "metric"
    members = _members(s)
    notes: list[str] = []
    state = run_dir / "state"
    # Found by listing, never by joining a name from summary.json onto a path.
    dirs = ({p.name: p for p in state.iterdir() if p.is_dir() and not p.is_symlink()}
            if state.is_dir() else {})
    if not dirs:
        notes.append("no state/<member>/ directories: per-round figures come from "
                     "summary.json's history only (no ε or bytes per round)")
    for m in members:
        d = dirs.get(m.name)
        log = d / "metrics.jsonl" if d is not None else None
        if log is not None and log.is_file():
            read_metrics(m, log, metric, notes, f"state/{m.name}/metrics.jsonl")
        elif dirs:
            notes.append(f"{m.name}: no state/{m.name}/metrics.jsonl; its curve comes from "
                         "summary.json's history")
    for r, per in s.obj("history").items():  # members without a metrics log
        try:
            rnd = int(r)
        except ValueError:
            raise s._fail(["history", r], "a round number as key", r) from None
        for m in members:
            if not m.has_log and m.name in per:
                m.rounds.setdefault(rnd, RoundPoint()).metric = s.check_num(
                    ["history", r, m.name], per[m.name])
    extra = sorted(set(dirs) - {m.name for m in members})
    if extra:
        notes.append("state dirs of members summary.json does not name (not shown): "
                     + ", ".join(extra))
    for m in members:
        if m.has_log and not m.rounds:
            notes.append(f"{m.name}: metrics.jsonl holds no complete round")
    return Run(run_dir, s, metric, members, notes)


# --------------------------------------------------------------------------- plots


def _label(name: str) -> str:
    """A member name as matplotlib shows it literally: no mathtext, not hidden."""
    text = name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS - 1] + "…"
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _series(m: Member, what: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in sorted(m.rounds):
        v = getattr(m.rounds[r], what)
        if v is not None and math.isfinite(v):
            xs.append(r + 1)
            ys.append(v)
    return xs, ys


def _lines(ax: Any, members: list[Member], what: str, colors: list[str],
           scale: float = 1.0, together: str = "every member", thin: bool = False) -> None:
    """One line per member; members whose curves are identical (they hold the same model)
    share one line, named after all of them (black, and `together`, when that is all)."""
    groups: dict[tuple, list[tuple[int, Member]]] = {}
    for i, m in enumerate(members):
        xs, ys = _series(m, what)
        if xs:
            groups.setdefault((tuple(xs), tuple(y * scale for y in ys)), []).append((i, m))
    for (xs, ys), group in groups.items():
        i, first = group[0]
        attack = any(m.attack for _, m in group)
        if len(group) > 1 and len(groups) == 1:
            color, label = "black", together
        else:
            color = colors[i % len(colors)]
            names = [_label(m.name) + (" (attacker)" if m.attack else "") for _, m in group]
            label = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4
                                            else "")
        ax.plot(xs, ys, color=color, lw=1.1 if thin else 2 if len(group) > 1 else 1.6,
                marker="o", ms=2 if thin else 3, alpha=0.8 if thin else 1.0,
                ls="--" if attack else "-", label=label)


def _finish(ax: Any, fig: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_below(fig, [ax])
    fig.tight_layout()


def _legend_below(fig: Any, axes: list[Any]) -> None:
    """One legend under the plot(s) for all their lines (a label once), so the plot keeps
    its width however many members there are."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), fontsize=8.5, loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(seen)), frameon=False)


def plots(run: Run, where: str = "the consortium test set") -> list[tuple[str, str, bytes]]:
    """(title, caption, PNG bytes) per plot: metric, ε (only with DP), bytes. `where`:
    what the metric is measured on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, members = run.summary, run.members
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    out = []
    metric = run.metric.replace("_", "-").upper() if run.metric != "accuracy" else "accuracy"

    fig, ax = plt.subplots(figsize=(10, 4.6))
    _lines(ax, members, "metric", colors,
           together="consortium (every member holds the same model)")
    local = False
    for i, m in enumerate(members):
        if m.local_only is not None and math.isfinite(m.local_only):
            local = True
            ax.axhline(m.local_only, color=colors[i % len(colors)], ls=":", lw=1.3,
                       label=f"{_label(m.name)} local-only")
    central = s.num("centralized")
    centralized = central is not None and math.isfinite(central)
    if centralized:
        ax.axhline(central, color="black", ls="--", lw=1.4, label="centralized (no DP)")
    banded = False
    for i, m in enumerate(members):  # the 95 % interval, where the member recorded one
        band = [(r + 1, p.low, p.high) for r, p in sorted(m.rounds.items())
                if p.low is not None and p.high is not None]
        if band:
            banded = True
            xs, lo, hi = zip(*band, strict=True)
            ax.fill_between(xs, lo, hi, color=colors[i % len(colors)], alpha=0.12, lw=0,
                            label=f"{_label(m.name)} 95 % interval")
    _finish(ax, fig, f"{metric} on {where}, per round", "round", metric)
    # the caption says what is drawn, no more (a member's own report has one line)
    solid = (f"Solid: {members[0].name}'s model after each round." if len(members) == 1 else
             "Solid: each member's model after each round (one black line when every "
             "member holds the same model; one line named after several members when they hold "
             "the same model" + ("; dashed colored: an attacker" if any(m.attack for m in members)
                                 else "") + ").")
    out.append((f"{metric} per round",
                solid
                + (" Dotted: each member trained alone on its own rows (local-only)." if local
                   else "")
                + (" Dashed black: the same model trained on all rows pooled (centralized)."
                   if centralized else "")
                + (" Shaded: the 95 % interval of the metric on the member's held-out rows "
                   "(Wilson for accuracy, Newcombe's score interval for ROC-AUC): how much of a "
                   "swing between rounds the number of rows alone explains." if banded else ""),
                _png(fig)))

    if any(_series(m, "epsilon")[0] for m in members):
        fig, ax = plt.subplots(figsize=(10, 4.2))
        _lines(ax, members, "epsilon", colors, together="every member")
        budget = s.num("epsilon", "budget")
        if budget is not None and math.isfinite(budget):
            ax.axhline(budget, color="crimson", ls="--", lw=1.2, label=f"budget ε = {budget:g}")
        delta = s.num("epsilon", "delta")
        _finish(ax, fig, "privacy spent per member (cumulative)", "round",
                "ε" + (f" at δ = {delta:g}" if delta is not None else ""))
        out.append(("ε per round", "ε each member has spent after each round, from its "
                    "privacy ledger (as the node recorded it in metrics.jsonl).", _png(fig)))

    if any(m.has_log and m.rounds for m in members):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        for ax, what, title in ((axes[0], "sent", "sent"), (axes[1], "received", "received")):
            _lines(ax, [m for m in members if m.has_log], what, colors, scale=1e-3,
                   together="every member", thin=True)
            ax.set_title(f"bytes {title} per round", fontsize=11)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0].set_ylabel("kB (10³ bytes)")
        axes[0].set_ylim(bottom=0)
        fig.tight_layout()
        _legend_below(fig, list(axes))
        exact = all(m.bytes_per_round_field for m in members if m.has_log)
        out.append(("bytes per round", "Bytes each member's transport sent and received in "
                    "each round (envelopes, hellos and prekey announcements included)"
                    + ("." if exact else ", differenced from the cumulative counters in "
                       "metrics.jsonl; a round a node re-ran after a restart counts both runs. "
                       "A node sends its share in the background: a send still under way "
                       "when the node records its round counts in the next round, so a "
                       "sent curve can alternate between 0 and twice a round's bytes."),
                    _png(fig)))
    return out


# --------------------------------------------------------------------------- HTML

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
    add("sealed shares", s.text("seal"))
    mode = s.text("epsilon", "mode")
    if mode == "off":
        add("privacy", "off (no differential privacy)")
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
    if training:  # local training every member ran (FedProx, LR decay, control variates)
        add("local training", ", ".join(f"{k} = {_value(v)}" for k, v in training.items()
                                        if v is not None))
    agg = s.obj("aggregation")
    if agg:
        text = str(agg.get("rule", "?"))
        extra = [f"{k} = {_value(v)}" for k, v in sorted(agg.items())
                 if k != "rule" and v is not None]
        add("aggregation", text + (" (" + ", ".join(extra) + ")" if extra else ""))
    rules = s.obj("rules")
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
# at ε 3 reached ROC-AUC 0.95 only after 10 rounds; node/rules.py few_rounds_warning).
FEW_ROUNDS = 10


def negative_gain_note(summary: dict[str, Any]) -> str | None:
    """Why members lose on their own rows, when the mean gain there is negative: the
    two models are not trained alike (local-only has no DP and fits only the member's
    own distribution), and the members who lose are those with the most rows of their
    own. None when the mean gain is not negative."""
    own = summary.get("own_rows") if isinstance(summary.get("own_rows"), dict) else {}
    gains = {n: r.get("gain") for n, r in own.items() if isinstance(r, dict)}
    defined = {n: g for n, g in gains.items() if isinstance(g, int | float) and math.isfinite(g)}
    if not defined or sum(defined.values()) / len(defined) >= 0:
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
    return "why the mean gain is negative: " + "; ".join(parts) + "."


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


def render(run: Run) -> str:
    s = run.summary
    figures = plots(run)
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
        _table(run), _own_rows(run), _seen_by(run),
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


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render RUN_DIR's report; write it to `out` (default RUN_DIR/report.html) atomically."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    if not target.parent.is_dir():
        raise LocalError(f"--out {target}: directory {target.parent} does not exist")
    if target.is_dir():
        raise LocalError(f"--out {target}: is a directory; name a file, e.g. {target}/report.html")
    text = render(run)
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
    return target

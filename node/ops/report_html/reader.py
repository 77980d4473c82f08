"""Reading a run directory for `flnode report RUN_DIR` (and a member's own report):
summary.json through a checked accessor, each member's metrics.jsonl line by line.

Everything read from the run dir is hostile input. `summary.json` must be a JSON
object whose fields, where present, have the types the simulators write; a field of
the wrong type is a `LocalError` naming the file and the field. A member's
`metrics.jsonl` may be cut short (a node killed mid-run) or end in a torn line: what
parses is kept and each skipped line is listed as a note. State dirs are found by
listing `state/`, never by joining a name from summary.json onto a path.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from node.runtime.state import loads_json

SUMMARY = "summary.json"
MAX_SUMMARY_BYTES = 64 << 20
MAX_JSONL_BYTES = 256 << 20
MAX_ROUND = 1 << 31
MAX_FLOAT = sys.float_info.max  # an int past it is no number a node wrote


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
        if isinstance(value, bool) or not isinstance(value, int | float) or not _in_range(value):
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
    # state/<member>/ directories found by listing (never joined from a name read in a file)
    state_dirs: dict[str, Path] = field(default_factory=dict)


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
        doc = loads_json(path.read_bytes())
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
            out.append((i, loads_json(line)))
        except ValueError as exc:
            torn = i == len(lines) or (i == len(lines) - 1 and not lines[-1])
            deep = " (nested too deep)" if "nested deeper" in str(exc) else ""
            notes.append(f"{label} line {i}: not JSON{deep}"
                         + (" (a torn last line: the node stopped mid-write)" if torn else "")
                         + "; skipped")
    return out


def _in_range(v: int | float) -> bool:
    """A float, or an int a float can hold (float() of a file's 10**400 raises)."""
    return isinstance(v, float) or abs(v) <= MAX_FLOAT


def _num_or_none(v: Any) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or not _in_range(v):
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
    return Run(run_dir, s, metric, members, notes, dirs)

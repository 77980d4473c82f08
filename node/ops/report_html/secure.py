"""The report's secure section (issue 22): what a secure consortium's rounds did, read from
a member's own state dir (node/runtime/secure_node.py writes all of it).

- audit.jsonl (rotated parts included): the round's "aggregate" line with rule "secure":
  `secure` = {ok, reason, detail, dealt, entered, named, evidence (a deal: one file; an
  agreement split: a list of files)}, `used` (the selected
  members) and `excluded` (member -> {reason, detail}). A failed round's reason is one of
  node/runtime/secure_round.py REASONS (or a step's named fault); it is shown as written.
- the privacy ledger's "secure" records (node/privacy/secure_record.py): one charge per
  round the member dealt in, with the contributors it was charged for. epsilon is the
  accountant's over the whole ledger (`Ledger.epsilon`, what `flnode status` prints),
  never recomputed here; the ε per round is the one the node logged in metrics.jsonl when
  the round closed (the accountant's then).
- secure_plan.json (DP on the sum): the consortium's plan, through `SecurePlan.load`
  (which refuses a plan flnode never wrote, naming the field).

Everything is hostile input: a hand-edited audit line is shown as "unreadable" with its
file, line and what is wrong; a ledger or plan that does not load is shown as unreadable
with the loader's reason; nothing here raises on what a file holds. A state dir without
any of these (a plain consortium) has no secure section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossip.errors import LocalError
from node.ops.report_html.reader import (
    MAX_JSONL_BYTES,
    MAX_ROUND,
    _cut,
    _jsonl_lines,
    _num_or_none,
)

if TYPE_CHECKING:
    from node.privacy.secure import SecurePlan

AUDIT = "audit.jsonl"
LEDGER = "ledger.jsonl"
PLAN = "secure_plan.json"  # node/runtime/secure_node.py SECURE_PLAN_FILE
METRICS = "metrics.jsonl"
MAX_PLAN_BYTES = 1 << 16  # a plan is a dozen numbers; a bigger file is not one flnode wrote
MAX_NAMES = 10_000  # members named in one audit line (a consortium is far smaller)
# Files kept for one named member in one round: keep_split_evidence writes our two
# agreements, two per disagreeing member and the named member's steps (a few times n).
MAX_EVIDENCE_FILES = 4 * MAX_NAMES
MAX_TEXT = 300  # characters of a detail shown (the rest is in the audit line)
# Rows of the per-round table; a longer run shows its first rows and every failed round.
MAX_TABLE_ROUNDS = 400
DOC = "docs/privacy-secure.md"


@dataclass
class SecureRound:
    round: int  # 0-based, as in every record
    ok: bool | None = None
    reason: str | None = None
    detail: str = ""
    dealt: list[str] = field(default_factory=list)
    entered: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # member -> why
    named: dict[str, str] = field(default_factory=dict)  # member -> why
    # member -> what the node kept in its state dir, as it wrote it: one file (a dealer's
    # signed deal) or a list of files (the signed messages of an agreement step's split)
    evidence: dict[str, str | list[str]] = field(default_factory=dict)
    unreadable: str | None = None  # what is wrong with the audit line, if it is
    charged: list[int] = field(default_factory=list)  # contributors of each ledger charge
    epsilon: float | None = None  # the node's logged ε after the round (metrics.jsonl)


@dataclass
class SecureView:
    """One member's view of the secure rounds (its state dir)."""

    member: str
    rounds: dict[int, SecureRound] = field(default_factory=dict)
    plan: Any = None  # node.privacy.secure.SecurePlan, or None
    plan_problem: str | None = None
    epsilon: float | None = None  # the accountant's over the whole ledger
    delta: float | None = None
    ledger_problem: str | None = None
    charges: int = 0  # the ledger's secure records
    charge_members: int | None = None  # n and t from the ledger's last secure record
    charge_coalition: int | None = None
    reveal: str | None = None
    notes: list[str] = field(default_factory=list)


class _Bad(Exception):
    """A field of an audit line that is not what the node writes."""


def _names(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) > MAX_NAMES or not all(isinstance(x, str) for x in v):
        raise _Bad(f"{what} is not a list of member names ({_cut(v, 40)})")
    return list(v)


def _why(v: Any, what: str, key: str | None = None) -> dict[str, str]:
    """{member: why}; `key`: the why is a dict's field (excluded: {"reason", "detail"})."""
    if not isinstance(v, dict) or len(v) > MAX_NAMES:
        raise _Bad(f"{what} is not an object of member -> reason ({_cut(v, 40)})")
    out = {}
    for m, w in v.items():
        if key is not None and isinstance(w, dict):
            w = w.get("detail") or w.get(key)
        if not isinstance(w, str):
            raise _Bad(f"{what}[{str(m)[:30]}] is not a reason ({_cut(w, 40)})")
        out[str(m)] = w
    return out


def _evidence(v: Any, what: str) -> dict[str, str | list[str]]:
    """{member: path or [paths]}: node/runtime/secure_node.py `aggregate` writes a deal's
    file as one path and an agreement's split (keep_split_evidence) as a list of paths."""
    if not isinstance(v, dict) or len(v) > MAX_NAMES:
        raise _Bad(f"{what} is not an object of member -> kept files ({_cut(v, 40)})")
    out: dict[str, str | list[str]] = {}
    for m, files in v.items():
        if not (isinstance(files, str) or (
                isinstance(files, list) and len(files) <= MAX_EVIDENCE_FILES
                and all(isinstance(f, str) for f in files))):
            raise _Bad(f"{what}[{str(m)[:30]}] is not a kept file or a list of them "
                       f"({_cut(files, 40)})")
        out[str(m)] = files if isinstance(files, str) else list(files)
    return out


def parse_aggregate(rec: dict[str, Any], r: int) -> SecureRound:
    """A secure round from its audit "aggregate" line; _Bad naming the field if it is not
    what the node writes."""
    sec = rec.get("secure")
    if not isinstance(sec, dict):
        raise _Bad(f"secure is not an object ({_cut(sec, 40)})")
    ok, reason, detail = sec.get("ok"), sec.get("reason"), sec.get("detail", "")
    if not isinstance(ok, bool):
        raise _Bad(f"secure.ok is not true or false ({_cut(ok, 40)})")
    if not (reason is None or isinstance(reason, str)) or (not ok and not reason):
        raise _Bad(f"secure.reason is not a reason ({_cut(reason, 40)})"
                   + (" for a failed round" if not ok else ""))
    if not isinstance(detail, str):
        raise _Bad(f"secure.detail is not text ({_cut(detail, 40)})")
    return SecureRound(
        r, ok=ok, reason=reason, detail=detail,
        dealt=_names(sec.get("dealt", []), "secure.dealt"),
        entered=_names(sec.get("entered", []), "secure.entered"),
        selected=_names(rec.get("used", []), "used"),
        excluded=_why(rec.get("excluded", {}), "excluded", key="reason"),
        named=_why(sec.get("named", {}), "secure.named"),
        evidence=_evidence(sec.get("evidence", {}), "secure.evidence"))


def _audit_files(state: Path) -> list[Path]:
    from node.runtime.state import jsonl_files  # lean start: the state dir's rotation rule
    return jsonl_files(state / AUDIT)


def read_secure(state: Path, label: str, member: str | None = None) -> SecureView | None:
    """One member's secure rounds from its state dir (None: no secure record at all).
    `label`: how notes name the state dir (e.g. "state/site-0")."""
    view = SecureView(member or state.name)
    found = False
    for part in _audit_files(state):
        where = f"{label}/{part.name}"
        for lineno, rec in _jsonl_lines(part, view.notes, where):
            if not isinstance(rec, dict) or rec.get("kind") != "aggregate" or rec.get(
                    "rule") != "secure":
                continue
            found = True
            r = rec.get("round")
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < MAX_ROUND:
                view.notes.append(f"{where} line {lineno}: a secure round's line without a "
                                  f"valid round number ({_cut(r, 30)}); skipped")
                continue
            try:
                view.rounds[r] = parse_aggregate(rec, r)  # a re-run round: its last line
            except _Bad as exc:
                view.rounds[r] = SecureRound(r, unreadable=f"{where} line {lineno}: {exc}")
                view.notes.append(f"{where} line {lineno}: round {r + 1}'s secure record is "
                                  f"unreadable: {exc}")
    found = _read_ledger(state, label, view) or found
    found = _read_plan(state, label, view) or found
    if not found:
        return None
    _read_epsilons(state, label, view)
    return view


def _read_ledger(state: Path, label: str, view: SecureView) -> bool:
    """The ledger's secure charges and ε by the accountant; True if it has any."""
    from node.privacy import secure_record  # lean start: the ledger's record kinds
    from node.privacy.ledger import Ledger  # lean start: idem

    path = state / LEDGER
    if not path.exists():
        return False
    try:
        size = path.stat().st_size
        if size > MAX_JSONL_BYTES:
            raise LocalError(f"{size} bytes, more than the {MAX_JSONL_BYTES} read")
        ledger = Ledger(path)  # reads only (no repair)
    except (LocalError, OSError) as exc:
        view.ledger_problem = f"{label}/{LEDGER}: unreadable: {exc}"
        view.notes.append(view.ledger_problem)
        return False
    charges = [r for r in ledger.records if r.mode == secure_record.MODE]
    if not charges:
        return False
    view.charges = len(charges)
    for rec in charges:
        view.rounds.setdefault(rec.round, SecureRound(rec.round)).charged.append(
            rec.secure["contributors"])
    last = charges[-1].secure
    view.charge_members, view.charge_coalition = last["members"], last["coalition"]
    view.reveal, view.delta = last["reveal"], last["delta"]
    try:
        view.epsilon = ledger.epsilon(last["delta"])
    except (LocalError, ValueError, ArithmeticError) as exc:  # a record the accountant refuses
        view.ledger_problem = f"{label}/{LEDGER}: the accountant cannot take it: {exc}"
        view.notes.append(view.ledger_problem)
    return True


def load_plan(path: Path) -> SecurePlan | None:
    """A pinned secure plan through the node's own checked loader, refused from its size
    first (a plan is a dozen numbers); None if there is none. For the report and status."""
    from node.privacy.secure import SecurePlan  # lean start: the plan's checked loader

    if path.exists() and path.stat().st_size > MAX_PLAN_BYTES:
        raise LocalError(f"more than {MAX_PLAN_BYTES} bytes: not a plan flnode wrote")
    return SecurePlan.load(path)


def _read_plan(state: Path, label: str, view: SecureView) -> bool:
    path = state / PLAN
    if not path.exists():
        return False
    try:
        view.plan = load_plan(path)
    except (LocalError, OSError, UnicodeDecodeError) as exc:
        view.plan_problem = f"{label}/{PLAN}: unreadable: {exc}"
        view.notes.append(view.plan_problem)
    else:
        if view.delta is None and view.plan is not None:
            view.delta = view.plan.delta
    return True


def _read_epsilons(state: Path, label: str, view: SecureView) -> None:
    """The ε the node logged after each secure round (metrics.jsonl, the accountant's)."""
    path = state / METRICS
    if not path.is_file():
        return
    for _, rec in _jsonl_lines(path, [], f"{label}/{METRICS}"):  # its notes: the main reader's
        if not isinstance(rec, dict):
            continue
        r, eps = rec.get("round"), rec.get("epsilon")
        if (isinstance(r, int) and not isinstance(r, bool) and r in view.rounds
                and _num_or_none(eps) is not None and math.isfinite(eps)):
            view.rounds[r].epsilon = float(eps)


def to_json(view: SecureView) -> dict[str, Any]:
    """The view for report.json (scripts): the same facts as the section."""
    plan = view.plan
    return {
        "member": view.member, "epsilon": view.epsilon, "delta": view.delta,
        "charges": view.charges, "reveal": view.reveal,
        "ledger_problem": view.ledger_problem, "plan_problem": view.plan_problem,
        "plan": None if plan is None else {
            "digest": plan.digest(), "members": plan.members, "coalition": plan.coalition,
            "min_contributors": plan.min_contributors, "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate, "steps": plan.steps, "lr": plan.lr,
            "epsilon": plan.epsilon, "delta": plan.delta, "variant": plan.variant},
        "rounds": [{"round": r + 1, "outcome": _outcome_text(sr), "ok": sr.ok,
                    "reason": sr.reason, "detail": sr.detail, "dealt": sr.dealt,
                    "entered": sr.entered, "selected": sr.selected, "excluded": sr.excluded,
                    "named": sr.named, "evidence": sr.evidence, "unreadable": sr.unreadable,
                    "charged": sr.charged, "epsilon": sr.epsilon}
                   for r, sr in sorted(view.rounds.items())]}


def delta_text(delta: float, accounting: float | None) -> str:
    """"δ 1e-05 (accountant 9.995e-06; the rest for the range check's bits)": the plan's δ,
    the one the ε holds at (the node's round line and the budget state it), and beside it the
    δ the accountant computed ε at when it differs (SecurePlan.accounting_delta: the plan's
    less what the range check's bits may add). One wording for status, report and card."""
    if accounting is None or accounting == delta:
        return f"δ {delta:g}"
    return f"δ {delta:g} (accountant {accounting:.4g}; the rest for the range check's bits)"


def _key(sr: SecureRound) -> tuple:
    return (sr.ok, sr.reason, tuple(sr.entered), tuple(sr.selected), tuple(sorted(sr.named)))


def disagreements(views: list[SecureView]) -> dict[int, list[str]]:
    """Rounds whose outcome (opened or the reason, who entered, who was selected, who was
    named) differs between members' own records: round -> the members' views, one line each.
    Honest members compute the same from the same messages; a difference is what
    docs/privacy-secure.md's known hole looks like (or a member that closed the round late)."""
    out: dict[int, list[str]] = {}
    rounds = sorted({r for v in views for r in v.rounds})
    for r in rounds:
        seen = {v.member: v.rounds[r] for v in views
                if r in v.rounds and v.rounds[r].ok is not None}
        if len({_key(sr) for sr in seen.values()}) > 1:
            out[r] = [f"{m}: {_outcome_text(sr)}, entered {len(sr.entered)}, selected "
                      f"{len(sr.selected)}" + (f", named {', '.join(sorted(sr.named))}"
                                               if sr.named else "")
                      for m, sr in seen.items()]
    return out


def _outcome_text(sr: SecureRound) -> str:
    if sr.unreadable:
        return "unreadable"
    if sr.ok is None:
        return "charged, no outcome recorded"
    return "opened" if sr.ok else f"failed: {sr.reason}"


__all__ = ["SecureRound", "SecureView", "delta_text", "disagreements", "parse_aggregate", "read_secure",
           "to_json"]

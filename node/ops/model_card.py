"""The signed model card of an export (model_card.json): who trained the model, how, under
what privacy, how well it scores, which weights; signed with the member's Ed25519 key.

What goes in, and from where (everything read from the state dir is hostile: sizes and
line lengths bounded, types checked, errors name the file, the line and the field):

- consortium name, id and members (name and key fingerprint): the consortium file;
- rounds completed and planned: the checkpoint (node/ops/export.py load_member);
- which members' shares each round combined, and whom the rule excluded: the Aggregate
  lines of the member's own audit log (audit.jsonl and its rotated audit.jsonl.1..N);
  rounds whose lines were rotated away are listed as such, never guessed;
- the aggregation rule and its parameters (the consortium file's [rules]) and topology
  (every member sends its share to every other: "full mesh");
- ε at δ: this member's own, from its privacy ledger through the accountant
  (node/privacy/accountant.py epsilon_of, never recomputed here); the other members'
  only as announced to this member: flnode members announce no ε on the wire, so each is
  listed as not known to this member, not guessed;
- metrics on the member's held-out rows (or its test set, data.eval_path): the last
  round line of metrics.jsonl;
- the parameter digest (BLAKE2b-256 of the float32 parameters, final.json's and the
  manifest's), the SHA-256 of manifest.json (which lists every file's SHA-256), the
  flnode version.

Signed bytes: SIGNING_TAG followed by the canonical JSON of the "card" object
(gossip/membership.py canonical_json: UTF-8, keys sorted, no whitespace, no NaN).
docs/reference/files.md describes the file; node/ops/model_verify.py checks it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossip.errors import LocalError, shorten
from gossip.membership import canonical_json
from node.ops.predict import MANIFEST, sha256
from node.privacy.accountant import ACCOUNTANT, LedgerRecord, epsilon_of
from node.privacy.budget import PLAN_FILE, PrivacyPlan
from node.privacy.ledger import Ledger
from node.runtime.audit import AUDIT_FILE, METRICS_FILE
from node.runtime.identity import Identity, fingerprint, load_identity
from node.runtime.state import ROTATE_BYTES, ROTATE_KEEP

if TYPE_CHECKING:
    from node.ops.export import Member

CARD_FILE = "model_card.json"
CARD_VERSION = 1
# Prefixed to the canonical JSON before signing: a card signature can never be taken for
# an envelope's or any other flnode signature (those sign other tags).
SIGNING_TAG = b"flnode-model-card-v1\x00"
TOPOLOGY = "full mesh"  # every member sends its share to every other (gossip/protocol/)
# One audit or metrics line: an Aggregate line names each member a few times (weights,
# exclusions with a reason); 1 MiB holds thousands of members. A longer line is not ours.
MAX_LINE_BYTES = 1 << 20
# One audit file rotates at ROTATE_BYTES (node/runtime/state.py); one line may overshoot.
MAX_AUDIT_FILE_BYTES = ROTATE_BYTES + MAX_LINE_BYTES
# metrics.jsonl: one line per round (~1 KB); 64 MiB is ~60,000 rounds.
MAX_METRICS_FILE_BYTES = 64 * 1024 * 1024
# An exclusion's reason in the card: the strategy's names are a few words.
MAX_REASON_CHARS = 80
# Rounds in a card's table of shares used: beyond it the card keeps the latest ones.
MAX_CARD_ROUNDS = 10_000
OTHERS_EPSILON = ("not known to this member: flnode members announce no ε to each other; "
                  "ask that member for its own card")


def signed_bytes(card: dict[str, Any]) -> bytes:
    """What the signature covers: SIGNING_TAG + canonical JSON of the card object."""
    try:
        return SIGNING_TAG + canonical_json(card)
    except ValueError as exc:  # NaN or infinity: canonical JSON has none
        raise LocalError(f"model card: a value JSON cannot carry ({exc})") from None


def sign(card: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """The file's content: the card and its signature by `identity`."""
    sig = identity.signing_key.sign(signed_bytes(card)).signature
    return {"card": card, "signature": {
        "algorithm": "ed25519", "signer": identity.name,
        "public_key": identity.public_key.hex(), "fingerprint": identity.fingerprint,
        "signed": "SIGNING_TAG + canonical JSON of card (docs/reference/files.md)",
        "value": sig.hex()}}


# --- the member's own logs, read as hostile input --------------------------------------------

def jsonl_lines(path: Path, max_bytes: int, what: str):
    """(line number, JSON object) of a JSONL file, each line bounded; errors name the line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LocalError(f"{what} {path}: cannot read ({exc})") from None
    if size > max_bytes:
        raise LocalError(f"{what} {path}: {size} bytes, more than a node writes ({max_bytes}):"
                         " not this node's file")
    with open(path, "rb") as f:
        n = 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            n += 1
            if len(line) > MAX_LINE_BYTES:
                raise LocalError(f"{what} {path}: line {n} is over {MAX_LINE_BYTES} bytes: not "
                                 "a line a node writes (the file was altered)")
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                if not line.endswith(b"\n"):
                    return  # a torn last line (a crash mid-append): nothing after it
                raise LocalError(f"{what} {path}: line {n} is not JSON ({exc})") from None
            if not isinstance(doc, dict):
                raise LocalError(f"{what} {path}: line {n} is {type(doc).__name__}, not a "
                                 "JSON object")
            yield n, doc


def _names(value: Any, where: str, field: str) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise LocalError(f"{where}: field {field!r} is {shorten(value)}, not a list of "
                         "member names")
    return value


def _round(value: Any, where: str) -> int:
    if not (type(value) is int and 0 <= value < 2 ** 31):
        raise LocalError(f"{where}: field 'round' is {shorten(value)}, not a round number")
    return value


def _reason(value: Any) -> str:
    """An exclusion's reason (a short name the strategy gives), cut to MAX_REASON_CHARS."""
    return value[:MAX_REASON_CHARS] if isinstance(value, str) else shorten(value, MAX_REASON_CHARS)


def shares_used(state_dir: Path, rounds: int) -> dict[str, Any]:
    """Per round (1-based, as `flnode status` prints), the members whose shares the rule
    combined and those it excluded (with why), from the Aggregate lines of the audit log."""
    files = [state_dir / f"{AUDIT_FILE}.{k}" for k in range(ROTATE_KEEP, 0, -1)]
    files.append(state_dir / AUDIT_FILE)
    by_round: dict[int, dict[str, Any]] = {}
    for path in files:
        for n, rec in jsonl_lines(path, MAX_AUDIT_FILE_BYTES, "audit log"):
            if rec.get("outcome") != "aggregate":
                continue
            where = f"audit log {path}: line {n}"
            r = _round(rec.get("round"), where)
            if r >= rounds:
                continue  # a round after the checkpoint's (not in this model)
            excluded = rec.get("excluded", {})
            if not (isinstance(excluded, dict) and all(
                    isinstance(k, str) and isinstance(v, dict) for k, v in excluded.items())):
                raise LocalError(f"{where}: field 'excluded' is {shorten(excluded)}, not a "
                                 "table of member: reason")
            rule = rec.get("rule")
            if not isinstance(rule, str):
                raise LocalError(f"{where}: field 'rule' is {shorten(rule)}, not a rule name")
            by_round[r] = {"round": r + 1, "rule": rule,
                           "used": _names(rec.get("used"), where, "used"),
                           "excluded": {k: _reason(v.get("reason"))
                                        for k, v in sorted(excluded.items())}}
    kept = sorted(by_round)[-MAX_CARD_ROUNDS:]
    missing = [r + 1 for r in range(rounds) if r not in by_round]
    return {"source": f"{AUDIT_FILE} (rounds 1-based)", "rounds": [by_round[r] for r in kept],
            "not_in_audit_log": missing[:MAX_CARD_ROUNDS],
            **({"note": "rounds missing from the audit log: rotated away, or the log was "
                        "removed; not guessed"} if missing else {})}


def last_metrics(state_dir: Path, rounds: int) -> dict[str, Any] | None:
    """The last round line of metrics.jsonl within the model's rounds."""
    path = state_dir / METRICS_FILE
    last = None
    for n, rec in jsonl_lines(path, MAX_METRICS_FILE_BYTES, "metrics log"):
        if "metrics" not in rec:
            continue
        where = f"metrics log {path}: line {n}"
        r = _round(rec.get("round"), where)
        metrics = rec.get("metrics")
        if not (isinstance(metrics, dict) and all(
                isinstance(k, str) and isinstance(v, int | float) for k, v in metrics.items())):
            raise LocalError(f"{where}: field 'metrics' is {shorten(metrics)}, not a table of "
                             "numbers")
        rows = rec.get("eval_rows")
        if not (type(rows) is int and rows >= 0):
            raise LocalError(f"{where}: field 'eval_rows' is {shorten(rows)}, not a row count")
        if r < rounds:
            last = {"round": r + 1, "rows": rows,
                    "metrics": {k: (v if math.isfinite(v) else None)
                                for k, v in sorted(metrics.items())}}
            intervals = rec.get("intervals")
            if isinstance(intervals, dict):
                last["intervals_95"] = {k: v for k, v in sorted(intervals.items())
                                        if isinstance(v, list) and len(v) == 2 and all(
                                            isinstance(x, int | float) and math.isfinite(x)
                                            for x in v)}
    return last


def own_epsilon(state_dir: Path, rounds: int) -> dict[str, Any]:
    """This member's ε at its δ: its ledger, through the accountant; all of it (what its
    rows have spent, releases after this model's round included: a node charges a round's
    release before sending it) and the releases of the model's `rounds` alone."""
    try:
        plan = PrivacyPlan.load(state_dir / PLAN_FILE)
    except LocalError as exc:
        raise LocalError(f"{state_dir}: {exc}") from None
    stated: dict[str, Any] = {}
    if plan is not None:
        mode, delta, budget = plan.mode, plan.delta, plan.epsilon
    else:  # DP on a secure sum (issue 22) has no local plan: its ledger says
        secure = _secure_dp(state_dir)
        if secure is None:
            return {"mode": "off", "epsilon": None,
                    "note": "privacy off: no differential privacy; no ε to state"}
        mode, delta, budget, plan_delta = secure
        if plan_delta is not None and plan_delta != delta:
            # ε holds at the plan's δ; the accountant computes it at the plan's δ less what
            # the range check's bits may add (SecurePlan.accounting_delta): both stated
            stated = {"delta": plan_delta, "delta_accountant": delta}
    ledger = Ledger(state_dir / "ledger.jsonl")  # a reader: never repairs
    records: list[LedgerRecord] = ledger.records
    eps = epsilon_of(records, delta)
    upto = epsilon_of([r for r in records if r.round < rounds], delta)
    return {"mode": mode, "delta": delta, **stated,
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_model_rounds": upto if math.isfinite(upto) else None,
            "epsilon_budget": budget, "releases": len(records),
            "accountant": ACCOUNTANT,
            "source": "ledger.jsonl through the accountant: epsilon over every release "
                      "charged (also one after this model's round, or whose share never "
                      "left: never under-counted); epsilon_model_rounds over the releases "
                      "of the model's rounds",
            **({"note": "a release without noise: ε is unbounded"}
               if not math.isfinite(eps) else {})}


def _secure_dp(state_dir: Path) -> tuple[str, float, float | None, float | None] | None:
    """("secure", δ, budget, the plan's δ) of a member whose ledger holds secure DP charges
    (issue 22: DP on the secure sum, no local privacy plan), δ (the accountant's) from its
    charges, the budget and the plan's δ from its pinned plan (checked: an edited plan is a
    LocalError naming it); None: no such charge."""
    from node.privacy import secure_record  # lean start: only a card of a secure member
    from node.privacy.secure import SecurePlan  # lean start: idem

    summary = secure_record.summary(Ledger(state_dir / "ledger.jsonl").records)
    if summary is None:
        return None
    try:
        pinned = SecurePlan.load(state_dir / "secure_plan.json")  # secure_node SECURE_PLAN_FILE
    except LocalError as exc:
        raise LocalError(f"{state_dir}: {exc}") from None
    return ("secure", summary["delta"], pinned.epsilon if pinned is not None else None,
            pinned.delta if pinned is not None else None)


# --- the card -----------------------------------------------------------------------------

def from_logs(member: Member) -> dict[str, Any]:
    """What the card takes from the member's own logs (audit, metrics, ledger): read before
    the export does any work, so a hostile log stops it early, by name."""
    evaluation = last_metrics(member.state_dir, member.round)
    eval_path = member.cfg.data.eval_path
    return {
        "shares_used": shares_used(member.state_dir, member.round),
        "own_privacy": own_epsilon(member.state_dir, member.round),
        "evaluation": None if evaluation is None else {
            **evaluation, "on": (f"test set {eval_path.name} (data.eval_path)" if eval_path
                                 else "the member's own held-out rows (a split of data.path)")},
    }


def build(member: Member, name: str, where: Path, parameters: dict[str, Any],
          logs: dict[str, Any]) -> dict[str, Any]:
    """The unsigned card of member `name`'s export in `where` (its manifest.json written)."""
    manifest = json.loads((where / MANIFEST).read_text())
    c = member.consortium
    others = [m.name for m in c.members if m.name != name]
    return {
        "card_version": CARD_VERSION,
        "flnode_version": manifest["flnode_version"], "created": manifest["created"],
        "member": name,
        "consortium": {"name": c.name, "id": c.id.hex(),
                       "members": [{"name": m.name, "fingerprint": fingerprint(m.public_key)}
                                   for m in c.members]},
        "rounds": {"completed": member.round, "planned": member.planned_rounds,
                   "finished": member.round >= member.planned_rounds},
        "shares_used": logs["shares_used"],
        "aggregation": {"rules": json.loads(json.dumps(dict(c.rules))) if c.rules else None,
                        "rules_source": "the consortium file's [rules]" if c.rules else
                        "no [rules] in the consortium file: each node's own configuration",
                        # [rules] topology (gossip/topology.py) when agreed, else full mesh
                        "topology": (c.rules or {}).get("topology", TOPOLOGY)},
        "privacy": {"own": {"member": name, **logs["own_privacy"]},
                    "others": {m: {"epsilon": None, "claim": None, "note": OTHERS_EPSILON}
                               for m in others}},
        "evaluation": logs["evaluation"],
        "parameters": parameters,
        "manifest": {"file": MANIFEST, "sha256": sha256(where / MANIFEST)},
        "format": manifest["format"],
    }


def load_signer(member: Member) -> Identity:
    """The member's identity key, checked against its entry in the consortium file."""
    key = member.cfg.identity.key
    if key is None:
        raise LocalError(f"{member.config_path}: no identity.key: an export is signed with the "
                         "member's key (its model card)")
    path = key if key.is_absolute() else member.config_path.parent / key
    ident = load_identity(path)
    entry = next((m for m in member.consortium.members if m.name == ident.name), None)
    if entry is None or entry.public_key != ident.public_key:
        raise LocalError(f"identity key {path} ({ident.name}, {ident.fingerprint}) is not a "
                         "member's key in the consortium file: a card it signed would not "
                         "verify against the consortium")
    return ident


def write(member: Member, ident: Identity, where: Path, parameters: dict[str, Any],
          logs: dict[str, Any]) -> dict[str, Any]:
    """Build, sign and write model_card.json beside the manifest; the card."""
    card = build(member, ident.name, where, parameters, logs)
    doc = sign(card, ident)
    (where / CARD_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True,
                                              allow_nan=False) + "\n")
    return card

"""The audit and metrics logs: one typed record per line kind, and the one writer.

Each record serialises (`to_json`) to exactly the JSON keys readers rely on
(node/ops/status.py, node/ops/report*.py, scripts/chaos.py, scripts/crash_test.py;
tests/golden/records.json freezes them): renaming a field here never changes a key.
Rounds are 0-based in every line; `time` is the wall clock when the record was made.

audit.jsonl (rotated): Accepted, Refused (passed the verifier, refused on what it says),
Rejected (the verifier's no), Evidence (two envelopes one member signed for one slot),
Claim (a seen report that disagrees with us), Aggregate (the strategy's diagnostics),
Normalization (the agreed statistics), Control (control variates), Flood (messages
dropped over a member's share of our intake). metrics.jsonl: RoundMetrics, StoppedMetrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from node.runtime.state import StateDir

log = logging.getLogger("flnode.node")

AUDIT_FILE = "audit.jsonl"
METRICS_FILE = "metrics.jsonl"


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class Accepted:
    round: int
    member: str
    seq: int
    digest: str  # hex, as every digest below
    kind: str
    where: str  # what the round book did with it (gossip/protocol/book.py)
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member, "seq": self.seq,
                "digest": self.digest, "kind": self.kind, "outcome": "accepted",
                "where": self.where}


@dataclass(frozen=True)
class Refused:
    """A message that passed the verifier, refused on what it says (outcome: the reason)."""
    round: int
    member: str
    digest: str
    kind: str
    reason: str
    detail: str
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "digest": self.digest, "kind": self.kind, "outcome": self.reason,
                "detail": self.detail}


@dataclass(frozen=True)
class Rejected:
    """The verifier's or the round book's no (round: ours when it came; digest: of the
    bytes as received, which may not even be an envelope)."""
    round: int
    member: str
    digest: str
    reason: str
    detail: str
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "digest": self.digest, "outcome": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class Evidence:
    """A member signed two different envelopes for one round: `first`/`second` are
    {"seq", "digest", "sig", "kind"} (first None if we hold none); `proof`: the proof
    file under the state dir (None: no first envelope held, or the store is full)."""
    round: int
    member: str
    first: dict[str, Any] | None
    second: dict[str, Any]
    proof: str | None
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "outcome": "equivocation", "kind": "evidence", "first": self.first,
                "second": self.second, "proof": self.proof}


@dataclass(frozen=True)
class Claim:
    """A seen report naming another digest for `accused`'s share than the one we accepted:
    the reporter's claim, not a proof. `ours`: {"seq", "digest", "sig"}; `report`: the
    report's {"seq", "digest", "sig", "file"}."""
    round: int
    reporter: str
    accused: str
    meaning: str
    reported: str
    ours: dict[str, Any]
    report: dict[str, Any]
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.reporter,
                "reporter": self.reporter, "accused": self.accused,
                "outcome": "digest_mismatch", "kind": "claim", "meaning": self.meaning,
                "reported": self.reported, "ours": self.ours, "report": self.report}


@dataclass(frozen=True)
class Aggregate:
    """The strategy's diagnostics for a round (its to_json(): rule, used, excluded...)."""
    round: int
    member: str
    diagnostics: dict[str, Any]
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "outcome": "aggregate", "kind": "aggregate", **self.diagnostics}


@dataclass(frozen=True)
class Normalization:
    """The statistics (or range scaling) the members agreed (node/learn/normalize.py
    Agreed.to_json()), before round 1."""
    member: str
    agreed: dict[str, Any]
    round: int = 0
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "outcome": "normalization", "kind": "normalization", **self.agreed}


@dataclass(frozen=True)
class Control:
    """Which rounds' released values a round's control-variate correction comes from."""
    round: int
    member: str
    c_round: int | None
    own_round: int | None
    correction_norm: float
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "outcome": "control", "kind": "control", "c_round": self.c_round,
                "own_round": self.own_round, "correction_norm": self.correction_norm}


@dataclass(frozen=True)
class Flood:
    round: int
    member: str
    detail: str
    time: float = field(default_factory=_now)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "outcome": "flood", "detail": self.detail}


@dataclass(frozen=True)
class Traffic:
    """The running counters every metrics line carries: rejections by reason, bytes since
    start and since the previous line, and flood drops by sender (only if any)."""
    rejected: dict[str, int]
    bytes_sent: int
    bytes_received: int
    round_bytes_sent: int
    round_bytes_received: int
    flood_by_sender: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rejected": self.rejected, "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received, "round_bytes_sent": self.round_bytes_sent,
            "round_bytes_received": self.round_bytes_received}
        if self.flood_by_sender:
            out["flood_by_sender"] = self.flood_by_sender
        return out


@dataclass(frozen=True)
class RoundMetrics:
    """One closed round (metrics.jsonl). `closed`: all / moved_on / absent / deadline."""
    round: int
    metrics: dict[str, float]
    epsilon: float | None
    received: list[str]
    seconds: float
    intervals: dict[str, Any]
    eval_rows: int
    train_rows: int
    missing: list[str]
    closed: str
    aggregation: dict[str, Any]
    traffic: Traffic
    FILE: ClassVar[str] = METRICS_FILE

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "metrics": self.metrics, "epsilon": self.epsilon,
                "received": self.received, "seconds": self.seconds,
                "intervals": self.intervals, "eval_rows": self.eval_rows,
                "train_rows": self.train_rows, "missing": self.missing,
                "closed": self.closed, "aggregation": self.aggregation,
                **self.traffic.to_json()}


@dataclass(frozen=True)
class StoppedMetrics:
    """The node stopped sharing at this round (why: `stopped`)."""
    round: int
    stopped: str | None
    epsilon: float | None
    traffic: Traffic
    FILE: ClassVar[str] = METRICS_FILE

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "stopped": self.stopped, "epsilon": self.epsilon,
                **self.traffic.to_json()}


Record = (Accepted | Refused | Rejected | Evidence | Claim | Aggregate | Normalization | Control
          | Flood | RoundMetrics | StoppedMetrics)


@dataclass
class NodeCounters:
    rejected: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    send_failed: int = 0  # our own shares a transport refused to send (LocalError)
    # What the aggregation strategy did to whom: "member:what:reason" -> rounds
    aggregation: Counter[str] = field(default_factory=Counter)
    # Seen reports that disagree with the share we accepted from a member, by REPORTER: a
    # claim, not proof (the reporter may lie, or the accused split-equivocated; a seen
    # report carries no signature of the accused), so it never names the accused here.
    digest_mismatch: Counter[str] = field(default_factory=Counter)
    # Proven equivocations, by member: rounds in which we hold two different envelopes
    # it signed for the same round and kind (the proof: node/evidence.py).
    equivocation: Counter[str] = field(default_factory=Counter)


def write(state: StateDir, record: Record) -> dict[str, Any]:
    """Append one record as one JSON line to its file; the line written."""
    line = record.to_json()
    state.append_jsonl(record.FILE, line)
    return line


class AuditLog:
    """The node's writer of records, with what log lines are said once (`once`), the
    transport's byte and flood counters at the last metrics line (`traffic`), and the
    strategy's diagnostics counted per member and reason (`aggregate`)."""

    def __init__(self, state: StateDir, name: str) -> None:
        self.state = state
        self.name = name
        self._logged: set[tuple[str, str]] = set()
        self._bytes = (0, 0)  # transport byte counters at the last metrics line
        self._flood: Counter[str] = Counter()  # flood drops at the last metrics line

    def write(self, record: Record) -> dict[str, Any]:
        return write(self.state, record)

    def once(self, member: str, what: str) -> bool:
        """True the first time (member, what) is asked: log it then, count it after."""
        if (member, what) in self._logged:
            return False
        self._logged.add((member, what))
        return True

    def aggregate(self, r: int, d: dict[str, Any], counts: Counter[str]) -> None:
        """The strategy's diagnostics: one audit line per round, counted per member and
        reason, and a log line the first time a member is excluded, clipped or capped."""
        self.write(Aggregate(r, self.name, d))
        for what in ("excluded", "clipped", "weight_capped", "down_weighted"):
            for member, note in d[what].items():
                counts[f"{member}:{what}:{note['reason']}"] += 1
                if self.once(member, what):
                    log.log(logging.INFO if what == "down_weighted" else logging.WARNING,
                            "%s: round %d: %s %s by %s: %s (further are counted, not logged)",
                            self.name, r + 1, member, what.replace("_", " "), d["rule"],
                            note["detail"])
        for note in d["fallbacks"]:
            log.warning("%s: round %d: %s: %s", self.name, r + 1, note["reason"], note["detail"])

    def traffic(self, r: int, rejected: dict[str, int], sent: int, got: int,
                flood: Counter[str] | dict[str, int]) -> Traffic:
        """The counters for a metrics line: the bytes since the previous line (since
        start, for the first line of a run); a Flood audit line per member whose messages
        were dropped, unparsed, over its share of our intake since the previous line."""
        last_sent, last_got = self._bytes
        self._bytes = (sent, got)
        for member, count in sorted(flood.items()):
            if count > self._flood[member]:
                self.write(Flood(r, member, f"{count - self._flood[member]} messages over its "
                                 f"share of our intake dropped before verification "
                                 f"({count} in all)"))
        if flood:
            self._flood = Counter(flood)
        return Traffic(rejected, sent, got, sent - last_sent, got - last_got,
                       dict(flood) if flood else None)

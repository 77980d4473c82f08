"""The node's side of the digest echo (issue 19: members agree on what they aggregate).

The rule, what it guarantees and what it does not: gossip/protocol/echo.py. The machine
signs and sends our echo (an ordinary `Sign(KIND_ECHO)` action), files the others' and
decides; `Close.shares` is the agreed set. What is left here for the node:

- whether the consortium's rounds have the echo (its [rules] `echo`,
  node/strategy/consortium_rules.py) and with which f (`machine_args`);
- per closed round, one audit line (kind "agreement": who entered, who was excluded and why,
  whose echo was disregarded or never came, our echo's size), and per exclusion an audit
  line (kind "exclusion") whose evidence, the envelopes as their signers signed them
  (our held share of the member, the signed echoes that disagree with it, or the
  member's own echo contradicting its share: a proof), is kept in
  state/evidence/echo/ apart from the rotating audit log, bounded per member;
- counters: exclusions by member and reason, our echoes' bytes (node/runtime/metrics.py).

A second, different echo of one member for a round is refused by the machine and comes
here as an `Equivocation` like a share's: kept as a proof by findings.py (evidence.py's
`verify_equivocation` checks it).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgpack

from gossip.envelope import Accepted
from gossip.membership import Consortium
from gossip.protocol.echo import Agreement
from gossip.protocol.phases import ECHO, SHARE, PhaseSpec
from node.runtime.audit import AUDIT_FILE, AuditLog
from node.runtime.evidence import envelope_bytes
from node.runtime.findings import signed
from node.runtime.state import StateDir, atomic_write
from node.strategy.consortium_rules import echo_rule

log = logging.getLogger("flnode.node")

# Exclusion evidence files kept per excluded member (one per round it was excluded in);
# a member excluded every round of a long run must not fill our disk: the earliest kept.
MAX_EXCLUSIONS_PER_MEMBER = 64
EXCLUSION_VERSION = 1
EXCLUSION_SUFFIX = ".exclusion"


def machine_args(consortium: Consortium, strategy_params: dict[str, Any]) -> dict[str, Any]:
    """RoundMachine's `phases` and `faulty` for this consortium: (SHARE, ECHO) if its
    [rules] say `echo = true`, with f = the aggregation rule's f as resolved (the number
    of members whose echoes may lie); (SHARE,) otherwise."""
    if not echo_rule(consortium):
        return {"phases": (SHARE,)}
    phases: tuple[PhaseSpec, ...] = (SHARE, ECHO)
    return {"phases": phases, "faulty": int(strategy_params.get("f") or 0)}


@dataclass(frozen=True)
class EchoRound:
    """audit.jsonl: what the echo decided for a closed round (kind "agreement": an
    Accepted line's kind is the envelope's, "echo" for a peer's echo)."""
    round: int
    member: str
    entered: list[str]
    excluded: dict[str, str]  # member -> why (gossip/protocol/echo.py WHY)
    disregarded: dict[str, list[str]]  # echoer -> the senders it disputed
    unheard: list[str]
    echo_bytes: int  # our signed echo for the round (0: none signed)
    time: float = field(default_factory=time.time)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "outcome": "agreement", "kind": "agreement", "entered": self.entered,
                "excluded": self.excluded, "disregarded": self.disregarded,
                "unheard": self.unheard, "echo_bytes": self.echo_bytes}


@dataclass(frozen=True)
class Exclusion:
    """audit.jsonl: `member`'s share left out of `round` by the echo, `why`; `held`: our
    copy of its share {"seq", "digest", "sig", "kind"} (None: we hold none); `named`:
    digest (hex) -> the echoers naming it; `claims`: the echoers whose signed echo
    disagrees with `held`; `proof`: its own echo contradicts its share; `file`: the
    evidence under the state dir (None: nothing signed to keep, or the bound reached)."""
    round: int
    member: str
    why: str
    held: dict[str, Any] | None
    named: dict[str, list[str]]
    omitted_by: list[str]
    claims: list[str]
    proof: bool
    file: str | None
    time: float = field(default_factory=time.time)
    FILE: ClassVar[str] = AUDIT_FILE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "round": self.round, "member": self.member,
                "outcome": "echo_excluded", "kind": "exclusion", "why": self.why,
                "held": self.held, "named": self.named, "omitted_by": self.omitted_by,
                "claims": self.claims, "proof": self.proof, "file": self.file}


class EchoRecords:
    """Audit lines, evidence files and counters of the echo (module docstring)."""

    def __init__(self, name: str, state: StateDir, audit: AuditLog) -> None:
        self.name, self.state, self.audit = name, state, audit
        self.path = state.path / "evidence" / "echo"
        self.excluded: Counter[str] = Counter()  # "member:why" -> rounds
        self.bytes_sent = 0  # our signed echoes, each counted once (a broadcast)
        self._last_bytes: dict[int, int] = {}  # round -> our echo's size
        self._files: Counter[str] = Counter(
            p.name.rsplit("-round", 1)[0] for p in self.path.glob(f"*{EXCLUSION_SUFFIX}")
        ) if self.path.is_dir() else Counter()

    def signed(self, r: int, data: bytes) -> None:
        """Our echo for round r was signed (`data`: its bytes, as sent)."""
        self.bytes_sent += len(data)
        self._last_bytes = {r: len(data)}

    def closed(self, r: int, agreed: Agreement) -> None:
        """Round r's agreement: the echo line, and each exclusion with its evidence."""
        for member, ex in sorted(agreed.excluded.items()):
            self.excluded[f"{member}:{ex.why}"] += 1
            kept = self._keep(r, member, ex.why, ex.held, ex.claims, ex.proof)
            self.audit.write(Exclusion(
                r, member, ex.why, None if ex.held is None else signed(ex.held),
                {d.hex(): list(es) for d, es in sorted(ex.named.items())},
                list(ex.omitted_by), [c.sender for c in ex.claims], ex.proof is not None,
                kept))
            if self.audit.once(member, f"echo:{ex.why}"):
                log.warning("%s: round %d: %s's share left out by the echo: %s (%s; further "
                            "are counted, not logged)", self.name, r + 1, member, ex.why,
                            _meaning(ex.why, member))
        for echoer, disputed in sorted(agreed.disregarded.items()):
            if self.audit.once(echoer, "echo:disregarded"):
                log.warning("%s: round %d: %s's echo disregarded: it disputes %d share(s) "
                            "(%s), more than f", self.name, r + 1, echoer, len(disputed),
                            ", ".join(disputed))
        self.audit.write(EchoRound(
            r, self.name, sorted(agreed.enter), {m: e.why for m, e in
                                                 sorted(agreed.excluded.items())},
            {e: list(d) for e, d in sorted(agreed.disregarded.items())},
            list(agreed.unheard), self._last_bytes.get(r, 0)))

    def _keep(self, r: int, member: str, why: str, held: Accepted | None,
              claims: tuple[Accepted, ...], proof: Accepted | None) -> str | None:
        """The signed envelopes of an exclusion in state/evidence/echo/ (never rotated,
        never overwritten, at most MAX_EXCLUSIONS_PER_MEMBER files per member)."""
        if held is None and proof is None and not claims:
            return None
        safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in member)
        path: Path = self.path / f"{safe}-round{r}{EXCLUSION_SUFFIX}"
        if not path.exists():
            if self._files[safe] >= MAX_EXCLUSIONS_PER_MEMBER:
                return None
            doc = {"version": EXCLUSION_VERSION, "member": member, "round": r, "why": why,
                   "held": None if held is None else envelope_bytes(held.envelope),
                   "claims": [envelope_bytes(c.envelope) for c in claims],
                   "proof": None if proof is None else envelope_bytes(proof.envelope)}
            atomic_write(path, msgpack.packb(doc, use_bin_type=True))
            self._files[safe] += 1
        return str(path.relative_to(self.state.path))


def _meaning(why: str, member: str) -> str:
    return {"conflict": f"the members' echoes name different shares of {member}: it sent "
                        "different shares to different members (split equivocation), or "
                        "an echo lies",
            "unconfirmed": f"some members hold no share of {member} (lost, late, or it sent "
                           "to some members only)",
            "not_held": f"the others agree on a share of {member} we do not hold"}[why]

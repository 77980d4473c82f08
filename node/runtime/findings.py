"""What a node found out about members, kept as evidence and counted.

- An equivocation: a member signed two different envelopes for one round and kind.
  Both are kept as a proof in state/evidence/proofs/ (node/runtime/evidence.py: apart
  from the audit log, which a flood can rotate; one per member and round; bounded per
  member), counted once per (member, round), and named in an audit line with both
  digests and signatures. Anyone holding the member's public key can check the proof.
- A seen-report mismatch (gossip/protocol/seen.py): a member reports another digest for
  someone's share than the one we accepted. The reporter's claim, not a proof (a seen
  report carries no signature of the accused): counted under the reporter, its signed
  report kept in state/evidence/ (at most MAX_EVIDENCE_PER_MEMBER files per reporter).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from gossip.envelope import Accepted
from gossip.protocol.events import SeenMismatch
from node.runtime import audit
from node.runtime.audit import AuditLog, NodeCounters
from node.runtime.evidence import EvidenceStore, same_slot
from node.runtime.state import StateDir, atomic_write

log = logging.getLogger("flnode.node")

# Seen reports that disagree with our copy, kept per reporter (one file per report, at
# most this many): a member that reports without end must not fill our disk. (Proofs of
# equivocation have their own bounded store: node/runtime/evidence.py.)
MAX_EVIDENCE_PER_MEMBER = 64


def signed(acc: Accepted) -> dict[str, Any]:
    """An accepted envelope as audit lines name it: seq, digest, signature, kind."""
    e = acc.envelope
    return {"seq": e.seq, "digest": e.digest.hex(), "sig": e.sig.hex(), "kind": e.kind}


class Findings:
    def __init__(self, name: str, state: StateDir, log_: AuditLog,
                 counters: NodeCounters) -> None:
        self.name = name
        self.state = state
        self.audit = log_
        self.counters = counters
        self.store = EvidenceStore(state.path)
        self._files: Counter[str] = Counter()  # seen-report files kept per reporter
        self._proven: set[tuple[str, int]] = set()  # (member, round) counted as proven

    def equivocation(self, first: Accepted | None, second: Accepted, current: int) -> None:
        """`second` was refused as equivocation; `first`: what we hold from its sender for
        that round (None: nothing held). `current`: our round (older counts are dropped)."""
        member = second.sender
        name = None
        if first is not None and same_slot(first.envelope, second.envelope) \
                and first.envelope.digest != second.envelope.digest:
            path = self.store.keep_equivocation(member, first.envelope, second.envelope)
            name = None if path is None else str(path.relative_to(self.state.path))
            self._proven = {(m, r) for m, r in self._proven if r >= current}
            if (member, second.round) not in self._proven:
                self._proven.add((member, second.round))
                self.counters.equivocation[member] += 1
        self.audit.write(audit.Evidence(
            second.round, member, None if first is None else signed(first), signed(second),
            name))  # name None: no first envelope held, or this member's store is full

    def _file(self, member: str, name: str, data: bytes) -> str | None:
        """Keep signed bytes from `member` in state/evidence/ (at most
        MAX_EVIDENCE_PER_MEMBER files per member); its path relative to the state dir."""
        if self._files[member] >= MAX_EVIDENCE_PER_MEMBER:
            return None
        path = self.state.path / "evidence" / name
        if not path.exists():
            atomic_write(path, bytes(data))
            self._files[member] += 1
        return str(path.relative_to(self.state.path))

    def mismatch(self, found: SeenMismatch) -> None:
        """A seen report naming another digest than ours: the reporter's claim, counted
        under the reporter, its signed report kept as evidence."""
        r, reporter, report, data = found.round, found.reporter, found.report, found.data
        member, digest, mine = found.accused, found.reported, found.ours
        # The reporter's claim, counted under the reporter: nothing here proves which
        # of the two signed what (node/runtime/evidence.py); the accused is named as such.
        self.counters.digest_mismatch[reporter] += 1
        name = self._file(reporter, f"seen-{reporter}-round{r}-seq"
                          f"{report.envelope.seq}.envelope", data)
        if member == self.name:
            meaning = (f"{reporter} reports a round-{r + 1} share from us that we never "
                       f"sent: {reporter} misreports")
        else:
            meaning = (f"{member} signed a different share for round {r + 1} for "
                       f"{reporter} than for us (split equivocation), or {reporter} "
                       "misreports")
        self.audit.write(audit.Claim(
            r, reporter, member, meaning, digest.hex(),
            {"seq": mine[0], "digest": mine[1].hex(), "sig": mine[2].hex()},
            {"seq": report.envelope.seq, "digest": report.envelope.digest.hex(),
             "sig": report.envelope.sig.hex(), "file": name}))
        if self.audit.once(member, f"mismatch:{reporter}"):
            log.warning("%s: %s (a claim by %s, not a proof; its signed report is kept "
                        "in the audit log; further are counted, not logged)", self.name,
                        meaning, reporter)

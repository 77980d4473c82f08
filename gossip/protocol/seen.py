"""Seen reports: comparing what each member was sent. Pure, no clock.

When a round closes, each member tells the others which share digest it accepted from
whom (a seen message). A member that signed a different share for each peer (split
equivocation, which no single receiver can see) is noticed by every member that
compares a report with its own copy. A mismatch is a claim by the reporter, not a
proof: a seen report carries no signature of the accused. So a finding
(`SeenMismatch`) is counted under the reporter and names the accused as such.

Bookkeeping (runner.py `_close_seen`, `_on_seen`, `_compare_seen`, the expectation of
`_await_final_seen`):
- per closed round (the last SEEN_KEEP_ROUNDS), the (seq, digest, signature) we
  accepted per member, our own release included;
- reports for rounds we have not closed yet, if within the rounds we buffer (ours up
  to ours + lookahead), compared when we close that round; one per member and round,
  so memory stays bounded by members x (lookahead + kept rounds).

A secure round (node/runtime/secure_node.py) uses no member's share: nothing to report,
so no seen report is sent or waited for. The driver passes who took part in it instead
(`took_part`: the members that dealt to us, entered, or opened the sum elsewhere); after
the last round, those are the members whose final model digest we wait for and compare.

Issue 19 item 2 (members agree on what they aggregate) builds on the same digests: an
echo phase before the close (see machine.py) instead of a report after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gossip.envelope import Accepted
from gossip.protocol.events import SeenMismatch, Signature

# Rounds whose accepted digests we keep to compare the members' seen reports with.
SEEN_KEEP_ROUNDS = 8
# After the last round, how long a node waits for the others' seen reports of it (at
# most; never longer than a round deadline).
FINAL_SEEN_WAIT_S = 5.0


class SeenReports:
    def __init__(self, me: str, lookahead: int, keep_rounds: int = SEEN_KEEP_ROUNDS) -> None:
        self.me = me
        self.lookahead = lookahead
        self.keep_rounds = keep_rounds
        self.closed: dict[int, dict[str, Signature]] = {}
        self.pending: dict[int, dict[str, tuple[Accepted, bytes]]] = {}
        self.reported: set[tuple[int, str]] = set()
        self.own: dict[int, Signature] = {}
        # secure rounds: who took part (no seen report is sent for them)
        self.took_part: dict[int, frozenset[str]] = {}

    def released(self, r: int, own: Signature) -> None:
        """Our own share for round r, as signed (compared like anyone's)."""
        self.own[r] = own

    def close(self, r: int, received: Mapping[str, Signature],
              took_part: Iterable[str] | None = None) -> list[SeenMismatch]:
        """Round r is closed with these members' shares: keep the digests, compare the
        reports that came early; returns the findings. `took_part`: a secure round's
        members (module docstring), None for a plain round."""
        if took_part is not None:
            self.took_part[r] = frozenset(took_part)
        for old in [x for x in self.took_part if x <= r - self.keep_rounds]:
            del self.took_part[old]  # bounded as `closed`
        ours = dict(received)
        own = self.own.pop(r, None)
        if own is not None:
            ours[self.me] = own
        self.closed[r] = ours
        for old in [x for x in self.closed if x <= r - self.keep_rounds]:
            del self.closed[old]
        for old in [x for x in self.own if x < r]:
            del self.own[old]
        found: list[SeenMismatch] = []
        for _, (acc, data) in sorted(self.pending.pop(r, {}).items()):
            found += self.compare(acc, data)
        for old in [x for x in self.pending if x < r]:
            del self.pending[old]
        self.reported = {(x, m) for x, m in self.reported if x > r - self.keep_rounds}
        return found

    def report(self, acc: Accepted, data: bytes, current: int) -> list[SeenMismatch]:
        """A member's seen report: compared now if we have closed its round, kept until
        we do if it is within the rounds we buffer, else dropped; one per member and
        round (the first)."""
        r = acc.round
        if (r, acc.sender) in self.reported:
            return []
        if r in self.closed:
            self.reported.add((r, acc.sender))
            return self.compare(acc, data)
        if current <= r <= current + self.lookahead:
            self.reported.add((r, acc.sender))
            self.pending.setdefault(r, {})[acc.sender] = (acc, data)
        return []

    def compare(self, report: Accepted, data: bytes) -> list[SeenMismatch]:
        r, reporter = report.round, report.sender
        ours = self.closed.get(r, {})
        found = []
        for member, digest in report.seen:
            mine = ours.get(member)
            if mine is None or mine[1] == digest or member == reporter:
                continue
            found.append(SeenMismatch(r, reporter, member, digest, mine, report, data))
        return found

    def expected_final(self, r: int, neighbours: Iterable[str]) -> set[str]:
        """After the last round r: the members whose share we used (a secure round: who
        took part in it), still our neighbours, whose final model digest we wait for (and,
        in a plain round, their seen report first)."""
        members = self.took_part[r] if r in self.took_part else self.closed.get(r, {})
        return {m for m in members if m != self.me} & set(neighbours)

    def all_reported(self, r: int, members: Iterable[str]) -> bool:
        """Every seen report of round r we wait for came (a secure round: none is sent)."""
        return r in self.took_part or all((r, m) in self.reported for m in members)

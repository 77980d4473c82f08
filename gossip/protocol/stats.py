"""Federated normalization before round 1: votes and statistics collected. Pure.

Every member first votes (statistics usable, or range scaling); only when every vote
is in and none asks for range scaling does each member send its (noised) statistics,
and all combine the same messages (runner.py `_on_vote`, `_on_stats`, the waits of
`_agree_normalization`). The first message of each kind per member counts; a second,
different one is equivocation. A member whose first statistics are implausible (no
honest member could send them: `plausible` says why, from node's normalize module,
passed in so that gossip never imports node) is refused and left out of the
agreement, by every honest member alike, and later ones from it are refused too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gossip.bodies import Stats
from gossip.envelope import Accepted

# Why a member's statistics are refused, or None: node.normalize.implausible, bound to
# the privacy plan's sigma and the schema's numeric columns by the driver.
Plausibility = Callable[[Stats], "str | None"]


@dataclass(frozen=True)
class Normalization:
    """Federated normalization before round 1 (None in the machine: not federated)."""

    implausible: Plausibility  # node.normalize.implausible, bound by the driver
    agreed: bool = False  # normalization.json holds the agreed statistics already
    stats_stored: bool = False  # stats.envelope exists: every vote was "usable" before
    vote_range: bool = False  # our own vote: range scaling (our check at start failed)


class StatsAgreement:
    def __init__(self, members: Iterable[str], implausible: Plausibility) -> None:
        self.members = frozenset(members)  # the others (not us)
        self.implausible = implausible
        self.votes: dict[str, tuple[bool, bytes]] = {}  # member -> (range scaling, digest)
        self.stats: dict[str, tuple[Stats, bytes]] = {}  # member -> (values, digest)
        self.refused: set[str] = set()

    def vote(self, acc: Accepted) -> tuple[str, str] | None:
        """File a vote; (reason, detail) if it is refused."""
        assert acc.norm_range is not None
        held = self.votes.get(acc.sender)
        if held is not None and held[1] != acc.envelope.digest:
            return "equivocation", "a second, different norm vote (the first one received counts)"
        self.votes[acc.sender] = (acc.norm_range, acc.envelope.digest)
        return None

    def statistics(self, acc: Accepted) -> tuple[str, str] | None:
        """File a stats message; (reason, detail) if it is refused."""
        assert acc.stats is not None
        why = self.implausible(acc.stats)
        if acc.sender in self.refused:
            return "bad_stats", "its first stats message was refused"
        if why is not None:
            if acc.sender not in self.stats:
                self.refused.add(acc.sender)
            return "bad_stats", (f"statistics no honest member could send: {why}; left out "
                                 "of the normalization")
        held = self.stats.get(acc.sender)
        if held is not None and held[1] != acc.envelope.digest:
            return "equivocation", "a second, different stats message"
        self.stats[acc.sender] = (acc.stats, acc.envelope.digest)
        return None

    def votes_missing(self) -> list[str]:
        return sorted(self.members - set(self.votes))

    def stats_missing(self) -> list[str]:
        return sorted(self.members - self.refused - set(self.stats))

    def fallback(self, me: str, ours: bool) -> list[str]:
        """The members (us included) that voted for range scaling."""
        return sorted({m for m, (r, _) in self.votes.items() if r and m in self.members}
                      | ({me} if ours else set()))

    def messages(self) -> dict[str, Stats]:
        return {m: s for m, (s, _) in self.stats.items() if m in self.members}

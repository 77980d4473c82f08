"""Who is up, who is absent, and when the first round may start. Pure, no clock.

`Liveness` keeps, per member: heard from since we started (`up`), deadlines missed in
a row (`missed`), absent (rounds close without waiting for it: `absent`), waited for
once more on talk alone (`talked`), and no prekey by a deadline (`silent`: our share is
sealed without waiting for it). The rules (runner.py `_heard`, `_ignorable`,
`_note_absent`, and the `_silent` bookkeeping of `_await_prekeys` and `handle`):

- A share (for our round or a later one) re-arms the wait for its sender at once.
- Talk without a share (a hello, prekeys, a seen report, a refused but authentic
  message) re-arms it only once per absence, for one deadline (issue 19 item 4: one
  hello per round must not hold every round to its deadline).
- A member still in round r whose share did not come by r's deadline has missed one;
  after `absent_after` in a row it is absent.
- Absent members may be ignored only while the members heard from, ourselves
  included, are a majority of the consortium; else we may be the one cut off, and
  closing rounds without the others would race us ahead of them.

`StartBarrier` is the decision part of runner.py `_await_start`: before the first
round wait for `gossip.min_members` (no time limit), and after a restart up to one
round deadline for a majority of the members still sharing, recounted on every
arrival (a retire message shrinks it; with none left nobody is waited for).
Under a sparse topology the barrier counts the member's peers of its round only (the
book's `start_peers`, gossip/sparse.py: the members its hello goes to): min_members
is read over them and itself ("majority": of them; a number: at most all of them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from collections.abc import Set as AbstractSet

from gossip.errors import LocalError


def members_needed(min_members: int | str, members: int) -> int:
    """The members (us included) `gossip.min_members` asks for before round 1 in a
    consortium of `members`: "majority" is members // 2 + 1 (node/runtime/config.py `quorum`)."""
    return members // 2 + 1 if min_members == "majority" else int(min_members)


def _as_set(members: Iterable[str]) -> AbstractSet[str]:
    """`members` as a set, without a copy when it is one (the book's neighbours: asked
    per message, O(members) to copy)."""
    return members if isinstance(members, AbstractSet) else set(members)


class Liveness:
    def __init__(self, absent_after: int) -> None:
        if absent_after < 1:
            raise ValueError(f"absent_after = {absent_after}: at least 1")
        self.absent_after = absent_after
        self.up: set[str] = set()
        self.absent: set[str] = set()
        self.missed: Counter[str] = Counter()
        self.talked: set[str] = set()
        self.silent: set[str] = set()

    def heard(self, member: str, shared: bool = False) -> str | None:
        """An authentic message from `member`. Returns "back" (a share lifted its
        absence), "heard" (talk lifted it for one deadline) or None (nothing changed)."""
        self.up.add(member)
        if shared:
            self.missed.pop(member, None)
            self.talked.discard(member)
            if member in self.absent:
                self.absent.discard(member)
                return "back"
            return None
        if member in self.absent and member not in self.talked:
            self.talked.add(member)
            self.absent.discard(member)
            self.missed[member] = self.absent_after - 1  # one more deadline
            return "heard"
        return None

    def note_absent(self, waiting_for: Iterable[str]) -> list[tuple[str, int]]:
        """The round's deadline passed without a share of these members (still in it):
        count the miss; returns those that have just become absent (member, missed)."""
        marked = []
        for m in waiting_for:
            if m in self.absent:
                continue
            self.missed[m] += 1
            if self.missed[m] >= self.absent_after:
                self.absent.add(m)
                marked.append((m, self.missed[m]))
        return marked

    def ignorable(self, neighbours: Iterable[str]) -> set[str]:
        """The absent neighbours a round may close without: only while the others heard
        from, ourselves included, are a majority of the consortium.
        Asked several times per message (gossip/protocol/machine.py): a set of neighbours
        (the book's) is read as it is, not copied, and the cost is that of the absent
        members, not of the consortium (it was O(members) per call: docs/results/scale.md)."""
        neighbours = _as_set(neighbours)
        if not self.absent:
            return set()
        absent = {m for m in self.absent if m in neighbours}
        members = len(neighbours) + 1
        if 2 * (members - len(absent)) <= members:
            return set()
        return absent

    def prekey_came(self, member: str) -> None:
        """A prekey announcement from `member`: seal for it and wait for it again."""
        self.silent.discard(member)


class StartBarrier:
    """Whether the first round may start: `up` members heard from, `now` against the
    barrier's own deadline (one round deadline from its start)."""

    def __init__(self, min_members: int | str, members: int, restarted: bool,
                 started: float, deadline_s: float,
                 peers: Collection[str] | None = None) -> None:
        """`peers`: whom the barrier counts; fewer than the other `members - 1` under a
        sparse topology, and min_members is then read over them (module docstring)."""
        if peers is not None and len(peers) < members - 1:
            self.need = min(len(peers), max(0, members_needed(min_members, len(peers) + 1) - 1))
            self.restarted, self.started = restarted, started
            self.deadline = started + deadline_s
            return
        self.need = max(0, members_needed(min_members, members) - 1)
        if self.need + 1 > members:
            raise LocalError(f"gossip.min_members = {min_members} but the consortium has "
                             f"{members} members: it could never start")
        self.restarted = restarted
        self.started = started
        self.deadline = started + deadline_s

    def majority(self, neighbours: Iterable[str]) -> int:
        """A majority of the members still sharing (after a restart only), recounted on
        every call; 0 when there is nobody left to wait for."""
        count = len(_as_set(neighbours))
        return count // 2 + 1 if self.restarted and count else 0

    def passed(self, up: set[str], neighbours: Iterable[str], now: float) -> bool:
        neighbours = _as_set(neighbours)
        n_up = len(up & neighbours)
        return n_up >= self.need and (n_up >= self.majority(neighbours) or now >= self.deadline)

    def next_time(self, up: set[str], neighbours: Iterable[str], now: float,
                  next_report: float) -> float | None:
        """When the barrier must be looked at again without an arrival: the next wait
        report (while short of min_members) or its deadline (while short of a majority)."""
        neighbours = _as_set(neighbours)
        n_up = len(up & neighbours)
        ends = ([next_report] if n_up < self.need else []) + \
            ([self.deadline] if n_up < self.majority(neighbours) and now < self.deadline else [])
        return min(ends) if ends else None

"""Round bookkeeping: who has sent which share for which round. Pure, no I/O.

Lock-step rounds over a full mesh. The book holds, per round, at most one
accepted share per member. Shares for up to `lookahead` rounds ahead of ours
are buffered (a faster member has moved on); shares further ahead mean *we*
are behind: the newest such share per member is kept, and when our round
ends the book skips forward to the newest round it has seen instead of
replaying rounds the others have left. Older rounds are refused as `stale`
by the verifier before they get here.

A member whose share for a *later* round has arrived has left our round and
will not send it any more (shares are not retransmitted), so it no longer
holds the round open; and when every neighbour has left the next round too,
the book moves straight to the oldest round a neighbour is in. That is how a
restarted node catches up with the others without sitting out a deadline
for every round it missed. A prekey announcement (sealing) is sent on
entering a round, so it says the same: the member has left the rounds before.

Skipping ahead needs a majority: the book jumps to the newest round that
more than half of the neighbours are known to have reached, so one member
(authenticated, but lying about its round) cannot make us abandon rounds the
others are still in. With a single neighbour that neighbour is the majority.
(It used to jump only past `lookahead`; a restarted node then closed the rounds
in between with its own share alone instead of joining the others.)
"""

from __future__ import annotations

from collections.abc import Iterable

from gossip.envelope import (
    KIND_ECHO,
    KIND_FINAL,
    KIND_HELLO,
    KIND_NORM,
    KIND_PREKEY,
    KIND_RETIRE,
    KIND_SEEN,
    KIND_STATS,
    Accepted,
)
from gossip.errors import RemoteError


class RoundBook:
    def __init__(self, neighbours: Iterable[str], lookahead: int, current: int = 0) -> None:
        self.neighbours = frozenset(neighbours)
        self.lookahead = lookahead
        self.current = current
        self._shares: dict[int, dict[str, Accepted]] = {}
        self._far: dict[str, Accepted] = {}  # newest far-ahead share per member
        self._latest: dict[str, int] = {}  # newest round seen per member

    def add(self, share: Accepted) -> str:
        """Store an accepted share. Returns "buffered", "ahead" (we are behind),
        "retired" (the member has stopped sharing: rounds no longer wait for it) or
        "prekey" (a prekey announcement: only its round is noted), "hello", "seen" or "echo"."""
        if share.envelope.kind == KIND_RETIRE:
            self.neighbours = self.neighbours - {share.sender}
            return "retired"
        r = share.round
        if share.envelope.kind == KIND_PREKEY:
            # Announced on entering round r: the member has left every earlier round.
            self.note(share.sender, r)
            return "prekey"
        if share.envelope.kind == KIND_HELLO:  # "I am at round r"
            self.note(share.sender, r)
            return "hello"
        if share.envelope.kind == KIND_ECHO:
            # "My share phase of round r has closed": at round r at least, as a seen report.
            self.note(share.sender, r)
            return "echo"
        if share.envelope.kind == KIND_SEEN:
            # "I have closed round r": it is at round r at least. Not "past r": its share
            # for r may still be on its way (another stream), and must still be waited for.
            self.note(share.sender, r)
            return "seen"
        if share.envelope.kind == KIND_STATS:  # before round 1: the runner files it
            return "stats"
        if share.envelope.kind == KIND_NORM:  # before round 1: the runner files it
            return "norm"
        if share.envelope.kind == KIND_FINAL:  # after its last round: the runner files it
            self.note(share.sender, r)
            return "final"
        if r < self.current:  # the verifier checks this; the book does not trust callers
            raise RemoteError("stale", f"round {r} < current {self.current}", share.sender)
        held = self._shares.get(r, {}).get(share.sender)
        far = self._far.get(share.sender)
        if held is None and far is not None and far.round == r:
            held = far
        if held is not None and held.envelope.digest != share.envelope.digest:
            raise RemoteError("equivocation", f"a second, different share for round {r} "
                              f"(seq {held.envelope.seq} and {share.envelope.seq})", share.sender)
        self._latest[share.sender] = max(r, self._latest.get(share.sender, r))
        if r <= self.current + self.lookahead:
            self._shares.setdefault(r, {})[share.sender] = share
            return "buffered"
        prev = self._far.get(share.sender)
        if prev is None or prev.round < r:
            self._far[share.sender] = share
        return "ahead"

    def note(self, member: str, round_: int) -> None:
        """The member is (authentically) at round_ or later, though we hold no share of
        it: a prekey message, or a share sealed without a prekey of ours."""
        if member in self.neighbours:
            self._latest[member] = max(round_, self._latest.get(member, round_))

    def still_in(self, round_: int) -> list[str]:
        """Neighbours that have not left round_ (they may still read our share for it)."""
        return sorted(n for n in self.neighbours if self._latest.get(n, -1) <= round_)

    def past(self, member: str, round_: int) -> bool:
        """Whether neighbour `member` has left round_ (a message of a later round came)."""
        return member in self.neighbours and self._latest.get(member, -1) > round_

    def complete(self, round_: int, ignore: Iterable[str] = ()) -> bool:
        """Every neighbour (but those in `ignore`: known to be down) has sent its share
        for round_, or has moved past it."""
        return not set(self.waiting_for(round_)) - set(ignore)

    def waiting_for(self, round_: int) -> list[str]:
        have = self._shares.get(round_, {})
        return sorted(n for n in self.neighbours
                      if n not in have and self._latest.get(n, -1) <= round_)

    def held(self, member: str, round_: int) -> Accepted | None:
        """The share of `member` for round_ that we keep (buffered or far ahead), if any."""
        held = self._shares.get(round_, {}).get(member)
        far = self._far.get(member)
        if held is None and far is not None and far.round == round_:
            held = far
        return held

    def shares(self, round_: int) -> dict[str, Accepted]:
        return dict(self._shares.get(round_, {}))

    def missing(self, round_: int) -> list[str]:
        return sorted(self.neighbours - set(self._shares.get(round_, {})))

    def start_peers(self) -> frozenset[str]:
        """Whom the start barrier counts and a hello goes to: every neighbour (a sparse
        book, gossip/sparse.py, cuts it to the round's peers)."""
        return self.neighbours

    def quorum_round(self, among: Iterable[str] | None = None) -> int:
        """The newest round that a majority of the neighbours (or of `among`, the start
        barrier's peers) have reached (-1 if none)."""
        who = self.neighbours if among is None else frozenset(among) & self.neighbours
        if not who:
            return -1
        rounds = sorted((self._latest.get(n, -1) for n in who), reverse=True)
        return rounds[len(rounds) // 2]

    def join(self, round_: int) -> None:
        """Go straight to round_ (ahead of ours), e.g. where a majority is after a
        restart: the rounds in between are skipped, their buffered shares dropped."""
        if round_ > self.current:
            self._move_to(round_)

    def advance(self) -> int:
        """Close the current round; go to the next, or skip forward if behind: to the
        newest round a majority of the neighbours has reached, if that is past the
        next one, or to the oldest round any neighbour is in, if all have left it."""
        nxt = self.current + 1
        quorum = self.quorum_round()
        if quorum > nxt:
            nxt = quorum
        elif self.neighbours and all(self._latest.get(n, -1) > nxt for n in self.neighbours):
            nxt = min(self._latest[n] for n in self.neighbours)
        self._move_to(nxt)
        return nxt

    def _move_to(self, nxt: int) -> None:
        self.current = nxt
        self._shares = {r: s for r, s in self._shares.items() if r >= nxt}
        # Far-ahead shares now inside the window move into the buffer.
        for member, share in list(self._far.items()):
            if share.round < nxt:
                del self._far[member]
            elif share.round <= nxt + self.lookahead:
                self._shares.setdefault(share.round, {})[member] = share
                del self._far[member]

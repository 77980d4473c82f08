"""Whose echo of a round is still owed to us after its sender has moved past the round.

The echo phase of round r waits for a phase peer's echo while the peer is still in r
(RoundBook.still_in). A peer's message of a later round (its share, prekeys, echo or
hello reply of r + 1) shows that it has left r, but not that it left r without echoing:
an honest peer that ran r's echo phase sent its echo of r to every neighbour *before*
it closed r, and no transport keeps one sender's messages in order (MQTT orders per
topic only, and an echo is a broadcast while a hello reply is direct; libp2p runs up to
two streams per peer at once and a short one can finish first; a redelivery after a
reconnect comes after newer messages). Deciding without that echo is what let one
honest member admit a split equivocator the others left out (tests/test_protocol_echo.py,
the reordering tests).

But a peer can also move past r without ever echoing r to us: it closed r before we
were up (its echo went nowhere), it skipped r (it joined the round a majority is in
after a (re)start: RoundBook.join, or advance's skip when behind), or it crashed and
restarted past r. Waiting for such a peer's echo costs a whole echo deadline for an
echo that never comes (tests/test_crash_safety.py's late member waited out round 1's
echo deadline for two members that had closed round 1 before it started).

The line between the two: a peer owes us its echo of r when we heard from it, *while it
was in round r*, a message that only a member running r's phases sends: its share of r
(the book buffered it) or its prekey announcement for r (sent on entering r, sealing).
After either, an honest peer runs r's echo phase and sends its echo to every neighbour,
us included (a machine always goes from r's share phase to r's echo phase; only a crash
stops it). A start cancels that: a member's hello ask (or prekey hello) signed *after*
the message (a higher envelope seq: seqs are durable and increase across restarts) means
it restarted since, and may rejoin past r; unless the start names a round after r (its
checkpoint: it had closed r, so its echo of r was sent before the crash). A peer we
never heard in r (our start came after its share, or it skipped r) owes nothing and,
once past r, is not waited for, as before; nor is one that retired (RoundBook.past: no
longer a neighbour, its echo would be refused).

So a peer that will echo is waited for until its echo comes or the echo deadline
passes, and a peer that moved on without echoing us costs no deadline. Left, each only
after a crash or a failed training: (1) a peer that crashed after sharing r and
restarted past r is waited for until its hello ask arrives (at most the rest of the
echo deadline, as its crash would have cost); (2) after *our* restart, the broker (MQTT)
redelivers the share of a round its sender has since closed, and its echo with it: the
machine acks a first echo in the window only once its round is checkpointed, as a share
(over libp2p nothing is redelivered, and nothing is owed: we heard nothing in r); (3) the safety side:
a peer whose round r sent us nothing before its echo (it released nothing finite and
does not seal), or that restarted and rejoined r (its stored share comes again as a
duplicate, which the verifier refuses), is not known to owe its echo: its later message
ends the wait, as before this module.
Pure; bounded: one seq per member and round inside the book's window (pruned as rounds
close), one per member for its latest start.
"""

from __future__ import annotations

from gossip.envelope import Accepted


class EchoDue:
    """The messages that show a member was in a round (round -> member -> seq of the
    latest such message) and each member's latest start: (seq, round) of its hello ask."""

    def __init__(self) -> None:
        self._in: dict[int, dict[str, int]] = {}
        self._started: dict[str, tuple[int, int]] = {}

    def heard(self, acc: Accepted, where: str, current: int, lookahead: int) -> None:
        """An accepted message, filed by the book as `where` (RoundBook.add)."""
        seq = acc.envelope.seq
        if acc.hello:  # it has (re)started at acc.round (its checkpoint's round)
            if seq >= self._started.get(acc.sender, (-1, 0))[0]:
                self._started[acc.sender] = (seq, acc.round)
            return
        if where in ("buffered", "prekey") and current <= acc.round <= current + lookahead:
            got = self._in.setdefault(acc.round, {})  # the book's window only: bounded
            got[acc.sender] = max(seq, got.get(acc.sender, seq))

    def owes(self, member: str, r: int) -> bool:
        """Whether `member` was heard in round r and has not restarted since, or restarted
        only after it closed r (its start names a later round): it will echo r, or has."""
        seq = self._in.get(r, {}).get(member)
        started, at = self._started.get(member, (-1, 0))
        return seq is not None and (seq > started or r < at)

    def forget_before(self, r: int) -> None:
        self._in = {k: v for k, v in self._in.items() if k >= r}

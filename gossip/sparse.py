"""A round over a sparse topology (gossip/topology.py): the RoundBook that waits for the
round's in-peers only, and whom each message kind goes to. Pure, no I/O.

The round machine (gossip/protocol/machine.py) asks its book who it still waits for
(`waiting_for`, `complete`, `missing`), whose shares it closes with (`shares`) and whom
our share is sealed for (`still_in`, SendShare.seal_for). `sparse_book(topology, me)`
is a RoundBook whose answers are cut to the round's peers:

  still_in(r)     the out-peers of round r still in it: whom our share is sealed for
                  and sent to
  waiting_for(r)  the in-peers of round r whose share has not come (nor moved on)
  missing(r)      the in-peers of round r whose share we do not hold
  shares(r)       the in-peers' shares only: a member that sends its share to members
                  that did not draw it (a hostile one, to reach everyone) is held but
                  never combined

`recipients(kind, r)` is whom the driver sends a message of that kind for round r to
(node/runtime/sharing.py): a share to the round's out-peers; a seen report (the digests
of the shares a member combined) to its in-peers (whose shares it names) and out-peers
(whose seen report names ours, expected_final), and so does the final model digest
after the last round (the same members wait for it); a hello (and its answers) to the
in- and out-peers of the round the member is at (`start_peers`: whom its start barrier
counts and whose rounds it joins after a restart: the relation is symmetric, so each
hears every member that counts it); every other kind (prekeys, statistics) to everyone,
as in the full mesh.
The machine is unchanged: at full mesh the book is the plain RoundBook and every
message a broadcast.
"""

from __future__ import annotations

from gossip.envelope import (
    KIND_FINAL,
    KIND_HELLO,
    KIND_SEALED,
    KIND_SEEN,
    KIND_SHARE,
    Accepted,
)
from gossip.protocol.book import RoundBook
from gossip.topology import Topology


class SparseBook(RoundBook):
    """A RoundBook over `topology`, as member `me` (module docstring). Subclassed per
    node by `sparse_book` so that `type(book)(neighbours, lookahead, current)` (how a
    checkpoint rebuilds the book) keeps the topology."""

    topology: Topology
    me: str

    # Each asks the round's peers only, never every neighbour: at 1,000 members a
    # member-round asked these hundreds of times (docs/results/scale.md). The answers are
    # the plain book's, cut to the peers (RoundBook's rules).
    def still_in(self, round_: int) -> list[str]:
        out = self.neighbours.intersection(self.topology.out_peers(self.me, round_))
        return sorted(m for m in out if self._latest.get(m, -1) <= round_)

    def waiting_for(self, round_: int) -> list[str]:
        have = self._shares.get(round_, {})
        ins = self.neighbours.intersection(self.topology.in_peers(self.me, round_))
        return sorted(m for m in ins if m not in have and self._latest.get(m, -1) <= round_)

    def missing(self, round_: int) -> list[str]:
        ins = self.neighbours.intersection(self.topology.in_peers(self.me, round_))
        return sorted(ins - set(self._shares.get(round_, {})))

    def shares(self, round_: int) -> dict[str, Accepted]:
        ins = set(self.topology.in_peers(self.me, round_))
        return {m: a for m, a in super().shares(round_).items() if m in ins}

    def peers(self, round_: int) -> frozenset[str]:
        """The in- and out-peers of round_ still sharing."""
        return frozenset(self.topology.in_peers(self.me, round_)).union(
            self.topology.out_peers(self.me, round_)) & self.neighbours

    def start_peers(self) -> frozenset[str]:
        return self.peers(self.current)

    def recipients(self, kind: str, round_: int) -> list[str] | None:
        """Whom a message of `kind` for `round_` goes to; None: everyone."""
        if kind in (KIND_SHARE, KIND_SEALED):
            return self.still_in(round_)
        if kind in (KIND_SEEN, KIND_FINAL, KIND_HELLO):
            return sorted(self.peers(round_))
        return None


def sparse_book(topology: Topology, me: str) -> type[RoundBook]:
    """The RoundBook class for member `me`: the plain one at full mesh."""
    if topology.spec.full:
        return RoundBook
    return type("SparseBook", (SparseBook,), {"topology": topology, "me": me})

"""A round over a sparse topology (gossip/sparse.py): the unchanged round machine, given
the topology's book, seals and sends our share to the round's out-peers, closes when its
in-peers' shares came, combines only theirs, and reports what it saw to its peers."""

from __future__ import annotations

import pytest

from gossip.envelope import (
    HELLO_ASK,
    KIND_FINAL,
    KIND_HELLO,
    KIND_PREKEY,
    KIND_SEALED,
    KIND_SEEN,
    KIND_SHARE,
)
from gossip.protocol import (
    Broadcast,
    Joined,
    RoundMachine,
    RoundParams,
    SendShare,
    SendTo,
    Sign,
    Train,
)
from gossip.sparse import SparseBook, sparse_book
from gossip.topology import build_topology
from tests.protocol_support import Driver, accepted, hello, key, names, share


def ring_driver(n: int = 8, topology: str = "ring") -> tuple[Driver, object]:
    topo = build_topology(topology, names(n), b"id")
    d = Driver(n, rounds=3)
    d.book = d.m.book = sparse_book(topo, "bank-0")(d.book.neighbours, d.book.lookahead)
    d.start()
    for i in range(1, n):
        d.recv(hello(f"bank-{i}", 0))
    return d, topo


def test_a_ring_round_seals_for_and_waits_for_the_two_beside_us_only():
    d, topo = ring_driver()
    # names(8) sorted: bank-0 .. bank-7; bank-0's ring neighbours are bank-1 and bank-7
    assert topo.out_peers("bank-0", 0) == ("bank-1", "bank-7")
    [send] = d.of(SendShare)
    assert send.seal_for == ("bank-1", "bank-7")
    d.at(1.0).recv(share("bank-3", 0))  # not a neighbour: held, never waited for or combined
    d.at(1.5).recv(share("bank-1", 0))
    assert not d.closes
    d.at(2.0).recv(share("bank-7", 0))
    [c] = d.closes  # closed by the two in-peers, long before the deadline, without bank-3
    assert (c.why, c.missing, sorted(c.shares)) == ("all", (), ["bank-1", "bank-7"])
    assert d.m.current == 1


def test_a_missing_in_peer_holds_the_round_until_the_deadline():
    d, _ = ring_driver()
    d.at(1.0).recv(share("bank-1", 0))
    for i in (2, 3, 4, 5, 6):  # everyone else, but not bank-7
        d.recv(share(f"bank-{i}", 0))
    assert not d.closes
    d.tick(11.0)
    [c] = d.closes
    assert (c.why, c.missing, sorted(c.shares)) == ("deadline", ("bank-7",), ["bank-1"])


def test_recipients_by_kind():
    d, topo = ring_driver(16, "random-out:3")
    book = d.m.book
    assert isinstance(book, SparseBook)
    for r in range(3):
        out, ins = topo.out_peers("bank-0", r), topo.in_peers("bank-0", r)
        assert book.recipients(KIND_SHARE, r) == book.recipients(KIND_SEALED, r) == list(out)
        assert book.recipients(KIND_SEEN, r) == sorted(set(out) | set(ins))
        assert book.recipients(KIND_FINAL, r) == sorted(set(out) | set(ins))
        # a hello goes to the round's in- and out-peers (whom the start barrier counts)
        assert book.recipients(KIND_HELLO, r) == sorted(set(out) | set(ins))
        assert book.recipients(KIND_PREKEY, r) is None  # prekeys, stats: everyone


def test_a_book_rebuilt_from_a_checkpoint_keeps_the_topology():
    """node/runtime/checkpoint.py rebuilds the book as type(book)(neighbours, lookahead,
    round): a restarted member still waits for its ring neighbours only."""
    d, _ = ring_driver()
    again = type(d.m.book)(d.m.book.neighbours, d.m.book.lookahead, 2)
    assert again.current == 2 and again.waiting_for(2) == ["bank-1", "bank-7"]


def test_full_mesh_keeps_the_plain_book():
    from gossip.protocol.book import RoundBook

    assert sparse_book(build_topology("full", names(4), b"id"), "bank-0") is RoundBook


# --- the start under a sparse topology: real machines, messages counted ---------------
class StartNet:
    """`n` RoundMachines over one topology, their messages carried as Node's driver does
    (node/runtime/sharing.py `broadcast`: the book's recipients, else everyone); every
    message delivered is counted."""

    def __init__(self, n: int, topology: str, current: dict[str, int] | None = None) -> None:
        members = names(n)
        self.topo = build_topology(topology, members, b"id")
        self.m: dict[str, RoundMachine] = {}
        for me in members:
            r = (current or {}).get(me, 0)
            book = sparse_book(self.topo, me)([x for x in members if x != me], 3, r)
            self.m[me] = RoundMachine(me, members, book, RoundParams(30, 10.0, 1, "majority"),
                                      keys={x: key(x) for x in members}, restarted=r > 0)
        self.queue: list[tuple[str, str, Sign]] = []
        self.delivered = 0
        self.actions: dict[str, list] = {me: [] for me in members}

    def act(self, me: str, actions: list) -> None:
        for a in actions:
            self.actions[me].append(a)
            if isinstance(a, Broadcast) and isinstance(a.message, Sign):
                route = getattr(self.m[me].book, "recipients", lambda *_: None)(
                    a.message.kind, a.message.round)
                to = route if route is not None else sorted(set(self.m) - {me})
                self.queue += [(me, peer, a.message) for peer in to]
            elif isinstance(a, SendTo) and isinstance(a.message, Sign):
                self.queue += [(me, peer, a.message) for peer in a.peers]

    def start(self, who) -> None:
        for me in who:
            self.act(me, self.m[me].start(0.0))

    def run(self) -> None:
        """Deliver until nothing is left, then tick every machine (as Node's loop does
        once it has filed what came), until that sends nothing new."""
        while self.queue:
            while self.queue:
                sender, to, msg = self.queue.pop(0)
                self.delivered += 1
                acc = accepted(sender, msg.kind, msg.round, msg.body, hello=msg.body == HELLO_ASK)
                self.act(to, self.m[to].receive(acc, 0.0))
            for me, m in self.m.items():
                if m.stage != "new":
                    self.act(me, m.tick(0.0))

    def trained(self, me: str) -> list[int]:
        return [a.round for a in self.actions[me] if isinstance(a, Train)]


@pytest.mark.parametrize("topology", ["random-out:3", "ring"])
def test_the_start_sends_n_times_peers_messages_not_n_squared(topology):
    """Each member's hello goes to its round-0 in- and out-peers and each of them answers
    once: 2 * sum(peers) messages, growing as n * S (at full mesh 2 * n * (n - 1)); and
    every member passes its barrier (a majority of its peers) and trains round 1."""
    for n in (30, 60):
        net = StartNet(n, topology)
        net.start(net.m)
        net.run()
        peers = {me: set(net.topo.in_peers(me, 0)) | set(net.topo.out_peers(me, 0)) for me in net.m}
        assert net.delivered == 2 * sum(len(p) for p in peers.values())
        assert net.delivered <= 2 * n * (2 * 3 if topology != "ring" else 2)  # n * S, not n**2
        assert all(net.trained(me) == [0] for me in net.m)


def test_full_mesh_start_is_still_everyone():
    net = StartNet(6, "full")
    net.start(net.m)
    net.run()
    assert net.delivered == 2 * 6 * 5
    assert all(net.trained(me) == [0] for me in net.m)


def test_a_restarted_member_of_a_sparse_consortium_joins_the_others_round():
    """bank-0 restarts from its checkpoint at round 2 while the others are at round 6: its
    hello reaches its round-2 peers, their answers say round 6, and it joins them there
    (gossip/protocol/liveness.py: the barrier counts its peers, a majority of them)."""
    n = 24
    net = StartNet(n, "random-out:3", {me: 6 for me in names(n)} | {"bank-0": 2})
    others = [me for me in net.m if me != "bank-0"]
    net.start(others)
    net.run()
    assert all(net.trained(me) == [6] for me in others)
    before = net.delivered
    net.start(["bank-0"])
    net.run()
    peers = set(net.topo.in_peers("bank-0", 2)) | set(net.topo.out_peers("bank-0", 2))
    assert net.delivered - before == 2 * len(peers)  # its hello and their answers only
    assert [a for a in net.actions["bank-0"] if isinstance(a, Joined)] == [Joined(2, 6)]
    assert net.trained("bank-0") == [6]


# --- end to end: eight members on a ring, in process -----------------------------------
import json  # noqa: E402

from rich.console import Console  # noqa: E402


@pytest.mark.slow
def test_a_ring_of_eight_reaches_consensus_within_002_of_full_mesh(tmp_path):
    """The real node over the memory hub: each member sends to and waits for its two ring
    neighbours only (about 2/7 of full mesh's bytes), the members' models draw together
    (consensus distance falls), and the consortium ends within 0.02 of full mesh."""
    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec

    def run(topology):
        return simulate(SimulationSpec(dataset="default", nodes=8, partition="dirichlet:0.5",
                                       rounds=8, seed=0, out=tmp_path / topology,
                                       model="logreg", privacy="off", topology=topology),
                        Console(quiet=True))

    ring, full = run("ring"), run("full")
    assert ring["rules"]["topology"] == "ring" and "topology" not in full["rules"]
    assert "consensus_distance" not in full  # full mesh: one model (the golden summary)
    # Every round trains apart on skewed rows and mixes with two neighbours: the distance
    # settles, a few percent of the model, instead of growing with it.
    rel = [ring["consensus_relative"][str(r)] for r in range(8)]
    assert all(0 < d < 0.1 for d in rel), rel
    assert all(ring["consensus_distance"][str(r)] > 0 for r in range(8))
    assert abs(ring["consortium"]["mean"] - full["consortium"]["mean"]) <= 0.02
    finals = ring["consortium"]["per_node"].values()
    assert max(finals) - min(finals) <= 0.01  # consensus, seen in the metric too
    sent = {t: sum(b["sent"] for b in s["bytes"].values()) for t, s in (("ring", ring),
                                                                        ("full", full))}
    assert sent["ring"] * 3 < sent["full"], sent
    assert ring["rejected"] == {}
    assert (tmp_path / "ring" / "consensus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "ring" / "summary.json").read_text())[
        "consensus_distance"] == ring["consensus_distance"]


def test_the_sparse_book_answers_as_the_plain_book_cut_to_the_peers():
    """SparseBook asks the round's peers only (its cost must not grow with the
    consortium); its answers stay the plain book's answers filtered to those peers."""
    import random

    from gossip.protocol.book import RoundBook

    members = names(40)
    topo = build_topology("random-out:4", members, b"id")
    rng = random.Random(7)
    sparse = sparse_book(topo, "bank-0")(members[1:], 3)
    plain = RoundBook(members[1:], 3)
    for _ in range(300):
        sender, r = rng.choice(members[1:]), rng.randrange(0, 8)
        if rng.random() < 0.5:
            for b in (sparse, plain):
                b.note(sender, r)
        elif r >= plain.current:
            for b in (sparse, plain):
                b.add(share(sender, r, body=b"%d" % r))
        if rng.random() < 0.05:
            sparse.advance(), plain.join(sparse.current)
        for q in range(plain.current, plain.current + 4):
            ins, out = set(topo.in_peers("bank-0", q)), set(topo.out_peers("bank-0", q))
            assert sparse.still_in(q) == [m for m in plain.still_in(q) if m in out]
            assert sparse.waiting_for(q) == [m for m in plain.waiting_for(q) if m in ins]
            assert sparse.missing(q) == [m for m in plain.missing(q) if m in ins]

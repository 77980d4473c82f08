"""A round over a sparse topology (gossip/sparse.py): the unchanged round machine, given
the topology's book, seals and sends our share to the round's out-peers, closes when its
in-peers' shares came, combines only theirs, and reports what it saw to its peers."""

from __future__ import annotations

from gossip.envelope import KIND_FINAL, KIND_HELLO, KIND_SEALED, KIND_SEEN, KIND_SHARE
from gossip.protocol import SendShare
from gossip.sparse import SparseBook, sparse_book
from gossip.topology import build_topology
from tests.protocol_support import Driver, hello, names, share


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
        assert book.recipients(KIND_HELLO, r) is None  # hellos, prekeys, stats: everyone


def test_a_book_rebuilt_from_a_checkpoint_keeps_the_topology():
    """node/runtime/checkpoint.py rebuilds the book as type(book)(neighbours, lookahead,
    round): a restarted member still waits for its ring neighbours only."""
    d, _ = ring_driver()
    again = type(d.m.book)(d.m.book.neighbours, d.m.book.lookahead, 2)
    assert again.current == 2 and again.waiting_for(2) == ["bank-1", "bank-7"]


def test_full_mesh_keeps_the_plain_book():
    from gossip.protocol.book import RoundBook

    assert sparse_book(build_topology("full", names(4), b"id"), "bank-0") is RoundBook


# --- end to end: eight members on a ring, in process -----------------------------------
import json  # noqa: E402

import pytest  # noqa: E402
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

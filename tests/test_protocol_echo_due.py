"""The echo phase and peers that have moved past the round (gossip/protocol/echo_due.py).

A peer's message of a later round can overtake its echo of ours on every transport
(MQTT orders per topic only, libp2p runs two streams per peer at once): such a peer
still owes its echo and is waited for, or one honest member decides without it and
admits a split equivocator the others leave out. A peer that moved past the round
without echoing us (it closed the round before we were up, or restarted and joined
ahead) owes nothing and costs no deadline."""

from __future__ import annotations

from gossip.envelope import KIND_ECHO, KIND_HELLO, KIND_SHARE, Accepted
from gossip.protocol import Ack, Checkpoint
from gossip.protocol.echo_due import EchoDue
from tests.protocol_support import Driver, hello, prekey, retire, share
from tests.test_protocol_echo import ECHO_DEADLINE, PHASES, SHARE_SEQ, Net, echo


def held(net: Net, to: str, sender: str, kind: str, r: int) -> bool:
    return any(t == to and a.sender == sender and a.envelope.kind == kind and a.round == r
               for t, a in net.queue)


def deliver_holding(net: Net, hold) -> list[tuple[str, Accepted]]:
    """Deliver everything queued (and what it sends) but the messages `hold(to, acc)`
    picks; those are returned, in the order they were sent."""
    kept = []
    while net.queue:
        to, acc = net.queue.pop(0)
        if hold(to, acc):
            kept.append((to, acc))
            continue
        net.d[to].recv(acc)
        net._pump(to)
    return kept


def release(net: Net, kept: list[tuple[str, Accepted]]) -> None:
    for to, acc in kept:
        net.d[to].recv(acc)
        net._pump(to)
    net.deliver()


def split_bank_5(net: Net) -> None:
    """bank-5 signs one share for bank-0 and another for bank-1..4; its echo backs the
    second, so only bank-0's echo shows the split to the others."""
    one, two = net.share("bank-5", 0, b"for bank-0"), net.share("bank-5", 0, b"for the rest")
    net.send("bank-5", "bank-0", one)
    net.send("bank-5", net.honest[1:], two)
    net.send("bank-5", net.honest, echo("bank-5", 0, net.truth(bank_5=two.envelope.digest)))


def test_a_next_round_share_that_overtakes_the_echo_does_not_end_the_wait_for_it():
    """bank-0's echo of round 1 to bank-3 is held back; bank-0 closes round 1 and its
    share of round 2 reaches bank-3 first. bank-3 waits for the echo (bank-0 was heard
    in round 1: its share), then excludes the split equivocator with everyone else. On
    the code before echo_due.py bank-3 decided at once without bank-0's echo and
    combined bank-5's share, alone."""
    net = Net(6, ("bank-5",), rounds=2).start()
    split_bank_5(net)
    kept = deliver_holding(net, lambda to, a: (to, a.sender, a.envelope.kind, a.round) == (
        "bank-3", "bank-0", KIND_ECHO, 0))
    d3 = net.d["bank-3"]
    assert len(net.d["bank-0"].closes) == 1 and not held(net, "bank-3", "bank-0", KIND_SHARE, 1)
    assert d3.m.book.held("bank-0", 1) is not None  # bank-0's share of round 2 came
    assert d3.m.book.still_in(0) == ["bank-5"]  # bank-0 has moved on
    waited = not d3.closes and d3.m._phase_waiting() == ["bank-0"]  # for its echo
    release(net, kept)
    assert {s for s, _ in net.agreed()} == set(net.honest)  # old code: bank-3 holds bank-5's
    assert waited
    for m in net.honest:
        c = net.close(m)
        assert c.echo.excluded["bank-5"].why == "conflict" and c.echo.unheard == ()
    assert net.t == 0.0  # no deadline passed


def test_a_hello_reply_of_the_next_round_that_overtakes_the_echo_does_not_end_the_wait():
    """The order the property found (its @example): bank-3's hello reaches bank-0 after
    bank-0 closed the run's only round, and bank-0's reply (round 2) reaches bank-3
    before bank-0's echo of round 1."""
    net = Net(6, ("bank-5",)).start()
    split_bank_5(net)
    kept = deliver_holding(net, lambda to, a: (to, a.sender, a.round) == ("bank-0", "bank-3", 0)
                           and a.envelope.kind == KIND_HELLO and a.hello
                           or (to, a.sender, a.envelope.kind) == ("bank-3", "bank-0", KIND_ECHO))
    assert net.d["bank-0"].closes and not net.d["bank-3"].closes
    hello_ask, bank0_echo = kept
    net.d["bank-0"].recv(hello_ask[1])
    net._pump("bank-0")
    [(to, reply)] = [(t, a) for t, a in net.queue if a.envelope.kind == KIND_HELLO]
    assert (to, reply.round) == ("bank-3", 1)
    net.queue.remove((to, reply))
    net.d["bank-3"].recv(reply)
    assert "bank-0" not in net.d["bank-3"].m.book.still_in(0) and not net.d["bank-3"].closes
    release(net, [bank0_echo])
    assert {s for s, _ in net.agreed()} == set(net.honest)
    assert net.close("bank-3").echo.unheard == ()


# --- moved on without echoing us: no deadline ----------------------------------------------
def echo_phase(n: int = 3, **kw) -> Driver:
    """bank-0 in round 1's echo phase, every share in (bank-1's and bank-2's seq 10)."""
    d = Driver(n, rounds=3, phases=PHASES, min_members=0, **kw)
    d.start()
    for m in d.book.neighbours:
        d.recv(share(m, 0, seq=10))
    assert d.m.stage == "phase" and not d.closes
    return d


def test_a_peer_heard_in_the_round_is_waited_for_after_it_moved_on_until_its_echo():
    d = echo_phase()
    d.recv(echo("bank-2", 0, {}, seq=11))
    d.recv(share("bank-1", 1, seq=12))  # overtook its echo of round 1
    assert not d.closes and d.m._phase_waiting() == ["bank-1"]
    assert d.m._wait.end == 10.0 + ECHO_DEADLINE
    d.recv(echo("bank-1", 0, {}, seq=11))
    [c] = d.closes
    assert c.echo.unheard == () and d.now == 0.0


def test_a_peer_that_restarted_after_sharing_and_joined_ahead_is_not_waited_for():
    """Its hello ask signed after its share of round 1 (higher seq): it restarted, and its
    message of round 3 says it joined ahead without echoing round 1: no deadline."""
    d = echo_phase()
    d.recv(echo("bank-2", 0, {}, seq=11))
    d.recv(hello("bank-1", 0, ask=True, seq=20))
    assert not d.closes  # restarted at round 1: may rejoin it and echo
    d.recv(share("bank-1", 2, seq=21))
    [c] = d.closes
    assert c.echo.unheard == ("bank-1",) and d.now == 0.0


def test_a_peer_that_restarted_after_closing_the_round_still_owes_its_echo():
    """Its hello ask names round 2 (its checkpoint): it closed round 1 before its crash,
    so its echo of round 1 was sent and may still be on its way."""
    d = echo_phase()
    d.recv(echo("bank-2", 0, {}, seq=11))
    d.recv(hello("bank-1", 1, ask=True, seq=20))
    d.recv(share("bank-1", 1, seq=21))
    assert not d.closes and d.m._phase_waiting() == ["bank-1"]
    d.recv(echo("bank-1", 0, {}, seq=12))
    [c] = d.closes
    assert c.echo.unheard == () and d.now == 0.0


def test_a_start_signed_before_the_share_is_not_a_restart():
    """A hello ask that was overtaken by the share it preceded (lower seq) changes
    nothing: the peer still owes its echo."""
    d = echo_phase()
    d.recv(echo("bank-2", 0, {}, seq=11))
    d.recv(hello("bank-1", 0, ask=True, seq=3))
    d.recv(share("bank-1", 1, seq=12))
    assert not d.closes


def test_a_peer_never_heard_in_the_round_is_not_waited_for_once_past_it():
    """A member that closed round 1 before we were up (its share and echo went nowhere)
    and is in round 2: our share phase closes "moved_on", our echo phase at once (as
    test_crash_safety's late member: it waited 10 s here when every moved-on peer's echo
    was waited for)."""
    d = Driver(3, rounds=3, phases=PHASES, min_members=0)
    d.start()
    d.recv(share("bank-1", 0, seq=10))
    d.recv(share("bank-2", 1, seq=10))
    assert d.m.stage == "phase"
    d.recv(echo("bank-1", 0, {}, seq=11))
    [c] = d.closes
    assert c.why == "moved_on" and c.echo.unheard == ("bank-2",) and d.now == 0.0


def test_a_peer_that_retired_is_not_waited_for_though_it_shared_the_round():
    """Its retirement takes it out of our neighbours (its echo would be refused as
    not_phase_peer): waiting for it would cost the whole echo deadline."""
    d = echo_phase()
    d.recv(echo("bank-2", 0, {}, seq=11))
    d.recv(retire("bank-1", 1))
    [c] = d.closes
    assert c.echo.unheard == ("bank-1",) and d.now == 0.0


def test_a_prekey_announcement_of_the_round_shows_the_peer_was_in_it():
    """Sealing: a peer announces prekeys on entering a round; its echo is then owed."""
    due = EchoDue()
    due.heard(prekey("bank-1", 1), "prekey", 1, 3)
    assert due.owes("bank-1", 1) and not due.owes("bank-1", 2)
    due.heard(prekey("bank-2", 1, ask=True), "prekey", 1, 3)  # a prekey hello: a start
    assert not due.owes("bank-2", 1)


def test_echo_due_keeps_only_the_books_window_and_forgets_closed_rounds():
    """Bounded: a member claiming rounds far ahead adds nothing; closed rounds go."""
    due = EchoDue()
    for r in range(0, 1000):
        due.heard(share("bank-1", r, seq=r + 1), "ahead" if r > 3 else "buffered", 0, 3)
    due.heard(share("bank-1", 9, seq=5000), "buffered", 0, 3)  # outside the window
    assert sorted(due._in) == [0, 1, 2, 3]
    due.forget_before(2)
    assert sorted(due._in) == [2, 3] and not due.owes("bank-1", 1) and due.owes("bank-1", 2)
    for seq in (7, 6, 7):  # an older start delivered late changes nothing
        due.heard(hello("bank-1", 2, ask=True, seq=seq), "hello", 2, 3)
    assert due._started == {"bank-1": (7, 2)} and not due.owes("bank-1", 2)


def test_an_echo_is_acked_only_once_its_round_is_checkpointed():
    """After our own crash the broker (MQTT) redelivers what we had not acked. A peer's
    echo of the round we restart in was acked on arrival, so it never came again: a peer
    whose share of that round was redelivered (it owes its echo) was waited for until the
    echo deadline (tests/test_network_mqtt.py's killed node fell behind the others by
    that wait and skipped five rounds). Now a first echo inside the book's window stays
    unacked, like a buffered share, until its round is checkpointed; a second one from the
    same member is acked at once (it must not grow the table; far-ahead ones as shares)."""
    d = Driver(3, rounds=2, phases=PHASES, share_of=lambda r: Net.share("bank-0", r))
    d.start()
    d.at(1).recv(Net.share("bank-1", 0), token="s1")
    d.recv(echo("bank-1", 0, {"bank-1": b"x" * 32}, seq=SHARE_SEQ + 50), token="e1")
    acked = [t for a in d.actions if isinstance(a, Ack) for t in a.tokens]
    assert "e1" not in acked and "s1" not in acked, d.actions
    d.recv(echo("bank-1", 0, {"bank-1": b"y" * 32}, seq=SHARE_SEQ + 52), token="e1b")
    assert "e1b" in [t for a in d.actions if isinstance(a, Ack) for t in a.tokens]
    d.recv(Net.share("bank-2", 0), token="s2")
    d.recv(echo("bank-2", 0, {"bank-2": b"x" * 32}, seq=SHARE_SEQ + 53), token="e2")
    d.tick(1 + ECHO_DEADLINE + 1)
    kinds = [type(a) for a in d.actions]
    acks = [i for i, a in enumerate(d.actions) if isinstance(a, Ack) and "e1" in a.tokens]
    assert acks and kinds.index(Checkpoint) < acks[0], d.actions

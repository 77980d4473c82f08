"""The round machine (gossip/protocol/machine.py) with a fake clock: no transport, disk or
torch. Each test says which lines of node/runtime/node.py (at 7782560) make the same decision
today, and that the machine makes it the same way for the same inputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.envelope import HELLO_REPLY, KIND_HELLO, KIND_SEEN
from gossip.errors import LocalError
from gossip.protocol import (
    Ack,
    Advanced,
    Broadcast,
    Checkpoint,
    Close,
    Equivocation,
    Finals,
    FinalSeenMissing,
    ForgetPrekeys,
    Joined,
    PhaseMessage,
    PhaseSpec,
    Presence,
    Refused,
    Rejected,
    Retire,
    RotatePrekeys,
    RoundParams,
    SeenMismatch,
    SendFinal,
    SendPhase,
    SendShare,
    SendTo,
    Sign,
    Stored,
    Train,
    Waiting,
    WaitOver,
)
from tests.protocol_support import (
    Driver,
    final,
    hello,
    prekey,
    retire,
    seen,
    share,
)


def started(n: int = 3, **kw) -> Driver:
    """A machine past its start barrier (every other member said hello), in round 0's
    collection (our share sent)."""
    d = Driver(n, **kw)
    d.start()
    for i in range(1, n):
        d.recv(hello(f"bank-{i}", d.m.current))
    return d


# --- the closing rule: all, moved on, absent, deadline -----------------------------------
def test_a_round_closes_when_every_share_came():
    """runner.py 1627-1631 (`_collect`: book.complete) and 1150-1152 (closed = "all" when
    nothing is missing): the close comes with the last share, not at the deadline."""
    d = started()
    assert d.of(Train) == [Train(0)] and d.of(SendShare)[0].round == 0
    d.at(1.0).recv(share("bank-1", 0))
    assert not d.closes and d.m.next_deadline == 10.0  # deadline counted from our release
    d.at(2.0).recv(share("bank-2", 0))
    [c] = d.closes
    assert (c.round, c.why, c.missing, sorted(c.shares)) == (0, "all", (), ["bank-1", "bank-2"])
    # then: seen report, advance, checkpoint, the next round's training (runner 1128-1179)
    after = d.actions[d.actions.index(c):]
    kinds = [type(a) for a in after]
    assert kinds.index(Broadcast) < kinds.index(Advanced) < kinds.index(Checkpoint) \
        < kinds.index(Train)
    assert d.of(Broadcast, after)[0].message.kind == KIND_SEEN
    assert d.of(Advanced, after) == [Advanced(0, 1)] and d.m.current == 1


def test_a_round_closes_without_members_that_moved_on():
    """runner.py 1151 ("moved_on": the book is complete because the missing member's share
    for a later round came, gossip/protocol/book.py `waiting_for`)."""
    d = started()
    d.at(1.0).recv(share("bank-2", 1))  # bank-2 has left round 0
    assert not d.closes
    d.at(2.0).recv(share("bank-1", 0))
    [c] = d.closes
    assert (c.why, c.missing) == ("moved_on", ("bank-2",))


def test_a_round_closes_at_the_deadline_then_the_silent_member_is_absent():
    """runner.py 1614-1625 (`_note_absent` after the deadline: absent_after = 1 marks it),
    1603-1612 (`_ignorable`: 2 of 3 heard is a majority) and 1150-1152 ("deadline", then
    "absent" for the next round, which closes without waiting)."""
    d = started()
    d.at(1.0).recv(share("bank-1", 0))
    assert not d.closes and d.m.next_deadline == 10.0
    d.tick(9.99)
    assert not d.closes
    d.tick(10.0)
    [c] = d.closes
    assert (c.why, c.missing) == ("deadline", ("bank-2",))
    assert Presence("bank-2", "absent", 1) in d.actions
    d.at(11.0).recv(share("bank-1", 1))  # round 1: not waited for
    assert [(c.round, c.why) for c in d.closes] == [(0, "deadline"), (1, "absent")]


def test_absent_members_are_not_ignored_when_we_may_be_the_one_cut_off():
    """runner.py 1603-1612: with 2 of 4 members silent, we (and the one heard) are no
    majority: every deadline is waited out instead of racing ahead."""
    d = started(4)
    for r, t in ((0, 10.0), (1, 20.0), (2, 30.0)):  # each deadline from our release
        d.at(t - 9).recv(share("bank-1", r))
        d.tick(t - 0.5)
        assert len(d.closes) == r
        d.tick(t)
        assert d.closes[-1].why == "deadline"
    assert d.m.live.absent == {"bank-2", "bank-3"} and d.m.ignorable() == set()


def test_absence_is_marked_and_lifted_by_a_share_and_once_by_talk():
    """runner.py 751-769 (`_heard`: a share re-arms the wait; talk without one only once
    per absence, for one deadline: issue 19 item 4) and 1614-1625 (`_note_absent`)."""
    d = started(absent_after=1)
    d.at(1).recv(share("bank-1", 0))
    d.tick(10.0)  # bank-2 missed round 0's deadline: absent
    assert "bank-2" in d.m.live.absent
    d.at(11).recv(hello("bank-2", 1))  # talk: waited for one more deadline
    assert Presence("bank-2", "heard") in d.actions and "bank-2" not in d.m.live.absent
    d.at(12).recv(share("bank-1", 1))
    assert len(d.closes) == 1  # round 1 waits for bank-2 again
    d.tick(20.0)  # ... one deadline; then absent again
    # "absent", not "deadline": runner.py 1117 + 1152 classify by who was ignorable when the
    # collection began (`ignorable_before`), and bank-2 was then; the deadline was
    # waited out all the same (as runner.py does)
    assert d.closes[-1].why == "absent" and d.now == 20.0 and "bank-2" in d.m.live.absent
    d.at(21).recv(hello("bank-2", 2))  # talk again: no longer re-arms the wait
    d.at(22).recv(share("bank-1", 2))
    assert d.closes[-1].why == "absent" and len(d.closes) == 3
    assert d.m.current == 3
    d2 = started(absent_after=1, rounds=5)
    d2.at(1).recv(share("bank-1", 0))
    d2.tick(10.0)
    d2.at(11).recv(share("bank-2", 1))  # a share: waited for again at once
    assert Presence("bank-2", "back") in d2.actions and not d2.m.live.absent


def test_absent_after_counts_deadlines_in_a_row():
    """runner.py 1614-1625 with gossip.absent_after = 2: two missed deadlines."""
    d = started(absent_after=2, rounds=4)
    for r in (0, 1):
        d.at(d.now + 1).recv(share("bank-1", r))
        d.tick(d.m.next_deadline)
    assert [c.why for c in d.closes] == ["deadline", "deadline"]
    assert Presence("bank-2", "absent", 2) in d.actions
    d.at(d.now + 1).recv(share("bank-1", 2))
    assert d.closes[-1].why == "absent"


# --- the start barrier and the quorum join after a restart --------------------------------
def test_restart_joins_the_round_a_majority_has_reached():
    """runner.py 1470-1513 (`_await_start`: after a restart wait for a majority of the
    members still sharing, then book.quorum_round(), `join`, checkpoint): a node restarted
    at round 2 with four others at rounds 6, 6, 5 and unknown joins at round 6? No: the
    newest round a MAJORITY has reached, 5 (one lying member cannot drag it forward)."""
    d = Driver(5, current=2, restarted=True, rounds=10)
    d.start()
    d.at(1).recv(hello("bank-1", 6))
    d.at(2).recv(hello("bank-2", 6))
    assert not d.of(Train)  # 2 of 4 up: not yet a majority of the members still sharing
    d.at(3).recv(hello("bank-3", 5))
    assert d.of(Joined) == [Joined(2, 5)] and d.m.current == 5
    kinds = [type(a) for a in d.actions]
    assert kinds.index(Joined) < kinds.index(Checkpoint) < kinds.index(Train)
    assert d.of(Train) == [Train(5)]


def test_restart_joins_with_everything_that_arrived_together():
    """runner.py `_await_start` looked at the barrier when it woke, after the receiver had
    filed every message that had come: the machine decides it on the driver's tick, never
    inside a message. bank-1's seen report for round 4 (it closed 4, it is at 5) comes just
    before bank-2's hello and its own: deciding inside bank-2's hello joined round 4 and
    trained (and charged) a round nobody was in (test_crash_safety's restart test, half
    of its runs on 0152a2d)."""
    d = Driver(3, current=1, restarted=True, rounds=10)
    d.start()
    for acc in (seen("bank-1", 4, []), hello("bank-2", 5), hello("bank-1", 5)):
        d.run(d.m.receive(acc, 1.0))  # filed together, no tick in between
    assert not d.of(Joined) and d.m.next_deadline == 1.0  # decided at the next tick
    d.tick(1.0)
    assert d.of(Joined) == [Joined(1, 5)] and d.of(Train) == [Train(5)]


def test_restart_without_a_majority_starts_at_the_barrier_deadline():
    """runner.py 1491-1496: a majority, or one round deadline."""
    d = Driver(5, current=2, restarted=True, rounds=10, min_members=0)
    d.start()
    d.at(1).recv(hello("bank-1", 4))
    assert d.m.next_deadline == 10.0
    d.tick(9.9)
    assert not d.of(Train)
    d.tick(10.0)
    assert d.of(Train) == [Train(2)] and not d.of(Joined)  # quorum_round is -1


def test_restart_majority_is_recounted_when_members_retire():
    """runner.py 1488-1493 (f8bc771): a retire message shrinks the majority; with every
    other member retired nobody is waited for."""
    d = Driver(5, current=1, restarted=True, rounds=10, min_members=0)
    d.start()
    d.at(1).recv(hello("bank-1", 1))
    d.at(2).recv(retire("bank-3", 1))
    d.at(3).recv(retire("bank-4", 1))
    # bank-3 and bank-4 retired: 2 still share, bank-1 and bank-2; majority 2; up: bank-1,
    # and the retirees (their retire is a message), not counted as neighbours
    assert not d.of(Train)
    d.at(4).recv(retire("bank-2", 1))  # left: bank-1 alone, up -> starts now
    assert d.of(Train) == [Train(1)]
    alone = Driver(2, current=1, restarted=True, min_members=0)
    alone.start()
    alone.at(1).recv(retire("bank-1", 1))
    assert alone.of(Train)[0] == Train(1)  # nobody left to wait for: no deadline waited out
    assert alone.closes[0].round == 1 and alone.now == 1  # nor for its shares


def test_min_members_waits_without_a_time_limit_and_reports_the_wait():
    """runner.py 1479-1506 (min_members: no time limit; reported at WAIT_REPORT_FIRST_S,
    then every WAIT_REPORT_EVERY_S)."""
    d = Driver(4, min_members=3)
    d.start()
    d.at(1).recv(hello("bank-1", 0))
    assert d.m.next_deadline == 10.0  # the first report
    d.tick(10.0)
    [w] = d.of(Waiting)
    assert w.who == ("bank-2", "bank-3") and w.gives_up is None and "2 up" in w.what
    assert d.m.next_deadline == 40.0
    d.tick(1000.0)
    assert not d.of(Train) and len(d.of(Waiting)) == 2
    d.at(1001).recv(hello("bank-3", 0))
    assert d.of(WaitOver) and d.of(Train) == [Train(0)]


def test_min_members_above_the_consortium_is_refused():
    """runner.py 300-302: it could never start."""
    with pytest.raises(LocalError, match="could never start"):
        Driver(3, min_members=4)


def test_rejection_with_an_authentic_reason_counts_as_up_others_do_not():
    """runner.py 116-118 (AUTHENTIC_REASONS) and 708-716 (`handle`: note the signed round,
    `_heard` only for those reasons)."""
    d = Driver(3, min_members=3)
    d.start()
    d.run(d.m.rejected(Rejected("bad_sig", "forged", "bank-1", hint="bank-1", token="t1"), 1.0))
    assert "bank-1" not in d.m.live.up and Ack(("t1",)) in d.actions
    d.run(d.m.rejected(Rejected("no_prekey", "not sealed for us", "bank-1", signed_round=4),
                       2.0))
    assert "bank-1" in d.m.live.up and d.m.book.quorum_round() == -1
    assert d.m.book._latest["bank-1"] == 4
    [r1, r2] = d.of(Refused)
    assert (r1.member, r1.reason, r2.reason) == ("bank-1", "bad_sig", "no_prekey")


# --- seen reports: a split equivocation --------------------------------------------------
def test_split_equivocation_is_found_from_a_seen_report():
    """runner.py 882-905 (`_close_seen`), 946-958 (`_on_seen`), 960-990 (`_compare_seen`):
    bank-1 signed one share for us and another for bank-2; bank-2's seen report (early,
    before we closed round 0, and one after) names the digest it got: a finding that
    accuses bank-1, reported by bank-2; a report that agrees is no finding."""
    d = started(4)
    ours = share("bank-1", 0, b"for-bank-0")
    theirs = share("bank-1", 0, b"for-bank-2")
    assert ours.envelope.digest != theirs.envelope.digest
    # bank-2 closed round 0 first: its report waits until we close ours
    early = seen("bank-2", 0, [("bank-1", theirs.envelope.digest)])
    d.at(1).recv(early, data=b"raw-report")
    assert not d.of(SeenMismatch)
    for acc in (ours, share("bank-2", 0), share("bank-3", 0)):
        d.recv(acc)
    [c] = d.closes
    [f] = d.of(SeenMismatch)
    assert (f.round, f.reporter, f.accused, f.reported) == (0, "bank-2", "bank-1",
                                                            theirs.envelope.digest)
    assert f.ours[1] == ours.envelope.digest and f.data == b"raw-report"
    late = seen("bank-3", 0, [("bank-1", ours.envelope.digest)])  # agrees: no finding
    d.recv(late)
    again = seen("bank-2", 0, [("bank-1", theirs.envelope.digest)], seq=2)  # one per member
    d.recv(again)
    assert len(d.of(SeenMismatch)) == 1


def test_a_seen_report_accusing_us_is_a_finding_too():
    """runner.py 972-975: a member reporting a share from us that we never sent."""
    d = started(3)
    d.at(1).recv(share("bank-1", 0))
    d.recv(share("bank-2", 0))
    own = [s for s in d.of(SendShare)][0]
    assert own.round == 0
    d.recv(seen("bank-2", 0, [("bank-0", b"x" * 32)]))
    [f] = d.of(SeenMismatch)
    assert f.accused == "bank-0" and f.reporter == "bank-2"


def test_the_book_refuses_a_second_share_as_equivocation_with_both_envelopes():
    """runner.py 704-716 (`handle`: the book's RemoteError is acked, audited, its sender
    heard; equivocation keeps both envelopes, `_keep_evidence` 853)."""
    d = started()
    first = share("bank-1", 0, b"one")
    d.at(1).recv(first, token="a")
    d.recv(share("bank-1", 0, b"two", seq=1), token="b")
    [e] = d.of(Equivocation)
    assert e.first == first and e.second.envelope.body == b"two"
    assert Ack(("b",)) in d.actions and d.of(Refused)[0].reason == "equivocation"


# --- acks -----------------------------------------------------------------------------------
def test_buffered_shares_are_acked_after_their_round_is_checkpointed():
    """runner.py 717-726 and 1178-1179 (`_ack_before` after `_save_checkpoint`)."""
    d = started()
    d.at(1).recv(share("bank-1", 0), token="s1")
    d.recv(share("bank-1", 9), token="far")  # far ahead: acked at once
    assert Ack(("far",)) in d.actions and Ack(("s1",)) not in d.actions
    d.recv(share("bank-2", 0), token="s2")
    kinds = [type(a) for a in d.actions]
    i_ack = d.actions.index(Ack(("s1", "s2")))
    assert kinds.index(Checkpoint) < i_ack


# --- sealing: prekey waits ---------------------------------------------------------------------
def test_sealing_waits_for_prekeys_then_seals_without_the_silent_ones():
    """runner.py 1394-1410 (`_await_prekeys`: members still in the round without a prekey
    are waited for until the deadline, then `_silent`), 580-581 (a prekey message lifts
    it) and the deadline restarts at 1290 and 1376."""
    have: set[str] = set()
    d = Driver(3, prekeys_missing=lambda r, peers: [p for p in peers if p not in have])
    d.start()
    assert d.of(RotatePrekeys) == [RotatePrekeys(0, hello=True)]
    have.add("bank-1")
    d.at(1).recv(prekey("bank-1", 0))
    d.at(2).recv(hello("bank-2", 0))
    assert d.of(Train) == [Train(0)] and not d.of(SendShare)  # waiting for bank-2's prekey
    assert d.m.next_deadline == 11.0  # restarted when the body was ready (1290), at 1
    d.tick(11.0)
    [s] = d.of(SendShare)
    assert s.seal_for == ("bank-1", "bank-2") and d.m.live.silent == {"bank-2"}
    assert d.m.deadline == 21.0  # restarted when the sealed share was signed (1376)
    d.at(13).recv(share("bank-1", 0))
    d.recv(share("bank-2", 0))
    assert len(d.of(SendShare)) == 2  # round 1: bank-2 silent, not waited for
    d.at(14).recv(prekey("bank-2", 1))
    assert "bank-2" not in d.m.live.silent


def test_hellos_are_answered_at_most_every_interval():
    """runner.py 1437-1466 (`_answer_hello`: once per member and kind every
    HELLO_INTERVAL_S; a prekey hello gets our announcement)."""
    d = Driver(3, prekeys_missing=lambda r, peers: [])
    d.start()
    d.at(1).recv(hello("bank-1", 0, ask=True))
    d.at(2).recv(hello("bank-1", 0, ask=True, seq=1))
    d.at(2.5).recv(prekey("bank-1", 0, ask=True))
    d.at(3).recv(hello("bank-1", 0, ask=True, seq=2))
    replies = [a for a in d.of(SendTo) if a.peers == ("bank-1",)]
    assert [a.message for a in replies] == [Sign(KIND_HELLO, 0, HELLO_REPLY),
                                            Stored("announcement"),
                                            Sign(KIND_HELLO, 0, HELLO_REPLY)]


# --- a two-phase round (issue 22's exchanges; the echo: tests/test_protocol_echo.py) -----
def test_a_two_phase_round_closes_after_the_second_exchange():
    """No runner.py counterpart (today's round is one phase): after the shares, a later
    phase sends to its peers with its own deadline and the round closes when every peer's
    echo came, or at that deadline; Close carries what the phase collected."""
    d = started(3, phases=(PhaseSpec("share"), PhaseSpec("masks", deadline_s=4.0)))
    d.at(1).recv(share("bank-1", 0))
    d.run(d.m.phase_message(PhaseMessage("bank-2", 0, "masks", b"early"), 1.5))  # kept
    d.at(2).recv(share("bank-2", 0))
    assert d.of(SendPhase) == [SendPhase(0, "masks", ("bank-1", "bank-2"))] and not d.closes
    assert d.m.next_deadline == 6.0
    d.run(d.m.phase_message(PhaseMessage("bank-2", 0, "masks", b"other"), 3.0))
    assert d.of(Refused)[-1].reason == "equivocation"
    d.run(d.m.phase_message(PhaseMessage("bank-9", 0, "masks", b"x"), 3.0))  # not a peer
    d.run(d.m.phase_message(PhaseMessage("bank-1", 0, "masks", b"e1"), 3.5))
    [c] = d.closes
    assert c.why == "all" and c.phases == {"masks": {"bank-1": b"e1", "bank-2": b"early"}}
    d.at(4).recv(share("bank-1", 1))
    d.recv(share("bank-2", 1))
    d.run(d.m.phase_message(PhaseMessage("bank-1", 1, "masks", b"e1"), 4.0))
    d.tick(7.9)
    assert len(d.closes) == 1
    d.tick(8.0)  # the echo phase's deadline: closes with what came
    assert d.closes[-1].phases == {"masks": {"bank-1": b"e1"}}


# --- the end of a run -------------------------------------------------------------------------
def test_after_the_last_round_seen_reports_then_final_digests_are_awaited():
    """runner.py 825-832, 907-916 (`_await_final_seen`: at most FINAL_SEEN_WAIT_S) and
    918-944 (`_compare_final_models`), then 831-832 (forget prekeys, ack all)."""
    d = started(3, rounds=1)
    d.at(1).recv(share("bank-1", 0))
    d.recv(share("bank-2", 0))
    assert not d.of(SendFinal) and d.m.next_deadline == 6.0
    d.recv(seen("bank-1", 0, []))
    d.recv(final("bank-1", 0, b"d1"))
    d.tick(6.0)  # bank-2's report never came
    assert d.of(FinalSeenMissing) == [FinalSeenMissing(0, ("bank-2",))]
    assert d.of(SendFinal) == [SendFinal(0)] and not d.m.done
    d.at(7).recv(final("bank-2", 0, b"d2"))
    [f] = d.of(Finals)
    assert f.finals == {"bank-1": b"d1", "bank-2": b"d2"} and d.m.done


def test_after_a_secure_last_round_the_finals_of_who_took_part_are_awaited_at_once():
    """A secure round uses no share (its driver says who took part, seen.py): no seen report
    is sent or waited for, our final goes out at the close, and the members that took part
    are the ones whose final digests we wait for (until the final wait's end) and compare."""
    d = started(4, rounds=1)
    d.took_part[0] = {"bank-0", "bank-1", "bank-2"}  # bank-3 dealt nothing: not expected
    d.at(1).recv(share("bank-1", 0))
    d.recv(share("bank-2", 0))
    d.recv(share("bank-3", 0))
    assert d.closes and d.of(SendFinal) == [SendFinal(0)] and not d.m.done
    assert not [a for a in d.actions if isinstance(getattr(a, "message", None), Sign)
                and a.message.kind == KIND_SEEN]
    d.at(2).recv(final("bank-1", 0, b"d1"))
    assert not d.of(Finals) and d.m.next_deadline == 6.0  # bank-2's final is awaited
    d.recv(final("bank-2", 0, b"d2"))
    [f] = d.of(Finals)
    assert f.expected == ("bank-1", "bank-2") and d.m.done and not d.of(FinalSeenMissing)
    assert f.finals == {"bank-1": b"d1", "bank-2": b"d2"}
    late = started(3, rounds=1)  # a member that took part and never sends its final
    late.took_part[0] = {"bank-1", "bank-2"}
    late.at(1).recv(share("bank-1", 0))
    late.recv(share("bank-2", 0))
    late.recv(final("bank-1", 0, b"d1"))
    late.tick(5.9)
    assert not late.of(Finals)
    late.tick(6.0)
    [f] = late.of(Finals)
    assert f.expected == ("bank-1", "bank-2") and f.finals == {"bank-1": b"d1"} and late.m.done


def test_a_spent_budget_retires_and_ends_the_run():
    """runner.py 1106-1108 (`_round`: no release -> `_retire` 1539) and 831-832."""
    d = Driver(3, outcome="stopped", prekeys_missing=lambda r, p: [])
    d.start()
    d.at(1).recv(share("bank-1", 0), token="t")
    d.recv(hello("bank-2", 0))
    kinds = [type(a) for a in d.actions]
    assert kinds.index(Retire) < kinds.index(ForgetPrekeys) and d.m.done
    assert d.of(ForgetPrekeys) and Ack(("t",)) in d.actions and not d.closes


def test_a_stored_release_is_resent_and_restarts_the_deadline():
    """runner.py 1188-1203: the stored release is re-sent as it is, deadline restarted."""
    d = started(outcome="stored")
    [s] = d.of(SendShare)
    assert s.stored and d.m.next_deadline == 10.0


def test_nothing_finite_trained_still_collects_the_others_shares():
    """runner.py 1258-1273: non-finite local training releases nothing, restarts the
    deadline and the round goes on with the others' shares."""
    d = started(outcome="non_finite")
    assert not d.of(SendShare) and d.m.stage == "collect" and d.m.next_deadline == 10.0
    d.at(1).recv(share("bank-1", 0))
    d.recv(share("bank-2", 0))
    assert d.closes[0].why == "all"


def test_a_long_collection_is_reported_with_who_is_awaited():
    """runner.py 1627-1631 and 1634-1664 (`_wait_until`: reported after WAIT_REPORT_FIRST_S,
    who is still awaited, when it gives up; cleared when the wait ends)."""
    d = started(deadline=60.0)
    d.at(1).recv(share("bank-1", 0))
    assert d.m.next_deadline == 10.0  # the first report comes before the deadline
    d.tick(10.0)
    [w] = d.of(Waiting)
    assert (w.what, w.who, w.since, w.gives_up) == ("round 1 shares", ("bank-2",), 0.0, 60.0)
    assert d.m.next_deadline == 40.0
    d.at(41).recv(share("bank-2", 0))
    assert d.of(WaitOver) and d.closes


def test_a_topology_sends_to_the_neighbours_by_name():
    """No runner.py counterpart (today: a full mesh, every message a broadcast): with
    `neighbours`, the machine sends to those, waits for their shares only, and seals for
    those still in the round."""
    d = Driver(5, neighbours=["bank-1", "bank-2"], min_members=0)
    d.m.book.neighbours = frozenset({"bank-1", "bank-2"})
    d.start()
    [hello_] = [a for a in d.actions if isinstance(a, SendTo)]
    assert hello_.peers == ("bank-1", "bank-2") and not d.of(Broadcast)
    [s] = d.of(SendShare)
    assert s.to == ("bank-1", "bank-2") and s.seal_for == ("bank-1", "bank-2")
    d.at(1).recv(share("bank-1", 0))
    d.recv(share("bank-2", 0))
    assert d.closes[0].why == "all"


def test_the_timing_given_before_start_is_the_one_the_run_uses():
    """Node reads its settings when its run starts (runner.py read self.cfg there): a
    deadline or round count changed after the machine was built is the one that holds;
    after start it can no longer change."""
    d = Driver(3, rounds=5, deadline=60.0)
    d.m.configure(RoundParams(2, 5.0, absent_after=2))
    assert d.m.live.absent_after == 2
    d.start()
    for i in (1, 2):
        d.recv(hello(f"bank-{i}", 0))
    assert d.m.next_deadline == 5.0  # round 1's collection ends 5 s after our share
    with pytest.raises(LocalError, match="after start"):
        d.m.configure(RoundParams(2, 60.0))
    with pytest.raises(LocalError, match="absent_after = 0"):
        RoundParams(2, 5.0, absent_after=0)


def test_out_of_order_driver_calls_are_refused():
    d = Driver(3)
    with pytest.raises(LocalError, match="out of order"):
        d.m.closed(0, {}, 0.0)


# --- properties -----------------------------------------------------------------------------
EVENT = st.tuples(st.sampled_from(["share", "share", "hello", "tick", "seen"]),
                  st.integers(1, 3), st.integers(0, 4), st.floats(0, 8))


@settings(max_examples=150, deadline=None)
@given(st.lists(EVENT, max_size=40), st.integers(1, 2), st.sampled_from([0, 1, "majority"]))
def test_whatever_arrives_each_round_closes_exactly_once_and_deadlines_never_go_back(
        events, absent_after, min_members):
    """Any order of shares (any round from ours on), hellos, seen reports and ticks: the
    rounds close in order, each once, for a reason the closing rule names, and the round
    deadline never moves back. min_members has no time limit (runner.py 1495), so once the
    events are spent a member says hello if the barrier still waits."""
    d = Driver(4, rounds=4, absent_after=absent_after, min_members=min_members)
    d.start()
    deadlines = [d.m.deadline]
    t = 0.0
    for what, who, r, dt in events:
        t += dt
        d.at(t)
        member = f"bank-{who}"
        if what == "share":
            try:
                d.recv(share(member, max(r, d.m.current)))
            except Exception as exc:  # the verifier refuses older rounds; none left
                raise AssertionError(exc) from None
        elif what == "hello":
            d.recv(hello(member, r))
        elif what == "seen":
            d.recv(seen(member, r, [("bank-0", b"z" * 32)]))
        else:
            d.tick()
        deadlines.append(d.m.deadline)
        nd = d.m.next_deadline
        assert nd is None or d.m.done or nd > t or d.m.stage in ("train", "sign", "closing")
    if d.m.stage == "barrier":
        for i in (1, 2, 3):
            d.recv(hello(f"bank-{i}", 0))
    for _ in range(1000):  # time alone ends the run
        if d.m.done:
            break
        nd = d.m.next_deadline
        assert nd is not None
        d.tick(max(nd, t))
        t = d.now
        deadlines.append(d.m.deadline)
    rounds = [c.round for c in d.closes]
    assert rounds == sorted(set(rounds)) and d.m.current >= 4
    # every round left was closed, then left for the next close's round (a majority ahead:
    # skipped, runner.py 1159-1162), or joined at the start
    for c, nxt in zip(d.closes, d.of(Advanced), strict=True):
        assert nxt.round == c.round and nxt.next > c.round
    assert [a.next for a in d.of(Advanced)][:-1] == rounds[1:]
    assert all(c.why in Close.WHY for c in d.closes)
    assert deadlines == sorted(deadlines)

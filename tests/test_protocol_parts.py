"""The round machine's parts (gossip/protocol: liveness, seen, hello, stats) and the
normalization waits before round 1, with a fake clock; and that gossip.protocol stays a
leaf (no node, no torch). Each test names the node/runtime/node.py lines (at 7782560) whose
decision it pins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gossip.protocol import (
    Abort,
    AdoptRange,
    Combine,
    HelloLimiter,
    Liveness,
    Normalization,
    Refused,
    SeenReports,
    SendStats,
    SendTo,
    SendVote,
    StartBarrier,
    StatsAgreement,
    Stored,
    Train,
    Waiting,
    members_needed,
)
from tests.protocol_support import Driver, accepted, hello, seen, share, stats


def vote(sender: str, range_: bool, seq: int = 0):
    return accepted(sender, "norm", 0, b"\x01" if range_ else b"\x00", seq, norm_range=range_)


def implausible(s) -> str | None:
    return "negative row count" if s.rows < 0 else None


# --- liveness ---------------------------------------------------------------------------------
def test_ignorable_needs_a_majority_heard_including_us():
    """runner.py 1603-1612: 5 members, 2 absent: 3 of 5 heard, ignorable; 3 absent: not."""
    live = Liveness(absent_after=1)
    others = ["b1", "b2", "b3", "b4"]
    live.note_absent(["b1", "b2"])
    assert live.ignorable(others) == {"b1", "b2"}
    live.note_absent(["b3"])
    assert live.ignorable(others) == set()
    assert live.ignorable(["b1"]) == set()  # two members, one absent: half is no majority


def test_talk_lifts_an_absence_once_a_share_every_time():
    """runner.py 751-769 (`_heard`)."""
    live = Liveness(absent_after=3)
    for _ in range(3):
        live.note_absent(["b1"])
    assert live.absent == {"b1"}
    assert live.heard("b1") == "heard" and live.missed["b1"] == 2  # one more deadline
    assert live.note_absent(["b1"]) == [("b1", 3)]
    assert live.heard("b1") is None and "b1" in live.absent  # talk again: nothing
    assert live.heard("b1", shared=True) == "back" and not live.absent and not live.missed
    with pytest.raises(ValueError):
        Liveness(absent_after=0)


def test_start_barrier_counts_members_still_sharing():
    """runner.py 1479-1496: min_members ("majority" = members // 2 + 1, us included:
    node/runtime/config.py `quorum`); after a restart also a majority of the neighbours, recounted."""
    assert members_needed("majority", 5) == 3 and members_needed(2, 5) == 2
    b = StartBarrier("majority", 5, restarted=True, started=0.0, deadline_s=10.0)
    assert b.need == 2
    four = {"b1", "b2", "b3", "b4"}
    assert not b.passed({"b1", "b2"}, four, 1.0)  # 2 of 4: no majority
    assert b.passed({"b1", "b2"}, four, 10.0)  # ... until the deadline
    assert b.passed({"b1", "b2"}, {"b1", "b2", "b3"}, 1.0)  # b4 retired: 2 of 3
    assert not b.passed({"b1"}, {"b1"}, 99.0)  # min_members: no time limit
    assert b.next_time({"b1"}, four, 1.0, next_report=10.0) == 10.0
    fresh = StartBarrier(0, 5, restarted=False, started=0.0, deadline_s=10.0)
    assert fresh.passed(set(), four, 0.0)


# --- seen reports -----------------------------------------------------------------------------
def test_seen_reports_are_bounded_to_the_window_and_the_kept_rounds():
    """runner.py 882-905 and 946-958: reports for rounds beyond our window are dropped,
    closed digests kept SEEN_KEEP_ROUNDS rounds; one report per member and round."""
    s = SeenReports("b0", lookahead=2, keep_rounds=3)
    assert s.report(seen("bank-1", 5, []), b"", current=0) == []
    assert not s.pending and not s.reported  # beyond the window: dropped
    s.report(seen("bank-1", 2, []), b"", current=0)
    assert set(s.pending) == {2}
    for r in range(6):
        s.close(r, {"bank-1": (r, bytes([r]) * 32, b"")})
    assert sorted(s.closed) == [3, 4, 5] and not s.pending
    mine = s.closed[5]["bank-1"][1]
    assert s.report(seen("bank-2", 5, [("bank-1", b"x" * 32)]), b"r", 6)[0].accused == "bank-1"
    assert s.report(seen("bank-2", 5, [("bank-1", b"y" * 32)], seq=1), b"r", 6) == []
    assert s.report(seen("bank-3", 5, [("bank-1", mine)]), b"r", 6) == []


def test_a_member_is_never_accused_by_its_own_report():
    """runner.py 966-967: a reporter's claim about its own share is not compared."""
    s = SeenReports("b0", lookahead=2)
    s.close(0, {"bank-1": (0, b"a" * 32, b"")})
    assert s.report(seen("bank-1", 0, [("bank-1", b"b" * 32)]), b"", 1) == []


# --- hello ----------------------------------------------------------------------------------------
def test_hello_limiter_per_member_and_kind():
    """runner.py 1437-1450."""
    h = HelloLimiter(interval_s=2.0)
    assert h.due("b1", "hello", 0.0)
    h.answered("b1", "hello", 0.0)
    assert not h.due("b1", "hello", 1.9) and h.due("b1", "prekey", 1.9) and h.due("b2", "hello", 1)
    assert h.due("b1", "hello", 2.0)


def test_a_hello_in_a_federated_consortium_gets_our_stored_vote_and_statistics():
    """runner.py 1454-1462: a restarted member needs every member's vote and statistics."""
    d = Driver(3, normalization=Normalization(implausible, agreed=True))
    d.start()
    d.at(1).recv(hello("bank-1", 0, ask=True))
    assert [a.message for a in d.of(SendTo)][1:] == [Stored("norm"), Stored("stats")]


# --- statistics before round 1 ------------------------------------------------------------------
def test_stats_agreement_refuses_implausible_and_second_messages():
    """runner.py 517-546 (`_on_vote`, `_on_stats`)."""
    a = StatsAgreement(["bank-1", "bank-2"], implausible)
    assert a.vote(vote("bank-1", False)) is None
    assert a.vote(vote("bank-1", True, seq=1))[0] == "equivocation"
    assert a.statistics(stats("bank-1", -5.0))[0] == "bad_stats"
    assert a.statistics(stats("bank-1", 10.0, seq=1)) == ("bad_stats",
                                                         "its first stats message was refused")
    assert a.statistics(stats("bank-2", 10.0)) is None
    assert a.statistics(stats("bank-2", 11.0, seq=1))[0] == "equivocation"
    assert a.stats_missing() == [] and set(a.messages()) == {"bank-2"}


def test_normalization_votes_then_statistics_then_round_1():
    """runner.py 562-655 (`_agree_normalization`): vote, wait for every vote, then our
    statistics, wait for every member's (the refused left out), combine, round 1."""
    d = Driver(3, normalization=Normalization(implausible))
    d.start()
    d.at(1).recv(hello("bank-1", 0))
    assert d.of(SendVote) and not d.of(SendStats)
    d.recv(stats("bank-2", -1.0))  # early and implausible: refused, left out
    assert d.of(Refused)[-1].reason == "bad_stats"
    d.recv(vote("bank-1", False))
    d.recv(vote("bank-2", False))
    assert d.of(SendStats) and not d.of(Train)
    d.at(2).recv(stats("bank-1", 7.0))
    [c] = d.of(Combine)
    assert set(c.messages) == {"bank-1"} and d.of(Train)


def test_a_range_vote_means_range_scaling_and_nothing_sent():
    """runner.py 590-607: one vote for range scaling: every member scales by the ranges."""
    d = Driver(3, normalization=Normalization(implausible))
    d.start()
    d.at(1).recv(vote("bank-1", True))
    assert not d.of(AdoptRange)  # bank-2's vote still missing
    d.recv(vote("bank-2", False))
    assert d.of(AdoptRange)[0].fallback == ("bank-1",) and not d.of(SendStats)
    assert d.of(Train)


def test_missing_votes_end_the_run_at_normalize_wait_with_the_reason():
    """runner.py 578-588: no vote within gossip.normalize_wait_s: a LocalError naming who."""
    d = Driver(3, normalization=Normalization(implausible))
    d.start()
    d.at(1).recv(hello("bank-1", 0))
    d.recv(vote("bank-1", False))
    d.tick(11.0)
    assert d.of(Waiting)[0].who == ("bank-2",)
    d.tick(301.0)
    [a] = d.of(Abort)
    assert "no vote from bank-2" in a.why and d.m.done


def test_stored_statistics_skip_the_vote_wait():
    """runner.py 573-575: a restart with stats.envelope stored re-sends them at once."""
    d = Driver(3, normalization=Normalization(implausible, stats_stored=True))
    d.start()
    d.at(1).recv(hello("bank-1", 0))
    assert d.of(SendVote) and d.of(SendStats)
    d.recv(stats("bank-1", 1.0))
    d.recv(share("bank-2", 0))
    assert not d.of(Train)
    d.recv(stats("bank-2", 1.0))
    assert d.of(Train)


def test_the_protocol_package_imports_neither_node_nor_torch():
    """gossip never imports node or torch (gossip/__init__.py)."""
    code = ("import sys, gossip.protocol; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith(('torch.', 'node'))]; print(bad); assert not bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

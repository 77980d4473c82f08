"""Issue 24: what a message or a node build costs must not grow with the consortium where it
need not. `Liveness.ignorable` and the start barrier read the book's neighbour set without
copying it; a Consortium computes its id and digests once. Answers unchanged."""

from __future__ import annotations

import random
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

import pytest

from gossip.membership import Consortium, Member
from gossip.protocol.liveness import Liveness, StartBarrier


class NoIter(AbstractSet):
    """A neighbour set that may be asked membership and size, never walked (a copy
    walks it)."""

    def __init__(self, members: Iterable[str]) -> None:
        self._members = frozenset(members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self):
        raise AssertionError("walked every neighbour")


def old_ignorable(live: Liveness, neighbours: Iterable[str]) -> set[str]:
    """The answer before the change (a copy of the neighbours each call)."""
    neighbours = set(neighbours)
    absent = live.absent & neighbours
    members = len(neighbours) + 1
    if 2 * (members - len(absent)) <= members:
        return set()
    return absent


@pytest.mark.parametrize("seed", range(30))
def test_ignorable_answers_as_before_for_any_absent_set_and_neighbour_kind(seed):
    rng = random.Random(seed)
    everyone = [f"m{i}" for i in range(rng.randint(1, 40))]
    neighbours = rng.sample(everyone, rng.randint(0, len(everyone)))
    live = Liveness(absent_after=2)
    live.absent = set(rng.sample(everyone, rng.randint(0, len(everyone))))  # some not ours
    want = old_ignorable(live, neighbours)
    for kind in (list, set, frozenset, tuple, iter):
        assert live.ignorable(kind(neighbours)) == want


def test_ignorable_does_not_walk_the_neighbours():
    neighbours = NoIter(f"m{i}" for i in range(1000))
    live = Liveness(absent_after=1)
    assert live.ignorable(neighbours) == set()
    live.absent = {"m3", "m4", "outsider"}
    assert live.ignorable(neighbours) == {"m3", "m4"}
    live.absent = {f"m{i}" for i in range(600)}  # the rest are no majority: nobody ignored
    assert live.ignorable(neighbours) == set()


@pytest.mark.parametrize("restarted", [False, True])
def test_the_start_barrier_reads_a_neighbour_set_without_walking_it(restarted):
    names = [f"m{i}" for i in range(9)]
    barrier = StartBarrier("majority", 10, restarted, started=0.0, deadline_s=5.0)
    up = set(names[:4])
    for neighbours in (list(names), set(names), NoIter(names)):
        assert barrier.majority(neighbours) == (5 if restarted else 0)
        assert barrier.passed(up, neighbours, now=1.0) is False
        assert barrier.passed(up | {"m4"}, neighbours, now=1.0) is True
        assert barrier.next_time(up, neighbours, now=1.0, next_report=2.0) == 2.0


def members(n: int) -> tuple[Member, ...]:
    return tuple(Member(f"bank-{i}", bytes([i % 256, i // 256]) * 16, {"memory": f"bank-{i}"})
                 for i in range(n))


def test_the_consortium_id_and_digests_are_computed_once_and_unchanged(monkeypatch):
    rules = {"aggregation": "centered_clipping", "topology": "random-out:8"}
    c = Consortium("c", {"label": "y"}, members(300), rules)
    fresh = Consortium("c", {"label": "y"}, members(300), dict(rules))
    calls = []
    real = Consortium._member_list
    monkeypatch.setattr(Consortium, "_member_list", lambda self: calls.append(1) or real(self))
    first, digests = c.id, c.digests()
    for _ in range(50):
        assert c.id == first and c.digests() == digests
    assert len(calls) == 2  # one for the id, one for the digests: not one per question
    assert first == fresh.id and digests == fresh.digests()
    digests["members"] = "tampered"  # a caller's copy: the kept digests do not change
    assert c.digests()["members"] == fresh.digests()["members"]
    # the memo is no field: equality, repr and the id of an equal consortium unaffected
    assert c == fresh and "_identity_memo" not in repr(c)
    other = Consortium("c", {"label": "y"}, members(300), {**rules, "topology": "ring"})
    assert other.id != c.id

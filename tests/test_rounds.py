from __future__ import annotations

import pytest

from gossip.errors import RemoteError
from gossip.rounds import RoundBook
from tests.helpers import consortium, keys, share_bytes, verifier_for

K = keys(4)
CONS = consortium(K)


def accepted(member: int, round_: int, seq: int):
    return verifier_for(CONS, K[0]).verify(share_bytes(K[member], CONS, round_, seq), 0)


def test_round_completes_when_every_neighbour_has_sent():
    book = RoundBook(["bank-1", "bank-2", "bank-3"], lookahead=3)
    for m in (1, 2):
        book.add(accepted(m, 0, 0))
    assert not book.complete(0) and book.missing(0) == ["bank-3"]
    book.add(accepted(3, 0, 0))
    assert book.complete(0)


def test_shares_a_few_rounds_ahead_are_buffered_for_later():
    book = RoundBook(["bank-1", "bank-2"], lookahead=3)
    assert book.add(accepted(1, 2, 5)) == "buffered"
    book.add(accepted(2, 0, 0))  # bank-2 is still with us
    assert book.advance() == 1
    assert not book.complete(1)
    book.add(accepted(2, 1, 1))
    assert book.advance() == 2
    assert book.shares(2).keys() == {"bank-1"}


def test_far_behind_node_skips_ahead_to_the_newest_round_seen():
    book = RoundBook(["bank-1", "bank-2"], lookahead=3)
    assert book.add(accepted(1, 10, 10)) == "ahead"
    assert book.add(accepted(2, 9, 9)) == "ahead"
    assert book.advance() == 10
    assert book.shares(10).keys() == {"bank-1"}  # the far-ahead share moved into the window


def test_a_second_different_share_for_one_round_is_equivocation():
    book = RoundBook(["bank-1"], lookahead=3)
    book.add(accepted(1, 0, 0))
    with pytest.raises(RemoteError) as info:
        book.add(accepted(1, 0, 1))
    assert info.value.reason == "equivocation"


def test_a_member_seen_in_a_later_round_no_longer_holds_ours_open():
    book = RoundBook(["bank-1", "bank-2"], lookahead=3)
    book.add(accepted(1, 0, 0))
    book.add(accepted(2, 1, 1))  # bank-2 closed round 0 without us and moved on
    assert book.complete(0) and book.missing(0) == ["bank-2"]


def test_restarted_node_jumps_to_the_oldest_round_its_neighbours_are_in():
    book = RoundBook(["bank-1", "bank-2"], lookahead=5, current=3)
    book.add(accepted(1, 6, 6))
    book.add(accepted(2, 7, 7))
    assert book.complete(3)
    assert book.advance() == 6
    assert book.shares(6).keys() == {"bank-1"}

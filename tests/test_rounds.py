from __future__ import annotations

import pytest

from gossip.errors import RemoteError
from gossip.protocol.book import RoundBook
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


def test_far_behind_node_skips_ahead_to_the_newest_round_a_majority_reached():
    book = RoundBook(["bank-1", "bank-2"], lookahead=3)
    assert book.add(accepted(1, 10, 10)) == "ahead"
    assert book.add(accepted(2, 9, 9)) == "ahead"
    assert book.advance() == 9  # both are at 9 or later; only bank-1 is at 10
    assert book.shares(9).keys() == {"bank-2"}  # far-ahead shares moved into the window
    assert book.shares(10).keys() == {"bank-1"}
    assert book.complete(9)  # bank-1 has left round 9
    assert book.advance() == 10


def test_one_member_claiming_a_far_round_cannot_make_us_skip():
    """An authenticated member that lies about its round is one vote of three."""
    book = RoundBook(["bank-1", "bank-2", "bank-3"], lookahead=3)
    assert book.add(accepted(1, 10**6, 5)) == "ahead"
    for m in (2, 3):
        book.add(accepted(m, 0, 0))
    assert book.advance() == 1
    book.add(accepted(2, 500, 9))  # a second member that far ahead is a majority
    assert book.advance() == 500


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

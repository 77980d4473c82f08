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
    book = RoundBook(["bank-1"], lookahead=3)
    assert book.add(accepted(1, 2, 5)) == "buffered"
    assert book.advance() == 1 and book.advance() == 2
    assert book.complete(2)


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

"""A secure round's pieces are bounded by what the receiver knows (review of issue 22, M1):
a member's 60 MiB check piece, where 24 + 16n bytes is the real size, is refused by name
before it is copied, however well it is signed."""

from __future__ import annotations

import pytest

from gossip import envelope as E
from gossip.bodies import SecAgg, decode_secagg, encode_secagg, secagg_piece_limits
from gossip.errors import RemoteError
from tests.helpers import SPEC, consortium, keys, verifier_for

D = sum(2 if len(t.shape) == 1 else t.shape[0] * t.shape[1] for t in SPEC)  # 10 values


def test_the_limits_are_the_pieces_real_sizes():
    assert secagg_piece_limits("check", 4, D) == (24 + 16 * 4,)  # 88 bytes at n = 4
    assert secagg_piece_limits("degree2", 4, D) == (24 + 8 * (6 + 4),)
    assert secagg_piece_limits("sum", 4, D) == (24 + 8 * D,)
    # the vector's room for variant range's witness, its commitment's x-part digests
    assert secagg_piece_limits("deal", 4, D) == (24 + 8 * (D + 1 + (1 << 14)), 24 + 8 * 11, 32 * 2 * 4)


@pytest.mark.parametrize(("step", "size"), [("check", 60 << 20), ("check", 89),
                                            ("degree2", 24 + 8 * 10 + 1), ("sum", 24 + 8 * D + 8)])
def test_an_oversized_opened_piece_is_refused_naming_the_member(step, size):
    ks = keys(4)
    cons = consortium(ks)
    v = verifier_for(cons, ks[0], secure=True)
    held = (1,) if step == "check" else ()
    data = E.pack(ks[3], cons.id, E.KIND_SECAGG, 0, 1, encode_secagg(SecAgg(step, (b"\0" * size,), held)))
    with pytest.raises(RemoteError) as exc:
        v.verify(data, current_round=0)
    assert (exc.value.reason, exc.value.peer) == ("bad_body", cons.members[3].name)
    assert f"{step} piece 0" in exc.value.detail and "4 members" in exc.value.detail
    # the piece at its real size passes the frame check (its bytes are the node's to check)
    real = b"\0" * secagg_piece_limits(step, 4, D)[0]
    ok = E.pack(ks[3], cons.id, E.KIND_SECAGG, 0, 2, encode_secagg(SecAgg(step, (real,), held)))
    assert v.verify(ok, current_round=0).secagg.step == step


def test_an_oversized_deal_piece_is_refused():
    limits = secagg_piece_limits("deal", 4, D)
    for k in range(3):
        pieces = [b"\0" * n for n in limits]
        pieces[k] += b"\0"
        with pytest.raises(RemoteError, match=f"deal piece {k}"):
            decode_secagg(encode_secagg(SecAgg("deal", tuple(pieces))), 4, "bank-3", deal=True, dim=D)
    assert decode_secagg(encode_secagg(SecAgg("deal", tuple(b"\0" * n for n in limits))), 4,
                         deal=True, dim=D).step == "deal"

"""A member's correctly signed message of the other round mode (review of issue 22, C1):
a "deal" or "secagg" in a plain consortium (it used to be filed as that member's share,
with no tensors, and crash every honest node at aggregation), or a plain share in a secure
one, is refused by the Verifier as `wrong_kind`, naming the sender."""

from __future__ import annotations

import pytest

from gossip import envelope as E
from gossip.bodies import SecAgg, encode_secagg
from gossip.errors import RemoteError
from tests.helpers import consortium, keys, share_bytes, verifier_for


def test_secure_kinds_are_refused_in_a_plain_consortium_naming_the_member():
    ks = keys(4)
    cons = consortium(ks)
    plain = verifier_for(cons, ks[0])
    hostile = cons.members[3].name
    for seq, (kind, body) in enumerate([(E.KIND_DEAL, b"sealed deal bytes"),
                                        (E.KIND_SECAGG, encode_secagg(SecAgg("sum", ())))]):
        data = E.pack(ks[3], cons.id, kind, 0, seq, body)  # the member's real key
        with pytest.raises(RemoteError) as exc:
            plain.verify(data, current_round=0)
        assert (exc.value.reason, exc.value.peer) == ("wrong_kind", hostile), kind
    # its real share still reads: the refusal is about the kind, not the member
    assert plain.verify(share_bytes(ks[3], cons, seq=5), current_round=0).share is not None


def test_plain_shares_are_refused_in_a_secure_consortium_naming_the_member():
    ks = keys(4)
    cons = consortium(ks)
    secure = verifier_for(cons, ks[0], secure=True)
    with pytest.raises(RemoteError) as exc:
        secure.verify(share_bytes(ks[2], cons), current_round=0)
    assert (exc.value.reason, exc.value.peer) == ("wrong_kind", cons.members[2].name)
    sealed = E.pack(ks[2], cons.id, E.KIND_SEALED, 0, 1, b"sealed share bytes")
    with pytest.raises(RemoteError) as exc:
        secure.verify(sealed, current_round=0)
    assert (exc.value.reason, exc.value.peer) == ("wrong_kind", cons.members[2].name)
    body = encode_secagg(SecAgg("degree2", (b"piece",)))
    acc = secure.verify(E.pack(ks[2], cons.id, E.KIND_SECAGG, 0, 2, body), current_round=0)
    assert acc.secagg == SecAgg("degree2", (b"piece",))

"""The secure round's message bodies (gossip/bodies.py SecAgg; kinds "deal" and "secagg"):
strict, hostile-safe decoding, and a deal never accepted for a closed round."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import envelope as E
from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from gossip.errors import LocalError, RemoteError
from tests.helpers import consortium, keys, verifier_for


@pytest.mark.parametrize("msg", [SecAgg("deal", (b"v", b"m", b"c" * 32)), SecAgg("check", (b"p",), (1, 3)),
                                 SecAgg("degree2", (b"p",)), SecAgg("sum", ())])
def test_round_trip(msg):
    assert decode_secagg(encode_secagg(msg), 4, deal=msg.step == "deal") == msg


@pytest.mark.parametrize(("doc", "deal", "words"), [
    (["deal", [b"v", b"m", b"c"], []], False, "step 'deal' in a secagg"),  # a deal must come sealed
    (["check", [b"p"], []], True, "in a deal message"),
    (["sum", [b"a", b"b"], []], False, "2 pieces in a sum"),
    (["deal", [b"v", b"m"], []], True, "2 pieces in a deal"),
    (["check", [b"p"], [1, 2, 3, 4, 5]], False, "5 held dealers"),
    (["check", [b"p"], [2, 1]], False, "increasing order"),
    (["check", [b"p"], [0]], False, "increasing order"),
    (["check", [b"p"], [9]], False, "out of range"),
    (["sum", [b"p"], [1]], False, "1 held dealers in a sum"),
    (["check", [b"p"]], False, "not [step, pieces, held]"),
    (["check", ["p"], []], False, "bin"),
    (["check", [b"p"], [], 1], False, "not [step"),
])
def test_a_malformed_body_is_refused_naming_the_sender(doc, deal, words):
    with pytest.raises(RemoteError) as exc:
        decode_secagg(msgpack.packb(doc, use_bin_type=True), 4, "bank-1", deal=deal)
    assert (exc.value.reason, exc.value.peer) == ("bad_body", "bank-1")
    assert words in exc.value.detail


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_refused_or_read_never_crash(data):
    try:
        msg = decode_secagg(data, 4)
    except RemoteError as exc:
        assert exc.reason == "bad_body"
    else:
        assert msg.step in ("check", "degree2", "sum")


def test_our_own_misuse_is_a_local_error():
    with pytest.raises(LocalError):
        encode_secagg(SecAgg("deal", (b"v",)))
    with pytest.raises(LocalError):
        encode_secagg(SecAgg("sum", (b"p",), (1,)))


def test_a_late_deal_is_stale_and_a_secagg_message_needs_no_seal():
    """A member answering after we closed its round is excluded ("stale", as a late share);
    an opened step is not sealed and reads with a plain verifier."""
    ks = keys(3)
    cons = consortium(ks)
    v = verifier_for(cons, ks[0], secure=True)
    deal = E.pack(ks[1], cons.id, E.KIND_DEAL, 2, 1, b"sealed bytes")
    with pytest.raises(RemoteError) as exc:
        v.verify(deal, current_round=3)
    assert exc.value.reason == "stale"
    with pytest.raises(RemoteError) as exc:  # in time, but this node does not seal
        v.verify(deal, current_round=2)
    assert exc.value.reason == "seal_off"
    body = encode_secagg(SecAgg("degree2", (b"piece",)))
    acc = v.verify(E.pack(ks[1], cons.id, E.KIND_SECAGG, 2, 2, body), current_round=2)
    assert acc.secagg == SecAgg("degree2", (b"piece",))


def test_a_deal_padded_with_dummy_key_wraps_is_refused_naming_its_dealer():
    """Review 2 F7, replayed with bank-3's real key: a deal sealed to bank-2 plus dummy key
    wraps (which would make bank-2's reveal of it outgrow the reveal bound, so bank-2's
    agreement is refused everywhere and the lying dealer never proven) is refused at
    receipt as `bad_seal`, naming the dealer; the same deal with its one wrap is read."""
    from nacl.public import PrivateKey

    from gossip.seal import Sealing, SignedPrekey, seal, seal_ad

    ks = keys(4)
    cons = consortium(ks)
    names = {m.public_key: m.name for m in cons.members}
    sealing = Sealing(cons.id, ks[2], names, rotate_every=1, lookahead=0)
    sealing.rotate(0)
    pre = SignedPrekey(bytes(ks[2].verify_key), 0, bytes(sealing.own.keys[0].public_key), b"s" * 64)
    v = E.Verifier(cons.id, names, bytes(ks[2].verify_key), [], sealing=sealing, secure=True)
    plain = encode_secagg(SecAgg("deal", (b"v", b"m", b"c" * 32 * 4)))
    ad = seal_ad(cons.id, bytes(ks[3].verify_key), 0)
    for pad in (1, 3):
        dummies = {f"z{i}": SignedPrekey(b"m" * 32, 0, bytes(PrivateKey.generate().public_key),
                                         b"s" * 64) for i in range(pad)}
        head, ct = seal(plain, {"bank-2": pre, **dummies}, ad)
        with pytest.raises(RemoteError) as exc:
            v.verify(E.pack(ks[3], cons.id, E.KIND_DEAL, 0, pad, head + ct), current_round=0)
        assert (exc.value.reason, exc.value.peer) == ("bad_seal", "bank-3")
        assert f"{pad + 1} key wraps" in exc.value.detail
    head, ct = seal(plain, {"bank-2": pre}, ad)
    acc = v.verify(E.pack(ks[3], cons.id, E.KIND_DEAL, 0, 9, head + ct), current_round=0)
    assert acc.secagg == decode_secagg(plain, 4, deal=True)

"""gossip.seal: shares sealed to the members' signed, rotated X25519 prekeys."""

from __future__ import annotations

import pytest
from nacl.bindings import crypto_sign_ed25519_sk_to_curve25519
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey

from gossip import bodies, envelope
from gossip.errors import RemoteError
from gossip.seal import PrekeyStore, epoch_of, open_sealed, sign_prekey, verify_prekey
from gossip.seal import seal as seal_parts
from tests.helpers import consortium, keys, tensors

CID = b"\x05" * 32
AD = b"bound to one sender and round"


def seal(body, recipients, ad):
    return b"".join(seal_parts(body, recipients, ad))


def setup_members(n=3, epoch=0):
    ks = keys(n)
    members = {bytes(k.verify_key): f"bank-{i}" for i, k in enumerate(ks)}
    stores = [PrekeyStore() for _ in ks]
    published = {}
    for i, (k, store) in enumerate(zip(ks, stores, strict=True)):
        signed = sign_prekey(k, CID, epoch, store.rotate(epoch).public_key)
        published[f"bank-{i}"] = verify_prekey(signed.encode(), CID, members)
    return ks, members, stores, published


def test_members_open_a_sealed_share_and_the_ciphertext_holds_no_tensor_bytes():
    _, _, stores, published = setup_members()
    body = bodies.encode_share(tensors(0.123), 10.0)
    sealed = seal(body, {n: p for n, p in published.items() if n != "bank-0"}, AD)
    raw = tensors(0.123)[0][1].tobytes()
    assert raw not in sealed and body not in sealed
    for store in stores[1:]:
        assert open_sealed(sealed, store, AD) == body
    with pytest.raises(RemoteError) as exc:  # the sender did not seal for itself
        open_sealed(sealed, stores[0], AD, "bank-0")
    assert exc.value.reason == "no_prekey"


def test_a_non_member_cannot_decrypt():
    _, _, _, published = setup_members()
    sealed = seal(b"secret share body", published, AD)
    outsider = PrekeyStore()
    outsider.rotate(0)
    with pytest.raises(RemoteError, match="no_prekey"):
        open_sealed(sealed, outsider, AD)


def test_after_rotation_and_deletion_the_identity_key_alone_opens_no_recorded_share():
    ks, members, stores, published = setup_members()
    recorded = seal(b"round 3 share", published, AD)  # what a broker records in epoch 0
    k = 5
    new_epoch = epoch_of(2 * k, k)
    assert new_epoch == 2
    stores[1].rotate(new_epoch)
    stores[1].forget(before_epoch=new_epoch)
    assert list(stores[1].keys) == [new_epoch]
    with pytest.raises(RemoteError, match="no_prekey"):
        open_sealed(recorded, stores[1], AD)
    # A thief with bank-1's Ed25519 identity key: its X25519 conversion opens nothing.
    seed_and_pk = bytes(ks[1]) + bytes(ks[1].verify_key)
    thief = PrekeyStore({0: PrivateKey(crypto_sign_ed25519_sk_to_curve25519(seed_and_pk)),
                         new_epoch: stores[1].keys[new_epoch]})
    with pytest.raises(RemoteError, match="no_prekey"):
        open_sealed(recorded, thief, AD)


def test_prekeys_must_be_signed_by_a_member_for_this_consortium():
    ks, members, _, _ = setup_members()
    pub = PrivateKey.generate().public_key
    outsider = sign_prekey(SigningKey.generate(), CID, 0, pub)
    with pytest.raises(RemoteError, match="non_member"):
        verify_prekey(outsider.encode(), CID, members)
    other_consortium = sign_prekey(ks[0], b"\x06" * 32, 0, pub)
    with pytest.raises(RemoteError, match="bad_signature"):
        verify_prekey(other_consortium.encode(), CID, members)
    for junk in (b"", b"\x93\x01\x02\x03", b"\xff" * 50):
        with pytest.raises(RemoteError, match="bad_prekey"):
            verify_prekey(junk, CID, members)


def test_a_tampered_or_garbled_sealed_body_is_refused():
    _, _, stores, published = setup_members()
    sealed = bytearray(seal(b"x" * 100, published, AD))
    # Flip every single bit-0 in turn: the result is a refusal or the exact body, never
    # other bytes; in the ciphertext and its tag (the last 116 bytes) always a refusal.
    for where in range(len(sealed)):
        garbled = bytearray(sealed)
        garbled[where] ^= 1
        try:
            assert open_sealed(bytes(garbled), stores[1], AD, "bank-0") == b"x" * 100
            assert where < len(sealed) - 116, where
        except RemoteError as exc:
            assert exc.reason in {"bad_seal", "no_prekey"} and exc.peer == "bank-0"
    for prefix in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x10\x00"):
        with pytest.raises(RemoteError, match="bad_seal"):
            open_sealed(prefix + bytes(sealed[4:]), stores[1], AD)
    with pytest.raises(RemoteError, match="bad_seal"):
        open_sealed(b"\x00garbage", stores[1], AD)


def test_the_signed_envelope_covers_the_sealed_body():
    ks = keys(2)
    cons = consortium(ks)
    _, _, _, published = setup_members(2)
    sealed = seal(bodies.encode_share(tensors(), 1.0), published, AD)
    data = envelope.pack(ks[0], cons.id, envelope.KIND_SEALED, 0, 0, sealed)
    env = envelope.decode_outer(data)
    assert env.body == sealed and env.digest == envelope.signing_digest(
        cons.id, bytes(ks[0].verify_key), "sealed", 0, 0, sealed)


def test_a_sender_cannot_give_members_different_keys_for_one_signed_ciphertext():
    """ChaCha20-Poly1305 does not commit to its key; the signed header does (kc)."""
    import msgpack
    import nacl.utils
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from nacl.public import SealedBox

    from gossip.seal import key_commitment

    _, _, stores, published = setup_members()
    honest, other = nacl.utils.random(32), nacl.utils.random(32)
    nonce = nacl.utils.random(12)
    ct = ChaCha20Poly1305(other).encrypt(nonce, b"what bank-1 alone would see", AD)
    p = published["bank-1"]
    header = msgpack.packb({"v": 1, "nonce": nonce, "kc": key_commitment(honest),
                            "keys": [[p.epoch, p.x25519,
                                      SealedBox(PublicKey(p.x25519)).encrypt(other)]]},
                           use_bin_type=True)
    forged = len(header).to_bytes(4, "big") + header + ct
    with pytest.raises(RemoteError, match="key commitment"):
        open_sealed(forged, stores[1], AD, "bank-0")
    # The same body with the matching commitment opens: the check is what refused it.
    header = header.replace(key_commitment(honest), key_commitment(other))
    assert open_sealed(len(header).to_bytes(4, "big") + header + ct, stores[1], AD) == \
        b"what bank-1 alone would see"


# --- keys that cannot hurt ------------------------------------------------------------

P = 2**255 - 19
# The canonical small-order u-coordinates (libsodium's has_small_order list) ...
CANONICAL_LOW_ORDER = [
    0, 1, P - 1,
    int.from_bytes(bytes.fromhex(
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), "little"),
    int.from_bytes(bytes.fromhex(
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"), "little"),
]
# ... and their other encodings: + p, + 2p where that fits in 256 bits, and with the top
# bit set. This holds the usual list of 12 (0, 1, the order-8 pair, p-1, p, p+1, the
# order-8 pair + p, 2p-1, 2p, 2p+1) and more.
LOW_ORDER = sorted({u for c in CANONICAL_LOW_ORDER for u in (c, c + P, c + 2 * P, c | 1 << 255)
                    if u < 2**256})
LOW_ORDER_KEYS = [u.to_bytes(32, "little") for u in LOW_ORDER]


def test_the_low_order_list_is_the_usual_one_and_libsodium_refuses_every_entry():
    from nacl.exceptions import RuntimeError as NaclRuntimeError
    from nacl.public import SealedBox

    usual = {0, 1, P - 1, P, P + 1, 2 * P - 1, 2 * P, 2 * P + 1,
             *CANONICAL_LOW_ORDER[3:], *(c + P for c in CANONICAL_LOW_ORDER[3:])}
    assert len(usual) == 12 and usual <= set(LOW_ORDER)
    for u in CANONICAL_LOW_ORDER:  # what sealing to one used to do to the sealing node
        with pytest.raises(NaclRuntimeError):
            SealedBox(PublicKey(u.to_bytes(32, "little"))).encrypt(b"k" * 32)


@pytest.mark.parametrize("raw", LOW_ORDER_KEYS, ids=lambda r: r.hex()[:8] + "-" + r.hex()[-4:])
def test_a_member_signed_low_order_prekey_is_bad_prekey(raw):
    """A member announces a low-order X25519 key, properly signed: refused at verification
    (it used to be accepted, and every sealing node then died sealing to it)."""
    from gossip.envelope import KIND_PREKEY, Verifier
    from gossip.seal import Sealing, SignedPrekey, encode_announcement

    ks = keys(2)
    cons = consortium(ks)
    members = {m.public_key: m.name for m in cons.members}
    signed = sign_prekey(ks[1], cons.id, 0, PublicKey(raw))
    with pytest.raises(RemoteError, match="bad_prekey") as exc:
        verify_prekey(signed.encode(), cons.id, members)
    assert exc.value.peer == "bank-1"
    good = sign_prekey(ks[1], cons.id, 1, PrivateKey.generate().public_key)
    body = encode_announcement([good, SignedPrekey(signed.member_key, 0, raw, signed.sig)],
                               hello=False)
    sealing = Sealing(cons.id, ks[0], members, rotate_every=1, lookahead=1)
    v = Verifier(cons.id, members, bytes(ks[0].verify_key), [], sealing=sealing)
    with pytest.raises(RemoteError) as exc:
        v.verify(envelope.pack(ks[1], cons.id, KIND_PREKEY, 0, 0, body), 0)
    assert exc.value.reason == "bad_prekey" and exc.value.peer == "bank-1"
    assert not sealing.peers.get("bank-1")  # nothing of that announcement was filed


@pytest.mark.parametrize("u", [P, P + 9, 2**255 + 9, 2**256 - 1], ids=hex)
def test_a_non_canonical_prekey_is_bad_prekey(u):
    ks, members, _, _ = setup_members(2)
    signed = sign_prekey(ks[1], CID, 0, PublicKey(u.to_bytes(32, "little")))
    with pytest.raises(RemoteError, match="bad_prekey"):
        verify_prekey(signed.encode(), CID, members)


def test_an_ordinary_prekey_still_verifies():
    ks, members, _, _ = setup_members(2)
    for _ in range(50):
        signed = sign_prekey(ks[1], CID, 3, PrivateKey.generate().public_key)
        assert verify_prekey(signed.encode(), CID, members) == signed


def _sealing_with_a_bad_peer_key():
    """bank-0's sealing state holding a good prekey for bank-1 and a zero one for bank-2
    (as a checkpoint written before verification refused them would)."""
    from gossip.seal import Sealing

    ks = keys(3)
    cons = consortium(ks)
    members = {m.public_key: m.name for m in cons.members}
    sealings = [Sealing(cons.id, k, members, rotate_every=2, lookahead=1) for k in ks]
    for s in sealings:
        s.rotate(0)
    good = verify_prekey(sign_prekey(ks[1], cons.id, 0, sealings[1].own.keys[0].public_key)
                         .encode(), cons.id, members)
    zero = sign_prekey(ks[2], cons.id, 0, PublicKey(bytes(32)))
    sealings[0].peers = {"bank-1": {0: good}, "bank-2": {0: zero}}
    return ks, cons, sealings


def test_sealing_with_one_bad_recipient_key_seals_for_the_others():
    ks, cons, sealings = _sealing_with_a_bad_peer_key()
    s = sealings[0]
    recipients, missing = s.recipients(0, ["bank-1", "bank-2"])
    assert set(recipients) == {"bank-1", "bank-2"} and not missing
    body = bodies.encode_share(tensors(0.4), 3.0)
    sealed = b"".join(s.seal(body, 0, recipients))  # used to raise nacl RuntimeError
    assert set(s.left_out) == {"bank-2"} and "low-order" in s.left_out["bank-2"]
    ad = seal_ad_for(cons, ks[0], 0)
    assert open_sealed(sealed, sealings[1].own, ad) == body
    with pytest.raises(RemoteError, match="no_prekey"):
        open_sealed(sealed, sealings[2].own, ad)
    # The bad key is forgotten: bank-2 is reported missing until it announces again.
    assert s.recipients(0, ["bank-1", "bank-2"])[1] == ["bank-2"]
    s.seal(body, 0, {"bank-1": recipients["bank-1"]})
    assert s.left_out == {}


def test_sealing_when_every_recipient_is_bad_does_not_raise_and_says_so():
    ks, cons, sealings = _sealing_with_a_bad_peer_key()
    s = sealings[0]
    recipients = {"bank-2": s.peers["bank-2"][0]}
    sealed = b"".join(s.seal(b"body", 0, recipients))
    assert len(s.left_out) == len(recipients)
    with pytest.raises(RemoteError, match="no_prekey"):
        open_sealed(sealed, sealings[2].own, seal_ad_for(cons, ks[0], 0))


def seal_ad_for(cons, key, round_):
    from gossip.seal import seal_ad

    return seal_ad(cons.id, bytes(key.verify_key), round_)


def test_a_checkpoint_with_a_bad_prekey_loads_and_drops_just_that_one():
    from gossip.seal import Sealing

    ks, cons, sealings = _sealing_with_a_bad_peer_key()
    saved = sealings[0].export_peers()  # bank-1 good, bank-2 zero (signed by bank-2)
    assert set(saved) == {"bank-1", "bank-2"}
    saved["bank-0"] = [[0, b"\x00garbage"]]  # and one that is not a prekey at all
    members = {m.public_key: m.name for m in cons.members}
    fresh = Sealing(cons.id, ks[0], members, rotate_every=2, lookahead=1)
    dropped = fresh.load_peers(saved, 0)
    assert set(dropped) == {"bank-2", "bank-0"}
    assert dropped["bank-2"].startswith("bad_prekey") and "low-order" in dropped["bank-2"]
    assert set(fresh.peers) == {"bank-1"} and fresh.peers["bank-1"][0].epoch == 0
    recipients, missing = fresh.recipients(0, ["bank-1", "bank-2"])
    assert set(recipients) == {"bank-1"} and missing == ["bank-2"]
    assert fresh.load_peers({"bank-9": [], "bank-1": "nonsense"}, 0) == {
        "bank-9": "not a member of this consortium", "bank-1": "saved prekeys are not a list"}

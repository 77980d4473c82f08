"""gossip.seal: shares sealed to the members' signed, rotated X25519 prekeys."""

from __future__ import annotations

import pytest
from nacl.bindings import crypto_sign_ed25519_sk_to_curve25519
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from gossip import envelope
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
    body = envelope.encode_share(tensors(0.123), 10.0)
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
    sealed = seal(envelope.encode_share(tensors(), 1.0), published, AD)
    data = envelope.pack(ks[0], cons.id, envelope.KIND_SEALED, 0, 0, sealed)
    env = envelope.decode_outer(data)
    assert env.body == sealed and env.digest == envelope.signing_digest(
        cons.id, bytes(ks[0].verify_key), "sealed", 0, 0, sealed)


def test_a_sender_cannot_give_members_different_keys_for_one_signed_ciphertext():
    """ChaCha20-Poly1305 does not commit to its key; the signed header does (kc)."""
    import msgpack
    import nacl.utils
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from nacl.public import PublicKey, SealedBox

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

"""Sealing shares for the members (encrypt-then-sign), sans-IO. Not wired into the node yet.

A share body is encrypted once with a fresh 32-byte key (NaCl SecretBox:
XSalsa20-Poly1305). That key is wrapped for each recipient member with a NaCl
SealedBox (an ephemeral X25519 key per wrap) to the recipient's current
*prekey*: an X25519 key pair the member generates at random (never derived
from its identity), publishes signed by its Ed25519 identity, rotates every K
rounds and deletes once the rounds it served are closed. A broker that
records traffic and later steals a member's identity key therefore holds no
key that opens it: the identity key only ever signed the prekey.

The sealed body replaces the plain share body inside the envelope, so the
envelope signature covers the ciphertext and the wraps; a receiver verifies
the signature (envelope.Verifier) before it opens anything here.

Sealed body (msgpack map, version 1)::

    {"v": 1,
     "nonce": bin 24,                    SecretBox nonce, random
     "ct": bin,                          SecretBox ciphertext of the share body (MAC 16 B)
     "keys": [[epoch (uint), prekey (bin 32), wrapped (bin 80)], ...]}   one per recipient

`wrapped` is SealedBox(prekey).encrypt(share key): 32 B ephemeral public key,
16 B MAC, 32 B key. A recipient finds its entry by its prekey's public key.

Signed prekey (msgpack array)::

    [member_key (bin 32), epoch (uint), x25519 (bin 32), sig (bin 64)]

`sig` is Ed25519 by member_key over PREKEY_TAG || consortium id || epoch (8 B
big-endian) || x25519.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import nacl.utils
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from gossip.errors import LocalError, RemoteError

SEAL_VERSION = 1
PREKEY_TAG = b"flnode/1 prekey-sig\x00"
KEY_BYTES = 32
WRAPPED_BYTES = 80  # SealedBox: 32 B ephemeral key + 16 B MAC + 32 B key
# One wrap per member; a consortium larger than this is not one we serve.
MAX_RECIPIENTS = 1024
MAX_EPOCH = 2**53


@dataclass(frozen=True)
class SignedPrekey:
    member_key: bytes  # Ed25519 identity public key
    epoch: int
    x25519: bytes
    sig: bytes

    def encode(self) -> bytes:
        return msgpack.packb([self.member_key, self.epoch, self.x25519, self.sig],
                             use_bin_type=True)


def _prekey_message(consortium_id: bytes, epoch: int, x25519: bytes) -> bytes:
    return PREKEY_TAG + consortium_id + epoch.to_bytes(8, "big") + x25519


def sign_prekey(identity: SigningKey, consortium_id: bytes, epoch: int,
                prekey: PublicKey) -> SignedPrekey:
    if not 0 <= epoch < MAX_EPOCH:
        raise LocalError(f"prekey epoch {epoch} out of range")
    raw = bytes(prekey)
    sig = identity.sign(_prekey_message(consortium_id, epoch, raw)).signature
    return SignedPrekey(bytes(identity.verify_key), epoch, raw, sig)


def verify_prekey(data: bytes, consortium_id: bytes, members: Mapping[bytes, str]) -> SignedPrekey:
    """Parse and check a member's signed prekey; RemoteError names the reason."""
    try:
        item = msgpack.unpackb(data, raw=False, max_bin_len=64, max_str_len=0, max_array_len=4,
                               max_map_len=0, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - parser boundary, re-raised as RemoteError
        raise RemoteError("bad_prekey", f"decode failed: {type(exc).__name__}") from None
    if not (isinstance(item, list) and len(item) == 4):
        raise RemoteError("bad_prekey", "expected [member_key, epoch, x25519, sig]")
    member_key, epoch, x25519, sig = item
    if not (isinstance(member_key, bytes) and len(member_key) == 32 and isinstance(x25519, bytes)
            and len(x25519) == 32 and isinstance(sig, bytes) and len(sig) == 64
            and type(epoch) is int and 0 <= epoch < MAX_EPOCH):
        raise RemoteError("bad_prekey", "field sizes or types are wrong")
    name = members.get(member_key)
    if name is None:
        raise RemoteError("non_member", "prekey signed by a key that is not a member's")
    try:
        VerifyKey(member_key).verify(_prekey_message(consortium_id, epoch, x25519), sig)
    except BadSignatureError:
        raise RemoteError("bad_signature", "prekey signature does not verify", name) from None
    return SignedPrekey(member_key, epoch, x25519, sig)


@dataclass
class PrekeyStore:
    """A member's own prekeys by epoch. `forget` deletes the private halves.

    Python cannot promise the old bytes are wiped from memory; what it
    promises is that no reference is kept and nothing is written to disk.
    """

    keys: dict[int, PrivateKey] = field(default_factory=dict)

    def rotate(self, epoch: int) -> PrivateKey:
        if epoch in self.keys:
            raise LocalError(f"prekey epoch {epoch} already exists")
        self.keys[epoch] = PrivateKey.generate()
        return self.keys[epoch]

    def forget(self, before_epoch: int) -> None:
        for epoch in [e for e in self.keys if e < before_epoch]:
            del self.keys[epoch]


def epoch_of(round_: int, rotate_every: int) -> int:
    """Prekeys rotate every `rotate_every` rounds."""
    if rotate_every < 1:
        raise LocalError("prekey rotation period must be at least 1 round")
    return round_ // rotate_every


def seal(body: bytes, recipients: Mapping[str, SignedPrekey]) -> bytes:
    """Encrypt `body` once and wrap its key for every recipient's (verified) prekey."""
    if not recipients:
        raise LocalError("no recipients to seal for")
    key = nacl.utils.random(KEY_BYTES)
    nonce = nacl.utils.random(SecretBox.NONCE_SIZE)
    ct = SecretBox(key).encrypt(body, nonce).ciphertext
    wraps = [[p.epoch, p.x25519, SealedBox(PublicKey(p.x25519)).encrypt(key)]
             for _, p in sorted(recipients.items())]
    return msgpack.packb({"v": SEAL_VERSION, "nonce": nonce, "ct": ct, "keys": wraps},
                         use_bin_type=True)


def open_sealed(data: bytes, store: PrekeyStore, sender: str | None = None) -> bytes:
    """Decrypt a sealed body with one of our prekeys. Verify the envelope first."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data),
                              max_str_len=8, max_array_len=MAX_RECIPIENTS, max_map_len=4,
                              max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - parser boundary, re-raised as RemoteError
        raise RemoteError("bad_seal", f"decode failed: {type(exc).__name__}", sender) from None
    if not (isinstance(doc, dict) and set(doc) == {"v", "nonce", "ct", "keys"}
            and doc["v"] == SEAL_VERSION and isinstance(doc["nonce"], bytes)
            and len(doc["nonce"]) == SecretBox.NONCE_SIZE and isinstance(doc["ct"], bytes)
            and isinstance(doc["keys"], list)):
        raise RemoteError("bad_seal", "not a version 1 sealed body", sender)
    ours = {bytes(k.public_key): k for k in store.keys.values()}
    for wrap in doc["keys"]:
        if not (isinstance(wrap, list) and len(wrap) == 3 and isinstance(wrap[1], bytes)
                and isinstance(wrap[2], bytes) and len(wrap[2]) == WRAPPED_BYTES):
            raise RemoteError("bad_seal", "malformed key wrap", sender)
        private = ours.get(wrap[1])
        if private is None:
            continue
        try:
            key = SealedBox(private).decrypt(wrap[2])
            return SecretBox(key).decrypt(doc["ct"], doc["nonce"])
        except CryptoError:
            raise RemoteError("bad_seal", "decryption failed", sender) from None
    raise RemoteError("no_prekey", "sealed for none of our current prekeys (rotated away, or "
                      "not addressed to us)", sender)


__all__ = ["PrekeyStore", "SignedPrekey", "epoch_of", "open_sealed", "seal", "sign_prekey",
           "verify_prekey"]

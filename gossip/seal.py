"""Sealing shares for the members (encrypt-then-sign), sans-IO.

A share body is encrypted once with a fresh 32-byte key: ChaCha20-Poly1305
(RFC 8439; OpenSSL through `cryptography`, which py-libp2p's Noise already
pulls in). Not NaCl's SecretBox: on 50 MB here SecretBox takes 0.12 s each
way and libsodium's XChaCha20-Poly1305 0.075 s, where OpenSSL's
ChaCha20-Poly1305 takes 0.03 s and decrypts from a memoryview without a
copy; sealing would otherwise cost a node 25-40 % of its MQTT throughput. The
key is fresh per share, so the 96-bit random nonce never repeats under a key.
The associated data binds the ciphertext to the consortium, the sender and
the round, so it cannot be lifted into another envelope. The key is wrapped
for each recipient member with a NaCl SealedBox
(an ephemeral X25519 key per wrap) to the recipient's *prekey* for the
share's epoch: an X25519 key pair the member generates at random (never
derived from its identity), publishes signed by its Ed25519 identity, rotates
every K rounds and deletes as soon as the rounds it served are closed. A
broker that records traffic and later steals a member's identity key holds
no key that opens it: the identity key only ever signed the prekey.

The sealed body replaces the plain share body inside the envelope (kind
"sealed"), so the envelope signature covers the ciphertext and the wraps; a
receiver verifies the signature (envelope.Verifier) before it opens anything.

Sealed body, version 1: a length-prefixed msgpack header, then the raw
ciphertext (so a receiver decrypts it in place, and a sender never copies it
into a container)::

    header length (4 B big-endian) || header || ciphertext

    header = {"v": 1,
              "nonce": bin 12,                                   AEAD nonce, random
              "kc": bin 32,      BLAKE2b-256(K, person="flnode-share-key"): commits to the key
              "keys": [[epoch (uint), prekey (bin 32), wrapped (bin 80)], ...]}  one per recipient
    ciphertext = ChaCha20-Poly1305(key, nonce, share body, AD) (share body + 16 B tag)
    AD = SEAL_AD_TAG || consortium id (32) || sender key (32) || round (8 B big-endian)

`wrapped` is SealedBox(prekey).encrypt(share key): 32 B ephemeral public key,
16 B MAC, 32 B key. A recipient finds its entry by its prekey's public key.

Signed prekey (msgpack array)::

    [member_key (bin 32), epoch (uint), x25519 (bin 32), sig (bin 64)]

`sig` is Ed25519 by member_key over PREKEY_TAG || consortium id || epoch (8 B
big-endian) || x25519. A prekey announcement (envelope kind "prekey") has as
body a msgpack map ``{"hello": bool, "prekeys": [bin, ...]}`` with up to
MAX_ANNOUNCED signed prekeys: the member's current epoch and the next ones.
`hello` is set on the announcement a member sends when it starts: every
member that receives it (new, not a duplicate) answers with its own current
announcement (hello unset), so a member that joins late or restarts learns
the others' prekeys without the transport having to keep anything.

Epochs: round r is in epoch r // K. A member at round r holds private keys
for epochs epoch(r) .. epoch(r) + ahead, where ahead = ceil(lookahead / K),
so a sender up to `lookahead` rounds ahead finds a prekey for its own round;
keys for epochs before epoch(r) are deleted when the member enters a new
epoch, because every share for those rounds is stale by then.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from gossip.errors import LocalError, RemoteError

SEAL_VERSION = 1
PREKEY_TAG = b"flnode/1 prekey-sig\x00"
SEAL_AD_TAG = b"flnode/1 sealed-share\x00"
KEY_BYTES = 32
NONCE_BYTES = 12
KC_BYTES = 32
HEADER_LEN_BYTES = 4
# One wrap is ~125 B of msgpack; this bounds the header of MAX_RECIPIENTS wraps.
MAX_HEADER_BYTES = 256 * 1024
# Live prekeys in one announcement: the current epoch and the ones ahead.
MAX_ANNOUNCED = 8
# A member's newest epochs we keep (theirs may run ahead of ours).
KEEP_EPOCHS = 2 * MAX_ANNOUNCED
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


def key_commitment(key: bytes) -> bytes:
    """ChaCha20-Poly1305 does not commit to its key: a malicious sender could wrap
    different keys for different members so that one signed ciphertext opens to
    different shares. The signed header carries this hash of the one key, and a
    receiver refuses a key that does not match it."""
    return hashlib.blake2b(key, digest_size=KC_BYTES, person=b"flnode-share-key").digest()


def seal_ad(consortium_id: bytes, sender: bytes, round_: int) -> bytes:
    """What the ciphertext is bound to besides its key."""
    return SEAL_AD_TAG + consortium_id + sender + round_.to_bytes(8, "big")


def seal(body: bytes, recipients: Mapping[str, SignedPrekey], ad: bytes) -> tuple[bytes, bytes]:
    """Encrypt `body` once and wrap its key for every recipient's (verified) prekey.

    Returns the sealed body in two parts (length + header, ciphertext): join them,
    or hand both to `envelope.pack`, which writes them out without joining first."""
    if not recipients:
        raise LocalError("no recipients to seal for")
    key = nacl.utils.random(KEY_BYTES)
    nonce = nacl.utils.random(NONCE_BYTES)
    ct = ChaCha20Poly1305(key).encrypt(nonce, body, ad)
    wraps = [[p.epoch, p.x25519, SealedBox(PublicKey(p.x25519)).encrypt(key)]
             for _, p in sorted(recipients.items())]
    header = msgpack.packb({"v": SEAL_VERSION, "nonce": nonce, "kc": key_commitment(key),
                            "keys": wraps}, use_bin_type=True)
    return len(header).to_bytes(HEADER_LEN_BYTES, "big") + header, ct


def open_sealed(data: bytes, store: PrekeyStore, ad: bytes, sender: str | None = None) -> bytes:
    """Decrypt a sealed body with one of our prekeys. Verify the envelope first."""
    view = memoryview(data)
    n = int.from_bytes(view[:HEADER_LEN_BYTES], "big")
    if len(view) < HEADER_LEN_BYTES or not 0 < n <= min(MAX_HEADER_BYTES,
                                                         len(view) - HEADER_LEN_BYTES):
        raise RemoteError("bad_seal", "header length prefix out of range", sender)
    try:
        doc = msgpack.unpackb(view[HEADER_LEN_BYTES:HEADER_LEN_BYTES + n], raw=False,
                              strict_map_key=True, max_bin_len=WRAPPED_BYTES, max_str_len=8,
                              max_array_len=MAX_RECIPIENTS, max_map_len=4, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - parser boundary, re-raised as RemoteError
        raise RemoteError("bad_seal", f"header decode failed: {type(exc).__name__}",
                          sender) from None
    if not (isinstance(doc, dict) and set(doc) == {"v", "nonce", "kc", "keys"}
            and type(doc["v"]) is int and doc["v"] == SEAL_VERSION
            and isinstance(doc["nonce"], bytes) and len(doc["nonce"]) == NONCE_BYTES
            and isinstance(doc["kc"], bytes) and len(doc["kc"]) == KC_BYTES
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
            if not hmac.compare_digest(key_commitment(key), doc["kc"]):
                raise RemoteError("bad_seal", "the share key does not match the signed key "
                                  "commitment (different keys for different members)", sender)
            return ChaCha20Poly1305(key).decrypt(doc["nonce"], view[HEADER_LEN_BYTES + n:], ad)
        except (CryptoError, InvalidTag):
            raise RemoteError("bad_seal", "decryption failed (tampered, or lifted from another "
                              "sender's or round's envelope)", sender) from None
    raise RemoteError("no_prekey", "sealed for none of our current prekeys (rotated away, or "
                      "not addressed to us)", sender)


# --- prekey announcements ---------------------------------------------------------

def encode_announcement(prekeys: Sequence[SignedPrekey], hello: bool) -> bytes:
    if not 0 < len(prekeys) <= MAX_ANNOUNCED:
        raise LocalError(f"a prekey announcement holds 1..{MAX_ANNOUNCED} prekeys")
    return msgpack.packb({"hello": hello, "prekeys": [p.encode() for p in prekeys]},
                         use_bin_type=True)


def decode_announcement(body: bytes, consortium_id: bytes, sender_key: bytes,
                        members: Mapping[bytes, str]) -> tuple[list[SignedPrekey], bool]:
    """The verified prekeys of an announcement (each must be signed by `sender_key`) and
    whether the sender asks for ours (`hello`: it has just started)."""
    name = members.get(sender_key)
    try:
        doc = msgpack.unpackb(body, raw=False, max_bin_len=256, max_str_len=8,
                              max_array_len=MAX_ANNOUNCED, max_map_len=2, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - parser boundary, re-raised as RemoteError
        raise RemoteError("bad_prekey", f"announcement decode failed: {type(exc).__name__}",
                          name) from None
    items = doc.get("prekeys") if isinstance(doc, dict) else None
    if not (isinstance(doc, dict) and set(doc) == {"hello", "prekeys"}
            and type(doc["hello"]) is bool and isinstance(items, list) and items
            and all(isinstance(i, bytes) for i in items)):
        raise RemoteError("bad_prekey", "expected {hello: bool, prekeys: [1.."
                          f"{MAX_ANNOUNCED} signed prekeys]}}", name)
    out = []
    for item in items:
        try:
            prekey = verify_prekey(item, consortium_id, members)
        except RemoteError as exc:
            raise RemoteError(exc.reason, exc.detail, name) from None
        if prekey.member_key != sender_key:
            raise RemoteError("bad_prekey", "announcement carries another member's prekey", name)
        out.append(prekey)
    if len({p.epoch for p in out}) != len(out):
        raise RemoteError("bad_prekey", "two prekeys for one epoch in one announcement", name)
    return out, doc["hello"]


class Sealing:
    """One member's sealing state: its own prekeys and the ones the members announced.

    Pure state. The node persists `own` (private keys, 0600) and deletes the
    files of what `rotate` forgets; it sends `announcement()` when `rotate`
    reports a change.
    """

    def __init__(self, consortium_id: bytes, identity: SigningKey, members: Mapping[bytes, str],
                 rotate_every: int, lookahead: int) -> None:
        if rotate_every < 1:
            raise LocalError("prekey rotation period must be at least 1 round")
        self.consortium_id = consortium_id
        self.identity = identity
        self.own_key = bytes(identity.verify_key)
        self.members = dict(members)
        self.rotate_every = rotate_every
        self.ahead = -(-lookahead // rotate_every)  # ceil
        if self.ahead + 1 > MAX_ANNOUNCED:
            raise LocalError(f"lookahead {lookahead} needs {self.ahead + 1} live prekeys at a "
                             f"rotation period of {rotate_every} rounds; at most "
                             f"{MAX_ANNOUNCED}: rotate less often")
        self.own = PrekeyStore()
        self.peers: dict[str, dict[int, SignedPrekey]] = {}
        self._learned_seq: dict[tuple[str, int], int] = {}  # (member, epoch) -> seq it came in

    def epoch(self, round_: int) -> int:
        return epoch_of(round_, self.rotate_every)

    def rotate(self, round_: int) -> tuple[list[int], list[int]]:
        """Hold keys for the epochs a share for round_..round_+lookahead may use; forget
        older ones. Returns (new epochs, forgotten epochs)."""
        first = self.epoch(round_)
        wanted = range(first, first + self.ahead + 1)
        new = [e for e in wanted if e not in self.own.keys]
        for e in new:
            self.own.rotate(e)
        gone = sorted(e for e in self.own.keys if e < first)
        self.own.forget(first)
        for name in self.peers:
            self._prune(name, first)
        return new, gone

    def announcement(self, hello: bool = False) -> bytes:
        return encode_announcement([
            sign_prekey(self.identity, self.consortium_id, e, k.public_key)
            for e, k in sorted(self.own.keys.items())], hello)

    def learn(self, name: str, prekeys: Sequence[SignedPrekey], round_: int, seq: int) -> None:
        """File a member's announced prekeys (from an envelope with sequence number `seq`).

        A prekey from an older message never replaces one from a newer message (a
        replayed announcement of a member that had to make new keys cannot bring the
        old ones back); epochs that are over are dropped, and at most KEEP_EPOCHS of
        a member's newest epochs are kept (a member announcing ever more future epochs
        only pushes out its own)."""
        known = self.peers.setdefault(name, {})
        for p in prekeys:
            if self._learned_seq.get((name, p.epoch), -1) <= seq:
                known[p.epoch] = p
                self._learned_seq[name, p.epoch] = seq
        self._prune(name, self.epoch(round_))

    def _prune(self, name: str, floor: int) -> None:
        """Keep a member's prekeys for epochs from `floor` on, the KEEP_EPOCHS newest."""
        known = self.peers[name]
        keep = sorted((e for e in known if e >= floor), reverse=True)[:KEEP_EPOCHS]
        for e in set(known) - set(keep):
            del known[e]
            self._learned_seq.pop((name, e), None)

    def export_peers(self) -> dict[str, list[list[object]]]:
        """The members' prekeys we hold (public, signed), for a checkpoint."""
        return {name: [[self._learned_seq.get((name, e), 0), p.encode()]
                       for e, p in sorted(known.items())]
                for name, known in self.peers.items() if known}

    def load_peers(self, saved: Mapping[str, Sequence[Sequence[object]]], round_: int) -> None:
        """Learn again what `export_peers` saved; each prekey's signature is checked anew."""
        for name, items in saved.items():
            for seq, encoded in items:
                if not (type(seq) is int and isinstance(encoded, bytes)):
                    raise ValueError(f"saved prekey of {name!r} is not [seq, bytes]")
                prekey = verify_prekey(encoded, self.consortium_id, self.members)
                if self.members.get(prekey.member_key) == name:
                    self.learn(name, [prekey], round_, seq)

    def recipients(self, round_: int, names: Sequence[str]) -> tuple[dict[str, SignedPrekey],
                                                                      list[str]]:
        """The prekeys to seal a round-`round_` share with, and who has none yet."""
        e = self.epoch(round_)
        have = {n: self.peers[n][e] for n in names if e in self.peers.get(n, {})}
        return have, sorted(set(names) - set(have))

    def seal(self, body: bytes, round_: int, recipients: Mapping[str, SignedPrekey]
             ) -> tuple[bytes, bytes]:
        return seal(body, recipients, seal_ad(self.consortium_id, self.own_key, round_))

    def open(self, body: bytes, sender_key: bytes, round_: int, name: str) -> bytes:
        return open_sealed(body, self.own, seal_ad(self.consortium_id, sender_key, round_), name)


__all__ = ["PrekeyStore", "Sealing", "SignedPrekey", "decode_announcement", "encode_announcement",
           "epoch_of", "open_sealed", "seal", "seal_ad", "sign_prekey", "verify_prekey"]

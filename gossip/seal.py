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

Keys that cannot hurt: `verify_prekey` refuses (`bad_prekey`) an X25519 key
that is not the canonical encoding (top bit set, or u >= 2^255 - 19) or is
one of the small-order points, even when a member signed it: libsodium
refuses to seal to those, and sealing for one must not take a node down.
`Sealing.seal` leaves out any recipient it cannot seal for (`left_out`), and
`Sealing.load_peers` drops a saved prekey that no longer verifies instead of
refusing the whole checkpoint. Every parser here reads field by field
(gossip.wire), as the envelope does.

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

from gossip.errors import LocalError, RemoteError, describe, shorten
from gossip.wire import Reader, WireError

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
# A signed prekey is ~140 B of msgpack; an announcement item larger than this is not one.
MAX_SIGNED_PREKEY_BYTES = 256

# X25519 public keys a peer may not give us (RFC 7748 §6.1 leaves the check to the
# caller). A u-coordinate of a point of small order makes every shared secret one of
# a few values; libsodium refuses to seal to one (crypto_box_seal raises), so a member
# announcing one would crash every sealing node. The five canonical small-order
# u-coordinates (libsodium's `has_small_order` list: 0, 1, the two of order 8, p-1);
# every other encoding of them is non-canonical (u >= p, or the top bit set) and is
# refused as such, which covers the usual list of 12 low-order encodings.
X25519_P = 2**255 - 19
_ORDER_8 = ("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")
LOW_ORDER_U = frozenset({0, 1, X25519_P - 1,
                         *(int.from_bytes(bytes.fromhex(h), "little") for h in _ORDER_8)})


def x25519_problem(raw: bytes) -> str | None:
    """Why `raw` is not an X25519 public key we seal to, or None if it is fine:
    32 bytes, the canonical encoding (top bit clear, u < p) of a point not of small
    order."""
    if len(raw) != KEY_BYTES:
        return f"an X25519 key is {KEY_BYTES} bytes, not {len(raw)}"
    u = int.from_bytes(raw, "little")
    if u >> 255:
        return "non-canonical X25519 key (top bit set)"
    if u >= X25519_P:
        return "non-canonical X25519 key (u >= 2^255 - 19)"
    if u in LOW_ORDER_U:
        return "low-order X25519 key (every shared secret would be predictable)"
    return None


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


def verify_prekey(data: bytes | memoryview, consortium_id: bytes,
                  members: Mapping[bytes, str]) -> SignedPrekey:
    """Parse and check a member's signed prekey; RemoteError names the reason.

    Read field by field (gossip.wire); a low-order or non-canonical X25519 key is
    `bad_prekey` even when a member signed it."""
    try:
        r = Reader(data)
        if r.array_header() != 4:
            raise RemoteError("bad_prekey", "expected [member_key, epoch, x25519, sig]")
        member_key = bytes(r.bin(exact=32))
        epoch = r.uint(MAX_EPOCH)
        x25519 = bytes(r.bin(exact=KEY_BYTES))
        sig = bytes(r.bin(exact=64))
        r.done()
    except WireError as exc:
        raise RemoteError("bad_prekey", f"expected [member_key (bin 32), epoch (uint), "
                          f"x25519 (bin 32), sig (bin 64)]: {exc}") from None
    name = members.get(member_key)
    if name is None:
        raise RemoteError("non_member", "prekey signed by a key that is not a member's")
    try:
        VerifyKey(member_key).verify(_prekey_message(consortium_id, epoch, x25519), sig)
    except BadSignatureError:
        raise RemoteError("bad_signature", "prekey signature does not verify", name) from None
    problem = x25519_problem(x25519)
    if problem is not None:
        raise RemoteError("bad_prekey", f"epoch {epoch}: {problem}", name)
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


def seal(body: bytes, recipients: Mapping[str, SignedPrekey], ad: bytes,
         left_out: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """Encrypt `body` once and wrap its key for every recipient's (verified) prekey.

    Returns the sealed body in two parts (length + header, ciphertext): join them,
    or hand both to `envelope.pack`, which writes them out without joining first.

    A recipient whose key cannot be sealed to (a low-order or malformed key that got
    past verification, or anything libsodium refuses) is left out: with `left_out`
    given, its name and the reason are put there and the others are sealed for (if
    all are left out, the body opens for nobody); without it, LocalError."""
    if not recipients:
        raise LocalError("no recipients to seal for")
    key = nacl.utils.random(KEY_BYTES)
    nonce = nacl.utils.random(NONCE_BYTES)
    wraps = []
    for name, p in sorted(recipients.items()):
        problem = x25519_problem(p.x25519)
        if problem is None:
            try:
                wraps.append([p.epoch, p.x25519, SealedBox(PublicKey(p.x25519)).encrypt(key)])
                continue
            except Exception as exc:  # noqa: BLE001 - one recipient must not stop the others
                problem = f"sealing failed: {describe(exc)}"
        if left_out is None:
            raise LocalError(f"cannot seal for {name}: {problem}")
        left_out[name] = problem
    ct = ChaCha20Poly1305(key).encrypt(nonce, body, ad)
    header = msgpack.packb({"v": SEAL_VERSION, "nonce": nonce, "kc": key_commitment(key),
                            "keys": wraps}, use_bin_type=True)
    return len(header).to_bytes(HEADER_LEN_BYTES, "big") + header, ct


def _read_header(view: memoryview, ours: Mapping[bytes, PrivateKey],
                 prekeys: list[bytes] | None = None
                 ) -> tuple[bytes, bytes, tuple[PrivateKey, bytes] | None]:
    """(nonce, kc, (our private key, its wrap) or None) of a sealed body's header, read
    field by field: every field's type and size is checked before it is taken. With
    `prekeys` given, every wrap's prekey is appended to it (in header order)."""
    r = Reader(view)
    if r.map_header() != 4:
        raise WireError("not a map of 4")
    fields: dict[str, object] = {}
    mine = None
    for _ in range(4):
        key = r.str(8)
        if key in fields:
            raise WireError("a key twice")
        if key == "v":
            fields[key] = r.int()
        elif key == "nonce":
            fields[key] = bytes(r.bin(exact=NONCE_BYTES))
        elif key == "kc":
            fields[key] = bytes(r.bin(exact=KC_BYTES))
        elif key == "keys":
            count = r.array_header()
            if count > MAX_RECIPIENTS:
                raise WireError(f"more than {MAX_RECIPIENTS} key wraps")
            for _ in range(count):
                if r.array_header() != 3:
                    raise WireError("a key wrap is not [epoch, prekey, wrapped]")
                r.uint(MAX_EPOCH)
                prekey = r.bin(exact=KEY_BYTES)
                wrapped = r.bin(exact=WRAPPED_BYTES)
                if prekeys is not None:
                    prekeys.append(bytes(prekey))
                if mine is None:
                    private = ours.get(bytes(prekey))
                    if private is not None:
                        mine = (private, bytes(wrapped))
            fields[key] = True
        else:
            raise WireError("an unknown key")
    r.done()
    if fields["v"] != SEAL_VERSION:
        raise WireError(f"version {shorten(fields['v'])}")
    return fields["nonce"], fields["kc"], mine  # type: ignore[return-value]


def open_sealed(data: bytes | memoryview, store: PrekeyStore, ad: bytes,
                sender: str | None = None) -> bytes:
    """Decrypt a sealed body with one of our prekeys. Verify the envelope first."""
    view = memoryview(data)
    n = int.from_bytes(view[:HEADER_LEN_BYTES], "big")
    if len(view) < HEADER_LEN_BYTES or not 0 < n <= min(MAX_HEADER_BYTES,
                                                         len(view) - HEADER_LEN_BYTES):
        raise RemoteError("bad_seal", "header length prefix out of range", sender)
    ours = {bytes(k.public_key): k for k in store.keys.values()}
    try:
        nonce, kc, mine = _read_header(view[HEADER_LEN_BYTES:HEADER_LEN_BYTES + n], ours)
    except WireError as exc:
        raise RemoteError("bad_seal", f"not a version 1 sealed body: {exc}", sender) from None
    if mine is None:
        raise RemoteError("no_prekey", "sealed for none of our current prekeys (rotated away, "
                          "or not addressed to us)", sender)
    private, wrapped = mine
    try:
        key = SealedBox(private).decrypt(wrapped)
        if not hmac.compare_digest(key_commitment(key), kc):
            raise RemoteError("bad_seal", "the share key does not match the signed key "
                              "commitment (different keys for different members)", sender)
        return ChaCha20Poly1305(key).decrypt(nonce, view[HEADER_LEN_BYTES + n:], ad)
    except (CryptoError, InvalidTag):
        raise RemoteError("bad_seal", "decryption failed (tampered, or lifted from another "
                          "sender's or round's envelope)", sender) from None


# --- prekey announcements ---------------------------------------------------------

def encode_announcement(prekeys: Sequence[SignedPrekey], hello: bool) -> bytes:
    if not 0 < len(prekeys) <= MAX_ANNOUNCED:
        raise LocalError(f"a prekey announcement holds 1..{MAX_ANNOUNCED} prekeys")
    return msgpack.packb({"hello": hello, "prekeys": [p.encode() for p in prekeys]},
                         use_bin_type=True)


def decode_announcement(body: bytes | memoryview, consortium_id: bytes, sender_key: bytes,
                        members: Mapping[bytes, str]) -> tuple[list[SignedPrekey], bool]:
    """The verified prekeys of an announcement (each must be signed by `sender_key`) and
    whether the sender asks for ours (`hello`: it has just started). Read field by field
    (gossip.wire): nothing is built for a field before its type and size are checked."""
    name = members.get(sender_key)
    hello: bool | None = None
    items: list[memoryview] | None = None
    try:
        r = Reader(body)
        if r.map_header() != 2:
            raise WireError("not a map of 2")
        for _ in range(2):
            key = r.str(8)
            if key == "hello" and hello is None:
                hello = r.bool()
            elif key == "prekeys" and items is None:
                count = r.array_header()
                if not 0 < count <= MAX_ANNOUNCED:
                    raise WireError(f"{count} prekeys")
                items = [r.bin(max_len=MAX_SIGNED_PREKEY_BYTES) for _ in range(count)]
            else:
                raise WireError("unexpected key")
        r.done()
    except WireError as exc:
        raise RemoteError("bad_prekey", "expected {hello: bool, prekeys: [1.."
                          f"{MAX_ANNOUNCED} signed prekeys]}}: {exc}", name) from None
    assert hello is not None and items is not None
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
    return out, hello


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
        # Who the last `seal` call left out and why (member name -> reason); empty if it
        # sealed for every recipient it was given.
        self.left_out: dict[str, str] = {}

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

    def load_peers(self, saved: Mapping[str, Sequence[Sequence[object]]], round_: int
                   ) -> dict[str, str]:
        """Learn again what `export_peers` saved; each prekey is checked anew (signature,
        and a key we can seal to: not low-order, canonical).

        A saved prekey that fails is dropped, not the whole load: returns, per member
        with at least one dropped prekey, why (member name -> reason). The caller
        warns, and asks that member for a fresh announcement (our hello does).
        Raises ValueError only if `saved` is not a mapping at all."""
        if not isinstance(saved, Mapping):
            raise ValueError("saved prekeys are not a mapping of member -> [[seq, bytes], ...]")
        dropped: dict[str, str] = {}
        names = set(self.members.values())
        for name, items in saved.items():
            label = name if isinstance(name, str) else shorten(name)
            if label not in names:
                dropped[label] = "not a member of this consortium"
                continue
            if not isinstance(items, list | tuple):
                dropped[label] = "saved prekeys are not a list"
                continue
            for item in items:
                try:
                    seq, encoded = item
                    if not (type(seq) is int and isinstance(encoded, bytes)):
                        raise ValueError
                except (TypeError, ValueError):
                    dropped[label] = "a saved prekey is not [seq, bytes]"
                    continue
                try:
                    prekey = verify_prekey(encoded, self.consortium_id, self.members)
                except RemoteError as exc:
                    dropped[label] = f"{exc.reason}: {exc.detail}"
                    continue
                if self.members.get(prekey.member_key) != name:
                    dropped[label] = "a saved prekey is signed by another member"
                    continue
                self.learn(name, [prekey], round_, seq)
        return dropped

    def recipients(self, round_: int, names: Sequence[str]) -> tuple[dict[str, SignedPrekey],
                                                                      list[str]]:
        """The prekeys to seal a round-`round_` share with, and who has none yet."""
        e = self.epoch(round_)
        have = {n: self.peers[n][e] for n in names if e in self.peers.get(n, {})}
        return have, sorted(set(names) - set(have))

    def seal(self, body: bytes, round_: int, recipients: Mapping[str, SignedPrekey]
             ) -> tuple[bytes, bytes]:
        """Seal a round-`round_` share body for `recipients` (from `recipients()`).

        Never raises because of one recipient: a member whose prekey cannot be sealed
        to is left out, its prekey for that epoch is forgotten (so `recipients()`
        reports it as missing until it announces again), and `self.left_out` says who
        and why (member name -> reason; empty when everyone was sealed for). If every
        recipient is left out, the body opens for nobody: check
        `len(self.left_out) == len(recipients)` before sending it."""
        self.left_out = {}
        parts = seal(body, recipients, seal_ad(self.consortium_id, self.own_key, round_),
                     self.left_out)
        for name in self.left_out:
            bad = recipients[name]
            known = self.peers.get(name, {})
            if known.get(bad.epoch) == bad:
                del known[bad.epoch]
                self._learned_seq.pop((name, bad.epoch), None)
        return parts

    def open(self, body: bytes, sender_key: bytes, round_: int, name: str) -> bytes:
        return open_sealed(body, self.own, seal_ad(self.consortium_id, sender_key, round_), name)

    def open_deal(self, body: bytes, sender_key: bytes, round_: int, name: str) -> bytes:
        """A deal sealed to us alone: exactly one wrap, to one of our prekeys (`bad_seal`,
        naming the dealer, otherwise), then opened as `open`."""
        sole = sole_recipient(body, name)
        if not any(bytes(k.public_key) == sole for k in self.own.keys.values()):
            raise RemoteError("no_prekey", "a deal sealed to none of our current prekeys "
                              "(rotated away, or not addressed to us)", name)
        return self.open(body, sender_key, round_, name)


# --- revealing one sealed body (issue 22: a dispute settled by the dealer-signed piece) ---
# The key of a sealed body is fresh per message and committed to in the signed header
# ("kc"), so a recipient can hand it to everyone: it opens that one body, no other, and
# nobody can substitute another key (the commitment) or another body (the signature).

def _header(view: memoryview, ours: Mapping[bytes, PrivateKey], sender: str | None,
            prekeys: list[bytes] | None = None
            ) -> tuple[bytes, bytes, tuple[PrivateKey, bytes] | None, int]:
    n = int.from_bytes(view[:HEADER_LEN_BYTES], "big")
    if len(view) < HEADER_LEN_BYTES or not 0 < n <= min(MAX_HEADER_BYTES,
                                                         len(view) - HEADER_LEN_BYTES):
        raise RemoteError("bad_seal", "header length prefix out of range", sender)
    try:
        nonce, kc, mine = _read_header(view[HEADER_LEN_BYTES:HEADER_LEN_BYTES + n], ours, prekeys)
    except WireError as exc:
        raise RemoteError("bad_seal", f"not a version 1 sealed body: {exc}", sender) from None
    return nonce, kc, mine, n


def sole_recipient(data: bytes | memoryview, sender: str | None = None) -> bytes:
    """The prekey (X25519) a sealed body is wrapped to when it has exactly one wrap: a deal
    is one holder's, so its header names that holder's prekey and no other (review 2 F7:
    dummy wraps would make the holder's reveal outgrow its bound; F2: a deal revealed by
    another member than the one it was sealed to). Else `bad_seal`, the sealer's fault."""
    prekeys: list[bytes] = []
    _header(memoryview(data), {}, sender, prekeys)
    if len(prekeys) != 1:
        raise RemoteError("bad_seal", f"a deal sealed with {len(prekeys)} key wraps: a deal "
                          "is sealed to its one holder only", sender)
    return prekeys[0]


def share_key(data: bytes | memoryview, store: PrekeyStore, sender: str | None = None) -> bytes:
    """The key of a sealed body addressed to us, checked against its signed commitment."""
    view = memoryview(data)
    _, kc, mine, _ = _header(view, {bytes(k.public_key): k for k in store.keys.values()}, sender)
    if mine is None:
        raise RemoteError("no_prekey", "sealed for none of our current prekeys", sender)
    try:
        key = SealedBox(mine[0]).decrypt(mine[1])
    except CryptoError:
        raise RemoteError("bad_seal", "the key wrap does not open", sender) from None
    if not hmac.compare_digest(key_commitment(key), kc):
        raise RemoteError("bad_seal", "the share key does not match the signed key "
                          "commitment", sender)
    return key


def open_with_key(data: bytes | memoryview, key: bytes, ad: bytes,
                  sender: str | None = None) -> bytes:
    """A sealed body opened with a revealed key (`share_key`): the key must match the
    body's signed commitment. Verify the envelope's signature first."""
    view = memoryview(data)
    nonce, kc, _, n = _header(view, {}, sender)
    if len(key) != KEY_BYTES or not hmac.compare_digest(key_commitment(key), kc):
        raise RemoteError("bad_seal", "the revealed key is not the one the sealed body "
                          "commits to", sender)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, view[HEADER_LEN_BYTES + n:], ad)
    except InvalidTag:
        raise RemoteError("bad_seal", "decryption with the revealed key failed", sender) from None


__all__ = ["PrekeyStore", "Sealing", "SignedPrekey", "decode_announcement", "encode_announcement",
           "epoch_of", "open_sealed", "open_with_key", "seal", "seal_ad", "share_key", "sign_prekey",
           "sole_recipient",
           "verify_prekey"]

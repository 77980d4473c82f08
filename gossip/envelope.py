"""Wire format version 1: pack, sign, verify, unpack. The only parser of peer bytes.

Sans-IO (in the manner of h11): bytes in, an `Accepted` share or a
`RemoteError` out; no sockets, no clocks, no files. Every transport and the
in-memory simulation run the same code, and a property test can throw
arbitrary byte strings at it.

Outer envelope, a msgpack array of 8 items::

    ["flnode/1", consortium_id (bin 32), sender_pk (bin 32), kind (str),
     round (uint), seq (uint), body (bin), sig (bin 64)]

`sig` is Ed25519 over BLAKE2b-256(SIG_TAG || msgpack(header) || body), where
header is the first six fields plus len(body). Hashing first makes the costly
pass over a large body one BLAKE2b pass instead of Ed25519's two SHA-512
passes (measured: signing a 10 MB body directly is ~80 % of pack+verify).

Kinds: "share" (plain share body), "sealed" (a sealed share body, see
gossip/seal.py), "prekey" (signed X25519 prekeys, see gossip/seal.py),
"retire" (empty body: the sender stops sharing).

Share body, a msgpack map::

    {"weight": float > 0, "tensors": [[name (str), dtype (str), shape ([uint]), raw (bin)], ...]}

Tensor bytes are raw little-endian; only the dtypes in `ALLOWED_DTYPES`.

Verification runs in this order and stops at the first failure, each with
its own counted reason: size cap (`too_large`) -> outer decode with limits
(`malformed`, `protocol`, `kind`) -> consortium id (`consortium`) -> member
(`non_member`, `from_self`) -> signature (`bad_signature`) -> freshness:
an identical copy of an accepted message (`duplicate`, benign), a sequence
number reused for other content (`seq_reuse`), a sequence number too old to
judge (`replay`), a round already closed (`stale`) -> body decode
(`bad_body`) -> shapes and dtypes (`shape`, `dtype`) -> finite values
(`non_finite`). A sealed share is opened (`gossip.seal`: `bad_seal`,
`no_prekey`) after the freshness checks and before the body decode; a
prekey announcement is checked prekey by prekey (`bad_prekey`). Nothing a
peer sends is unpickled, eval'd or used as a path.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gossip.errors import LocalError, RemoteError
from gossip.seal import Sealing, SignedPrekey, decode_announcement

PROTO = "flnode/1"
SIG_TAG = b"flnode/1 envelope-sig\x00"
KIND_SHARE = "share"
# A share body sealed to the members' prekeys (gossip.seal); round = the share's round.
KIND_SEALED = "sealed"
# The sender's signed X25519 prekeys (gossip.seal); round = the sender's round
# when it announced them, which also tells receivers it has left earlier rounds.
KIND_PREKEY = "prekey"
# "I stop sharing" (e.g. its privacy budget is spent): empty body; receivers
# stop waiting for the sender's shares.
KIND_RETIRE = "retire"
SHARE_KINDS = frozenset({KIND_SHARE, KIND_SEALED})
KINDS = frozenset({KIND_SHARE, KIND_SEALED, KIND_PREKEY, KIND_RETIRE})

# A 10 M-parameter fp32 model is 40 MB; 64 MiB leaves room for that plus
# framing. Transports apply their own (smaller or equal) caps before this.
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
# The outer array has exactly 8 items; strings in it are the protocol tag and
# the kind, both short. Limits are passed to msgpack so a hostile length
# prefix cannot make it allocate before we look.
OUTER_ITEMS = 8
MAX_OUTER_STR = 64
CONSORTIUM_ID_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# Rounds and sequence numbers are uints; 2**53 keeps them exact in JSON logs.
MAX_COUNTER = 2**53
# Body limits: a model with more tensors than this is not one we serve.
MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_TENSOR_NAME = 256
# Weights are sample counts (or public weights); anything beyond is nonsense.
MAX_WEIGHT = 1e12
ALLOWED_DTYPES = frozenset({"<f4", "<f2"})
# How many of a sender's sequence numbers we remember (as IPsec's anti-replay
# window does): reordering within it is accepted, an identical copy inside it
# is a benign duplicate, and anything older than it is a replay.
REPLAY_WINDOW = 1024

BENIGN_REASONS = frozenset({"duplicate"})


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of the model must look like on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "<f4"


@dataclass(frozen=True)
class Envelope:
    consortium_id: bytes
    sender: bytes
    kind: str
    round: int
    seq: int
    body: bytes
    sig: bytes

    @property
    def digest(self) -> bytes:
        """What the signature covers; identifies the message."""
        return signing_digest(self.consortium_id, self.sender, self.kind, self.round, self.seq,
                              self.body)


@dataclass(frozen=True)
class Share:
    weight: float
    tensors: dict[str, np.ndarray]  # read-only views of the received bytes


@dataclass(frozen=True)
class Accepted:
    sender: str  # member name
    envelope: Envelope
    share: Share | None  # None for a retire or prekey message
    prekeys: tuple[SignedPrekey, ...] = ()  # a prekey message's verified prekeys
    hello: bool = False  # a prekey message that asks for ours (its sender just started)

    @property
    def round(self) -> int:
        return self.envelope.round


def signing_digest(consortium_id: bytes, sender: bytes, kind: str, round_: int, seq: int,
                   body: bytes | Sequence[bytes]) -> bytes:
    parts = _parts(body)
    header = msgpack.packb([PROTO, consortium_id, sender, kind, round_, seq,
                            sum(len(p) for p in parts)])
    h = hashlib.blake2b(SIG_TAG, digest_size=32)
    h.update(header)
    for part in parts:
        h.update(part)
    return h.digest()


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header, as packb writes it."""
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 2**32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise LocalError(f"body of {n} bytes is beyond msgpack's bin 32")


def _parts(body: bytes | Sequence[bytes]) -> Sequence[bytes]:
    return [body] if isinstance(body, bytes | bytearray | memoryview) else body


def pack(signing_key: SigningKey, consortium_id: bytes, kind: str, round_: int, seq: int,
         body: bytes | Sequence[bytes]) -> bytes:
    """Sign and frame a message. Raises LocalError on our own misuse.

    `body` may come in parts (a sealed body: header, ciphertext): they are hashed
    and written out in order, exactly as if joined, without a copy of the joined
    body. The bytes are the same msgpack that `msgpack.packb` gives for the array."""
    if kind not in KINDS:
        raise LocalError(f"unknown message kind {kind!r}")
    if len(consortium_id) != CONSORTIUM_ID_BYTES:
        raise LocalError("consortium id must be 32 bytes")
    for label, value in (("round", round_), ("seq", seq)):
        if not 0 <= value < MAX_COUNTER:
            raise LocalError(f"{label} {value} out of range [0, 2**53)")
    sender = bytes(signing_key.verify_key)
    parts = _parts(body)
    digest = signing_digest(consortium_id, sender, kind, round_, seq, parts)
    sig = signing_key.sign(digest).signature
    packer = msgpack.Packer(use_bin_type=True)
    head = [packer.pack_array_header(OUTER_ITEMS)]
    head += [packer.pack(x) for x in (PROTO, consortium_id, sender, kind, round_, seq)]
    head.append(_bin_header(sum(len(p) for p in parts)))
    return b"".join([*head, *parts, packer.pack(sig)])


def encode_share(tensors: Sequence[tuple[str, np.ndarray]], weight: float) -> bytes:
    """Encode named arrays (any float dtype in ALLOWED_DTYPES) and a weight."""
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise LocalError(f"share weight must be in (0, {MAX_WEIGHT:g}], got {weight!r}")
    items = []
    for name, array in tensors:
        dtype = array.dtype.newbyteorder("<").str if array.dtype.byteorder == ">" else \
            array.dtype.str
        if dtype not in ALLOWED_DTYPES:
            raise LocalError(f"tensor {name!r}: dtype {dtype} is not one of {sorted(ALLOWED_DTYPES)}")
        le = np.ascontiguousarray(array, dtype=np.dtype(dtype))
        items.append([name, dtype, list(le.shape), le.tobytes()])
    return msgpack.packb({"weight": float(weight), "tensors": items}, use_bin_type=True)


def decode_outer(data: bytes, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse the outer array with limits. Checks form only, not trust."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise RemoteError("too_large", f"{len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        outer = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_str_len=MAX_OUTER_STR, max_bin_len=max_bytes, max_array_len=OUTER_ITEMS,
            max_map_len=0, max_ext_len=0,
        )
    # msgpack signals bad input with several types (ExtraData, FormatError,
    # StackError, ValueError, UnicodeDecodeError...): all are the peer's fault.
    except Exception as exc:  # noqa: BLE001 - parser boundary, re-raised as RemoteError
        raise RemoteError("malformed", f"outer decode failed: {type(exc).__name__}") from None
    if not isinstance(outer, list) or len(outer) != OUTER_ITEMS:
        raise RemoteError("malformed", f"expected an array of {OUTER_ITEMS} items")
    proto, cid, sender, kind, round_, seq, body, sig = outer
    if proto != PROTO:
        raise RemoteError("protocol", f"protocol tag {proto!r}, we speak {PROTO!r}")
    _check_bin(cid, CONSORTIUM_ID_BYTES, "consortium id")
    _check_bin(sender, PUBLIC_KEY_BYTES, "sender key")
    _check_bin(sig, SIGNATURE_BYTES, "signature")
    if not isinstance(body, bytes):
        raise RemoteError("malformed", "body is not a byte string")
    if not isinstance(kind, str) or kind not in KINDS:
        raise RemoteError("kind", f"unknown message kind {kind!r}")
    for label, value in (("round", round_), ("seq", seq)):
        if type(value) is not int or not 0 <= value < MAX_COUNTER:
            raise RemoteError("malformed", f"{label} is not an integer in [0, 2**53)")
    return Envelope(cid, sender, kind, round_, seq, body, sig)


def _check_bin(value: object, size: int, label: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise RemoteError("malformed", f"{label} is not {size} bytes")


def decode_share(body: bytes, spec: Sequence[TensorSpec]) -> Share:
    """Decode a share body and check it against the model's tensor spec."""
    try:
        doc = msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True,
            max_str_len=MAX_TENSOR_NAME, max_bin_len=len(body),
            max_array_len=max(MAX_TENSORS, MAX_NDIM, 4), max_map_len=2, max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - parser boundary, re-raised as RemoteError
        raise RemoteError("bad_body", f"body decode failed: {type(exc).__name__}") from None
    if not isinstance(doc, dict) or set(doc) != {"weight", "tensors"}:
        raise RemoteError("bad_body", "body must be a map with exactly 'weight' and 'tensors'")
    weight, items = doc["weight"], doc["tensors"]
    if type(weight) not in (int, float) or not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise RemoteError("bad_body", f"weight must be a number in (0, {MAX_WEIGHT:g}]")
    if not isinstance(items, list) or len(items) != len(spec):
        got = len(items) if isinstance(items, list) else type(items).__name__
        raise RemoteError("shape", f"expected {len(spec)} tensors, got {got}")
    tensors: dict[str, np.ndarray] = {}
    for expected, item in zip(spec, items, strict=True):
        if not (isinstance(item, list) and len(item) == 4):
            raise RemoteError("bad_body",
                              f"tensor entry for {expected.name!r} is not [name, dtype, shape, raw]")
        name, dtype, shape, raw = item
        if name != expected.name:
            raise RemoteError("shape", f"expected tensor {expected.name!r}, got {str(name)[:80]!r}")
        if dtype != expected.dtype:
            raise RemoteError("dtype",
                              f"tensor {name!r}: dtype {str(dtype)[:16]!r}, expected {expected.dtype}")
        if not (isinstance(shape, list) and all(type(d) is int for d in shape)) or \
                tuple(shape) != expected.shape:
            raise RemoteError("shape",
                              f"tensor {name!r}: shape {str(shape)[:80]}, expected {list(expected.shape)}")
        if not isinstance(raw, bytes):
            raise RemoteError("bad_body", f"tensor {name!r}: data is not a byte string")
        dt = np.dtype(dtype)
        if len(raw) != dt.itemsize * math.prod(expected.shape):
            raise RemoteError("shape", f"tensor {name!r}: {len(raw)} bytes do not fill shape {list(shape)}")
        array = np.frombuffer(raw, dtype=dt).reshape(expected.shape)
        if not np.isfinite(array).all():
            raise RemoteError("non_finite", f"tensor {name!r} holds NaN or infinite values")
        tensors[name] = array
    return Share(float(weight), tensors)


@dataclass
class _SenderWindow:
    highest: int = -1
    seen: dict[int, bytes] = field(default_factory=dict)  # seq -> digest

    def remember(self, seq: int, digest: bytes) -> None:
        self.seen[seq] = digest
        if seq > self.highest:
            self.highest = seq
            floor = self.highest - REPLAY_WINDOW
            for old in [s for s in self.seen if s <= floor]:
                del self.seen[old]


class Verifier:
    """Checks incoming envelopes for one node. Pure state, no I/O.

    `members` maps each member's public key to its name. The replay table can
    be exported into a checkpoint and restored, so a restart does not reopen
    the window to replays.
    """

    def __init__(self, consortium_id: bytes, members: Mapping[bytes, str], own_key: bytes,
                 spec: Sequence[TensorSpec], max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
                 sealing: Sealing | None = None) -> None:
        self.consortium_id = consortium_id
        # With sealing on, shares must come sealed and are opened here, after
        # the signature and freshness checks; without it a sealed share is refused.
        self.sealing = sealing
        self.members = dict(members)
        self.own_key = own_key
        self.spec = tuple(spec)
        self.max_bytes = max_bytes
        self._windows: dict[bytes, _SenderWindow] = {}

    def verify(self, data: bytes, current_round: int, peer_hint: str | None = None) -> Accepted:
        env = decode_outer(data, self.max_bytes)
        if env.consortium_id != self.consortium_id:
            raise RemoteError(
                "consortium",
                f"its consortium id {env.consortium_id.hex()[:16]}… differs from ours "
                f"{self.consortium_id.hex()[:16]}…: the member lists or the feature schemas "
                "differ (compare `flnode consortium show FILE` on both sides)",
                peer_hint,
            )
        if env.sender == self.own_key:
            raise RemoteError("from_self", "a message signed with our own key came back", peer_hint)
        name = self.members.get(env.sender)
        if name is None:
            raise RemoteError("non_member", f"sender key {env.sender.hex()[:16]}… is not on the "
                              "consortium's peer list", peer_hint)
        digest = env.digest
        try:
            VerifyKey(env.sender).verify(digest, env.sig)
        except BadSignatureError:
            raise RemoteError("bad_signature", "signature does not verify", name) from None
        try:
            self._check_fresh(env, name, digest, current_round)
        except RemoteError as exc:
            if (exc.reason in ("duplicate", "replay") and env.kind == KIND_PREKEY
                    and self.sealing is not None):
                # Signed by the member: learning from it again is harmless (learn() never
                # lets an older message override a newer one), and a restarted node,
                # which keeps its replay table but not the members' prekeys, needs
                # exactly this copy, which may be old: a reply re-sends the announcement
                # made at the member's last rotation.
                self._learn_prekeys(env, name, current_round)
            raise
        share, prekeys, hello = None, (), False
        if env.kind == KIND_RETIRE:
            if env.body:
                raise RemoteError("bad_body", "a retire message has an empty body", name)
        elif env.kind == KIND_PREKEY:
            prekeys, hello = self._learn_prekeys(env, name, current_round)
        else:
            share = self._decode(env, name)
        self._windows.setdefault(env.sender, _SenderWindow()).remember(env.seq, digest)
        return Accepted(name, env, share, prekeys, hello)

    def _learn_prekeys(self, env: Envelope, name: str, current_round: int
                       ) -> tuple[tuple[SignedPrekey, ...], bool]:
        """Check a prekey message's prekeys and, when sealing, file them."""
        announced, hello = decode_announcement(env.body, self.consortium_id, env.sender,
                                               self.members)
        if self.sealing is not None:
            self.sealing.learn(name, announced, current_round, env.seq)
        return tuple(announced), hello

    def _decode(self, env: Envelope, name: str) -> Share:
        body = env.body
        if env.kind == KIND_SEALED:
            if self.sealing is None:
                raise RemoteError("seal_off", "a sealed share, but this node does not seal "
                                  "(gossip.seal = \"off\"): the members' configs differ", name)
            try:
                body = self.sealing.open(body, env.sender, env.round, name)
            except RemoteError as exc:
                if exc.reason == "no_prekey":  # authentic, just not for us: say whose round
                    raise RemoteError(exc.reason, exc.detail, name, env.round) from None
                raise
        elif self.sealing is not None:
            raise RemoteError("unsealed", "a plain share, but this node requires sealed shares "
                              "(gossip.seal): the sender's config differs, and its share crossed "
                              "the wire readable", name)
        try:
            return decode_share(body, self.spec)
        except RemoteError as exc:
            raise RemoteError(exc.reason, exc.detail, name) from None

    def _check_fresh(self, env: Envelope, name: str, digest: bytes, current_round: int) -> None:
        window = self._windows.get(env.sender)
        if window is not None:
            known = window.seen.get(env.seq)
            if known == digest:
                raise RemoteError("duplicate", f"seq {env.seq} already accepted", name)
            if known is not None:
                raise RemoteError("seq_reuse", f"seq {env.seq} was already used for other "
                                  "content (the sender equivocates or its state was reset)", name)
            if env.seq <= window.highest - REPLAY_WINDOW:
                raise RemoteError("replay", f"seq {env.seq} is older than the replay window "
                                  f"(newest {window.highest})", name)
        if env.round < current_round and env.kind in SHARE_KINDS:
            raise RemoteError("stale", f"share for round {env.round}, we are at round "
                              f"{current_round}", name)

    # --- checkpointing of the replay table ---------------------------------
    def export_state(self) -> dict[str, dict[str, object]]:
        return {
            key.hex(): {"highest": w.highest, "seen": {str(s): d.hex() for s, d in w.seen.items()}}
            for key, w in self._windows.items()
        }

    def load_state(self, state: Mapping[str, Mapping[str, object]]) -> None:
        self._windows = {}
        for key_hex, w in state.items():
            window = _SenderWindow(highest=int(w["highest"]))  # type: ignore[arg-type]
            seen = w["seen"]
            assert isinstance(seen, Mapping)
            window.seen = {int(s): bytes.fromhex(d) for s, d in seen.items()}
            self._windows[bytes.fromhex(key_hex)] = window

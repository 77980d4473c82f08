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

Parsing has bounded cost (gossip.wire): the envelope, share bodies, sealed
headers and announcements are read field by field, each field's msgpack type
and declared length checked against what the format expects (and against the
bytes actually left) before anything is built for it, so a structure bomb is
refused at its first byte. Nothing is recursed into; trailing bytes are
malformed. The verifier reads the body in place and copies it once, after
every check (a plain share's tensors are read-only views of that copy):
rejecting any input allocates at most about its size again (a sealed body's
plaintext), in time linear in it. Peer values in a rejection's detail are cut
(`gossip.errors.shorten`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import msgpack
import numpy as np
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gossip.errors import SHORT, LocalError, RemoteError, shorten
from gossip.seal import Sealing, SignedPrekey, decode_announcement
from gossip.wire import Reader, WireError

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
# "I am up, at this round": sent by a node when it starts (body HELLO_ASK: answer me)
# and as the answer (body HELLO_REPLY); round = the sender's current round. It lets
# a restarted node join the round the others are in, and a consortium wait for a
# quorum before round 1, with or without sealing.
KIND_HELLO = "hello"
HELLO_ASK = b"\x00"
HELLO_REPLY = b"\x01"
# "These are the shares I combined in round r": sent by a node once it has closed
# round r; body = msgpack array of [member public key (bin 32), envelope digest
# (bin 32)], one per member whose share it accepted for r (not its own). Receivers
# compare each digest with the one they accepted from that member: a member that
# signs a different share for each peer (split equivocation) is seen at once.
KIND_SEEN = "seen"
# A member's statistics for federated normalization (node/normalize.py), sent once
# before round 1 (round 0) and re-sent unchanged on a hello: body = msgpack map
# {"rows": float, "sum": bin (8 k), "sumsq": bin (8 k)}, float64 little-endian, one
# value per numeric column of the schema (k columns). Shape only is checked here;
# the values' plausibility is the runner's (it knows the agreed noise).
KIND_STATS = "stats"
# A member's vote on federated normalization (node/normalize.py), sent once before its
# statistics (round 0) and re-sent unchanged on a hello: body = one byte, NORM_USABLE
# ("my check at start passes: I will send statistics") or NORM_RANGE ("it fails and the
# schema says normalize_fallback = \"range\""). Any member's NORM_RANGE makes every
# member scale by the declared ranges; nobody computes, charges or sends statistics
# until every member's vote is in. It costs no ε (see node/normalize.py for what it tells).
KIND_NORM = "norm"
NORM_USABLE = b"\x01"
NORM_RANGE = b"\x00"
# "My model after the last round has this digest": sent once by a node that has closed
# its last round; round = that round; body = the 32-byte BLAKE2b-256 digest of its
# model's parameters (float32 little-endian). Receivers compare it with their own:
# members that ended with different models (e.g. one restarted after a kill and combined
# other shares) are told so. It tells nothing about the rows: every member holding the
# same shares can compute it.
KIND_FINAL = "final"
SHARE_KINDS = frozenset({KIND_SHARE, KIND_SEALED})
KINDS = frozenset({KIND_SHARE, KIND_SEALED, KIND_PREKEY, KIND_RETIRE, KIND_HELLO, KIND_SEEN,
                   KIND_STATS, KIND_NORM, KIND_FINAL})
_KINDS_BY_BYTES = {k.encode(): k for k in KINDS}
_PROTO_BYTES = PROTO.encode()

# A 10 M-parameter fp32 model is 40 MB; 64 MiB leaves room for that plus
# framing. Transports apply their own (smaller or equal) caps before this.
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
# The outer array has exactly 8 items; strings in it are the protocol tag and
# the kind, both short. It is read field by field (gossip.wire), each field's
# type and length checked before anything is taken for it.
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

    @cached_property  # a hash of the whole body: the round book compares it per share
    def digest(self) -> bytes:
        """What the signature covers; identifies the message."""
        return signing_digest(self.consortium_id, self.sender, self.kind, self.round, self.seq,
                              self.body)


@dataclass(frozen=True)
class Share:
    weight: float
    tensors: dict[str, np.ndarray]  # read-only views of the received bytes
    # The digest of the normalization statistics the sender encodes its rows with
    # (federated normalization only; None otherwise).
    norm: bytes | None = None


@dataclass(frozen=True)
class Stats:
    """A stats message's values: noised row count, and per numeric column the noised
    sums of the clipped, range-scaled values and of their squares."""

    rows: float
    sum: np.ndarray  # float64 [k]
    sumsq: np.ndarray  # float64 [k]


@dataclass(frozen=True)
class Accepted:
    sender: str  # member name
    envelope: Envelope
    share: Share | None  # None for a retire or prekey message
    prekeys: tuple[SignedPrekey, ...] = ()  # a prekey message's verified prekeys
    hello: bool = False  # a prekey message that asks for ours (its sender just started)
    seen: tuple[tuple[str, bytes], ...] = ()  # a seen message: (member, envelope digest)
    stats: Stats | None = None  # a stats message's values
    norm_range: bool | None = None  # a norm message's vote: True = fall back to range scaling

    @property
    def round(self) -> int:
        return self.envelope.round


def signing_digest(consortium_id: bytes, sender: bytes, kind: str, round_: int, seq: int,
                   body: bytes | Sequence[bytes]) -> bytes:
    parts = _parts(body)
    # A small Packer: packb's default 256 KiB buffer would be most of what rejecting a
    # small message costs.
    header = msgpack.Packer(buf_size=256).pack([PROTO, consortium_id, sender, kind, round_,
                                                seq, sum(len(p) for p in parts)])
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
    packer = msgpack.Packer(use_bin_type=True, buf_size=256)
    head = [packer.pack_array_header(OUTER_ITEMS)]
    head += [packer.pack(x) for x in (PROTO, consortium_id, sender, kind, round_, seq)]
    head.append(_bin_header(sum(len(p) for p in parts)))
    return b"".join([*head, *parts, packer.pack(sig)])


def encode_share(tensors: Sequence[tuple[str, np.ndarray]], weight: float,
                 norm: bytes | None = None) -> bytes:
    """Encode named arrays (any float dtype in ALLOWED_DTYPES) and a weight (and, with
    federated normalization, the 32-byte digest of the agreed statistics)."""
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
    doc: dict[str, object] = {"weight": float(weight), "tensors": items}
    if norm is not None:
        if len(norm) != DIGEST_BYTES:
            raise LocalError("a share's norm digest is 32 bytes")
        doc["norm"] = bytes(norm)
    return msgpack.packb(doc, use_bin_type=True)


DIGEST_BYTES = 32
# A stats message names at most this many numeric columns (a schema's own limit is
# far below): its size is bounded before the schema is consulted.
MAX_STATS_COLUMNS = 65_536


def encode_stats(stats: Stats) -> bytes:
    k = len(stats.sum)
    if len(stats.sumsq) != k or k > MAX_STATS_COLUMNS:
        raise LocalError(f"stats: sum and sumsq must both have k <= {MAX_STATS_COLUMNS} values")
    return msgpack.packb({"rows": float(stats.rows),
                          "sum": np.asarray(stats.sum, dtype="<f8").tobytes(),
                          "sumsq": np.asarray(stats.sumsq, dtype="<f8").tobytes()},
                         use_bin_type=True)


def decode_stats(body: bytes | memoryview, columns: int | None,
                 sender: str | None = None) -> Stats:
    """A stats message's values, read field by field; `columns` is the schema's number
    of numeric columns (None: this consortium does not normalize federatedly)."""
    if columns is None:
        raise RemoteError("bad_body", "a stats message, but this consortium's schema does "
                          "not use normalize = \"federated\"", sender)
    out: dict[str, object] = {}
    try:
        r = Reader(body)
        if r.map_header() != 3:
            raise WireError("not a map of 3")
        for _ in range(3):
            key = r.str(8)
            if key in out or key not in ("rows", "sum", "sumsq"):
                raise WireError("unexpected key")
            if key == "rows":
                if r.peek_type() not in ("int", "float"):
                    raise WireError("rows is not a number")
                out[key] = float(r.number())
            else:
                raw = r.bin(exact=8 * columns)
                out[key] = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        r.done()
    except WireError as exc:
        raise RemoteError("bad_body", "a stats message is {rows: number, sum: bin, sumsq: "
                          f"bin}} with {columns} float64 values each: {exc}", sender) from None
    stats = Stats(out["rows"], out["sum"], out["sumsq"])  # type: ignore[arg-type]
    if not (math.isfinite(stats.rows) and np.isfinite(stats.sum).all()
            and np.isfinite(stats.sumsq).all()):
        raise RemoteError("non_finite", "a stats message holds NaN or infinite values", sender)
    return stats


def decode_norm(body: bytes | memoryview, federated: bool, sender: str | None = None) -> bool:
    """A norm message's vote: True for NORM_RANGE, False for NORM_USABLE."""
    if not federated:
        raise RemoteError("bad_body", "a norm message, but this consortium's schema does not "
                          "use normalize = \"federated\"", sender)
    vote = bytes(body[:2])
    if vote not in (NORM_USABLE, NORM_RANGE):
        raise RemoteError("bad_body", "a norm message's body is one byte, 1 (usable) or 0 "
                          "(fall back to range scaling)", sender)
    return vote == NORM_RANGE


def encode_seen(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A seen message's body: [[member key, envelope digest], ...] in the given order."""
    for key, digest in pairs:
        if len(key) != PUBLIC_KEY_BYTES or len(digest) != DIGEST_BYTES:
            raise LocalError("a seen entry is a 32-byte member key and a 32-byte digest")
    return msgpack.packb([[bytes(k), bytes(d)] for k, d in pairs], use_bin_type=True)


def decode_seen(body: bytes | memoryview, members: Mapping[bytes, str],
                sender: str | None = None) -> tuple[tuple[str, bytes], ...]:
    """(member, digest) pairs of a seen message, read field by field: at most one entry
    per member, each key on the peer list, nothing else in the body."""
    out: dict[str, bytes] = {}
    try:
        r = Reader(body)
        count = r.array_header()
        if count > len(members):
            raise WireError(f"{count} entries for {len(members)} members")
        for _ in range(count):
            if r.array_header() != 2:
                raise WireError("an entry is not [key, digest]")
            key = bytes(r.bin(exact=PUBLIC_KEY_BYTES))
            digest = bytes(r.bin(exact=DIGEST_BYTES))
            name = members.get(key)
            if name is None:
                raise WireError("an entry names a key that is not a member's")
            if name in out:
                raise WireError("two entries for one member")
            out[name] = digest
        r.done()
    except WireError as exc:
        raise RemoteError("bad_body", "a seen message is [[member key (32 B), digest "
                          f"(32 B)], ...]: {exc}", sender) from None
    return tuple(out.items())


class _Outer:
    """A parsed envelope whose body is still a read-only view of the received bytes.

    The verifier works on this one, so nothing of the body is copied before the
    signature and the body's own checks have passed; `envelope()` copies it once."""

    __slots__ = ("consortium_id", "sender", "kind", "round", "seq", "body", "sig")

    def __init__(self, consortium_id: bytes, sender: bytes, kind: str, round_: int, seq: int,
                 body: memoryview, sig: bytes) -> None:
        self.consortium_id = consortium_id
        self.sender = sender
        self.kind = kind
        self.round = round_
        self.seq = seq
        self.body = body
        self.sig = sig

    @property
    def digest(self) -> bytes:
        return signing_digest(self.consortium_id, self.sender, self.kind, self.round, self.seq,
                              self.body)

    def envelope(self, body: bytes | None = None, digest: bytes | None = None) -> Envelope:
        """The public Envelope; `body` if the caller already holds the body's bytes,
        `digest` if it has hashed them already."""
        env = Envelope(self.consortium_id, self.sender, self.kind, self.round, self.seq,
                       bytes(self.body) if body is None else body, self.sig)
        if digest is not None:
            env.__dict__["digest"] = digest  # the cached_property's slot
        return env


def decode_outer(data: bytes, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse the outer array with limits. Checks form only, not trust."""
    return _parse_outer(data, max_bytes).envelope()


def _parse_outer(data: bytes | bytearray | memoryview, max_bytes: int) -> _Outer:
    """Read the outer array field by field: each field's type and declared size are
    checked before anything is taken for it, so a hostile input costs time linear in
    the bytes read and no memory beyond a few small fields (the body stays a view)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteError("malformed", f"expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise RemoteError("too_large", f"{size} bytes exceeds the cap of {max_bytes}")
    try:
        r = Reader(data)
        if r.array_header() != OUTER_ITEMS:
            raise RemoteError("malformed", f"expected an array of {OUTER_ITEMS} items")
        t = r.peek_type()
        if t == "str":
            proto = r.str_bytes()
        elif t == "bin":  # not ours; its first bytes may still say whose it is
            proto = r.bin()
        else:
            raise RemoteError("protocol", f"protocol tag is a {t}, we speak {PROTO!r}")
        if proto != _PROTO_BYTES:
            raise RemoteError("protocol", f"protocol tag {shorten(bytes(proto[:SHORT]))}"
                              f"{' (cut)' if len(proto) > SHORT else ''}, we speak {PROTO!r}")
        cid = _bin_field(r, CONSORTIUM_ID_BYTES, "consortium id")
        sender = _bin_field(r, PUBLIC_KEY_BYTES, "sender key")
        t = r.peek_type()
        if t != "str":
            raise RemoteError("kind", f"message kind is a {t}, not a str")
        raw_kind = r.str_bytes()
        kind = _KINDS_BY_BYTES.get(bytes(raw_kind)) if len(raw_kind) <= MAX_OUTER_STR else None
        if kind is None:
            raise RemoteError("kind", f"unknown message kind {shorten(bytes(raw_kind[:SHORT]))}")
        counters = []
        for label in ("round", "seq"):
            try:
                counters.append(r.uint(MAX_COUNTER))
            except WireError:
                raise RemoteError("malformed",
                                  f"{label} is not an integer in [0, 2**53)") from None
        try:
            body = r.bin()
        except WireError as exc:
            raise RemoteError("malformed", f"body: {exc}") from None
        sig = _bin_field(r, SIGNATURE_BYTES, "signature")
        r.done()
    except WireError as exc:
        raise RemoteError("malformed", f"outer decode failed: {exc}") from None
    return _Outer(cid, sender, kind, counters[0], counters[1], body, sig)


def _bin_field(r: Reader, size: int, label: str) -> bytes:
    try:
        return bytes(r.bin(exact=size))
    except WireError:
        raise RemoteError("malformed", f"{label} is not {size} bytes") from None


# Large tensors are checked for NaN/inf in slices, so the check's scratch memory
# stays small whatever the tensor's size.
_FINITE_CHUNK = 1 << 20


def decode_share(body: bytes | bytearray | memoryview, spec: Sequence[TensorSpec]) -> Share:
    """Decode a share body and check it against the model's tensor spec.

    Read field by field (see gossip.wire): a field of the wrong type or size is
    refused before anything is built for it. The tensors are read-only views of
    `body` (no copy)."""
    try:
        r = Reader(body)
        n = r.map_header()
        if n not in (2, 3):
            raise RemoteError("bad_body", _BODY_KEYS)
        weight: float | None = None
        tensors: dict[str, np.ndarray] | None = None
        norm: bytes | None = None
        for _ in range(n):
            key = r.str(16) if r.peek_type() == "str" else None
            if key == "weight" and weight is None:
                weight = _read_weight(r)
            elif key == "tensors" and tensors is None:
                tensors = _read_tensors(r, spec)
            elif key == "norm" and norm is None and n == 3:
                norm = bytes(r.bin(exact=DIGEST_BYTES))
            else:
                raise RemoteError("bad_body", _BODY_KEYS)
        r.done()
    except WireError as exc:
        raise RemoteError("bad_body", f"body decode failed: {exc}") from None
    if weight is None or tensors is None:
        raise RemoteError("bad_body", _BODY_KEYS)
    return Share(weight, tensors, norm)


_BODY_KEYS = ("body must be a map with exactly 'weight' and 'tensors' (and, with federated "
              "normalization, 'norm')")


def _read_weight(r: Reader) -> float:
    if r.peek_type() not in ("int", "float"):
        raise RemoteError("bad_body", f"weight must be a number in (0, {MAX_WEIGHT:g}]")
    weight = r.number()
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise RemoteError("bad_body", f"weight must be a number in (0, {MAX_WEIGHT:g}]")
    return float(weight)


def _read_tensors(r: Reader, spec: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    t = r.peek_type()
    if t != "array":
        raise RemoteError("shape", f"expected {len(spec)} tensors, got a {t}")
    count = r.array_header()
    if count != len(spec):
        raise RemoteError("shape", f"expected {len(spec)} tensors, got {count}")
    tensors: dict[str, np.ndarray] = {}
    for expected in spec:
        name = expected.name
        if r.peek_type() != "array" or r.array_header() != 4:
            raise RemoteError("bad_body", f"tensor entry for {shorten(name)} is not "
                              "[name, dtype, shape, raw]")
        t = r.peek_type()
        if t != "str":
            raise RemoteError("shape", f"expected tensor {shorten(name)}, got a {t}")
        got = r.str_bytes()
        if len(got) > MAX_TENSOR_NAME:
            raise RemoteError("bad_body", f"a tensor name longer than {MAX_TENSOR_NAME} bytes")
        if got != name.encode():
            raise RemoteError("shape", f"expected tensor {shorten(name)}, got "
                              f"{shorten(bytes(got).decode('utf-8', 'replace'))}")
        t = r.peek_type()
        if t != "str":
            raise RemoteError("dtype", f"tensor {shorten(name)}: dtype is a {t}, "
                              f"expected {expected.dtype}")
        got = r.str_bytes()
        if got != expected.dtype.encode():
            raise RemoteError("dtype", f"tensor {shorten(name)}: dtype "
                              f"{shorten(bytes(got[:SHORT]).decode('utf-8', 'replace'), 16)}, "
                              f"expected {expected.dtype}")
        t = r.peek_type()
        if t != "array":
            raise RemoteError("shape", f"tensor {shorten(name)}: shape is a {t}, expected "
                              f"{list(expected.shape)}")
        ndim = r.array_header()
        if ndim != len(expected.shape) or ndim > MAX_NDIM:
            raise RemoteError("shape", f"tensor {shorten(name)}: {ndim} dimensions, expected "
                              f"{list(expected.shape)}")
        shape = []
        for _ in range(ndim):
            if r.peek_type() != "int":
                raise RemoteError("shape", f"tensor {shorten(name)}: a dimension is not an "
                                  f"integer, expected {list(expected.shape)}")
            shape.append(r.int())
        if tuple(shape) != expected.shape:
            raise RemoteError("shape", f"tensor {shorten(name)}: shape {shorten(shape)}, "
                              f"expected {list(expected.shape)}")
        if r.peek_type() != "bin":
            raise RemoteError("bad_body", f"tensor {shorten(name)}: data is not a byte string")
        raw = r.bin()
        dt = np.dtype(expected.dtype)
        if len(raw) != dt.itemsize * math.prod(expected.shape):
            raise RemoteError("shape", f"tensor {shorten(name)}: {len(raw)} bytes do not fill "
                              f"shape {list(expected.shape)}")
        array = np.frombuffer(raw, dtype=dt).reshape(expected.shape)
        flat = array.reshape(-1)
        for i in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[i:i + _FINITE_CHUNK]).all():
                raise RemoteError("non_finite",
                                  f"tensor {shorten(name)} holds NaN or infinite values")
        tensors[name] = array
    return tensors


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
                 sealing: Sealing | None = None, stats_columns: int | None = None) -> None:
        self.consortium_id = consortium_id
        # Numeric columns of a federated-normalization schema (None: stats are refused).
        self.stats_columns = stats_columns
        # With sealing on, shares must come sealed and are opened here, after
        # the signature and freshness checks; without it a sealed share is refused.
        self.sealing = sealing
        self.members = dict(members)
        self.own_key = own_key
        self.spec = tuple(spec)
        self.max_bytes = max_bytes
        self._windows: dict[bytes, _SenderWindow] = {}

    def verify(self, data: bytes, current_round: int, peer_hint: str | None = None) -> Accepted:
        """Accept a message or raise RemoteError naming the reason; nothing else escapes.

        The body is read from `data` in place and copied once, into the accepted
        Envelope, after every check has passed: rejecting any input costs at most
        about twice its size (a sealed body's plaintext) and time linear in it."""
        env = _parse_outer(data, self.max_bytes)
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
        share, prekeys, hello, body, seen, stats = None, (), False, None, (), None
        norm_range = None
        if env.kind == KIND_SEEN:
            seen = decode_seen(env.body, self.members, name)
        elif env.kind == KIND_STATS:
            stats = decode_stats(env.body, self.stats_columns, name)
        elif env.kind == KIND_NORM:
            norm_range = decode_norm(env.body, self.stats_columns is not None, name)
        elif env.kind == KIND_FINAL:
            if len(env.body) != DIGEST_BYTES:
                raise RemoteError("bad_body", f"a final message's body is a {DIGEST_BYTES}-byte "
                                  f"model digest, not {len(env.body)} bytes", name)
        elif env.kind == KIND_RETIRE:
            if len(env.body):
                raise RemoteError("bad_body", "a retire message has an empty body", name)
        elif env.kind == KIND_HELLO:
            if bytes(env.body[:2]) not in (HELLO_ASK, HELLO_REPLY):
                raise RemoteError("bad_body", "a hello's body is one byte, 0 (ask) or 1 "
                                  "(reply)", name)
            hello = bytes(env.body) == HELLO_ASK
        elif env.kind == KIND_PREKEY:
            prekeys, hello = self._learn_prekeys(env, name, current_round)
        else:
            share, body = self._decode(env, name)
        self._windows.setdefault(env.sender, _SenderWindow()).remember(env.seq, digest)
        return Accepted(name, env.envelope(body, digest), share, prekeys, hello, seen, stats,
                        norm_range)

    def _learn_prekeys(self, env: _Outer, name: str, current_round: int
                       ) -> tuple[tuple[SignedPrekey, ...], bool]:
        """Check a prekey message's prekeys and, when sealing, file them."""
        announced, hello = decode_announcement(env.body, self.consortium_id, env.sender,
                                               self.members)
        if self.sealing is not None:
            self.sealing.learn(name, announced, current_round, env.seq)
        return tuple(announced), hello

    def _decode(self, env: _Outer, name: str) -> tuple[Share, bytes | None]:
        """The share, and the body's bytes when the tensors are views of them (a plain
        share: copied once from the input, then decoded in place)."""
        body: bytes | memoryview = env.body
        kept = None
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
        else:
            body = kept = bytes(env.body)
        try:
            return decode_share(body, self.spec), kept
        except RemoteError as exc:
            raise RemoteError(exc.reason, exc.detail, name) from None

    def _check_fresh(self, env: _Outer, name: str, digest: bytes, current_round: int) -> None:
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

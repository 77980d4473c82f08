"""Wire format version 1: the bodies of the message kinds that have one, encoded and
decoded. `gossip.envelope` signs and frames them (and its docstring lists every kind);
its `Verifier` decodes them here, after the signature and freshness checks.

Share body (kinds "share", and "sealed" once opened by `gossip.seal`), a msgpack map::

    {"weight": float > 0, "tensors": [[name (str), dtype (str), shape ([uint]), raw (bin)], ...]}

plus, with federated normalization, "norm": the 32-byte digest of the agreed
statistics, and where the consortium's [rules] agree a compression other than "none",
"codec" before "tensors" and each tensor's raw bytes in that codec's form
(gossip/compress.py: the sender's update, not its model; top-k's tensors are that data
alone, in the model's order). Tensor bytes are raw
little-endian; only the dtypes in `ALLOWED_DTYPES`. The tensors must be exactly the
model's (`TensorSpec`: names, order, shapes, dtypes) and finite.

Seen body: a msgpack array of [member public key (bin 32), envelope digest (bin
32)], at most one per member. Echo body: the same form (the sender's own share
included), its size checked against the member count before it is read. Stats body:
a msgpack map {"rows": float, "sum": bin (8 k), "sumsq": bin (8 k)}, float64
little-endian, one value per numeric column of the schema (k columns). Norm body:
one byte, `NORM_USABLE` or `NORM_RANGE`. Deal and secagg bodies (secure rounds): a
msgpack array [step (str), [piece (bin), ...], [dealer (uint), ...]] (`SecAgg`; a deal
is sealed to its recipient, gossip.seal). (The hello, final, retire and prekey
bodies are checked by the envelope's verifier and `gossip.seal`.)

Every decoder reads field by field (gossip.wire), each field's msgpack type and
declared length checked before anything is built for it, and raises
`RemoteError` naming the reason (`bad_body`, `shape`, `dtype`, `non_finite`);
the encoders raise `LocalError` on our own misuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from gossip.compress import (
    MAX_CODEC_NAME,
    NO_COMPRESSION,
    NONE,
    Codec,
    Compressed,
    Rebased,
    read_data,
)
from gossip.errors import SHORT, LocalError, RemoteError, shorten
from gossip.membership import PUBLIC_KEY_BYTES
from gossip.wire import Reader, WireError

# A norm message's body (envelope.KIND_NORM): one byte.
NORM_USABLE = b"\x01"
NORM_RANGE = b"\x00"

# Body limits: a model with more tensors than this is not one we serve.
MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_TENSOR_NAME = 256
# Weights are sample counts (or public weights); anything beyond is nonsense.
MAX_WEIGHT = 1e12
ALLOWED_DTYPES = frozenset({"<f4", "<f2"})


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of the model must look like on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "<f4"


@dataclass(frozen=True)
class Share:
    weight: float
    # read-only views of the received bytes; a compressed share's: compress.Rebased
    tensors: Mapping[str, np.ndarray]
    # The digest of the normalization statistics the sender encodes its rows with
    # (federated normalization only; None otherwise).
    norm: bytes | None = None
    codec: str = NONE  # the codec it declared (gossip/compress.py)


@dataclass(frozen=True)
class Stats:
    """A stats message's values: noised row count, and per numeric column the noised
    sums of the clipped, range-scaled values and of their squares."""

    rows: float
    sum: np.ndarray  # float64 [k]
    sumsq: np.ndarray  # float64 [k]


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


# One echo entry: msgpack [bin 32, bin 32] = 1 + 2 + 32 + 2 + 32 bytes; an echo body is
# at most one per member plus the array header (at most 5 bytes): checked before reading.
ECHO_ENTRY_BYTES = 1 + 2 + PUBLIC_KEY_BYTES + 2 + DIGEST_BYTES
_ARRAY_HEADER_MAX = 5


def encode_echo(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """An echo message's body: [[member key, share envelope digest], ...] for every share
    the sender holds for the round, its own included (gossip/protocol/echo.py)."""
    return encode_seen(pairs)


def decode_echo(body: bytes | memoryview, members: Mapping[bytes, str],
                sender: str | None = None) -> tuple[tuple[str, bytes], ...]:
    """(member, digest) pairs of an echo: as a seen body, and no longer than one entry
    per member can be (members x ECHO_ENTRY_BYTES), refused before anything is read."""
    size = len(body)
    limit = len(members) * ECHO_ENTRY_BYTES + _ARRAY_HEADER_MAX
    if size > limit:
        raise RemoteError("bad_body", f"an echo of {size} bytes, more than {len(members)} "
                          f"members' entries can take ({limit})", sender)
    try:
        return decode_seen(body, members, sender)
    except RemoteError as exc:
        raise RemoteError(exc.reason, exc.detail.replace("a seen message", "an echo"),
                          sender) from None


# Large tensors are checked for NaN/inf in slices, so the check's scratch memory
# stays small whatever the tensor's size.
_FINITE_CHUNK = 1 << 20


def encode_compressed_share(codec: Codec, compressed: Compressed, weight: float,
                            norm: bytes | None = None) -> bytes:
    """A compressed share's body (gossip/compress.py): the update's items from
    `compress.compress`, the codec's name before them."""
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise LocalError(f"share weight must be in (0, {MAX_WEIGHT:g}], got {weight!r}")
    doc: dict[str, object] = {"weight": float(weight), "codec": codec.wire_name,
                              "tensors": compressed.items}
    if norm is not None:
        if len(norm) != DIGEST_BYTES:
            raise LocalError("a share's norm digest is 32 bytes")
        doc["norm"] = bytes(norm)
    return msgpack.packb(doc, use_bin_type=True)


def decode_share(body: bytes | bytearray | memoryview, spec: Sequence[TensorSpec],
                 codec: Codec = NO_COMPRESSION,
                 base: Callable[[str], np.ndarray] | None = None) -> Share:
    """Decode a share body and check it against the model's tensor spec and the agreed
    `codec` (gossip/compress.py; "none": today's share).

    Read field by field (see gossip.wire): a field of the wrong type or size is
    refused before anything is built for it. Uncompressed tensors are read-only views
    of `body` (no copy); a compressed share's are its decoded update read on top of
    `base` (`compress.Rebased`). A share declaring another codec than the agreed one
    is refused (`codec`)."""
    try:
        r = Reader(body)
        n = r.map_header()
        if n not in (2, 3, 4):
            raise RemoteError("bad_body", _BODY_KEYS)
        weight: float | None = None
        tensors: Mapping[str, np.ndarray] | None = None
        norm: bytes | None = None
        declared: str | None = None
        for _ in range(n):
            key = r.str(16) if r.peek_type() == "str" else None
            if key == "weight" and weight is None:
                weight = _read_weight(r)
            elif key == "codec" and declared is None and tensors is None:
                if r.peek_type() != "str":
                    raise RemoteError("bad_body", "codec is not a string")
                declared = r.str(MAX_CODEC_NAME)
                if declared == NONE:
                    raise RemoteError("bad_body", "an uncompressed share has no codec key")
                if declared != codec.wire_name or not codec.compressed:
                    why = ("the sender runs another version of its wire layout (all members "
                           "must run the same flnode version)" if declared == codec.name
                           else "the members' files differ")
                    raise RemoteError("codec", f"a share compressed with {shorten(declared)}, "
                                      f"but the consortium's rules agree compression = "
                                      f"{codec.name!r} (sent as {codec.wire_name!r}): {why}")
            elif key == "tensors" and tensors is None:
                if declared is None and codec.compressed:
                    raise RemoteError("codec", "an uncompressed share, but the consortium's "
                                      f"rules agree compression = {codec.name!r}")
                if codec.compressed:
                    tensors = Rebased(_read_tensors(r, spec, codec), base)
                else:
                    tensors = _read_tensors(r, spec)
            elif key == "norm" and norm is None:
                norm = bytes(r.bin(exact=DIGEST_BYTES))
            else:
                raise RemoteError("bad_body", _BODY_KEYS)
        r.done()
    except WireError as exc:
        raise RemoteError("bad_body", f"body decode failed: {exc}") from None
    if weight is None or tensors is None:
        raise RemoteError("bad_body", _BODY_KEYS)
    return Share(weight, tensors, norm, codec.name if declared is not None else NONE)


_BODY_KEYS = ("body must be a map with exactly 'weight' and 'tensors' (and, with federated "
              "normalization, 'norm'; compressed, 'codec' before 'tensors')")


def _read_weight(r: Reader) -> float:
    if r.peek_type() not in ("int", "float"):
        raise RemoteError("bad_body", f"weight must be a number in (0, {MAX_WEIGHT:g}]")
    weight = r.number()
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise RemoteError("bad_body", f"weight must be a number in (0, {MAX_WEIGHT:g}]")
    return float(weight)


def _read_tensors(r: Reader, spec: Sequence[TensorSpec],
                  codec: Codec = NO_COMPRESSION) -> dict[str, np.ndarray]:
    t = r.peek_type()
    if t != "array":
        raise RemoteError("shape", f"expected {len(spec)} tensors, got a {t}")
    count = r.array_header()
    if count != len(spec):
        raise RemoteError("shape", f"expected {len(spec)} tensors, got {count}")
    tensors: dict[str, np.ndarray] = {}
    for expected in spec:
        name = expected.name
        if codec.bare:  # its data alone, in the spec's order (gossip/compress.py)
            tensors[name] = read_data(r, codec, name,
                                      math.prod(expected.shape)).reshape(expected.shape)
            continue
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
        if codec.compressed:  # its data in the codec's form (gossip/compress.py)
            tensors[name] = read_data(r, codec, name,
                                      math.prod(expected.shape)).reshape(expected.shape)
            continue
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


# --- secure aggregation (issue 22; node/runtime/secure_round.py) ----------------------------
# The steps of a secure round and how many pieces each message of a step carries: a deal
# (kind "deal", sealed to its one recipient) carries the sender's VECTOR (or SEED) piece and
# its MASK piece for that recipient, and its commitment (every holder's piece digest, n x 32
# bytes: node/runtime/secure_round.py); an opened step (kind "secagg", broadcast) carries the
# sender's one opened piece, or none ("I abstain": it cannot compute it this round, and says
# so at once instead of being waited for). The pieces' own bytes are node/secagg/pieces.py's
# ("FLSA" header, field elements), parsed and checked by the node: gossip checks the frame.
SECAGG_DEAL = "deal"
# "agree" (review finding C2): before any sum piece leaves, each member's signed statement of
# what it will open: a 32-byte hash of (round, entered, openers, selected, the step bodies)
# and the digest (32 bytes each) of every member's check and degree2 body it used, or none
# (it opens nothing). node/runtime/secure_round.py `SecureRound.agree`.
# A member in dispute with dealers appends one reveal per such dealer (at most n - 1): the
# per-message key of the dealer's sealed deal (32 bytes) and that deal's signed envelope as
# it arrived, so everyone can open the dealer-signed piece and see who lied.
# "enter" (variants that open degree-2 values): before any degree-2 piece leaves, each
# member's signed statement of the entered dealers and openers it computed from the checks:
# a 32-byte hash and the digest (32 bytes) of every member's check body it used, or none.
# node/runtime/secure_round.py `SecureRound.enter`.
# The optimistic sum opening (node/runtime/secure_open.py): "sum" goes to the sender's 2t
# ring neighbours only; "confirm" (broadcast) is the digest of the aggregate the sender
# decoded from its 2t + 1 pieces (32 bytes: "ok"), an empty piece ("need": it could not),
# or none (it opens nothing this round); "fallback" (to the others) is the sender's sum
# piece, the same bytes as its "sum" piece, once any member's confirm asked for it, else none.
SECAGG_STEPS = ("check", "enter", "degree2", "agree", "sum", "confirm", "fallback")
_SECAGG_PIECES = {SECAGG_DEAL: (3,), "check": (0, 1), "enter": (0, 1), "degree2": (0, 1),
                  "agree": (0, 1), "sum": (0, 1), "confirm": (0, 1), "fallback": (0, 1)}
# A reveal beyond its deal's plaintext: the key, the sealed body's header (one recipient),
# its tag and the envelope's frame, with room (a real one is under 600 bytes).
SECAGG_REVEAL_OVERHEAD = 4096


def _secagg_counts(step: str, members: int) -> tuple[int, ...] | range:
    """How many pieces a `step` message may carry (agree: none, or the statement and up to
    n - 1 reveals)."""
    return range(0, members + 1) if step == "agree" else _SECAGG_PIECES[step]
# The most dealers a check message may name: node/secagg/shamir.py's MAX_MEMBERS bound
# (members are evaluation points 1..n of a 16-bit field in the piece header).
MAX_SECAGG_MEMBERS = 65535
# Each piece's largest size, from what the receiver knows (n members, d model values), so a
# member's oversized piece is refused before anything is copied (review of issue 22, M1).
# A piece is node/secagg/pieces.py's 24-byte header and its field elements, counted here at
# 8 bytes each: pieces version 2 pack them at 61 bits (7.625 bytes), so this bound is
# deliberately ~5% looser than a real piece (kept simple on purpose: it only
# bounds what is copied: pieces.from_bytes then checks the exact packed length). A check
# 2n values, a degree-2 piece at most P = n(n - 1)/2 + n (the "distances" variant), a sum d,
# a deal's vector d + 1 (or a 4-value seed) and mask P + 1; a commitment is 32 bytes per
# holder (node/runtime/secure_round.py COMMIT_BYTES); an agreement is 32 (1 + 2n) bytes
# exactly (its hash, then two body digests per member), an entry agreement 32 (1 + n).
SECAGG_PIECE_HEADER = 24
SECAGG_VALUE_BYTES = 8  # >= ceil(61 / 8): an upper bound, not the packed size
SECAGG_SEED_VALUES = 4
SECAGG_COMMIT_BYTES = 32
# Variant "range" (node/secagg/range_check.py): a deal's vector piece also carries the range
# check's witness, r L + S values, at most this many (RangeParams checks it); its commitment
# adds 32 bytes per holder (the digests of the holders' d-coordinate parts).
SECAGG_WITNESS_MAX = 1 << 14


def secagg_piece_limits(step: str, members: int, dim: int | None) -> tuple[int | None, ...]:
    """The most bytes each piece of a `step` message may have (None: no bound but the
    envelope's, when the dimension is not known to the caller)."""
    n, head, v = members, SECAGG_PIECE_HEADER, SECAGG_VALUE_BYTES
    opened = n * (n - 1) // 2 + n
    if step == SECAGG_DEAL:
        vector = None if dim is None else head + v * max(dim + 1 + SECAGG_WITNESS_MAX,
                                                         SECAGG_SEED_VALUES)
        return (vector, head + v * (opened + 1), SECAGG_COMMIT_BYTES * 2 * n)
    if step == "agree":
        deal = secagg_piece_limits(SECAGG_DEAL, members, dim)
        reveal = None if deal[0] is None else sum(deal) + SECAGG_REVEAL_OVERHEAD  # type: ignore[arg-type]
        return (SECAGG_COMMIT_BYTES * (1 + 2 * n), *([reveal] * (n - 1)))
    if step == "enter":  # its hash, then one check digest per member
        return (SECAGG_COMMIT_BYTES * (1 + n),)
    if step == "confirm":  # the decoded aggregate's digest, or empty
        return (SECAGG_COMMIT_BYTES,)
    if step == "fallback":
        step = "sum"
    return ({"check": head + v * 2 * n, "degree2": head + v * opened,
             "sum": None if dim is None else head + v * dim}[step],)


@dataclass(frozen=True)
class SecAgg:
    """A secure round's message: its `step` (SECAGG_DEAL or one of SECAGG_STEPS), its
    pieces' bytes (deal: (vector or seed, mask, commitment); an opened step: (piece,) or ()
    to abstain) and, for a check, the dealers (1..n) whose pieces the sender holds."""

    step: str
    pieces: tuple[bytes, ...]
    held: tuple[int, ...] = ()


def encode_secagg(msg: SecAgg) -> bytes:
    """The body: msgpack [step (str), [piece (bin), ...], [dealer (uint), ...]]; a deal's
    is then sealed to its recipient (gossip.seal) by the sender."""
    if msg.step not in _SECAGG_PIECES or len(msg.pieces) not in _secagg_counts(
            msg.step, MAX_SECAGG_MEMBERS):
        raise LocalError(f"secagg {msg.step!r} with {len(msg.pieces)} piece(s)")
    if msg.held and (msg.step != "check" or list(msg.held) != sorted(set(msg.held))
                     or msg.held[0] < 1 or msg.held[-1] > MAX_SECAGG_MEMBERS):
        raise LocalError(f"secagg {msg.step}: held dealers {msg.held!r}")
    return msgpack.packb([msg.step, [bytes(p) for p in msg.pieces], list(msg.held)],
                         use_bin_type=True)


def decode_secagg(body: bytes | memoryview, members: int, sender: str | None = None,
                  deal: bool = False, dim: int | None = None) -> SecAgg:
    """A secure round's body, read field by field: the step one this kind carries (a deal
    for kind "deal", an opened step for "secagg"), exactly its number of byte strings, each
    within its size for `members` members and `dim` model values (secagg_piece_limits,
    checked before it is copied), and for a check at most `members` distinct dealers
    1..members in increasing order."""
    try:
        r = Reader(body)
        if r.array_header() != 3:
            raise WireError("not [step, pieces, held]")
        step = r.str(16)
        if step not in ((SECAGG_DEAL,) if deal else SECAGG_STEPS):
            raise WireError(f"step {shorten(step)} in a {'deal' if deal else 'secagg'} message")
        count = r.array_header()
        allowed = _secagg_counts(step, members)
        if count not in allowed:
            expected = " or ".join(map(str, allowed)) if len(allowed) < 4 else f"at most {members}"
            raise WireError(f"{count} pieces in a {step} message (expected {expected})")
        limits = secagg_piece_limits(step, members, dim)
        pieces = []
        for k in range(count):
            limit = limits[k]
            try:
                pieces.append(bytes(r.bin(limit)))
            except WireError as exc:
                raise WireError(f"{step} piece {k}: {exc} (the most for {members} members"
                                f"{'' if dim is None else f', d = {dim}'})") from None
        n_held = r.array_header()
        if n_held > (members if step == "check" else 0):
            raise WireError(f"{n_held} held dealers in a {step} message of {members} members")
        held = tuple(r.uint(members + 1) for _ in range(n_held))
        if any(d < 1 for d in held) or list(held) != sorted(set(held)):
            raise WireError("held dealers are not distinct members 1..n in increasing order")
        r.done()
    except WireError as exc:
        raise RemoteError("bad_body", f"a secure-aggregation message is [step, [piece, ...], "
                          f"[dealer, ...]]: {exc}", sender) from None
    return SecAgg(step, tuple(pieces), held)

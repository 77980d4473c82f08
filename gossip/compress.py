"""Compressed shares: the codecs a consortium's [rules] may agree (`compression`).

Bytes and numpy only (gossip never imports node or torch): the node hands in float32
arrays and a source of uniform numbers, and gets back the wire items and what a
receiver will decode from them.

    compression = "none"          # today's share: the model, float32 (the default)
    compression = "fp16"          # the update, float16 (round to nearest)
    compression = "int8"          # the update, int8 per block of INT8_BLOCK values, one
                                  # float32 scale per block, stochastic rounding
    compression = "topk:0.1"      # the update's largest |values|, a fraction of each
                                  # tensor, with error feedback kept by the sender

A compressed share carries the sender's **update** (its released model minus the
model it started the round from), not its model: a receiver reads it as its own
round-start model plus that update (`Rebased`). Every honest member starts a round
from the same aggregate (up to the disagreement the rounds allow), and the rules
judge a share by its distance from that start anyway. The share body (gossip.bodies)
is then the map

    {"weight": float, "codec": NAME, "tensors": [[name, "<f4", shape, data], ...],
     "norm": bin 32 (federated normalization only)}

(top-k version 2: "tensors": [data, ...], one per tensor of the model in its order: the
name, dtype and shape a receiver would only check equal to its own spec are left out)

with "codec" before "tensors" (a reader needs it to read them), NAME the agreed
codec's wire name (`Codec.wire_name`: its canonical name, with top-k's wire version),
and per tensor of n values, `data`:

- fp16: bin, n x <f2;
- int8: [block (uint), scales (bin, ceil(n / block) x <f4, finite, >= 0),
  q (bin, n x int8)]; value i = q[i] x scales[i // block]; block = INT8_BLOCK;
- topk:F (wire version 2, declared as "topk2:F"): [k (uint), gaps (bin, k unsigned
  LEB128 varints: the first index, then each index minus the one before, >= 1, so the
  indices are strictly increasing; canonical, at most ceil(bits(n - 1) / 7) bytes each;
  the last index < n), scales (bin, ceil(k / block) x <f4, finite, >= 0), q (bin, k x
  int8)]; value j = q[j] x scales[j // block], block = INT8_BLOCK, k = min(n, max(1,
  ceil(F x n))) exactly. A kept value costs one int8 and its gap (one byte while the
  kept values are closer than 128 apart, two below 16,384), against 2 + 2 (or 4 + 2)
  bytes in version 1 ("topk:F": uint16/32 index, float16 value, wrapped tensors); each
  version refuses the other's shares by the declared name (reason `codec`).

Without a "codec" key a body is today's uncompressed share, byte for byte.

A reader checks every declared size against the agreed codec and the model's spec
(count, block, k) and against the bytes actually there *before* it allocates; the
decoded arrays are then n float32 values per tensor of the model, whatever a peer
declares. A share whose codec is not the agreed one is refused (`codec`).

Errors (each what it is, for the audit log, and stated in the module's tests):
fp16 rounds to nearest: |error| <= 2^-11 |x| in float16's normal range (|x| >= 2^-14),
<= 2^-25 below it; |x| > 65504 overflows to inf and is refused by every receiver (the
sender releases nothing: node/runtime/release.py). int8: |error| < the block's scale
= max |x| over the block / 127, and the expected decoded value is x (the rounding
draws a uniform number per value: unbiased). top-k sends about F of each tensor, its
values rounded as int8's (stochastic, per block of kept values); what it leaves out
and that rounding's error are the sender's residual, added to its next round's
update (error feedback), so over rounds the sum of what was sent is the sum of the
updates less the last residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gossip.errors import LocalError, RemoteError, shorten
from gossip.wire import Reader, WireError

NONE, FP16, INT8, TOPK = "none", "fp16", "int8", "topk"
KINDS = (NONE, FP16, INT8, TOPK)
# int8: values per scale. 256 keeps the scales at 1.6 % of the int8 bytes (3.94 x fewer
# bytes than float32 in all) while one large value costs precision in 255 others only.
INT8_BLOCK = 256
INT8_MAX = 127  # symmetric: q in [-127, 127]
# top-k's wire version (the layout above); the body declares TOPK_WIRE:F, so a node of
# version 1 ("topk:F": uint16/32 indices, float16 values) and one of version 2 refuse
# each other's shares by name (`codec`) instead of misreading them.
TOPK_WIRE = "topk2"
# LEB128: 7 bits of a gap per byte, the high bit set on every byte but a gap's last.
VARINT_BITS = 7
# top-k fraction: at least one value in a million (below that a share says next to
# nothing), at most everything.
MIN_TOPK_FRACTION = 1e-6
# A codec name on the wire is short ("topk:0.001"); anything longer is not one.
MAX_CODEC_NAME = 32
# float16's largest finite value: an update beyond it is not sent (overflow to inf).
FP16_MAX = 65504.0

Uniform = Callable[[int], np.ndarray]  # n uniform numbers in [0, 1)


@dataclass(frozen=True)
class Codec:
    """One agreed codec: "none", "fp16", "int8" or "topk" with its fraction."""

    kind: str = NONE
    fraction: float | None = None  # top-k only

    @property
    def name(self) -> str:
        """The canonical name: what [rules] holds and a share's body declares."""
        return f"{TOPK}:{self.fraction!r}" if self.kind == TOPK else self.kind

    @property
    def wire_name(self) -> str:
        """What a share's body declares: the name, with top-k's wire version."""
        return f"{TOPK_WIRE}:{self.fraction!r}" if self.kind == TOPK else self.kind

    @property
    def compressed(self) -> bool:
        return self.kind != NONE

    @property
    def bare(self) -> bool:
        """Whether a share's tensors are their data alone, in the model's order (top-k
        version 2): the [name, dtype, shape] around them were the receiver's own spec,
        checked equal and telling it nothing (62 of a `default` share's bytes)."""
        return self.kind == TOPK

    @property
    def feedback(self) -> bool:
        """Whether the sender keeps an error-feedback residual (top-k)."""
        return self.kind == TOPK

    def k(self, n: int) -> int:
        """top-k: how many of a tensor's n values a share sends."""
        assert self.fraction is not None
        return min(n, max(1, math.ceil(self.fraction * n)))  # 0 only for an empty tensor

    def max_gap_bytes(self, n: int) -> int:
        """top-k: the most bytes one canonical gap of a tensor of n values takes."""
        return max(1, -(-max(n - 1, 0).bit_length() // VARINT_BITS))


NO_COMPRESSION = Codec()


def parse_codec(text: object, where: str = "compression") -> Codec:
    """A codec from its name ("none", "fp16", "int8", "topk:FRACTION"); a LocalError
    names `where` and what is wrong."""
    if not isinstance(text, str):
        raise LocalError(f"{where}: expected a string (none, fp16, int8 or topk:FRACTION), "
                         f"got {type(text).__name__}")
    kind, sep, arg = text.strip().partition(":")
    if kind in (NONE, FP16, INT8) and not sep:
        return Codec(kind)
    if kind == TOPK and sep:
        try:
            fraction = float(arg)
        except ValueError:
            fraction = float("nan")
        if not (MIN_TOPK_FRACTION <= fraction <= 1):
            raise LocalError(f"{where} = {text!r}: topk's fraction must be a number in "
                             f"[{MIN_TOPK_FRACTION:g}, 1], e.g. topk:0.1")
        return Codec(TOPK, fraction)
    raise LocalError(f"{where} = {shorten(text)}: expected none, fp16, int8 or topk:FRACTION "
                     "(e.g. topk:0.1)")


# --- sending ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Compressed:
    """A compressed update: the body's tensor items, and what a receiver decodes."""

    items: list  # [[name, "<f4", shape, data], ...] or, `Codec.bare`, [data, ...] (msgpack)
    decoded: list[np.ndarray]  # float32, one per tensor, shaped as given


def compress(codec: Codec, tensors: Sequence[tuple[str, np.ndarray]],
             uniform: Uniform | None = None) -> Compressed:
    """Encode named float32 updates with `codec` (not "none"). `uniform(n)`: n uniform
    numbers in [0, 1) for int8's stochastic rounding (the node's OS source in
    production). Non-finite input gives non-finite decoded values (never an exception):
    the caller refuses to release them."""
    if not codec.compressed:
        raise LocalError("compress: the codec is none (an uncompressed share is "
                         "gossip.bodies.encode_share's)")
    items, decoded = [], []
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for name, array in tensors:
            x = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
            if codec.kind == FP16:
                h = x.astype("<f2")
                data: object = h.tobytes()
                out = h.astype(np.float32)
            else:
                if uniform is None:
                    raise LocalError(f"compress: {codec.kind} needs a source of uniform "
                                     "numbers (its stochastic rounding)")
                if codec.kind == INT8:
                    data, out = _int8(x, uniform)
                else:
                    data, out = _topk(codec, x, uniform)
            items.append(data if codec.bare else [name, "<f4", list(np.shape(array)), data])
            decoded.append(out.reshape(np.shape(array)))
    return Compressed(items, decoded)


def _int8(x: np.ndarray, uniform: Uniform) -> tuple[list, np.ndarray]:
    scale, q, out = _quantize(x, uniform)
    return [INT8_BLOCK, scale.tobytes(), q.tobytes()], out


def _quantize(x: np.ndarray, uniform: Uniform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x as int8 per block of INT8_BLOCK values with one float32 scale each, rounded
    stochastically: (scales, q, what a receiver decodes)."""
    n = x.size
    blocks = -(-n // INT8_BLOCK)
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[:n] = x
    padded = padded.reshape(blocks, INT8_BLOCK)
    scale = (np.abs(padded).max(axis=1) / np.float32(INT8_MAX)).astype("<f4")
    safe = np.where(scale > 0, scale, np.float32(1))
    y = padded / safe[:, None]
    u = np.asarray(uniform(blocks * INT8_BLOCK), dtype=np.float64).reshape(blocks, INT8_BLOCK)
    # floor(y + u) with u uniform in [0, 1): y rounded up with probability frac(y),
    # so E[q] = y (unbiased). Clipping only catches float rounding at |y| = 127.
    q = np.clip(np.floor(y + u), -INT8_MAX, INT8_MAX)
    q = np.nan_to_num(q, nan=0.0).astype(np.int8).reshape(-1)[:n]
    out = q.astype(np.float32) * np.repeat(scale, INT8_BLOCK)[:n]
    return scale, q, out


def _topk(codec: Codec, x: np.ndarray, uniform: Uniform) -> tuple[list, np.ndarray]:
    n = x.size
    k = codec.k(n)
    if k == 0:  # an empty tensor
        return [0, b"", b"", b""], np.zeros(0, dtype=np.float32)
    mag = np.nan_to_num(np.abs(x), nan=np.inf)  # a NaN is kept (and refused: never sent)
    idx = select_top(mag, k)
    scale, q, values = _quantize(x[idx], uniform)
    out = np.zeros(n, dtype=np.float32)
    out[idx] = values
    return [k, varints(np.diff(idx, prepend=0)), scale.tobytes(), q.tobytes()], out


def select_top(mag: np.ndarray, k: int) -> np.ndarray:
    """The sorted indices of the k largest of `mag` (ties: any of them). The sender's
    choice alone: a receiver reads any strictly increasing k indices below n
    (scripts/bench_compression.py --select swaps it to measure another rule)."""
    n = mag.size
    return np.sort(np.argpartition(-mag, k - 1)[:k]) if k < n else np.arange(n)


def varints(values: np.ndarray) -> bytes:
    """Unsigned integers as LEB128 (7 bits per byte, low first, the high bit set on
    every byte but each value's last): canonical, the fewest bytes for each."""
    v = np.asarray(values, dtype=np.uint64)
    size = np.ones(v.size, dtype=np.int64)
    for j in range(1, 10):
        size += v >= (np.uint64(1) << np.uint64(VARINT_BITS * j))
    out = np.zeros(int(size.sum()), dtype=np.uint8)
    start = np.cumsum(size) - size
    for j in range(int(size.max(initial=0))):
        has = size > j
        byte = (v[has] >> np.uint64(VARINT_BITS * j)) & np.uint64(0x7F)
        more = (size[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[start[has] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def read_varints(raw: bytes | memoryview, count: int, max_bytes: int) -> np.ndarray:
    """`count` canonical LEB128 values of at most `max_bytes` bytes each from exactly
    `raw` (int64); WireError naming what is wrong. The caller has bounded len(raw) by
    count x max_bytes before: what it allocates is a few times len(raw)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    if b.size == 0:
        if count:
            raise WireError(f"no varint bytes for {count} values")
        return np.zeros(0, dtype=np.int64)
    last = (b & 0x80) == 0  # the last byte of a value
    if int(last.sum()) != count or not last[-1]:
        raise WireError(f"{int(last.sum())} complete varints{'' if last[-1] else ' and a cut one'}"
                        f", expected {count}")
    group = np.concatenate(([0], np.cumsum(last[:-1])))  # which value each byte is of
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    pos = np.arange(b.size) - starts[group]  # the byte's place in its value
    if int(pos.max()) >= max_bytes:
        raise WireError(f"a varint longer than {max_bytes} bytes")
    if ((ends > starts) & (b[ends] == 0)).any():
        raise WireError("a varint is not in its shortest form")
    weights = (b & 0x7F).astype(np.float64) * np.exp2(VARINT_BITS * pos)
    # exact: max_bytes x 7 bits stays below float64's 53 (a tensor of < 2**49 values)
    return np.bincount(group, weights=weights, minlength=count).astype(np.int64)


# --- receiving -------------------------------------------------------------------------

def read_data(r: Reader, codec: Codec, name: str, n: int) -> np.ndarray:
    """One tensor's `data` (n values as the model's spec says), read with `codec`: each
    declared size checked against the codec, n and the bytes left before anything is
    allocated; a flat, read-only float32 array of n values. RemoteError without a peer
    (the caller names it)."""
    label = shorten(name)
    try:
        if codec.kind == FP16:
            raw = r.bin()
            if len(raw) != 2 * n:
                raise RemoteError("shape", f"tensor {label}: {len(raw)} bytes of float16, "
                                  f"its {n} values take {2 * n}")
            out = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif codec.kind == INT8:
            out = _read_int8(r, label, n)
        elif codec.kind == TOPK:
            out = _read_topk(r, codec, label, n)
        else:
            raise LocalError(f"read_data: codec {codec.name} sends no compressed data")
    except WireError as exc:
        raise RemoteError("bad_body", f"tensor {label}: {codec.name} data: {exc}") from None
    if not np.isfinite(out).all():
        raise RemoteError("non_finite", f"tensor {label} holds NaN or infinite values")
    out.flags.writeable = False
    return out


def _read_int8(r: Reader, label: str, n: int) -> np.ndarray:
    if r.array_header() != 3:
        raise RemoteError("bad_body", f"tensor {label}: int8 data is [block, scales, q]")
    block = r.int()
    if block != INT8_BLOCK:
        raise RemoteError("bad_body", f"tensor {label}: int8 block of {shorten(block)} values, "
                          f"the codec's is {INT8_BLOCK}")
    blocks = -(-n // INT8_BLOCK)
    scales_raw = r.bin()
    if len(scales_raw) != 4 * blocks:
        raise RemoteError("shape", f"tensor {label}: {len(scales_raw)} bytes of scales, its "
                          f"{blocks} blocks take {4 * blocks}")
    q_raw = r.bin()
    if len(q_raw) != n:
        raise RemoteError("shape", f"tensor {label}: {len(q_raw)} int8 values, expected {n}")
    scales = _check_scales(scales_raw, label)
    q = np.frombuffer(q_raw, dtype=np.int8)
    with np.errstate(over="ignore"):  # a peer's huge scale: inf, refused by read_data
        return q.astype(np.float32) * np.repeat(scales.astype(np.float32), INT8_BLOCK)[:n]


def _check_scales(raw: memoryview, label: str) -> np.ndarray:
    scales = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(scales).all():
        raise RemoteError("non_finite", f"tensor {label}: an int8 scale is NaN or infinite")
    if (scales < 0).any():
        raise RemoteError("bad_body", f"tensor {label}: a negative int8 scale")
    return scales


def _read_topk(r: Reader, codec: Codec, label: str, n: int) -> np.ndarray:
    if r.array_header() != 4:
        raise RemoteError("bad_body", f"tensor {label}: top-k data is [k, gaps, scales, q]")
    k = r.int()
    want = codec.k(n)
    if k != want:  # before any index is read: a huge k never allocates
        raise RemoteError("bad_body", f"tensor {label}: k = {shorten(k)}, {codec.name} of "
                          f"{n} values sends {want}")
    most = codec.max_gap_bytes(n)
    gaps_raw = r.bin()
    if not k <= len(gaps_raw) <= most * k:
        raise RemoteError("shape", f"tensor {label}: {len(gaps_raw)} bytes of index gaps, "
                          f"{k} take {k} to {most * k}")
    blocks = -(-k // INT8_BLOCK)
    scales_raw = r.bin()
    if len(scales_raw) != 4 * blocks:
        raise RemoteError("shape", f"tensor {label}: {len(scales_raw)} bytes of scales, its "
                          f"{k} values' {blocks} blocks take {4 * blocks}")
    q_raw = r.bin()
    if len(q_raw) != k:
        raise RemoteError("shape", f"tensor {label}: {len(q_raw)} int8 values, expected {k}")
    try:
        gaps = read_varints(gaps_raw, k, most)
    except WireError as exc:
        raise RemoteError("bad_body", f"tensor {label}: top-k index gaps: {exc}") from None
    if k > 1 and (gaps[1:] == 0).any():
        raise RemoteError("bad_body", f"tensor {label}: a top-k index gap is 0 (an index "
                          "repeated: they are strictly increasing)")
    if k and int(gaps.max()) >= n:  # also keeps the sum below int64's range
        raise RemoteError("bad_body", f"tensor {label}: a top-k index gap is "
                          f"{int(gaps.max())}, the tensor has {n} values")
    idx = np.cumsum(gaps)
    if k and int(idx[-1]) >= n:
        raise RemoteError("bad_body", f"tensor {label}: a top-k index is {int(idx[-1])}, "
                          f"the tensor has {n} values")
    scales = _check_scales(scales_raw, label)
    q = np.frombuffer(q_raw, dtype=np.int8)
    out = np.zeros(n, dtype=np.float32)
    with np.errstate(over="ignore"):  # a peer's huge scale: inf, refused by read_data
        out[idx] = q.astype(np.float32) * np.repeat(scales.astype(np.float32), INT8_BLOCK)[:k]
    return out


class Rebased(Mapping[str, np.ndarray]):
    """A compressed share's tensors as a receiver combines them: its own round-start
    model plus the sender's decoded update, computed when read.

    `base(name)` gives the receiver's model tensor `name` as it is *when read*. The node
    gives none: it adds `deltas` (the decoded updates themselves) to the round-start
    model it names (node/runtime/compression.py share_vector), so a share is never read
    on a model that changed since the round started."""

    def __init__(self, deltas: dict[str, np.ndarray],
                 base: Callable[[str], np.ndarray] | None) -> None:
        self.deltas = deltas
        self.base = base

    def __getitem__(self, name: str) -> np.ndarray:
        delta = self.deltas[name]
        if self.base is None:
            raise LocalError("a compressed share is an update: reading it as a model needs "
                             "the receiver's round-start model (Verifier(base=...))")
        start = np.asarray(self.base(name), dtype=np.float32).reshape(delta.shape)
        return start + delta

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)


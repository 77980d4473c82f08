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

with "codec" before "tensors" (a reader needs it to read them), NAME the agreed
codec's canonical name (`Codec.name`), and per tensor of n values, `data`:

- fp16: bin, n x <f2;
- int8: [block (uint), scales (bin, ceil(n / block) x <f4, finite, >= 0),
  q (bin, n x int8)]; value i = q[i] x scales[i // block]; block = INT8_BLOCK;
- topk:F: [k (uint), idx (bin, k x <u2 if n <= 65536 else <u4, strictly increasing,
  each < n), values (bin, k x <f2, finite)]; k = min(n, max(1, ceil(F x n))) exactly.

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
draws a uniform number per value: unbiased). top-k sends about F of each tensor;
what it leaves out (and the float16 rounding of what it sends) is the sender's
residual, added to its next round's update (error feedback), so over rounds the sum
of what was sent is the sum of the updates less the last residual.
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
# top-k: indices are uint16 while a tensor has at most this many values, else uint32.
U16_INDEX_LIMIT = 1 << 16
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
    def compressed(self) -> bool:
        return self.kind != NONE

    @property
    def feedback(self) -> bool:
        """Whether the sender keeps an error-feedback residual (top-k)."""
        return self.kind == TOPK

    def k(self, n: int) -> int:
        """top-k: how many of a tensor's n values a share sends."""
        assert self.fraction is not None
        return min(n, max(1, math.ceil(self.fraction * n)))  # 0 only for an empty tensor

    def index_dtype(self, n: int) -> str:
        return "<u2" if n <= U16_INDEX_LIMIT else "<u4"


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

    items: list  # [[name, "<f4", shape, data], ...] (msgpack-ready)
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
            elif codec.kind == INT8:
                if uniform is None:
                    raise LocalError("compress: int8 needs a source of uniform numbers")
                data, out = _int8(x, uniform)
            else:
                data, out = _topk(codec, x)
            items.append([name, "<f4", list(np.shape(array)), data])
            decoded.append(out.reshape(np.shape(array)))
    return Compressed(items, decoded)


def _int8(x: np.ndarray, uniform: Uniform) -> tuple[list, np.ndarray]:
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
    return [INT8_BLOCK, scale.tobytes(), q.tobytes()], out


def _topk(codec: Codec, x: np.ndarray) -> tuple[list, np.ndarray]:
    n = x.size
    k = codec.k(n)
    mag = np.abs(x)
    idx = np.sort(np.argpartition(-mag, k - 1)[:k]) if k < n else np.arange(n)
    values = x[idx].astype("<f2")
    out = np.zeros(n, dtype=np.float32)
    out[idx] = values.astype(np.float32)
    return [k, idx.astype(codec.index_dtype(n)).tobytes(), values.tobytes()], out


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
    scales = np.frombuffer(scales_raw, dtype="<f4")
    if not np.isfinite(scales).all():
        raise RemoteError("non_finite", f"tensor {label}: an int8 scale is NaN or infinite")
    if (scales < 0).any():
        raise RemoteError("bad_body", f"tensor {label}: a negative int8 scale")
    q = np.frombuffer(q_raw, dtype=np.int8)
    return q.astype(np.float32) * np.repeat(scales.astype(np.float32), INT8_BLOCK)[:n]


def _read_topk(r: Reader, codec: Codec, label: str, n: int) -> np.ndarray:
    if r.array_header() != 3:
        raise RemoteError("bad_body", f"tensor {label}: top-k data is [k, indices, values]")
    k = r.int()
    want = codec.k(n)
    if k != want:  # before any index is read: a huge k never allocates
        raise RemoteError("bad_body", f"tensor {label}: k = {shorten(k)}, {codec.name} of "
                          f"{n} values sends {want}")
    width = np.dtype(codec.index_dtype(n)).itemsize
    idx_raw = r.bin()
    if len(idx_raw) != width * k:
        raise RemoteError("shape", f"tensor {label}: {len(idx_raw)} bytes of indices, "
                          f"{k} take {width * k}")
    val_raw = r.bin()
    if len(val_raw) != 2 * k:
        raise RemoteError("shape", f"tensor {label}: {len(val_raw)} bytes of values, "
                          f"{k} float16 take {2 * k}")
    idx = np.frombuffer(idx_raw, dtype=codec.index_dtype(n))
    if k > 1 and not (idx[1:] > idx[:-1]).all():
        raise RemoteError("bad_body", f"tensor {label}: top-k indices are not strictly "
                          "increasing (repeated or out of order)")
    if k and int(idx[-1]) >= n:
        raise RemoteError("bad_body", f"tensor {label}: a top-k index is {int(idx[-1])}, "
                          f"the tensor has {n} values")
    values = np.frombuffer(val_raw, dtype="<f2")
    out = np.zeros(n, dtype=np.float32)
    out[idx] = values
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


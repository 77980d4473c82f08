"""Arithmetic in the prime field F_p, p = 2^61 - 1 (a Mersenne prime), on numpy uint64.

Why this prime: the fixed-point encoding (`node/secagg/encoding.py`) must hold, without
wrapping, both a sum of n members' vectors and the degree-2 values the robust step
reveals (squared distances and squared norms summed over d coordinates). 61 bits give
room for both at about 2^-24 relative precision (see the encoding's bounds), and reducing
modulo a Mersenne prime is a shift and a mask: 2^61 = 1 (mod p).

Vectorised multiplication splits each operand into 32-bit limbs so that no partial
product overflows uint64 (a, b < 2^61):

    a = ah 2^32 + al,  b = bh 2^32 + bl      (ah, bh < 2^29; al, bl < 2^32)
    ab = hh 2^64 + mid 2^32 + ll,  hh = ah bh < 2^58, mid = ah bl + al bh < 2^62, ll < 2^64

and 2^64 = 8, 2^61 = 1 (mod p) fold each part below 2^61; their sum is below 2^63 and one
more fold plus a conditional subtraction gives the residue. About twenty numpy passes
over the array: 1-2 ms for 100k elements here.

Scalars (evaluation points, Lagrange coefficients, polynomial coefficients of the
decoder's small linear systems) are plain Python ints, reduced mod P.

Randomness: `uniform` reads the OS's CSPRNG (`os.urandom`) unless a test passes its own
generator; nothing here is seeded from a config. Rejection of the 2^61 - 1 (one value in
2^61) keeps the draw exactly uniform on [0, p).
"""

from __future__ import annotations

import os

import numpy as np

from node.secagg.errors import SecAggError

P = (1 << 61) - 1
P64 = np.uint64(P)
_M32 = np.uint64(0xFFFFFFFF)
_M29 = np.uint64((1 << 29) - 1)
_S3, _S29, _S32, _S61 = (np.uint64(s) for s in (3, 29, 32, 61))

FIELD_BITS = 61  # one element on the wire (node/secagg/pieces.py, version 2): 61 bits, packed
_M61 = np.uint64((1 << FIELD_BITS) - 1)
# Values packed per block: 8 elements are exactly 61 bytes. A block of 2^16 elements keeps
# the packing's temporaries near 1 MiB whatever the piece's size.
_PACK_GROUP = 8
_PACK_BLOCK = 1 << 16


class FieldError(SecAggError):
    """A value that is not an element of F_p where one is required (our misuse or a
    peer's bytes: the caller says which)."""


def _fold(s: np.ndarray) -> np.ndarray:
    """Residue of s < 2^63 + 2^62 modulo P."""
    s = (s & P64) + (s >> _S61)
    s = (s & P64) + (s >> _S61)
    return s - P64 * (s >= P64)


def mul(a: np.ndarray | np.uint64, b: np.ndarray | np.uint64) -> np.ndarray:
    """a * b mod P, elementwise (broadcasting); both in [0, P)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    ah, al = a >> _S32, a & _M32
    bh, bl = b >> _S32, b & _M32
    ll = al * bl
    mid = ah * bl + al * bh
    s = ((ah * bh) << _S3) + (mid >> _S29) + ((mid & _M29) << _S32) + (ll >> _S61) + (ll & P64)
    return _fold(s)


def mul_small(a: np.ndarray, x: np.ndarray | np.uint64) -> np.ndarray:
    """a * x mod P for small multipliers 0 <= x < 2^16 (evaluation points): half the
    passes of `mul` (a's high limb times x is below 2^45, its low limb times x below 2^48)."""
    a = np.asarray(a, dtype=np.uint64)
    x = np.asarray(x, dtype=np.uint64)
    u = (a >> _S32) * x
    return _fold((u >> _S29) + ((u & _M29) << _S32) + (a & _M32) * x)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    s = np.asarray(a, dtype=np.uint64) + np.asarray(b, dtype=np.uint64)
    return s - P64 * (s >= P64)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return add(a, P64 - np.asarray(b, dtype=np.uint64))


def neg(a: np.ndarray) -> np.ndarray:
    s = P64 - np.asarray(a, dtype=np.uint64)
    return s - P64 * (s >= P64)


def sum_mod(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sum along `axis` mod P, exact for up to 2^31 terms: the high and low 32-bit halves
    are summed separately (each sum stays below 2^63) and recombined."""
    a = np.asarray(a, dtype=np.uint64)
    if a.shape[axis] >= 1 << 31:
        raise FieldError(f"sum_mod over {a.shape[axis]} terms: at most 2^31 - 1")
    hi = (a >> _S32).sum(axis=axis, dtype=np.uint64)  # < 2^29 * 2^31
    lo = (a & _M32).sum(axis=axis, dtype=np.uint64)  # < 2^32 * 2^31
    # hi * 2^32 mod P: hi < 2^60, so hi = h1 2^29 + h0 and hi 2^32 = h1 2^61 + h0 2^32 = h1 + h0 2^32
    s = _fold((hi >> _S29) + ((hi & _M29) << _S32))
    return _fold(s + _fold(lo))


# Column blocks for products over (k, L) arrays: the limb multiplication makes about ten
# temporaries of the operand's size; kept near the cache's size they cost far less than
# whole 100k-wide rows (measured, 32 x 100k: 1.3 s whole; 47 ms of CPU in blocks of 1024
# columns, 72 ms in blocks of 8192).
_COLUMNS = 1 << 10


def dot_scalars(coeffs: list[int], rows: np.ndarray) -> np.ndarray:
    """sum_j coeffs[j] * rows[j] mod P for a (k, L) array of field elements."""
    c = np.array([x % P for x in coeffs], dtype=np.uint64)[:, None]
    out = np.empty(rows.shape[1], dtype=np.uint64)
    for lo in range(0, rows.shape[1], _COLUMNS):
        out[lo:lo + _COLUMNS] = sum_mod(mul(rows[:, lo:lo + _COLUMNS], c), axis=0)
    return out


def matvec(rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """rows @ vec mod P for (k, L) rows and an L-vector: one field element per row."""
    acc = np.zeros(rows.shape[0], dtype=np.uint64)
    for lo in range(0, rows.shape[1], _COLUMNS):
        acc = add(acc, sum_mod(mul(rows[:, lo:lo + _COLUMNS], vec[None, lo:lo + _COLUMNS]), axis=1))
    return acc


# Matrix products split each element in 3 limbs of 21 bits: a limb product is below 2^42,
# so 2^11 of them sum below 2^53 and float64 (BLAS, any summation order) is exact.
_LIMB_BITS = 21
_LIMB_MASK = np.uint64((1 << _LIMB_BITS) - 1)
_INNER = 1 << 11
# Columns of the right operand per block: its three float64 limb copies stay near a few
# MiB (a (128, 100k) operand whole would make 300 MiB of them).
_OUTER = 1 << 12
# Inner blocks summed before a reduction: each adds below 3 * 2^53 per limb weight, so 255
# of them stay below 2^63 (and _fold takes up to 2^63 + 2^62).
_FOLD_BLOCKS = 255


def _limbs(a: np.ndarray) -> list[np.ndarray]:
    return [((a >> np.uint64(_LIMB_BITS * u)) & _LIMB_MASK).astype(np.float64) for u in range(3)]


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b mod P for an (m, k) and a (k, c) array of field elements, exactly: each entry
    split in 3 limbs of 21 bits, the 9 limb products computed in float64 (BLAS) over
    blocks of 2^11 terms (every partial sum an integer below 2^53), summed per limb weight
    2^(21 s) in uint64 over up to _FOLD_BLOCKS blocks (each adds below 3 * 2^53), then
    reduced mod P. Used for the decoder's syndromes and random combinations."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise FieldError(f"matmul of shapes {a.shape} and {b.shape}")
    m, k = a.shape
    c = b.shape[1]
    out = np.zeros((m, c), dtype=np.uint64)
    for clo in range(0, c, _OUTER):
        chi = min(c, clo + _OUTER)
        acc = np.zeros((5, m, chi - clo), dtype=np.uint64)
        for blocks, lo in enumerate(range(0, k, _INNER)):
            if blocks and blocks % _FOLD_BLOCKS == 0:
                acc = _fold(acc)
            al, bl = _limbs(a[:, lo:lo + _INNER]), _limbs(b[lo:lo + _INNER, clo:chi])
            for u in range(3):
                for v in range(3):
                    acc[u + v] += (al[u] @ bl[v]).astype(np.uint64)  # < 2^53
        part = np.zeros((m, chi - clo), dtype=np.uint64)
        for s in range(5):
            part = add(part, mul(_fold(acc[s]), np.uint64(pow(2, _LIMB_BITS * s, P))))
        out[:, clo:chi] = part
    return out


# Below this many elements Python's pow (about 2 us each) beats 120 numpy multiplications.
_INT_INVERSES = 256


def inv_array(a: np.ndarray) -> np.ndarray:
    """Elementwise inverse mod P (a^(P-2), square and multiply over the array);
    ZeroDivisionError if an element is 0."""
    a = np.asarray(a, dtype=np.uint64)
    if (a == 0).any():
        raise ZeroDivisionError("0 has no inverse in F_p")
    if a.size <= _INT_INVERSES:
        return np.array([pow(v, P - 2, P) for v in a.reshape(-1).tolist()],
                        dtype=np.uint64).reshape(a.shape)
    out = np.ones_like(a)
    base, e = a.copy(), P - 2
    while e:
        if e & 1:
            out = mul(out, base)
        base = mul(base, base)
        e >>= 1
    return out


def check(a: np.ndarray, what: str) -> np.ndarray:
    """a as uint64, refusing anything outside [0, P) (FieldError naming `what`)."""
    a = np.asarray(a)
    if a.dtype != np.uint64:
        raise FieldError(f"{what}: dtype {a.dtype}, expected uint64 field elements")
    if a.size and int(a.max()) >= P:
        raise FieldError(f"{what}: value {int(a.max())} is not below the field's prime 2^61 - 1")
    return a


def uniform(shape: int | tuple[int, ...], test_only_rng: np.random.Generator | None = None) -> np.ndarray:
    """Uniform elements of F_p from the OS's CSPRNG (`os.urandom`), exact by rejection.

    `test_only_rng` makes a test deterministic; it must never be set for real shares (a
    seeded generator's output can be predicted, and with it every piece)."""
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.uint64)
    filled = 0
    while filled < n:
        k = n - filled
        if test_only_rng is None:
            raw = np.frombuffer(os.urandom(8 * k), dtype=np.uint64)
        else:
            raw = test_only_rng.integers(0, 1 << 64, size=k, dtype=np.uint64)
        raw = raw >> np.uint64(3)  # 61 uniform bits
        raw = raw[raw != P64]
        out[filled:filled + raw.size] = raw
        filled += raw.size
    return out.reshape(shape)


def random_scalar(test_only_rng: np.random.Generator | None = None) -> int:
    return int(uniform(1, test_only_rng)[0])


# --- scalars (Python ints) ---------------------------------------------------------------

def inv(a: int) -> int:
    a %= P
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in F_p")
    return pow(a, P - 2, P)


def lagrange_at(xs: list[int], at: int) -> list[int]:
    """Coefficients l_j with f(at) = sum_j l_j f(xs[j]) for every f of degree < len(xs)."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for i, xi in enumerate(xs):
            if i != j:
                num = num * (at - xi) % P
                den = den * (xj - xi) % P
        out.append(num * inv(den) % P)
    return out


def poly_eval(coeffs: list[int], x: int) -> int:
    """coeffs[0] + coeffs[1] x + ... at x (Horner), mod P."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % P
    return acc


def poly_divmod(num: list[int], den: list[int]) -> tuple[list[int], list[int]]:
    """Quotient and remainder of polynomials (lowest coefficient first) over F_p."""
    num = [c % P for c in num]
    while len(den) > 1 and den[-1] % P == 0:
        den = den[:-1]
    lead = inv(den[-1])
    q = [0] * max(len(num) - len(den) + 1, 1)
    r = num[:]
    for k in range(len(num) - len(den), -1, -1):
        c = r[k + len(den) - 1] * lead % P
        q[k] = c
        if c:
            for i, d in enumerate(den):
                r[k + i] = (r[k + i] - c * d) % P
    rem = r[:len(den) - 1] or [0]
    return q, rem


def inverse(m: np.ndarray) -> np.ndarray:
    """The inverse of a square matrix over F_p (Gauss-Jordan, each step one numpy pass over
    the augmented (k, 2k) array); SecAggError if it is singular."""
    m = np.asarray(m, dtype=np.uint64)
    k = m.shape[0]
    a = np.concatenate([m, np.eye(k, dtype=np.uint64)], axis=1)
    for c in range(k):
        nz = np.flatnonzero(a[c:, c])
        if not nz.size:
            raise FieldError(f"singular {k} x {k} matrix")
        pr = c + int(nz[0])
        a[[c, pr]] = a[[pr, c]]
        a[c] = mul(a[c], np.uint64(inv(int(a[c, c]))))
        f = a[:, c].copy()
        f[c] = 0
        a = sub(a, mul(f[:, None], a[c][None, :]))
    return a[:, k:]


def solve(rows: list[list[int]], rhs: list[int]) -> list[int] | None:
    """One solution x of rows @ x = rhs over F_p (free variables 0), or None if there is
    none. Gaussian elimination on Python ints: the systems are (members x members)."""
    m, k = len(rows), len(rows[0]) if rows else 0
    a = [[v % P for v in row] + [b % P] for row, b in zip(rows, rhs, strict=True)]
    pivots: list[int] = []
    r = 0
    for c in range(k):
        pr = next((i for i in range(r, m) if a[i][c]), None)
        if pr is None:
            continue
        a[r], a[pr] = a[pr], a[r]
        iv = inv(a[r][c])
        a[r] = [v * iv % P for v in a[r]]
        for i in range(m):
            if i != r and a[i][c]:
                f = a[i][c]
                a[i] = [(vi - f * vr) % P for vi, vr in zip(a[i], a[r], strict=True)]
        pivots.append(c)
        r += 1
        if r == m:
            break
    if any(a[i][k] for i in range(r, m)):
        return None
    x = [0] * k
    for i, c in enumerate(pivots):
        x[c] = a[i][k]
    return x


# --- wire packing: 61 bits per element ----------------------------------------------------

def packed_bytes(count: int) -> int:
    """Bytes of `count` elements packed at 61 bits: ceil(61 count / 8)."""
    return (FIELD_BITS * count + 7) // 8


def pack(a: np.ndarray) -> bytes:
    """Elements of F_p (each below 2^61, `check`ed by the caller) as a little-endian bit
    string, element k at bits 61k .. 61k + 60, the last byte's unused high bits 0.

    Per group of 8 elements (61 bytes): word m (m < 7) is v_m >> 3m | v_(m+1) << (61 - 3m),
    then the 5 low bytes of v_7 >> 21."""
    a = np.ascontiguousarray(a, dtype=np.uint64).reshape(-1)
    parts = []
    for lo in range(0, a.size, _PACK_BLOCK):
        v = a[lo:lo + _PACK_BLOCK]
        groups = -(-v.size // _PACK_GROUP)
        if v.size != groups * _PACK_GROUP:  # zeros pad the last group (their bits are 0)
            v = np.concatenate([v, np.zeros(groups * _PACK_GROUP - v.size, dtype=np.uint64)])
        v = v.reshape(groups, _PACK_GROUP)
        w = np.empty((groups, _PACK_GROUP), dtype="<u8")
        for m in range(_PACK_GROUP - 1):
            w[:, m] = (v[:, m] >> np.uint64(3 * m)) | (v[:, m + 1] << np.uint64(61 - 3 * m))
        w[:, 7] = v[:, 7] >> np.uint64(21)
        parts.append(w.view(np.uint8).reshape(groups, 64)[:, :61].tobytes())
    return b"".join(parts)[:packed_bytes(a.size)]


def unpack(data: bytes | memoryview, count: int) -> np.ndarray:
    """The `count` elements `pack` wrote: uint64 values below 2^61 (2^61 - 1 itself, not a
    field element, is for the caller to refuse). The caller checks len(data) ==
    packed_bytes(count) first; this allocates 8 bytes a value, in blocks."""
    if len(data) != packed_bytes(count):
        raise FieldError(f"{len(data)} bytes for {count} packed elements, expected "
                         f"{packed_bytes(count)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(count, dtype=np.uint64)
    per = _PACK_BLOCK // _PACK_GROUP * 61  # bytes of a whole block
    for b, lo in enumerate(range(0, count, _PACK_BLOCK)):
        chunk = raw[b * per:(b + 1) * per]
        groups = -(-min(_PACK_BLOCK, count - lo) // _PACK_GROUP)
        padded = np.zeros((groups, 64), dtype=np.uint8)
        flat = np.zeros(groups * 61, dtype=np.uint8)
        flat[:chunk.size] = chunk
        padded[:, :61] = flat.reshape(groups, 61)
        w = padded.view("<u8").reshape(groups, _PACK_GROUP).astype(np.uint64)
        v = np.empty((groups, _PACK_GROUP), dtype=np.uint64)
        v[:, 0] = w[:, 0] & _M61
        for m in range(_PACK_GROUP - 1):
            v[:, m + 1] = ((w[:, m] >> np.uint64(61 - 3 * m))
                           | (w[:, m + 1] << np.uint64(3 * m + 3))) & _M61
        n = min(_PACK_BLOCK, count - lo)
        out[lo:lo + n] = v.reshape(-1)[:n]
    return out

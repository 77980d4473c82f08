"""Fixed-point encoding of a clipped float vector into F_p (p = 2^61 - 1), with checked bounds.

Construction. A member's vector x (d floats, L2 norm at most the clip C) becomes the
integer vector q = round(S x) with scale S = 2^s, each coordinate stored as its residue
mod p (a negative q_k as p + q_k). Decoding takes the signed representative in
(-p/2, p/2) and divides by S.

Bounds (all exact, in integers). Rounding moves each coordinate by at most 1/2, so an
honest encoding has

    ||q|| <= R := C S (1 + NORM_SLACK) + sqrt(d) / 2

(NORM_SLACK absorbs a float32 clip landing a few ulps above C). The scale is the largest
power of two with

    (2 n R)^2 < p                                                     (*)

for n members. (*) implies, for honest members:
- a sum of up to n encodings has every coordinate below n R < p / 2 in magnitude, so it
  decodes exactly to the integer sum (no wrap);
- every squared norm ||q_i||^2 <= R^2 and squared distance ||q_i - q_j||^2 <= (2R)^2 is
  below p: the degree-2 values of the robust step, summed over the d coordinates (and
  nothing else), are the integers themselves;
- and the aggregate check is sound: the decoder accepts a sum of m selected vectors only
  if its exact integer norm is at most m R. A single hostile member's signed contribution
  is then within (2m - 1) R < 2 n R of zero, so its squared norm is below p by (*) and
  the in-field norm check ||q||^2 mod p <= R^2 was the true integer check: a member cannot
  pass the norm bound by crafting a vector whose squared norm wraps around p (such a
  vector, e.g. half-integers mod p, makes the aggregate fail the check instead; the round
  then fails, without naming anyone: see docs/privacy-secure.md). Colluding hostile
  members' combined contribution is within (2m - 1) R likewise.

Precision. The worst-case rounding error of one vector is sqrt(d) / (2S) in L2, its
typical size sqrt(d / 12) / S. At n = 32 members, C = 1, d = 100k: S = 2^24, typical
error 5.4e-6 (relative to C), worst 9.4e-6; at n = 8, S = 2^26. FieldOverflow if no scale
gives a relative worst-case error below MAX_RELATIVE_ERROR.

What a party learns: nothing here is revealed by itself; this module only maps numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from node.secagg.errors import SecAggError
from node.secagg.field import P64, P, check

# A clipped float32 vector can land a few ulps above the clip (float32 eps is 1.2e-7;
# the norm of a rescaled vector carries ~sqrt(d) ulp-sized errors in its squares, well
# under 1e-6 of C): accepted, and counted in the bound R.
NORM_SLACK = 1e-6
# Refuse parameters whose rounding error (worst case, relative to the clip) exceeds this:
# beyond it the encoding, not the DP noise, would dominate a member's error.
MAX_RELATIVE_ERROR = 2.0 ** -10
# The largest scale considered (2^52: float64 carries 53 bits, beyond that S x rounds
# before we do).
MAX_SCALE_BITS = 52


class EncodingError(SecAggError):
    """The base of this module's errors (all mean: this vector or these parameters cannot
    be encoded or decoded without a wrap)."""


class FieldOverflow(EncodingError):
    """The parameters (clip, dimension, members, scale) would let an honest sum or squared
    distance wrap around p, or leave a rounding error above MAX_RELATIVE_ERROR. The
    operator's choice, not a peer's."""


class NormTooLarge(EncodingError):
    """A vector above the clip (or non-finite) was given to encode: the caller's fault (it
    must clip first); encoding it could wrap."""


class AggregateOutOfBounds(EncodingError):
    """A decoded sum of m members' vectors has integer norm above m R: some selected member
    shared an encoding that was not the encoding of a clipped vector (e.g. crafted so its
    squared norm wraps). The contributors' fault, not attributable from the sum alone."""


def int_sq_norm(q: np.ndarray) -> int:
    """Exact sum of squares of an int64 vector, as a Python int: summed in int64 chunks
    short enough that no chunk's sum reaches 2^63 (exact Python ints past |q| >= 2^31)."""
    q = np.asarray(q, dtype=np.int64).reshape(-1)
    top = int(np.abs(q).max()) if q.size else 0
    if top == 0:
        return 0
    if top >= 1 << 31:
        return sum(int(v) * int(v) for v in q.tolist())  # only out-of-bound input gets here
    chunk = max(1, (1 << 62) // (top * top))
    return sum(int((c * c).sum()) for c in np.split(q, range(chunk, q.size, chunk)))


def signed(v: np.ndarray) -> np.ndarray:
    """The signed representative in (-p/2, p/2] of field elements, as int64."""
    v = check(v, "field vector")
    half = np.uint64(P // 2)
    return np.where(v > half, -((P64 - v).astype(np.int64)), v.astype(np.int64))


@dataclass(frozen=True)
class FixedPoint:
    """The encoding agreed for a round: clip C, dimension d, members n, scale 2^scale_bits.
    Build with `FixedPoint.choose` (largest safe scale) or give scale_bits to have it
    checked."""

    clip: float
    dim: int
    members: int
    scale_bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise FieldOverflow(f"clip {self.clip!r}: must be a positive finite number")
        if self.dim < 1 or self.members < 1:
            raise FieldOverflow(f"dim {self.dim}, members {self.members}: both must be >= 1")
        if not 0 <= self.scale_bits <= MAX_SCALE_BITS:
            raise FieldOverflow(f"scale 2^{self.scale_bits}: must be in 2^0..2^{MAX_SCALE_BITS}")
        if (2 * self.members * self.radius_ceil) ** 2 >= P:
            raise FieldOverflow(
                f"scale 2^{self.scale_bits} with clip {self.clip:g}, d = {self.dim}, "
                f"{self.members} members: (2 n R)^2 = {(2 * self.members * self.radius_ceil) ** 2}"
                f" >= p = 2^61 - 1; a sum or squared distance could wrap")
        if self.relative_error > MAX_RELATIVE_ERROR:
            raise FieldOverflow(
                f"scale 2^{self.scale_bits}: worst-case rounding error {self.relative_error:.3g}"
                f" of the clip > {MAX_RELATIVE_ERROR:.3g} (d = {self.dim}, {self.members} members"
                f" leave too few bits in a 61-bit field)")

    @classmethod
    def choose(cls, clip: float, dim: int, members: int) -> FixedPoint:
        """The largest scale 2^s satisfying (*); FieldOverflow if none is precise enough."""
        if not (math.isfinite(clip) and clip > 0) or dim < 1 or members < 1:
            raise FieldOverflow(f"clip {clip!r}, dim {dim}, members {members}: "
                                "need a positive finite clip, d >= 1, n >= 1")
        for s in range(MAX_SCALE_BITS, -1, -1):
            r = math.ceil(clip * 2.0 ** s * (1 + NORM_SLACK) + math.sqrt(dim) / 2)
            if (2 * members * r) ** 2 < P:
                return cls(clip, dim, members, s)
        raise FieldOverflow(f"clip {clip:g}, d = {dim}, {members} members: no scale fits")

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

    @property
    def radius_ceil(self) -> int:
        """R rounded up: ||q|| <= R for every honest encoding."""
        return math.ceil(self.clip * self.scale * (1 + NORM_SLACK) + math.sqrt(self.dim) / 2)

    @property
    def norm_bound_sq(self) -> int:
        """The bound the secure norm check applies to ||q||^2 (integer, below p)."""
        return self.radius_ceil ** 2

    @property
    def distance_bound_sq(self) -> int:
        """Every honest pair's ||q_i - q_j||^2 is at most this (below p)."""
        return (2 * self.radius_ceil) ** 2

    @property
    def relative_error(self) -> float:
        """Worst-case L2 rounding error of one vector, relative to the clip."""
        return math.sqrt(self.dim) / (2 * self.scale * self.clip)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The field encoding of a clipped vector; NormTooLarge if it is not finite, of the
        wrong length, or above the clip (it could wrap)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size != self.dim:
            raise NormTooLarge(f"vector of {x.size} values, the encoding is for d = {self.dim}")
        if not np.isfinite(x).all():
            raise NormTooLarge("vector has non-finite values (NaN or inf): refusing to encode")
        norm = float(np.linalg.norm(x))
        if norm > self.clip * (1 + NORM_SLACK):
            raise NormTooLarge(f"vector norm {norm:.9g} > clip {self.clip:g}: clip before "
                               "encoding (an unclipped vector could wrap the field)")
        q = np.rint(x * self.scale).astype(np.int64)
        if int_sq_norm(q) > self.norm_bound_sq:  # cannot happen given the checks above
            raise NormTooLarge(f"encoded norm^2 {int_sq_norm(q)} > bound {self.norm_bound_sq}")
        return np.where(q < 0, q + P, q).astype(np.uint64)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float64 sum of `count` members' vectors from its field encoding, after checking
        its exact integer norm is at most count R (AggregateOutOfBounds otherwise)."""
        if not 1 <= count <= self.members:
            raise EncodingError(f"decode_sum of {count} vectors: the encoding holds 1..{self.members}")
        q = signed(total)
        bound = count * self.radius_ceil
        if q.size and int(np.abs(q).max()) > bound:
            raise AggregateOutOfBounds(
                f"a coordinate of the sum of {count} is {int(np.abs(q).max())} > {bound} = m R:"
                " a selected member's encoding was not a clipped vector (it wrapped)")
        sq = int_sq_norm(q)
        if sq > bound * bound:
            raise AggregateOutOfBounds(
                f"the sum of {count} has norm^2 {sq} > (m R)^2 = {bound * bound}: a selected "
                "member's encoding was not a clipped vector (it wrapped)")
        return q.astype(np.float64) / self.scale


@dataclass(frozen=True)
class IntegerCodec:
    """The encoding of distributed DP's contributions (node/privacy/distributed.py
    member_contribution): integer vectors already (rounded examples plus Skellam noise),
    entered into F_p as they are. No scaling and no rounding here: the sum's privacy rests on
    the exact sum of the members' Skellam shares, and a member re-rounding its noised vector
    would change it. `bound`: the public bound on every coordinate of an honest sum of the
    consortium (node/privacy/secure.py SecurePlan.coordinate_bound), and so of each
    member's part of it; members * bound < p / 2, so a sum of contributions that passed
    `encode` never wraps. decode_sum returns the exact integer sum (int64); the caller
    scales it back (distributed.decode_sum)."""

    members: int
    dim: int
    bound: int

    def __post_init__(self) -> None:
        if type(self.bound) is not int or self.bound < 1 or self.dim < 1 or self.members < 1:
            raise FieldOverflow(f"integer encoding: bound {self.bound!r}, dim {self.dim}, "
                                f"members {self.members}: all must be integers >= 1")
        if 2 * self.members * self.bound >= P:
            raise FieldOverflow(f"integer encoding: {self.members} members x coordinate bound "
                                f"{self.bound} reach p / 2 = 2^60: a sum could wrap")

    @property
    def norm_bound_sq(self) -> int:
        """For the variants that open norms and distances (under DP they are charged per
        member, docs/privacy-secure.md): ||q||^2 <= d bound^2, sound only if (2 n R)^2 < p."""
        r_sq = self.dim * self.bound ** 2
        if 4 * self.members ** 2 * r_sq >= P:
            raise FieldOverflow(f"integer encoding: d = {self.dim} coordinates up to {self.bound} "
                                f"at {self.members} members: squared norms and distances could "
                                "wrap p; only variant sum_only can carry these contributions")
        return r_sq

    def encode(self, q: np.ndarray) -> np.ndarray:
        """The field encoding of an integer contribution; NormTooLarge if it is not an integer
        vector of length d with every coordinate within the bound."""
        q = np.asarray(q)
        if q.dtype.kind not in "iu" or q.ndim != 1 or q.size != self.dim:
            raise NormTooLarge(f"integer encoding: need {self.dim} integers, got "
                               f"{q.dtype} of shape {q.shape}")
        q = q.astype(np.int64)
        if q.size and int(np.abs(q).max()) > self.bound:
            raise NormTooLarge(f"integer encoding: a coordinate of {int(np.abs(q).max())} > the "
                               f"bound {self.bound} (more rows or noise than the plan's bound)")
        return np.where(q < 0, q + P, q).astype(np.uint64)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The exact integer sum (int64) of `count` contributions; AggregateOutOfBounds if a
        coordinate exceeds the bound of an honest sum (a member added more than its rows and
        noise can explain)."""
        if not 1 <= count <= self.members:
            raise EncodingError(f"decode_sum of {count} vectors: the encoding holds 1..{self.members}")
        q = signed(total)
        if q.size and int(np.abs(q).max()) > self.bound:
            raise AggregateOutOfBounds(
                f"a coordinate of the sum of {count} is {int(np.abs(q).max())} > {self.bound}, "
                "the bound of an honest sum: some member's contribution was out of range")
        return q

"""A per-member bound check on Shamir-shared vectors that opens one bit per member (issue
22, variant "range"): sound against a dealer that deals any field elements it likes, the
wraparound vectors included. After ACORN (Bell, Gascon, Lepoint, Li, Mironov, Raykova
2022, "ACORN: Input Validation for Secure Aggregation"), with sparse projections.

Setting: dealer i has shared x in F_p^d with degree t (the round's VECTOR sharing, checked
consistent by the dealing check). Its honest contribution is an integer vector with
||x||_2 <= B (B public: node/runtime/secure_range.py member_norm_bound).

1. **projections** (public, drawn after x is committed: `projections(challenge, ...)`):
   r vectors u_k in {-1, 0, 1}^d, each coordinate -1, 0, 1 with probability 1/4, 1/2, 1/4.
   Every holder computes its piece of y_k = <u_k, x> from its piece of x (linear).
2. **witness** (the dealer, after the projections, `witness`): the L bits of y_k + M,
   M = 2^(L-1), for each k, and the S bits of the slack K - sum_k y_k^2, shared with the
   same degree t (`share_witness`, plus one blinding value).
3. **check value** (each holder, opened masked; `check_piece`): with public coefficients
   alpha, beta, gamma drawn after the witness is committed,

       v = sum_rho alpha_rho b_rho (b_rho - 1)                 (every dealt bit is a bit)
         + sum_k beta_k (y_k + M - sum_l 2^l b_{k,l})          (projections = their bits)
         + gamma (K - sum_k y_k^2 - sum_l 2^l s_l)             (the slack identity)

   computed on the holder's pieces: a degree-2t sharing whose value is 0 for an honest
   dealer. Holder j adds j * w(j) (w: the round's degree 2t - 1 mask generators summed
   over the dealers, as robust.py's degree-2 step), so the opened polynomial is uniform
   given its value at 0: the openings reveal v only.
4. **judge** (`judge`): v decoded (robust.py's decoding, at most t wrong openers); a dealer
   with v != 0 is out of range ("norm_out_of_range"), left out; the others are summed.

Soundness (a dealer that passes has ||x~|| <= s B, x~ the centered lift of x to
(-p/2, p/2)^d), per dealing:

- any error (a non-bit, a projection unequal to its bits, a false slack) makes v a
  non-zero polynomial of degree 1 in (alpha, beta, gamma): v = 0 with probability 1/p.
- so every y_k is an integer in [-M, M) and, as r M^2, K, 2^S < p / 2, sum_k y_k^2 <= K
  over the integers.
- wraparound: if some |x~_c| >= 2^L, each y_k lands in [-M, M) with probability <= 1/2
  (given the other coordinates' terms z, at most one of z, z +- x_c is in a window of
  width 2^L unless 2 x_c is, and u_c = 0 has probability 1/2): all r pass with <= 2^-r.
  (Rademacher +-1 projections would not do: x = (h, h, 0, ...) with 2h = -1 mod p gives
  projections in {-1, 0, 1} for every sign pattern; robust.py's opened norms pass it
  too: ||x||^2 = 2 h^2 = 1/2 mod p.)
- else every |x~_c| < 2^L, and d 2^L < p / 2 (checked) makes each y_k the exact integer
  <u_k, x~>. Then E y^2 = ||x~||^2 / 2 and E y^4 <= 3 (E y^2)^2 (computed), so by
  Paley-Zygmund each y_k^2 > theta ||x~||^2 / 2 with probability >= (1 - theta)^2 / 3,
  independently over k; sum y_k^2 <= K then needs at most K / (theta ||x~||^2 / 2) of
  them: a Binomial lower tail (`soundness_factor` finds the least s for 2^-kappa).

Completeness (an honest dealer with ||x|| <= B passes, `RangeParams.build`): u x is
sub-Gaussian with variance proxy x^2 / 2 per coordinate ((1 + cosh z) / 2 <= e^(z^2 / 4)),
so P(|y_k| >= M) <= 2 exp(-M^2 / ||x||^2) (union over k: FAILURE_PROJECTION), and
sum_k y_k^2 is dominated in its moment generating function by ||x||^2 / 2 chi^2_r, so
Laurent-Massart gives sum y_k^2 <= B^2 / 2 (r + 2 sqrt(r l) + 2 l), l = ln(1 / FAILURE_SLACK).

What is opened: v per dealer, 0 for an honest dealer in range (the mask makes the rest of
the opened polynomial uniform): the bit "in range". An honest dealer past its range (the
completeness tail) knows it before it deals and does not deal (`witness` raises
OutOfRange): it drops, one bit. A dealer that deals a false witness opens a public-coin
combination of its own errors: nothing of any other member's vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np

from node.secagg import field as F
from node.secagg.errors import SecAggError
from node.secagg.shamir import decode, share

# Projections per dealing: with r = 128 a wrapped vector passes with <= 2^-128, and an
# honest dealing's bound K is 2.41 x r B^2 / 2 (the chi^2 tail at 2^-42); the witness is
# r L + S field elements per holder (about 3,100 at digits' B).
PROJECTIONS = 128
# The completeness tails: each projection's range (union over r) and the slack, each
# failing an honest dealer in range with at most this; member_norm_bound's two tails
# (rows sampled, noise norm) take 2^-42 each: 4 x 2^-42 = 2^-40 per member and round.
FAILURE_PROJECTION = 2.0 ** -42
FAILURE_SLACK = 2.0 ** -42
# The soundness level the stated factor is for: a dealing past s B passes with at most
# 2^-SOUNDNESS_BITS (per dealing; a dealer may redraw its dealing within the round's
# deadline only, and the challenge binds the round's beacon: docs/privacy-secure.md).
SOUNDNESS_BITS = 40
# The most witness values a deal carries: the wire's room for them (gossip/bodies.py
# SECAGG_WITNESS_MAX, the same; the core imports nothing outside numpy and itself).
WITNESS_MAX = 1 << 14
_HALF_P = F.P // 2


class OutOfRange(SecAggError):
    """An honest dealer's own vector fails its range (the completeness tail, or a vector
    past the bound): it cannot make a witness, and does not deal."""


@dataclass(frozen=True)
class RangeParams:
    """What every member agrees on for the check (all derived from d and B)."""

    dim: int  # d
    projections: int  # r
    bits: int  # L: each y_k + M in [0, 2^L), M = 2^(L - 1)
    slack_bits: int  # S: K - sum y_k^2 in [0, 2^S)
    bound_sq: int  # K

    def __post_init__(self) -> None:
        d, r, L, S, K = self.dim, self.projections, self.bits, self.slack_bits, self.bound_sq
        if min(d, r, L, S, K) < 1:
            raise SecAggError(f"range check: d, r, L, S, K = {d}, {r}, {L}, {S}, {K} must be >= 1")
        if r * self.offset ** 2 >= _HALF_P or K >= _HALF_P or (1 << S) >= _HALF_P \
                or (d + 1) << L >= _HALF_P:
            raise SecAggError(f"range check: d = {d}, r = {r}, L = {L}, S = {S}, K = {K}: "
                              "need r M^2, K, 2^S and (d + 1) 2^L below p / 2 (else a "
                              "projection or the slack could wrap)")
        if K >> S:
            raise SecAggError(f"range check: K = {K} does not fit its {S} slack bits")
        if self.width > WITNESS_MAX:
            raise SecAggError(f"range check: a witness of {self.width} values, the wire carries "
                              f"at most {WITNESS_MAX} (gossip/bodies.py)")

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def width(self) -> int:
        """W: the witness's values (the dealer shares W + 1 with the blinding value)."""
        return self.projections * self.bits + self.slack_bits

    @staticmethod
    def build(dim: int, norm_bound: float, projections: int = PROJECTIONS) -> RangeParams:
        """The smallest L and K an honest dealer with ||x|| <= norm_bound passes with
        (module docstring: failing at most FAILURE_PROJECTION + FAILURE_SLACK)."""
        if not (math.isfinite(norm_bound) and norm_bound > 0):
            raise SecAggError(f"range check: norm bound {norm_bound!r} must be finite and > 0")
        r = projections
        m = norm_bound * math.sqrt(math.log(2 * r / FAILURE_PROJECTION))
        bits = max(2, math.ceil(math.log2(m)) + 1)  # M = 2^(L-1) >= m
        ell = math.log(1 / FAILURE_SLACK)
        k = math.ceil(norm_bound ** 2 / 2 * (r + 2 * math.sqrt(r * ell) + 2 * ell))
        return RangeParams(dim, r, bits, k.bit_length(), k)


def soundness_factor(params: RangeParams, norm_bound: float, kappa: int = SOUNDNESS_BITS
                     ) -> float:
    """The least s such that a dealing with ||x~|| >= s norm_bound passes with at most
    2^-kappa (worst case over vectors: Paley-Zygmund, module docstring), minimised over
    theta on a grid. For dense vectors (Gaussian-like projections) the factor is near
    sqrt(K / (r B^2 / 2))."""
    r, target = params.projections, kappa * math.log(2)
    best = math.inf
    for theta in (i / 100 for i in range(1, 100)):
        pi = (1 - theta) ** 2 / 3
        # the largest count c with P(Binomial(r, pi) <= c) <= 2^-kappa
        c, cdf = -1, 0.0
        for j in range(r + 1):
            cdf += math.exp(math.lgamma(r + 1) - math.lgamma(j + 1) - math.lgamma(r - j + 1)
                            + j * math.log(pi) + (r - j) * math.log1p(-pi))
            if cdf > math.exp(-target):
                break
            c = j
        if c < 0:
            continue
        # passing needs (c + 1) projections' y^2 > theta s^2 B^2 / 2 to sum to <= K
        s = math.sqrt(params.bound_sq / ((c + 1) * theta * norm_bound ** 2 / 2))
        best = min(best, s)
    return best


def _rng(challenge: bytes, label: bytes) -> np.random.Generator:
    seed = blake2b(challenge + label, digest_size=32, person=b"flnode-range").digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))


def projections(params: RangeParams, challenge: bytes) -> np.ndarray:
    """The r x d public projections in {-1, 0, 1} (int8), from the agreed challenge (drawn
    after the dealing is committed): every member computes the same."""
    two = _rng(challenge, b"projections").integers(0, 4, size=(params.projections, params.dim),
                                                   dtype=np.int8)
    return np.where(two == 0, -1, np.where(two == 3, 1, 0)).astype(np.int8)


def coefficients(params: RangeParams, challenge: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """alpha (W values), beta (r values), gamma: public, drawn after the witness is
    committed (the challenge binds it)."""
    g = F.uniform(params.width + params.projections + 1, test_only_rng=_rng(challenge, b"coeffs"))
    return g[:params.width], g[params.width:-1], int(g[-1])


def _field(u: np.ndarray) -> np.ndarray:
    return np.where(u < 0, F.P64 - np.uint64(1), u.astype(np.uint64)).astype(np.uint64)


def project(u: np.ndarray, x: np.ndarray) -> np.ndarray:
    """<u_k, x> mod p for field vector x (a piece or a secret): r field elements."""
    return F.matvec(_field(u), F.check(np.asarray(x).reshape(-1), "projected vector"))


def _bits(values: list[int], bits: int) -> np.ndarray:
    out = np.zeros(len(values) * bits, dtype=np.uint64)
    for k, v in enumerate(values):
        out[k * bits:(k + 1) * bits] = [(v >> b) & 1 for b in range(bits)]
    return out


def witness(params: RangeParams, u: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The honest dealer's witness (W field elements, each 0 or 1) for its field vector x;
    OutOfRange if x's projections or their squares do not fit (then it does not deal)."""
    y = [v - F.P if v > _HALF_P else v for v in project(u, x).tolist()]
    m = params.offset
    worst = max(abs(v) for v in y)
    if any(not -m <= v < m for v in y):
        raise OutOfRange(f"a projection of our vector is {worst} outside [-{m}, {m}): our "
                         "contribution is past the range check's bound (not dealt)")
    slack = params.bound_sq - sum(v * v for v in y)
    if slack < 0:
        raise OutOfRange(f"our projections' squares sum to {params.bound_sq - slack} > K = "
                         f"{params.bound_sq}: past the range check's bound (not dealt)")
    return np.concatenate([_bits([v + m for v in y], params.bits), _bits([slack], params.slack_bits)])


def share_witness(params: RangeParams, w: np.ndarray, members: int, threshold: int,
                  test_only_rng: np.random.Generator | None = None) -> np.ndarray:
    """(n, W + 1) pieces: a degree-t sharing of the witness plus one uniform blinding value
    (so a linear dealing check on them opens a uniform value, as robust.py's VECTOR)."""
    w = F.check(np.asarray(w).reshape(-1), "witness")
    if w.size != params.width:
        raise SecAggError(f"witness of {w.size} values, the check has W = {params.width}")
    return share(np.concatenate([w, F.uniform(1, test_only_rng)]), members, threshold, test_only_rng)


def _powers(bits: int) -> np.ndarray:
    return np.array([pow(2, b, F.P) for b in range(bits)], dtype=np.uint64)


def check_value(params: RangeParams, u: np.ndarray, coeffs: tuple[np.ndarray, np.ndarray, int],
                x: np.ndarray, w: np.ndarray) -> int:
    """v (module docstring) on holder pieces x (d values) and w (W, or W + 1 with the
    blinding value, ignored), unmasked: a degree-2t piece of 0 for an honest dealer. On
    the secrets themselves it is the value the openings decode to."""
    alpha, beta, gamma = coeffs
    r, L, S = params.projections, params.bits, params.slack_bits
    w = F.check(np.asarray(w).reshape(-1), "witness piece")[:params.width]
    if w.size != params.width or np.asarray(x).size != params.dim:
        raise SecAggError(f"range check piece of {np.asarray(x).size} + {w.size} values, "
                          f"expected {params.dim} + {params.width}")
    y = project(u, x)
    bit_sq = F.sum_mod(F.mul(alpha, F.mul(w, F.sub(w, np.ones_like(w)))))
    rebuilt = F.sum_mod(F.mul(w[:r * L].reshape(r, L), _powers(L)[None, :]), axis=1)
    e = F.sub(F.add(y, np.full(r, params.offset, dtype=np.uint64)), rebuilt)
    lin = F.sum_mod(F.mul(beta, e))
    slack = F.sum_mod(F.mul(w[r * L:], _powers(S)))
    sq = F.sum_mod(F.mul(y, y))
    ident = F.sub(F.sub(np.uint64(params.bound_sq % F.P), sq), slack)
    total = F.add(F.add(bit_sq, lin), F.mul(np.uint64(gamma), ident))
    return int(total)


def check_piece(params: RangeParams, holder: int, dealers: tuple[int, ...],
                u: Mapping[int, np.ndarray], coeffs: Mapping[int, tuple[np.ndarray, np.ndarray, int]],
                x: Mapping[int, np.ndarray], w: Mapping[int, np.ndarray], mask: np.ndarray,
                members: int) -> np.ndarray:
    """Holder's opened values, one per member 1..n (entry i - 1 for dealer i; members not
    in `dealers` carry the mask alone, opening to 0): v_i on its pieces plus holder * mask
    (`mask`: its pieces of the summed degree 2t - 1 mask generators, n values)."""
    mask = F.check(np.asarray(mask).reshape(-1), "mask piece")
    if mask.size < members:
        raise SecAggError(f"mask piece of {mask.size} values, {members} needed")
    out = np.zeros(members, dtype=np.uint64)
    for i in dealers:
        out[i - 1] = check_value(params, u[i], coeffs[i], x[i], w[i])
    return F.add(out, F.mul_small(mask[:members], np.uint64(holder)))


@dataclass(frozen=True)
class RangeVerdict:
    passed: tuple[int, ...]
    out_of_range: dict[int, str]  # dealer -> why ("norm_out_of_range: ...")
    wrong: tuple[int, ...]  # holders whose opened values were wrong


def judge(opened: Mapping[int, np.ndarray], dealers: tuple[int, ...], members: int,
          threshold: int) -> RangeVerdict:
    """Decode the opened degree-2t values (at most t wrong openers corrected, as
    robust.open_degree2; TooFewPieces / TooManyWrong otherwise) and read one bit per
    dealer: 0 passes, anything else is out of range."""
    got = decode(dict(opened), 2 * threshold, what="range checks",
                 expected=tuple(range(1, members + 1)), max_errors=threshold)
    v = got.value.tolist()
    bad = {i: ("norm_out_of_range: its range check opened non-zero (a projection or the sum "
               "of their squares past the bound, or a false witness)")
           for i in dealers if v[i - 1] != 0}
    return RangeVerdict(tuple(i for i in sorted(dealers) if i not in bad), bad, got.wrong)

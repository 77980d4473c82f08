"""Shamir sharing of vectors over F_p and Reed-Solomon decoding that names wrong pieces.

Sharing. A dealer with secret vector s (L field elements) and threshold t draws t
uniform coefficient vectors r_1..r_t from the OS's CSPRNG and gives member j (evaluation
point j = 1..n) the piece f(j) = s + r_1 j + ... + r_t j^t, coordinate by coordinate.
Any t pieces are jointly uniform and independent of s (for each coordinate, the map from
(r_1..r_t) to t pieces is a Vandermonde system, invertible since the points are distinct
and non-zero); any t + 1 determine s by Lagrange interpolation at 0.

Decoding. The pieces of a degree-k sharing at N distinct points form a Reed-Solomon
codeword of length N and dimension k + 1 (minimum distance N - k): with e wrong pieces it
decodes exactly when

    N >= k + 1 + 2e        (degree t: e <= (N - t - 1) / 2, so n >= 3t + 1 corrects t;
                            degree 2t: N >= 2t + 1 + 2e)

and fewer than k + 1 pieces cannot decode at all (`TooFewPieces`, with how many were
needed and how many arrived). `decode` is vectorised over the L coordinates:

1. a random linear combination of the coordinates, y'_j = sum_c rho_c y_j[c] (rho from
   the OS, drawn after the pieces arrived; one (N x L) @ (L x 1) product, `field.matmul`),
   and its exact syndromes H y' (H[m, j] = v_j x_j^m, v_j = 1 / prod_{i != j}(x_j - x_i),
   m < N - k - 1: zero exactly on the codewords). A coordinate that is not a codeword
   leaves y' off the code too, except with probability 1/p (H y' is a non-zero linear
   function of rho). All zero: no wrong piece (the common case);
2. otherwise y' is a scalar word whose error is non-zero wherever any coordinate's is
   (for a wrong piece j, rho . e_j = 0 with probability 1/p); `decode_columns`
   (syndromes, Berlekamp-Massey, Forney; exact) finds the codeword within e errors of it
   (e = max_errors, or (N - k - 1) // 2) and where it disagrees;
3. the remaining pieces are checked again on every coordinate (step 1 on them, a fresh
   rho): a wrong piece the combination missed (probability <= e/p) or more wrong pieces
   than e make this fail (`TooManyWrong`, nobody named), never a wrong value: pieces
   that are one codeword on N - e >= k + 1 + e points are within e of it, the unique
   such codeword.
   The value at 0 is interpolated from the first k + 1 good pieces.

Cost at 128 members, d = 100k (CPU, a loaded 2-core machine): no wrong piece 0.19 s,
1 to 42 wrong 0.29-0.33 s, against 0.26 s and 0.83-0.86 s with one Python
Berlekamp-Welch solve ((N x N) in Python ints, 0.25 s per codeword); judging 128
dealers' checks with one lying holder, 2n such solves before, 53 s, now 0.06 s
(scripts/bench_secagg.py --decode). Codewords with different errors each (the dealing checks) are decoded
together by `decode_columns`: one syndrome product and one vectorised Berlekamp-Massey
pass for all of them.

rho comes from the OS (it need only be unpredictable to whoever chose the errors);
every honest member decodes the same value (unique decoding below the radius). Above the
radius (more than e wrong pieces) no decoder can be right: the result may be
`TooManyWrong` or, if the wrong pieces were chosen to form another codeword, a wrong value
that every member agrees on.

What the parties learn: a holder of a piece learns nothing about s from it (and any t
holders together nothing); whoever receives all N pieces of a sharing learns the whole
polynomial, so only sharings meant to be opened (sums, masked degree-2 values,
blinded checks) are ever sent to more than their holder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from hashlib import shake_256

import numpy as np

from node.secagg import field as F
from node.secagg.errors import PieceError, SecAggError, TooFewPieces, TooManyWrong

# Members are evaluation points 1..MAX_MEMBERS (the pieces' header and mul_small need
# them below 2^16; the decoder's cached O(N^2) set-up and O(N) Berlekamp-Massey steps stay
# small up to here).
MAX_MEMBERS = 256
# The most members of a secure round (RoundParams, and the [rules] check of
# node/strategy/consortium_rules.py). Not the field: FixedPoint refuses a scale that
# loses precision, and at 128 members, d = 100k its worst-case rounding is still 3.8e-5
# of the clip (scale 2^22). The work: each member deals a degree-t sharing to n holders
# (O(n t d): 4.9 s of CPU at 128 members, d = 100k, t = 42, against 0.3 s at 32; it
# quadruples at 256), opens n(n + 1)/2 degree-2 values and decodes O(n d) sums (0.2 s,
# 0.5 s with t wrong pieces: scripts/bench_secagg.py --decode).
MAX_SECURE_MEMBERS = 128
# Share and check in column blocks of about this many elements (rows x columns): the limb
# multiplication makes about ten temporaries of the block's size; blocks of 256 KiB kept
# them in cache and ran share() at 32 members x 100k in 0.30 s of CPU against 0.52 s
# with 1 MiB blocks (here, best of 4).
BLOCK_ELEMENTS = 1 << 15


def _columns(rows: int) -> int:
    return max(1 << 8, BLOCK_ELEMENTS // max(rows, 1))


def check_secure_members(n: int) -> None:
    """SecAggError naming the cap if a secure round of n members would be too slow."""
    if n > MAX_SECURE_MEMBERS:
        raise SecAggError(f"{n} members: a secure round takes at most {MAX_SECURE_MEMBERS} members "
                          "(MAX_SECURE_MEMBERS: dealing and decoding grow as n^2 d; use plain "
                          "rounds or fewer members)")


def check_points(n: int, t: int) -> None:
    if not 1 <= n <= MAX_MEMBERS:
        raise SecAggError(f"{n} members: must be 1..{MAX_MEMBERS}")
    if not 0 <= t < n:
        raise SecAggError(f"threshold t = {t} with {n} members: need 0 <= t < n")


def share(secret: np.ndarray, n: int, t: int,
          test_only_rng: np.random.Generator | None = None) -> np.ndarray:
    """The (n, L) pieces of a degree-t sharing of `secret` (row j - 1 is member j's).
    Coefficients from the OS's CSPRNG; `test_only_rng` only for tests' determinism."""
    check_points(n, t)
    secret = F.check(np.asarray(secret).reshape(-1), "secret")
    return share_poly(secret, F.uniform((t, secret.size), test_only_rng), n)


def share_poly(constant: np.ndarray, coeffs: np.ndarray, n: int) -> np.ndarray:
    """Evaluate constant + coeffs[0] x + ... + coeffs[k-1] x^k at x = 1..n (Horner)."""
    xs = np.arange(1, n + 1, dtype=np.uint64)[:, None]  # n <= MAX_MEMBERS < 2^16
    out = np.empty((n, constant.size), dtype=np.uint64)
    block = _columns(n)
    for lo in range(0, constant.size, block):
        hi = min(lo + block, constant.size)
        acc = np.zeros((n, hi - lo), dtype=np.uint64)
        for k in range(coeffs.shape[0] - 1, -1, -1):
            acc = F.add(F.mul_small(acc, xs), coeffs[k, lo:hi][None, :])
        out[:, lo:hi] = F.add(F.mul_small(acc, xs), constant[None, lo:hi])
    return out


def expand_seed(seed: np.ndarray, context: bytes, length: int) -> np.ndarray:
    """`length` pseudorandom field elements from a seed (SHAKE-256 over the seed and a
    context naming round, dealer and holder). Each is 61 output bits reduced mod p: the
    one value 2^61 - 1 maps to 0, 2^-61 from uniform per element."""
    seed = F.check(np.asarray(seed).reshape(-1), "seed")
    raw = shake_256(b"flnode-secagg-seed\x00" + context + seed.astype("<u8").tobytes()
                    ).digest(8 * length)
    v = np.frombuffer(raw, dtype="<u8").astype(np.uint64) >> np.uint64(3)
    return v - F.P64 * (v == F.P64)


def share_seeded(secret: np.ndarray, n: int, t: int, seeded: Mapping[int, np.ndarray]
                 ) -> np.ndarray:
    """A degree-t sharing whose pieces at the t points of `seeded` are given (expanded from
    seeds the holders also get): the polynomial through (0, secret) and those t pieces,
    evaluated at the other points. Row j - 1 is member j's piece (seeded rows included).
    Any t pieces are as independent of the secret as the seeds' expansion is from uniform
    (computational hiding, where `share` is information-theoretic)."""
    check_points(n, t)
    secret = F.check(np.asarray(secret).reshape(-1), "secret")
    points = sorted(seeded)
    if len(points) != t or not all(1 <= j <= n for j in points):
        raise SecAggError(f"a seeded sharing needs t = {t} seeded points in 1..{n}, got {points}")
    # coefficients c_1..c_t of f(x) = secret + sum_k c_k x^k: V c = y - secret, V_jk = j^k
    # (one Gauss-Jordan inverse: t solves in Python ints took 6 s at t = 85)
    vinv = F.inverse(np.array([[pow(j, k, F.P) for k in range(1, t + 1)] for j in points],
                              dtype=np.uint64))
    diffs = np.stack([F.sub(F.check(seeded[j], f"seeded piece {j}"), secret) for j in points])
    coeffs = F.matmul(vinv, diffs)
    out = share_poly(secret, coeffs, n)
    for j in points:
        out[j - 1] = seeded[j]
    return out


def correctable(spare: int, max_errors: int) -> int:
    """How many wrong pieces a decode may correct with `spare` = N - degree - 1 redundant
    pieces when up to `max_errors` may be wrong (see `decode`): all of them if spare >=
    2 max_errors, else spare - max_errors (0 if that is negative)."""
    return max_errors if spare >= 2 * max_errors else max(0, spare - max_errors)


def interpolate_at_zero(points: list[int], rows: np.ndarray) -> np.ndarray:
    """f(0) from exactly k + 1 pieces of a degree-k sharing (no checking)."""
    return F.matmul(np.array(F.lagrange_at(points, 0), dtype=np.uint64)[None, :], rows)[0]


@dataclass(frozen=True)
class Decoded:
    """A decoded sharing: its value at 0, and who agreed and who did not."""

    value: np.ndarray  # (L,) field elements
    wrong: tuple[int, ...]  # points whose pieces disagree with the decoded polynomial
    good: tuple[int, ...]  # points whose pieces agree
    redundancy: int  # pieces beyond k + 1: wrong ones detectable up to this, corrected up to half


class _Code:
    """What decoding at one set of points needs, computed once per (points, degree) and
    cached: the points, w_j = prod_{i != j} (x_j - x_i) and v_j = 1 / w_j, the parity-check
    matrix H (r x N, H[m, j] = v_j x_j^m, m < r = N - degree - 1: H c = 0 exactly for the
    codewords: sum_j v_j g(x_j) is the top coefficient of g's interpolant, 0 when deg g <=
    N - 2) and the Lagrange coefficients at 0 of the first degree + 1 points."""

    def __init__(self, points: tuple[int, ...], degree: int):
        n = len(points)
        self.points, self.degree, self.r = points, degree, n - degree - 1
        w = []
        for j, xj in enumerate(points):  # O(N^2) Python ints, once per point set
            acc = 1
            for i, xi in enumerate(points):
                if i != j:
                    acc = acc * (xj - xi) % F.P
            w.append(acc)
        self.w = np.array(w, dtype=np.uint64)
        self.xs = np.array(points, dtype=np.uint64)  # <= MAX_MEMBERS < 2^16: mul_small
        h = np.empty((max(self.r, 0), n), dtype=np.uint64)
        if self.r > 0:
            h[0] = F.inv_array(self.w)
            for m in range(1, self.r):
                h[m] = F.mul_small(h[m - 1], self.xs)
        self.h = h
        self.lagrange0 = np.array(F.lagrange_at(list(points[:degree + 1]), 0), dtype=np.uint64)


@lru_cache(maxsize=32)  # a round decodes at a few point sets; an entry is <= 512 KiB (H)
def _code(points: tuple[int, ...], degree: int) -> _Code:
    return _Code(points, degree)


def _dual_vector(points: list[int], degree: int, rng: np.random.Generator | None) -> np.ndarray:
    """A uniform vector of the dual of the RS code (points, dimension degree + 1): a random
    combination of the parity-check matrix's rows (they span the dual)."""
    code = _code(tuple(points), degree)
    return F.matmul(F.uniform((1, code.r), rng), code.h)[0]


def _combined(rows: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """rows @ rho for a uniform rho (L,) drawn now: one scalar word per point, (N, 1)."""
    return F.matmul(rows, F.uniform((rows.shape[1], 1), rng))


def consistent(points: list[int], rows: np.ndarray, degree: int,
               rng: np.random.Generator | None = None) -> bool:
    """Whether every coordinate of the pieces lies on one polynomial of degree <= degree:
    the exact syndromes of one random combination of the coordinates (a coordinate off its
    polynomial leaves the combination off too, except with probability 1/p). True when
    there is no redundancy (nothing can be checked)."""
    if len(points) <= degree + 1:
        return True
    return not F.matmul(_code(tuple(points), degree).h, _combined(rows, rng)).any()


@dataclass(frozen=True)
class Columns:
    """`decode_columns`' answer for C scalar codewords at N points (column c of each array
    is codeword c): `ok` whether it is within max_errors of a codeword (then unique), the
    codeword's values at the points (`codeword`, = the pieces where they are right), its
    value at 0, and where the pieces are wrong."""

    ok: np.ndarray  # (C,) bool
    value: np.ndarray  # (C,) field elements (meaningful where ok)
    codeword: np.ndarray  # (N, C) field elements (meaningful where ok)
    wrong: np.ndarray  # (N, C) bool (all False where not ok)


def _berlekamp_massey(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shortest linear recurrence of each row of s ((C, r) syndromes): connection
    polynomials (C, r + 1), lowest coefficient first, and their lengths L (C,).
    Inversion-free Berlekamp-Massey, vectorised over rows (each row's polynomial comes out
    scaled by a non-zero constant, which changes neither its roots nor Forney's ratios).
    B is kept multiplied by x^m, so every row shifts the same way each step."""
    c, r = s.shape
    conn = np.zeros((c, r + 2), dtype=np.uint64)
    conn[:, 0] = 1
    back = np.zeros((c, r + 2), dtype=np.uint64)
    back[:, 1] = 1  # x^m B with B = 1, m = 1
    length = np.zeros(c, dtype=np.int64)
    b = np.ones(c, dtype=np.uint64)
    for n in range(r):
        d = F.sum_mod(F.mul(conn[:, :n + 1], s[:, n::-1]), axis=1)
        nz = d != 0
        switch = nz & (2 * length <= n)
        updated = F.sub(F.mul(conn, b[:, None]), F.mul(back, d[:, None]))
        src = np.where(switch[:, None], conn, back)
        conn = np.where(nz[:, None], updated, conn)
        back = np.zeros_like(back)
        back[:, 1:] = src[:, :-1]
        b = np.where(switch, d, b)
        length = np.where(switch, n + 1 - length, length)
    return conn[:, :r + 1], length


def _berlekamp_massey_ints(seq: list[int]) -> tuple[list[int], int]:
    """`_berlekamp_massey` for one sequence in Python ints: for a few columns its O(r L)
    integer steps cost less than the vectorised version's O(r) numpy calls (a call per
    dealer, as a caller judging dealers one by one makes)."""
    conn, back, length, m, b = [1], [1], 0, 1, 1
    for n, sn in enumerate(seq):
        d = sn
        for i in range(1, min(length, len(conn) - 1) + 1):
            d = (d + conn[i] * seq[n - i]) % F.P
        if d == 0:
            m += 1
            continue
        coef, old = d * F.inv(b) % F.P, conn[:]
        conn += [0] * max(0, len(back) + m - len(conn))
        for i, bi in enumerate(back):
            conn[i + m] = (conn[i + m] - coef * bi) % F.P
        if 2 * length <= n:
            length, back, b, m = n + 1 - length, old, d, 1
        else:
            m += 1
    return conn, length


# Up to this many columns with errors, Berlekamp-Massey runs in Python ints.
_INT_BM_COLUMNS = 4


def _horner(coeffs: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """sum_i coeffs[:, i] x^(k - i) at every x (k = coeffs.shape[1] - 1): the reversed
    polynomials, (C, N), for small points x (mul_small)."""
    acc = np.repeat(coeffs[:, :1], xs.size, axis=1)
    for i in range(1, coeffs.shape[1]):
        acc = F.add(F.mul_small(acc, xs[None, :]), coeffs[:, i:i + 1])
    return acc


def decode_columns(points: list[int] | tuple[int, ...], columns: np.ndarray, degree: int,
                   max_errors: int) -> Columns:
    """Decode C scalar Reed-Solomon codewords at once, each with its own errors: column c
    of `columns` ((N, C), row k at points[k]) is a degree-`degree` sharing with up to
    `max_errors` wrong entries. Exact and deterministic (no randomness):

    1. syndromes S = H Y (one (r x N) @ (N x C) product); a zero column is a codeword;
    2. Berlekamp-Massey on the others (vectorised over columns, r steps) gives each error
       locator Lambda of length L; a column is within L of a codeword iff L <= max_errors
       and Lambda has L distinct roots among the inverses of the points (then the L
       geometric sequences of those points generate S, so subtracting the errors Forney's
       formula gives zeroes every syndrome). With 2 max_errors <= r the codeword is the
       unique one that close: never a guess, and a column with more errors fails (`ok`
       False) unless it lies within max_errors of another codeword (which no decoder can
       tell apart: the caller's bound on wrong pieces is its threat model);
    3. error values by Forney (a_j = -x_j Omega(1/x_j) / Lambda'(1/x_j), e_j = a_j w_j),
       the value at 0 from the corrected codeword (fixed Lagrange coefficients).

    Cost: the product, then about 10 r numpy operations over (C, r) arrays: at 128 points
    and 256 columns, tens of milliseconds where one Python Berlekamp-Welch solve took a
    quarter of a second. SecAggError if 2 max_errors > N - degree - 1 (the caller asks for
    more than unique decoding gives)."""
    points = tuple(points)
    y = F.check(np.asarray(columns), "columns")
    if y.ndim != 2 or y.shape[0] != len(points):
        raise SecAggError(f"columns of shape {y.shape} for {len(points)} points")
    if len(points) < degree + 1:
        raise TooFewPieces(f"columns (degree {degree})", degree + 1, len(points))
    code = _code(points, degree)
    if max_errors < 0 or 2 * max_errors > code.r:
        raise SecAggError(f"max_errors {max_errors}: {len(points)} points of a degree-{degree} "
                          f"code correct at most {code.r // 2}")
    n, c = y.shape
    ok = np.ones(c, dtype=bool)
    wrong = np.zeros((n, c), dtype=bool)
    word = y.copy()
    if code.r > 0:
        syn = F.matmul(code.h, y).T  # (C, r)
        bad = np.flatnonzero(syn.any(axis=1))
        ok[bad] = False
        e = max_errors
        if bad.size and e > 0:
            s = syn[bad]
            if bad.size <= _INT_BM_COLUMNS:
                found = [_berlekamp_massey_ints(row) for row in s.tolist()]
                lam = np.zeros((bad.size, code.r + 1), dtype=np.uint64)
                for k, (conn, _) in enumerate(found):
                    lam[k, :min(len(conn), code.r + 1)] = conn[:code.r + 1]
                length = np.array([ln for _, ln in found], dtype=np.int64)
            else:
                lam, length = _berlekamp_massey(s)
            cand = (length >= 1) & (length <= e) & ~lam[:, e + 1:].any(axis=1)
            lam = lam[:, :e + 1]
            roots = _horner(lam, code.xs) == 0  # Lambda*(x) = x^e Lambda(1/x)
            cand &= roots.sum(axis=1) == length
            if cand.any():
                lam, s, roots, cols = lam[cand], s[cand], roots[cand], bad[cand]
                omega = np.zeros((lam.shape[0], e), dtype=np.uint64)  # S Lambda mod z^e
                for i in range(e):
                    omega[:, i:] = F.add(omega[:, i:], F.mul(lam[:, i:i + 1], s[:, :e - i]))
                dlam = F.mul_small(lam[:, 1:], np.arange(1, e + 1, dtype=np.uint64)[None, :])
                num = F.mul_small(_horner(omega, code.xs), code.xs[None, :])
                den = _horner(dlam, code.xs)
                at = np.nonzero(roots)
                a = F.neg(F.mul(num[at], F.inv_array(den[at])))
                err = np.zeros((len(cols), n), dtype=np.uint64)
                err[at] = F.mul(a, code.w[at[1]])
                word[:, cols] = F.sub(y[:, cols], err.T)
                wrong[:, cols] = roots.T
                ok[cols] = True
    value = F.matmul(code.lagrange0[None, :], word[:degree + 1])[0]
    return Columns(ok, value, word, wrong)


def berlekamp_welch(points: list[int], ys: list[int], degree: int, errors: int) -> list[int] | None:
    """The polynomial of degree <= `degree` within `errors` disagreements of (points, ys),
    lowest coefficient first, or None if there is none. One (N x N) system in Python
    ints, O(N^3): the decoder before `decode_columns` (kept for comparison in
    scripts/bench_secagg.py and as an independent reference in the tests)."""
    e = errors
    rows, rhs = [], []
    for x, y in zip(points, ys, strict=True):
        powers = [pow(x, i, F.P) for i in range(degree + e + 1)]
        rows.append(powers + [(-y * powers[i]) % F.P for i in range(e)])
        rhs.append(y * pow(x, e, F.P) % F.P)
    sol = F.solve(rows, rhs)
    if sol is None:
        return None
    q, err = sol[:degree + e + 1], sol[degree + e + 1:] + [1]
    poly, rem = F.poly_divmod(q, err)
    if any(rem):
        return None
    if any(poly[degree + 1:]):
        return None
    return (poly + [0] * (degree + 1))[:degree + 1]


def decode(pieces: Mapping[int, np.ndarray], degree: int, *, what: str = "sharing",
           expected: tuple[int, ...] = (), correct: bool = True,
           max_errors: int | None = None,
           test_only_rng: np.random.Generator | None = None) -> Decoded:
    """Decode a degree-`degree` sharing from {member index: piece vector}: its value at 0 and
    the members whose pieces were wrong. `expected` (all members meant to send) only makes
    TooFewPieces name the missing ones.

    `correct=False` only detects: any disagreement is TooManyWrong. Detection is sound for
    up to N - degree - 1 wrong pieces, correction only up to half that; above the
    correction radius a decoder that corrects can be steered to another codeword (wrong
    pieces chosen on a polynomial through some good ones), so a caller holding fewer
    pieces than correcting its threat needs (an optimistic opening) must only detect and
    then ask for more pieces.

    `max_errors` = e_max, the wrong pieces the caller must survive (its threat, t): then
    fewer than degree + 1 + e_max pieces is TooFewPieces (the honest pieces among them
    might not determine the polynomial, so even agreeing pieces prove nothing); pieces
    that agree give the value; pieces that disagree are corrected up to

        a = e_max                 when N >= degree + 1 + 2 e_max,
        a = N - degree - 1 - e_max  below that (fewer, possibly 0),

    and beyond a only detected (TooManyWrong, naming nobody): never steered to another
    codeword by e_max chosen pieces. Why a is safe: another codeword f' within a of the
    pieces and the true g within e_max differ in at most a + e_max < N - degree places,
    less than two codewords can (the code's distance), so f' = g; and with more than a
    wrong pieces no codeword is within a. (Correcting a and detecting e_max at once: a +
    e_max < N - degree.) None: the old radius, redundancy // 2 (sound only if at most
    that many can be wrong)."""
    points = sorted(pieces)
    if max_errors is not None and max_errors < 0:
        raise SecAggError(f"{what}: max_errors must be >= 0, got {max_errors}")
    if points and not (1 <= points[0] and points[-1] <= MAX_MEMBERS):
        raise SecAggError(f"{what}: evaluation points must be 1..{MAX_MEMBERS}, got {points}")
    if len(points) < degree + 1:
        raise TooFewPieces(f"{what} (degree {degree})", degree + 1, len(points),
                           tuple(sorted(set(expected) - set(points))))
    checked = [F.check(np.asarray(pieces[j]).reshape(-1), f"{what}: piece of member {j}")
               for j in points]
    for j, row in zip(points, checked, strict=True):
        if row.size != checked[0].size:
            raise PieceError(f"{what}: {row.size} values, member {points[0]}'s piece has "
                             f"{checked[0].size}", j)
    rows = np.stack(checked)
    redundancy = len(points) - degree - 1
    if max_errors is not None and redundancy < max_errors:
        raise TooFewPieces(f"{what} (degree {degree}, up to {max_errors} wrong)",
                           degree + 1 + max_errors, len(points),
                           tuple(sorted(set(expected) - set(points))))
    code = _code(tuple(points), degree)
    # One random combination of the coordinates (rho drawn now, after the pieces arrived):
    # a coordinate off its polynomial leaves it off too (except with probability 1/p), and
    # a piece wrong anywhere is wrong in it (1/p each): the check and the search for the
    # wrong pieces' places both run on N scalars.
    combined = _combined(rows, test_only_rng)
    if redundancy == 0 or not F.matmul(code.h, combined).any():
        return Decoded(F.matmul(code.lagrange0[None, :], rows[:degree + 1])[0], (), tuple(points),
                       redundancy)
    e = redundancy // 2 if max_errors is None else correctable(redundancy, max_errors)
    beyond = (f"up to {max_errors} may be wrong: {len(points)} pieces correct {e} of them "
              f"while detecting {max_errors}, correcting {max_errors} needs "
              f"{degree + 1 + 2 * (max_errors or 0)} (detected, nobody named)")
    if max_errors is not None and e == 0:
        raise TooManyWrong(f"{what} (degree {degree}): the {len(points)} pieces disagree; {beyond}")
    if not correct:
        raise TooManyWrong(f"{what} (degree {degree}): the {len(points)} pieces disagree "
                           "(detected; correcting needs the other members' pieces)")
    if e == 0:
        raise TooManyWrong(f"{what} (degree {degree}): the {len(points)} pieces disagree and "
                           f"{redundancy} spare piece(s) cannot say which are wrong "
                           f"(correcting e wrong pieces needs {degree + 1} + 2e)")
    # Then every coordinate is checked again on the remaining pieces (a fresh combination),
    # so a wrong piece the combination missed is a TooManyWrong, never a wrong value or an
    # honest member named.
    got = decode_columns(points, combined, degree, e)
    if not got.ok[0]:
        raise TooManyWrong(f"{what} (degree {degree}): more than {e} of {len(points)} pieces "
                           + (f"wrong; {beyond}" if max_errors is not None and e < max_errors
                              else f"wrong (at most {e} can be corrected)"))
    wrong = tuple(x for x, bad in zip(points, got.wrong[:, 0].tolist(), strict=True) if bad)
    good = [x for x in points if x not in wrong]
    keep = np.array([points.index(x) for x in good])
    if len(wrong) > e or not consistent(good, rows[keep], degree, test_only_rng):
        raise TooManyWrong(f"{what} (degree {degree}): the pieces disagree beyond what "
                           f"{redundancy} spare piece(s) correct")
    return Decoded(interpolate_at_zero(good[:degree + 1], rows[keep[:degree + 1]]), wrong,
                   tuple(good), redundancy)

"""Robust secure aggregation without seeing shares (BREA: So, Gueler, Avestimehr 2021),
as pure functions a round machine calls in order.

Members are 1..n (evaluation points); t is the threshold (coalitions of up to t members
learn nothing beyond what is opened); the round's encoding is a `FixedPoint`. Steps:

1. **deal** (each member i, sealed to each holder j): a degree-t sharing of its encoded
   vector with one uniform blinding coordinate appended (`VECTOR`, d + 1 values), and a
   degree-(2t-1) sharing of P + 1 uniform mask generators (`MASK`): holder j's mask piece
   for opened value k is z(j) = j * sum_i w_i(j)[k], a degree-2t sharing of 0 whatever
   the dealers' random values, as long as each w_i has degree <= 2t - 1. A seeded dealing
   sends t of the holders a 4-element seed instead of their d + 1 values (`SEED`; they
   expand it with SHAKE-256), cutting t / (n - 1) of the dealing's bytes.
2. **check** the dealings (each holder opens 2n scalars; the challenge is agreed after
   every dealing was sent, e.g. a hash of all of them): for dealer i, holder j opens
   sum_c gamma_c piece[c] + piece[blinding]. These scalars form a degree-t (masks: 2t-1)
   codeword iff the dealing was consistent (up to probability n/p); its value at 0
   is uniform thanks to the blinding coordinate, so the check reveals nothing. `judge_dealings`
   decodes each: a dealer whose pieces disagree beyond the correction radius is refused;
   a holder whose check disagrees is a dispute: either the holder lies or the dealer sent
   it a wrong piece; the holder's dealer-signed piece settles it (`resolve_dispute`).
   Corrected as the openings below (at most what t liars cannot steer); a dealer whose
   check disagrees beyond that, with too few holders to blame it, is `unresolved`.
3. **degree-2 pieces** (each holder, opened): from the pieces it holds of every accepted
   dealer's vector, holder j computes its piece of every squared distance
   ||x_a - x_b||^2 and squared norm ||x_a||^2 (a polynomial of degree 2t in j, summed over
   the d coordinates), adds its mask piece, and opens the P values. Variant
   "norm_only": only the n squared norms.
4. **open** the degree-2 values: Reed-Solomon decoding of a degree-2t sharing needs
   N >= 2t + 1 + 2e opened pieces to correct e wrong ones. Up to t openers may lie, so the
   decode never corrects more than t and never past the radius: N >= 4t + 1 corrects
   t (the wrong openers are named); 3t + 1 <= N <= 4t corrects the N - 3t - 1 that t
   liars cannot steer and only detects more (the round fails, nobody named);
   N < 3t + 1 is refused (too few openers).
5. **select** (every member, on the same decoded integers): a member whose ||q||^2 exceeds
   the encoding's bound R^2 is left out ("norm_too_large"); then multi-Krum on the exact
   squared distances: each remaining member's score is the sum of its n' - f - 2 smallest
   distances, the n' - f lowest scores are kept (ties by member index). With fewer than
   2f + 3 members passing, all of them are kept (noted). "norm_only": the norm check only.
6. **sum** (each holder, opened): the sum of its pieces of the selected members' vectors;
   decoding this degree-t sharing (N >= t + 1 + 2e) gives the field sum, which
   `FixedPoint.decode_sum` turns into floats after its exact aggregate norm check. The
   optimistic opening sends it to its 2t ring neighbours only (`sum_recipients`): each then
   detects up to t wrong pieces and falls back to all pieces on any doubt.

What is opened, and so learned by every member and by anyone who sees the opened pieces:
the checks (uniform: nothing), the squared distances and norms (variant "distances") or
the norms ("norm_only"), who was selected, and the sum of the selected vectors. The masks
make the opened degree-2t polynomial uniform given its value at 0: without them a
coalition of t could read t + 1 random projections of a pair's difference from the
polynomial's other coefficients. What each party learns: docs/privacy-secure.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b

import numpy as np

from node.secagg import field as F
from node.secagg.encoding import FixedPoint, IntegerCodec
from node.secagg.errors import PieceError, SecAggError, TooFewPieces
from node.secagg.pieces import CHECK, DEGREE2, MASK, SEED, SEED_VALUES, SUM, VECTOR, Piece
from node.secagg.shamir import (
    Decoded,
    check_points,
    check_secure_members,
    correctable,
    decode,
    decode_columns,
    expand_seed,
    share,
    share_poly,
    share_seeded,
)

# "sum_only" opens nothing per member (no degree-2 values, no selection: every accepted
# dealer is summed, `select_without_opening`, and the sum's exact aggregate norm check is
# the only bound); under DP it is the one variant charged at the sum's noise
# (node/privacy/secure.py, docs/privacy-secure.md). "range" opens one value per member, 0
# iff its vector passes the sound range check (node/secagg/range_check.py): one bit each;
# its masks are n wide like norm_only's.
VARIANTS = ("distances", "norm_only", "sum_only", "range")
# Coordinates per block of the Gram matrix: 3 limbs of 21 bits, each limb product below
# 2^42, so a block of 2^11 coordinates sums below 2^53 and float64 (BLAS) is exact.
_LIMB_BITS = 21
_LIMBS = 3
_GRAM_BLOCK = 1 << 11


@dataclass(frozen=True)
class RoundParams:
    """What every member of a secure round agrees on."""

    round: int
    members: int  # n: members are 1..n
    threshold: int  # t: coalitions of up to t learn nothing beyond what is opened
    codec: FixedPoint | IntegerCodec  # IntegerCodec: distributed DP's integer contributions
    variant: str = "distances"
    krum_f: int | None = None  # hostile members multi-Krum tolerates (default t)
    krum_m: int | None = None  # members multi-Krum keeps (default n' - f)
    # variant "range": W, the range check's witness (node/secagg/range_check.py), shared in
    # the VECTOR piece after the d coordinates (so the dealing check covers it)
    witness: int = 0

    def __post_init__(self) -> None:
        n, t = self.members, self.threshold
        check_points(n, t)
        check_secure_members(n)
        if t < 1:
            raise SecAggError(f"threshold t = {t}: a secure round needs t >= 1")
        if n < 2 * t + 1:
            raise SecAggError(f"{n} members with t = {t}: the degree-2t values need "
                              f"2t + 1 = {2 * t + 1} members to open")
        if self.codec.members != n:
            raise SecAggError(f"encoding for {self.codec.members} members, round has {n}")
        if self.variant not in ("sum_only", "range"):
            self.codec.norm_bound_sq  # noqa: B018 - IntegerCodec: FieldOverflow if norms could wrap
        if self.variant not in VARIANTS:
            raise SecAggError(f"variant {self.variant!r}: one of {', '.join(VARIANTS)}")
        if self.witness < 0 or (self.witness > 0) != (self.variant == "range"):
            raise SecAggError(f"witness of {self.witness} values: variant range (only) has one")
        if not 0 <= self.round < 1 << 63:
            raise SecAggError(f"round {self.round}: must be in 0..2^63 - 1")

    def members_in(self, who: tuple[int, ...], what: str) -> tuple[int, ...]:
        """`who` sorted, checked to be distinct members 1..n (our misuse otherwise)."""
        out = tuple(sorted(who))
        if len(set(out)) != len(out) or (out and not (1 <= out[0] and out[-1] <= self.members)):
            raise SecAggError(f"{what} {out}: must be distinct members 1..{self.members}")
        return out

    @property
    def width(self) -> int:
        """A VECTOR piece's values: d coordinates, the witness (variant range), blinding."""
        return self.codec.dim + self.witness + 1

    @property
    def f(self) -> int:
        return self.threshold if self.krum_f is None else self.krum_f

    @property
    def opened(self) -> int:
        """P: the degree-2 values opened (pairs a < b, then the n norms; or the norms)."""
        n = self.members
        return {"distances": n * (n - 1) // 2 + n, "norm_only": n, "sum_only": 0,
                "range": n}[self.variant]

    def pair_index(self, a: int, b: int) -> int:
        a, b = min(a, b), max(a, b)
        n = self.members
        return (a - 1) * n - (a - 1) * a // 2 + (b - a - 1)

    def norm_index(self, a: int) -> int:
        return (self.opened - self.members) + (a - 1)


# --- 1. deal -------------------------------------------------------------------------------

def deal(params: RoundParams, owner: int, vector: np.ndarray, *, seeded: bool = False,
         test_only_rng: np.random.Generator | None = None) -> dict[int, tuple[Piece, Piece]]:
    """Member `owner`'s (VECTOR or SEED, MASK) pieces for each holder 1..n (its own
    included), from its clipped float vector. Randomness from the OS; `test_only_rng`
    only for tests. `seeded`: see `deal_encoded`."""
    return deal_encoded(params, owner, params.codec.encode(vector), seeded=seeded,
                        test_only_rng=test_only_rng)


def seeded_holders(params: RoundParams, owner: int) -> tuple[int, ...]:
    """The t holders that get a SEED instead of a VECTOR piece from `owner` in a seeded
    dealing: the t members after it, cyclically (so each member expands t seeds)."""
    n = params.members
    return tuple(sorted((owner + k - 1) % n + 1 for k in range(1, params.threshold + 1)))


def _seed_context(params: RoundParams, owner: int, holder: int) -> bytes:
    return params.round.to_bytes(8, "little") + owner.to_bytes(2, "little") + holder.to_bytes(2, "little")


def expand_seed_piece(params: RoundParams, piece: Piece) -> Piece:
    """A holder's VECTOR piece from the SEED piece its dealer sent it."""
    if piece.kind != SEED or piece.round != params.round or piece.values.size != SEED_VALUES:
        raise PieceError(f"piece keyed {piece.key} with {piece.values.size} values is not this "
                         f"round's seed ({SEED_VALUES} values)", piece.owner)
    values = expand_seed(piece.values, _seed_context(params, piece.owner, piece.holder),
                         params.width)
    return Piece(params.round, VECTOR, piece.owner, piece.holder, values)


def deal_encoded(params: RoundParams, owner: int, encoded: np.ndarray, *, seeded: bool = False,
                 test_only_rng: np.random.Generator | None = None,
                 witness: Callable[[dict[int, np.ndarray]], np.ndarray] | None = None
                 ) -> dict[int, tuple[Piece, Piece]]:
    """`deal` from an already encoded vector (any field vector of length d: what a hostile
    member can deal; an honest one goes through `deal`, which encodes and bounds it).

    `seeded`: the pieces of the t `seeded_holders` are expanded from 4-element seeds drawn
    from the OS (SHAKE-256) and those holders get the seed (32 bytes) instead of d + 1
    values; the other pieces follow from the polynomial through them and (0, secret).
    Saves t x (d + 1) field elements per dealer; hiding becomes computational.

    `witness` (variant range): called with every holder's d-coordinate piece (their
    commitment fixes the check's projections) and returning the W witness values, shared
    after them in the same pieces (column by column: the same seeds expand both)."""
    n, t = params.members, params.threshold
    params.members_in((owner,), "dealer")
    encoded = F.check(np.asarray(encoded).reshape(-1), "encoded vector")
    if encoded.size != params.codec.dim:
        raise SecAggError(f"encoded vector of {encoded.size} values, the round has d = "
                          f"{params.codec.dim}")
    if (witness is None) != (params.witness == 0):
        raise SecAggError(f"variant {params.variant}: a witness is dealt with range only")
    seeds: dict[int, np.ndarray] = {}
    if witness is not None:
        seeds, vec = _deal_with_witness(params, owner, encoded, seeded, test_only_rng, witness)
    elif seeded:
        secret = np.concatenate([encoded, F.uniform(1, test_only_rng)])
        seeds = {j: F.uniform(SEED_VALUES, test_only_rng) for j in seeded_holders(params, owner)}
        vec = share_seeded(secret, n, t, {j: expand_seed(s, _seed_context(params, owner, j), secret.size)
                                          for j, s in seeds.items()})
    else:
        vec = share(np.concatenate([encoded, F.uniform(1, test_only_rng)]), n, t, test_only_rng)
    width = params.opened + 1
    masks = share_poly(F.uniform(width, test_only_rng),
                       F.uniform((2 * t - 1, width), test_only_rng), n)
    return {j: (Piece(params.round, SEED, owner, j, seeds[j]) if j in seeds
                else Piece(params.round, VECTOR, owner, j, vec[j - 1]),
                Piece(params.round, MASK, owner, j, masks[j - 1])) for j in range(1, n + 1)}


def _deal_with_witness(params: RoundParams, owner: int, encoded: np.ndarray, seeded: bool,
                       rng: np.random.Generator | None,
                       witness: Callable[[dict[int, np.ndarray]], np.ndarray]
                       ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """deal_encoded's sharing for variant range: the d coordinates first, then the witness
    they determine and the blinding value, column by column (the same seeds expand both)."""
    n, t, d = params.members, params.threshold, params.codec.dim
    seeds: dict[int, np.ndarray] = {}
    if seeded:
        seeds = {j: F.uniform(SEED_VALUES, rng) for j in seeded_holders(params, owner)}
        full = {j: expand_seed(s, _seed_context(params, owner, j), params.width)
                for j, s in seeds.items()}
        x = share_seeded(encoded, n, t, {j: v[:d] for j, v in full.items()})
    else:
        x = share(encoded, n, t, rng)
    w = F.check(np.asarray(witness({j: x[j - 1] for j in range(1, n + 1)})).reshape(-1), "witness")
    if w.size != params.witness:
        raise SecAggError(f"a witness of {w.size} values, the round has W = {params.witness}")
    tail = np.concatenate([w, F.uniform(1, rng)])
    rest = share_seeded(tail, n, t, {j: v[d:] for j, v in full.items()}) if seeded else \
        share(tail, n, t, rng)
    return seeds, np.concatenate([x, rest], axis=1)


# --- 2. check the dealings -------------------------------------------------------------------

def challenge_vectors(params: RoundParams, challenge: bytes) -> tuple[np.ndarray, np.ndarray]:
    """gamma for VECTOR pieces (d values) and MASK pieces (P values), expanded from the
    agreed public challenge: every member computes the same ones."""
    out = []
    for kind, length in ((VECTOR, params.width - 1), (MASK, params.opened)):
        seed = blake2b(challenge + bytes([kind]) + params.round.to_bytes(8, "little"),
                       digest_size=32, person=b"flnode-secagg").digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
        out.append(F.uniform(length, test_only_rng=rng))  # public, deterministic: not a secret
    return out[0], out[1]


def check_value(piece: Piece, gamma: np.ndarray) -> int:
    """sum_c gamma_c piece[c] + piece[blinding]: the holder's piece of the dealing check."""
    v = piece.values
    if v.size != gamma.size + 1:
        raise PieceError(f"{v.size} values, expected {gamma.size + 1}", piece.owner)
    return int(F.add(F.sum_mod(F.mul(v[:-1], gamma)), v[-1]))


def _held(params: RoundParams, held: Mapping[int, Piece], kind: int, holder: int,
          owners: tuple[int, ...], length: int) -> None:
    for i in owners:
        p = held.get(i)
        if p is None:
            raise SecAggError(f"holder {holder} has no {kind} piece from dealer {i}")
        if (p.round, p.kind, p.owner, p.holder) != (params.round, kind, i, holder):
            raise PieceError(f"piece keyed {p.key}, expected {(params.round, kind, i, holder)}", i)
        if p.values.size != length:
            raise PieceError(f"{p.values.size} values, expected {length}", i)


def check_piece(params: RoundParams, holder: int, vectors: Mapping[int, Piece],
                masks: Mapping[int, Piece], dealers: tuple[int, ...], challenge: bytes) -> Piece:
    """Holder's CHECK piece: entry i - 1 for dealer i's VECTOR sharing, n + i - 1 for its
    MASK sharing (0 for members who did not deal)."""
    dealers = params.members_in(dealers, "dealers")
    _held(params, vectors, VECTOR, holder, dealers, params.width)
    _held(params, masks, MASK, holder, dealers, params.opened + 1)
    gv, gm = challenge_vectors(params, challenge)
    out = np.zeros(2 * params.members, dtype=np.uint64)
    for i in dealers:
        out[i - 1] = check_value(vectors[i], gv)
        out[params.members + i - 1] = check_value(masks[i], gm)
    return Piece(params.round, CHECK, 0, holder, out)


@dataclass
class DealingVerdict:
    """What the checks say. Before the degree-2 step the protocol settles each dispute
    with `resolve_dispute` on the holder's dealer-signed piece (a holder that does not
    produce it is at fault): a dealer at fault leaves `accepted` (its vector and masks are
    then left out everywhere); a holder at fault is named, and its opened pieces are
    ignored from then on. Every member then passes the same dealer set to
    `degree2_piece`, `open_degree2` and `sum_piece`.

    A dealer is in exactly one of `accepted`, `refused`, `unresolved` (and, from
    `judge_each`, `too_few`). `unresolved`: its check disagrees but the holders' checks
    are too few to correct t wrong ones, so the dealer or up to t holders may be at fault:
    left out of the round, nobody named (the protocol must not enter it on this verdict;
    node/secagg/explain.py judges such dealings again from every dealer's checks at once)."""

    accepted: tuple[int, ...]  # dealers whose sharings are consistent (disputes aside)
    refused: dict[int, str] = field(default_factory=dict)  # dealer -> why
    # (dealer, holder, kind) -> the check value the holder's piece must give (a dispute)
    disputes: dict[tuple[int, int, int], int] = field(default_factory=dict)
    unresolved: dict[int, str] = field(default_factory=dict)  # dealer -> why (nobody named)
    too_few: dict[int, str] = field(default_factory=dict)  # judge_each: dealer -> why


def judge_dealings(params: RoundParams, checks: Mapping[int, Piece], dealers: tuple[int, ...],
                   test_only_rng: np.random.Generator | None = None) -> DealingVerdict:
    """Decode every dealer's check codewords from the holders' opened CHECK pieces (all
    dealers' columns at once: `decode_columns`). TooFewPieces if fewer holders answered
    than the mask check's degree 2t - 1 needs (2t).

    Up to t members may lie, so a column is corrected as `decode(max_errors=t)` does: up
    to a = t wrong checks when N >= k + 1 + 2t (k = t for vectors, 2t - 1 for masks),
    else up to a = N - k - 1 - t (`shamir.correctable`), the most that t liars cannot
    steer:
    - consistent: accepted;
    - within a of a codeword: accepted, each disagreeing holder a dispute (with at most t
      liars that codeword is the honest dealer's own: a liar cannot steer it);
    - farther than t from every codeword (a = t): refused: an honest dealer's column has
      at most t wrong checks (the liars), so its dealer sent wrong pieces;
    - farther than a < t: unresolved, nobody named (correcting up to the old radius
      (N - k - 1) // 2 let t liars steer the decode to another codeword: an honest
      dealer refused, or honest holders disputed while the liars were not).
    `test_only_rng` is unused (the decoding is deterministic); kept for callers."""
    n, t = params.members, params.threshold
    dealers = params.members_in(dealers, "dealers")
    params.members_in(tuple(checks), "holders")
    for j, p in checks.items():
        if (p.round, p.kind, p.holder, p.values.size) != (params.round, CHECK, j, 2 * n):
            raise PieceError(f"not this round's check piece of holder {j}", j)
    verdict = DealingVerdict(accepted=())
    if not dealers:
        return verdict
    points = sorted(checks)
    if len(points) < 2 * t:
        raise TooFewPieces(f"dealing checks of member(s) {', '.join(map(str, dealers))} "
                           f"(mask degree {2 * t - 1})", 2 * t, len(points),
                           tuple(sorted(set(range(1, n + 1)) - set(points))))
    values = np.stack([checks[j].values for j in points])
    disputes: dict[tuple[int, int, int], int] = {}
    for kind, offset, degree in ((VECTOR, 0, t), (MASK, n, 2 * t - 1)):
        name = ("vector", "mask")[kind - 1]
        spare = len(points) - degree - 1
        fixes = correctable(spare, t)
        got = decode_columns(points, values[:, [offset + i - 1 for i in dealers]], degree, fixes)
        for c, i in enumerate(dealers):
            if i in verdict.refused or i in verdict.unresolved:
                continue
            if got.ok[c]:
                for k in np.flatnonzero(got.wrong[:, c]).tolist():
                    disputes[(i, points[k], kind)] = int(got.codeword[k, c])
            elif fixes == t:
                verdict.refused[i] = (
                    f"inconsistent {name} pieces: the checks of its {len(points)} holders are "
                    f"more than t = {t} away from every polynomial of degree {degree} (an "
                    f"honest dealing disagrees only at the up to t lying holders)")
            else:
                verdict.unresolved[i] = (
                    f"its {name} check disagrees at more than {fixes} of its {len(points)} "
                    f"holders; telling up to t = {t} lying holders from a wrong dealing needs "
                    f"{degree + 1 + 2 * t} holders' checks (detected, nobody named)")
    verdict.accepted = tuple(i for i in dealers
                             if i not in verdict.refused and i not in verdict.unresolved)
    verdict.disputes = {k: v for k, v in disputes.items() if k[0] in verdict.accepted}
    return verdict


def judge_each(params: RoundParams, checks: Mapping[int, Piece],
               holders_of: Mapping[int, tuple[int, ...] | set[int] | frozenset[int]],
               test_only_rng: np.random.Generator | None = None) -> DealingVerdict:
    """`judge_dealings` when each dealer counts the checks of its own holders
    (`holders_of`: dealer -> holders that hold its pieces): dealers with the same holders
    are judged in one batch (one syndrome product and one Berlekamp-Massey pass for all of
    them, where a call per dealer repeats the fixed costs n times). A dealer held by too
    few holders goes to `too_few` (not entered, nobody named). The merged verdict's fields
    are as `judge_dealings`'."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, holders in holders_of.items():
        groups.setdefault(tuple(sorted(holders)), []).append(i)
    out = DealingVerdict(accepted=())
    accepted: list[int] = []
    for holders, dealers in sorted(groups.items()):
        try:
            v = judge_dealings(params, {j: checks[j] for j in holders if j in checks},
                               tuple(sorted(dealers)), test_only_rng)
        except TooFewPieces as exc:
            out.too_few.update({i: str(exc) for i in dealers})
            continue
        accepted += v.accepted
        out.refused.update(v.refused)
        out.unresolved.update(v.unresolved)
        out.disputes.update(v.disputes)
    out.accepted = tuple(sorted(accepted))
    return out


def resolve_dispute(params: RoundParams, challenge: bytes, piece: Piece, expected: int) -> str:
    """Who is at fault in a dispute, from the dealer-signed piece the holder received
    (the protocol checks the signature; a SEED piece is expanded): "holder" if that piece
    gives the expected check value (the holder opened a wrong check), "dealer" if it does
    not (the dealer sent an inconsistent piece; the signed piece proves it)."""
    if piece.kind == SEED:
        piece = expand_seed_piece(params, piece)
    gv, gm = challenge_vectors(params, challenge)
    return "holder" if check_value(piece, gv if piece.kind == VECTOR else gm) == expected else "dealer"


# --- 3. degree-2 pieces ----------------------------------------------------------------------

def gram(rows: np.ndarray) -> np.ndarray:
    """rows @ rows.T mod p for (k, L) field elements, exactly: each value split in 3 limbs of
    21 bits, the (3k x 3k) limb Gram matrix computed in float64 blocks of 2^11 coordinates
    (exact below 2^53), then recombined mod p."""
    k, length = rows.shape
    acc = np.zeros((_LIMBS * k, _LIMBS * k), dtype=np.uint64)
    mask = np.uint64((1 << _LIMB_BITS) - 1)
    for lo in range(0, length, _GRAM_BLOCK):
        block = rows[:, lo:lo + _GRAM_BLOCK]
        limbs = np.concatenate([((block >> np.uint64(_LIMB_BITS * u)) & mask).astype(np.float64)
                                for u in range(_LIMBS)])
        acc = F.add(acc, (limbs @ limbs.T).astype(np.uint64))  # each entry < 2^53 < p
    out = np.zeros((k, k), dtype=np.uint64)
    for u in range(_LIMBS):
        for v in range(_LIMBS):
            weight = np.uint64(pow(2, _LIMB_BITS * (u + v), F.P))
            out = F.add(out, F.mul(acc[u * k:(u + 1) * k, v * k:(v + 1) * k], weight))
    return out


def degree2_piece(params: RoundParams, holder: int, vectors: Mapping[int, Piece],
                  masks: Mapping[int, Piece], dealers: tuple[int, ...]) -> Piece:
    """Holder's masked pieces of the squared distances and norms of `dealers` (the accepted
    ones; entries of others carry the mask alone, which opens to 0)."""
    d, opened = params.codec.dim, params.opened
    _opens_degree2(params)
    dealers = params.members_in(dealers, "dealers")
    if not dealers:
        raise SecAggError("degree-2 pieces of no dealer")
    _held(params, vectors, VECTOR, holder, dealers, params.width)
    _held(params, masks, MASK, holder, dealers, opened + 1)
    rows = np.stack([vectors[i].values[:d] for i in dealers])
    g = gram(rows)
    vals = np.zeros(opened, dtype=np.uint64)
    a = np.array(dealers, dtype=np.int64)
    diag = g.diagonal()
    vals[(opened - params.members) + a - 1] = diag
    if params.variant == "distances":
        x, y = np.triu_indices(len(dealers), 1)
        dist = F.sub(F.add(diag[:, None], diag[None, :]), F.add(g, g))[x, y]
        lo, hi, n = a[x], a[y], params.members
        vals[(lo - 1) * n - (lo - 1) * lo // 2 + (hi - lo - 1)] = dist  # pair_index, vectorised
    w = F.sum_mod(np.stack([masks[i].values[:opened] for i in dealers]), axis=0)
    return Piece(params.round, DEGREE2, 0, holder, F.add(vals, F.mul_small(w, np.uint64(holder))))


@dataclass(frozen=True)
class Degree2:
    distances: dict[tuple[int, int], int]  # (a, b), a < b -> ||q_a - q_b||^2 (mod p)
    norms: dict[int, int]  # a -> ||q_a||^2 (mod p)
    wrong: tuple[int, ...]  # holders whose opened degree-2 pieces were wrong
    decoded: Decoded


def _opened(params: RoundParams, opened: Mapping[int, Piece], kind: int, length: int
            ) -> dict[int, np.ndarray]:
    params.members_in(tuple(opened), "holders")
    out = {}
    for j, p in opened.items():
        if (p.round, p.kind, p.owner, p.holder) != (params.round, kind, 0, j):
            raise PieceError(f"piece keyed {p.key}, expected {(params.round, kind, 0, j)}", j)
        if p.values.size != length:
            raise PieceError(f"{p.values.size} values, expected {length}", j)
        out[j] = p.values
    return out


def open_degree2(params: RoundParams, opened: Mapping[int, Piece], dealers: tuple[int, ...],
                 test_only_rng: np.random.Generator | None = None) -> Degree2:
    """Decode the opened degree-2t pieces: the distances and norms, and who opened wrong."""
    _opens_degree2(params)
    pieces = _opened(params, opened, DEGREE2, params.opened)
    # Up to t openers may lie: decode with no more than t corrections, all t when the
    # redundancy allows them (N >= 2t + 1 + 2t); between 3t + 1 and 4t pieces only the
    # N - 2t - 1 - t that t liars cannot steer, beyond them a disagreement is only
    # detected (TooManyWrong, nobody named); below 3t + 1 nothing is trusted
    # (TooFewPieces): never steered to another codeword (review of issue 22).
    got = decode(pieces, 2 * params.threshold, what="squared distances and norms",
                 expected=tuple(range(1, params.members + 1)), max_errors=params.threshold,
                 test_only_rng=test_only_rng)
    v = got.value.tolist()
    dealers = params.members_in(dealers, "dealers")
    norms = {a: int(v[params.norm_index(a)]) for a in dealers}
    dist = {}
    if params.variant == "distances":
        dist = {(a, b): int(v[params.pair_index(a, b)]) for a in dealers for b in dealers if a < b}
    return Degree2(dist, norms, got.wrong, got)


# --- 5. select -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    selected: tuple[int, ...]
    excluded: dict[int, str]  # member -> reason
    scores: dict[int, int]  # multi-Krum scores (exact integers), variant "distances"
    note: str = ""


def _opens_degree2(params: RoundParams) -> None:
    if params.variant in ("sum_only", "range"):
        raise SecAggError(f"variant {params.variant} opens no degree-2 values (norms or "
                          "distances: select_without_opening, select_in_range)")


def select_in_range(params: RoundParams, dealers: tuple[int, ...],
                    out_of_range: Mapping[int, str]) -> Selection:
    """Variant "range": every accepted dealer whose range check opened 0 is summed; the
    others are left out, named with their reason (node/secagg/range_check.py judge)."""
    if params.variant != "range":
        raise SecAggError(f"variant {params.variant!r} does not run the range check")
    dealers = params.members_in(dealers, "dealers")
    excluded = {i: why for i, why in out_of_range.items() if i in dealers}
    return Selection(tuple(i for i in dealers if i not in excluded), excluded, {},
                     note="range: one bit per member opened (in range or not)")


def select_without_opening(params: RoundParams, dealers: tuple[int, ...]) -> Selection:
    """Variant "sum_only": every accepted dealer is summed; nothing per member is opened.
    A vector past the clip is caught only by the sum's aggregate norm check (open_sum:
    AggregateOutOfBounds, no one named)."""
    if params.variant != "sum_only":
        raise SecAggError(f"variant {params.variant!r} selects on opened values (select)")
    return Selection(params.members_in(dealers, "dealers"), {}, {},
                     note="sum_only: no per-member values opened; every accepted dealer summed")


def select(params: RoundParams, values: Degree2) -> Selection:
    """The same selection at every member, from the decoded integers only."""
    _opens_degree2(params)
    bound = params.codec.norm_bound_sq
    excluded = {a: f"norm_too_large: ||q||^2 = {v} > R^2 = {bound}"
                for a, v in values.norms.items() if v > bound}
    passing = sorted(a for a in values.norms if a not in excluded)
    if params.variant == "norm_only":
        return Selection(tuple(passing), excluded, {})
    n, f = len(passing), params.f
    if n < 2 * f + 3:
        return Selection(tuple(passing), excluded, {}, note=(
            f"{n} member(s) passed the norm check < 2f + 3 = {2 * f + 3}: multi-Krum at "
            f"f = {f} cannot run; all of them kept"))
    k = n - f - 2
    scores = {}
    for a in passing:
        row = sorted(values.distances[(min(a, b), max(a, b))] for b in passing if b != a)
        scores[a] = sum(row[:k])
    keep = n - f if params.krum_m is None else min(params.krum_m, n)
    order = sorted(passing, key=lambda a: (scores[a], a))
    for a in order[keep:]:
        excluded[a] = (f"krum_not_selected: score {scores[a]} (sum of squared distances to its "
                       f"{k} nearest) not among the {keep} lowest")
    return Selection(tuple(sorted(order[:keep])), excluded, scores)


# --- 6. sum ---------------------------------------------------------------------------------

def sum_piece(params: RoundParams, holder: int, vectors: Mapping[int, Piece],
              selected: tuple[int, ...]) -> Piece:
    """Holder's piece of the selected members' sum (the blinding coordinate dropped)."""
    d = params.codec.dim
    selected = params.members_in(selected, "selected")
    if not selected:
        raise SecAggError("a sum piece of no member: nobody was selected")
    _held(params, vectors, VECTOR, holder, selected, params.width)
    total = F.sum_mod(np.stack([vectors[i].values[:d] for i in selected]), axis=0)
    return Piece(params.round, SUM, 0, holder, total)


@dataclass(frozen=True)
class Aggregate:
    total: np.ndarray  # float64: the sum of the selected members' clipped vectors (IntegerCodec:
    # the exact int64 sum of their contributions)
    field_sum: np.ndarray  # the same in F_p (the sum of their encodings)
    selected: tuple[int, ...]
    wrong: tuple[int, ...]  # holders whose opened sum pieces were wrong


def sum_recipients(params: RoundParams, member: int) -> tuple[int, ...]:
    """The optimistic opening (node/runtime/secure_open.py): `member` sends its SUM piece
    only to its 2t ring neighbours member +- 1..t (cyclically; a symmetric relation, so it
    also receives from exactly these), and every member holds 2t + 1 pieces, its own
    included: enough to decode and to detect up to t wrong or missing ones, not to correct
    them. On any doubt the members send each other the rest (the fallback) and decode with
    correction. Everyone else when n - 1 <= 2t (no saving)."""
    n, t = params.members, params.threshold
    if n - 1 <= 2 * t:
        return tuple(j for j in range(1, n + 1) if j != member)
    return tuple(sorted({(member - 1 + k) % n + 1 for k in (*range(1, t + 1),
                                                          *range(-t, 0))}))


def open_sum(params: RoundParams, opened: Mapping[int, Piece], selected: tuple[int, ...],
             correct: bool = True, test_only_rng: np.random.Generator | None = None) -> Aggregate:
    """Decode the selected members' sum; AggregateOutOfBounds if it fails the exact norm
    check (a selected encoding wrapped). `correct=False` for the optimistic opening (see
    `sum_recipients`): any wrong piece is TooManyWrong."""
    pieces = _opened(params, opened, SUM, params.codec.dim)
    # As open_degree2: at most t wrong pieces corrected, only with N >= t + 1 + 2t.
    got = decode(pieces, params.threshold, what="sum of the selected vectors",
                 expected=tuple(range(1, params.members + 1)), correct=correct,
                 max_errors=params.threshold, test_only_rng=test_only_rng)
    total = params.codec.decode_sum(got.value, len(selected))
    return Aggregate(total, got.value, tuple(selected), got.wrong)

"""The secure-aggregation core (node/secagg, issue 22): the field, the encoding's bounds,
Shamir sharing and Reed-Solomon decoding, the BREA round (distances on pieces, multi-Krum,
norm bound, sum) and the pieces' bytes. Pure functions: no transport, no clock, no torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from node.secagg import field as F
from node.secagg import robust as R
from node.secagg.encoding import (
    AggregateOutOfBounds,
    FieldOverflow,
    FixedPoint,
    NormTooLarge,
    int_sq_norm,
    signed,
)
from node.secagg.errors import PieceError, SecAggError, TooFewPieces, TooManyWrong
from node.secagg.pieces import (
    CHECK,
    DEGREE2,
    HEADER_BYTES,
    MASK,
    MAX_PIECE_VALUES,
    SEED,
    SUM,
    VECTOR,
    Piece,
    from_bytes,
    to_bytes,
)
from node.secagg.shamir import decode, expand_seed, share, share_poly, share_seeded

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
elements = st.integers(min_value=0, max_value=F.P - 1)


def test_the_core_imports_only_numpy_the_standard_library_and_itself():
    """sans-IO: no torch, no transport, no clock module, nothing of flnode outside
    node.secagg (docs/architecture.md)."""
    import ast
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "node" / "secagg"
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                ok = (name.startswith("node.secagg") or top == "numpy"
                      or (top in sys.stdlib_module_names and top not in ("time", "socket",
                                                                         "asyncio", "datetime")))
                if not ok:
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad


# --- the field -----------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.tuples(elements, elements), min_size=1, max_size=50))
def test_mul_add_sub_agree_with_python_ints(pairs):
    a = np.array([x for x, _ in pairs], dtype=np.uint64)
    b = np.array([y for _, y in pairs], dtype=np.uint64)
    assert F.mul(a, b).tolist() == [x * y % F.P for x, y in pairs]
    assert F.add(a, b).tolist() == [(x + y) % F.P for x, y in pairs]
    assert F.sub(a, b).tolist() == [(x - y) % F.P for x, y in pairs]
    assert F.neg(a).tolist() == [-x % F.P for x, _ in pairs]
    assert F.mul_small(a, np.uint64(65535)).tolist() == [x * 65535 % F.P for x, _ in pairs]
    assert int(F.sum_mod(a)) == sum(x for x, _ in pairs) % F.P


def test_extremes_of_the_field_multiply_exactly():
    top = np.array([F.P - 1, F.P - 2, 1 << 60, (1 << 32) - 1, 0], dtype=np.uint64)
    got = F.mul(top[:, None], top[None, :])
    assert got.tolist() == [[int(x) * int(y) % F.P for y in top] for x in top]


def test_uniform_draws_are_field_elements_and_the_test_rng_is_deterministic():
    a = F.uniform(10_000)
    assert a.dtype == np.uint64 and int(a.max()) < F.P and len(set(a.tolist())) == 10_000
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert (F.uniform(100, rng1) == F.uniform(100, rng2)).all()


# --- the encoding --------------------------------------------------------------------------

def test_the_documented_scales_and_bounds_hold():
    for n, bits in ((32, 24), (8, 26)):
        c = FixedPoint.choose(1.0, 100_000, n)
        assert c.scale_bits == bits
        assert (2 * n * c.radius_ceil) ** 2 < F.P  # (*): sums, distances, aggregate check
        assert c.distance_bound_sq < F.P and n * c.radius_ceil < F.P // 2
        with pytest.raises(FieldOverflow):
            FixedPoint(1.0, 100_000, n, bits + 1)  # one bit more could wrap
    assert FixedPoint.choose(1.0, 100_000, 32).relative_error < 1e-5


@SETTINGS
@given(n=st.integers(1, 64), d=st.integers(1, 200), clip=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**32 - 1))
def test_a_sum_of_n_clipped_vectors_decodes_exactly(n, d, clip, seed):
    rng = np.random.default_rng(seed)
    codec = FixedPoint.choose(clip, d, n)
    worst = np.zeros(d)
    worst[0] = clip  # every member at the clip in the same direction: the largest sum
    vectors = [worst] * (n // 2) + [rng.normal(size=d) for _ in range(n - n // 2)]
    vectors = [v / max(1.0, np.linalg.norm(v) / clip) for v in vectors]
    total = F.sum_mod(np.stack([codec.encode(v) for v in vectors]), axis=0)
    exact = sum(np.rint(v * codec.scale).astype(np.int64) for v in vectors)
    assert (signed(total) == exact).all()  # no wrap: the integer sum itself
    got = codec.decode_sum(total, n)
    assert np.abs(got - sum(vectors)).max() <= n * 0.5 / codec.scale + 1e-12 * clip * n


def test_opposite_vectors_at_the_clip_have_their_squared_distance_below_p():
    d, n = 1000, 8
    codec = FixedPoint.choose(2.0, d, n)
    x = np.full(d, 2.0 / math.sqrt(d))
    qa, qb = signed(codec.encode(x)), signed(codec.encode(-x))
    dist = int_sq_norm(qa - qb)
    assert dist <= codec.distance_bound_sq < F.P
    assert int_sq_norm(qa) <= codec.norm_bound_sq


def test_encodings_that_could_wrap_are_refused_by_name():
    codec = FixedPoint.choose(1.0, 10, 4)
    with pytest.raises(NormTooLarge, match="clip"):
        codec.encode(np.full(10, 1.0))  # norm 3.16 > 1
    with pytest.raises(NormTooLarge, match="non-finite"):
        codec.encode(np.array([np.nan] + [0.0] * 9))
    with pytest.raises(NormTooLarge, match="d = 10"):
        codec.encode(np.zeros(9))
    with pytest.raises(FieldOverflow, match="no scale fits|rounding error"):
        FixedPoint.choose(1.0, 10**12, 200)
    with pytest.raises(FieldOverflow, match="could wrap"):
        FixedPoint(1.0, 10, 4, 40)
    assert codec.encode(np.full(10, 1.0) / math.sqrt(10) * (1 + 5e-7)) is not None  # float32 slack


# --- Shamir sharing and decoding ----------------------------------------------------------

@SETTINGS
@given(t=st.integers(1, 4), extra=st.integers(0, 4), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_any_t_plus_one_pieces_reconstruct(t, extra, seed, data):
    rng = np.random.default_rng(seed)
    n = t + 1 + extra
    secret = F.uniform(17, rng)
    pieces = share(secret, n, t, rng)
    who = data.draw(st.lists(st.integers(1, n), min_size=t + 1, max_size=t + 1, unique=True))
    got = decode({j: pieces[j - 1] for j in who}, t)
    assert (got.value == secret).all() and got.wrong == ()


def _chi2_of_pairs(p1: np.ndarray, p2: np.ndarray, bits: int = 4) -> float:
    """p-value of the joint (top 4 bits, top 4 bits) and (low 4, low 4) cells being uniform."""
    worst = 1.0
    for shift, mask in ((61 - bits, (1 << bits) - 1), (0, (1 << bits) - 1)):
        a = (p1 >> np.uint64(shift)).astype(np.int64) & mask
        b = (p2 >> np.uint64(shift)).astype(np.int64) & mask
        counts = np.bincount(a * (1 << bits) + b, minlength=1 << (2 * bits))
        worst = min(worst, float(chisquare(counts).pvalue))
    return worst


def test_any_t_pieces_of_a_fixed_secret_are_uniform():
    """20,000 independent sharings (one per coordinate) of the same secret, t = 2 of 5:
    the joint distribution of two holders' pieces over 256 cells (top bits and low bits)
    is uniform. Real sharing, OS randomness: a false alarm at 1e-6."""
    secret = np.full(20_000, 123_456_789, dtype=np.uint64)
    pieces = share(secret, 5, 2)
    for a, b in ((1, 2), (2, 5), (3, 4)):
        assert _chi2_of_pairs(pieces[a - 1], pieces[b - 1]) > 1e-6


def test_the_uniformity_test_catches_a_sharing_that_leaks():
    """The same test on a broken sharing (coefficients of 40 bits, not 61: a 'short
    random' bug) rejects it: the pieces' top bits are the secret's."""
    secret = np.full(20_000, 123_456_789, dtype=np.uint64)
    short = F.uniform((2, 20_000)) >> np.uint64(21)
    pieces = share_poly(secret, short, 5)
    assert _chi2_of_pairs(pieces[0], pieces[1]) < 1e-6


@SETTINGS
@given(t=st.integers(1, 3), extra=st.integers(0, 3), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_up_to_t_wrong_pieces_are_corrected_and_named(t, extra, seed, data):
    rng = np.random.default_rng(seed)
    n = 3 * t + 1 + extra
    secret = F.uniform(40, rng)
    pieces = share(secret, n, t, rng)
    bad = data.draw(st.lists(st.integers(1, n), max_size=t, unique=True))
    for j in bad:
        k = data.draw(st.integers(0, 39))  # one coordinate off, or the whole piece
        if data.draw(st.booleans()):
            pieces[j - 1, k] = (pieces[j - 1, k] + np.uint64(1)) % F.P64
        else:
            pieces[j - 1] = F.uniform(40, rng)
    got = decode({j: pieces[j - 1] for j in range(1, n + 1)}, t)
    assert (got.value == secret).all()
    assert set(got.wrong) == set(bad) and set(got.good) == set(range(1, n + 1)) - set(bad)


def test_fewer_pieces_than_needed_is_a_named_error():
    pieces = share(F.uniform(8), 7, 3)
    with pytest.raises(TooFewPieces, match=r"4 pieces needed, 3 arrived \(missing: members 4, 5, 6, 7\)"):
        decode({j: pieces[j - 1] for j in (1, 2, 3)}, 3, expected=tuple(range(1, 8)))


def test_more_wrong_pieces_than_the_radius_is_an_error_not_a_guess():
    pieces = share(F.uniform(8), 7, 2)  # 7 pieces, degree 2: corrects 2
    pieces[0] = F.uniform(8)
    with pytest.raises(TooManyWrong):
        decode({j: pieces[j - 1] for j in (1, 2, 3, 4)}, 2)  # 1 spare: detects, cannot correct
    for j in (1, 2, 3):
        pieces[j - 1] = F.uniform(8)
    with pytest.raises(TooManyWrong):
        decode({j: pieces[j - 1] for j in range(1, 8)}, 2)


def test_above_the_correction_radius_a_corrector_is_steered_and_detection_is_not():
    """5 pieces of a degree-2 sharing: correction radius 1, detection up to 2. Two colluders
    put their pieces on a polynomial through two honest pieces and a false value at 0: a
    correcting decoder returns the false value and names an honest member; detection
    refuses."""
    secret = F.uniform(3)
    pieces = share(secret, 5, 2)
    for c in range(3):
        known = [(int(secret[c]) + 1) % F.P, int(pieces[0, c]), int(pieces[1, c])]
        for j in (4, 5):
            pieces[j - 1, c] = sum(a * b for a, b in zip(F.lagrange_at([0, 1, 2], j), known,
                                                         strict=True)) % F.P
    got = decode({j: pieces[j - 1] for j in range(1, 6)}, 2)
    assert got.wrong == (3,) and (got.value == F.add(secret, np.ones(3, dtype=np.uint64))).all()
    with pytest.raises(TooManyWrong, match="detected"):
        decode({j: pieces[j - 1] for j in range(1, 6)}, 2, correct=False)


def test_pieces_outside_the_field_are_refused():
    pieces = share(F.uniform(4), 4, 1)
    pieces[2, 0] = F.P64
    with pytest.raises(F.FieldError, match="member 3"):
        decode({j: pieces[j - 1] for j in range(1, 5)}, 1)


# --- the round -----------------------------------------------------------------------------

class Round:
    """Every member of one secure round, in one process: dealing, checks, degree-2 pieces,
    selection, sum, with hooks for hostile members and dropouts."""

    def __init__(self, n, t, d=64, variant="distances", seed=0, clip=1.0):
        self.rng = np.random.default_rng(seed)
        self.codec = FixedPoint.choose(clip, d, n)
        self.p = R.RoundParams(7, n, t, self.codec, variant=variant)
        self.n, self.t, self.d = n, t, d
        self.challenge = b"agreed after dealing"

    def honest_vectors(self):
        base = self.rng.normal(size=self.d)
        base *= 0.5 / np.linalg.norm(base)
        out = {}
        for i in range(1, self.n + 1):
            v = base + 0.05 * self.rng.normal(size=self.d) / math.sqrt(self.d)
            out[i] = v / max(1.0, np.linalg.norm(v))
        return out

    def deal(self, encoded, seeded=False):
        self.encoded = encoded
        self.dealers = tuple(sorted(encoded))
        self.deals = {i: R.deal_encoded(self.p, i, e, seeded=seeded, test_only_rng=self.rng)
                      for i, e in encoded.items()}
        deals = self.deals
        self.vec = {j: {i: self.expand(deals[i][j][0]) for i in deals} for j in range(1, self.n + 1)}
        self.msk = {j: {i: deals[i][j][1] for i in deals} for j in range(1, self.n + 1)}

    def expand(self, piece):
        return R.expand_seed_piece(self.p, piece) if piece.kind == SEED else piece

    def checks(self, holders):
        return {j: R.check_piece(self.p, j, self.vec[j], self.msk[j], self.dealers, self.challenge)
                for j in holders}

    def degree2(self, holders):
        return {j: R.degree2_piece(self.p, j, self.vec[j], self.msk[j], self.dealers)
                for j in holders}

    def sums(self, holders, selected):
        return {j: R.sum_piece(self.p, j, self.vec[j], selected) for j in holders}

    def run(self, holders=None, tamper=lambda kind, pieces: pieces):
        holders = tuple(range(1, self.n + 1)) if holders is None else holders
        verdict = R.judge_dealings(self.p, tamper(CHECK, self.checks(holders)), self.dealers)
        assert verdict.accepted == self.dealers, verdict
        values = R.open_degree2(self.p, tamper(DEGREE2, self.degree2(holders)), self.dealers)
        sel = R.select(self.p, values)
        agg = R.open_sum(self.p, tamper(SUM, self.sums(holders, sel.selected)), sel.selected)
        return values, sel, agg


def _plain_field_sum(encoded, selected):
    return F.sum_mod(np.stack([encoded[i] for i in selected]), axis=0)


def _wrong(piece: Piece) -> Piece:
    v = piece.values.copy()
    v[0] = (v[0] + np.uint64(12345)) % F.P64
    return Piece(piece.round, piece.kind, piece.owner, piece.holder, v)


def test_sign_flip_and_scaling_are_left_out_on_distances_from_pieces():
    r = Round(n=13, t=3, d=96)  # 13 >= 4t + 1: the degree-2t opening corrects t
    x = r.honest_vectors()
    x[4] = -x[4]  # sign flip
    x[9] = x[9] * 0.2 + 1.6 * x[1] / np.linalg.norm(x[1]) * 0.5  # pulled, within the clip
    encoded = {i: r.codec.encode(v) for i, v in x.items()}
    r.p = R.RoundParams(7, 13, 3, r.codec, krum_f=2)
    r.deal(encoded)
    values, sel, agg = r.run()
    for (a, b), dist in values.distances.items():  # distances on pieces == in the clear
        assert dist == int_sq_norm(signed(encoded[a]) - signed(encoded[b]))
    for a, norm in values.norms.items():
        assert norm == int_sq_norm(signed(encoded[a]))
    assert 4 not in sel.selected and 9 not in sel.selected
    assert "krum_not_selected" in sel.excluded[4]
    assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()  # exact in the field
    assert np.allclose(agg.total, sum(x[i] for i in sel.selected), atol=1e-6)
    assert agg.wrong == () and values.wrong == ()


def test_a_scaled_member_beyond_the_clip_fails_the_norm_bound_in_both_variants():
    for variant in ("distances", "norm_only"):
        r = Round(n=7, t=2, variant=variant, seed=3)
        x = r.honest_vectors()
        encoded = {i: r.codec.encode(v) for i, v in x.items()}
        big = np.rint(x[2] / np.linalg.norm(x[2]) * 3.0 * r.codec.scale).astype(np.int64)
        encoded[2] = np.where(big < 0, big + F.P, big).astype(np.uint64)  # norm 3C, dealt as is
        r.deal(encoded)
        values, sel, agg = r.run()
        assert sel.excluded[2].startswith("norm_too_large")
        assert 2 not in sel.selected
        assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()
        assert (values.distances == {}) == (variant == "norm_only")


def test_a_wrapped_encoding_passes_the_field_norm_but_the_aggregate_is_refused():
    """Four coordinates at 1/2 mod p: ||q||^2 = 4 * 1/4 = 1 in the field, and its distances
    to honest members are small too; its real size is p/2. The exact aggregate check
    catches it (the round fails, nobody named)."""
    r = Round(n=7, t=2, variant="norm_only", seed=4)
    x = r.honest_vectors()
    encoded = {i: r.codec.encode(v) for i, v in x.items()}
    crafted = np.zeros(r.d, dtype=np.uint64)
    crafted[:4] = (F.P + 1) // 2
    encoded[6] = crafted
    r.deal(encoded)
    with pytest.raises(AggregateOutOfBounds, match="wrapped"):
        r.run()


def test_wrong_opened_pieces_are_named_and_the_sum_still_decodes():
    r = Round(n=9, t=2, seed=5)  # degree 2t = 4 with 9 pieces: corrects 2
    x = r.honest_vectors()
    encoded = {i: r.codec.encode(v) for i, v in x.items()}
    r.deal(encoded)

    def tamper(kind, pieces):
        if kind == DEGREE2:
            pieces[3] = _wrong(pieces[3])
        if kind == SUM:
            pieces[8], pieces[2] = _wrong(pieces[8]), _wrong(pieces[2])
        return pieces

    values, sel, agg = r.run(tamper=tamper)
    assert values.wrong == (3,) and agg.wrong == (2, 8)
    assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()


def test_an_inconsistent_dealer_is_named_from_its_signed_piece():
    r = Round(n=8, t=2, seed=6)  # 8 = 4t: the mask checks (degree 2t - 1) correct t too
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded)
    r.vec[3][5] = _wrong(r.vec[3][5])  # dealer 5 sent holder 3 a piece off its polynomial
    verdict = R.judge_dealings(r.p, r.checks(range(1, 9)), r.dealers)
    assert set(verdict.disputes) == {(5, 3, VECTOR)}
    expected = verdict.disputes[(5, 3, VECTOR)]
    assert R.resolve_dispute(r.p, r.challenge, r.vec[3][5], expected) == "dealer"
    # a holder that lies in its check is caught by the same rule
    checks = r.checks(range(1, 9))
    checks[4] = Piece(7, CHECK, 0, 4, F.add(checks[4].values, np.ones(16, dtype=np.uint64)))
    verdict = R.judge_dealings(r.p, checks, r.dealers)
    assert (1, 4, VECTOR) in verdict.disputes and (1, 4, MASK) in verdict.disputes
    assert R.resolve_dispute(r.p, r.challenge, r.vec[4][1], verdict.disputes[(1, 4, VECTOR)]) == "holder"
    assert verdict.accepted == r.dealers and not verdict.refused and not verdict.unresolved
    # a dealer off at more holders than t is refused outright
    for j in (1, 2, 3, 4):
        r.vec[j][6] = _wrong(r.vec[j][6])
    verdict = R.judge_dealings(r.p, r.checks(range(1, 9)), r.dealers)
    assert 6 in verdict.refused and 6 not in verdict.accepted


def test_below_4t_holders_mask_checks_correct_what_t_liars_cannot_steer_and_detect_the_rest():
    """n = 7, t = 2: the mask checks (degree 3) have 3 spare holders: they correct 3 - t =
    1 wrong check while detecting t (a codeword within 1 of the checks is the honest one
    whenever at most 2 lie). One liar: named in a dispute, every dealer accepted. Two:
    every dealer unresolved, none refused, nobody disputed."""
    r = Round(n=7, t=2, seed=6)
    r.deal({i: r.codec.encode(v) for i, v in r.honest_vectors().items()})
    checks = r.checks(range(1, 8))
    checks[4] = Piece(7, CHECK, 0, 4, F.add(checks[4].values, np.ones(14, dtype=np.uint64)))
    verdict = R.judge_dealings(r.p, checks, r.dealers)
    assert verdict.accepted == r.dealers and {j for (_, j, _) in verdict.disputes} == {4}
    checks[6] = Piece(7, CHECK, 0, 6, F.add(checks[6].values, np.ones(14, dtype=np.uint64)))
    verdict = R.judge_dealings(r.p, checks, r.dealers)
    assert set(verdict.unresolved) == set(r.dealers) and "nobody named" in verdict.unresolved[1]
    assert verdict.accepted == () and not verdict.refused and not verdict.disputes


def test_t_dropouts_complete_and_one_more_is_a_named_error():
    r = Round(n=9, t=2, seed=7)  # 9 = 3t + 1 + t
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded)
    values, sel, agg = r.run(holders=(1, 2, 4, 6, 7, 8, 9))  # t = 2 gone after dealing
    assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()
    with pytest.raises(TooFewPieces, match=r"7 pieces needed, 6 arrived \(missing: members 3, 5, 6\)"):
        r.run(holders=(1, 2, 4, 7, 8, 9))  # t + 1 gone: the degree-2t values need 3t + 1
    # members who never dealt: the round goes on with the others
    r.deal({i: e for i, e in encoded.items() if i not in (2, 5)})
    values, sel, agg = r.run(holders=(1, 3, 4, 6, 7, 8, 9))
    assert set(sel.selected) <= {1, 3, 4, 6, 7, 8, 9}
    assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()


def test_the_opened_degree2_pieces_are_masked():
    """The opened polynomial is not the bare product polynomial (whose other coefficients
    would hold projections of the vectors) but opens to the same value."""
    r = Round(n=7, t=2, seed=8)
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded)
    masked = r.degree2(range(1, 8))
    zero = {j: {i: Piece(7, MASK, i, j, np.zeros(r.p.opened + 1, dtype=np.uint64))
                for i in r.dealers} for j in range(1, 8)}
    bare = {j: R.degree2_piece(r.p, j, r.vec[j], zero[j], r.dealers) for j in range(1, 8)}
    assert all((masked[j].values != bare[j].values).all() for j in range(1, 8))
    assert (R.open_degree2(r.p, masked, r.dealers).decoded.value
            == R.open_degree2(r.p, bare, r.dealers).decoded.value).all()


def test_a_seeded_dealing_sends_t_seeds_and_the_round_is_exact():
    r = Round(n=8, t=2, seed=9)
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded, seeded=True)
    for i in r.dealers:
        seeds = {j for j in range(1, 9) if r.deals[i][j][0].kind == SEED}
        assert seeds == set(R.seeded_holders(r.p, i)) and len(seeds) == 2 and i not in seeds
        assert all(r.deals[i][j][0].values.size == 4 for j in seeds)
    values, sel, agg = r.run()
    assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()
    assert values.wrong == () and agg.wrong == ()


def test_any_t_pieces_of_a_seeded_sharing_look_uniform():
    secret = np.full(20_000, 987_654_321, dtype=np.uint64)
    seeds = {j: expand_seed(F.uniform(4), bytes([j]), secret.size) for j in (2, 4)}
    pieces = share_seeded(secret, 5, 2, seeds)
    for a, b in ((1, 3), (2, 5), (3, 5)):
        assert _chi2_of_pairs(pieces[a - 1], pieces[b - 1]) > 1e-6
    assert (decode({j: pieces[j - 1] for j in (1, 3, 5)}, 2).value == secret).all()


def test_a_dealer_whose_seed_does_not_fit_its_polynomial_is_named():
    r = Round(n=7, t=2, seed=10)
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded, seeded=True)
    j = R.seeded_holders(r.p, 4)[0]
    other = Piece(7, SEED, 4, j, F.uniform(4))  # a different seed than the one it shared with
    r.vec[j][4] = r.expand(other)
    verdict = R.judge_dealings(r.p, r.checks(range(1, 8)), r.dealers)
    assert set(verdict.disputes) == {(4, j, VECTOR)}
    assert R.resolve_dispute(r.p, r.challenge, other, verdict.disputes[(4, j, VECTOR)]) == "dealer"
    with pytest.raises(PieceError, match="seed"):
        R.expand_seed_piece(r.p, Piece(7, SEED, 4, j, F.uniform(5)))


def test_the_optimistic_sum_opening_detects_and_falls_back():
    r = Round(n=8, t=2, seed=11)
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded, seeded=True)
    selected = r.dealers
    sums = r.sums(range(1, 9), selected)
    for k in range(1, 9):
        senders = [j for j in range(1, 9) if k in R.sum_recipients(r.p, j)]
        assert len(senders) == 4 and k not in senders
        mine = {j: sums[j] for j in [*senders, k]}
        agg = R.open_sum(r.p, mine, selected, correct=False)
        assert (agg.field_sum == _plain_field_sum(encoded, selected)).all()
    senders = [j for j in range(1, 9) if 1 in R.sum_recipients(r.p, j)]
    mine = {j: sums[j] for j in [*senders, 1]}
    mine[senders[0]] = _wrong(mine[senders[0]])
    with pytest.raises(TooManyWrong, match="detected"):
        R.open_sum(r.p, mine, selected, correct=False)
    everyone = dict(sums)
    everyone[senders[0]] = mine[senders[0]]
    agg = R.open_sum(r.p, everyone, selected)  # the fallback: all pieces, corrected
    assert agg.wrong == (senders[0],)
    assert (agg.field_sum == _plain_field_sum(encoded, selected)).all()


def test_gram_is_exact_against_python_ints():
    rows = F.uniform((4, 5000))
    rows[0, :] = F.P - 1
    g = R.gram(rows)
    ref = [[sum(int(a) * int(b) for a, b in zip(rows[i], rows[j], strict=True)) % F.P
            for j in range(4)] for i in range(4)]
    assert g.tolist() == ref


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(1, 2), extra=st.integers(0, 4), seeded=st.booleans(),
       variant=st.sampled_from(["distances", "norm_only"]), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_any_round_within_the_radius_sums_exactly_and_names_the_wrong(t, extra, seeded, variant,
                                                                      seed, data):
    n = 3 * t + 1 + extra
    r = Round(n=n, t=t, d=16, variant=variant, seed=seed)
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded, seeded=seeded)
    missing = data.draw(st.lists(st.integers(1, n), max_size=extra, unique=True))
    holders = tuple(j for j in range(1, n + 1) if j not in missing)
    # the degree-2 opening's, the tighter one: t wrong corrected from 4t + 1 pieces, none below
    radius = t if len(holders) >= 4 * t + 1 else 0
    liars = data.draw(st.lists(st.sampled_from(holders), max_size=radius, unique=True))

    def tamper(kind, pieces):
        for j in liars if kind in (DEGREE2, SUM) else ():
            pieces[j] = _wrong(pieces[j])
        return pieces

    values, sel, agg = r.run(holders=holders, tamper=tamper)
    assert set(values.wrong) == set(liars) and set(agg.wrong) == set(liars)
    assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()
    for a, norm in values.norms.items():
        assert norm == int_sq_norm(signed(encoded[a]))


def test_malformed_opened_pieces_name_their_holder():
    r = Round(n=5, t=2, seed=12)
    encoded = {i: r.codec.encode(v) for i, v in r.honest_vectors().items()}
    r.deal(encoded)
    sums = r.sums(range(1, 6), r.dealers)
    short = dict(sums)
    short[4] = Piece(7, SUM, 0, 4, sums[4].values[:-1])
    with pytest.raises(PieceError, match="member 4: .*values, expected 64"):
        R.open_sum(r.p, short, r.dealers)
    old = dict(sums)
    old[2] = Piece(6, SUM, 0, 2, sums[2].values)  # a piece of another round
    with pytest.raises(PieceError, match="member 2: piece keyed"):
        R.open_sum(r.p, old, r.dealers)
    stranger = dict(sums)
    stranger[9] = Piece(7, SUM, 0, 9, sums[1].values)
    with pytest.raises(SecAggError, match="holders .* members 1..5"):
        R.open_sum(r.p, stranger, r.dealers)
    ragged = {j: sums[j].values for j in range(1, 6)}
    ragged[3] = ragged[3][:10]
    with pytest.raises(PieceError, match="member 3"):
        decode(ragged, 2)
    with pytest.raises(SecAggError, match="no member"):
        R.sum_piece(r.p, 1, r.vec[1], ())


def test_round_parameters_are_checked():
    codec = FixedPoint.choose(1.0, 8, 4)
    with pytest.raises(SecAggError, match="2t \\+ 1"):
        R.RoundParams(1, 4, 2, codec)
    with pytest.raises(SecAggError, match="encoding for 4 members"):
        R.RoundParams(1, 5, 1, codec)
    with pytest.raises(SecAggError, match="variant"):
        R.RoundParams(1, 4, 1, codec, variant="all")


# --- pieces as bytes -----------------------------------------------------------------------

@SETTINGS
@given(kind=st.sampled_from([VECTOR, MASK, CHECK, DEGREE2, SUM]), holder=st.integers(1, 256),
       owner=st.integers(1, 256), rnd=st.integers(0, 2**63 - 1),
       values=st.lists(elements, max_size=30))
def test_pieces_round_trip(kind, holder, owner, rnd, values):
    owner = owner if kind in (VECTOR, MASK) else 0
    p = Piece(rnd, kind, owner, holder, np.array(values, dtype=np.uint64))
    data = to_bytes(p)
    assert len(data) == HEADER_BYTES + (61 * len(values) + 7) // 8  # packed at 61 bits
    q = from_bytes(data, expected_count=len(values), expected_kind=kind)
    assert q.key == p.key and q.values.tolist() == values


def test_hostile_bytes_are_refused_with_the_sender_named():
    good = to_bytes(Piece(3, VECTOR, 2, 5, np.arange(4, dtype=np.uint64)))

    def refused(data, match, **kw):
        with pytest.raises(PieceError, match=match) as e:
            from_bytes(data, sender=9, **kw)
        assert e.value.sender == 9 and str(e.value).startswith("member 9: ")

    refused(good[:10], "shorter than the 24-byte header")
    refused(b"XXXX" + good[4:], "magic")
    refused(good[:4] + b"\x01" + good[5:], "version 1")
    refused(good[:5] + b"\x09" + good[6:], "unknown piece kind 9")
    refused(good[:6] + b"\x00\x00" + good[8:], "owner 0")
    refused(good[:8] + b"\x00\x00" + good[10:], "holder 0")
    refused(good, "4 values, this round's vector pieces have 65", expected_count=65)
    refused(good, "a vector piece where a sum piece", expected_kind=SUM)
    refused(good[:-1], "bytes for 4 declared values")
    refused(good + b"\x00" * 8, "bytes for 4 declared values")  # (more: test_secagg_pieces.py)
    huge = bytearray(good)
    huge[20:24] = (MAX_PIECE_VALUES + 1).to_bytes(4, "little")
    refused(bytes(huge), "MAX_PIECE_VALUES")  # refused before any allocation
    lying = bytearray(good)
    lying[20:24] = (1 << 24).to_bytes(4, "little")  # 16M values declared, 32 bytes sent
    refused(bytes(lying), "bytes for 16777216 declared values")
    bad_value = good[:HEADER_BYTES] + (F.P << 61).to_bytes(31, "little")  # value 1 = p
    refused(bad_value, r"value 1 is 2305843009213693951 = 2\^61 - 1, not a field element")
    opened = bytearray(to_bytes(Piece(3, SUM, 0, 5, np.arange(4, dtype=np.uint64))))
    opened[6:8] = (3).to_bytes(2, "little")
    refused(bytes(opened), "opened sum piece with owner 3")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_raise_only_piece_errors(data):
    try:
        from_bytes(data, sender=1)
    except PieceError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, HEADER_BYTES + (61 * 6 + 7) // 8 - 1), st.integers(0, 255)),
                min_size=1, max_size=4))
def test_a_mutated_piece_parses_or_raises_a_piece_error(flips):
    data = bytearray(to_bytes(Piece(3, MASK, 2, 5, F.uniform(6))))
    for at, value in flips:
        data[at] = value
    try:
        p = from_bytes(bytes(data), expected_count=6, sender=5)
    except PieceError:
        return
    assert p.values.size == 6 and int(p.values.max()) < F.P


def test_sum_only_opens_nothing_per_member_and_sums_every_accepted_dealer():
    """Variant "sum_only" (the one distributed DP charges at the sum's noise): the masks carry
    one generator, no degree-2 value can be computed or opened, every accepted dealer is
    summed exactly; a member past the clip is caught by the aggregate check only."""
    r = Round(n=7, t=2, variant="sum_only", seed=5)
    assert r.p.opened == 0
    x = r.honest_vectors()
    encoded = {i: r.codec.encode(v) for i, v in x.items()}
    r.deal(encoded)
    assert all(m.values.size == 1 for m in r.msk[1].values())
    holders = tuple(range(1, 8))
    verdict = R.judge_dealings(r.p, r.checks(holders), r.dealers)
    with pytest.raises(SecAggError, match="sum_only opens no degree-2"):
        r.degree2(holders)
    with pytest.raises(SecAggError, match="sum_only opens no degree-2"):
        R.select(r.p, None)
    sel = R.select_without_opening(r.p, verdict.accepted)
    assert sel.selected == r.dealers and sel.excluded == {} and "sum_only" in sel.note
    agg = R.open_sum(r.p, r.sums(holders, sel.selected), sel.selected)
    assert (agg.field_sum == _plain_field_sum(encoded, sel.selected)).all()
    with pytest.raises(SecAggError, match="selects on opened values"):
        R.select_without_opening(R.RoundParams(7, 7, 2, r.codec), r.dealers)
    # One member 3x past the clip, everyone else at the clip: the aggregate bound fails.
    big = {i: r.codec.encode(v / np.linalg.norm(v)) for i, v in x.items()}
    scaled = np.rint(x[2] / np.linalg.norm(x[2]) * 5.5 * r.codec.scale).astype(np.int64)
    big[2] = np.where(scaled < 0, scaled + F.P, scaled).astype(np.uint64)
    r.deal(big)
    with pytest.raises(AggregateOutOfBounds):
        R.open_sum(r.p, r.sums(holders, r.dealers), r.dealers)


def test_distributed_dp_contributions_sum_exactly_through_a_sum_only_round():
    """Issue 22's DP path end to end without torch: 8 members' integer contributions
    (clipped, rounded, Skellam share: node/privacy/distributed.py) under a SecurePlan,
    encoded as they are (IntegerCodec, bound from the plan), dealt, summed on pieces and
    opened: the exact integer sum of the contributions. Out-of-range contributions are
    refused by the member's encoding; one that fits alone but breaks the honest sum's
    bound fails the aggregate check."""
    from node.privacy.distributed import decode_sum, member_contribution, os_generator
    from node.privacy.secure import coordinate_bound_of, secure_plan
    from node.secagg.encoding import IntegerCodec

    n, t, d = 8, 2, 50
    plan = secure_plan(rows_total=400, members=n, coalition=t, epsilon=3.0, delta=1e-4, dim=d,
                       rounds=10)
    mech = plan.mechanism()
    codec = IntegerCodec(n, d, coordinate_bound_of(plan))
    rng = np.random.default_rng(9)
    contrib = {i: member_contribution(rng.normal(size=(int(rng.integers(0, 30)), d)), mech,
                                      plan.noise_multiplier, os_generator(test_only_seed=i))
               for i in range(1, n + 1)}
    r = Round(n=n, t=t, d=d, variant="sum_only")
    r.codec = codec
    r.p = R.RoundParams(7, n, t, codec, variant="sum_only")
    r.deal({i: codec.encode(v) for i, v in contrib.items()})
    holders = tuple(range(1, n + 1))
    sel = R.select_without_opening(r.p, r.dealers)
    agg = R.open_sum(r.p, r.sums(holders, sel.selected), sel.selected)
    exact = sum(contrib.values())
    assert agg.total.dtype == np.int64 and (agg.total == exact).all()
    assert np.allclose(decode_sum(agg.total, mech), exact * plan.granularity)
    with pytest.raises(NormTooLarge, match="bound"):
        codec.encode(np.full(d, codec.bound + 1))
    with pytest.raises(NormTooLarge, match="integers"):
        codec.encode(np.zeros(d))
    hostile = dict(contrib)
    hostile[3] = np.full(d, codec.bound, dtype=np.int64)  # passes its own encoding
    hostile[4] = np.full(d, codec.bound, dtype=np.int64)
    r.deal({i: codec.encode(v) for i, v in hostile.items()})
    with pytest.raises(AggregateOutOfBounds):
        R.open_sum(r.p, r.sums(holders, r.dealers), r.dealers)
    # The per-member variants need squared norms below p: refused at this size.
    big = IntegerCodec(n, 100_000, 2 ** 27)
    with pytest.raises(FieldOverflow, match="only variant sum_only"):
        R.RoundParams(7, n, t, big, variant="distances")
    assert R.RoundParams(7, n, t, big, variant="sum_only").opened == 0
    with pytest.raises(FieldOverflow, match="wrap"):
        IntegerCodec(n, d, 2 ** 58)

"""The per-member range check (node/secagg/range_check.py, variant "range"): pure, the
whole check among n holders with real Shamir pieces. A hostile dealer deals any field
elements it likes; each test names what fails without the part it exercises."""

from __future__ import annotations

import math

import numpy as np
import pytest

from node.secagg import field as F
from node.secagg import range_check as RC
from node.secagg import robust
from node.secagg.encoding import IntegerCodec
from node.secagg.shamir import share_poly

N, T, DIM = 5, 1, 24
BOUND = 1000.0  # B: an honest vector's L2 norm (integer units)
PARAMS = RC.RangeParams.build(DIM, BOUND)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def honest_vector(g: np.random.Generator, norm: float = BOUND) -> np.ndarray:
    v = g.standard_normal(DIM)
    return np.rint(v / np.linalg.norm(v) * norm * 0.999).astype(np.int64)


def to_field(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=object)
    return np.array([int(v) % F.P for v in q], dtype=np.uint64)


def lift(x: np.ndarray) -> list[int]:
    return [v - F.P if v > F.P // 2 else v for v in np.asarray(x).tolist()]


def run_check(xs: dict[int, np.ndarray], ws: dict[int, np.ndarray] | None = None, *,
              g: np.random.Generator | None = None, masked: bool = True, coeff_fix=None):
    """The check among N holders: dealers share x (degree T) and their witness (the honest
    one unless `ws` gives theirs), every holder opens its masked check piece, `judge`
    decodes. Returns (verdict, opened pieces, x pieces)."""
    g = g or rng()
    dealers = tuple(sorted(xs))
    x_pieces, w_pieces, u, coeffs = {}, {}, {}, {}
    for i, x in xs.items():
        x_pieces[i] = robust.share(np.concatenate([x, F.uniform(1, g)]), N, T, g)
        u[i] = RC.projections(PARAMS, b"x-commit-%d" % i)
        w = (ws or {}).get(i)
        if w is None:
            w = RC.witness(PARAMS, u[i], x)
        w_pieces[i] = RC.share_witness(PARAMS, w, N, T, g)
        coeffs[i] = RC.coefficients(PARAMS, b"w-commit-%d" % i)
        if coeff_fix is not None:
            coeffs[i] = coeff_fix(coeffs[i])
    masks = F.sum_mod(np.stack([share_poly(F.uniform(N, g), F.uniform((2 * T - 1, N), g), N)
                                for _ in dealers]), axis=0)
    if not masked:
        masks = np.zeros_like(masks)
    opened = {j: RC.check_piece(PARAMS, j, dealers, u, coeffs,
                                {i: x_pieces[i][j - 1][:DIM] for i in dealers},
                                {i: w_pieces[i][j - 1] for i in dealers}, masks[j - 1], N)
              for j in range(1, N + 1)}
    run = {"u": u, "coeffs": coeffs, "x": x_pieces, "w": w_pieces}
    return RC.judge(opened, dealers, N, T), opened, run


def test_parameters_fit_the_field_and_state_their_soundness():
    assert PARAMS.projections * PARAMS.offset ** 2 < F.P // 2
    assert (DIM + 1) << PARAMS.bits < F.P // 2
    assert PARAMS.offset >= BOUND * math.sqrt(math.log(2 * PARAMS.projections / RC.FAILURE_PROJECTION))
    s = RC.soundness_factor(PARAMS, BOUND)
    assert 1 < s < 40, s  # the worst-case (sparse) factor at 2^-40
    with pytest.raises(robust.SecAggError, match="wrap"):
        RC.RangeParams(DIM, 128, 40, 10, 5)
    from gossip.bodies import SECAGG_WITNESS_MAX

    assert RC.WITNESS_MAX == SECAGG_WITNESS_MAX  # the wire's room is the core's limit
    with pytest.raises(robust.SecAggError, match="the wire carries"):
        RC.RangeParams(DIM, 1024, 20, 10, 5)


def test_honest_members_pass_and_the_opened_value_is_exactly_zero():
    g = rng(1)
    xs = {i: to_field(honest_vector(g)) for i in range(1, N + 1)}
    verdict, opened, _ = run_check(xs, g=g)
    assert verdict.passed == tuple(range(1, N + 1)) and not verdict.out_of_range
    assert verdict.wrong == ()


def test_many_honest_vectors_at_the_bound_pass():
    # completeness: 60 dealings at ||x|| = B, fresh projections each (failure <= 2^-40)
    g = rng(2)
    for k in range(60):
        x = to_field(honest_vector(g))
        u = RC.projections(PARAMS, b"c%d" % k)
        w = RC.witness(PARAMS, u, x)
        assert RC.check_value(PARAMS, u, RC.coefficients(PARAMS, b"w%d" % k), x, w) == 0


def test_an_out_of_range_member_is_named_excluded_and_the_round_sums_the_others():
    # a whole round at robust's level: each member's VECTOR and MASK pieces from
    # robust.deal_encoded (variant "range": n masks), the dealing check, the range check on
    # those pieces (masked with the summed MASK pieces), the selection and the sum
    g = rng(3)
    codec = IntegerCodec(N, DIM, 10 ** 6)
    params = robust.RoundParams(7, N, T, codec, "range", witness=PARAMS.width)
    ints = {i: honest_vector(g) for i in range(1, N + 1)}
    ints[3] = ints[3] * 40  # past the worst-case soundness factor: a scaled contribution
    xs = {i: codec.encode(q) for i, q in ints.items()}
    u = {i: RC.projections(PARAMS, b"x-commit-%d" % i) for i in xs}
    with pytest.raises(RC.OutOfRange):
        RC.witness(PARAMS, u[3], xs[3])
    # it deals the best witness it can: bits of its projections mod 2^L, the slack mod 2^S
    y = lift(RC.project(u[3], xs[3]))
    fake = np.concatenate([RC._bits([(v + PARAMS.offset) % (1 << PARAMS.bits) for v in y], PARAMS.bits),
                           RC._bits([(PARAMS.bound_sq - sum(v * v for v in y)) % (1 << PARAMS.slack_bits)],
                                    PARAMS.slack_bits)])
    # the witness rides in the VECTOR pieces after the d coordinates (seeded or not)
    pieces = {i: robust.deal_encoded(params, i, xs[i], test_only_rng=g, seeded=i % 2 == 0,
                                     witness=lambda parts, i=i: fake if i == 3 else
                                     RC.witness(PARAMS, u[i], xs[i]))
              for i in xs}
    pieces = {i: {j: (robust.expand_seed_piece(params, v) if v.kind == robust.SEED else v, m)
                  for j, (v, m) in ps.items()} for i, ps in pieces.items()}
    coeffs = {i: RC.coefficients(PARAMS, b"w-commit-%d" % i) for i in xs}
    dealers = tuple(range(1, N + 1))
    vec = {j: {i: pieces[i][j][0] for i in xs} for j in dealers}
    msk = {j: {i: pieces[i][j][1] for i in xs} for j in dealers}
    checks = {j: robust.check_piece(params, j, vec[j], msk[j], dealers, b"chal") for j in dealers}
    assert robust.judge_dealings(params, checks, dealers).accepted == dealers
    opened = {j: RC.check_piece(PARAMS, j, dealers, u, coeffs, {i: vec[j][i].values[:DIM] for i in xs},
                                {i: vec[j][i].values[DIM:] for i in xs},
                                F.sum_mod(np.stack([msk[j][i].values[:N] for i in xs]), axis=0), N)
              for j in dealers}
    verdict = RC.judge(opened, dealers, N, T)
    assert verdict.out_of_range.keys() == {3} and verdict.out_of_range[3].startswith("norm_out_of_range")
    sel = robust.select_in_range(params, dealers, verdict.out_of_range)
    assert sel.selected == (1, 2, 4, 5) and 3 in sel.excluded
    # the sum goes on over the others, exactly their field sum (without the check, sum_only
    # sums member 3 too: select_without_opening keeps every accepted dealer)
    sums = {j: robust.sum_piece(params, j, vec[j], sel.selected) for j in dealers}
    agg = robust.open_sum(params, sums, sel.selected)
    assert np.array_equal(agg.field_sum, F.sum_mod(np.stack([xs[i] for i in sel.selected]), axis=0))
    assert np.array_equal(agg.field_sum, F.sum_mod(np.stack([codec.encode(ints[i]) for i in (1, 2, 4, 5)]),
                                                    axis=0))
    so = robust.RoundParams(7, N, T, codec, "sum_only")
    assert 3 in robust.select_without_opening(so, dealers).selected


def wraparound_vector(g: np.random.Generator) -> np.ndarray:
    """Two huge coordinates a, b with a^2 + b^2 = 1 mod p (a = 2s / (1 + s^2), b =
    (1 - s^2) / (1 + s^2)): its squared norm opens as 1."""
    s = int(g.integers(2, F.P - 1))
    inv = F.inv((1 + s * s) % F.P)
    a, b = 2 * s * inv % F.P, (1 - s * s) * inv % F.P
    assert (a * a + b * b) % F.P == 1 and min(a, F.P - a) > 2 ** 40 and min(b, F.P - b) > 2 ** 40
    x = np.zeros(DIM, dtype=np.uint64)
    x[0], x[1] = a, b
    return x


def test_the_wraparound_vector_passes_an_opened_norm_but_not_the_range_check():
    g = rng(4)
    x = wraparound_vector(g)
    # without this check: robust's opened squared norm is 1 <= R^2 (norm_only passes it)
    assert int(F.sum_mod(F.mul(x, x))) == 1
    u = RC.projections(PARAMS, b"x-commit-2")
    with pytest.raises(RC.OutOfRange):
        RC.witness(PARAMS, u, x)
    # in range only where both of its coordinates' projection terms vanish (u_0 = u_1 = 0)
    y = lift(RC.project(u, x))
    inside = sum(-PARAMS.offset <= v < PARAMS.offset for v in y)
    assert inside == sum((u[:, 0] == 0) & (u[:, 1] == 0))
    xs = {i: to_field(honest_vector(g)) for i in range(1, N + 1)}
    xs[2] = x
    fake = np.concatenate([RC._bits([(v + PARAMS.offset) % (1 << PARAMS.bits) for v in y], PARAMS.bits),
                           RC._bits([0], PARAMS.slack_bits)])
    verdict, _, _ = run_check(xs, {2: fake}, g=g)
    assert set(verdict.out_of_range) == {2}


def test_h_h_passes_rademacher_projections_but_not_sparse_ones():
    # x = (h, h), 2h = -1 mod p: every +-1 projection is in {-1, 0, 1} (why u has zeros)
    h = (F.P - 1) // 2
    x = np.zeros(DIM, dtype=np.uint64)
    x[0] = x[1] = h
    signs = np.where(rng(5).integers(0, 2, size=(PARAMS.projections, DIM)) == 0, -1, 1).astype(np.int8)
    assert all(abs(v) <= 1 for v in lift(RC.project(signs, x)))
    with pytest.raises(RC.OutOfRange):
        RC.witness(PARAMS, RC.projections(PARAMS, b"c"), x)


def test_bits_that_are_not_bits_are_caught():
    # member 4's vector is 3x past the bound; its witness puts a 2 in a projection's bits
    # and compensates elsewhere so every linear identity holds: only the bit term catches it
    g = rng(6)
    xs = {i: to_field(honest_vector(g)) for i in range(1, N + 1)}
    xs[4] = to_field(honest_vector(g) * 3)
    u4 = RC.projections(PARAMS, b"x-commit-4")
    y = lift(RC.project(u4, xs[4]))
    L, m = PARAMS.bits, PARAMS.offset
    bits = []
    for v in y:  # y + M as sum 2^l b_l with b in {0, 1, 2, ...}: top bit may carry a multiple
        z = v + m
        top, low = divmod(z, 1 << (L - 1))
        b = RC._bits([low], L - 1).tolist() + [top % F.P]
        bits += b
    slack = PARAMS.bound_sq - sum(v * v for v in y)
    assert slack < 0 or any(abs(v) >= m for v in y)
    sbits = RC._bits([slack % (1 << PARAMS.slack_bits)], PARAMS.slack_bits) if slack >= 0 else None
    if sbits is None:  # the slack too: a non-bit carries it (K - sum y^2 = sum 2^l s_l mod p)
        sbits = np.zeros(PARAMS.slack_bits, dtype=np.uint64)
        sbits[0] = slack % F.P
    fake = np.concatenate([np.array(bits, dtype=np.uint64), sbits])
    assert RC.check_value(PARAMS, u4, RC.coefficients(PARAMS, b"w-commit-4"), xs[4], fake) != 0
    verdict, _, _ = run_check(xs, {4: fake}, g=g)
    assert set(verdict.out_of_range) == {4}
    # without the bit term (alpha = 0) the same witness passes: the term is what catches it
    no_bits, _, _ = run_check(xs, {4: fake}, g=g, coeff_fix=lambda c: (np.zeros_like(c[0]), c[1], c[2]))
    assert not no_bits.out_of_range


def test_a_false_slack_is_caught():
    # projections in range (the vector is 1.5 B, dense) but sum y^2 > K: the dealer claims
    # slack 0; without the slack term (gamma = 0) it passes
    g = rng(7)
    xs = {i: to_field(honest_vector(g)) for i in range(1, N + 1)}
    for _ in range(20):
        big = to_field(honest_vector(g, BOUND * 2.5))
        u = RC.projections(PARAMS, b"x-commit-1")
        y = lift(RC.project(u, big))
        if all(-PARAMS.offset <= v < PARAMS.offset for v in y) and sum(v * v for v in y) > PARAMS.bound_sq:
            break
    else:
        pytest.fail("no vector with projections in range and a sum of squares past K")
    xs[1] = big
    fake = np.concatenate([RC._bits([v + PARAMS.offset for v in y], PARAMS.bits),
                           np.zeros(PARAMS.slack_bits, dtype=np.uint64)])
    verdict, _, _ = run_check(xs, {1: fake}, g=g)
    assert set(verdict.out_of_range) == {1}
    no_slack, _, _ = run_check(xs, {1: fake}, g=g, coeff_fix=lambda c: (c[0], c[1], 0))
    assert not no_slack.out_of_range


def test_a_projection_unequal_to_its_bits_is_caught():
    # honest bits of a smaller vector's projections, dealt for a large one: only beta catches it
    g = rng(8)
    xs = {i: to_field(honest_vector(g)) for i in range(1, N + 1)}
    small = to_field(honest_vector(g))
    xs[5] = to_field(honest_vector(g) * 30)
    fake = RC.witness(PARAMS, RC.projections(PARAMS, b"x-commit-5"), small)
    verdict, _, _ = run_check(xs, {5: fake}, g=g)
    assert set(verdict.out_of_range) == {5}
    # without beta, a projection's range is never tied to the vector; gamma then compares
    # sum y^2 of the real vector with the slack of the small one: drop both to see it pass
    loose, _, _ = run_check(xs, {5: fake}, g=g, coeff_fix=lambda c: (c[0], np.zeros_like(c[1]), 0))
    assert not loose.out_of_range


def test_a_wrong_opener_is_named_and_corrected():
    g = rng(9)
    xs = {i: to_field(honest_vector(g)) for i in range(1, N + 1)}
    verdict, opened, _ = run_check(xs, g=g)
    opened = dict(opened)
    opened[2] = F.add(opened[2], np.ones(N, dtype=np.uint64))
    again = RC.judge(opened, tuple(range(1, N + 1)), N, T)
    assert again.wrong == (2,) and again.passed == tuple(range(1, N + 1))


def _coefficients(opened: dict[int, np.ndarray], col: int) -> list[int]:
    """The opened degree-2t polynomial's coefficients (interpolated from 2t + 1 points)."""
    xs = list(range(1, 2 * T + 2))
    rows = [[pow(x, k, F.P) for k in range(2 * T + 1)] for x in xs]
    return F.solve(rows, [int(opened[x][col]) for x in xs])


def test_an_opened_value_reveals_only_pass_or_fail():
    # honest dealers with very different vectors (norm B vs 0): the decoded value is 0 for
    # both, and with the masks the opened polynomial's other coefficients are uniform. Without
    # the masks, the top coefficient of an honest dealing is a fixed function of its sharing
    # (here: identical across the two runs that share the sharing randomness).
    tops = {"B": [], "zero": []}
    for trial in range(200):
        for name, vec in (("B", honest_vector(rng(100 + trial))), ("zero", np.zeros(DIM, dtype=np.int64))):
            verdict, opened, _ = run_check({1: to_field(vec), 2: to_field(vec)}, g=rng(trial))
            assert verdict.passed == (1, 2)
            c = _coefficients(opened, 0)
            assert c[0] == 0
            tops[name].append(c[-1] / F.P)
    for name, vals in tops.items():
        vals = np.array(vals)  # uniform on [0, 1): mean 1/2, std 1/sqrt(12 x 200) = 0.02
        assert abs(vals.mean() - 0.5) < 0.1, (name, vals.mean())
        assert 10 < np.sum(vals < 0.25) < 90


def test_without_the_masks_one_holder_tests_a_guess_of_the_vector():
    # t = 1: holder 1 knows its pieces f(1) = s + a of x and of the witness. The unmasked
    # opened polynomial's z^2 coefficient is sum alpha (w(1) - b)^2 - gamma sum (<u, x(1)> - y)^2:
    # holder 1 checks a guess of x (and its bits) against it. The masks make it uniform.
    g = rng(11)
    x, guess = honest_vector(g), honest_vector(g)

    def predicted(run, vec) -> int:
        u, (alpha, _, gamma) = run["u"][1], run["coeffs"][1]
        w1, x1 = run["w"][1][0][:PARAMS.width], run["x"][1][0][:DIM]
        b = RC.witness(PARAMS, u, to_field(vec))
        da = F.sub(w1, b)
        dy = F.sub(RC.project(u, x1), RC.project(u, to_field(vec)))
        return int(F.sub(F.sum_mod(F.mul(alpha, F.mul(da, da))),
                         F.mul(np.uint64(gamma), F.sum_mod(F.mul(dy, dy)))))

    _, opened, run = run_check({1: to_field(x)}, g=rng(12), masked=False)
    top = _coefficients(opened, 0)[-1]
    assert predicted(run, x) == top and predicted(run, guess) != top  # the leak
    _, opened, run = run_check({1: to_field(x)}, g=rng(12))
    assert predicted(run, x) != _coefficients(opened, 0)[-1]  # masked: nothing to test against


# --- under DP: the bound from the pinned plan ------------------------------------------------

def _plan(variant: str):
    from node.privacy.secure import secure_plan

    return secure_plan(rows_total=400, members=N, coalition=T, epsilon=3.0, delta=1e-5,
                       dim=DIM, variant=variant)


def test_a_dp_member_at_its_worst_passes_the_range_check_of_its_plan():
    from node.privacy.distributed import member_contribution
    from node.privacy.secure import coordinate_bound_of
    from node.runtime.secure_range import member_norm_bound, range_params_of

    plan = _plan("range")
    mech, bound = plan.mechanism(), member_norm_bound(plan)
    rp = range_params_of(plan)
    codec = IntegerCodec(N, DIM, coordinate_bound_of(plan))
    g = rng(20)
    # every row of the consortium sampled (more than the Bernstein tail allows), all aligned
    # at the clip: the signal's worst norm, plus a fresh noise share
    same = np.ones((plan.rows_total, DIM)) * 5.0
    for k in range(5):
        q = member_contribution(same, mech, plan.noise_multiplier, g)
        assert np.linalg.norm(q) <= bound
        x = codec.encode(q)
        u = RC.projections(rp, b"dp-%d" % k)
        assert RC.check_value(rp, u, RC.coefficients(rp, b"w%d" % k), x, RC.witness(rp, u, x)) == 0
    # a scaled member (the bench's scale attack, x -1000) cannot make a witness
    with pytest.raises(RC.OutOfRange):
        RC.witness(rp, RC.projections(rp, b"s"), to_field(-1000 * q))


def test_the_range_variant_is_charged_as_the_sum_with_delta_left_for_its_bits():
    from node.privacy.secure import RANGE_FAILURE

    rng_plan, sum_plan = _plan("range"), _plan("sum_only")
    assert rng_plan.reveal == "sum" and sum_plan.range_delta == 0
    eta = rng_plan.steps * N * RANGE_FAILURE
    assert rng_plan.range_delta == pytest.approx((1 + math.exp(3.0)) * eta)
    assert rng_plan.accounting_delta < rng_plan.delta and rng_plan.record(0).secure["delta"] == \
        rng_plan.accounting_delta
    # the bits' delta is tiny: the same sigma to the bisection's precision, or a hair above
    assert rng_plan.noise_multiplier >= sum_plan.noise_multiplier * (1 - 1e-3)
    assert rng_plan.epsilon_after(rng_plan.steps) <= 3.0 * (1 + 1e-9)

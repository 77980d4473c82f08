"""Reed-Solomon decoding of the secure-aggregation core (node/secagg/shamir.py decode and
decode_columns, robust.judge_dealings): properties over random vectors, holders and
adversarial wrong pieces, against the plain field sum and an independent Python
Berlekamp-Welch. Pure math: no transport, no clock."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.secagg import field as F
from node.secagg import robust as R
from node.secagg.encoding import FixedPoint
from node.secagg.errors import SecAggError, TooManyWrong
from node.secagg.pieces import CHECK, MASK, Piece
from node.secagg.shamir import MAX_SECURE_MEMBERS, berlekamp_welch, decode, decode_columns, share

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)
MODES = ("random", "one_coordinate", "codeword")  # how a wrong piece is wrong


def _spoil(pieces: np.ndarray, right: np.ndarray, wrong: list[int], mode: str, degree: int,
           rng: np.random.Generator) -> None:
    """Make the pieces at points `wrong` (1-based rows of `pieces`) wrong, the way an
    adversary might: uniform values, one coordinate shifted, or all of them on another
    polynomial of the same degree (a valid codeword of another secret)."""
    other = share(F.uniform(pieces.shape[1], rng), pieces.shape[0], degree, rng)
    for j in wrong:
        if mode == "random":
            pieces[j - 1] = F.uniform(pieces.shape[1], rng)
        elif mode == "one_coordinate":
            k = int(rng.integers(pieces.shape[1]))
            pieces[j - 1, k] = (pieces[j - 1, k] + np.uint64(1 + int(rng.integers(1 << 40)))) % F.P64
        else:
            pieces[j - 1] = other[j - 1]
        if (pieces[j - 1] == right[j - 1]).all():  # a draw equal to the right piece
            pieces[j - 1, 0] = (pieces[j - 1, 0] + np.uint64(1)) % F.P64


@SETTINGS
@given(n=st.integers(2, 12), d=st.integers(1, 40), seed=seeds, data=st.data())
def test_encode_share_sum_decode_is_the_plain_field_sum_from_any_t_plus_one_holders(n, d, seed, data):
    rng = np.random.default_rng(seed)
    t = data.draw(st.integers(0, n - 1))
    codec = FixedPoint.choose(1.0, d, n)
    x = rng.normal(size=(n, d))
    x /= np.maximum(1.0, np.linalg.norm(x, axis=1))[:, None]
    enc = np.stack([codec.encode(v) for v in x])
    pieces = [share(e, n, t, rng) for e in enc]  # pieces[i][j - 1]: dealer i + 1's piece for j
    held = {j: F.sum_mod(np.stack([p[j - 1] for p in pieces]), axis=0) for j in range(1, n + 1)}
    holders = data.draw(st.lists(st.integers(1, n), min_size=t + 1, unique=True))
    got = decode({j: held[j] for j in holders}, t)
    assert (got.value == F.sum_mod(enc, axis=0)).all() and got.wrong == ()
    assert np.allclose(codec.decode_sum(got.value, n), x.sum(axis=0), atol=n * codec.relative_error)


@SETTINGS
@given(degree=st.integers(0, 4), spare=st.integers(0, 8), width=st.integers(1, 30),
       mode=st.sampled_from(MODES), bounded=st.booleans(), seed=seeds, data=st.data())
def test_within_the_radius_decode_is_exact_and_names_exactly_the_wrong(degree, spare, width, mode,
                                                                       bounded, seed, data):
    rng = np.random.default_rng(seed)
    n = degree + 1 + spare
    radius = spare // 2
    max_errors = data.draw(st.integers(0, radius)) if bounded else None
    e = radius if max_errors is None else max_errors
    secret = F.uniform(width, rng)
    pieces = share(secret, n, degree, rng)
    right = pieces.copy()
    wrong = data.draw(st.lists(st.integers(1, n), max_size=e, unique=True))
    _spoil(pieces, right, wrong, mode, degree, rng)
    if wrong and e == 0:
        return  # nothing may be corrected: covered by the detection test
    got = decode({j: pieces[j - 1] for j in range(1, n + 1)}, degree, max_errors=max_errors)
    assert (got.value == secret).all()
    assert got.wrong == tuple(sorted(wrong))
    assert got.good == tuple(j for j in range(1, n + 1) if j not in wrong)


@SETTINGS
@given(degree=st.integers(0, 4), e=st.integers(1, 4), short=st.integers(0, 3), width=st.integers(1, 20),
       mode=st.sampled_from(MODES), seed=seeds, data=st.data())
def test_short_of_correcting_e_it_corrects_what_e_cannot_steer_and_names_nobody_beyond(
        degree, e, short, width, mode, seed, data):
    """k + 1 + e <= N < k + 1 + 2e pieces and up to e wrong, chosen any way (a valid
    codeword of another secret included): up to a = N - k - 1 - e wrong pieces are
    corrected exactly and named; more is TooManyWrong naming nobody, never a value."""
    short = min(short, e - 1)
    n = degree + 1 + 2 * e - 1 - short
    a = n - degree - 1 - e
    rng = np.random.default_rng(seed)
    secret = F.uniform(width, rng)
    pieces = share(secret, n, degree, rng)
    right = pieces.copy()
    wrong = data.draw(st.lists(st.integers(1, n), min_size=1, max_size=e, unique=True))
    _spoil(pieces, right, wrong, mode, degree, rng)
    given = {j: pieces[j - 1] for j in range(1, n + 1)}
    if len(wrong) <= a:
        got = decode(given, degree, max_errors=e)
        assert (got.value == secret).all() and got.wrong == tuple(sorted(wrong))
    else:
        with pytest.raises(TooManyWrong, match="nobody named"):
            decode(given, degree, max_errors=e)


@SETTINGS
@given(degree=st.integers(0, 3), e=st.integers(1, 3), extra=st.integers(1, 3), width=st.integers(1, 20),
       mode=st.sampled_from(("random", "one_coordinate")), seed=seeds, data=st.data())
def test_more_wrong_than_corrected_fails_and_names_nobody(degree, e, extra, width, mode, seed, data):
    """N >= k + 1 + 2e and more than e wrong pieces (not forming another codeword: that is
    outside every decoder's reach): TooManyWrong, no value, nobody named."""
    rng = np.random.default_rng(seed)
    n = degree + 1 + 2 * e + data.draw(st.integers(0, 2))
    count = min(e + extra, n - degree - 1)
    pieces = share(F.uniform(width, rng), n, degree, rng)
    right = pieces.copy()
    wrong = data.draw(st.lists(st.integers(1, n), min_size=count, max_size=count, unique=True))
    _spoil(pieces, right, wrong, mode, degree, rng)
    with pytest.raises(TooManyWrong):
        decode({j: pieces[j - 1] for j in range(1, n + 1)}, degree, max_errors=e)


@SETTINGS
@given(degree=st.integers(0, 5), spare=st.integers(0, 10), columns=st.integers(1, 12), seed=seeds,
       data=st.data())
def test_decode_columns_agrees_with_python_berlekamp_welch(degree, spare, columns, seed, data):
    """Each column with its own errors, up to the radius or beyond: the vectorised
    Berlekamp-Massey gives what an independent (N x N) Berlekamp-Welch solve gives."""
    rng = np.random.default_rng(seed)
    n = degree + 1 + spare
    e = data.draw(st.integers(0, spare // 2))
    points = sorted(data.draw(st.lists(st.integers(1, 256), min_size=n, max_size=n, unique=True)))
    secrets = F.uniform(columns, rng)
    full = share(secrets, 256, degree, rng)
    y = full[np.array(points) - 1].copy()
    counts = []
    for c in range(columns):
        counts.append(data.draw(st.integers(0, min(spare, e + 2))))
        rows = rng.choice(n, counts[-1], replace=False)
        y[rows, c] = F.add(y[rows, c], F.uniform(counts[-1], rng) | np.uint64(1))
    got = decode_columns(points, y, degree, e)
    for c in range(columns):
        poly = berlekamp_welch(points, [int(v) for v in y[:, c]], degree, e)
        if e == 0:  # detection only: ok exactly for the codewords (distance N - k > spare)
            assert got.ok[c] == (counts[c] == 0)
            continue
        assert got.ok[c] == (poly is not None)
        if poly is not None:
            assert int(got.value[c]) == poly[0]
            expect = [F.poly_eval(poly, x) for x in points]
            assert got.codeword[:, c].tolist() == expect
            assert got.wrong[:, c].tolist() == [int(v) != w for v, w in zip(y[:, c], expect, strict=True)]
    clean = full[np.array(points) - 1]
    ok = decode_columns(points, clean, degree, e)
    assert ok.ok.all() and (ok.value == secrets).all() and not ok.wrong.any()


def test_decode_columns_refuses_a_radius_it_cannot_give():
    with pytest.raises(SecAggError, match="correct at most 1"):
        decode_columns([1, 2, 3, 4, 5], share(F.uniform(2), 5, 2), 2, 2)


# --- judging dealings: never steered past the bounded radius ----------------------------------

def _round(n, t, seed):
    rng = np.random.default_rng(seed)
    codec = FixedPoint.choose(1.0, 8, n)
    p = R.RoundParams(3, n, t, codec)
    deals = {i: R.deal(p, i, np.full(8, 0.1), test_only_rng=rng) for i in range(1, n + 1)}
    dealers = tuple(range(1, n + 1))
    checks = {j: R.check_piece(p, j, {i: deals[i][j][0] for i in dealers},
                               {i: deals[i][j][1] for i in dealers}, dealers, b"challenge")
              for j in dealers}
    return p, deals, dealers, checks


def test_t_liars_cannot_steer_a_mask_check_onto_honest_members():
    """n = 3t + 1 = 10: the mask checks (degree 5) cannot correct t = 3 wrong ones. The 3
    liars (8, 9, 10) put their mask checks of every dealer on another degree-5 polynomial
    through the checks of holders 1-5; the old radius (2) decoded to it and named honest
    holders 6 and 7 (and a resolved dispute would blame the honest dealer). Now: every
    dealer unresolved, nobody refused or disputed."""
    n, t = 10, 3
    p, deals, dealers, checks = _round(n, t, 1)
    rng = np.random.default_rng(2)
    values = {j: checks[j].values.copy() for j in dealers}
    for i in dealers:
        known = [int(F.uniform(1, rng)[0])] + [int(values[j][n + i - 1]) for j in range(1, 6)]
        for liar in (8, 9, 10):
            lam = F.lagrange_at([0, 1, 2, 3, 4, 5], liar)
            values[liar][n + i - 1] = sum(a * b for a, b in zip(lam, known, strict=True)) % F.P
    lying = {j: Piece(3, CHECK, 0, j, values[j]) for j in dealers}
    verdict = R.judge_dealings(p, lying, dealers)
    assert not verdict.refused and not verdict.disputes
    assert set(verdict.unresolved) == set(dealers) and verdict.accepted == ()
    # one liar is within what t liars cannot steer (4 spare - t = 1): corrected and named
    one = dict(checks)
    one[8] = lying[8]
    verdict = R.judge_dealings(p, one, dealers)
    assert verdict.accepted == dealers and {j for (_, j, _) in verdict.disputes} == {8}


def test_t_random_liars_do_not_get_an_honest_dealer_refused():
    """n = 10, t = 3: three holders open random mask checks for dealer 4. More wrong than
    the old radius corrected: it refused the honest dealer. Now unresolved, nobody named;
    the vector checks (degree 3: 10 holders correct 3) still name the liars there."""
    n, t = 10, 3
    p, deals, dealers, checks = _round(n, t, 3)
    rng = np.random.default_rng(4)
    lying = dict(checks)
    for liar in (2, 5, 9):
        v = checks[liar].values.copy()
        v[n + 4 - 1] = F.uniform(1, rng)[0]
        v[4 - 1] = F.add(v[4 - 1:4], np.ones(1, dtype=np.uint64))[0]
        lying[liar] = Piece(3, CHECK, 0, liar, v)
    verdict = R.judge_dealings(p, lying, dealers)
    assert 4 not in verdict.refused and 4 in verdict.unresolved
    assert verdict.accepted == tuple(i for i in dealers if i != 4) and not verdict.disputes
    # at 4t = 12 holders the same lies are corrected and the liars named, the dealer accepted
    p, deals, dealers, checks = _round(12, t, 5)
    lying = dict(checks)
    for liar in (2, 5, 9):
        v = checks[liar].values.copy()
        v[12 + 4 - 1] = F.add(v[12 + 4 - 1:12 + 4], np.ones(1, dtype=np.uint64))[0]
        lying[liar] = Piece(3, CHECK, 0, liar, v)
    verdict = R.judge_dealings(p, lying, dealers)
    assert verdict.accepted == dealers and set(verdict.disputes) == {(4, j, MASK) for j in (2, 5, 9)}
    for (i, j, _kind), expected in verdict.disputes.items():
        assert R.resolve_dispute(p, b"challenge", deals[i][j][1], expected) == "holder"


def test_a_dealer_wrong_at_more_than_t_holders_is_refused_when_correctable():
    n, t = 10, 3
    p, deals, dealers, checks = _round(n, t, 6)
    rng = np.random.default_rng(7)
    lying = dict(checks)
    for j in (1, 2, 3, 4):  # what 4 holders given wrong pieces by dealer 6 would open
        v = checks[j].values.copy()
        v[6 - 1] = F.uniform(1, rng)[0]
        lying[j] = Piece(3, CHECK, 0, j, v)
    verdict = R.judge_dealings(p, lying, dealers)
    assert set(verdict.refused) == {6} and "more than t = 3" in verdict.refused[6]
    assert verdict.accepted == tuple(i for i in dealers if i != 6) and not verdict.disputes


def test_judge_each_batches_dealers_by_holders_and_matches_one_call_per_dealer():
    n, t = 13, 3
    p, deals, dealers, checks = _round(n, t, 8)
    rng = np.random.default_rng(9)
    lying = dict(checks)
    v = checks[7].values.copy()
    v[:] = F.uniform(v.size, rng)  # holder 7 lies about every dealing
    lying[7] = Piece(3, CHECK, 0, 7, v)
    holders_of = {i: set(dealers) - ({2} if i % 2 else set()) for i in dealers}
    holders_of[13] = {1, 3, 5, 7, 9}  # too few for the mask check (2t = 6)
    got = R.judge_each(p, lying, holders_of)
    assert set(got.too_few) == {13}
    one_by_one = {}
    for i in dealers[:-1]:
        v1 = R.judge_dealings(p, {j: lying[j] for j in holders_of[i]}, (i,))
        one_by_one.update(v1.disputes)
        assert (i in got.accepted) == (i in v1.accepted)
    assert got.disputes == one_by_one and {j for (_, j, _) in got.disputes} == {7}


def test_secure_rounds_are_capped_by_name():
    codec = FixedPoint.choose(1.0, 8, MAX_SECURE_MEMBERS + 1)
    with pytest.raises(SecAggError, match=f"at most {MAX_SECURE_MEMBERS} members"):
        R.RoundParams(1, MAX_SECURE_MEMBERS + 1, 2, codec)


def test_the_rules_refuse_a_secure_consortium_past_the_cap():
    from gossip.errors import LocalError
    from node.strategy.consortium_rules import ConsortiumRules, check_secure

    rules = ConsortiumRules(secure=True, secure_threshold=2, secure_select="sum", secure_rows=100,
                            secure_epsilon=3.0, secure_delta=1e-5)
    assert check_secure(rules, MAX_SECURE_MEMBERS, "f.toml").threshold == 2
    with pytest.raises(LocalError, match=f"f.toml: rules.secure = true with {MAX_SECURE_MEMBERS + 1} "
                       f"members: a secure round takes at most {MAX_SECURE_MEMBERS}"):
        check_secure(rules, MAX_SECURE_MEMBERS + 1, "f.toml")


@SETTINGS
@given(r=st.integers(1, 40), rows=st.integers(1, 6), terms=st.integers(0, 20), seed=seeds)
def test_both_berlekamp_massey_versions_find_the_same_recurrence(r, rows, terms, seed):
    """The vectorised (inversion-free) and the Python-int versions: the same length and
    the same connection polynomial up to a constant, on sums of `terms` geometric
    sequences (error syndromes) and on uniform sequences."""
    from node.secagg.shamir import _berlekamp_massey, _berlekamp_massey_ints

    rng = np.random.default_rng(seed)
    xs, amps = F.uniform((rows, terms), rng), F.uniform((rows, terms), rng)
    seq = np.array([[sum(int(a) * pow(int(x), m, F.P) for a, x in zip(amps[k], xs[k], strict=True)) % F.P
                     for m in range(r)] for k in range(rows)], dtype=np.uint64)
    lam, length = _berlekamp_massey(seq)
    for k, row in enumerate(seq.tolist()):
        conn, ln = _berlekamp_massey_ints(row)
        assert ln == length[k] and ln <= min(terms, r)
        conn = (conn + [0] * (r + 1))[:r + 1]
        scale = int(lam[k, 0]) * F.inv(conn[0]) % F.P
        assert [scale * c % F.P for c in conn] == lam[k].tolist()

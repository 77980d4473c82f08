"""Review 2 F12: t members whose checks are honest in the vector columns and wrong in the mask
columns left every honest dealing `unresolved` below 4t holders (the mask check, degree
2t - 1, corrects t only from 4t): nothing entered, the round failed naming nobody, every
round. Now every dealer's checks are judged together (node/secagg/explain.py): members in
every explanation of at most t are named `mask_check_liar`, dealings with one codeword in
every explanation without them enter. The rounds run with members' real keys (SecureNet);
the rule's soundness (an honest member is never named, an honest dealer's codeword is its
own) is a property over liar sets and what they open."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.bodies import SecAgg, decode_secagg, encode_secagg
from node.secagg import explain as E
from node.secagg import field as F
from node.secagg import robust as R
from node.secagg.encoding import FixedPoint
from node.secagg.pieces import MASK, VECTOR, Piece, from_bytes, to_bytes
from node.strategy.consortium_rules import default_secure_threshold
from tests.test_secure_round import SecureNet


def mask_lie(net, m: str, body: bytes, salt: int = 0, held: tuple[int, ...] | None = None
             ) -> tuple[int, bytes]:
    """(round, m's check with its vector columns honest and its mask columns random: seeded
    by m's index plus salt x the round), claiming `held` (default: what it really holds)."""
    n = len(net.names)
    msg = decode_secagg(body, n)
    p = from_bytes(msg.pieces[0])
    vals = p.values.copy()
    vals[n:] = np.random.default_rng(net.names.index(m) + salt * p.round).integers(
        0, F.P, size=n, dtype=np.uint64)
    return p.round, encode_secagg(SecAgg("check", (to_bytes(Piece(
        p.round, p.kind, p.owner, p.holder, vals)),), msg.held if held is None else held))


def _mask_liars(liars: tuple[str, ...]):
    """The reproductions' liars: their checks' vector columns honest, mask columns random."""
    def tamper(net, m, phase, body):
        return mask_lie(net, m, body)[1] if m in liars and phase == "check" else body
    return tamper


def _check_round(net: SecureNet, liars: tuple[str, ...], present: list[str]):
    honest = [m for m in present if m not in liars]
    outs = net.honest_outcomes(honest)
    for o in outs:
        assert not set(o.named) & set(honest), o.named
        assert all(o.named.get(x, "").startswith("mask_check_liar") for x in liars), o.named
    return honest, outs


def test_n7_default_t_mask_liars_are_named_and_the_round_opens():
    """mask_liars_dos.py: n = 7, t = 2 (the default), sum_only. On main: too_few_contributors,
    entered (), named {}."""
    liars = ("bank-5", "bank-6")
    assert default_secure_threshold(7) == 2
    net = SecureNet(7, 2, variant="sum_only", tamper_open=_mask_liars(liars)).run()
    honest, outs = _check_round(net, liars, net.names)
    for o in outs:
        assert o.ok, (o.reason, o.detail)
        assert o.entered == tuple(honest)


def test_n8_one_absent_mask_liars_are_named_and_the_honest_enter():
    """mask_liars_n8.py: n = 8, t = 2, bank-0 down (7 holders < 4t). On main: nothing
    entered, too_few_contributors, named {}. Now the five honest present enter and the two
    liars are named; the round then needs ceil((n + t + 1) / 2) = 6 matching agreements and
    the liars' two do not match the five honest ones (no_agreement, a separate bound)."""
    liars = ("bank-6", "bank-7")
    net = SecureNet(8, 2, variant="sum_only", tamper_open=_mask_liars(liars),
                    silent_from={0: ("bank-0",)}).run()
    honest, outs = _check_round(net, liars, net.names[1:])
    for o in outs:
        assert o.entered == tuple(honest), o.entered
        assert o.reason in (None, "no_agreement"), (o.reason, o.detail)


@pytest.mark.slow  # 13 members each judging 26 columns: about 8 s here
def test_n13_default_t_four_mask_liars_are_named_and_the_round_opens():
    """mask_liars_n13.py: n = 13, t = 4 (the default; 13 < 4t). On main:
    too_few_contributors, named {}."""
    n = 13
    t = default_secure_threshold(n)
    liars = tuple(f"bank-{i}" for i in range(n - t, n))
    net = SecureNet(n, t, variant="sum_only", tamper_open=_mask_liars(liars)).run()
    honest, outs = _check_round(net, liars, net.names)
    for o in outs:
        assert o.ok, (o.reason, o.detail)
        assert o.entered == tuple(honest)


# --- the rule alone ---------------------------------------------------------------------------

def _checks(n: int, t: int, seed: int):
    rng = np.random.default_rng(seed)
    p = R.RoundParams(3, n, t, FixedPoint.choose(1.0, 4, n))
    deals = {i: R.deal(p, i, np.full(4, 0.1), test_only_rng=rng) for i in range(1, n + 1)}
    ds = tuple(range(1, n + 1))
    return {j: R.check_piece(p, j, {i: deals[i][j][0] for i in ds},
                             {i: deals[i][j][1] for i in ds}, ds, b"c").values.copy() for j in ds}


def test_a_second_explanation_names_nobody_and_enters_no_honest_dealing_on_a_guess():
    """The framing of test_secagg_decode (n = 10, t = 3): liars 8, 9, 10 put every mask
    check on another polynomial through holders 1-5, so {6, 7} explains the checks as well
    as {8, 9, 10}. Nobody is named; dealers 1-5 (two codewords) stay out; 6 and 7 enter on
    their own codeword, disputed only by the liars; 8-10 on the one {6, 7} gives them."""
    n, t = 10, 3
    truth = _checks(n, t, 1)
    values = {j: v.copy() for j, v in truth.items()}
    rng = np.random.default_rng(2)
    for i in range(1, n + 1):
        known = [int(F.uniform(1, rng)[0])] + [int(values[j][n + i - 1]) for j in range(1, 6)]
        for liar in (8, 9, 10):
            lam = F.lagrange_at([0, 1, 2, 3, 4, 5], liar)
            values[liar][n + i - 1] = sum(a * b for a, b in zip(lam, known, strict=True)) % F.P
    got = E.explain(n, t, values, {i: frozenset(range(1, n + 1)) for i in range(1, n + 1)})
    assert got is not None and got.named == ()
    assert set(got.explanations) == {frozenset({6, 7}), frozenset({8, 9, 10})}
    assert not set(got.certain) & {1, 2, 3, 4, 5}
    for i in (6, 7):
        assert {j for (j, _) in got.certain[i]} == {8, 9, 10}
        assert all(w == int(truth[j][n + i - 1]) for (j, _), w in got.certain[i].items())
    # the liars' own dealings enter on the second explanation's codeword: the framed honest
    # holders are disputes (a claim; their signed pieces then prove the liars' bad_dealing)
    for i in (8, 9, 10):
        assert {j for (j, _) in got.certain[i]} == {6, 7}


def test_a_liar_dealing_wrong_pieces_cannot_get_an_honest_holder_named():
    """n = 7, t = 2: liar 6 opens random mask checks of every dealing; liar 7 opens honest
    checks but dealt holder 1 a wrong mask piece (holder 1's honest check of it is off).
    Judged on holders alone, {1, 6} would be the only explanation and honest 1 named; a
    dealer of the coalition explains its own column ({6, 7}), so only 6 is named. Dealings
    1-5 enter on their own codewords; 7's is disputed at 1 and 6 (settled by the signed pieces)."""
    n, t = 7, 2
    truth = _checks(n, t, 4)
    values = {j: v.copy() for j, v in truth.items()}
    values[6][n:] = F.uniform(n, np.random.default_rng(6))
    values[1][n + 7 - 1] = F.add(values[1][n + 7 - 1:n + 7], np.ones(1, dtype=np.uint64))[0]
    got = E.explain(n, t, values, {i: frozenset(range(1, n + 1)) for i in range(1, n + 1)})
    assert set(got.explanations) == {frozenset({6, 7}), frozenset({1, 6})}
    assert got.named == (6,)
    assert set(got.certain) == {1, 2, 3, 4, 5, 7}
    assert {j for (j, _) in got.certain[7]} == {1, 6}
    assert all({j for (j, _) in got.certain[i]} == {6} for i in range(1, 6))


def test_past_the_search_bound_nothing_changes():
    n, t = 7, 2
    values = _checks(n, t, 3)
    for liar in (6, 7):
        values[liar][n:] = F.uniform(n, np.random.default_rng(liar))
    everyone = {i: frozenset(range(1, n + 1)) for i in range(1, n + 1)}
    assert E.explain(n, t, values, everyone, budget=1) is None
    got = E.explain(n, t, values, everyone)
    assert got.named == (6, 7) and set(got.certain) == {1, 2, 3, 4, 5}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_an_honest_member_is_never_named_and_an_honest_codeword_is_its_own(data):
    """Up to t liars, each column of each liar's choice: the truth, random values, or a
    second polynomial through some honest checks (framing); liar dealers may also deal wrong
    pieces to honest holders (their checks then differ); some holders may miss a dealing.
    Whatever they do: named members are liars, and an honest dealer that enters gets its
    own codeword (its disputes name liars only, with the honest check values)."""
    n = data.draw(st.integers(4, 10), label="n")
    t = data.draw(st.integers(1, (n - 1) // 3), label="t")
    truth = _checks(n, t, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    liars = set(data.draw(st.lists(st.integers(1, n), max_size=t, unique=True), label="liars"))
    honest = [j for j in range(1, n + 1) if j not in liars]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="rng"))
    frame = data.draw(st.lists(st.sampled_from(honest), max_size=t, unique=True), label="frame")
    values = {j: v.copy() for j, v in truth.items()}
    for i in range(1, n + 1):
        for kind, degree in ((VECTOR, t), (MASK, 2 * t - 1)):
            col = (kind - 1) * n + i - 1
            base = [j for j in honest if j not in frame][:degree]
            xs, ys = [0, *base], [int(F.uniform(1, rng)[0]), *(int(truth[j][col]) for j in base)]
            for j in sorted(liars):
                how = data.draw(st.sampled_from(("truth", "random", "frame")), label="how")
                if how == "random":
                    values[j][col] = F.uniform(1, rng)[0]
                elif how == "frame":  # on a polynomial through the honest checks outside `frame`
                    lam = F.lagrange_at(xs, j)
                    values[j][col] = sum(a * b for a, b in zip(lam, ys, strict=True)) % F.P
            if i in liars and data.draw(st.booleans(), label="bad dealing"):
                for j in data.draw(st.lists(st.sampled_from(honest), max_size=t, unique=True)):
                    values[j][col] = F.uniform(1, rng)[0]
    holders = {i: frozenset(j for j in range(1, n + 1)
                            if j == i or data.draw(st.integers(0, 9), label="holds") > 0)
               for i in range(1, n + 1)}
    got = E.explain(n, t, values, holders)
    assert got is not None  # the liars explain it, and every set within t fits the bound
    assert set(got.named) <= liars, (got.named, liars)
    for i, disputes in got.certain.items():
        if i in liars:
            continue
        for (j, kind), w in disputes.items():
            assert j in liars, (i, j, kind)
            assert w == int(truth[j][(kind - 1) * n + i - 1])


@pytest.mark.parametrize("n", [7, 10, 13])
def test_random_mask_liars_at_the_default_t_are_all_named_and_every_honest_dealing_enters(n):
    t = default_secure_threshold(n)
    values = _checks(n, t, n)
    liars = tuple(range(n - t + 1, n + 1))
    for j in liars:
        values[j][n:] = F.uniform(n, np.random.default_rng(j))
    got = E.explain(n, t, values, {i: frozenset(range(1, n + 1)) for i in range(1, n + 1)})
    assert got.named == liars and set(got.certain) == set(range(1, n - t + 1))
    assert all({j for (j, _) in d} == set(liars) for d in got.certain.values())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_liars_that_frame_t_honest_holders_get_only_liars_named_and_no_wrong_codeword(data):
    """n = 3t + 1: t liars open, in each mask column of their choice, values on a second
    polynomial through the honest checks outside t honest holders (`frame`): a second
    explanation. Only liars may be named, and an honest dealer enters only on its own codeword."""
    t = data.draw(st.integers(2, 3), label="t")
    n = 3 * t + 1
    truth = _checks(n, t, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    liars = set(data.draw(st.lists(st.integers(1, n), min_size=t, max_size=t, unique=True)))
    honest = [j for j in range(1, n + 1) if j not in liars]
    frame = set(data.draw(st.lists(st.sampled_from(honest), min_size=t, max_size=t, unique=True)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="rng"))
    values = {j: v.copy() for j, v in truth.items()}
    for i in range(1, n + 1):
        if not data.draw(st.booleans(), label="framed column"):
            continue
        col = n + i - 1
        base = [j for j in honest if j not in frame]  # t + 1 <= 2t - 1 points: room for a g
        xs, ys = [0, *base], [int(F.uniform(1, rng)[0]), *(int(truth[j][col]) for j in base)]
        xs, ys = xs[:2 * t], ys[:2 * t]
        for j in liars:
            lam = F.lagrange_at(xs, j)
            values[j][col] = sum(a * b for a, b in zip(lam, ys, strict=True)) % F.P
    got = E.explain(n, t, values, {i: frozenset(range(1, n + 1)) for i in range(1, n + 1)})
    assert got is not None and set(got.named) <= liars
    for i, disputes in got.certain.items():
        if i not in liars:
            assert {j for (j, _) in disputes} <= liars, (i, disputes, liars, frame)
            assert all(w == int(truth[j][(kind - 1) * n + i - 1]) for (j, kind), w in disputes.items())

from __future__ import annotations

import json
import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.errors import LocalError
from node.strategy import (
    RULE_NAMES,
    STRATEGIES,
    Aggregate,
    Strategy,
    StrategyError,
    WeightedShare,
    cap_weights,
    check_strategy,
    dp_bound,
    make_strategy,
    rule_params,
)
from node.strategy.types import Candidate, Round

N, D = 8, 200
ATTACKER = "m7"
# Every rule configured the way the consortium would run it against f = 1 of 8:
# weight-using rules with an agreed cap, so a declared weight cannot buy the model.
ROBUST = {
    "norm_bounded_mean": {"max_weight_fraction": 0.25},
    "median": {},
    "trimmed_mean": {"max_weight_fraction": 0.25},
    "krum": {},
    "multi_krum": {"max_weight_fraction": 0.25},
    "centered_clipping": {"max_weight_fraction": 0.25},
}


def honest_round(seed: int = 0, n: int = N, d: int = D, spread: float = 0.3):
    """A reference, and n honest shares: reference + a common update + member skew,
    weights like row counts (~1000)."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(d, generator=g)
    common = torch.randn(d, generator=g) / math.sqrt(d)  # an update of norm ~1
    shares = {}
    for i in range(n):
        u = common + spread * torch.randn(d, generator=g) / math.sqrt(d)
        w = float(800 + torch.randint(0, 400, (1,), generator=g).item())
        shares[f"m{i}"] = WeightedShare(f"m{i}", w, reference + u)
    return reference, shares


def fedavg(shares: dict[str, WeightedShare]) -> torch.Tensor:
    total = sum(s.weight for s in shares.values())
    return sum(s.vector.double() * (s.weight / total) for s in shares.values()).float()


def run(strategy: Strategy, shares: dict[str, WeightedShare], reference, own="m0", missing=()):
    rest = {m: s for m, s in shares.items() if m != own}
    return strategy.aggregate(3, shares[own], rest, set(missing), reference)


def attacked(kind: str, reference, shares):
    """The issue's model-level attacks, by member m7."""
    honest = shares[ATTACKER]
    u = honest.vector - reference
    vector, weight = honest.vector, honest.weight
    if kind == "sign-flip":
        vector = reference - 10 * u
    elif kind == "scale":
        vector = reference + 1000 * u
    elif kind == "huge":
        vector = torch.full_like(u, 1e30)
    elif kind == "noise":
        vector = reference + 10 * torch.randn(u.shape, generator=torch.Generator().manual_seed(9))
    elif kind == "weight":  # a declared weight of MAX_WEIGHT with a pulled share
        weight, vector = 1e12, reference - 3 * u
    return {**shares, ATTACKER: WeightedShare(ATTACKER, weight, vector)}


ATTACKS = ["sign-flip", "scale", "huge", "noise", "weight"]


def update_norm(reference, shares) -> float:
    return float(torch.linalg.vector_norm(fedavg(shares) - reference))


# -- honest inputs -------------------------------------------------------------


DECLARED = {"weighting": "declared"}


@pytest.mark.parametrize("name,params", [
    ("mean", {}),
    ("norm_bounded_mean", DECLARED),
    ("norm_bounded_mean", {"distance": "reject", **DECLARED}),
    ("mean", {"max_weight_fraction": 0.25, "max_weight": 5000.0}),
    ("norm_bounded_mean", {"max_weight_fraction": 0.25, **DECLARED}),
    ("trimmed_mean", {"f": 0, **DECLARED}),
    ("multi_krum", {"f": 0, "m": N, **DECLARED}),
    ("centered_clipping", {"f": 0, **DECLARED}),
])
def test_rule_is_weighted_fedavg_on_honest_shares(name, params):
    reference, shares = honest_round()
    result = run(make_strategy(name, members=N, **params), shares, reference)
    assert torch.allclose(result.vector, fedavg(shares), atol=1e-5)
    assert not result.excluded and not result.clipped and not result.weight_capped
    assert result.fallbacks == []
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert result.weighting == "declared" and result.to_json()["weighting"] == "declared"


def plain_average(shares: dict[str, WeightedShare]) -> torch.Tensor:
    return (sum(s.vector.double() for s in shares.values()) / len(shares)).float()


@pytest.mark.parametrize("name,params", [
    ("mean", {"weighting": "equal"}),
    ("norm_bounded_mean", {}),
    ("trimmed_mean", {"f": 0}),
    ("multi_krum", {"f": 0, "m": N}),
    ("centered_clipping", {"f": 0}),
])
def test_equal_weighting_is_the_plain_average_and_is_the_robust_rules_default(name, params):
    reference, shares = honest_round()
    result = run(make_strategy(name, members=N, **params), shares, reference)
    assert not torch.allclose(fedavg(shares), plain_average(shares), atol=1e-4)  # it matters here
    assert torch.allclose(result.vector, plain_average(shares), atol=1e-5)
    assert result.weights == {m: pytest.approx(1 / N) for m in shares}
    assert result.weighting == "equal" and result.to_json()["weighting"] == "equal"
    assert not result.weight_capped


@pytest.mark.parametrize("name", ["norm_bounded_mean", "trimmed_mean", "multi_krum",
                                  "centered_clipping"])
def test_equal_weighting_ignores_a_declared_weight_of_1e12(name):
    """The same shares with the attacker declaring 1e12 or its honest row count give
    the same vector: under equal weighting a declared weight buys nothing. Under the
    capped declared weights it does buy the cap (shown for contrast)."""
    reference, shares = honest_round()
    pulled = {**shares, ATTACKER: WeightedShare(ATTACKER, shares[ATTACKER].weight,
                                                reference - 3 * (shares[ATTACKER].vector - reference))}
    giant = {**pulled, ATTACKER: WeightedShare(ATTACKER, 1e12, pulled[ATTACKER].vector)}
    params = {"f": 1, "max_weight_fraction": 0.25}
    if name == "multi_krum":
        params["m"] = N  # keep the attacker in, so its weight would matter
    equal = [run(make_strategy(name, members=N, **params), s, reference) for s in (pulled, giant)]
    assert torch.equal(equal[0].vector, equal[1].vector)
    assert equal[1].weights[ATTACKER] == pytest.approx(1 / N) and not equal[1].weight_capped
    declared = run(make_strategy(name, members=N, weighting="declared", **params), giant, reference)
    assert declared.weighting == "declared" and ATTACKER in declared.weight_capped
    assert not torch.allclose(declared.vector, equal[1].vector, atol=1e-4)


def test_weighting_is_checked_by_name():
    with pytest.raises(StrategyError, match="weighting = 'rows': choose one of declared, equal"):
        make_strategy("centered_clipping", weighting="rows")
    with pytest.raises(StrategyError, match="median.*counts every share once"):
        make_strategy("median", weighting="declared")
    assert rule_params("mean")["weighting"] == "declared"
    assert {rule_params(r)["weighting"] for r in STRATEGIES if r != "mean"} == {"equal"}


@pytest.mark.parametrize("name,params", ROBUST.items())
def test_robust_rules_stay_near_fedavg_on_honest_shares(name, params):
    reference, shares = honest_round()
    result = run(make_strategy(name, members=N, **params), shares, reference)
    err = float(torch.linalg.vector_norm(result.vector - fedavg(shares)))
    # The price of robustness on clean data, relative to the honest update; Krum keeps
    # one share, so it costs that share's whole skew (spread 0.3 here).
    assert err < (0.4 if name == "krum" else 0.2) * update_norm(reference, shares)
    assert torch.isfinite(result.vector).all()


# -- attacks at f = 1 of 8 -----------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
def test_plain_mean_is_taken_over_by_one_member(attack):
    reference, shares = honest_round()
    honest = fedavg({m: s for m, s in shares.items() if m != ATTACKER})
    result = run(make_strategy("mean"), attacked(attack, reference, shares), reference)
    err = float(torch.linalg.vector_norm(result.vector - honest))
    # Shown, not hidden: the mean moves by more than a whole honest update.
    assert err > 1.0 * update_norm(reference, shares)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("name,params", ROBUST.items())
def test_robust_rule_survives_one_hostile_member_of_eight(name, params, attack):
    reference, shares = honest_round()
    honest = fedavg({m: s for m, s in shares.items() if m != ATTACKER})
    result = run(make_strategy(name, members=N, f=1, **params), attacked(attack, reference, shares),
                 reference)
    err = float(torch.linalg.vector_norm(result.vector - honest))
    assert torch.isfinite(result.vector).all()
    if name == "norm_bounded_mean":
        # Its guarantee is a bounded effect: the attacker's capped fraction of its distance
        # from the honest mean, which is at most the bound plus the honest update.
        assert result.bound is not None
        assert err <= 0.25 * (result.bound.value + update_norm(reference, shares)) * 1.01
        if attack in ("scale", "huge", "noise", "sign-flip"):  # bounded, or far: left out
            assert ATTACKER in result.clipped or \
                result.excluded[ATTACKER].reason == "far_outlier"
    else:
        assert err < 0.35 * update_norm(reference, shares), result.to_json()


def test_weight_of_1e12_does_not_set_the_model_under_a_cap():
    reference, shares = honest_round()
    hostile = attacked("weight", reference, shares)
    honest = fedavg({m: s for m, s in shares.items() if m != ATTACKER})
    plain = run(make_strategy("mean"), hostile, reference)
    capped = run(make_strategy("mean", max_weight_fraction=0.25), hostile, reference)
    assert torch.allclose(plain.vector, hostile[ATTACKER].vector, atol=1e-5)  # owned
    assert capped.weights[ATTACKER] == pytest.approx(0.25)
    assert capped.weight_capped[ATTACKER].reason == "weight_capped"
    moved = float(torch.linalg.vector_norm(capped.vector - honest))
    owned = float(torch.linalg.vector_norm(hostile[ATTACKER].vector - honest))
    assert moved == pytest.approx(0.25 * owned, rel=1e-3)


# -- weight caps ---------------------------------------------------------------


def test_water_filling_caps_the_giant_and_keeps_the_others_proportional():
    weights = [1e12, 1000, 2000, 1000, 1000, 1000, 1000, 1000]
    p, notes, infeasible = cap_weights(weights, 0.25, None)
    assert infeasible is None
    assert p[0] == pytest.approx(0.25)
    assert sum(p) == pytest.approx(1.0)
    assert p[2] == pytest.approx(2 * p[1])  # relative weights of the uncapped unchanged
    assert max(p) <= 0.25 + 1e-12
    assert notes[0] is not None and all(n is None for n in notes[1:])


def test_water_filling_redistributes_until_nobody_is_over_the_cap():
    # Capping the first pushes the second over: a second pass caps it too.
    p, notes, _ = cap_weights([100, 60, 10, 10, 10, 10], 0.3, None)
    assert max(p) <= 0.3 + 1e-12 and sum(p) == pytest.approx(1.0)
    assert p[0] == pytest.approx(0.3) and p[1] == pytest.approx(0.3)
    assert notes[0] and notes[1] and not any(notes[2:])


def test_caps_change_nothing_when_every_weight_is_under_them():
    weights = [900.0, 1100.0, 1000.0, 1200.0]
    p, notes, infeasible = cap_weights(weights, 0.4, 5000.0)
    assert p == pytest.approx([w / sum(weights) for w in weights])
    assert notes == [None] * 4 and infeasible is None


def test_absolute_cap_counts_a_weight_as_the_cap():
    p, notes, _ = cap_weights([1e12, 1000.0], None, 1000.0)
    assert p == pytest.approx([0.5, 0.5])
    assert "absolute cap" in notes[0]


def test_infeasible_fraction_falls_back_to_equal_weights_and_says_so():
    reference, shares = honest_round(n=3)
    result = run(make_strategy("mean", max_weight_fraction=0.25), shares, reference)
    assert result.fallback == "weight_cap_infeasible"
    assert all(w == pytest.approx(1 / 3) for w in result.weights.values())


def test_a_fraction_cap_below_one_over_members_is_refused():
    with pytest.raises(StrategyError, match="at least 1/8"):
        make_strategy("mean", members=8, max_weight_fraction=0.1)


# -- the distance bound --------------------------------------------------------


def test_dp_bound_is_the_stated_formula():
    t = math.sqrt(2 * math.log(1e9))
    assert dp_bound(1.0, 1.1, 10_000, 1e-9) == pytest.approx(1.0 + 1.1 * (100 + t))


def test_honest_update_dp_shares_stay_inside_the_dp_bound():
    c, sigma, d = 0.5, 1.2, 2000
    g = torch.Generator().manual_seed(1)
    reference = torch.randn(d, generator=g)
    shares = {}
    for i in range(N):
        u = torch.randn(d, generator=g) * 3
        u = u * min(1.0, c / float(torch.linalg.vector_norm(u)))  # clipped to C
        shares[f"m{i}"] = WeightedShare(f"m{i}", 1.0, reference + u + sigma * c * torch.randn(d, generator=g))
    strategy = make_strategy("norm_bounded_mean", dp_clip=c, dp_noise_multiplier=sigma)
    result = run(strategy, shares, reference)
    assert result.bound.source == "dp" and result.bound.tail == 1e-9
    assert not result.clipped and not result.excluded
    assert torch.allclose(result.vector, fedavg(shares), atol=1e-5)


def test_dp_bound_clips_a_scaled_share_but_cannot_see_a_sign_flip_inside_the_noise():
    c, sigma, d = 0.5, 1.0, 2000
    reference, shares = honest_round(d=d)
    b = dp_bound(c, sigma, d, 1e-9)
    u = torch.ones(d) / math.sqrt(d)  # a unit direction
    strategy = make_strategy("norm_bounded_mean", dp_clip=c, dp_noise_multiplier=sigma,
                             far_factor=None)  # the bound alone
    scaled = {**shares, ATTACKER: WeightedShare(ATTACKER, 1000.0, reference + 10 * b * u)}
    assert "m7" in run(strategy, scaled, reference).clipped
    # A flip 40x the clipped signal C is still shorter than the noise's norm: it passes.
    flipped = {**shares, ATTACKER: WeightedShare(ATTACKER, 1000.0, reference - 40 * c * u)}
    result = run(strategy, flipped, reference)
    assert ATTACKER not in result.clipped and ATTACKER not in result.excluded


def test_reject_mode_leaves_a_far_share_out_with_its_reason():
    reference, shares = honest_round()
    result = run(make_strategy("norm_bounded_mean", distance="reject", far_factor=None),
                 attacked("scale", reference, shares), reference)
    assert result.excluded[ATTACKER].reason == "too_far"
    assert ATTACKER not in result.used


def test_spread_bound_below_2f_plus_1_shares_comes_from_our_own_distance():
    reference, shares = honest_round(n=2)
    result = run(make_strategy("norm_bounded_mean"), attacked("scale", reference, {
        "m0": shares["m0"], ATTACKER: shares["m1"]}), reference)
    assert result.bound.source == "own_distance"
    assert "bound_from_own_distance" in [n.reason for n in result.fallbacks]
    assert result.clipped[ATTACKER].reason == "distance_clipped"


# -- rules ---------------------------------------------------------------------


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values():
    shares = {m: WeightedShare(m, 1.0, torch.tensor([v, -v])) for m, v in
              zip("abcd", [1.0, 2.0, 3.0, 10.0], strict=True)}
    result = run(make_strategy("median", f=1), shares, None, own="a")
    assert result.vector.tolist() == pytest.approx([2.5, -2.5])


def test_trimmed_mean_refuses_a_consortium_smaller_than_2f_plus_1():
    with pytest.raises(StrategyError, match=r"needs at least 5 members.*2f \+ 1") as err:
        make_strategy("trimmed_mean", members=4, f=2)
    assert isinstance(err.value, ValueError) and isinstance(err.value, LocalError)
    make_strategy("trimmed_mean", members=5, f=2)


def test_trimmed_mean_with_too_few_shares_keeps_our_own_and_records_it():
    reference, shares = honest_round()
    present = {m: shares[m] for m in ("m0", "m1", "m2", "m3")}
    result = run(make_strategy("trimmed_mean", members=8, f=2), present, reference,
                 missing=("m4", "m5", "m6", "m7"))
    assert result.fallback == "too_few_shares"
    assert torch.equal(result.vector, shares["m0"].vector)
    assert result.missing == ("m4", "m5", "m6", "m7")


def test_krum_picks_an_honest_share():
    reference, shares = honest_round()
    hostile = attacked("sign-flip", reference, shares)
    hostile["m6"] = WeightedShare("m6", 1.0, reference + 0.001 * (hostile[ATTACKER].vector - reference))
    result = run(make_strategy("krum", f=1, far_factor=None), hostile, reference)
    assert len(result.used) == 1 and result.used[0] not in (ATTACKER, "m6")
    assert torch.equal(result.vector, shares[result.used[0]].vector)
    assert result.excluded[ATTACKER].reason == "krum_not_selected"


def test_multi_krum_leaves_out_the_attacker_and_averages_the_rest():
    reference, shares = honest_round()
    result = run(make_strategy("multi_krum", f=1), attacked("scale", reference, shares), reference)
    assert ATTACKER in result.excluded and len(result.used) == N - 1


def test_krum_below_2f_plus_3_shares_falls_back():
    reference, shares = honest_round(n=4)
    result = run(make_strategy("krum", f=1), shares, reference)
    assert result.fallback == "too_few_shares"


def test_centered_clipping_clips_the_far_share_around_the_reference():
    reference, shares = honest_round()
    result = run(make_strategy("centered_clipping", far_factor=None),
                 attacked("scale", reference, shares), reference)
    assert result.clipped[ATTACKER].reason == "centered_clipped"


def test_centered_clipping_around_own_with_a_tiny_radius_stays_at_our_share():
    reference, shares = honest_round()
    result = run(make_strategy("centered_clipping", center="own", tau=1e-9), shares, reference)
    assert torch.allclose(result.vector, shares["m0"].vector, atol=1e-6)


def test_shares_that_are_not_finite_or_of_the_wrong_size_are_excluded():
    reference, shares = honest_round()
    bad = {**shares, "m6": WeightedShare("m6", 1.0, torch.full((D,), float("nan"))),
           "m7": WeightedShare("m7", 1.0, torch.zeros(D + 1)),
           "m5": WeightedShare("m5", float("inf"), shares["m5"].vector)}
    result = run(make_strategy("mean"), bad, reference)
    assert {m: n.reason for m, n in result.excluded.items()} == {
        "m6": "non_finite", "m7": "wrong_size", "m5": "bad_weight"}
    assert torch.isfinite(result.vector).all()


class _Overflowing(Strategy):
    name = "overflowing"
    assumption = "none"

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        return torch.full_like(ctx.own.vector, 1e300)  # finite in float64, inf in float32


def test_a_non_finite_result_falls_back_to_the_reference_and_says_so():
    reference, shares = honest_round()
    result = run(_Overflowing(), shares, reference)
    assert result.fallback == "non_finite_result"
    assert torch.equal(result.vector, reference)


# -- the interface -------------------------------------------------------------


def test_default_topology_is_everyone():
    s = make_strategy("median")
    assert s.send_to(0, {"a", "b"}) == {"a", "b"} and s.wait_for(5, frozenset({"c"})) == {"c"}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_dict_round_trips_through_msgpack(name):
    reference, shares = honest_round()
    s = make_strategy(name, members=N)
    run(s, shares, reference)
    packed = msgpack.packb(s.state_dict())
    fresh = make_strategy(name, members=N)
    fresh.load_state_dict(msgpack.unpackb(packed))
    assert fresh.state_dict() == s.state_dict()
    assert fresh.last_round == 3 and fresh.rounds_aggregated == 1


def test_state_of_another_rule_carries_nothing_over_and_garbage_is_refused():
    s = make_strategy("krum")
    s.load_state_dict(make_strategy("median").state_dict())
    assert s.rounds_aggregated == 0
    with pytest.raises(LocalError):
        s.load_state_dict({"version": 99})


def test_diagnostics_are_strict_json():
    reference, shares = honest_round()
    result = run(make_strategy("norm_bounded_mean", max_weight_fraction=0.25, weighting="declared"),
                 attacked("weight", reference, shares), reference, missing=("m9",))
    text = json.dumps(result.to_json(), allow_nan=False)
    back = json.loads(text)
    assert back["missing"] == ["m9"] and back["weight_capped"][ATTACKER]["reason"] == "weight_capped"
    assert back["bound"]["source"] == "spread"


def test_registry_names_rules_aliases_and_parameters():
    assert {"mean", "median", "trimmed_mean", "krum", "multi_krum", "centered_clipping",
            "norm_bounded_mean", "fedavg"} <= set(RULE_NAMES)
    assert make_strategy("fedavg").name == "mean"
    assert rule_params("multi_krum")["m"] is None
    with pytest.raises(StrategyError, match="choose one of"):
        make_strategy("krum2")
    with pytest.raises(ValueError, match="unknown parameter.*it takes"):
        check_strategy("median", {"tau": 1.0})
    with pytest.raises(ValueError, match="f must be an integer"):
        check_strategy("median", {"f": 1.5})
    with pytest.raises(ValueError, match="f must be below"):
        check_strategy("mean", {"f": 3}, members=3)


# -- never non-finite ----------------------------------------------------------

_F32_MAX = float(torch.finfo(torch.float32).max)
_finite = st.floats(min_value=-_F32_MAX, max_value=_F32_MAX, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=1, max_value=7), d=st.integers(min_value=1, max_value=6),
       data=st.data(), name=st.sampled_from(sorted(STRATEGIES)),
       with_reference=st.booleans(), capped=st.booleans(), dp=st.booleans())
def test_no_rule_returns_a_non_finite_vector_for_finite_inputs(n, d, data, name, with_reference,
                                                               capped, dp):
    vectors = [torch.tensor(data.draw(st.lists(_finite, min_size=d, max_size=d)), dtype=torch.float32)
               for _ in range(n)]
    weights = data.draw(st.lists(st.floats(min_value=1e-6, max_value=1e12), min_size=n, max_size=n))
    shares = {f"m{i}": WeightedShare(f"m{i}", w, v) for i, (v, w) in
              enumerate(zip(vectors, weights, strict=True))}
    reference = (torch.tensor(data.draw(st.lists(_finite, min_size=d, max_size=d)), dtype=torch.float32)
                 if with_reference else None)
    params = {"f": min(1, n - 1)} if name != "mean" else {}
    if capped:
        params["max_weight_fraction"] = 0.5
    if dp:
        params.update(dp_clip=1.0, dp_noise_multiplier=1.0)
    for distance in ("off", "clip"):
        result = run(make_strategy(name, distance=distance, **params), shares, reference)
        assert isinstance(result, Aggregate)
        assert torch.isfinite(result.vector).all(), result.to_json()
        json.dumps(result.to_json(), allow_nan=False)


def test_our_own_bad_weight_counts_as_one_and_is_recorded():
    reference, shares = honest_round()
    shares["m0"] = WeightedShare("m0", 0.0, shares["m0"].vector)
    result = run(make_strategy("mean"), shares, reference)
    assert result.fallback == "bad_own_weight" and torch.isfinite(result.vector).all()


def test_centering_without_a_reference_is_recorded():
    _, shares = honest_round()
    result = run(make_strategy("centered_clipping"), shares, None)
    assert result.fallback == "no_reference"


# -- multi-Krum scores -----------------------------------------------------------


def heterogeneous_round(seed: int = 0, d: int = D):
    """Members with more rows take more local steps: honest updates share a direction
    but differ 3x in length. Two small hostile updates point elsewhere (as a
    label-flipper's do): the largest honest members are the distance outliers."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(d, generator=g)
    common = torch.randn(d, generator=g)

    def unit(x):
        return x / torch.linalg.vector_norm(x)

    lengths = [0.2, 0.2, 0.3, 0.4, 0.55, 0.6]
    shares = {f"m{i}": WeightedShare(f"m{i}", 100.0, reference + n * unit(
        common + 0.8 * torch.randn(d, generator=g))) for i, n in enumerate(lengths)}
    elsewhere = torch.randn(d, generator=g)
    for m in ("m6", "m7"):
        shares[m] = WeightedShare(m, 100.0, reference + 0.2 * unit(
            elsewhere + 0.8 * torch.randn(d, generator=g)))
    return reference, shares


def test_krum_by_distance_leaves_out_large_honest_updates_staged_leaves_out_the_odd_directions():
    reference, shares = heterogeneous_round()
    hostile = {"m6", "m7"}
    by_distance = run(make_strategy("multi_krum", members=N, f=2), shares, reference)
    assert set(by_distance.excluded) != hostile and set(by_distance.excluded) & {"m4", "m5"}
    staged = run(make_strategy("multi_krum", members=N, f=2, score="staged", far_factor=None),
                 shares, reference)
    assert set(staged.excluded) == hostile
    assert {n.reason for n in staged.excluded.values()} == {"krum_not_selected"}
    assert "direction score" in staged.excluded["m6"].detail


def test_staged_krum_puts_magnitude_outliers_first_with_their_own_reason():
    reference, shares = heterogeneous_round()
    u = shares["m7"].vector - reference
    shares["m7"] = WeightedShare("m7", 100.0, reference - 1000 * u)  # far, and hostile
    result = run(make_strategy("multi_krum", members=N, f=2, score="staged", far_factor=None),
                 shares, reference)
    assert result.excluded["m7"].reason == "krum_far"
    assert result.excluded["m6"].reason == "krum_not_selected"
    assert set(result.used) == {f"m{i}" for i in range(6)}


def test_krum_by_direction_alone_keeps_a_huge_share_pointing_the_honest_way():
    """Why "staged" checks size first: a direction has no size."""
    reference, shares = heterogeneous_round()
    shares["m7"] = WeightedShare("m7", 100.0, reference + 1e6 * (shares["m5"].vector - reference))
    direction = run(make_strategy("multi_krum", members=N, f=2, score="direction",
                                  far_factor=None), shares,
                    reference)
    assert "m7" in direction.used
    staged = run(make_strategy("multi_krum", members=N, f=2, score="staged", far_factor=None),
                 shares, reference)
    assert staged.excluded["m7"].reason == "krum_far"


def test_staged_krum_gives_the_same_vector_at_every_member():
    reference, shares = heterogeneous_round()
    strategy = make_strategy("multi_krum", members=N, f=2, score="staged")
    vectors = [run(strategy, shares, reference, own=m).vector for m in shares]
    assert all(torch.equal(v, vectors[0]) for v in vectors)


def test_krum_by_direction_without_a_reference_scores_by_distance_and_says_so():
    _, shares = heterogeneous_round()
    result = run(make_strategy("multi_krum", members=N, f=2, score="staged"), shares, None)
    assert "krum_direction_undefined" in [n.reason for n in result.fallbacks]
    assert len(result.used) == N - 2
    with pytest.raises(StrategyError, match="score must be one of distance, direction, staged"):
        make_strategy("multi_krum", score="cosine")
    with pytest.raises(StrategyError, match="outlier_factor must be a finite number >= 1"):
        make_strategy("krum", score="staged", outlier_factor=0.5)


def test_multi_krum_staged_is_multi_krum_with_the_staged_score():
    reference, shares = heterogeneous_round()
    named = run(make_strategy("multi_krum_staged", members=N, f=2), shares, reference)
    param = run(make_strategy("multi_krum", members=N, f=2, score="staged"), shares, reference)
    assert torch.equal(named.vector, param.vector) and named.excluded == param.excluded
    assert named.rule == "multi_krum_staged" and rule_params("multi_krum_staged")["score"] == "staged"

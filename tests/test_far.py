"""Defaults that hold a quarter of the consortium (issue 19, item 3): f grows with the
member count, and a share absurdly far from the others never enters the aggregate,
whatever f is (the far filter, node/strategy/distance.py drop_far)."""

from __future__ import annotations

import math

import pytest
import torch

from gossip.membership import Consortium
from node.strategy import WeightedShare, make_strategy
from node.strategy.base import FAR_FACTOR
from node.strategy.consortium_rules import build_strategy, default_f, pin_rules, rules_table
from tests.test_rules import consortium, keys
from tests.test_strategy import fedavg, honest_round, plain_average, run, update_norm


def default_strategy(n: int):
    """The strategy every member of an n-member consortium built by `flnode consortium
    build` (no --aggregation, no --f) applies."""
    base = consortium(keys(n))
    table = pin_rules(rules_table(n, privacy_mode="off"), n)
    return build_strategy(Consortium(base.name, base.schema, base.members, table), None,
                          "off", 1.0).strategy, table


def hostile(shares, members, vector):
    return {**shares, **{m: WeightedShare(m, 1000.0, vector.clone()) for m in members}}


@pytest.mark.parametrize(("n", "f"), [(3, 1), (4, 1), (5, 1), (7, 1), (8, 2), (11, 2),
                                      (12, 3), (16, 4)])
def test_the_default_f_is_a_quarter_of_the_consortium_and_is_pinned(n, f):
    assert default_f(n) == f
    strategy, table = default_strategy(n)
    assert strategy.f == f and table["f"] == f
    # every member must judge by the same filter: written out, like every parameter
    assert table["params"]["far_factor"] == FAR_FACTOR
    assert strategy.needs(f) <= n  # the rule "auto" picks can hold it at this size


def test_two_colluders_of_eight_are_left_out_by_the_default_rules():
    """On 819e161 the default was f = 1 at any size: one of two 1e30 shares was averaged
    in and the round's model was not finite (kept the reference, every round)."""
    strategy, _ = default_strategy(8)
    reference, shares = honest_round()
    for vector in (torch.full_like(reference, 1e30), reference - 4 * (shares["m7"].vector
                                                                      - reference)):
        result = run(strategy, hostile(shares, ("m6", "m7"), vector), reference)
        assert not {"m6", "m7"} & set(result.used), result.to_json()
        assert not {"non_finite_result", "too_few_shares"} & {x.reason for x in result.fallbacks}
        assert torch.isfinite(result.vector).all()


@pytest.mark.parametrize("attackers", [3, 2, 1])
def test_a_share_absurdly_far_never_enters_whatever_f_is(attackers):
    """f = 1, and up to three members of eight at 1e30 (or scaled by 1000): each is left
    out before the rule, counted against f, and the rule combines the honest rest
    without falling back to our own share."""
    reference, shares = honest_round()
    honest = {m: s for m, s in shares.items() if int(m[1]) < 8 - attackers}
    members = [f"m{7 - i}" for i in range(attackers)]
    for vector in (torch.full_like(reference, 1e30), reference + 1000 * torch.ones_like(reference)):
        strategy = make_strategy("multi_krum_staged", members=8, f=1)
        result = run(strategy, hostile(shares, members, vector), reference)
        assert {m: result.excluded[m].reason for m in members} == \
            {m: "far_outlier" for m in members}
        assert result.f_used == 0 and not result.fallbacks
        assert set(result.used) == set(honest)  # f is spent: no honest share left out
        assert torch.allclose(result.vector, plain_average(honest), atol=1e-5)


def test_the_mean_applies_the_filter_only_when_asked():
    reference, shares = honest_round()
    shares = hostile(shares, ("m7",), torch.full_like(reference, 1e30))
    assert make_strategy("mean").params["far_factor"] == 0  # off, and pinned as 0
    result = run(make_strategy("mean", far_factor=FAR_FACTOR), shares, reference)
    assert result.excluded["m7"].reason == "far_outlier"
    assert torch.allclose(result.vector, fedavg({m: s for m, s in shares.items() if m != "m7"}),
                          atol=1e-5)


def test_attackers_cannot_set_the_scale_to_drop_an_honest_share():
    """Three of eight (fewer than half) sitting exactly at the honest shares' coordinate
    median pull the median distance down to a small honest one: an honest share 10x
    further out than the closest honest ones still stays (the factor is far above the
    honest spread), and hostile shares far out cannot raise the centre or the scale."""
    reference, shares = honest_round(spread=0.3)
    d = reference.numel()
    g = torch.Generator().manual_seed(5)
    # the honest members' updates differ in size by 10x (non-IID: more rows, more steps)
    honest = {f"m{i}": WeightedShare(f"m{i}", 1000.0, reference + (1 + 9 * (i == 4)) *
                                     torch.randn(d, generator=g) / math.sqrt(d))
              for i in range(5)}
    centre = torch.stack([s.vector for s in honest.values()]).median(dim=0).values
    at_centre = hostile(honest, ("m5", "m6", "m7"), centre)
    result = run(make_strategy("multi_krum_staged", members=8, f=1), at_centre, reference)
    assert not [m for m, x in result.excluded.items() if x.reason == "far_outlier"]
    assert result.far_ratio is not None and result.far_ratio < FAR_FACTOR
    # far out, the same three do not move the centre: each is left out, no honest one
    far = hostile(honest, ("m5", "m6", "m7"), reference + 1e6)
    result = run(make_strategy("multi_krum_staged", members=8, f=1), far, reference)
    assert {m for m, x in result.excluded.items() if x.reason == "far_outlier"} == \
        {"m5", "m6", "m7"}


def test_the_filter_needs_a_scale_to_judge_by():
    """Two shares, or a median distance of 0 (most shares identical): nothing is left out
    by the filter (the rule's f still applies)."""
    reference, shares = honest_round()
    two = {m: shares[m] for m in ("m0", "m1")}
    two["m1"] = WeightedShare("m1", 1.0, torch.full_like(reference, 1e30))
    result = run(make_strategy("median", f=0), two, reference)
    assert not result.excluded and result.far_ratio is None
    same = {f"m{i}": WeightedShare(f"m{i}", 1.0, reference.clone()) for i in range(7)}
    same["m7"] = WeightedShare("m7", 1.0, reference + 1.0)
    result = run(make_strategy("multi_krum_staged", members=8, f=1), same, reference)
    assert "far_outlier" not in {x.reason for x in result.excluded.values()}
    assert "m7" in result.excluded  # left out by the rule's f instead


def test_honest_shares_are_never_left_out_and_the_result_is_unchanged():
    """Clean shares: the filter leaves the result exactly as the rule alone gives it."""
    reference, shares = honest_round(spread=3.0)
    for name in ("multi_krum_staged", "trimmed_mean", "median", "centered_clipping"):
        on = run(make_strategy(name, members=8, f=2), shares, reference)
        off = run(make_strategy(name, members=8, f=2, far_factor=None), shares, reference)
        assert on.f_used == 2 and on.far_ratio < 10
        assert torch.equal(on.vector, off.vector) and on.used == off.used
    assert update_norm(reference, shares) > 0


def test_a_far_factor_below_two_is_refused():
    with pytest.raises(ValueError, match="far_factor must be a finite number >= 2"):
        make_strategy("median", far_factor=1.5)
    assert pin_rules(rules_table(2), 2)["params"]["far_factor"] == 0  # the mean's "off"


async def test_two_huge_members_of_eight_cannot_stop_the_default_consortium(tmp_path):
    """The issue's run, short: 8 members on `digits`, two sending 1e30 shares, the
    default [rules]. Every honest member leaves both out every round and keeps a finite
    model; on 819e161 (f = 1) one of them was averaged in every round."""
    from node.rehearsal.simulation.prepare import member_names, prepare
    from node.rehearsal.simulation.run import run_consortium
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime.state import read_jsonl

    torch.set_num_threads(1)
    base = dict(dataset="digits", nodes=8, partition="dirichlet:0.5", rounds=3, seed=0,
                out=tmp_path, privacy="off", round_deadline_s=30.0)
    attackers = member_names(SimulationSpec(**base))[-2:]
    spec = SimulationSpec(**base, attacks=(f"huge:{','.join(attackers)}",))
    prep = prepare(spec)
    nodes = await run_consortium(spec, prep)
    for n in nodes:
        if n.name in attackers:
            continue
        rounds = {x["round"]: x for x in read_jsonl(n.state.path / "audit.jsonl")
                  if x.get("kind") == "aggregate"}
        assert sorted(rounds) == [0, 1, 2]
        for x in rounds.values():
            assert x["f"] == 2 and not set(attackers) & set(x["used"]), x
            assert {x["excluded"][a]["reason"] for a in attackers} == {"far_outlier"}
            assert "too_few_shares" not in {y["reason"] for y in x["fallbacks"]}
        assert all(torch.isfinite(p).all() for p in n.model.parameters())
        closed = [x["closed"] for x in read_jsonl(n.state.path / "metrics.jsonl")]
        assert closed == ["all"] * 3, closed  # no round waited for its deadline


def test_with_two_of_eight_down_the_default_still_combines_and_holds_two_hostile():
    """f = 2 needs 2f + 3 = 7 shares for multi-Krum: with two members down a node used to
    keep its own share alone every round. It now takes the trimmed mean at f = 2 of the
    six (needs 5), which keeps every coordinate within the honest values' range."""
    strategy, table = default_strategy(8)
    assert table["params"]["too_few"] == "trimmed_mean"  # pinned like every parameter
    reference, shares = honest_round()
    present = {m: shares[m] for m in ("m0", "m1", "m2", "m3", "m6", "m7")}
    u = shares["m7"].vector - reference
    for m in ("m6", "m7"):  # both present members hostile: a sign flip x 10
        present[m] = WeightedShare(m, 1000.0, reference - 10 * u)
    assert [x.reason for x in run(strategy, present, reference).fallbacks] == ["krum_too_few"]
    # the rule alone (the default's FedAdam step then moves from the reference)
    result = run(make_strategy("multi_krum_staged", members=8, f=2), present, reference,
                 missing=("m4", "m5"))
    assert [x.reason for x in result.fallbacks] == ["krum_too_few"]
    assert set(result.used) == set(present)
    honest = torch.stack([shares[m].vector for m in ("m0", "m1", "m2", "m3")])
    assert bool(((result.vector >= honest.min(0).values - 1e-6)
                 & (result.vector <= honest.max(0).values + 1e-6)).all())
    assert not torch.equal(result.vector, shares["m0"].vector)
    # too_few = "own": as before, our own share alone
    own = make_strategy("multi_krum_staged", members=8, f=2, too_few="own")
    assert run(own, present, reference).fallback == "too_few_shares"
    # below 2f + 1 shares even the trimmed mean cannot hold f: our own share
    four = {m: shares[m] for m in ("m0", "m1", "m2", "m3")}
    assert run(strategy, four, reference).fallback == "too_few_shares"

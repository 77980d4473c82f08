from __future__ import annotations

import pytest
import torch

from gossip.errors import LocalError
from node.strategy import RULE_NAMES, WeightedShare, make_strategy


def s(member, weight, *values):
    return WeightedShare(member, weight, torch.tensor(values, dtype=torch.float32))


def combine(name, shares, own):
    """Rule `name` with its default parameters and no reference, as a node applies it
    (round 0; distances, where the rule uses them, measured from `own`)."""
    return make_strategy(name).aggregate(0, own, {x.member: x for x in shares}).vector


def weighted_mean(shares, own):
    return combine("mean", shares, own)


def median(shares, own):
    return combine("median", shares, own)


def trimmed_mean(shares, own):
    return combine("trimmed_mean", shares, own)


def test_weighted_mean_weights_by_sample_count():
    out = weighted_mean([s("b", 3.0, 4.0, 0.0)], s("a", 1.0, 0.0, 8.0))
    assert out.tolist() == pytest.approx([3.0, 2.0])


def test_weighted_mean_does_not_depend_on_arrival_order():
    shares = [s(f"m{i}", 1.0 + i, 0.1 * i, 1.0 / (i + 1)) for i in range(6)]
    own = s("own", 2.5, 0.3, 0.7)
    assert torch.equal(weighted_mean(shares, own), weighted_mean(list(reversed(shares)), own))


def test_median_and_trimmed_mean_resist_one_outlier():
    shares = [s("b", 1, 1.0), s("c", 1, 1.2), s("d", 1, 1e6), s("e", 1, 0.9)]
    own = s("a", 1, 1.1)
    # The far filter (far_factor 1000, node/strategy/distance.py) leaves the 1e6 share out
    # before the rule, and that share counts against f: the rule then combines the four
    # others (0.9, 1.0, 1.1, 1.2), whose median and untrimmed mean are both 1.05.
    assert median(shares, own).item() == pytest.approx(1.05)
    assert trimmed_mean(shares, own).item() == pytest.approx(1.05)
    assert weighted_mean(shares, own).item() > 1e5


def test_unknown_rule_names_the_choices():
    with pytest.raises(LocalError, match="mean"):
        make_strategy("krum2")


def test_every_rule_name_combines_with_its_defaults():
    own = s("a", 1, 0.0, 1.0)
    for name in RULE_NAMES:
        out = combine(name, [s("b", 1, 0.2, 1.2), s("c", 1, 0.1, 0.9), s("d", 1, -0.1, 1.1)], own)
        assert out.shape == (2,) and out.dtype == torch.float32, name


def test_trimmed_mean_of_three_does_not_average_a_huge_share_in():
    # Issue 11, attack 2: int(0.2 * n) trimmed nothing below 5 members, so one 1e30 share
    # made the model NaN downstream. With an explicit f = 1, three shares are enough.
    # Today the far filter leaves the 1e30 share out first (it counts against f = 1), so
    # the two honest shares are averaged: 1.1, and never anything near 1e30.
    out = trimmed_mean([s("b", 1, 1.2), s("c", 1, 1e30)], s("a", 1, 1.0))
    assert out.item() == pytest.approx(1.1)


def test_trimmed_mean_below_2f_plus_1_shares_keeps_our_own_share():
    out = trimmed_mean([s("b", 1, 1e30)], s("a", 1, 1.0))
    assert out.item() == pytest.approx(1.0)

from __future__ import annotations

import pytest
import torch

from gossip.errors import LocalError
from node.aggregate import RULES, WeightedShare, get_rule, median, trimmed_mean, weighted_mean


def s(member, weight, *values):
    return WeightedShare(member, weight, torch.tensor(values, dtype=torch.float32))


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
        get_rule("krum2")


def test_every_strategy_name_is_a_rule_for_older_callers():
    from node.strategy import RULE_NAMES

    assert set(RULE_NAMES) == set(RULES)
    own = s("a", 1, 0.0, 1.0)
    for name, rule in RULES.items():
        out = rule([s("b", 1, 0.2, 1.2), s("c", 1, 0.1, 0.9), s("d", 1, -0.1, 1.1)], own)
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

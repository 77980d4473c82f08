"""Aggregation rules by name: a thin layer over `node.strategy` for older callers.

The rules, their assumptions and diagnostics live in `node/strategy/`; new code
calls `make_strategy(name, members=n, **params).aggregate(...)` and gets an
`Aggregate` (vector + who was excluded, clipped, capped, and why). This module
keeps the old shape, `rule(shares, own) -> vector`, for each rule name with its
default parameters and no reference (distances, where a rule uses them, are
measured from `own`, our released share).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gossip.errors import LocalError
from node.strategy import RULE_NAMES, WeightedShare, make_strategy

__all__ = ["RULES", "WeightedShare", "get_rule", "median", "trimmed_mean", "weighted_mean"]

Rule = Callable[[Sequence[WeightedShare], WeightedShare], torch.Tensor]


def _legacy(name: str) -> Rule:
    def rule(shares: Sequence[WeightedShare], own: WeightedShare) -> torch.Tensor:
        strategy = make_strategy(name)
        return strategy.aggregate(0, own, {s.member: s for s in shares}).vector
    rule.__name__ = name
    rule.__doc__ = f"The {name!r} strategy with its default parameters, as (shares, own) -> vector."
    return rule


RULES: dict[str, Rule] = {name: _legacy(name) for name in RULE_NAMES}

weighted_mean = RULES["mean"]
median = RULES["median"]
trimmed_mean = RULES["trimmed_mean"]


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise LocalError(f"aggregation rule {name!r}: choose one of {', '.join(RULES)}")
    return RULES[name]

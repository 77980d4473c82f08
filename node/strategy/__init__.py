"""Aggregation as a strategy (see `base.py` for the pipeline every rule shares).

    strategy = make_strategy("trimmed_mean", members=8, f=1, max_weight_fraction=0.5)
    result = strategy.aggregate(round, own, received, missing, reference)
    result.vector          # float32, never non-finite
    result.to_json()       # diagnostics for the audit log and summary.json
"""

from node.strategy.base import Strategy
from node.strategy.distance import DistanceBound, dp_bound
from node.strategy.registry import (
    ALIASES,
    RULE_NAMES,
    STRATEGIES,
    canonical,
    check_strategy,
    make_strategy,
    rule_params,
)
from node.strategy.types import Aggregate, Note, StrategyError, WeightedShare
from node.strategy.weights import cap_weights

__all__ = [
    "ALIASES", "RULE_NAMES", "STRATEGIES", "Aggregate", "DistanceBound", "Note", "Strategy",
    "StrategyError", "WeightedShare", "canonical", "cap_weights", "check_strategy", "dp_bound",
    "make_strategy", "rule_params",
]

"""Strategies by name, for the config and the runner.

`make_strategy(name, members=n, **params)` builds one; `check_strategy` is the
same call for a validator (it raises `StrategyError`, a LocalError and a
ValueError, naming the rule and the key). `RULE_NAMES` lists every accepted
name, aliases included; `rule_params(name)` the parameters a rule takes, with
their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node.strategy.base import COMMON_PARAMS, Strategy
from node.strategy.rules import RULE_CLASSES
from node.strategy.types import StrategyError

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in RULE_CLASSES}

# Other names people use for the same rules; "mean" and "trimmed_mean" are the
# names configs already carry.
ALIASES: dict[str, str] = {
    "fedavg": "mean",
    "weighted_mean": "mean",
    "coordinate_median": "median",
    "multikrum": "multi_krum",
    "clipped_gossip": "centered_clipping",
    "cclip": "centered_clipping",
}

RULE_NAMES: tuple[str, ...] = (*STRATEGIES, *ALIASES)


def canonical(name: str) -> str:
    """The rule's own name for `name` (an alias or the name itself)."""
    name = ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise StrategyError(f"aggregation rule {name!r}: choose one of {', '.join(RULE_NAMES)}")
    return name


def rule_params(name: str) -> dict[str, Any]:
    """The parameters `name` accepts, with their defaults."""
    cls = STRATEGIES[canonical(name)]
    return {**COMMON_PARAMS, **cls.DEFAULTS, **cls.PARAMS}


def make_strategy(name: str, *, members: int | None = None, **params: Any) -> Strategy:
    """A strategy for rule `name`. `members` is the consortium size, when known:
    rules that cannot survive `f` hostile members in a consortium that small are
    refused here, not at the first round."""
    return STRATEGIES[canonical(name)](members=members, **params)


def check_strategy(name: str, params: Mapping[str, Any] | None = None,
                   members: int | None = None) -> None:
    """Raise StrategyError if `make_strategy(name, members=members, **params)` would."""
    make_strategy(name, members=members, **dict(params or {}))

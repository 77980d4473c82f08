"""Aggregation rules, one signature each: (received shares, own share) -> model vector.

`own` is the node's own *released* share (never its un-noised local model), so
the next release stays post-processing of released data. Rules are chosen by
name from config; adding one touches only this file (Flower's strategy seam).
Shares are combined in member-name order so float sums are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gossip.errors import LocalError


@dataclass(frozen=True)
class WeightedShare:
    member: str
    weight: float
    vector: torch.Tensor


def _ordered(shares: Sequence[WeightedShare], own: WeightedShare) -> list[WeightedShare]:
    return sorted([*shares, own], key=lambda s: s.member)


def weighted_mean(shares: Sequence[WeightedShare], own: WeightedShare) -> torch.Tensor:
    """FedAvg: mean weighted by sample count."""
    allv = _ordered(shares, own)
    total = sum(s.weight for s in allv)
    out = torch.zeros_like(own.vector, dtype=torch.float64)
    for s in allv:
        out += s.vector.double() * (s.weight / total)
    return out.float()


def median(shares: Sequence[WeightedShare], own: WeightedShare) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018); ignores weights."""
    stacked = torch.stack([s.vector for s in _ordered(shares, own)])
    return stacked.median(dim=0).values


# Fraction cut from each end per coordinate by trimmed_mean.
TRIM_FRACTION = 0.2


def trimmed_mean(shares: Sequence[WeightedShare], own: WeightedShare) -> torch.Tensor:
    """Coordinate-wise mean after dropping the TRIM_FRACTION largest and smallest."""
    stacked = torch.stack([s.vector for s in _ordered(shares, own)])
    k = int(TRIM_FRACTION * stacked.shape[0])
    ordered = stacked.sort(dim=0).values
    return ordered[k:stacked.shape[0] - k].mean(dim=0)


RULES: dict[str, Callable[[Sequence[WeightedShare], WeightedShare], torch.Tensor]] = {
    "mean": weighted_mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
}


def get_rule(name: str) -> Callable[[Sequence[WeightedShare], WeightedShare], torch.Tensor]:
    if name not in RULES:
        raise LocalError(f"aggregation rule {name!r}: choose one of {', '.join(RULES)}")
    return RULES[name]

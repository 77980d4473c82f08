"""The strategy's data types: a share in, the round's result out, and the parameter
checks every part of the pipeline shares. No rule logic here (node/strategy/base.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gossip.errors import LocalError

if TYPE_CHECKING:
    from node.strategy.distance import DistanceBound


class StrategyError(LocalError, ValueError):
    """A strategy was configured wrongly (the operator's or the consortium file's fault).

    Also a ValueError, so a pydantic validator that calls the registry turns it into
    a config error naming the key."""


@dataclass(frozen=True)
class WeightedShare:
    member: str
    weight: float
    vector: torch.Tensor


@dataclass(frozen=True)
class Note:
    """Why a strategy did something to a member's share (or to the round).

    `reason` is a stable counter name (`too_far`, `krum_not_selected`, ...);
    `detail` is for people."""

    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"reason": self.reason, "detail": self.detail}


@dataclass
class Aggregate:
    """A round's result: the vector, and what happened to whom and why.

    - `used`: members whose share went into the vector (after exclusions);
    - `weights`: the fraction of the result each used member had (equal nominal
      fractions for rules that ignore weights; 1.0 for Krum's pick);
    - `excluded`, `clipped`, `down_weighted`, `weight_capped`: member -> Note;
    - `fallbacks`: round-level notes (too few shares, infeasible cap, non-finite
      result, no reference to measure distance from), in the order they happened;
    - `bound`: the distance bound applied this round, if any;
    - `weighting`: how the rule weighed the shares: "declared" (capped declared
      weights), "equal" (declared weights ignored) or None (the rule did not
      combine shares this round, e.g. a fallback to our own share);
    - `server_opt`: the server optimizer step applied after the rule (None: none
      configured, or skipped, which `fallbacks` then says).
    """

    vector: torch.Tensor
    rule: str
    round: int
    f: int
    members: tuple[str, ...]
    missing: tuple[str, ...]
    used: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, Note] = field(default_factory=dict)
    clipped: dict[str, Note] = field(default_factory=dict)
    down_weighted: dict[str, Note] = field(default_factory=dict)
    weight_capped: dict[str, Note] = field(default_factory=dict)
    fallbacks: list[Note] = field(default_factory=list)
    bound: DistanceBound | None = None
    weighting: str | None = None
    server_opt: dict[str, Any] | None = None  # the server step taken this round, if any
    # f left after the far filter: f minus the shares it left out (never below 0)
    f_used: int | None = None
    # the far filter's view: the largest other share's distance over the median distance
    far_ratio: float | None = None

    @property
    def fallback(self) -> str | None:
        """The reason of the last fallback taken this round, if any."""
        return self.fallbacks[-1].reason if self.fallbacks else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data for the audit log and summary.json (no NaN or inf)."""
        def notes(d: dict[str, Note]) -> dict[str, dict[str, str]]:
            return {m: n.to_json() for m, n in sorted(d.items())}
        return {
            "rule": self.rule, "round": self.round, "f": self.f,
            "members": list(self.members), "missing": list(self.missing), "used": list(self.used),
            "weights": {m: _json_float(w) for m, w in sorted(self.weights.items())},
            "excluded": notes(self.excluded), "clipped": notes(self.clipped),
            "down_weighted": notes(self.down_weighted), "weight_capped": notes(self.weight_capped),
            "fallbacks": [n.to_json() for n in self.fallbacks],
            "bound": None if self.bound is None else self.bound.to_json(),
            "weighting": self.weighting,
            "server_opt": self.server_opt,
            "f_used": self.f_used,
            "far_ratio": None if self.far_ratio is None else _json_float(self.far_ratio),
        }


def _json_float(x: float) -> float | str:
    return float(x) if math.isfinite(x) else repr(float(x))


@dataclass
class Candidate:
    """A share inside the pipeline: float64, possibly clipped; `own` is ours."""

    member: str
    weight: float
    vector: torch.Tensor
    own: bool = False


@dataclass
class Round:
    """Everything a rule's `combine` may read or record into."""

    number: int
    own: Candidate
    center: torch.Tensor  # reference if given, else the own share
    has_reference: bool
    result: Aggregate
    f: int  # the f the rule applies this round: the configured f less the far shares



def _int(rule: str, key: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise StrategyError(f"aggregation {rule!r}: {key} must be an integer >= {lo}, got {value!r}")


def _num(rule: str, key: str, value: Any, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"<= {hi:g}"
        rng = " and ".join(x for x in (lo_s, hi_s) if x)
        raise StrategyError(f"aggregation {rule!r}: {key} must be a finite number {rng}, got {value!r}")

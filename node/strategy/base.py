"""The aggregation seam: one `Strategy` interface, one `Aggregate` result.

A strategy is pure: shares in, a vector and its diagnostics out, no I/O. Every
rule runs the same pipeline (`Strategy.aggregate`), so the parts that make a
share unable to hurt are shared, not re-implemented per rule:

1. admit: a share of the wrong size, with a non-finite value or a weight that is
   not a positive finite number is excluded (the transport's checks make these
   rare; a strategy does not rely on them);
2. bound (optional per rule, on for `norm_bounded_mean`): a share further from
   `reference` than a bound is clipped to it or rejected (`node/strategy/distance.py`);
3. combine: the rule itself. Where a rule weighs shares at all, `weighting`
   says how: "declared" (each member's declared weight, capped by water-filling,
   `node/strategy/weights.py`) or "equal" (every admitted share counts once, so a
   declared weight buys nothing). Only the plain `mean` defaults to "declared"
   (honest FedAvg is unchanged); every robust rule defaults to "equal", because
   under "declared" f hostile members each at the cap c hold f x c of the
   weight (f = 2 at c = 0.25: half) whatever their data. The weighting applied
   is recorded in the round's diagnostics;
4. too few shares: below the count the rule needs for its `f`, the result is the
   node's own released share (recorded as a fallback);
5. never non-finite: a non-finite result is replaced by `reference` (or the own
   share) and recorded.

`own` is always the node's *released* share, never its un-noised local model:
the result is then post-processing of released data, so it costs no privacy.
Shares are combined in member-name order so float sums are reproducible.
All arithmetic is float64 (a 1e30 value squared still fits); the result is float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gossip.errors import LocalError
from node.strategy.distance import DISTANCE_ACTIONS, DistanceBound, bound_shares
from node.strategy.weights import cap_weights


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
      combine shares this round, e.g. a fallback to our own share).
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


# Strategy parameters every rule accepts, with their defaults. Rule classes add
# their own in `PARAMS` and may override a default in `DEFAULTS`.
COMMON_PARAMS: dict[str, Any] = {
    "f": 1,                      # hostile members the rule must survive
    "max_weight_fraction": None,  # consortium-agreed cap on one member's share of the total
    "max_weight": None,           # absolute cap on a declared weight
    "dp_clip": None,              # update-level DP: clip C ...
    "dp_noise_multiplier": None,  # ... and noise multiplier sigma (noise std sigma*C)
    "distance": "off",            # what to do with a share beyond the distance bound
    "distance_factor": 3.0,       # without DP: bound = factor x median distance
    "distance_tail": 1e-9,        # with DP: P(an honest share exceeds the bound)
    "weighting": "equal",         # "declared" (capped declared weights) or "equal"
}

WEIGHTINGS = ("declared", "equal")


class Strategy(ABC):
    """How a round combines shares: who to send to and wait for, and the rule.

    Subclasses set `name`, `summary`, `assumption` (on f), `PARAMS` (their own
    parameters with defaults) and implement `needs(f)` and `combine`.
    Construct through `node.strategy.make_strategy(name, **params)`.
    """

    name: ClassVar[str]
    assumption: ClassVar[str]
    PARAMS: ClassVar[dict[str, Any]] = {}
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    uses_weights: ClassVar[bool] = True

    def __init__(self, *, members: int | None = None, **params: Any) -> None:
        accepted = {**COMMON_PARAMS, **self.DEFAULTS, **self.PARAMS}
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise StrategyError(f"aggregation {self.name!r}: unknown parameter(s) {', '.join(unknown)}; "
                                f"it takes {', '.join(sorted(accepted))}")
        self.params: dict[str, Any] = {**accepted, **params}
        self.members = members
        self._check_common()
        self.check(members)
        self.rounds_aggregated = 0
        self.last_round: int | None = None

    # -- configuration ---------------------------------------------------------

    @property
    def f(self) -> int:
        return int(self.params["f"])

    def needs(self, f: int) -> int:
        """Shares (own included) this rule needs to survive f hostile ones."""
        return 1

    def check(self, members: int | None) -> None:
        """Rule-specific parameter checks; `members` is the consortium size if known."""
        need = self.needs(self.f)
        if members is not None and members < need:
            raise StrategyError(
                f"aggregation {self.name!r} with f = {self.f} needs at least {need} members "
                f"({self.assumption}); the consortium has {members}: lower f or choose another rule")

    def _check_common(self) -> None:
        p = self.params
        _int(self.name, "f", p["f"], lo=0)
        if self.members is not None:
            _int(self.name, "members", self.members, lo=1)
            if p["f"] >= self.members:
                raise StrategyError(f"aggregation {self.name!r}: f = {p['f']} hostile members out of "
                                    f"{self.members}: f must be below the consortium size")
        if p["max_weight_fraction"] is not None:
            _num(self.name, "max_weight_fraction", p["max_weight_fraction"], lo=0, lo_open=True, hi=1)
            if self.members is not None and p["max_weight_fraction"] * self.members < 1:
                raise StrategyError(
                    f"aggregation {self.name!r}: max_weight_fraction = {p['max_weight_fraction']:g} "
                    f"with {self.members} members cannot hold (all of them together would get "
                    f"less than the whole): it must be at least 1/{self.members}")
        if p["max_weight"] is not None:
            _num(self.name, "max_weight", p["max_weight"], lo=0, lo_open=True)
        if (p["dp_clip"] is None) != (p["dp_noise_multiplier"] is None):
            raise StrategyError(f"aggregation {self.name!r}: give dp_clip and dp_noise_multiplier "
                                "together (update-level DP), or neither")
        if p["dp_clip"] is not None:
            _num(self.name, "dp_clip", p["dp_clip"], lo=0, lo_open=True)
            _num(self.name, "dp_noise_multiplier", p["dp_noise_multiplier"], lo=0)
        if p["distance"] not in DISTANCE_ACTIONS:
            raise StrategyError(f"aggregation {self.name!r}: distance = {p['distance']!r}: choose one of "
                                f"{', '.join(DISTANCE_ACTIONS)}")
        if p["weighting"] not in WEIGHTINGS:
            raise StrategyError(f"aggregation {self.name!r}: weighting = {p['weighting']!r}: choose "
                                f"one of {', '.join(WEIGHTINGS)}")
        if p["weighting"] == "declared" and not self.uses_weights:
            raise StrategyError(f"aggregation {self.name!r} counts every share once: weighting must "
                                "be \"equal\"")
        _num(self.name, "distance_factor", p["distance_factor"], lo=1)
        _num(self.name, "distance_tail", p["distance_tail"], lo=0, lo_open=True, hi=0.5)

    # -- topology (the defaults: everyone) -------------------------------------

    def send_to(self, round: int, members: Set[str]) -> set[str]:
        """Members this node sends its round-`round` share to."""
        return set(members)

    def wait_for(self, round: int, members: Set[str]) -> set[str]:
        """Members whose round-`round` share this node waits for."""
        return set(members)

    # -- checkpoint ------------------------------------------------------------

    STATE_VERSION: ClassVar[int] = 1

    def state_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, None, lists, dicts) for the msgpack checkpoint."""
        return {"version": self.STATE_VERSION, "rule": self.name,
                "params": {k: v for k, v in sorted(self.params.items())},
                "rounds_aggregated": self.rounds_aggregated, "last_round": self.last_round}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved. State written by another rule (the consortium
        changed its rule) carries nothing over; a malformed state is a LocalError."""
        if not isinstance(d, Mapping) or d.get("version") != self.STATE_VERSION:
            raise StrategyError(f"aggregation state in the checkpoint is not a version-"
                                f"{self.STATE_VERSION} strategy state: {str(d)[:80]}")
        if d.get("rule") != self.name:
            return
        rounds, last = d.get("rounds_aggregated"), d.get("last_round")
        if not (isinstance(rounds, int) and rounds >= 0 and (last is None or isinstance(last, int))):
            raise StrategyError(f"aggregation state in the checkpoint is malformed: {str(d)[:80]}")
        self.rounds_aggregated, self.last_round = rounds, last

    # -- the round -------------------------------------------------------------

    def aggregate(self, round: int, own: WeightedShare, received: Mapping[str, WeightedShare],
                  missing: Set[str] = frozenset(),
                  reference: torch.Tensor | None = None) -> Aggregate:
        """Combine our released share with what the others sent for `round`.

        `received` maps member name -> share (the own member, if present, is ignored);
        `missing` names the members whose share did not come (diagnostics, and a
        rule's too-few-shares fallback); `reference` is the model this node started
        the round from (its previous aggregate), the centre of the distance bound.
        Never returns a non-finite vector when `own` (or `reference`) is finite.
        """
        own_w = own.weight
        if not (isinstance(own_w, int | float) and math.isfinite(own_w) and own_w > 0):
            own_w = 1.0  # our own bug upstream; do not let it poison the weights
        own_c = Candidate(own.member, float(own_w), own.vector.detach().double().flatten(), own=True)
        ref = None
        if reference is not None:
            ref = reference.detach().double().flatten()
            if ref.shape != own_c.vector.shape or not bool(torch.isfinite(ref).all()):
                ref = None  # a local bug upstream; measure from our own share instead
        result = Aggregate(own.vector, self.name, round, self.f,
                           members=tuple(sorted({own.member, *received})),
                           missing=tuple(sorted(missing)))
        if own_w != own.weight:
            result.fallbacks.append(Note("bad_own_weight", f"our own weight {own.weight!r} is not a "
                                         "positive number: counted as 1"))
        if ref is None and reference is not None:
            result.fallbacks.append(Note("bad_reference", "the reference was non-finite or of the wrong "
                                         "size: distances measured from our own share"))
        shares = self._admit(own_c, received, result)
        center = ref if ref is not None else own_c.vector
        if self.params["distance"] != "off":
            if ref is None:
                result.fallbacks.append(Note("no_reference", "no previous aggregate: distances "
                                             "measured from our own released share"))
            shares = bound_shares(shares, center, own_is_center=ref is None, f=self.f,
                                  action=self.params["distance"],
                                  factor=self.params["distance_factor"],
                                  dp_clip=self.params["dp_clip"],
                                  dp_noise_multiplier=self.params["dp_noise_multiplier"],
                                  tail=self.params["distance_tail"], result=result)
        need = self.needs(self.f)
        ctx = Round(round, own_c, center, ref is not None, result)
        if len(shares) < need:
            result.fallbacks.append(Note("too_few_shares", (
                f"{len(shares)} share(s), {self.name} with f = {self.f} needs {need} "
                f"({self.assumption}): kept our own released share")))
            vec = own_c.vector
            result.used, result.weights = (own_c.member,), {own_c.member: 1.0}
        else:
            vec = self.combine(shares, ctx)
        vec32 = vec.float()
        if not bool(torch.isfinite(vec32).all()):
            keep = ref if ref is not None and bool(torch.isfinite(ref.float()).all()) else own_c.vector
            what = "the reference (our previous aggregate)" if keep is ref else "our own released share"
            result.fallbacks.append(Note("non_finite_result", f"the {self.name} was not finite in "
                                         f"float32: kept {what}"))
            vec32 = keep.float()
            if not bool(torch.isfinite(vec32).all()):
                raise LocalError(f"round {round + 1}: our own released share is not finite: a local bug")
        result.vector = vec32.reshape(own.vector.shape)
        self.rounds_aggregated += 1
        self.last_round = round
        return result

    def _admit(self, own: Candidate, received: Mapping[str, WeightedShare],
               result: Aggregate) -> list[Candidate]:
        shares = [own]
        for member in sorted(received):
            if member == own.member:
                continue
            s = received[member]
            vec = s.vector.detach().flatten()
            w = s.weight
            if vec.shape != own.vector.shape:
                result.excluded[member] = Note("wrong_size", f"{vec.numel()} values, expected "
                                               f"{own.vector.numel()}")
            elif not (isinstance(w, int | float) and math.isfinite(w) and w > 0):
                result.excluded[member] = Note("bad_weight", f"weight {w!r} is not a positive number")
            elif not bool(torch.isfinite(vec).all()):
                result.excluded[member] = Note("non_finite", "the share has non-finite values")
            else:
                shares.append(Candidate(member, float(w), vec.double()))
        return sorted(shares, key=lambda c: c.member)

    def weights(self, shares: list[Candidate], result: Aggregate) -> list[float]:
        """Fractions (summing to 1) for these shares under `weighting`: equal, or the
        capped declared weights (caps are recorded). The weighting is recorded."""
        result.weighting = self.params["weighting"]
        if result.weighting == "equal":
            return [1.0 / len(shares)] * len(shares)
        fractions, notes, infeasible = cap_weights(
            [c.weight for c in shares], self.params["max_weight_fraction"], self.params["max_weight"])
        for c, note in zip(shares, notes, strict=True):
            if note is not None:
                result.weight_capped[c.member] = Note("weight_capped", note)
        if infeasible is not None:
            result.fallbacks.append(Note("weight_cap_infeasible", infeasible))
        return fractions

    @abstractmethod
    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        """The rule: float64 vector from at least `needs(f)` admitted shares.
        Sets `ctx.result.used` / `.weights` and records what it did to whom."""


def weighted_sum(shares: list[Candidate], fractions: list[float]) -> torch.Tensor:
    out = torch.zeros_like(shares[0].vector)
    for c, p in zip(shares, fractions, strict=True):
        out += c.vector * p
    return out


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

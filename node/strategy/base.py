"""The aggregation seam: one `Strategy` interface, one `Aggregate` result.

A strategy is pure: shares in, a vector and its diagnostics out, no I/O. Every
rule runs the same pipeline (`Strategy.aggregate`), so the parts that make a
share unable to hurt are shared, not re-implemented per rule:

1. admit: a share of the wrong size, with a non-finite value or a weight that is
   not a positive finite number is excluded (the transport's checks make these
   rare; a strategy does not rely on them);
2. far (on by default for every rule but the plain `mean`, `far_factor`; 0: off): a share
   whose distance from the coordinate-wise median of the round's shares is above
   `far_factor` x the median of those distances is left out (reason `far_outlier`),
   whatever f is; each share left out so is counted against f, so the rule then
   needs, and removes, only what is left of f (`drop_far` in
   `node/strategy/distance.py`, which says why an attacker cannot set the scale);
3. bound (optional per rule, on for `norm_bounded_mean`): a share further from
   `reference` than a bound is clipped to it or rejected (`node/strategy/distance.py`);
4. combine: the rule itself. Where a rule weighs shares at all, `weighting`
   says how: "declared" (each member's declared weight, capped by water-filling,
   `node/strategy/weights.py`) or "equal" (every admitted share counts once, so a
   declared weight buys nothing). Only the plain `mean` defaults to "declared"
   (honest FedAvg is unchanged); every robust rule defaults to "equal", because
   under "declared" f hostile members each at the cap c hold f x c of the
   weight (f = 2 at c = 0.25: half) whatever their data. The weighting applied
   is recorded in the round's diagnostics;
5. too few shares: below the count the rule needs for its `f`, the result is the
   node's own released share (recorded as a fallback), unless the rule has a way
   that still holds f (multi-Krum: the trimmed mean at f, from 2f + 1 shares);
6. server optimizer (optional, `server_opt`, off by default): the rule's result
   minus `reference` is a pseudo-gradient Δ, and the node takes a step on it with
   momentum (FedAvgM) or an adaptive rule (FedAdam / FedYogi), Reddi et al. 2021,
   "Adaptive Federated Optimization", in serverless form: each node keeps its own
   optimizer state, and members that combined the same shares from the same
   reference compute the same vector (`ServerOptimizer`);
7. never non-finite: a non-finite result is replaced by `reference` (or the own
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
from typing import Any, ClassVar

import torch

from gossip.errors import LocalError
from node.strategy.distance import DISTANCE_ACTIONS, bound_shares, drop_far
from node.strategy.server_opt import ServerOptimizer
from node.strategy.types import Aggregate, Candidate, Note, Round, StrategyError, WeightedShare, _int, _num
from node.strategy.weights import cap_weights

# The far filter's default factor: a share further from the coordinate-wise median than
# this x the median share's distance is left out before the rule, whatever f is. An
# attack far beyond it (1e30 values: ~1e31 x; a model scaled by -1000: thousands x) cannot
# be averaged in even by more than f members. Honest shares are not near it, but not as
# far below as one would think: on clean runs (8 members, 30 rounds, seeds 0-2, the
# default rules) the furthest honest share was at most 7.5 x (`default`) and 18 x
# (`digits`) the median distance at dirichlet 0.5, 115 x and 79 x at dirichlet 0.1, 32 x
# once even with iid rows (late rounds: most updates tiny, one member's not). Three orders
# of magnitude leaves a margin of about 9 over the worst of these; what lies between is
# the rule's f to handle (sign flips, noise).
FAR_FACTOR = 1000.0

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
    "far_factor": FAR_FACTOR,     # far filter (step 2); 0 (or None): off
    "weighting": "equal",         # "declared" (capped declared weights) or "equal"
    # Server optimizer on Δ = aggregate - reference (step 5 above; `ServerOptimizer`):
    "server_opt": "none",         # "none", "momentum" (FedAvgM), "adam" (FedAdam), "yogi"
    "server_lr": None,            # η; None: 1.0 for momentum, 0.01 for adam / yogi
    "server_momentum": 0.9,       # β (momentum) or β1 (adam / yogi)
    "server_beta2": 0.99,         # β2 (adam / yogi)
    "server_tau": 1e-3,           # τ, the adaptivity floor (adam / yogi)
    "server_lr_decay": 1.0,       # d in (0, 1]: round r (0-based) steps with η d^r
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
        self.server = ServerOptimizer.from_params(self.name, self.params)

    # -- configuration ---------------------------------------------------------

    @property
    def f(self) -> int:
        return int(self.params["f"])

    @property
    def reads_declared_weights(self) -> bool:
        """Whether a share's declared weight can change the result (`weighting =
        "declared"`); under "equal" it is only checked to be a positive number."""
        return self.uses_weights and self.params["weighting"] == "declared"

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
        ff = p["far_factor"]  # 0 or None: off (0 can be pinned in a TOML file, None not)
        if ff is not None and not (type(ff) in (int, float) and ff == 0):
            # below 2 an honest share at twice the typical distance would be dropped
            _num(self.name, "far_factor", ff, lo=2)
        ServerOptimizer.from_params(self.name, p)  # raises on a bad server_* parameter

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
        d = {"version": self.STATE_VERSION, "rule": self.name,
             "params": {k: v for k, v in sorted(self.params.items())},
             "rounds_aggregated": self.rounds_aggregated, "last_round": self.last_round}
        if self.server is not None:
            d["server"] = self.server.state_dict()
        return d

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
        if self.server is not None and d.get("server") is not None:
            self.server.load_state_dict(d["server"])  # checked before anything is restored
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
        f = self.f
        if self.params["far_factor"]:
            shares, far = drop_far(shares, self.params["far_factor"], result)
            f = max(0, f - far)
        result.f_used = f
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
        need = self.needs(f)
        ctx = Round(round, own_c, center, ref is not None, result, f)
        few = self.combine_few(shares, ctx) if len(shares) < need else None
        if few is not None:
            vec = few
        elif len(shares) < need:
            result.fallbacks.append(Note("too_few_shares", (
                f"{len(shares)} share(s), {self.name} with f = {f} needs {need} "
                f"({self.assumption}): kept our own released share")))
            vec = own_c.vector
            result.used, result.weights = (own_c.member,), {own_c.member: 1.0}
        else:
            vec = self.combine(shares, ctx)
        if self.server is not None:
            if ref is None:
                result.fallbacks.append(Note("server_opt_skipped", (
                    f"no previous aggregate to take a {self.server.opt} step from: "
                    "kept the rule's result, the optimizer state unchanged")))
            else:
                vec = self.server.step(round, ref, vec, result)
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

    def combine_few(self, shares: list[Candidate], ctx: Round) -> torch.Tensor | None:
        """Fewer shares than `needs(ctx.f)` (members missing): a rule may combine them
        another way that still holds f, recording it; None keeps our own released share
        (`too_few_shares`)."""
        return None

    @abstractmethod
    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        """The rule: float64 vector from at least `needs(f)` admitted shares.
        Sets `ctx.result.used` / `.weights` and records what it did to whom."""



def weighted_sum(shares: list[Candidate], fractions: list[float]) -> torch.Tensor:
    out = torch.zeros_like(shares[0].vector)
    for c, p in zip(shares, fractions, strict=True):
        out += c.vector * p
    return out


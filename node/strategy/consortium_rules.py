"""The consortium's [rules]: how every member judges the others' shares.

What a member relies on to judge a share — the aggregation rule and its `f`, the
weight caps, the privacy mode and clip norm — must be the same at every member,
or one member's "robust" is another's "owned". So they live in the consortium
file's `[rules]` table, which is part of the consortium id: members that judge
differently are different consortia and refuse each other's shares.

    [rules]
    aggregation = "trimmed_mean"   # node.strategy: mean, median, trimmed_mean, krum, ...
    f = 1                          # hostile members the rule must survive
    max_weight_fraction = 0.25     # no member above this share of the total weight
    max_weight = 1e6               # optional absolute cap on a declared weight
    privacy_mode = "update"        # optional: every member's privacy.mode must equal it
    clip = 0.1                     # optional: every member's privacy.clip must equal it
    noise_multiplier = 1.0         # optional, update-level DP: no member's sigma above it;
                                   # with clip it sets the DP distance bound (below)
    compression = "int8"           # optional: none (default), fp16, int8, topk:FRACTION
                                   # (gossip/compress.py; docs/reference/compression.md)
    echo = true                    # optional: the digest echo (below); missing: off
    secure = true                  # optional: secure aggregation (below); missing: off
    secure_threshold = 1           # with secure: t, the colluding members tolerated
    secure_select = "multi-krum"   # with secure: "multi-krum" (distances), "norm", "sum", "range"
    secure_rows = 1437             # with secure and DP on the sum: the rows of all members,
    secure_epsilon = 3.0           #   the budget and delta every member plans from
    secure_delta = 1e-5            #   (node/privacy/secure.py; secure_select "range" or "sum")
    topology = "random-out:8"      # optional: full (default), ring, k-regular:K,
                                   # random-out:S, exponential (gossip/topology.py;
                                   # docs/reference/topology.md); not with echo = true
    [rules.params]                 # optional rule parameters (m, tau, distance, ...)

Defaults, for a file without a key (`aggregation = "auto"`, what `flnode consortium
build` and the simulators resolve and write): `multi_krum_staged` (multi-Krum
that leaves out magnitude outliers first and the rest by update direction,
node/strategy/rules.py) with f = max(1, n // 4) (DEFAULT_F_FRACTION: 2 from eight
members) behind the far filter (far_factor, node/strategy/base.py: a share 1000 x
further than the median share from the round's coordinate-wise median never enters,
whatever f is) and a FedAdam server step (server_opt = "adam",
server_lr = 0.03, server_momentum = 0.5 where the rules pin privacy_mode = "off" and
0.9 otherwise: the default recipe against skewed members, see AUTO_PARAMS) from
five members up (it needs 2f + 3),
`trimmed_mean` with f = 1, the far filter and the same FedAdam step for three or
four, the weighted
`mean` (f = 0, no server optimizer) for two
(two cannot outvote one); under a sparse `topology`, whatever the size,
`centered_clipping` as one ClippedGossip step with the same FedAdam step after it
(SPARSE_RULE, SPARSE_AUTO_PARAMS); and a weight cap of max(2/n, 0.25) of the total (the
robust rules count every share once anyway; the plain mean uses the cap). Why:
`scripts/bench_robust.py` (docs/results/robustness.md): of the rules that held
every model-level attack at f = 1 within 0.02 of the clean plain mean on both
tables, multi_krum_staged lost least on clean data (multi_krum by distance lost
more on clean `digits` and 0.02 under label-flip); trimmed_mean held on `default`
but lost up to 0.10 on `digits`.
With `privacy_mode = "update"`, `clip` and `noise_multiplier` agreed, every member
judges a share by its distance from its own previous aggregate against the bound
C + sigma C (sqrt(d) + t) that an honest share exceeds with probability
`distance_tail` (node/strategy/distance.py); a share beyond it is clipped back onto
it (`distance = "clip"` unless [rules.params] says otherwise), whatever the rule.
A consortium file with no `[rules]` at all (built before they existed) falls back
to each node's own `gossip.aggregation`, with a warning: per node, not agreed.

`echo = true`: every round has the digest echo after the share phase
(gossip/protocol/echo.py): members sign the digests of the shares they hold and combine
only the shares their echoes agree on, so a member that sends different shares to
different members is left out by every honest member. A file without the key (one
written before it existed) keeps today's rounds without the echo, and its id; what
`flnode consortium build` and the simulators write says `echo = true` (ECHO_DEFAULT).

`secure = true` (issue 22): no member sees another's contribution; each Shamir-shares it
among all members with threshold `secure_threshold` = t and the members open only the
selected members' sum (node/runtime/secure_round.py, docs/privacy-secure.md). t must
satisfy n >= 3t + 1 (Reed-Solomon then corrects wrong pieces and names their senders);
`secure_select = "multi-krum"` opens the pairwise squared distances and runs multi-Krum at
f = t, which needs n >= 2t + 3 members; "norm" opens the squared norms only (a norm bound,
no selection: reveals less). Left out, t is the largest with n >= 3t + 1 and the selection
multi-Krum where n >= 2t + 3, else "norm" (written out: pinned). A file without
`secure` keeps today's plain rounds and its id; `secure_threshold` / `secure_select`
without `secure = true` are refused (a rule that would silently not apply).

Pinned, not left to the code: `flnode consortium build` and the simulators write
every parameter the rule takes into the file (`pin_rules`: f, the cap, and under
`[rules.params]` each default of this flnode version made explicit: weighting,
distance, outlier_factor, server_opt, ...). A later version that changes a default
then cannot make its members judge shares differently from members still running
this one. A node that loads a table leaving some to its own defaults says which,
with the values it used, at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gossip.compress import NO_COMPRESSION, Codec, parse_codec
from gossip.errors import LocalError
from gossip.membership import Consortium
from gossip.topology import FULL, TopologySpec, neighbourhood, parse_topology
from node.secagg.shamir import MAX_SECURE_MEMBERS
from node.strategy import Strategy, make_strategy
from node.strategy.registry import canonical

DEFAULT_RULE = "auto"
# The largest secure_threshold a [rules] table may give: n >= 3t + 1 and the secure
# core's member bound (node/secagg/shamir.py MAX_MEMBERS) keep t far below it anyway;
# this only bounds what a hand-written file can make us compute before that check.
SECURE_MAX_THRESHOLD = 1000
SECURE_SELECTS = ("multi-krum", "norm")
log = logging.getLogger("flnode.node")


# What "auto" adds to the rule it resolves to: FedAdam (server_lr 0.03) on top of
# multi_krum_staged (five members up) and of trimmed_mean (three or four), chosen by
# scripts/bench_skew.py on the members' validation rows (--nodes 8, 4 and 3) and confirmed
# on churn and against every attack of scripts/bench_robust.py (docs/results/skew.md,
# "The default recipe without DP"). A node that wants control variates sets server_opt = "none".
AUTO_PARAMS: dict[str, dict[str, Any]] = {
    "multi_krum_staged": {"server_opt": "adam", "server_lr": 0.03},
    "trimmed_mean": {"server_opt": "adam", "server_lr": 0.03},
    # the rule on neighbours (SPARSE_RULE): the same step after the ClippedGossip one
    "centered_clipping": {"server_opt": "adam", "server_lr": 0.03},
}
# ... and where the consortium pins privacy_mode = "off": FedAdam's β1 (server_momentum)
# 0.5 instead of 0.9. Without DP a shorter memory follows 30 rounds better (validation,
# 10 seeds, 8 members: 0.9572 against 0.9530; 4 members 0.9524 against 0.9512); under
# record DP the longer memory averages the members' noise over more rounds (0.886
# against 0.893), so every other privacy mode, and a [rules] that does not pin one,
# keeps 0.9.
AUTO_PARAMS_NO_DP: dict[str, Any] = {"server_momentum": 0.5}


# The default rule on neighbours under a sparse topology (issue 24): where the [rules]
# name no aggregation and the topology is not full, "auto" is centered_clipping as one
# ClippedGossip step (He, Karimireddy & Jaggi 2022): around our own released share (so
# DP post-processing holds), one iteration, each neighbour's difference clipped at the
# lower median distance of the round's shares (node/strategy/rules.py TAU_MEDIAN: an honest
# distance while at most half of the shares combined are hostile, whatever f), and never
# more than tau_cap = 4 x our own update's norm: a random draw sometimes gives a member
# more hostile in-peers than honest ones (32 members, 4 attackers, random-out:5: one
# member of 28 in 20 rounds drew two attackers and one honest in-peer, took the attackers'
# radius, and FedAdam's second moment then froze it at ROC-AUC 0.04); with the cap the
# scale attack left every honest member at 0.961-0.962 (clean 0.962). Cap 2 did as well
# against it but doubled the clean consensus distance (0.049 against 0.025).
# Why not multi-Krum there: a member combines its few in-peers (about S + 1 under
# random-out:S) and the number of attackers among them varies round to round; clipping
# bounds what each can do without counting them. FedAdam (AUTO_PARAMS) follows it as on
# the full mesh: without it a ring of 8 on `default` (dirichlet 0.5, 8 rounds) ended at
# 0.9487 with consensus distance 0.097 of the model, with it 0.9612 and 0.044 (full mesh
# 0.9610). Measured: docs/results/scale.md.
SPARSE_RULE = "centered_clipping"
SPARSE_AUTO_PARAMS: dict[str, Any] = {"center": "own", "iterations": 1, "tau": "median",
                                      "tau_cap": 4.0}


def auto_params(aggregation: str, resolved: str, params: dict[str, Any],
                privacy_mode: str | None = None, topology: str = FULL) -> dict[str, Any]:
    """`params` with the default recipe's server optimizer added where the rule was left
    to "auto" and no server_opt is given (a rule asked for by name gets none), with
    AUTO_PARAMS_NO_DP's β1 where `privacy_mode` is pinned to "off"; under a sparse
    `topology` the ClippedGossip step's parameters too (SPARSE_AUTO_PARAMS). What `params`
    says wins."""
    params = sparse_params(aggregation, resolved, params, topology)
    if aggregation != DEFAULT_RULE or "server_opt" in params or resolved not in AUTO_PARAMS:
        return params
    no_dp = AUTO_PARAMS_NO_DP if privacy_mode == "off" else {}
    return {**AUTO_PARAMS[resolved], **no_dp, **params}


# Under DP, FedAdam at β1 0.9 (the recipe above) needs rounds to get going: measured on
# the demo scenario (4 banks, record DP ε 3, flnode simulate, seed 0), ROC-AUC after 5 / 10
# / 15 planned rounds 0.564 / 0.945 / 0.958; with β1 0.5, 0.956 after 5.
FEW_ROUNDS_UNDER_DP = 15


def few_rounds_warning(params: dict[str, Any], rounds: int, privacy_mode: str) -> str | None:
    """Why a DP run of `rounds` rounds may end near its starting model (None: it won't)."""
    if (privacy_mode == "off" or rounds >= FEW_ROUNDS_UNDER_DP
            or params.get("server_opt") != "adam" or params.get("server_momentum", 0.9) < 0.9):
        return None
    return (f"training.rounds = {rounds} under {privacy_mode}-level DP with FedAdam at β1 "
            f"{params.get('server_momentum', 0.9):g} (the default recipe's, tuned for 30 "
            f"rounds): fewer than {FEW_ROUNDS_UNDER_DP} rounds may leave the model near its "
            "start (the 4-bank demo at ε 3: ROC-AUC 0.56 after 5 rounds, 0.95 after 10, "
            "0.96 after 15). Plan more rounds, or agree server_momentum = 0.5 in the "
            "consortium's [rules.params] (0.96 after 5)")


def _sparse(topology: str | TopologySpec | None) -> bool:
    if topology is None:
        return False
    spec = topology if isinstance(topology, TopologySpec) else parse_topology(topology)
    return not spec.full


def sparse_params(aggregation: str, resolved: str, params: dict[str, Any],
                  topology: str | TopologySpec | None) -> dict[str, Any]:
    """`params` with SPARSE_AUTO_PARAMS under them where "auto" resolved to the rule on
    neighbours (a sparse topology); otherwise `params` as they are."""
    if aggregation == DEFAULT_RULE and resolved == SPARSE_RULE and _sparse(topology):
        return {**SPARSE_AUTO_PARAMS, **params}
    return params


def resolve_rule(name: str, members: int, topology: str | TopologySpec | None = None) -> str:
    """"auto": the default rule for a consortium of `members` (module docstring); under a
    sparse `topology` the rule on neighbours, SPARSE_RULE, whatever the size."""
    if name != "auto":
        return name
    if _sparse(topology):
        return SPARSE_RULE
    return "multi_krum_staged" if members >= 5 else "trimmed_mean" if members >= 3 else "mean"


class ConsortiumRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    aggregation: str = DEFAULT_RULE
    f: int | None = Field(default=None, ge=0, le=10_000)
    max_weight_fraction: float | None = Field(default=None, gt=0, le=1)
    max_weight: float | None = Field(default=None, gt=0)
    privacy_mode: Literal["off", "update", "record"] | None = None
    clip: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    echo: bool | None = None  # None (the key missing): no echo phase, as before the key
    # Secure aggregation (issue 22; `secure_rule`): None (the keys missing) = plain rounds.
    secure: bool | None = None
    secure_threshold: int | None = Field(default=None, ge=1, le=SECURE_MAX_THRESHOLD)
    secure_select: Literal["multi-krum", "norm", "sum", "range"] | None = None
    # Distributed DP on the secure sum (issue 22, node/privacy/secure.py secure_plan): the
    # consortium's total rows, epsilon and delta, pinned so every member derives the same
    # plan (sigma sizes every member's noise share). Missing: no DP on the sum, same id.
    secure_rows: int | None = Field(default=None, ge=1)
    secure_epsilon: float | None = Field(default=None, gt=0)
    secure_delta: float | None = Field(default=None, gt=0, lt=1)
    params: dict[str, Any] = Field(default_factory=dict)
    # How shares are compressed on the wire (gossip/compress.py): none, fp16, int8 or
    # topk:FRACTION. A file without the key means "none" and keeps its id.
    compression: str = NO_COMPRESSION.name

    # Whom each member sends its share to and waits for (gossip/topology.py): full, ring,
    # k-regular:K, random-out:S or exponential. A file without the key means "full" and
    # keeps its id.
    topology: str = FULL

    @field_validator("compression", "topology")
    @classmethod
    def _spec(cls, value: str, info: ValidationInfo) -> str:
        """The codec or topology, parsed and written in its canonical name."""
        parse = parse_codec if info.field_name == "compression" else parse_topology
        try:
            return parse(value).name
        except LocalError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _echo_needs_full_mesh(self) -> ConsortiumRules:
        # The digest echo compares what every member holds against everyone's echoes; a
        # member of a sparse topology holds only its in-peers' shares.
        if self.echo and self.topology != FULL:
            raise ValueError(f"echo = true needs topology = \"full\" (it is "
                             f"{self.topology!r}): drop echo, or the topology")
        # Secure aggregation deals pieces of every contribution to every member and opens
        # sums every member must decode alike: it needs the full mesh (issue 24's docs:
        # a sparse consortium's secure mode would run within groups, not built).
        if self.secure and self.topology != FULL:
            raise ValueError(f"secure = true needs topology = \"full\" (it is "
                             f"{self.topology!r}): drop secure, or the topology")
        return self


# The default f is a quarter of the consortium (rounded down, at least 1 from three
# members): f = max(1, floor(n / 4)), so 2 colluders at 8 members, 3 at 12. Every rule
# "auto" picks can hold it: multi_krum_staged needs n >= 2f + 3, which n / 2 + 3 <= n
# keeps from six members (five: f = 1, 5 >= 5); trimmed_mean at three or four needs
# 2f + 1 = 3. What it costs on clean data (multi-Krum leaves out f shares every round)
# and what it holds: docs/results/robustness.md (scripts/bench_robust.py --defaults).
DEFAULT_F_FRACTION = 4


def default_f(members: int, rule: str = DEFAULT_RULE) -> int:
    """f when the [rules] do not say: 0 for the plain mean (it survives nobody) and below
    three members (two cannot outvote one), else a quarter of the members, at least 1."""
    if rule != DEFAULT_RULE and canonical(rule) == "mean":
        return 0
    return max(1, members // DEFAULT_F_FRACTION) if members >= 3 else 0


# What the consortium files this flnode writes say about the digest echo: on (protection
# against split equivocation by default for new consortia; a file without the key: off).
ECHO_DEFAULT = True


def echo_rule(consortium: Consortium, source: str = "consortium file") -> bool:
    """Whether the consortium's rounds have the digest echo (its [rules] `echo`; off when
    the file has no [rules] or no key: the rounds it was built for)."""
    rules = parse_rules(consortium, source)
    return bool(rules is not None and rules.echo)


@dataclass(frozen=True)
class SecureRule:
    """The consortium's secure mode: t (coalitions of up to t members learn nothing but
    what is opened) and the selection ("multi-krum": distances opened, multi-Krum at
    f = t; "norm": squared norms only)."""

    threshold: int
    select: str

    @property
    def variant(self) -> str:
        """node/secagg/robust.py's name for the selection."""
        return {"multi-krum": "distances", "norm": "norm_only", "sum": "sum_only",
                "range": "range"}[self.select]


def default_secure_threshold(members: int) -> int:
    """The largest t with n >= 3t + 1 (at least 1): what `flnode consortium build --secure`
    and the simulators write when no threshold is given."""
    return max(1, (members - 1) // 3)


# A secure consortium has at least this many members: n >= 3t + 1 at the smallest t, 1.
MIN_SECURE_MEMBERS = 4


def default_secure_select(members: int, threshold: int) -> str:
    """multi-Krum (at f = t) where the consortium is large enough for it (n >= 2t + 3),
    else the norm bound alone: what is written when the [rules] do not say."""
    return "multi-krum" if members >= 2 * threshold + 3 else "norm"


def check_secure(rules: ConsortiumRules, members: int, source: str) -> SecureRule | None:
    """The secure mode a [rules] table asks for, checked against the member count; None
    for plain rounds. LocalError naming the key and the reason otherwise."""
    if not rules.secure:
        stray = [k for k in ("secure_threshold", "secure_select", *SECURE_DP_KEYS)
                 if getattr(rules, k) is not None]
        if stray:
            raise LocalError(f"{source}: rules.{stray[0]} is set but rules.secure is not true: "
                             "it would not apply (set secure = true, or remove it)")
        return None
    t = rules.secure_threshold if rules.secure_threshold is not None else \
        default_secure_threshold(members)
    select = rules.secure_select or default_secure_select(members, t)
    if members > MAX_SECURE_MEMBERS:  # the secure core's cap, named here rather than at round 1
        raise LocalError(f"{source}: rules.secure = true with {members} members: a secure round "
                         f"takes at most {MAX_SECURE_MEMBERS} (node/secagg/shamir.py "
                         "MAX_SECURE_MEMBERS: its work grows as n^2 d); drop secure or split the "
                         "consortium")
    if members < 3 * t + 1:
        # advice that can be followed: t = 1 is the smallest threshold (MIN_SECURE_MEMBERS)
        largest = (members - 1) // 3
        fix = (f"add members: at least {MIN_SECURE_MEMBERS} for t = 1, the smallest threshold "
               "(or drop secure)" if largest < 1 else
               f"lower the threshold to {largest} (the largest {members} members allow) or add "
               f"members (at least {3 * t + 1} for t = {t})")
        raise LocalError(f"{source}: rules.secure_threshold = {t} with {members} members: secure "
                         f"aggregation needs n >= 3t + 1 = {3 * t + 1} (to correct up to t wrong "
                         f"pieces and name their senders); {fix}")
    if select == "multi-krum" and members < 2 * t + 3:
        raise LocalError(f"{source}: rules.secure_select = \"multi-krum\" at f = t = {t} needs "
                         f"2f + 3 = {2 * t + 3} members, the consortium has {members}; use "
                         "secure_select = \"norm\"")
    dp = [getattr(rules, k) is None for k in SECURE_DP_KEYS]
    if any(dp) and not all(dp):
        missing = [k for k, absent in zip(SECURE_DP_KEYS, dp, strict=True) if absent]
        raise LocalError(f"{source}: rules.{missing[0]} is missing: DP on the secure sum needs "
                         f"all of {', '.join(SECURE_DP_KEYS)} (every member plans from them)")
    if select == "range" and any(dp):
        raise LocalError(f"{source}: rules.secure_select = \"range\" bounds each member at the "
                         f"DP plan's norm: it needs {', '.join(SECURE_DP_KEYS)}")
    if not any(dp) and select not in DP_SELECTS:
        raise LocalError(f"{source}: rules.secure_select = {select!r} with DP on the sum: it "
                         "opens per-member values charged at one member's noise share, not the "
                         "sum's (docs/privacy-secure.md), and at that noise multi-Krum selects by "
                         "size, not direction (docs/results/secure.md); use secure_select = "
                         "\"range\" or \"sum\"")
    return SecureRule(t, select)


# The selections a consortium with DP on the secure sum may pin: the ones charged at the
# sum's noise (docs/privacy-secure.md "Under DP"). "multi-krum" and "norm" open per-member
# values, charged at one member's share of the noise (privacy variants "distances",
# "norm_only"): at that cost multi-Krum was measured to select by a contribution's size, not
# its direction (docs/results/secure.md "Multi-Krum under DP"), so they are refused.
# scripts/bench_secure.py widens this tuple in its own process for those measurement rows.
DP_SELECTS = ("sum", "range")

# The [rules] keys of distributed DP on the secure sum: all or none.
SECURE_DP_KEYS = ("secure_rows", "secure_epsilon", "secure_delta")


def secure_rule(consortium: Consortium, source: str = "consortium file") -> SecureRule | None:
    """The consortium's secure mode (None: plain rounds: no [rules], or no `secure` key)."""
    rules = parse_rules(consortium, source)
    return None if rules is None else check_secure(rules, len(consortium.members), source)


def default_cap(members: int) -> float | None:
    return None if members <= 2 else min(1.0, max(2 / members, 0.25))


def parse_rules(consortium: Consortium, source: str = "consortium file") -> ConsortiumRules | None:
    if not consortium.rules:
        return None
    return validate_rules(dict(consortium.rules), source)


def validate_rules(table: dict[str, Any], source: str) -> ConsortiumRules:
    """A [rules] table, checked; an error names the key."""
    try:
        return ConsortiumRules.model_validate(table)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(table)"
        raise LocalError(f"{source}: rules.{key}: {err['msg']}") from None


def agreed_codec(consortium: Consortium, source: str = "consortium file") -> Codec:
    """The compression every member's shares use: the [rules]' `compression`, "none"
    without one (or without [rules])."""
    rules = parse_rules(consortium, source)
    return parse_codec(rules.compression if rules is not None else NO_COMPRESSION.name,
                       f"{source}: rules.compression")


def agreed_topology(consortium: Consortium, source: str = "consortium file") -> TopologySpec:
    """Whom each member sends to and waits for: the [rules]' `topology`, "full" without
    one (or without [rules])."""
    rules = parse_rules(consortium, source)
    return parse_topology(rules.topology if rules is not None else FULL,
                          f"{source}: rules.topology")


@dataclass(frozen=True)
class AgreedStrategy:
    strategy: Strategy
    params: dict[str, Any]  # what the strategy was built with (for summary.json)
    agreed: bool  # from the consortium file (True) or this node's own config (False)


def build_strategy(consortium: Consortium, node_rule: str | None, privacy_mode: str,
                   clip: float, source: str = "consortium file",
                   noise_multiplier: float | None = None) -> AgreedStrategy:
    """The strategy every member applies: the consortium's [rules]; a node's own
    `gossip.aggregation` only when the file has none, and never against it.
    `noise_multiplier` is this node's own sigma in update mode (None: not known here)."""
    n = len(consortium.members)
    rules = parse_rules(consortium, source)
    if rules is None:
        name = node_rule or "mean"
        params: dict[str, Any] = {"f": default_f(n, name)}
        return AgreedStrategy(make_strategy(name, members=n, **params), {"rule": name, **params},
                              False)
    aggregation = resolve_rule(rules.aggregation, n, rules.topology)
    if node_rule is not None and node_rule != aggregation:
        raise LocalError(f"gossip.aggregation = {node_rule!r} but the consortium's rules say "
                         f"{aggregation!r}: every member must judge shares the same way "
                         "(remove gossip.aggregation from the node config)")
    if rules.privacy_mode is not None and rules.privacy_mode != privacy_mode:
        raise LocalError(f"privacy.mode = {privacy_mode!r} but the consortium's rules say "
                         f"{rules.privacy_mode!r}")
    if rules.clip is not None and privacy_mode != "off" and rules.clip != clip:
        raise LocalError(f"privacy.clip = {clip:g} but the consortium's rules say {rules.clip:g}")
    if (rules.noise_multiplier is not None and noise_multiplier is not None
            and noise_multiplier > rules.noise_multiplier):
        raise LocalError(
            f"privacy: this node's noise multiplier {noise_multiplier:g} is above the "
            f"consortium's rules.noise_multiplier = {rules.noise_multiplier:g}: the others "
            "would clip its shares as too far (lower privacy.sigma, or raise "
            "privacy.epsilon)")
    # "auto" in a hand-written [rules] (or no aggregation key) means the same default
    # recipe `flnode consortium build` would have written out (the warning below says so)
    params = auto_params(rules.aggregation, aggregation, _params(rules, n, aggregation, source),
                         rules.privacy_mode, rules.topology)
    try:
        strategy = make_strategy(aggregation, members=n, **params)
    except LocalError as exc:
        raise LocalError(f"{source}: [rules]: {exc}") from None
    left = unpinned(rules, strategy)
    if left:
        log.warning("%s: [rules] leaves %s to this flnode version's defaults (%s): members "
                    "running another version could judge shares differently; a file written "
                    "by `flnode consortium build` pins every one", source, ", ".join(left),
                    ", ".join(f"{k} = {strategy.params[k]!r}" for k in left))
    return AgreedStrategy(strategy, {"rule": aggregation, **params}, True)


def _params(rules: ConsortiumRules, n: int, aggregation: str, source: str) -> dict[str, Any]:
    """The parameters a [rules] table gives the strategy (defaults for f and the cap; the
    agreed DP noise bound as dp_clip / dp_noise_multiplier)."""
    dp: dict[str, Any] = {}
    if rules.noise_multiplier is not None:
        if rules.privacy_mode != "update" or rules.clip is None:
            raise LocalError(f"{source}: rules.noise_multiplier bounds update-level DP noise: it "
                             "needs rules.privacy_mode = \"update\" and rules.clip")
        dp = {"dp_clip": rules.clip, "dp_noise_multiplier": rules.noise_multiplier}
        if "distance" not in rules.params:
            dp["distance"] = "clip"
    return {"f": rules.f if rules.f is not None else default_f(n, aggregation),
            "max_weight_fraction": (rules.max_weight_fraction
                                    if rules.max_weight_fraction is not None
                                    else default_cap(n)),
            "max_weight": rules.max_weight, **dp, **rules.params}


# Parameters a [rules] table sets at its top level (f, caps) or through clip and
# noise_multiplier (the DP bound), not under [rules.params].
TOP_LEVEL = ("f", "max_weight_fraction", "max_weight", "dp_clip", "dp_noise_multiplier")


def unpinned(rules: ConsortiumRules, strategy: Strategy) -> list[str]:
    """The strategy's parameters that the [rules] table does not fix, so this flnode
    version's defaults decide them (None-valued ones are derived, e.g. multi-Krum's m =
    n - f, and TOML cannot hold None: not counted)."""
    fixed = set(rules.params) | {k for k in ("f", "max_weight_fraction", "max_weight")
                                 if getattr(rules, k) is not None}
    if rules.noise_multiplier is not None:
        fixed |= {"dp_clip", "dp_noise_multiplier", "distance"}
    return sorted(k for k, v in strategy.params.items()
                  if k not in fixed and v is not None and k not in ("dp_clip",
                                                                    "dp_noise_multiplier"))


def pin_rules(table: dict[str, Any], members: int,
              source: str = "--aggregation") -> dict[str, Any]:
    """`table` with every parameter the strategy takes written out (this version's
    defaults made explicit), so members running another flnode version still apply the
    same rule: what `flnode consortium build` and the simulators write. With a sparse
    topology the defaults are sized for the shares a member combines in a round
    (gossip/topology.py `neighbourhood`), not for the whole consortium."""
    rules = validate_rules(table, source)
    secure = check_secure(rules, members, source)
    members = neighbourhood(rules.topology, members)
    aggregation = resolve_rule(rules.aggregation, members, rules.topology)
    try:
        strategy = make_strategy(aggregation, members=members,
                                 **sparse_params(rules.aggregation, aggregation,
                                                 _params(rules, members, aggregation, source),
                                                 rules.topology))
    except LocalError as exc:
        raise LocalError(f"{source}: [rules]: {exc}") from None
    out = {k: v for k, v in table.items() if k != "params"}
    out["aggregation"] = aggregation
    for key in ("f", "max_weight_fraction", "max_weight"):
        if strategy.params[key] is not None:
            out[key] = strategy.params[key]
    params = {k: v for k, v in strategy.params.items()
              if k not in TOP_LEVEL and v is not None}
    if params:
        out["params"] = dict(sorted(params.items()))
    if secure is not None:  # pinned: t and the selection written out
        out["secure_threshold"], out["secure_select"] = secure.threshold, secure.select
    return out


def rules_table(members: int, aggregation: str = DEFAULT_RULE, f: int | None = None,
                max_weight_fraction: float | None = None, privacy_mode: str | None = None,
                clip: float | None = None, noise_multiplier: float | None = None,
                compression: str | None = None, echo: bool | None = ECHO_DEFAULT,
                secure: bool = False, secure_threshold: int | None = None,
                secure_select: str | None = None, secure_dp: dict[str, Any] | None = None,
                topology: str | None = None,
                **params: Any) -> dict[str, Any]:
    """A [rules] table for `flnode consortium build` and the simulators: "auto" is
    resolved for this many members and written out; None leaves a key out, so the
    documented default applies. A topology other than full writes no echo (the echo
    needs the full mesh)."""
    sparse = topology is not None and not parse_topology(topology, "--topology").full
    everyone = members  # the secure mode is full mesh: its t is sized on every member
    if sparse:
        assert topology is not None
        echo, members = None, neighbourhood(topology, members)
    table: dict[str, Any] = {"aggregation": resolve_rule(aggregation, members, topology)}
    params = auto_params(aggregation, table["aggregation"], params, privacy_mode,
                         topology or FULL)  # the recipe
    for key, value in (("f", f), ("max_weight_fraction", max_weight_fraction),
                       ("privacy_mode", privacy_mode), ("clip", clip),
                       ("noise_multiplier", noise_multiplier), ("echo", echo)):
        if value is not None:
            table[key] = value
    if compression is not None and parse_codec(compression, "--compression").compressed:
        table["compression"] = parse_codec(compression).name  # "none": no key, the same id
    if secure:  # no key without it: plain rounds keep their consortium id
        table["secure"] = True
        table["secure_threshold"] = (secure_threshold if secure_threshold is not None
                                     else default_secure_threshold(everyone))
        # DP on the sum: the one-bit range check (issue 22) for new builds; "sum" opens nothing
        table["secure_select"] = secure_select or ("range" if secure_dp else default_secure_select(
            everyone, table["secure_threshold"]))
        table.update(secure_dp or {})  # secure_rows, secure_epsilon, secure_delta
    if sparse:
        table["topology"] = parse_topology(topology).name  # "full": no key, the same id
    if params:
        table["params"] = params
    return table

"""A node's plan and charges for secure rounds (issue 22, distributed DP-SGD): what the
runtime calls. Pure functions plus one ledger append; nothing here trains or sends.

- `secure_plan(...)`: from what the node knows (the consortium's rows, the budget epsilon
  at delta, members n, coalition t, the model's size) the noise multiplier sigma, the
  sample rate q, the number of steps T (one secure round each) and the learning rate,
  chosen as node/privacy/recipe.py chooses a member's local DP-SGD recipe: the smallest
  expected batch whose noise-to-signal per step sigma / (q rows) is at most NOISE_TARGET
  (else the full batch), sigma calibrated for it by the ledger's own accountant, the
  learning rate scaled linearly with the batch. Every input must be the same at every
  member (sigma sizes every member's noise share; q and T are the consortium's).
- `may_open_round(...)`: whether a round with m contributors may open, with the named
  reason when not.
- `charge_secure_round(ledger, plan, ...)`: the round's "secure" record
  (node/privacy/secure_record.py), checked against the budget and fsync'd; the caller
  sends its first piece only after it returns.

What a round reveals, and so what it is charged (docs/privacy-secure.md): variant
"sum_only" opens the sum alone (reveal "sum": the noise of the m - t honest contributors);
"distances" and "norm_only" open a function of each member's noised contribution (reveal
"per_member": one member's own noise share, variance 1/(n - t) of the sum's). "range" opens
the sum and one bit per member (its range check, node/secagg/range_check.py): the bit is
"in range" for every honest member except with probability RANGE_FAILURE per round, so it
is charged as "sum" at a smaller delta: `accounting_delta` leaves (1 + e^epsilon) x steps x
n x RANGE_FAILURE of the plan's delta for it (docs/privacy-secure.md "The range check").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from gossip.errors import LocalError
from node.privacy import secure_record
from node.privacy.accountant import LedgerRecord, epsilon_of
from node.privacy.calibrate import bisect_sigma
from node.privacy.distributed import (
    BETA,
    DistributedDPError,
    SumMechanism,
    choose_granularity,
    coordinate_bound,
)
from node.privacy.ledger import Ledger
from node.privacy.recipe import LR_MAX_FACTOR, NOISE_TARGET
from node.privacy.skellam import finite_number
from node.runtime.state import atomic_write, loads_json

# What each secure-aggregation variant (node/secagg/robust.py) opens besides the sum.
VARIANT_REVEAL = {"sum_only": "sum", "distances": "per_member", "norm_only": "per_member",
                  "range": "sum"}
# Variant "range": an honest member fails its own range check (and so drops from the round:
# the one bit it reveals) with at most this probability per round (node/runtime/
# secure_range.py and node/secagg/range_check.py: four tails of 2^-42).
RANGE_FAILURE = 2.0 ** -40
# The consortium trains this many passes over its rows unless the rounds are given: the
# 30 rounds x 1 epoch of the centralized reference (measured on digits at epsilon 3, seed 0,
# scripts/bench_secure.py: 10 epochs 0.861, 30 epochs 0.919, 60 epochs 0.917).
DEFAULT_EPOCHS = 30.0
# At most this many secure rounds in a plan: each is a round trip of every member.
MAX_STEPS = 5000
# Float slack when comparing a recomputed epsilon with the budget (as node/privacy/budget.py).
BUDGET_SLACK = 1e-9
# The configured batch and learning rate the linear scaling starts from (training's defaults).
BASE_BATCH, BASE_LR = 32, 0.05


class SecureRoundRefused(LocalError):
    """A secure round may not open or may not be charged: `reason` names why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"secure round refused ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True)
class SecurePlan:
    """Pinned at the first start (`save`/`load`): a budget partly spent is never re-planned."""

    epsilon: float | None
    delta: float
    members: int
    coalition: int
    min_contributors: int  # rounds open with at least this many; charged for this many
    variant: str  # node/secagg/robust.py's variant: "sum_only", "distances", "norm_only"
    dim: int
    clip_norm: float
    granularity: float
    noise_multiplier: float
    sample_rate: float
    steps: int  # secure rounds (one consortium DP-SGD step each)
    rows_total: int
    lr: float  # the agreed optimizer's step on the mean gradient sum / (q rows_total)
    beta: float = BETA

    @property
    def reveal(self) -> str:
        return VARIANT_REVEAL[self.variant]

    @property
    def range_delta(self) -> float:
        """What the range check's bits may add to delta over the plan (0 for the other
        variants): the mechanism with every honest bit "in range" is the one charged; the
        real one differs from it, on any data, with total variation at most
        eta = steps x n x RANGE_FAILURE, so (epsilon, delta_acc)-DP for the first gives
        (epsilon, delta_acc + (1 + e^epsilon) eta) for the second."""
        if self.variant != "range":
            return 0.0
        if self.epsilon is None:
            raise LocalError("secure plan: variant range needs an epsilon budget (its bits' "
                             "delta grows with e^epsilon)")
        return (1 + math.exp(self.epsilon)) * self.steps * self.members * RANGE_FAILURE

    @property
    def accounting_delta(self) -> float:
        """The delta the accountant charges at: the plan's, less `range_delta`."""
        return self.delta - self.range_delta

    @property
    def expected_batch(self) -> float:
        return self.sample_rate * self.rows_total

    @property
    def noise_ratio(self) -> float:
        """sigma / (q rows): the noise std on the sum over the clipped signal's, per step."""
        return self.noise_multiplier / self.expected_batch

    def mechanism(self) -> SumMechanism:
        """What a member's contribution is made with (node/learn/dstep.py consortium_step)."""
        return SumMechanism(self.clip_norm, self.granularity, self.dim, self.members,
                            self.coalition, self.beta)

    def record(self, round_: int, contributors: int | None = None, digest: str = "",
               epsilon_after: float | None = None) -> LedgerRecord:
        """The round's charge (not written): for the plan's floor of contributors unless a
        larger number is given (see charge_secure_round)."""
        m = self.min_contributors if contributors is None else contributors
        return LedgerRecord(round_, secure_record.MODE, self.noise_multiplier, self.sample_rate,
                            1, self.clip_norm, digest, secure={
                                "members": self.members, "coalition": self.coalition,
                                "contributors": m, "dim": self.dim,
                                "granularity": self.granularity, "beta": self.beta,
                                "reveal": self.reveal, "delta": self.accounting_delta,
                                "epsilon_after": epsilon_after})

    def epsilon_after(self, rounds: int) -> float:
        """epsilon at delta after `rounds` secure rounds at the floor (the accountant's)."""
        if rounds == 0:
            return 0.0
        return epsilon_of([dataclasses.replace(self.record(0), steps=rounds)], self.accounting_delta)

    def digest(self) -> str:
        """What every member's plan must agree on, as a hex digest (the consortium can pin or
        echo it): sigma sizes each member's noise share, and q and the steps are everyone's."""
        doc = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(doc, digest_size=16).hexdigest()

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
                     .encode() + b"\n")

    @staticmethod
    def load(path: Path) -> SecurePlan | None:
        if not path.exists():
            return None
        try:
            plan = SecurePlan(**loads_json(path.read_bytes()))
            plan.check()
            spent = plan.epsilon_after(plan.steps)
        except ArithmeticError as exc:  # past check(): a value no plan of flnode's holds
            raise LocalError(f"secure privacy plan {path} is unreadable (a value out of range: "
                             f"{exc}); refusing to start rather than re-plan a budget that may "
                             "be partly spent") from None
        except (ValueError, TypeError, DistributedDPError) as exc:
            raise LocalError(f"secure privacy plan {path} is unreadable ({exc}); refusing to "
                             "start rather than re-plan a budget that may be partly spent") from None
        if plan.epsilon is not None and spent > plan.epsilon * (1 + 1e-6):
            raise LocalError(f"secure privacy plan {path}: its {plan.steps} rounds would spend "
                             f"epsilon {spent:.4g}, above its own budget {plan.epsilon:g}: the "
                             "plan was edited. Restore it, or start a new state dir.")
        return plan

    def check(self) -> None:
        """ValueError naming the first field flnode would never have written."""
        self.mechanism()  # n > t >= 1, d, C, gamma, beta
        reals = {"delta": self.delta, "noise_multiplier": self.noise_multiplier,
                 "sample_rate": self.sample_rate, "lr": self.lr}
        for key, v in reals.items():
            if not (finite_number(v) and v > 0):
                raise ValueError(f"{key} {v!r} is not a finite number > 0")
        if not (0 < self.accounting_delta and self.delta < 1 and self.sample_rate <= 1):
            raise ValueError(f"delta {self.delta!r} or sample_rate {self.sample_rate!r} is not < 1")
        if self.epsilon is not None and not (finite_number(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon {self.epsilon!r} is not a finite number > 0 or null")
        if self.variant not in VARIANT_REVEAL:
            raise ValueError(f"variant {self.variant!r} is not one of {', '.join(VARIANT_REVEAL)}")
        for key, low in (("steps", 1), ("rows_total", 1), ("min_contributors", 0)):
            v = getattr(self, key)
            if type(v) is not int or v < low:
                raise ValueError(f"{key} {v!r} is not an integer >= {low}")
        opening = may_open_round(self.min_contributors, members=self.members,
                                 coalition=self.coalition)
        if not opening.ok:
            raise ValueError(f"min_contributors: {opening.detail}")


@dataclass(frozen=True)
class Opening:
    ok: bool
    reason: str  # "ok", "no_honest_noise", "below_charged_floor", "bad_count"
    detail: str


def may_open_round(contributors: int, *, members: int, coalition: int,
                   floor: int | None = None) -> Opening:
    """Whether a secure round whose sum holds `contributors` members' contributions may be
    opened. m <= t: a coalition of t could be every contributor, no honest noise is left in
    the sum, epsilon would be infinite ("no_honest_noise"). m below `floor` (the
    contributors the ledger charged for, SecurePlan.min_contributors): the charge would
    under-count ("below_charged_floor")."""
    if type(contributors) is not int or not 0 <= contributors <= members:
        return Opening(False, "bad_count", f"{contributors!r} contributors of {members} members")
    if contributors <= coalition:
        return Opening(False, "no_honest_noise",
                       f"{contributors} contributor(s) <= the coalition t = {coalition}: they "
                       "could all be the coalition's, no honest noise would protect the sum")
    if floor is not None and contributors < floor:
        return Opening(False, "below_charged_floor",
                       f"{contributors} contributor(s) < {floor}, the number the privacy "
                       "ledger charged this round for: opening it would under-count epsilon")
    return Opening(True, "ok", f"{contributors} contributors > t = {coalition}")


def charge_secure_round(ledger: Ledger, plan: SecurePlan, *, round_: int,
                        contributors: int | None = None, digest: str = "") -> LedgerRecord:
    """Write round_'s charge, fsync'd; call it before this member's first piece of the round
    leaves (a crash then over-counts, never under-counts). `contributors`: a lower bound on
    the contributors of any sum this member's contribution will be opened in (default the
    plan's floor, which the machine enforces with may_open_round(floor=...)). Refuses
    (SecureRoundRefused) a count may_open_round refuses, and a charge over the budget
    ("budget_exhausted"), writing nothing."""
    m = plan.min_contributors if contributors is None else contributors
    opening = may_open_round(m, members=plan.members, coalition=plan.coalition,
                             floor=plan.min_contributors)
    if not opening.ok:
        raise SecureRoundRefused(opening.reason, opening.detail)
    # the ledger's running sum, at the plan's accounting delta
    eps = ledger.epsilon_with(plan.record(round_, m, digest), plan.accounting_delta)
    if plan.epsilon is not None and not eps <= plan.epsilon * (1 + BUDGET_SLACK):
        raise SecureRoundRefused("budget_exhausted",
                                 f"round {round_} would bring epsilon to {eps:.4g} at delta "
                                 f"{plan.delta:g}, over the budget {plan.epsilon:g}")
    record = plan.record(round_, m, digest, eps if math.isfinite(eps) else None)
    ledger.charge(record)
    return record


def calibrate_secure_sigma(template: SecurePlan, target_epsilon: float, steps: int) -> float:
    """Smallest sigma (to SIGMA_RATIO) whose `steps` rounds charged as `template` charges
    them (its reveal, floor, q) stay within target_epsilon, every candidate judged by the
    ledger's accountant (epsilon_of on the records the rounds will write)."""
    def within(sigma: float) -> bool:
        plan = dataclasses.replace(template, noise_multiplier=sigma)
        return plan.epsilon_after(steps) <= target_epsilon

    def cannot_meet(hi: float) -> LocalError:
        return LocalError(f"secure plan: epsilon = {target_epsilon:g} cannot be met over "
                          f"{steps} rounds at q = {template.sample_rate:.4g} ({template.reveal} "
                          f"revealed, {template.min_contributors} contributors, coalition "
                          f"{template.coalition}) even with sigma = {hi:g}: raise epsilon, "
                          "plan fewer rounds or choose variant sum_only")

    return bisect_sigma(within, cannot_meet)


def secure_plan(*, rows_total: int, members: int, coalition: int, epsilon: float,
                delta: float, dim: int, clip_norm: float = 1.0, variant: str = "sum_only",
                min_contributors: int | None = None, rounds: int | None = None,
                epochs: float = DEFAULT_EPOCHS, base_batch: int = BASE_BATCH,
                base_lr: float = BASE_LR, max_steps: int = MAX_STEPS) -> SecurePlan:
    """The consortium's distributed DP-SGD plan (module docstring). `rows_total`: the rows of
    all members (sets q from the expected batch, and the learning rate; never the privacy,
    which depends on q, sigma and the steps only). `min_contributors`: the least members a
    round opens with (default n - t: the protocol completes with up to t missing).
    `rounds`: the number of secure rounds if pinned, else ceil(epochs / q) (at most
    max_steps)."""
    if type(rows_total) is not int or rows_total < 1:
        raise LocalError(f"secure plan: rows_total {rows_total!r} must be an integer >= 1")
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise LocalError(f"secure plan: epsilon {epsilon!r} must be a finite number > 0")
    if not 0 < delta < 1 / rows_total:
        raise LocalError(f"secure plan: delta = {delta:g} is not in (0, 1/rows) with "
                         f"{rows_total} rows in the consortium (1e-5 is usual)")
    if variant not in VARIANT_REVEAL:
        raise LocalError(f"secure plan: variant {variant!r} is not one of "
                         f"{', '.join(VARIANT_REVEAL)}")
    floor = members - coalition if min_contributors is None else min_contributors
    opening = may_open_round(floor, members=members, coalition=coalition)
    if not opening.ok:
        raise LocalError(f"secure plan: min_contributors {floor}: {opening.detail}")
    if rounds is not None and (type(rounds) is not int or not 1 <= rounds <= max_steps):
        raise LocalError(f"secure plan: rounds {rounds!r} must be an integer in 1..{max_steps}")
    gamma = choose_granularity(clip_norm, dim)
    base = SecurePlan(float(epsilon), delta, members, coalition, floor, variant, dim,
                      float(clip_norm), gamma, 1.0, 1.0, 1, rows_total, base_lr)
    base.mechanism()  # n > t >= 1, d >= 1, C > 0

    def at(batch: int) -> SecurePlan:
        q = min(1.0, batch / rows_total)
        steps = rounds if rounds is not None else min(max_steps, math.ceil(epochs / q))
        template = dataclasses.replace(base, sample_rate=q, steps=steps)
        sigma = calibrate_secure_sigma(template, float(epsilon), steps)
        factor = min(max(q * rows_total / base_batch, 1.0), LR_MAX_FACTOR)
        return dataclasses.replace(template, noise_multiplier=sigma, lr=base_lr * factor)

    batch = base_batch
    while True:
        chosen = at(batch)
        if chosen.noise_ratio <= NOISE_TARGET or batch >= rows_total:
            return chosen
        batch *= 2


def coordinate_bound_of(plan: SecurePlan) -> int:
    """The public bound on every coordinate of an honest secure sum under `plan` (all n
    members, every row of rows_total at the rounded norm bound, the noise's tail at
    failure 2^-40: node/privacy/distributed.py coordinate_bound): what
    node/secagg/encoding.py IntegerCodec(members, dim, bound) takes."""
    return coordinate_bound(plan.mechanism(), plan.noise_multiplier, plan.rows_total)

"""A node's privacy plan and budget: the plan fixed at the first start
(privacy_plan.json), the budget checks against the ledger, the released weight
(released_weight.json). Nothing here trains.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from gossip.errors import LocalError
from node.privacy.accountant import LedgerRecord, epsilon_of, steps_per_epoch
from node.privacy.calibrate import calibrate_sigma, plan_history
from node.privacy.ledger import Ledger, weight_digest
from node.privacy.mechanisms import NoiseSource, snap
from node.privacy.recipe import choose
from node.runtime.config import PrivacyConfig
from node.runtime.state import atomic_write

log = logging.getLogger("flnode.privacy")


@dataclass(frozen=True)
class PrivacyPlan:
    """Fixed at a node's first start and persisted: a restart never re-plans.

    (Re-calibrating after a restart as if nothing had been spent overspends:
    measured here, epsilon 3.48 against a target of 3.)
    """

    mode: str
    epsilon: float | None  # the total budget, if one was given
    delta: float
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    weight: str  # "exact" (update mode), "noised" or "uniform" (record mode)
    count_sigma: float | None
    # What set sample_rate and steps_per_round (record mode); None in plans written
    # before they were pinned (sample_rate and steps_per_round still are).
    rows: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    # Federated normalization's stats release (record mode): its noise multiplier, or
    # None (no such release). Charged once, before round 1.
    normalize_sigma: float | None = None
    # privacy.recipe = "auto" (record mode, node/privacy/recipe.py): "auto", the learning rate the
    # rule chose (batch_size and epochs above are its choices too) and the configured
    # training values it chose from ({"batch_size", "epochs", "lr"}). None: the fixed
    # recipe (the training section as configured); a fixed plan's file leaves them out,
    # so it is byte for byte what it was before the recipe existed.
    recipe: str | None = None
    lr: float | None = None
    recipe_base: dict | None = None

    @staticmethod
    def load(path: Path) -> PrivacyPlan | None:
        if not path.exists():
            return None
        try:
            plan = PrivacyPlan(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise LocalError(f"privacy plan {path} is unreadable ({exc}); refusing to start "
                             "rather than re-plan a budget that may be partly spent") from None
        if plan.recipe not in (None, "auto") or (plan.recipe == "auto" and not (
                isinstance(plan.lr, int | float) and math.isfinite(plan.lr) and plan.lr > 0
                and type(plan.batch_size) is int and plan.batch_size >= 1
                and type(plan.epochs) is int and plan.epochs >= 1)):
            raise LocalError(f"privacy plan {path}: recipe {plan.recipe!r} with lr {plan.lr!r}, "
                             f"batch_size {plan.batch_size!r}, epochs {plan.epochs!r} is not a "
                             "plan flnode wrote; refusing to start rather than re-plan a budget "
                             "that may be partly spent")
        return plan

    def save(self, path: Path) -> None:
        doc = asdict(self)
        for key in ("recipe", "lr", "recipe_base"):
            if doc[key] is None:
                del doc[key]
        atomic_write(path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")

    def training(self, epochs: int, batch_size: int, lr: float) -> tuple[int, int, float]:
        """(epochs, batch_size, lr) local DP-SGD uses: the recipe's pinned choice under
        privacy.recipe = "auto", else the configured values as given."""
        if self.recipe == "auto":
            assert self.epochs is not None and self.batch_size is not None and self.lr is not None
            return self.epochs, self.batch_size, self.lr
        return epochs, batch_size, lr


PLAN_FILE = "privacy_plan.json"
WEIGHT_FILE = "released_weight.json"
# Float slack when comparing a recomputed epsilon with the budget it was planned for.
BUDGET_SLACK = 1e-9


class PrivacyBudget:
    """One node's privacy plan, ledger and budget checks. Nothing here trains."""

    def __init__(self, cfg: PrivacyConfig, *, rows: int, rounds: int, epochs: int,
                 batch_size: int, state_dir: Path, ledger: Ledger,
                 normalize_sigma: float | None = None, lr: float | None = None,
                 declared_weights: bool = True) -> None:
        self.cfg = cfg
        # Whether the consortium's rule reads a share's declared weight (privacy.weight
        # = "auto" releases a noised row count only then)
        self.declared_weights = declared_weights
        self.lr = lr  # training.lr: the recipe's base (privacy.recipe = "auto")
        # record mode: the noise multiplier of federated normalization's stats (pinned)
        self.normalize_sigma = normalize_sigma if cfg.mode == "record" else None
        self.rows = rows
        self.ledger = ledger
        self.state_dir = state_dir
        self.plan = self._plan(rounds, epochs, batch_size) if cfg.mode != "off" else None
        # The noised count released before (weight "noised"), checked once, at start (not
        # mid-run), and kept: every later round releases this value (store_weight sets it).
        self.released_weight: float | None = None
        if self.plan is not None and self.plan.weight == "noised" and \
                (state_dir / WEIGHT_FILE).exists():
            self.released_weight = self._stored_weight(state_dir / WEIGHT_FILE)

    def _plan(self, rounds: int, epochs: int, batch_size: int) -> PrivacyPlan:
        cfg = self.cfg
        pinned: tuple[int | None, ...] = (None, None, None)
        path = self.state_dir / PLAN_FILE
        existing = PrivacyPlan.load(path)
        if cfg.mode == "record":
            if cfg.delta >= 1 / self.rows:
                raise LocalError(
                    f"privacy.delta = {cfg.delta:g} is not below 1/rows = 1/{self.rows}: with "
                    "that delta the guarantee allows releasing a whole record outright. Choose "
                    f"delta < {1 / self.rows:.2g} (1e-5 is usual; at most 1/(10 x rows))")
            weight = self._weight(existing)
            count_sigma = cfg.count_sigma if weight == "noised" else None
        else:
            q, spr, count_sigma, weight = 1.0, 1, None, "exact"
        auto = cfg.mode == "record" and cfg.recipe == "auto"
        recipe_base = {"batch_size": batch_size, "epochs": epochs, "lr": self.lr}
        if cfg.mode == "record":
            if existing is not None and existing.recipe == "auto":
                # The recipe's choice is pinned: never re-chosen after a restart.
                epochs, batch_size = existing.epochs, existing.batch_size  # type: ignore[assignment]
            per_epoch = steps_per_epoch(self.rows, batch_size)
            q, spr = 1.0 / per_epoch, epochs * per_epoch
            pinned = (self.rows, epochs, batch_size)
        if existing is not None:
            self._check_pinned(existing, path, q, spr, weight, count_sigma, pinned)
            self._check_affordable(existing, path)
            if existing.recipe == "auto" and existing.recipe_base != recipe_base:
                log.warning("privacy.recipe = \"auto\": the training section now says %s but "
                            "this state dir's privacy plan (%s) was chosen from %s; ignored: "
                            "the plan's batch_size %s, epochs %s, lr %g stay (a budget that "
                            "is partly spent is never re-planned)", recipe_base, path,
                            existing.recipe_base, existing.batch_size, existing.epochs,
                            existing.lr)
            return existing  # sigma as planned at the first start, never re-calibrated
        if self.ledger.records:
            raise LocalError(
                f"privacy plan {path} is missing but the ledger {self.ledger.path} already "
                f"holds {len(self.ledger.records)} charge(s) (epsilon "
                f"{self.ledger.epsilon(cfg.delta):.4g}): a budget that is partly spent is "
                "never re-planned. Restore the plan file, or start a new state dir.")
        if auto:
            return self._plan_auto(rounds, epochs, batch_size, count_sigma, weight, path,
                                   recipe_base)
        sigma = cfg.sigma if cfg.sigma is not None else calibrate_sigma(
            cfg.epsilon, cfg.delta, cfg.mode, q, spr, rounds, count_sigma,  # type: ignore[arg-type]
            self.normalize_sigma)
        fresh = PrivacyPlan(cfg.mode, cfg.epsilon, cfg.delta, sigma, cfg.clip, q, spr, rounds,
                            weight, count_sigma, *pinned, normalize_sigma=self.normalize_sigma)
        fresh.save(path)
        return fresh

    def _weight(self, existing: PrivacyPlan | None) -> str:
        """privacy.weight as configured, or "auto" resolved: the plan's (pinned at the first
        start, whatever the rule says now: a count once charged stays charged, and one never
        charged is not released later), else "noised" only if the rule reads declared weights."""
        if self.cfg.weight != "auto":
            return self.cfg.weight
        if existing is not None and existing.weight in ("noised", "uniform"):
            return existing.weight
        chosen = "noised" if self.declared_weights else "uniform"
        if existing is None:
            log.info("privacy.weight = \"auto\": %s (the consortium's rule %s shares' declared "
                     "weights%s); pinned in the privacy plan", chosen,
                     "weighs" if self.declared_weights else "does not read",
                     "" if self.declared_weights else ", so no row count is released or charged")
        return chosen

    def _plan_auto(self, rounds: int, epochs: int, batch_size: int, count_sigma: float | None,
                   weight: str, path: Path, recipe_base: dict) -> PrivacyPlan:
        """privacy.recipe = "auto": batch size, lr and epochs from the rows and the budget
        (node/privacy/recipe.py), then sigma for them, as the fixed recipe calibrates it."""
        cfg = self.cfg
        if self.lr is None:
            raise LocalError("privacy.recipe = \"auto\" needs training.lr to scale (internal: "
                             "PrivacyBudget was built without lr)")

        def sigma_for(q: float, spr: int) -> float:
            if cfg.sigma is not None:
                return cfg.sigma
            return calibrate_sigma(cfg.epsilon, cfg.delta, cfg.mode, q, spr,  # type: ignore[arg-type]
                                   rounds, count_sigma, self.normalize_sigma)

        r = choose(self.rows, batch_size, self.lr, epochs, sigma_for)
        fresh = PrivacyPlan(cfg.mode, cfg.epsilon, cfg.delta, r.sigma, cfg.clip, r.sample_rate,
                            r.steps_per_round, rounds, weight, count_sigma, self.rows, r.epochs,
                            r.batch_size, normalize_sigma=self.normalize_sigma, recipe="auto",
                            lr=r.lr, recipe_base=recipe_base)
        fresh.save(path)
        log.info("privacy.recipe = \"auto\" for %d rows: batch_size %d (q %.4g), %d epoch(s) "
                 "a round, lr %g, sigma %.3f (noise/signal per step %.4f); pinned in %s",
                 self.rows, r.batch_size, r.sample_rate, r.epochs, r.lr, r.sigma,
                 r.noise_ratio, path)
        return fresh

    def training(self, epochs: int, batch_size: int, lr: float) -> tuple[int, int, float]:
        """(epochs, batch_size, lr) for local training: the plan's under the auto recipe,
        else the configured ones."""
        if self.plan is None:
            return epochs, batch_size, lr
        return self.plan.training(epochs, batch_size, lr)

    @staticmethod
    def _check_affordable(plan: PrivacyPlan, path: Path) -> None:
        """A plan whose own releases would overspend its own budget was edited (a lowered
        sigma): refused. One accountant evaluation, not a re-calibration. (The ledger would
        still charge the sigma used, and the budget check stop the node; this says why.)"""
        if plan.epsilon is None:
            return
        eps = epsilon_of(plan_history(plan.mode, plan.noise_multiplier, plan.sample_rate,
                                      plan.steps_per_round, plan.rounds, plan.count_sigma,
                                      plan.normalize_sigma), plan.delta)
        if eps > plan.epsilon * (1 + 1e-6):
            raise LocalError(
                f"privacy plan {path}: sigma {plan.noise_multiplier:g} over its {plan.rounds} "
                f"rounds would spend epsilon {eps:.4g}, above its own budget "
                f"{plan.epsilon:g}: the plan was edited (a plan is calibrated once and never "
                "re-planned). Restore it, or start a new state dir.")

    def _check_pinned(self, plan: PrivacyPlan, path: Path, q: float, spr: int, weight: str,
                      count_sigma: float | None, pinned: tuple[int | None, ...]) -> None:
        """Everything that sets what a round costs is fixed at the first start: a budget
        that is partly spent cannot be re-planned, nor a round made dearer than planned
        (more epochs, smaller batches, another data file)."""
        cfg = self.cfg
        recipe = cfg.recipe if cfg.mode == "record" else "fixed"
        checks: list[tuple[str, object, object]] = [
            ("privacy.recipe", recipe, plan.recipe or "fixed"),
            ("privacy.mode", cfg.mode, plan.mode), ("privacy.epsilon", cfg.epsilon, plan.epsilon),
            ("privacy.delta", cfg.delta, plan.delta), ("privacy.clip", cfg.clip, plan.clip_norm),
            ("privacy.weight", weight, plan.weight),
            ("privacy.count_sigma", count_sigma, plan.count_sigma),
            ("the schema's normalize_noise (federated normalization)", self.normalize_sigma,
             plan.normalize_sigma),
        ]
        if cfg.sigma is not None:
            checks.append(("privacy.sigma", cfg.sigma, plan.noise_multiplier))
        for label, key, now in (("the data file's row count", "rows", pinned[0]),
                                ("training.epochs", "epochs", pinned[1]),
                                ("training.batch_size", "batch_size", pinned[2])):
            if plan.recipe == "auto" and key != "rows":
                continue  # the recipe's own choice (pinned), not the training section's
            if getattr(plan, key) is not None:
                checks.append((label, now, getattr(plan, key)))
        checks += [("the sample rate (from the rows and training.batch_size)", q, plan.sample_rate),
                   ("the DP-SGD steps per round (rows, training.epochs, training.batch_size)",
                    spr, plan.steps_per_round)]
        for label, now, then in checks:
            if isinstance(now, float) and isinstance(then, float):
                same = math.isclose(now, then, rel_tol=1e-12, abs_tol=0.0)
            else:
                same = now == then
            if not same:
                raise LocalError(
                    f"{label} is {now!r} but this state dir's privacy plan ({path}) says "
                    f"{then!r}: it sets what a round costs, and a budget that is partly spent "
                    "cannot be re-planned. Restore the setting, or start a new state dir.")

    def next_release(self, round_: int) -> list[LedgerRecord]:
        """What releasing round_'s share will cost (before training)."""
        p = self.plan
        assert p is not None
        return [LedgerRecord(round_, p.mode, p.noise_multiplier, p.sample_rate,
                             p.steps_per_round, p.clip_norm, "")]

    def epsilon_after(self, extra: list[LedgerRecord]) -> float:
        return epsilon_of(self.ledger.records + extra, self.cfg.delta)

    def would_exceed(self, extra: list[LedgerRecord]) -> float | None:
        """The epsilon the release would reach, if that is over the budget."""
        if self.plan is None or self.plan.epsilon is None:
            return None
        eps = self.epsilon_after(extra)
        return eps if eps > self.plan.epsilon * (1 + BUDGET_SLACK) else None

    def weight(self, round_: int, noise: NoiseSource) -> tuple[float, list[LedgerRecord]]:
        """The share's weight and what it costs (charged once, then reused).

        update/off: the exact row count (update mode protects the whole
        contribution, not its size). record: never the exact count.
        """
        if self.plan is None or self.plan.weight == "exact":
            return float(self.rows), []
        if self.plan.weight == "uniform":
            return 1.0, []
        if self.released_weight is not None:
            return self.released_weight, []
        import torch  # lean start: keeps torch out of flnode status

        sigma = self.plan.count_sigma
        assert sigma is not None
        # Post-processing of the noised count: rounded to an integer in float64 (never
        # the low bits of a float32 draw: `snap`), clamped to >= 1 so a weight stays positive.
        noisy = max(1.0, snap(self.rows + float(noise.gaussian(1, sigma, torch.float64)[0]), 1.0))
        return noisy, [LedgerRecord(round_, "count", sigma, 1.0, 1, 1.0, weight_digest(noisy))]

    def _stored_weight(self, path: Path) -> float:
        """The noised count released before, as stored: a finite number >= 1 that the
        ledger's "count" charge names (an older flnode's charge names none: then only that
        it was charged). Anything else, e.g. the exact row count written in by hand, would
        be released every round uncharged: refused."""
        try:
            weight = json.loads(path.read_text())["weight"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalError(f"{path} is unreadable ({exc!r}); move it away (the count is then "
                             "drawn and charged afresh)") from None
        if not (isinstance(weight, int | float) and not isinstance(weight, bool)
                and math.isfinite(weight) and weight >= 1):
            raise LocalError(f"{path}: weight {weight!r} is not a finite number >= 1")
        counts = [r for r in self.ledger.records if r.mode == "count"]
        named = {part for r in counts for part in r.share_digest.split()
                 if part.startswith("weight:")}
        if not counts or (named and weight_digest(weight) not in named):
            raise LocalError(
                f"{path}: weight {weight!r} is not the noised count the ledger "
                f"{self.ledger.path} charged "
                f"({'no count charge' if not counts else 'it names another value'}): "
                "releasing it would be uncharged. Move the file away (the count is then drawn "
                "and charged afresh).")
        return float(weight)

    def store_weight(self, weight: float) -> None:
        atomic_write(self.state_dir / WEIGHT_FILE, json.dumps({"weight": weight}).encode())
        self.released_weight = weight

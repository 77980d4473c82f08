"""Privacy: clipping, Gaussian noise, calibration, the accountant, the ledger.

`record` mode is DP-SGD through Opacus (`node.train.train_local_dp`): each
step clips every example's gradient to C and adds N(0, sigma^2 C^2), on a
Poisson sample of rate q; it protects each record, and sampling amplifies it.
Each round is charged as (sigma, q, steps) from Opacus' own accountant.

`update` mode clips the whole model update (local - start) to L2 norm C and
adds N(0, sigma^2 C^2) to every coordinate: one Gaussian mechanism per round
with sensitivity C, which protects the institution's whole contribution to
that round. It is accounted with Opacus' RDP accountant at sample rate 1 and
one step per release.

The ledger is append-only JSONL, one record per release, fsync'd before the
share leaves the process. epsilon is always recomputed from it, so a crash
can at worst over-count (a record whose share never left), never under-count.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gossip.errors import LocalError
from node.config import PrivacyConfig
from node.state import atomic_write

ACCOUNTANT = "rdp"


def clip(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale update to L2 norm at most clip_norm. Returns (clipped, original norm)."""
    norm = float(torch.linalg.vector_norm(update))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return update * scale, norm


class NoiseSource(Protocol):
    name: str

    def gaussian(self, n: int, std: float) -> torch.Tensor: ...

    def uniform(self, n: int) -> torch.Tensor: ...

    def torch_generator(self) -> torch.Generator: ...


class OsNoise:
    """Gaussian noise from the operating system's CSPRNG (os.urandom), Box-Muller.

    Used for every real node: noise that protects real data must not be
    predictable from a config seed.
    """

    name = "os.urandom"

    def gaussian(self, n: int, std: float) -> torch.Tensor:
        pairs = (n + 1) // 2
        words = np.frombuffer(os.urandom(16 * pairs), dtype="<u8").reshape(2, pairs)
        u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
        u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
        return torch.from_numpy((z[:n] * std).astype(np.float32))

    def uniform(self, n: int) -> torch.Tensor:
        """n floats in [0, 1) from os.urandom (53 bits each): DP-SGD's Poisson sampling."""
        words = np.frombuffer(os.urandom(8 * n), dtype="<u8")
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    def torch_generator(self) -> torch.Generator:
        """For Opacus (DP-SGD noise and Poisson sampling): seeded from os.urandom.

        torch's generator is a Mersenne Twister, not a CSPRNG; Opacus' secure
        mode needs torchcsprng, which is unmaintained. A fresh 64-bit OS seed
        per round keeps the noise unpredictable from anything in a config.
        """
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


class SeededNoise:
    """Reproducible noise for simulations on demo data only (same seed, same run)."""

    name = "seeded (simulation)"

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def gaussian(self, n: int, std: float) -> torch.Tensor:
        return torch.randn(n, generator=self.generator) * std

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def torch_generator(self) -> torch.Generator:
        return self.generator


def privatize_update(update: torch.Tensor, clip_norm: float, sigma: float,
                     noise: NoiseSource) -> tuple[torch.Tensor, float]:
    clipped, norm = clip(update, clip_norm)
    if sigma > 0:
        clipped = clipped + noise.gaussian(clipped.numel(), sigma * clip_norm)
    return clipped, norm


@dataclass(frozen=True)
class LedgerRecord:
    round: int
    # "update" (whole-update Gaussian mechanism), "record" (DP-SGD steps) or
    # "count" (the noised row count, released once as the share weight)
    mode: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    share_digest: str


def epsilon_of(records: list[LedgerRecord], delta: float) -> float:
    """Total epsilon at delta for these releases, from Opacus' RDP accountant."""
    if not records:
        return 0.0
    if any(r.noise_multiplier <= 0 for r in records):
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    history: list[tuple[float, float, int]] = []
    for r in records:  # merge runs of identical steps as Opacus' own step() does
        if history and history[-1][:2] == (r.noise_multiplier, r.sample_rate):
            history[-1] = (r.noise_multiplier, r.sample_rate, history[-1][2] + r.steps)
        else:
            history.append((r.noise_multiplier, r.sample_rate, r.steps))
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal alpha at the edge
        return float(accountant.get_epsilon(delta))


class Ledger:
    """Append-only, fsync'd record of every release. The source of truth for epsilon."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[LedgerRecord] = self._read()

    def _read(self) -> list[LedgerRecord]:
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(LedgerRecord(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                if i == len(lines) - 1:
                    # A torn last line: the write never completed, so its fsync
                    # never returned and its share never left. Safe to drop.
                    break
                raise LocalError(
                    f"privacy ledger {self.path}: line {i + 1} is corrupt ({exc}); refusing to "
                    "start, since epsilon cannot be recomputed. Restore the file from backup."
                ) from None
        return records

    def charge(self, record: LedgerRecord) -> None:
        """Append and fsync. Must return before the release leaves the process."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(record), sort_keys=True).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.records, delta)


# --- calibration: sigma from a total budget, once, up front -----------------------

SIGMA_SEARCH = (0.05, 500.0)


def plan_history(mode: str, sigma: float, sample_rate: float, steps_per_round: int, rounds: int,
                 count_sigma: float | None) -> list[LedgerRecord]:
    """The releases a whole run will make, as ledger records (for calibration)."""
    records = []
    if count_sigma is not None:
        records.append(LedgerRecord(-1, "count", count_sigma, 1.0, 1, 1.0, ""))
    records += [LedgerRecord(r, mode, sigma, sample_rate, steps_per_round, 0.0, "")
                for r in range(rounds)]
    return records


def calibrate_sigma(target_epsilon: float, delta: float, mode: str, sample_rate: float,
                    steps_per_round: int, rounds: int, count_sigma: float | None) -> float:
    """Smallest sigma (to 0.1 %) whose whole planned run stays within target_epsilon.

    Bisection over Opacus' RDP accountant; the noised-count release, if any, is
    part of the same budget.
    """
    def eps(sigma: float) -> float:
        return epsilon_of(plan_history(mode, sigma, sample_rate, steps_per_round, rounds,
                                       count_sigma), delta)

    lo, hi = SIGMA_SEARCH
    if eps(hi) > target_epsilon:
        raise LocalError(f"privacy.epsilon = {target_epsilon:g} cannot be met for {rounds} rounds "
                         f"even with sigma = {hi:g}: raise epsilon or plan fewer rounds")
    if eps(lo) <= target_epsilon:
        return lo
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


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

    @staticmethod
    def load(path: Path) -> PrivacyPlan | None:
        if not path.exists():
            return None
        try:
            return PrivacyPlan(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise LocalError(f"privacy plan {path} is unreadable ({exc}); refusing to start "
                             "rather than re-plan a budget that may be partly spent") from None

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n")


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Opacus' Poisson loader: as many steps per epoch as the plain loader has batches."""
    return max(1, math.ceil(rows / batch_size))


PLAN_FILE = "privacy_plan.json"
WEIGHT_FILE = "released_weight.json"
# Float slack when comparing a recomputed epsilon with the budget it was planned for.
BUDGET_SLACK = 1e-9


class PrivacyBudget:
    """One node's privacy plan, ledger and budget checks. Nothing here trains."""

    def __init__(self, cfg: PrivacyConfig, *, rows: int, rounds: int, epochs: int,
                 batch_size: int, state_dir: Path, ledger: Ledger) -> None:
        self.cfg = cfg
        self.rows = rows
        self.ledger = ledger
        self.state_dir = state_dir
        self.plan = self._plan(rounds, epochs, batch_size) if cfg.mode != "off" else None

    def _plan(self, rounds: int, epochs: int, batch_size: int) -> PrivacyPlan:
        cfg = self.cfg
        if cfg.mode == "record":
            if cfg.delta >= 1 / self.rows:
                raise LocalError(
                    f"privacy.delta = {cfg.delta:g} is not below 1/rows = 1/{self.rows}: with "
                    "that delta the guarantee allows releasing a whole record outright. Choose "
                    f"delta < {1 / self.rows:.2g} (1e-5 is usual; at most 1/(10 x rows))")
            per_epoch = steps_per_epoch(self.rows, batch_size)
            q, spr = 1.0 / per_epoch, epochs * per_epoch
            count_sigma = cfg.count_sigma if cfg.weight == "noised" else None
            weight = cfg.weight
        else:
            q, spr, count_sigma, weight = 1.0, 1, None, "exact"
        sigma = cfg.sigma if cfg.sigma is not None else calibrate_sigma(
            cfg.epsilon, cfg.delta, cfg.mode, q, spr, rounds, count_sigma)  # type: ignore[arg-type]
        fresh = PrivacyPlan(cfg.mode, cfg.epsilon, cfg.delta, sigma, cfg.clip, q, spr, rounds,
                            weight, count_sigma)
        path = self.state_dir / PLAN_FILE
        existing = PrivacyPlan.load(path)
        if existing is None:
            fresh.save(path)
            return fresh
        for key, label in (("mode", "mode"), ("epsilon", "epsilon"), ("delta", "delta"),
                           ("clip_norm", "clip"), ("weight", "weight"),
                           ("count_sigma", "count_sigma")):
            if getattr(existing, key) != getattr(fresh, key):
                raise LocalError(
                    f"privacy.{label} is {getattr(fresh, key)!r} but this state dir's plan "
                    f"({path}) says {getattr(existing, key)!r}: a budget that is partly spent "
                    "cannot be re-planned. Restore the setting, or start a new state dir.")
        return existing  # sigma as planned at the first start, never re-calibrated

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
        path = self.state_dir / WEIGHT_FILE
        if path.exists():
            return float(json.loads(path.read_text())["weight"]), []
        sigma = self.plan.count_sigma
        assert sigma is not None
        # Post-processing of the noised count: clamp to >= 1 so a weight stays positive.
        noisy = max(1.0, self.rows + float(noise.gaussian(1, sigma)[0]))
        return noisy, [LedgerRecord(round_, "count", sigma, 1.0, 1, 1.0, "")]

    def store_weight(self, weight: float) -> None:
        atomic_write(self.state_dir / WEIGHT_FILE, json.dumps({"weight": weight}).encode())

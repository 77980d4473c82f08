"""The per-member DP-SGD recipe (`privacy.recipe = "auto"`): batch size, learning rate
and local epochs chosen from a member's row count and its budget, once, at first start.

Why: with one recipe for everyone (batch 32, lr 0.05), a member's noise per step
relative to its clipped mean gradient is r = sigma * C / (q N * C) = sigma / (q N),
q N the expected batch. sigma is calibrated from q and the steps, so a small member
ends far noisier than a large one (23 rows at epsilon 3 over 30 rounds: sigma 8.3 on
a batch of 23, r = 0.36; 2,952 rows: sigma 1.1 on 32, r = 0.035). Larger expected
batches lower r (sigma grows slower than q N): a fixed noise-to-signal target per step.

The rule, given rows N, the configured batch B0, lr0, epochs E0 and the budget:

1. Batch: the candidates are B0, 2 B0, 4 B0, ... up to the first one that covers every
   row (q = 1, full batch). With sigma(B) calibrated for that batch's q = 1/ceil(N/B)
   and steps, take the smallest candidate whose r(B) = sigma(B) / (q N) <= NOISE_TARGET
   (0.01); if none reaches it, full batch (a small member: the least noise it can have).
2. Learning rate: linear scaling with the expected batch, lr = lr0 * (q N) / B0,
   clamped to [lr0, LR_MAX_FACTOR * lr0]: one step on a batch k times larger goes k
   times as far, so a member's progress per epoch stays about what B0 gave it.
3. Local epochs: E0, lowered (to 1 at least) while the sigma steps 1-2 choose exceeds
   SIGMA_MAX: fewer steps per round for a member whose every step would be mostly
   noise (a small one, at full batch). With E0 = 1 (the default) nothing changes.

The clip norm stays `privacy.clip`. Measured on a validation split of pooled
training rows (never the test set; scripts/bench_skew_dp.py, docs/results/skew.md, "Under DP"): at r ~ 0.01
and linear lr scaling, local DP-SGD on default and digits matched or beat batch 32
at lr 0.05 for every size tried.

The outputs depend on the exact row count, as today's q = 1/ceil(N/B) already does
(node/privacy/budget.py, node/learn/dpsgd.py); they are pinned in the privacy plan and never sent
(a share carries its weight and tensors only). Nothing here trains; it only
calibrates, through the callable it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from node.privacy.accountant import steps_per_epoch  # Opacus' Poisson loader, as the plan counts it

NOISE_TARGET = 0.01  # sigma / (expected batch) per step
LR_MAX_FACTOR = 64.0  # lr at most this many times the configured lr
SIGMA_MAX = 10.0  # above this full-batch sigma, fewer local epochs (down to 1)


@dataclass(frozen=True)
class Recipe:
    batch_size: int  # what DP-SGD is given; q = 1/ceil(rows/batch_size)
    epochs: int
    lr: float
    sigma: float  # calibrated for this batch, epochs and the budget
    sample_rate: float
    steps_per_round: int
    noise_ratio: float  # sigma / (q rows): the noise-to-signal per step


def batch_candidates(rows: int, base_batch: int) -> list[int]:
    """base, 2 base, 4 base, ... up to the first that covers every row."""
    out = [base_batch]
    while steps_per_epoch(rows, out[-1]) > 1:
        out.append(out[-1] * 2)
    return out


def choose(rows: int, base_batch: int, base_lr: float, base_epochs: int,
           sigma_for: Callable[[float, int], float]) -> Recipe:
    """The recipe for a member with `rows` rows. `sigma_for(q, steps_per_round)` is the
    noise multiplier the budget allows at that sample rate and those steps (the caller
    calibrates it over the planned rounds, or returns a fixed sigma)."""
    if rows < 1 or base_batch < 1 or base_epochs < 1 or not (base_lr > 0 and
                                                              math.isfinite(base_lr)):
        raise ValueError(f"recipe: rows {rows}, batch {base_batch}, epochs {base_epochs} and "
                         f"lr {base_lr!r} must be positive")

    def at(batch: int, epochs: int) -> Recipe:
        per = steps_per_epoch(rows, batch)
        q = 1.0 / per
        sigma = sigma_for(q, epochs * per)
        expected = q * rows
        factor = min(max(expected / base_batch, 1.0), LR_MAX_FACTOR)
        return Recipe(batch, epochs, base_lr * factor, sigma, q, epochs * per,
                      sigma / expected)

    for epochs in range(base_epochs, 0, -1):
        for batch in batch_candidates(rows, base_batch):
            chosen = at(batch, epochs)
            if chosen.noise_ratio <= NOISE_TARGET:
                break
        if chosen.sigma <= SIGMA_MAX:
            break
    return chosen

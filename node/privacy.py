"""Update-level privacy: clipping, Gaussian noise, the accountant, the ledger.

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

ACCOUNTANT = "rdp"


def clip(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale update to L2 norm at most clip_norm. Returns (clipped, original norm)."""
    norm = float(torch.linalg.vector_norm(update))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return update * scale, norm


class NoiseSource(Protocol):
    def gaussian(self, n: int, std: float) -> torch.Tensor: ...


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


class SeededNoise:
    """Reproducible noise for simulations on demo data only (same seed, same run)."""

    name = "seeded (simulation)"

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def gaussian(self, n: int, std: float) -> torch.Tensor:
        return torch.randn(n, generator=self.generator) * std


def privatize_update(update: torch.Tensor, clip_norm: float, sigma: float,
                     noise: NoiseSource) -> tuple[torch.Tensor, float]:
    clipped, norm = clip(update, clip_norm)
    if sigma > 0:
        clipped = clipped + noise.gaussian(clipped.numel(), sigma * clip_norm)
    return clipped, norm


@dataclass(frozen=True)
class LedgerRecord:
    round: int
    mode: str  # "update" (whole-update Gaussian mechanism)
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

    def charged_rounds(self) -> set[int]:
        return {r.round for r in self.records}

"""Privacy mechanisms: clipping, the Gaussian noise sources, snapping released scalars.

`update` mode clips the whole model update (local - start) to L2 norm C and
adds N(0, sigma^2 C^2) to every coordinate (`privatize_update`): one Gaussian
mechanism per round with sensitivity C. `record` mode (DP-SGD through Opacus,
node/learn/dpsgd.py) draws its noise and Poisson sampling from a `NoiseSource`.
Protective noise comes from the OS (`OsNoise`); `SeededNoise` is for simulations.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


def clip(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale update to L2 norm at most clip_norm. Returns (clipped, original norm)."""
    import torch  # lean start: keeps torch out of flnode status (budget imports snap)

    norm = float(torch.linalg.vector_norm(update))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return update * scale, norm


class NoiseSource(Protocol):
    name: str

    def gaussian(self, n: int, std: float, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def uniform(self, n: int) -> torch.Tensor: ...

    def torch_generator(self) -> torch.Generator: ...


class OsNoise:
    """Gaussian noise from the operating system's CSPRNG (os.urandom), Box-Muller.

    Used for every real node: noise that protects real data must not be
    predictable from a config seed.
    """

    name = "os.urandom"

    def gaussian(self, n: int, std: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """float32 (DP-SGD's tensors) unless dtype says otherwise: a released scalar
        (a noised count or sum) takes float64 and is snapped (`snap`)."""
        import torch  # lean start: keeps torch out of flnode status

        pairs = (n + 1) // 2
        words = np.frombuffer(os.urandom(16 * pairs), dtype="<u8").reshape(2, pairs)
        u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
        u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
        out = torch.from_numpy(z[:n] * std)
        return out.to(dtype if dtype is not None else torch.float32)

    def uniform(self, n: int) -> torch.Tensor:
        """n floats in [0, 1) from os.urandom (53 bits each): DP-SGD's Poisson sampling."""
        import torch  # lean start: keeps torch out of flnode status

        words = np.frombuffer(os.urandom(8 * n), dtype="<u8")
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    def torch_generator(self) -> torch.Generator:
        """For Opacus (DP-SGD noise and Poisson sampling): seeded from os.urandom.

        torch's generator is a Mersenne Twister, not a CSPRNG; Opacus' secure
        mode needs torchcsprng, which is unmaintained. A fresh 64-bit OS seed
        per round keeps the noise unpredictable from anything in a config.
        """
        import torch  # lean start: keeps torch out of flnode status

        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


class SeededNoise:
    """Reproducible noise for simulations on demo data only (same seed, same run)."""

    name = "seeded (simulation)"

    def __init__(self, seed: int) -> None:
        import torch  # lean start: keeps torch out of flnode status

        self.generator = torch.Generator().manual_seed(seed)

    def gaussian(self, n: int, std: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch  # lean start: keeps torch out of flnode status

        return torch.randn(n, generator=self.generator, dtype=dtype or torch.float32) * std

    def uniform(self, n: int) -> torch.Tensor:
        import torch  # lean start: keeps torch out of flnode status

        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def torch_generator(self) -> torch.Generator:
        return self.generator


def snap(value: float, grid: float) -> float:
    """`value` rounded to the nearest multiple of `grid` (a power of two, or 1).

    A floating-point Gaussian mechanism leaks through its low bits: which doubles
    `x + z` can take depends on x (Mironov 2012, "On significance of the least
    significant bits for differential privacy"), so an observer can rule out
    neighbouring inputs. Released scalars are therefore snapped to a grid far coarser
    than a double's resolution at their size: a count to an integer (x integer, so
    round(x + z) = x + round(z) exactly), a sum to `stat_grid(std)`. Rounding is
    post-processing; the grid is fine enough not to matter to anyone using the value."""
    return float(round(value / grid) * grid)


def stat_grid(std: float) -> float:
    """The snapping grid for a noised sum of noise std `std`: the power of two at most
    std / 2^12 (a released sum is good to 1/4096 of its noise), never below 2^-20 (a
    double below 2^30 resolves 2^-22 or finer, so every grid point stays reachable)."""
    return 2.0 ** max(math.floor(math.log2(std)) - 12, -20) if std > 0 else 2.0 ** -20


def privatize_update(update: torch.Tensor, clip_norm: float, sigma: float,
                     noise: NoiseSource) -> tuple[torch.Tensor, float]:
    clipped, norm = clip(update, clip_norm)
    if sigma > 0:
        clipped = clipped + noise.gaussian(clipped.numel(), sigma * clip_norm)
    return clipped, norm

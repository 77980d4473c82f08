"""The distance bound: how far from where the round started an honest share can be.

Shares carry whole models, and every honest member started the round from the
same model, its previous aggregate (our `reference`; up to the disagreement the
rounds allow, see below). So a receiver judges a share by its L2 distance from
`reference`, and a share beyond a bound B is clipped back onto the ball of
radius B around `reference` (`distance = "clip"`, reason `distance_clipped`) or
left out (`"reject"`, reason `too_far`). Our own share is never touched.

**With update-level DP** (clip C, noise multiplier sigma, d parameters) an
honest share is `start + clip(u, C) + N(0, (sigma C)^2 I_d)`, so its distance is
at most C + sigma C ||g|| with g standard normal in d dimensions. The norm is
1-Lipschitz and E||g|| <= sqrt(d), so by Gaussian concentration
P(||g|| >= sqrt(d) + t) <= exp(-t^2 / 2). We take

    B = C + sigma C (sqrt(d) + t),   t = sqrt(2 ln(1 / distance_tail)),

which an honest share exceeds with probability at most `distance_tail`
(default 1e-9, t = 6.44) per share and round: over 8 members x 1000 rounds,
under 1e-5 that any honest share is ever clipped, and then only by its excess.
Without a reference (no previous aggregate) we measure from our own released
share, itself within B of the common start: the bound is then 2B.

**Without DP** nothing bounds an honest update a priori, so the bound comes
from the round's shares: B = distance_factor (default 3) x the median of all
admitted shares' distances, our own counted. The median is an honest distance
(or between two) as long as the hostile members are fewer than half, i.e. with
n >= 2f + 1 shares; with fewer the fallback is distance_factor x our own
share's distance (recorded, reason `bound_from_own_distance`).

**What such a bound cannot catch.** It limits how far a share lies, not which
way it points. Anything inside the ball passes: a sign flip (start - u instead
of start + u), a consistent small drift repeated every round, a backdoor whose
update is no larger than an honest one. Under DP the ball is as large as the
noise, sigma C sqrt(d), usually far larger than the clipped signal C: a sign
flip scaled by up to sigma sqrt(d) hides inside it. And honest members whose
previous aggregates differ (they received different shares last round) can be
further apart than B: that is why the default action is to clip (an honest
share loses only its excess), not to reject. The bound is a floor under the
robust rules (it keeps 1e30 values and 1000x scalings out), not a substitute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from node.strategy.types import Aggregate, Candidate, Note

DISTANCE_ACTIONS = ("off", "clip", "reject")


@dataclass(frozen=True)
class DistanceBound:
    value: float
    source: str  # "dp", "spread" or "own_distance"
    detail: str
    tail: float | None = None  # the stated P(an honest share exceeds it), DP only

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "detail": self.detail, "tail": self.tail}


def dp_bound(clip: float, noise_multiplier: float, d: int, tail: float) -> float:
    """C + sigma C (sqrt(d) + t): exceeded by an honest update-DP share with P <= tail."""
    t = math.sqrt(2.0 * math.log(1.0 / tail))
    return clip + noise_multiplier * clip * (math.sqrt(d) + t)


def median(values: list[float]) -> float:
    """The true median (mean of the two middle values for an even count)."""
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def bound_shares(shares: list[Candidate], center: torch.Tensor, *, own_is_center: bool, f: int,
                 action: str, factor: float, dp_clip: float | None,
                 dp_noise_multiplier: float | None, tail: float,
                 result: Aggregate) -> list[Candidate]:
    """Clip or drop the shares further than the bound from `center`; record it."""
    dist = {c.member: float(torch.linalg.vector_norm(c.vector - center)) for c in shares}
    own = next(c for c in shares if c.own)
    if dp_clip is not None and dp_noise_multiplier is not None:
        b = dp_bound(dp_clip, dp_noise_multiplier, center.numel(), tail)
        scale = 2.0 if own_is_center else 1.0
        bound = DistanceBound(scale * b, "dp", (
            f"{'2 x ' if own_is_center else ''}(C + sigma C (sqrt(d) + t)) with C = {dp_clip:g}, "
            f"sigma = {dp_noise_multiplier:g}, d = {center.numel()}, t = "
            f"{math.sqrt(2 * math.log(1 / tail)):.3f}"), tail)
    elif len(shares) >= 2 * f + 1:
        m = median(list(dist.values()))
        bound = DistanceBound(factor * m, "spread", f"{factor:g} x the median distance {m:.4g} "
                              f"of {len(shares)} shares")
    else:
        bound = DistanceBound(factor * dist[own.member], "own_distance",
                              f"{factor:g} x our own share's distance {dist[own.member]:.4g}")
        result.fallbacks.append(Note("bound_from_own_distance", (
            f"{len(shares)} share(s) < 2f + 1 = {2 * f + 1}: their median distance could be a "
            f"hostile one; bound from our own share's distance instead")))
    result.bound = bound
    kept: list[Candidate] = []
    for c in shares:
        d = dist[c.member]
        if c.own or d <= bound.value:
            kept.append(c)
        elif action == "reject":
            result.excluded[c.member] = Note("too_far", f"distance {d:.4g} > bound {bound.value:.4g}")
        else:
            k = bound.value / d
            kept.append(Candidate(c.member, c.weight, center + (c.vector - center) * k))
            result.clipped[c.member] = Note("distance_clipped", f"distance {d:.4g} > bound "
                                            f"{bound.value:.4g}: scaled by {k:.3g}")
    return kept


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the true median of the rows (mean of the two middle values for
    an even count), float64; the same at every member for the same rows."""
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def drop_far(shares: list[Candidate], factor: float,
             result: Aggregate) -> tuple[list[Candidate], int]:
    """Leave out the shares absurdly far from the others, before any rule: (the rest, how
    many were left out). Our own share is never left out.

    A share's distance is its L2 distance from the coordinate-wise median of all the
    round's admitted shares (our own counted); it is left out (reason `far_outlier`) if
    that is above `factor` x the median of these distances. Neither the centre nor the
    scale is the attacker's to set while fewer than half of the shares are hostile:
    each coordinate of the median lies within the honest values' range, and the median
    distance lies between two honest distances. The most hostile shares can do to the
    scale is sit at the centre (distance 0) and pull the median distance down to a
    smaller honest one: an honest share is then left out only if it is `factor` times
    further out than that, which clean non-IID runs never came near (base.FAR_FACTOR).
    With fewer than 3 shares, or a median distance of 0 (most shares identical), it
    leaves out nothing: there is no scale to judge by (the rule's f still applies).
    Assumes the honest shares are a majority of those admitted, like every rule here.
    """
    if len(shares) < 3:
        return shares, 0
    stacked = torch.stack([c.vector for c in shares])
    dist = torch.linalg.vector_norm(stacked - coordinate_median(stacked), dim=1).tolist()
    scale = median(dist)
    if not 0 < scale < math.inf:
        return shares, 0
    result.far_ratio = max(d for c, d in zip(shares, dist, strict=True) if not c.own) / scale
    kept: list[Candidate] = []
    for c, d in zip(shares, dist, strict=True):
        if c.own or d <= factor * scale:
            kept.append(c)
        else:
            result.excluded[c.member] = Note("far_outlier", (
                f"distance {d:.4g} from the coordinate-wise median of the round's shares is "
                f"{d / scale:.3g} x the median distance {scale:.4g} (> far_factor {factor:g})"))
    return kept, len(shares) - len(kept)

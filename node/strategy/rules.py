"""The aggregation rules. Each states what it assumes about f (the number of
hostile members it must survive) and how many shares it needs; with fewer (members
missing this round) the pipeline in `base.py` keeps our own released share and
records `too_few_shares`.

References: FedAvg (McMahan et al. 2017); coordinate median and trimmed mean
(Yin et al. 2018); Krum and multi-Krum (Blanchard et al. 2017); centered
clipping (Karimireddy et al. 2021) as used around a node's own model by
ClippedGossip (He et al. 2022).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from node.strategy.base import Candidate, Note, Round, Strategy, StrategyError, _int, _num, weighted_sum


class WeightedMean(Strategy):
    """FedAvg: the mean weighted by declared sample counts (after the weight caps).

    Assumes f = 0: one hostile share moves the result anywhere (its values, or its
    weight without a cap). It is the baseline the others are measured against."""

    name = "mean"
    assumption = "no hostile member: one share can set the result"
    DEFAULTS: ClassVar[dict[str, Any]] = {"f": 0}

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        p = self.weights(shares, ctx.result)
        ctx.result.used = tuple(c.member for c in shares)
        ctx.result.weights = {c.member: x for c, x in zip(shares, p, strict=True)}
        return weighted_sum(shares, p)


class NormBoundedMean(WeightedMean):
    """Weighted mean of shares whose distance from the reference is bounded
    (`distance.py`: clipped by default, or rejected), after the weight caps.

    Survives any f < n/2 in the sense of a bounded effect: each hostile share
    moves the result by at most its capped weight fraction x (the bound + the
    honest update's norm), per round. Inside the bound it is the weighted mean, so it does not stop a sign
    flip or drift no larger than an honest update (see `distance.py`). Needs one
    share; below 2f + 1 shares its bound comes from our own share's distance."""

    name = "norm_bounded_mean"
    assumption = "f < n/2 for the bound; inside it every share counts"
    DEFAULTS: ClassVar[dict[str, Any]] = {"f": 1, "distance": "clip"}


class CoordinateMedian(Strategy):
    """Coordinate-wise median; for an even count the mean of the two middle
    values. Ignores weights (each member counts once, so a declared weight buys
    nothing). Each coordinate stays within the honest values' range while
    f < n/2: needs n >= 2f + 1. Loses accuracy on clean non-IID data, where
    members of very different sizes are counted equally."""

    name = "median"
    assumption = "f < n/2: needs 2f + 1 shares"
    uses_weights = False

    def needs(self, f: int) -> int:
        return 2 * f + 1

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        n = len(shares)
        ordered = torch.stack([c.vector for c in shares]).sort(dim=0).values
        ctx.result.used = tuple(c.member for c in shares)
        ctx.result.weights = {c.member: 1.0 / n for c in shares}
        if n % 2:
            return ordered[n // 2]
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMean(Strategy):
    """Per coordinate, drop the f largest and f smallest values, then take the
    weighted mean (capped weights) of the n - 2f kept. With at most f hostile
    shares every kept value lies within the honest values' range, whatever the
    weights, so a declared weight only chooses a point inside that range.
    Needs n >= 2f + 1 (refused at construction for a smaller consortium). A
    member trimmed in more than half of the coordinates is reported as
    down-weighted."""

    name = "trimmed_mean"
    assumption = "at most f hostile: needs 2f + 1 shares"

    def needs(self, f: int) -> int:
        return 2 * f + 1

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        n, f = len(shares), self.f
        p = torch.tensor(self.weights(shares, ctx.result), dtype=torch.float64)
        stacked = torch.stack([c.vector for c in shares])
        values, idx = stacked.sort(dim=0, stable=True)
        kept_w = p[idx[f:n - f]]
        out = (values[f:n - f] * kept_w).sum(dim=0) / kept_w.sum(dim=0)
        if f:
            trimmed = torch.bincount(torch.cat([idx[:f], idx[n - f:]]).flatten(), minlength=n)
            d = stacked.shape[1]
            for c, t in zip(shares, trimmed.tolist(), strict=True):
                if d and t / d > 0.5:
                    ctx.result.down_weighted[c.member] = Note(
                        "mostly_trimmed", f"trimmed in {100 * t / d:.0f}% of coordinates")
        ctx.result.used = tuple(c.member for c in shares)
        ctx.result.weights = {c.member: float(x) for c, x in zip(shares, p.tolist(), strict=True)}
        return out


class MultiKrum(Strategy):
    """Multi-Krum: score each share by the sum of squared distances to its
    n - f - 2 nearest others, keep the m lowest scores (default m = n - f) and
    take their weighted mean (capped weights). Assumes n > 2f + 2, so that an
    honest share's nearest n - f - 2 can all be honest: needs 2f + 3 shares.
    A hostile share close enough to be kept is within the honest spread."""

    name = "multi_krum"
    assumption = "n > 2f + 2: needs 2f + 3 shares"
    PARAMS: ClassVar[dict[str, Any]] = {"m": None}

    def needs(self, f: int) -> int:
        return 2 * f + 3

    def check(self, members: int | None) -> None:
        super().check(members)
        if self.params["m"] is not None:
            _int(self.name, "m", self.params["m"], lo=1)

    def select(self, n: int) -> int:
        m = self.params["m"]
        return n - self.f if m is None else min(int(m), n)

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        n, f = len(shares), self.f
        stacked = torch.stack([c.vector for c in shares])
        dist2 = torch.cdist(stacked, stacked, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        dist2.fill_diagonal_(float("inf"))
        k = n - f - 2
        scores = dist2.sort(dim=1).values[:, :k].sum(dim=1) if k > 0 else torch.zeros(n)
        order = sorted(range(n), key=lambda i: (float(scores[i]), shares[i].member))
        chosen = sorted(order[:self.select(n)])
        for i in order[self.select(n):]:
            ctx.result.excluded[shares[i].member] = Note(
                "krum_not_selected", f"score {float(scores[i]):.4g} (sum of squared distances to "
                f"its {k} nearest) not among the {self.select(n)} lowest")
        picked = [shares[i] for i in chosen]
        p = self.weights(picked, ctx.result) if len(picked) > 1 else [1.0]
        ctx.result.used = tuple(c.member for c in picked)
        ctx.result.weights = {c.member: x for c, x in zip(picked, p, strict=True)}
        return weighted_sum(picked, p)


class Krum(MultiKrum):
    """Krum: the single share with the lowest multi-Krum score, as it is (weights
    play no part). Robust but throws away all other honest work: on clean
    non-IID data it costs the most accuracy of these rules."""

    name = "krum"
    PARAMS: ClassVar[dict[str, Any]] = {}
    uses_weights = False

    def check(self, members: int | None) -> None:
        Strategy.check(self, members)

    def select(self, n: int) -> int:
        return 1


class CenteredClipping(Strategy):
    """Centered clipping: start at v = the reference (our previous aggregate; our
    own released share when there is none, or with center = "own" as in
    ClippedGossip), then `iterations` times

        v <- v + sum_i p_i clip(x_i - v, tau),   clip(z, tau) = z min(1, tau / ||z||)

    with p the capped weight fractions. tau is fixed if given; by default it
    adapts each iteration to the (n - f)-th smallest distance ||x_i - v||, so at
    most the f furthest shares are clipped and honest ones only by their excess
    over the next honest distance. A hostile share moves v by at most p_i tau per
    iteration. Assumes f < n/2 for the adaptive tau: needs 2f + 1 shares. Never
    centred on our un-noised local model (that would break DP post-processing)."""

    name = "centered_clipping"
    assumption = "f < n/2 for the adaptive radius: needs 2f + 1 shares"
    PARAMS: ClassVar[dict[str, Any]] = {"tau": None, "iterations": 3, "center": "reference"}

    def needs(self, f: int) -> int:
        return 2 * f + 1

    def check(self, members: int | None) -> None:
        super().check(members)
        if self.params["tau"] is not None:
            _num(self.name, "tau", self.params["tau"], lo=0, lo_open=True)
        _int(self.name, "iterations", self.params["iterations"], lo=1)
        if self.params["iterations"] > MAX_CLIPPING_ITERATIONS:
            raise StrategyError(f"aggregation {self.name!r}: iterations must be at most "
                                f"{MAX_CLIPPING_ITERATIONS}, got {self.params['iterations']}")
        if self.params["center"] not in ("reference", "own"):
            raise StrategyError(f"aggregation {self.name!r}: center must be \"reference\" or \"own\", "
                                f"got {self.params['center']!r}")

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        n, f = len(shares), self.f
        p = self.weights(shares, ctx.result)
        if self.params["center"] == "reference" and not ctx.has_reference:
            ctx.result.fallbacks.append(Note("no_reference", "no previous aggregate: clipping "
                                             "around our own released share"))
        v = ctx.own.vector.clone() if self.params["center"] == "own" else ctx.center.clone()
        clipped: dict[str, float] = {}
        for _ in range(self.params["iterations"]):
            diffs = [c.vector - v for c in shares]
            norms = [float(torch.linalg.vector_norm(z)) for z in diffs]
            tau = self.params["tau"]
            if tau is None:
                tau = sorted(norms)[n - f - 1]
            step = torch.zeros_like(v)
            for c, z, d, w in zip(shares, diffs, norms, p, strict=True):
                k = 1.0 if d <= tau else tau / d
                if k < 1.0:
                    clipped[c.member] = min(k, clipped.get(c.member, 1.0))
                step += z * (w * k)
            v = v + step
        for member, k in clipped.items():
            ctx.result.clipped[member] = Note("centered_clipped", f"pulled with at most {k:.3g} of "
                                              "its distance (clipped to the radius)")
        ctx.result.used = tuple(c.member for c in shares)
        ctx.result.weights = {c.member: x for c, x in zip(shares, p, strict=True)}
        return v


# Each iteration is a pass over all shares; a handful converges (Karimireddy et
# al. use 1-3). More is only cost.
MAX_CLIPPING_ITERATIONS = 50

RULE_CLASSES: tuple[type[Strategy], ...] = (WeightedMean, NormBoundedMean, CoordinateMedian,
                                            TrimmedMean, Krum, MultiKrum, CenteredClipping)

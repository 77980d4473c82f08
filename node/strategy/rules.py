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

from node.strategy.base import FAR_FACTOR, Strategy, weighted_sum
from node.strategy.distance import median
from node.strategy.types import Candidate, Note, Round, StrategyError, _int, _num


class WeightedMean(Strategy):
    """FedAvg: the mean weighted by declared sample counts (after the weight caps;
    `weighting = "declared"` by default, the only rule where it is).

    Assumes f = 0: one hostile share moves the result anywhere (its values, or its
    weight without a cap). It is the baseline the others are measured against, so the
    far filter is off (`far_factor` = 0, written out like every parameter) unless asked
    for."""

    name = "mean"
    assumption = "no hostile member: one share can set the result"
    DEFAULTS: ClassVar[dict[str, Any]] = {"f": 0, "weighting": "declared", "far_factor": 0.0}

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        p = self.weights(shares, ctx.result)
        ctx.result.used = tuple(c.member for c in shares)
        ctx.result.weights = {c.member: x for c, x in zip(shares, p, strict=True)}
        return weighted_sum(shares, p)


class NormBoundedMean(WeightedMean):
    """Mean of shares whose distance from the reference is bounded (`distance.py`:
    clipped by default, or rejected); every share counts once by default
    (`weighting = "equal"`; "declared" for the capped declared weights).

    Survives any f < n/2 in the sense of a bounded effect: each hostile share
    moves the result by at most its weight fraction (1/n, or its cap) x (the bound + the
    honest update's norm), per round. Inside the bound it is the weighted mean, so it does not stop a sign
    flip or drift no larger than an honest update (see `distance.py`). Needs one
    share; below 2f + 1 shares its bound comes from our own share's distance."""

    name = "norm_bounded_mean"
    assumption = "f < n/2 for the bound; inside it every share counts"
    DEFAULTS: ClassVar[dict[str, Any]] = {"f": 1, "distance": "clip", "far_factor": FAR_FACTOR}


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
        ctx.result.weighting = "equal"
        if n % 2:
            return ordered[n // 2]
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMean(Strategy):
    """Per coordinate, drop the f largest and f smallest values, then take the
    mean of the n - 2f kept (`weighting`: "equal" by default, or the capped declared
    weights). With at most f hostile shares every kept value lies within the
    honest values' range, whatever the weights; under "declared" a hostile weight
    still chooses the point inside that range (to the honest extreme), under
    "equal" it buys nothing.
    Needs n >= 2f + 1 (refused at construction for a smaller consortium). A
    member trimmed in more than half of the coordinates is reported as
    down-weighted."""

    name = "trimmed_mean"
    assumption = "at most f hostile: needs 2f + 1 shares"

    def needs(self, f: int) -> int:
        return 2 * f + 1

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        n, f = len(shares), ctx.f
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
    take their mean (`weighting`: "equal" by default, or the capped declared
    weights: a hostile share that is kept then pulls with its capped fraction
    instead of 1/m). Assumes n > 2f + 2, so that an honest share's nearest
    n - f - 2 can all be honest: needs 2f + 3 shares. A hostile share close
    enough to be kept is within the honest spread.

    `score` says what the distances are between:

    - "distance" (Blanchard et al. 2017): the shares themselves. On non-IID data
      an honest member with more rows takes more local steps and lands further
      away, so with f = 2 of 8 on `digits` it left out the two largest honest
      members every round and kept two label-flippers (accuracy 0.62).
    - "direction": each share's update from the reference (our previous
      aggregate) scaled to unit length, so the size of an update plays no part:
      the label-flippers' directions are the outliers, but a 1e30 share is a
      direction like any other.
    - "staged": first the shares whose "distance" score is above
      `outlier_factor` (default 3) x the median score, the largest first and at
      most f of them (magnitude outliers: scale, huge, noise, strong sign flips);
      the rest of the n - m left out by the "direction" score. Without a
      reference (the first round) an update has no direction: the "distance"
      score alone is used, recorded as `krum_direction_undefined`.

    Every score excludes n - m shares whatever they are: on clean data that is
    f honest shares (the most unusual ones), the cost of the rule on clean data.
    What no score catches: a hostile share whose size and direction both look
    honest (a small drift, a backdoor no larger than an honest update)."""

    name = "multi_krum"
    assumption = "n > 2f + 2: needs 2f + 3 shares"
    PARAMS: ClassVar[dict[str, Any]] = {"m": None, "score": "distance", "outlier_factor": 3.0,
                                        "too_few": "trimmed_mean"}

    def needs(self, f: int) -> int:
        return 2 * f + 3

    def check(self, members: int | None) -> None:
        super().check(members)
        if self.params["m"] is not None:
            _int(self.name, "m", self.params["m"], lo=1)
        if self.params["too_few"] not in TOO_FEW:
            raise StrategyError(f"aggregation {self.name!r}: too_few must be one of "
                                f"{', '.join(TOO_FEW)}, got {self.params['too_few']!r}")
        self.check_score()

    def combine_few(self, shares: list[Candidate], ctx: Round) -> torch.Tensor | None:
        """Fewer than 2f + 3 shares (members missing; at eight members with f = 2, two
        down): with `too_few = "trimmed_mean"` (the default) and at least 2f + 1 shares,
        their coordinate-wise trimmed mean at the same f (every kept value within the
        honest values' range while at most f are hostile), instead of our own share
        alone. Measured (docs/results/robustness.md, "Members down"): two of eight down cost `digits`
        0.30 with our own share (0.665 against 0.969), less with the trimmed mean."""
        n, f = len(shares), ctx.f
        if self.params.get("too_few", "own") != "trimmed_mean" or n < 2 * f + 1:
            return None
        ctx.result.fallbacks.append(Note("krum_too_few", (
            f"{n} share(s) < {self.needs(f)} for {self.name} with f = {f}: combined by their "
            f"coordinate-wise trimmed mean at f = {f} (needs {2 * f + 1}) instead")))
        ordered = torch.stack([c.vector for c in shares]).sort(dim=0).values
        ctx.result.used = tuple(c.member for c in shares)
        ctx.result.weights = {c.member: 1.0 / n for c in shares}
        ctx.result.weighting = "equal"
        return ordered[f:n - f].mean(dim=0)

    def check_score(self) -> None:
        if self.params["score"] not in SCORES:
            raise StrategyError(f"aggregation {self.name!r}: score must be one of "
                                f"{', '.join(SCORES)}, got {self.params['score']!r}")
        _num(self.name, "outlier_factor", self.params["outlier_factor"], lo=1)

    def select(self, n: int, f: int) -> int:
        m = self.params["m"]
        return n - f if m is None else min(int(m), n)

    def ranking(self, shares: list[Candidate], ctx: Round) -> tuple[list[int], list[Note]]:
        """Share indices best first, and per share the note used if it is left out."""
        n, f, score = len(shares), ctx.f, self.params["score"]
        k = n - f - 2
        stacked = torch.stack([c.vector for c in shares])
        by_distance = _krum_scores(stacked, k)
        direction = None
        if score != "distance":
            updates = stacked - ctx.center
            norms = torch.linalg.vector_norm(updates, dim=1, keepdim=True)
            if ctx.has_reference and bool((norms > 0).all()):
                direction = _krum_scores(updates / norms, k)
            else:
                ctx.result.fallbacks.append(Note("krum_direction_undefined", (
                    "no previous aggregate, or a share equal to it: an update has no direction; "
                    "scored by distance alone")))
        if direction is None:
            notes = [Note("krum_not_selected", f"score {float(x):.4g} (sum of squared distances to "
                          f"its {k} nearest) not among the {self.select(n, f)} lowest")
                     for x in by_distance.tolist()]
            return _order(by_distance.tolist(), shares), notes
        rel_direction = _relative(direction)
        notes = [Note("krum_not_selected", f"direction score {x:.3g} x the median (sum of squared "
                      f"distances between update directions, {k} nearest) not among the "
                      f"{self.select(n, f)} lowest") for x in rel_direction.tolist()]
        if score == "direction":
            return _order(direction.tolist(), shares), notes
        rel = _relative(by_distance).tolist()
        far = [i for i in _order([-x for x in rel], shares)[:f]
               if rel[i] > self.params["outlier_factor"]]
        for i in far:
            notes[i] = Note("krum_far", f"distance score {rel[i]:.4g} x the median (sum of squared "
                            f"distances to its {k} nearest) > outlier_factor "
                            f"{self.params['outlier_factor']:g}")
        rest = [i for i in _order(direction.tolist(), shares) if i not in far]
        return rest + far, notes

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        n = len(shares)
        order, notes = self.ranking(shares, ctx)
        keep = self.select(n, ctx.f)
        chosen = sorted(order[:keep])
        for i in order[keep:]:
            ctx.result.excluded[shares[i].member] = notes[i]
        picked = [shares[i] for i in chosen]
        if len(picked) > 1:
            p = self.weights(picked, ctx.result)
        else:
            p, ctx.result.weighting = [1.0], "equal"
        ctx.result.used = tuple(c.member for c in picked)
        ctx.result.weights = {c.member: x for c, x in zip(picked, p, strict=True)}
        return weighted_sum(picked, p)


class StagedMultiKrum(MultiKrum):
    """Multi-Krum with `score = "staged"` (see `MultiKrum`): the shares far beyond
    the others' distance scores are left out first, the rest of the f by update
    direction. A rule of its own so that a consortium file naming it says exactly
    what every member applies. The bench's default (`node/strategy/consortium_rules.py`): at f = 1 it
    held every model-level attack within 0.02 of the clean plain mean on both
    tables and lost less on clean `digits` than multi_krum by distance."""

    name = "multi_krum_staged"
    PARAMS: ClassVar[dict[str, Any]] = {**MultiKrum.PARAMS, "score": "staged"}


SCORES = ("distance", "direction", "staged")
# What multi-Krum does with fewer than 2f + 3 shares: the trimmed mean at f, or keep our
# own released share ("own", as before issue 19).
TOO_FEW = ("trimmed_mean", "own")


def _krum_scores(points: torch.Tensor, k: int) -> torch.Tensor:
    """Per point, the sum of squared distances to its k nearest others (float64)."""
    dist2 = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    dist2.fill_diagonal_(float("inf"))
    if k <= 0:
        return torch.zeros(points.shape[0], dtype=torch.float64)
    return dist2.sort(dim=1).values[:, :k].sum(dim=1)


def _relative(scores: torch.Tensor) -> torch.Tensor:
    """Scores over their median (the true median; scale-free); all 1 when it is 0 or inf."""
    med = median(scores.tolist())
    return scores / med if 0 < med < float("inf") else torch.ones_like(scores)


def _order(scores: list[float], shares: list[Candidate]) -> list[int]:
    """Indices by ascending score, ties by member name (the same at every member)."""
    return sorted(range(len(shares)), key=lambda i: (scores[i], shares[i].member))


class Krum(MultiKrum):
    """Krum: the single share with the lowest multi-Krum score (any `score`), as it
    is (weights play no part). Robust but throws away all other honest work: on
    clean non-IID data it costs the most accuracy of these rules."""

    name = "krum"
    PARAMS: ClassVar[dict[str, Any]] = {"score": "distance", "outlier_factor": 3.0}
    uses_weights = False

    def check(self, members: int | None) -> None:
        Strategy.check(self, members)
        self.check_score()

    def select(self, n: int, f: int) -> int:
        return 1


class CenteredClipping(Strategy):
    """Centered clipping: start at v = the reference (our previous aggregate; our
    own released share when there is none, or with center = "own" as in
    ClippedGossip), then `iterations` times

        v <- v + sum_i p_i clip(x_i - v, tau),   clip(z, tau) = z min(1, tau / ||z||)

    with p the weight fractions: equal (1/n) by default; under weighting =
    "declared" the capped declared weights, with which f members each at the cap
    c pull with f c tau (half of it for f = 2, c = 0.25: that is how two members
    declaring 1e12 took the bench's `digits` model). tau is fixed if given; by default it
    adapts each iteration to the (n - f)-th smallest distance ||x_i - v||, so at
    most the f furthest shares are clipped and honest ones only by their excess
    over the next honest distance. A hostile share moves v by at most p_i tau per
    iteration. Assumes f < n/2 for the adaptive tau: needs 2f + 1 shares. Never
    centred on our un-noised local model (that would break DP post-processing).

    tau = "median" (ClippedGossip's adaptive radius, He, Karimireddy & Jaggi 2022,
    with their clipped fraction delta = 1/2): each iteration the radius is the lower
    median (the ceil(n/2)-th smallest) of the n distances ||x_i - v||, our own share's
    included, so every share further than the middle one is clipped to it. While at
    most half of the shares combined are hostile (our own counts as honest) it is an
    honest share's distance or below it: bounded by the honest spread whatever the
    hostile shares are, and no f needs to be known for it beyond f > 0 (f = 0 clips
    nothing). `tau_cap` (None: off) caps any radius at tau_cap x our own update's norm
    (our released share's distance from the reference), for the rounds where more than
    half are hostile: the bound then is ours, not theirs. It is the default
    rule on neighbours under a sparse topology (`node/strategy/consortium_rules.py`
    SPARSE_AUTO_PARAMS: center "own", one iteration: one ClippedGossip step around our
    released share; tau_cap 4)."""

    name = "centered_clipping"
    assumption = "f < n/2 for the adaptive radius: needs 2f + 1 shares"
    PARAMS: ClassVar[dict[str, Any]] = {"tau": None, "iterations": 3, "center": "reference",
                                        "tau_cap": None}

    def needs(self, f: int) -> int:
        return 2 * f + 1

    def check(self, members: int | None) -> None:
        super().check(members)
        if self.params["tau"] is not None and self.params["tau"] != TAU_MEDIAN:
            if isinstance(self.params["tau"], str):
                raise StrategyError(f"aggregation {self.name!r}: tau must be a positive number "
                                    f"or \"{TAU_MEDIAN}\", got {self.params['tau']!r}")
            _num(self.name, "tau", self.params["tau"], lo=0, lo_open=True)
        if self.params["tau_cap"] is not None:
            _num(self.name, "tau_cap", self.params["tau_cap"], lo=0, lo_open=True)
        _int(self.name, "iterations", self.params["iterations"], lo=1)
        if self.params["iterations"] > MAX_CLIPPING_ITERATIONS:
            raise StrategyError(f"aggregation {self.name!r}: iterations must be at most "
                                f"{MAX_CLIPPING_ITERATIONS}, got {self.params['iterations']}")
        if self.params["center"] not in ("reference", "own"):
            raise StrategyError(f"aggregation {self.name!r}: center must be \"reference\" or \"own\", "
                                f"got {self.params['center']!r}")

    def combine(self, shares: list[Candidate], ctx: Round) -> torch.Tensor:
        n = len(shares)
        p = self.weights(shares, ctx.result)
        if self.params["center"] == "reference" and not ctx.has_reference:
            ctx.result.fallbacks.append(Note("no_reference", "no previous aggregate: clipping "
                                             "around our own released share"))
        v = ctx.own.vector.clone() if self.params["center"] == "own" else ctx.center.clone()
        clipped: dict[str, float] = {}
        cap = _tau_cap(self.params["tau_cap"], ctx)
        for _ in range(self.params["iterations"]):
            diffs = [c.vector - v for c in shares]
            norms = [float(torch.linalg.vector_norm(z)) for z in diffs]
            tau = self.params["tau"]
            if tau is None:
                tau = sorted(norms)[n - ctx.f - 1]
            elif tau == TAU_MEDIAN:
                # the agreed f = 0 (no hostile member, e.g. one in-peer a round): delta = 0
                # in ClippedGossip, an infinite radius: the plain mean. The agreed f, not
                # what the far filter left of it: a far share dropped does not stop the
                # clipping of the next one. The lower median (the ceil(n/2)-th smallest):
                # with exactly half of the shares hostile the radius is still an honest
                # distance (the mean of the two middle ones would be half a hostile one).
                tau = sorted(norms)[(n - 1) // 2] if self.f else float("inf")
            tau = min(tau, cap)
            step = torch.zeros_like(v)
            for c, z, d, w in zip(shares, diffs, norms, p, strict=True):
                k = 1.0 if d <= tau else tau / d
                if k < 1.0:
                    clipped[c.member] = min(k, clipped.get(c.member, 1.0))
                step += z * (w * k)
            v = v + step
        for member, k in clipped.items():
            if self.params["tau"] == TAU_MEDIAN and k >= MEDIAN_NOTE_BELOW:
                continue  # the further half of honest shares: the rule working, not a finding
            ctx.result.clipped[member] = Note("centered_clipped", f"pulled with at most {k:.3g} of "
                                              "its distance (clipped to the radius)")
        ctx.result.used = tuple(c.member for c in shares)
        ctx.result.weights = {c.member: x for c, x in zip(shares, p, strict=True)}
        return v


def _tau_cap(factor: float | None, ctx: Round) -> float:
    """tau_cap x our own update's norm (our released share's distance from the reference,
    our previous aggregate); no cap without a factor, a reference or an update."""
    if factor is None or not ctx.has_reference:
        return float("inf")
    step = float(torch.linalg.vector_norm(ctx.own.vector - ctx.center))
    return factor * step if step > 0 else float("inf")


# centered_clipping's tau = "median": the radius is the lower median distance of the
# round's shares (ClippedGossip's adaptive radius with half of them clipped; see the class).
TAU_MEDIAN = "median"
# ... which clips half of the shares every round: the audit log and the warning name a
# share as clipped only when it was pulled with less than this fraction of its distance
# (more than twice the median distance away).
MEDIAN_NOTE_BELOW = 0.5

# Each iteration is a pass over all shares; a handful converges (Karimireddy et
# al. use 1-3). More is only cost.
MAX_CLIPPING_ITERATIONS = 50

RULE_CLASSES: tuple[type[Strategy], ...] = (WeightedMean, NormBoundedMean, CoordinateMedian,
                                            TrimmedMean, Krum, MultiKrum, StagedMultiKrum,
                                            CenteredClipping)

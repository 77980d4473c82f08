"""Consensus distance: how far the members' models are apart after each round, under a
sparse topology (gossip/topology.py), where every member combines different shares.

For round r, with x_i member i's model (flat float vector) right after it closed round r
and x̄ their mean, the distance is the root mean square of ||x_i - x̄||:

    d_r = sqrt( (1/n) Σ ||x_i - x̄||² ) = sqrt( (1/n) Σ ||x_i||² - ||x̄||² )

kept as running sums (Σ x_i, Σ ||x_i||², in float64) so a round costs one model's memory
whatever the number of members; and d_r / ||x̄|| (`consensus_relative`), which does not
grow merely because the weights do. With local training every round on skewed data the
distance does not go to 0: each round's training pulls the members apart again and the
topology's mixing pulls them together, so it settles where the two balance (a ring
mixes slowest). At full mesh every honest member combines the same shares (d_r = 0 up
to float rounding), so summary.json carries both for sparse topologies only
(round -> value) and the simulator draws them (consensus.png).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from node.learn.models import get_flat
from node.runtime.round_report import RoundReport


class ConsensusTracker:
    """Fed each member's model as it closes a round (`seen`); `distances` once rounds
    are complete (every member still sharing has reported them)."""

    def __init__(self, members: int) -> None:
        self.members = members
        self._sum: dict[int, np.ndarray] = {}
        self._sq: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self.distances: dict[int, float] = {}
        self.relative: dict[int, float] = {}

    def seen(self, node: Any, rep: RoundReport) -> None:
        if rep.stopped:
            self.members -= 1
            return
        x = get_flat(node.model).detach().numpy().astype(np.float64)
        r = rep.round
        if r not in self._sum:
            self._sum[r], self._sq[r], self._count[r] = np.zeros_like(x), 0.0, 0
        self._sum[r] += x
        self._sq[r] += float(x @ x)
        self._count[r] += 1
        if self._count[r] >= self.members:
            self._finish(r)

    def _finish(self, r: int) -> None:
        n, total = self._count.pop(r), self._sum.pop(r)
        mean = total / n
        var = self._sq.pop(r) / n - float(mean @ mean)
        self.distances[r] = math.sqrt(max(var, 0.0))
        norm = math.sqrt(float(mean @ mean))
        self.relative[r] = self.distances[r] / norm if norm > 0 else float("nan")

    def close(self) -> dict[str, dict[str, float]]:
        """summary.json's consensus_distance and consensus_relative: every round, complete
        ones and those some member never reported (a stopped one) over those that did."""
        for r in sorted(self._sum):
            self._finish(r)
        return {"consensus_distance": {str(r): d for r, d in sorted(self.distances.items())},
                "consensus_relative": {str(r): d for r, d in sorted(self.relative.items())}}


def plot_consensus(relative: dict[str, float], title: str, path: Path) -> None:
    # lean start: matplotlib only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lean start: the same, after the backend is chosen

    rounds = sorted(int(r) for r in relative)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r + 1 for r in rounds], [relative[str(r)] for r in rounds], marker="o", lw=1.5)
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance / ||mean model||")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

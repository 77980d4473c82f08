"""What a node reports of each round it finishes: the runtime writes it (Node.run's
on_round callback); the daemon's round line and the simulator's progress lines
(node/rehearsal/simulation/output.py RoundPrinter) read it. A leaf: it imports nothing
of the runtime, so a reader of the type does not load the node."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoundReport:
    member: str
    round: int
    metrics: dict[str, float]
    epsilon: float | None
    received: list[str]
    missing: list[str]
    update_norm: float
    seconds: float
    resent: bool = False  # the release came from the outbox (restart), not new training
    next_round: int = 0
    stopped: str | None = None  # set on the one report of a node that stopped sharing
    # 95 % intervals of the metrics on the held-out rows (node/ops/intervals.py), and their count
    intervals: dict[str, list[float]] = field(default_factory=dict)
    eval_rows: int = 0

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
    # a secure round (issue 22): its outcome, from the round's audit diagnostics (secure_node
    # aggregate): {"ok", "reason", "members", "dealt", "entered", "selected"}; `received` is
    # then the selected members (none when the round failed) and `missing` the machine's
    secure: dict | None = None


def secure_text(sec: dict) -> str:
    """A secure round for the round line (the daemon's and the simulator's): "secure
    opened: dealt 4/4, entered 4, selected 3 (not bank-b)" or "secure FAILED
    (too_few_openers): dealt 3/4 (not bank-d), entered 3". Who dealt, entered and was
    selected is what the round did; the machine's "shares received" count is not (a secure
    round sends no share to aggregate)."""
    members = sec.get("members") or []
    dealt, entered, selected = sec.get("dealt", []), sec.get("entered", []), sec.get(
        "selected", [])
    absent = [m for m in members if m not in dealt]
    dropped = [m for m in entered if m not in selected]  # entered, left out by the selection
    head = "secure opened" if sec.get("ok") else f"secure FAILED ({sec.get('reason')})"
    return (f"{head}: dealt {len(dealt)}/{len(members) or '?'}"
            + (f" (not {', '.join(absent)})" if absent else "")
            + f", entered {len(entered)}"
            + (f", selected {len(selected)}" + (f" (not {', '.join(dropped)})" if dropped
                                                 else "") if sec.get("ok") else ""))

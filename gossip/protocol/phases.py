"""The shape of a round: the consortium's timing (RoundParams) and the phases a round
may have (`RoundMachine(phases=...)`), each an exchange with a set of peers and a
deadline. SHARE is always first; ECHO (issue 19: members agree on what they aggregate,
gossip/protocol/echo.py) may follow it. Whether a consortium's rounds have the echo
phase is the consortium's [rules] `echo` (pinned with the id; node/runtime/echo_round.py
passes `phases=(SHARE, ECHO)` and the rule's f)."""

from __future__ import annotations

from dataclasses import dataclass

from gossip.errors import LocalError


@dataclass(frozen=True)
class RoundParams:
    """The consortium's timing and the node's run (node/runtime/config.py's gossip section)."""

    rounds: int
    round_deadline_s: float
    absent_after: int = 1
    min_members: int | str = "majority"
    normalize_wait_s: float = 300.0

    def __post_init__(self) -> None:
        if self.round_deadline_s <= 0:
            raise LocalError(f"round_deadline_s = {self.round_deadline_s}: must be > 0")
        if self.absent_after < 1:
            raise LocalError(f"absent_after = {self.absent_after}: at least 1")
        if self.rounds < 0:
            raise LocalError(f"rounds = {self.rounds}: must be >= 0")


@dataclass(frozen=True)
class PhaseSpec:
    """One exchange of a round: its name, the peers it sends to and waits for (None:
    every neighbour still in the round) and its deadline (None: the round deadline)."""

    name: str
    peers: frozenset[str] | None = None
    deadline_s: float | None = None


SHARE = PhaseSpec("share")
# The digest echo: a phase named "echo" is run by the machine itself (it signs and sends
# the echo, files the peers', and `Close` carries the agreed set); any PhaseSpec named so
# (other peers, another deadline) is the echo.
ECHO = PhaseSpec("echo")


@dataclass
class Wait:
    """What a stage of the machine waits for: reported as `what` (None: never reported)
    from `next_report` on, given up at `end` (None: no time limit)."""

    what: str | None
    start: float
    end: float | None
    next_report: float
    reported: bool = False

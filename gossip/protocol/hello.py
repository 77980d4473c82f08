"""How often a member's hello is answered. Pure; time is an argument.

A member that has just (re)started says hello (a hello message asking for our round,
or a prekey announcement asking for our prekeys). We answer each kind at most once per
member every HELLO_INTERVAL_S: a member that keeps saying hello gets no more than that
(runner.py `_answer_hello`). Memory: one time per (member, kind); members only (the
verifier has checked the sender's signature before anything here sees it).
"""

from __future__ import annotations

# A member's hellos are answered at most this often (a restart takes longer).
HELLO_INTERVAL_S = 2.0


class HelloLimiter:
    def __init__(self, interval_s: float = HELLO_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._answered: dict[tuple[str, str], float] = {}

    def due(self, member: str, kind: str, now: float) -> bool:
        """Whether a hello of `kind` ("hello" or "prekey") from `member` may be answered."""
        last = self._answered.get((member, kind))
        return last is None or now - last >= self.interval_s

    def answered(self, member: str, kind: str, now: float) -> None:
        self._answered[(member, kind)] = now

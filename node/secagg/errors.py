"""The secure-aggregation core's errors: one family (`SecAggError`), each saying whose fault
it is. A peer's fault carries the member indices at fault; our own misuse says so."""

from __future__ import annotations


class SecAggError(ValueError):
    """Base of every error raised by node.secagg."""


class TooFewPieces(SecAggError):
    """Fewer pieces arrived than decoding needs (members dropped out beyond the threshold).
    Nobody's fault in particular; the round cannot complete and the next one goes on."""

    def __init__(self, what: str, needed: int, arrived: int, missing: tuple[int, ...] = ()):
        self.needed, self.arrived, self.missing = needed, arrived, missing
        gone = f" (missing: members {', '.join(map(str, missing))})" if missing else ""
        super().__init__(f"{what}: {needed} pieces needed, {arrived} arrived{gone}")


class TooManyWrong(SecAggError):
    """The pieces that arrived disagree in more places than the redundancy corrects: more
    members sent wrong pieces than the code tolerates (their fault, not attributable)."""


class PieceError(SecAggError):
    """Bytes or a piece from a peer that are malformed: the sender's fault (`sender`)."""

    def __init__(self, reason: str, sender: int | None = None):
        self.sender = sender
        who = f"member {sender}: " if sender is not None else ""
        super().__init__(f"{who}{reason}")

"""One exception family for flnode, split by whose fault it is (as h11 does).

- `RemoteError`: a peer broke the protocol. It carries the peer (as far as we
  know it) and a stable machine-readable `reason` that the node counts, writes
  to its audit log and logs once per (peer, reason). The node keeps running.
- `LocalError`: the operator or the caller got something wrong (a config key,
  a key file's permissions, a consortium file). The message names the key or
  file and, where we know it, the fix.
"""

from __future__ import annotations


class FlnodeError(Exception):
    """Base of every error flnode raises on purpose."""


class LocalError(FlnodeError):
    """Our side is wrong: bad config, bad file, API misuse. Fix it locally."""


class RemoteError(FlnodeError):
    """A peer sent something we refuse. `reason` is a stable counter name."""

    def __init__(self, reason: str, detail: str, peer: str | None = None,
                 signed_round: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.peer = peer
        # Set when the refused message was authentic (a member's valid, fresh signature)
        # and so its round is known to be the sender's: a share not sealed for us.
        self.signed_round = signed_round
        who = peer if peer is not None else "unknown peer"
        super().__init__(f"rejected share from {who}: {reason}: {detail}")


def describe(exc: BaseException, limit: int = 200) -> str:
    """One log-friendly line for an exception from a library we call."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < limit else text[:limit] + "…"

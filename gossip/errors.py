"""One exception family for flnode, split by whose fault it is (as h11 does).

- `RemoteError`: a peer broke the protocol. It carries the peer (as far as we
  know it) and a stable machine-readable `reason` that the node counts, writes
  to its audit log and logs once per (peer, reason). The node keeps running.
- `LocalError`: the operator or the caller got something wrong (a config key,
  a key file's permissions, a consortium file). The message names the key or
  file and, where we know it, the fix.
"""

from __future__ import annotations

# A rejection detail goes into the audit log and the node's log once per message; a
# peer must not be able to make it long. Peer values inside it go through `shorten`;
# this caps the whole detail (and a peer label) as a backstop.
MAX_DETAIL = 512
MAX_PEER_LABEL = 128
SHORT = 64


def shorten(value: object, limit: int = SHORT) -> str:
    """The repr of a peer-controlled value, cut to about `limit` characters.

    Byte strings and strs are sliced *before* repr (a 1 MiB field is never copied
    whole into a message); anything else is repr'd and cut. The result says how long
    the value was when it was cut."""
    if isinstance(value, bytes | bytearray | memoryview):
        n = len(value) if not isinstance(value, memoryview) else value.nbytes
        text = repr(bytes(value[:limit]))
    elif isinstance(value, str):
        n = len(value)
        text = repr(value[:limit])
    else:
        n = None
        text = repr(value)
    if n is not None and n > limit:
        return f"{text[:limit + 3]}…({n} long)"
    if len(text) > limit + 3:
        return text[:limit] + "…"
    return text


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"…({len(text)} chars, cut)"


class FlnodeError(Exception):
    """Base of every error flnode raises on purpose."""


class LocalError(FlnodeError):
    """Our side is wrong: bad config, bad file, API misuse. Fix it locally."""


class RemoteError(FlnodeError):
    """A peer sent something we refuse. `reason` is a stable counter name."""

    def __init__(self, reason: str, detail: str, peer: str | None = None,
                 signed_round: int | None = None) -> None:
        self.reason = reason
        self.detail = _cap(str(detail), MAX_DETAIL)
        # Member names are short; a transport's peer hint (an address, a topic part)
        # may come from the peer.
        if isinstance(peer, str) and len(peer) > MAX_PEER_LABEL:
            peer = _cap(peer, MAX_PEER_LABEL)
        self.peer = peer
        # Set when the refused message was authentic (a member's valid, fresh signature)
        # and so its round is known to be the sender's: a share not sealed for us.
        self.signed_round = signed_round
        who = self.peer if self.peer is not None else "unknown peer"
        super().__init__(f"rejected share from {who}: {reason}: {self.detail}")


def describe(exc: BaseException, limit: int = 200) -> str:
    """One log-friendly line for an exception from a library we call."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < limit else text[:limit] + "…"

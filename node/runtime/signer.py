"""Signer: everything this member signs, and the prekeys its shares are sealed with.

Privacy and safety invariants that live here:

- **A sequence number is spent once, ever** (`sign`): the next free number is on disk,
  fsync'd, before the signed message exists anywhere but in this call's memory, so a
  kill at any point never re-uses a number (receivers refuse a repeated one as a
  replay).
- **A prekey is on disk before anyone can seal to it, and deleted once the rounds it
  served are closed** (`rotate_prekeys`, `forget_prekeys`): forward secrecy for recorded
  traffic.

The round logic (when to wait for prekeys, who is still in a round) is the node's; the
signer only signs, seals and keeps the prekey files.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from gossip import envelope
from gossip.seal import Sealing
from node.runtime.identity import Identity
from node.runtime.state import StateDir

log = logging.getLogger("flnode.node")

# One message to send: (None: broadcast, or a member's name: to it only, the bytes).
Send = tuple[str | None, bytes]


class Signer:
    """Signs with this member's key and the next sequence number; seals shares."""

    def __init__(self, identity: Identity, consortium_id: bytes, state: StateDir,
                 sealing: Sealing | None, rejected: Counter[str]) -> None:
        self.name = identity.name
        self.identity = identity
        self.consortium_id = consortium_id
        self.state = state
        self.sealing = sealing
        self.rejected = rejected  # the node's rejection counters (unsealable prekeys)
        self.seq = 0  # the next number to sign with (restored from the checkpoint)

    def sign(self, kind: str, r: int, body: bytes | Sequence[bytes]) -> bytes:
        """Sign a message with the next sequence number. Each is used once, ever: the
        next free number is on disk (fsync'd) before this returns, so before anything
        signed can leave, whatever the caller does next."""
        data = envelope.pack(self.identity.signing_key, self.consortium_id, kind, r, self.seq,
                             body)
        self.seq += 1
        self.state.reserve_seq(self.seq)  # fsync'd: the one place a number is spent
        return data

    def sign_many(self, kind: str, r: int, bodies: Sequence[bytes]) -> list[bytes]:
        """sign() for each body in turn, the numbers they take reserved on disk (fsync'd)
        once, before any of them is signed: a secure round deals to every other member,
        and one durable write per deal (tmp, fsync, rename, fsync of the directory) was
        most of a real node's writes in a round. The seq file ends as sign() leaves it."""
        if not bodies:
            return []
        first = self.seq
        self.state.reserve_seq(first + len(bodies))  # fsync'd before any number is used
        out = [envelope.pack(self.identity.signing_key, self.consortium_id, kind, r,
                             first + i, body) for i, body in enumerate(bodies)]
        self.seq = first + len(bodies)
        return out

    def seal(self, r: int, body: bytes, recipients: dict) -> bytes | None:
        """A share body sealed to `recipients`' prekeys for round r; None if nobody could
        be sealed for (every recipient's prekey refused)."""
        assert self.sealing is not None
        sealed = self.sealing.seal(body, r, recipients)
        for member, why in sorted(self.sealing.left_out.items()):
            # A member's prekey we cannot seal to (e.g. a low-order key it signed): it
            # is left out of this share and not sealed for until it announces again.
            self.rejected["unsealable_prekey"] += 1
            log.error("%s: round %d: cannot seal for %s (%s); left out of our share",
                      self.name, r + 1, member, why)
        if len(self.sealing.left_out) == len(recipients):
            log.error("%s: round %d: nobody could be sealed for; our share is not sent",
                      self.name, r + 1)
            return None
        return sealed

    def rotate_prekeys(self, r: int, announce: bool = False) -> list[bytes]:
        """Hold prekeys for the epochs round r may need (on disk before anyone can seal to
        them), delete older ones; the announcement bodies to sign and send when that
        changed (and always with `announce`, at start: we may have missed theirs): the one
        for replies, then with `announce` a "hello" one that asks for theirs. [] if there
        is nothing to announce."""
        if self.sealing is None:
            return []
        new, gone = self.sealing.rotate(r)
        for e in new:  # on disk before anyone can seal to it
            self.state.save_prekey(e, bytes(self.sealing.own.keys[e]))
        for e in gone:
            self.state.delete_prekey(e)
        if new or gone:
            log.info("%s: prekeys for epochs %s; deleted %s", self.name,
                     sorted(self.sealing.own.keys), gone or "none")
        if not (new or announce):
            return []
        messages = [self.sealing.announcement(hello=False)]
        if announce:
            messages.append(self.sealing.announcement(hello=True))
        return messages

    def forget_prekeys(self) -> None:
        """No rounds left: delete every prekey, so nothing on this disk can open recorded
        traffic any more."""
        if self.sealing is None or not self.sealing.own.keys:
            return
        epochs = sorted(self.sealing.own.keys)
        for e in epochs:
            self.state.delete_prekey(e)
        self.sealing.own.keys.clear()
        log.info("%s: no rounds left: deleted prekeys for epochs %s", self.name, epochs)

    def outgoing(self, r: int, data: bytes, peers: list[str]) -> list[Send] | None:
        """How our signed share for round r goes out to `peers` (the members still in
        it): None, broadcast (in the background, as every honest member does)."""
        return None

    def after_send(self, r: int, data: bytes) -> None:
        """The sends `outgoing` returned have been made (an honest signer returns none)."""

    def close(self) -> None:
        """The run is over (nothing of the honest signer runs on its own)."""


def sign_all(signer: Signer, kind: str, r: int, bodies: Sequence[bytes]) -> list[bytes]:
    """`signer`'s messages for `bodies`, their numbers reserved on disk once (sign_many); a
    rehearsal's wrapped signer (node/rehearsal/attacks.py) without it signs them one by one,
    through its own sign."""
    many = getattr(signer, "sign_many", None)
    if many is None:
        return [signer.sign(kind, r, b) for b in bodies]
    return list(many(kind, r, bodies))

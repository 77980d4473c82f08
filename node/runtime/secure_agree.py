"""The agreement step of a secure round (issue 22, review finding C2): its bytes, its
quorum, and how two agreements are compared. node/runtime/secure_round.py `SecureRound.agree`
and `sum` use it; docs/privacy-secure.md "The agreement step" argues it."""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b

from gossip.bodies import decode_secagg
from gossip.errors import RemoteError

# The agreement's parts (gossip/bodies.py bounds the message at 32 (1 + 2n) bytes): a
# BLAKE2b-256 hash of what we open, then per member 1..n the digest of its check body and of
# its degree2 body as we used them (AGREE_NONE: none came).
AGREE_BYTES = 32
AGREE_NONE = bytes(AGREE_BYTES)
AGREE_STEPS = ("check", "degree2")  # the step bodies an agreement names
ENTER_STEPS = ("check",)  # the step bodies an entry agreement names (before degree2)


def agreement_quorum(members: int, threshold: int) -> int:
    """Matching agreements (ours included) a member needs before it opens its sum piece:
    ceil((n + t + 1) / 2), the least q with 2q - n >= t + 1. Any two quorums then share
    t + 1 members, so at least one honest member, who signs one agreement a round (stored
    before it leaves, re-sent byte for byte after a restart) and broadcasts it: two honest
    members can never both hold a quorum for different statements. Equal to n - t at
    n = 3t + 1; at larger n it tolerates more members missing than n - t would."""
    return (members + threshold + 2) // 2


def body_digest(body: bytes) -> bytes:
    """A step body's digest in an agreement (BLAKE2b-256 of the signed body's bytes)."""
    return blake2b(bytes(body), digest_size=AGREE_BYTES, person=b"flnode-sa-body").digest()


def differing(mine: bytes, theirs: bytes, members: int,
              steps: tuple[str, ...] = AGREE_STEPS) -> list[tuple[int, str, bool]]:
    """The table entries two agreements of equal length disagree on: (member, step, whether
    the other agreement has none for it); `steps`: the bodies each member's entry names."""
    out = []
    for i in range(1, members + 1):
        for k, step in enumerate(steps):
            at = AGREE_BYTES * (1 + len(steps) * (i - 1) + k)
            if mine[at:at + AGREE_BYTES] != theirs[at:at + AGREE_BYTES]:
                out.append((i, step, theirs[at:at + AGREE_BYTES] == AGREE_NONE))
    return out


def opened_elsewhere(sums: Mapping[str, bytes], me: str, members: tuple[str, ...],
                     threshold: int) -> tuple[str, ...]:
    """The members whose sum message carries a piece, when our own round failed: more than
    t of them means an honest one opened (an honest member opens only with a quorum of
    agreements), so the round's aggregate was applied elsewhere and our model (the round's
    start) now differs from theirs (`missed_opening`). Empty: t or fewer (they may all be
    hostile), or none."""
    opened = []
    for sender, body in sorted(sums.items()):
        if sender == me or sender not in members:
            continue
        try:
            msg = decode_secagg(body, len(members), sender)
        except RemoteError:
            continue
        if msg.step == "sum" and msg.pieces:
            opened.append(sender)
    return tuple(opened) if len(opened) > threshold else ()


__all__ = ["AGREE_BYTES", "AGREE_NONE", "AGREE_STEPS", "ENTER_STEPS", "agreement_quorum", "body_digest",
           "differing", "opened_elsewhere"]

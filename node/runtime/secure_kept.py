"""Members kept out of later secure rounds once proven at fault (review s5 R5). Pure; used
by `SecureRound` (node/runtime/secure_round.py: deal, file_deal, _entry) and
secure_explain.py (where the proof is found); docs/privacy-secure.md "Robustness" argues it.

Who: a member named `mask_check_liar` (in every explanation of the opened checks: never an
honest member, node/secagg/explain.py) in an earlier round at this member (`PROVEN`). Before,
it came back every round: liars forced the exhaustive explanation search each round
(0.14 s of CPU at n = 13, 1.2 s at n = 16, 3.8 s and a give-up at n = 19).

How, so that the members' views cannot diverge over it. Our list is our own (another
member may not have seen the same checks), so it must not change how we read anything the
others read the same way. It changes only what we send and hold, which the others see in
signed data: (1) we deal the member nothing and put `KEPT_OUT` (32 zero bytes, never a
BLAKE2b digest in practice) in its slot of our commitment, which every holder of our
dealing receives; (2) we refuse its deal (`kept_out`, named; our check then does not name
its dealing). Every member, judging from the checks, then (3) voids a holder's claim to
hold a dealing whose commitment (as it received it) has `KEPT_OUT` in that holder's slot:
the holder cannot have those pieces, so its check values for that dealing are neither
decoded nor counted as holding (`void_claims`; the entry counts it as lacking the dealing,
secure_entry.py). A member that keeps nobody out reads the same commitments the same way.

What it gives: the liar holds no piece of our vector, its dealing lacks our holding (and
drops when more than t members lack it), and its wrong check values in our dealing's columns
no longer count, so they cannot leave our dealing unresolved: with every liar kept out by
the honest members no search runs. What it does not: wrong values in the column of an
accomplice that deals to it and is never named still force the search there; a member
that did not hold a dealing (so lacks its commitment) reads claims on it unvoided (a view
that differs only in a round with a lost deal, which the entry agreement catches); the
list lives in memory (a restart forgets it: the liar is named again when it lies again)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from node.runtime.secure_disputes import COMMIT_BYTES

if TYPE_CHECKING:
    from node.runtime.secure_round import SecureRound

# A holder's slot in our commitment when we kept it out: we dealt it nothing
KEPT_OUT = bytes(COMMIT_BYTES)
# The reasons a member is named for that prove it at fault from signed messages alone and can
# never name an honest member (node/secagg/explain.py): it is kept out of later rounds
PROVEN = ("mask_check_liar",)


def prove(sr: SecureRound, member: str, reason: str) -> None:
    """Record that round `sr` proved `member` at fault (`reason` in PROVEN): the rounds
    created after this one keep it out (SecureRounds passes the record on)."""
    assert reason in PROVEN, reason
    sr.proven.setdefault(member, f"{reason} in round {sr.r + 1}")


def kept_out_points(sr: SecureRound) -> frozenset[int]:
    """The evaluation points of the members this round keeps out."""
    return frozenset(sr.index[m] for m in sr.kept_out if m in sr.index and m != sr.me)


def slot(commitment: bytes, holder: int) -> bytes:
    """Holder's slot (1-based) of a dealer's commitment."""
    return commitment[COMMIT_BYTES * (holder - 1):COMMIT_BYTES * holder]


def void_claims(commitments: Mapping[int, bytes], held: Mapping[int, set[int]]
                ) -> dict[int, set[int]]:
    """`held` (check sender -> the dealers its check names) without the claims a dealer's
    commitment (as we received it) rules out: `KEPT_OUT` in that holder's slot."""
    out = {}
    for j, dealers in held.items():
        out[j] = {i for i in dealers
                  if i not in commitments or slot(commitments[i], j) != KEPT_OUT}
    return out


__all__ = ["KEPT_OUT", "PROVEN", "kept_out_points", "prove", "slot", "void_claims"]

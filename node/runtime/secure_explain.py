"""The dealings the per-dealer check leaves unresolved, judged from every dealer's checks at
once (review 2 F12; the rule and why it never names an honest member:
node/secagg/explain.py). Called by `SecureRound._judge` (node/runtime/secure_round.py)
after its per-dealer pass; pure, as that module."""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.runtime import secure_kept
from node.secagg import explain
from node.secagg.pieces import Piece

if TYPE_CHECKING:
    from node.runtime.secure_round import SecureRound


def unresolved(sr: SecureRound, held: dict[int, set[int]], pieces: dict[int, Piece],
               consistent: list[int], disputed: set[int]) -> tuple[list[int], set[int]]:
    """`_judge`'s answer, with the dealers it could not settle (held by at least 3t + 1
    holders, neither consistent nor refused) entered where every explanation of the checks
    gives them the same codeword (their disputes then settled as any other), and the
    members in every explanation named `mask_check_liar` and kept from opening."""
    n, t = sr.params.members, sr.params.threshold
    checks = {j: p.values for j, p in pieces.items() if p.values.size == 2 * n}
    holders_of = {i: frozenset(j for j in checks if i in held[j])
                  for i in sorted(set().union(*held.values()) if held else ())}
    open_ = [i for i, hs in holders_of.items() if len(hs) >= 3 * t + 1 and i not in consistent
             and not sr.out.named.get(sr.members[i - 1], "").startswith("inconsistent_pieces")]
    if not open_:
        return consistent, disputed
    got = explain.explain(n, t, checks, holders_of)
    if got is None:  # more than the search's bound, or more than t liars: as before
        return consistent, disputed
    for j in got.named:
        name, before = sr.members[j - 1], sr.out.named.get(sr.members[j - 1], "")
        why = (f"mask_check_liar: in every set of at most t = {t} members that explains the "
               "opened checks (it opened wrong checks or dealt inconsistent pieces; a proof "
               "from the checks: node/secagg/explain.py)")
        sr.out.named[name] = why if not before or before.startswith("dispute:") else \
            f"{before}; also {why}"
        secure_kept.prove(sr, name, "mask_check_liar")  # kept out of later rounds
        disputed.add(j)
    for i in open_:
        if i not in got.certain:
            continue
        consistent.append(i)
        for (j, kind), expected in got.certain[i].items():
            sr.disputes.setdefault((i, j), {})[kind] = expected
            disputed.add(j)
            sr.out.named.setdefault(sr.members[j - 1], (
                f"dispute: its check of {sr.members[i - 1]}'s dealing disagrees (it, or "
                "that dealer, sent a wrong value: a claim, not a proof)"))
    return sorted(consistent), disputed


__all__ = ["unresolved"]

"""Who a mismatching agreement shows at fault (review finding C2, review 2 F1): called by
`SecureRound._quorum` (node/runtime/secure_round.py) for each agreement that differs from
ours; docs/privacy-secure.md "The agreement step" argues the naming. Pure, as that module."""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.runtime.secure_agree import differing

if TYPE_CHECKING:
    from node.runtime.secure_round import SecureRound


def disagree(sr: SecureRound, sender: str, theirs: bytes, mine: bytes,
             steps: tuple[str, ...]) -> None:
    """Name who a mismatching agreement shows at fault: the sender, always. Its own check
    or degree2 body reported with another digest than it signed to us (`split_view`, a
    proof: both signed by it); the same bodies and another outcome, or our own body
    misreported (`bad_agreement`); a third member's body reported otherwise
    (`split_claim`: that member may have split the views, or the sender lies; nobody
    else is named on the sender's word)."""
    k = sr.index[sender]
    by = sr.out.disagreed
    differ = differing(mine, theirs, sr.params.members, steps)
    if not differ:
        sr.out.named.setdefault(sender, "bad_agreement: the same check and degree2 "
                                "bodies as ours and another outcome (every member "
                                "computes the same from the same bodies)")
        by[sender] = (*by.get(sender, ()), sender)
        return
    for i, step, lost in differ:
        who = sr.members[i - 1]
        if i == sr.i and not lost:
            sr.out.named.setdefault(sender, f"bad_agreement: it reports our {step} body "
                                    "with another digest than the one we signed")
            who = sender
        elif i == k:
            if sr.out.named.get(sender, "").startswith(("split_claim", "dispute:")):
                del sr.out.named[sender]  # the proof replaces the weaker claim
            sr.out.named.setdefault(sender, f"split_view: its agreement names its own "
                                    f"{step} body with another digest than the one it "
                                    "signed to us (both signed by it: a proof)")
        elif i != sr.i:  # a claim about a third member, backed by no body it signed
            # (review 2 F1: naming `who` let one member frame any honest one): the
            # sender's alone, with the evidence filed under it, never against `who`
            sr.out.named.setdefault(sender, f"split_claim: its agreement reports {who}'s "
                                    f"{step} body with another digest than the one "
                                    f"{who} signed to us (unproven: {who} sent members "
                                    f"different bodies, or {sender} misreports)")
            if who not in sr.out.claims.get(sender, ()):
                sr.out.claims[sender] = (*sr.out.claims.get(sender, ()), who)
            who = sender
        else:
            continue  # our own body did not reach the sender: no one to name
        if sender not in by.get(who, ()):
            by[who] = (*by.get(who, ()), sender)


__all__ = ["disagree"]

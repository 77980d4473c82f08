"""Which dealings enter a secure round, who opens them, and how few contributions a round may
open (review s5 R4). Pure; called by `SecureRound._entry` and `agree`
(node/runtime/secure_round.py); docs/privacy-secure.md "Which dealings enter" argues it.

The openers of a step must hold every entered dealing (each opened piece is computed from
the opener's pieces of all of them), and a step needs `need` openers (3t + 1 for the
degree-2 values, 2t + 1 for the sum alone). When fewer check senders hold every consistent
dealing, some dealing must stay out, or the round fails.

The rule: a dealing is dropped only when MORE than t check senders lack it (their checks
do not name it), the one the fewest hold first (ties: the highest index), and only until
`need` openers hold every entered dealing. If the dealing the fewest hold is lacked by at
most t senders and too few openers remain, the round fails (`too_few_openers`).

Why it is sound. At most t members are hostile, so among the check senders (a member
whose check did not come, or was malformed, is not one: it neither holds nor lacks) at
most t lie about what they hold. A dealing more than t senders lack is lacked by at least
one honest sender: it genuinely failed to reach an honest member (lost, late, or refused
there as a bad piece), so dropping it drops nothing the coalition chose. An honest dealing
that reached every honest sender is lacked only by liars, at most t: it is never dropped.
Before (drop the dealing held by the fewest until enough openers), t colluders whose checks
claimed to hold only a victim's dealing and their own made every other honest dealing the
least held and had it dropped: the round opened the victim's vector plus theirs, "ok",
nobody named (tests/test_secure_attacks.py). Now their claims only take themselves out of
the openers: the round fails, as it would if they had sent no check at all.

What a coalition can still force: a failed round. t colluders at n <= 4t can deny holding
dealings (or send no check) so that fewer than 3t + 1 hold them; a hostile dealer that
leaves up to t honest members out of its dealing keeps them from opening (its dealing is
lacked by at most t: ambiguous with liars denying an honest one, so not dropped) and, with
the other colluders silent, fails a round with n - 2t < need (n <= 4t for the sum alone,
n <= 5t for the degree-2 values): the same reach as the mask-check liars that wait
(docs/privacy-secure.md, "All dealers' checks at once"). It cannot choose which honest
dealings are opened beyond those an honest member genuinely lacks.

The floor on contributions (`MIN_HONEST`): an opened sum (and the degree-2 values, opened
only for a sum) needs at least t + 2 contributors, so at least two honest ones whatever
the selection, dropouts or losses left: t colluders and one honest member would learn that
member's exact vector by subtracting their own. Fewer fail `too_few_contributors`."""

from __future__ import annotations

from collections.abc import Collection, Mapping

# Honest contributions every opened sum holds at least (t colluders subtract their own
# vectors from the sum: one honest contribution in it would be that member's exact vector)
MIN_HONEST = 2


def least_contributors(t: int) -> int:
    """The fewest contributors a round opens anything over: t + MIN_HONEST."""
    return t + MIN_HONEST


def too_few(count: int, t: int, what: str) -> str | None:
    """The `too_few_contributors` detail when `count` entered or selected is below
    `least_contributors(t)`; None when enough."""
    if count >= least_contributors(t):
        return None
    return (f"{count} {what}, fewer than t + {MIN_HONEST} = {least_contributors(t)}: with up "
            f"to t = {t} colluders among them, fewer than {MIN_HONEST} honest contributions "
            "could be in the sum (one is revealed exactly); nothing opened")


def enter(held: Mapping[int, Collection[int]], able: Collection[int],
          consistent: Collection[int], t: int, need: int) -> tuple[set[int], tuple[int, ...], str]:
    """(entered dealers, openers, why we stopped dropping: "" when enough openers hold every
    entered dealing). `held`: check sender -> the dealers its check names; `able`: the
    senders whose check opened a usable piece and are in no dispute; `consistent`: the
    dealers judged consistent. Drops only a dealing more than t senders lack (module
    docstring)."""
    entered = set(consistent)
    holders = {i: sum(i in h for h in held.values()) for i in entered}
    while True:
        openers = tuple(sorted(j for j in able if entered <= set(held[j])))
        if len(openers) >= need or not entered:
            return entered, openers, ""
        drop = min(entered, key=lambda i: (holders[i], -i))
        lacking = len(held) - holders[drop]
        if lacking <= t:  # only liars may lack it: never dropped on their word
            return entered, openers, (
                f"the least held entered dealing is lacked by {lacking} of the {len(held)} check "
                f"senders, at most t = {t} (they may be the coalition denying an honest "
                "dealing: it is not dropped on their word)")
        entered.discard(drop)


__all__ = ["MIN_HONEST", "enter", "least_contributors", "too_few"]

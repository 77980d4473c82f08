"""Which dealings enter a secure round and how few contributions it opens (review s5 R4,
node/runtime/secure_entry.py): the rule's pure logic, then the floor of t + 2 contributors
through the real round (tests/test_secure_round.py's SecureNet: each member's own key)."""

from __future__ import annotations

import numpy as np

from gossip.bodies import decode_secagg
from gossip.envelope import decode_outer
from node.runtime import secure_entry
from node.secagg import field as F
from tests.test_secure_round import SecureNet


def test_a_dealing_lacked_by_at_most_t_senders_is_never_dropped():
    """n = 7, t = 2, 7 openers needed: senders 6 and 7 name only dealers 1, 6, 7. Every other
    dealing is lacked by exactly those two: kept, and too few openers (the round fails)."""
    held = {j: set(range(1, 8)) for j in range(1, 6)} | {6: {1, 6, 7}, 7: {1, 6, 7}}
    entered, openers, why = secure_entry.enter(held, range(1, 8), range(1, 8), 2, 7)
    assert entered == set(range(1, 8)) and openers == (1, 2, 3, 4, 5)
    assert "lacked by 2 of the 7 check senders, at most t = 2" in why


def test_a_dealing_an_honest_sender_also_lacks_is_dropped_the_least_held_first():
    """Dealer 5's deal did not reach sender 1 (honest) and sender 7 denies it too, as does 6:
    lacked by 3 > t = 2, so at least one honest sender lacks it: dropped; then every sender
    holds the rest. Dealer 4, lacked by 6 and 7 only, is kept."""
    everyone = set(range(1, 8))
    held = {j: set(everyone) for j in range(1, 8)}
    held[1] -= {5}
    held[6] -= {4, 5}
    held[7] -= {4, 5}
    entered, openers, why = secure_entry.enter(held, everyone, everyone, 2, 5)
    assert entered == everyone - {5} and openers == (1, 2, 3, 4, 5) and why == ""
    # enough openers already: nothing is dropped at all, however few hold a dealing
    entered, openers, why = secure_entry.enter(held, everyone, everyone, 2, 4)
    assert entered == everyone and openers == (2, 3, 4, 5) and why == ""


def test_a_check_sender_in_dispute_still_counts_as_holding_and_an_absent_member_not_at_all():
    """Senders 1..5 present (6, 7 absent: not in `held`), 5 in dispute (not able to open):
    dealer 6 is lacked by sender 1 alone (t = 1): kept, and only 2, 3, 4 hold everything."""
    held = {1: {1, 2, 3, 4, 5, 7}, 2: set(range(1, 8)), 3: set(range(1, 8)),
            4: set(range(1, 8)), 5: set(range(1, 8))}
    entered, openers, why = secure_entry.enter(held, (1, 2, 3, 4), range(1, 8), 1, 4)
    assert entered == set(range(1, 8)) and openers == (2, 3, 4)
    assert "lacked by 1 of the 5" in why


def test_the_floor_of_contributors_is_t_plus_two():
    assert secure_entry.least_contributors(2) == 4
    assert secure_entry.too_few(4, 2, "x") is None
    assert "fewer than t + 2 = 4" in secure_entry.too_few(3, 2, "member(s) selected")


def _opened(net: SecureNet, m: str, step: str) -> bool:
    data = net.members[m].sent.get((0, step))
    return data is not None and bool(decode_secagg(decode_outer(data).body,
                                                   len(net.names)).pieces)


def test_t_plus_one_entered_dealings_are_not_opened():
    """n = 4, t = 1, norm_only, no DP: bank-1 and bank-2 have nothing to deal this round (a
    non-finite update: the machine marks them absent) but still send their checks; bank-0
    and bank-3 deal. Before, 2 > t dealings entered at bank-0, bank-1, bank-2 and those
    three (a quorum) opened the sum: bank-3 subtracts its own vector and holds bank-0's
    exact update. Now t + 2 = 3 are needed: `too_few_contributors` at the entry, and no
    member sends a degree-2 or sum piece. (bank-3 moves on without waiting for the absent
    members' checks and fails `too_few_openers` on its own.)"""
    net = SecureNet(4, 1, variant="norm_only", no_deal={0: ("bank-1", "bank-2")}).run()
    for m in ("bank-0", "bank-1", "bank-2"):
        o = net.outcome(m)
        assert o.entered == ("bank-0", "bank-3"), o.entered
        assert not o.ok and o.reason == "too_few_contributors", (m, o.reason, o.detail)
        assert "2 dealing(s) entered, fewer than t + 2 = 3" in o.detail, o.detail
    for m in net.names:
        assert not net.outcome(m).ok
        assert not _opened(net, m, "degree2") and not _opened(net, m, "sum"), m


def test_t_plus_one_selected_are_not_opened():
    """n = 7, t = 2, norm_only, no DP: bank-1, bank-2, bank-3 have nothing to deal; bank-6
    (its real key) deals a vector above the norm bound. Four = t + 2 enter; the norm bound
    leaves bank-0, bank-4, bank-5: t + 1 selected, of whom up to t could be a coalition's.
    Before, 3 > t were opened; now `too_few_contributors` at the agree step, no sum piece.
    (With honest members inside the norm bound, as their encoding enforces, t + 2 entered
    already leave two honest in any selection; this bound does not rest on that.)"""
    def over_the_bound(net, m, r, deals):
        if m != "bank-6":
            return deals
        big = net.codec.encode(net.vector(m, r))
        big[0] = np.uint64(int(3 * net.codec.scale) % F.P)  # ||q||^2 well above R^2
        return net.members[m].secure.round(r).deal(big)

    net = SecureNet(7, 2, variant="norm_only", tamper_deal=over_the_bound,
                    no_deal={0: ("bank-1", "bank-2", "bank-3")}).run()
    for m in ("bank-0", "bank-1", "bank-2", "bank-3", "bank-4"):
        o = net.outcome(m)
        assert o.entered == ("bank-0", "bank-4", "bank-5", "bank-6"), o.entered
        assert o.selected == ("bank-0", "bank-4", "bank-5"), (o.selected, o.reason, o.detail)
        assert o.excluded["bank-6"].startswith("norm_too_large"), o.excluded
        assert not o.ok and o.reason == "too_few_contributors", (m, o.reason, o.detail)
        assert "3 member(s) selected, fewer than t + 2 = 4" in o.detail, o.detail
        assert _opened(net, m, "degree2") and not _opened(net, m, "sum"), m


def test_t_plus_two_entered_open():
    """The bound is not off by one: n = 4, t = 1, sum_only (no floor), bank-1 without a
    dealing: the other three, t + 2, enter and every member that dealt opens their exact
    sum."""
    net = SecureNet(4, 1, variant="sum_only", no_deal={0: ("bank-1",)}).run()
    dealers = ("bank-0", "bank-2", "bank-3")
    for m in dealers:
        o = net.outcome(m)
        assert o.ok and o.selected == dealers, (o.reason, o.detail)
        np.testing.assert_array_equal(o.field_sum, F.sum_mod(np.stack(
            [net.codec.encode(net.vector(x, 0)) for x in dealers]), axis=0))


def test_what_a_coalition_can_still_force_is_a_failed_round():
    """The rule's cost, pinned (docs/privacy-secure.md "Which dealings enter"): n = 7, t = 2,
    sum_only; hostile bank-6 deals bank-0 and bank-1 pieces off its commitment (they refuse
    them, naming it bad_piece, and check in time) and its accomplice bank-5 goes silent.
    bank-6's dealing is lacked by two of the six check senders, at most t: as ambiguous as
    two liars denying an honest dealing, so it is not dropped, and only four members hold
    every entered dealing. Before, it was dropped and the round opened; now it fails
    `too_few_openers`, nothing opened, nobody honest named."""
    from tests.test_secure_round import deal_one_refused_piece

    def refuse_two(net, m, r, deals):
        if m != "bank-6":
            return deals
        return deal_one_refused_piece(net, m, r, deal_one_refused_piece(
            net, m, r, deals, "bank-0"), "bank-1")

    net = SecureNet(7, 2, variant="sum_only", tamper_deal=refuse_two,
                    mute={p: ("bank-5",) for p in ("check", "degree2", "agree", "sum")}).run()
    for m in ("bank-0", "bank-1", "bank-2", "bank-3", "bank-4"):
        o = net.outcome(m)
        assert not o.ok and o.reason == "too_few_openers", (m, o.reason, o.detail)
        assert "lacked by 2 of the 6 check senders" in o.detail, o.detail
        assert set(o.named) <= {"bank-6"}, o.named
        assert not _opened(net, m, "sum"), m
    assert net.outcome("bank-0").named["bank-6"].startswith("bad_piece")

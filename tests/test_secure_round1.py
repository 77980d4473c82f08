"""A secure consortium with one member down at round 1 (docs/operate/secure.md, "Start
every member before round 1"): the members that are up must still open round 1.

The cause: with sealing, a member waits for every member's prekey before it deals, up to
the round deadline counted from its release (gossip/protocol/machine.py `released`:
stage "prekeys" until `self.deadline`). A member that is down never announces one, so
each up member waited the whole deadline, dealt at it, and went on collecting the
others' deals against that same deadline (`signed` restarted it only for a plain share,
whose signature is recorded; a secure round's `Signed` carries none): the collection
closed at once, before the others' deals, dealt at the same moment, arrived. Every up
member logged "<member> sent no share by 1 deadline(s)" for every other and round 1
failed (too few dealings entered; charged). Now `Signed(dealt=True)` (secure_node.py
`_send_deals`) gives the collection a full deadline from the dealing on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gossip.protocol import (
    Released,
    RoundBook,
    RoundMachine,
    RoundParams,
    SendPhase,
    SendShare,
    Signed,
    Train,
)
from node.runtime.secure_round import secure_phases
from node.runtime.state import read_jsonl

MEMBERS = ["bank-a", "bank-b", "bank-c", "bank-d", "bank-e"]
DOWN = "bank-e"  # never starts: never announces a prekey
DEADLINE = 10.0


def _machine() -> RoundMachine:
    me = MEMBERS[0]
    book = RoundBook([m for m in MEMBERS if m != me], lookahead=3)
    # every prekey but the down member's is held
    return RoundMachine(me, MEMBERS, book, RoundParams(2, DEADLINE, 1, 0),
                        phases=secure_phases("sum"),
                        prekeys_missing=lambda r, peers: [p for p in peers if p == DOWN])


def test_the_deals_get_a_full_deadline_after_the_prekey_wait():
    """The machine's side, on the test's clock: the prekey wait for the down member uses
    the whole deadline; the collection of the others' deals must not close with it."""
    m = _machine()
    actions = m.start(0.0)
    assert any(isinstance(a, Train) and a.round == 0 for a in actions), actions
    assert m.released(Released(0, "new"), 0.0) == []  # waiting for bank-e's prekey
    assert m.stage == "prekeys"
    deal = [a for a in m.tick(DEADLINE) if isinstance(a, SendShare)]
    assert deal and DOWN in deal[0].seal_for  # the sender learns it has no prekey
    after = m.signed(Signed(0, None, dealt=True), DEADLINE)
    assert not any(isinstance(a, SendPhase) for a in after), after
    assert m.stage == "collect"
    # half a deadline after dealing the others' deals may still come: still collecting
    assert not any(isinstance(a, SendPhase) for a in m.tick(DEADLINE * 1.5))
    assert m.stage == "collect" and m.deadline == pytest.approx(2 * DEADLINE)
    # at the full deadline from the dealing on, the round goes on without them
    assert any(isinstance(a, SendPhase) for a in m.tick(2 * DEADLINE))


def test_a_plain_unsent_share_keeps_its_deadline():
    """Nothing dealt (Signed without a signature, not dealt): the collection keeps the
    deadline counted from the release, as before (the plain path is unchanged)."""
    m = _machine()
    m.start(0.0)
    m.released(Released(0, "new"), 0.0)
    m.tick(DEADLINE)
    out = m.signed(Signed(0, None), DEADLINE) + m.tick(DEADLINE)
    assert m.stage != "collect"  # the collection closed at the release's deadline
    assert any(isinstance(a, SendPhase) for a in out), out


def _aggregates(state: Path) -> list[dict]:
    return [a for a in read_jsonl(state / "audit.jsonl") if a.get("kind") == "aggregate"]


def test_one_of_five_never_starts_and_round_one_opens_with_the_four(tmp_path):
    """`flnode simulate --secure` (every member a real Node on the virtual clock, sealed
    deals, the secure phases), 5 members, t = 1, selection "norm" (its degree-2 opening
    needs 3t + 1 = 4 openers, as the trial's "range"), bank-4 never started: round 1 opens
    at every up member with the four dealings (before the fix: 0 entered, failed)."""
    from node.cli import main

    scenario = tmp_path / "s.toml"
    scenario.write_text('members = 5\nsecure = true\nsecure_select = "norm"\nrounds = 1\n'
                        'round_deadline_s = 5\nseed = 3\n[faults]\nabsent = ["bank-4"]\n'
                        '[model]\nkind = "logreg"\n')
    out = tmp_path / "run"
    assert main(["simulate", str(scenario), "--out", str(out)]) == 0
    up = ["bank-0", "bank-1", "bank-2", "bank-3"]
    for name in up:
        (agg,) = [a for a in _aggregates(out / "state" / name) if a["round"] == 0]
        sec = agg["secure"]
        assert sec["ok"], (name, sec)
        assert sorted(sec["dealt"]) == sorted(sec["entered"]) == up, (name, sec)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_done"] == dict.fromkeys(up, 1)

"""`flnode status` of a member with DP on the secure sum (issue 22): what a new operator read
wrong in the trial of docs/operate/secure.md. The state dirs are written by the node's own
writers (SecurePlan.save, Ledger.charge, audit.Aggregate), as tests/test_report_secure.py
writes them; the checkpoint is the golden run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gossip.errors import LocalError
from node.ops.status import collect, render
from node.privacy.ledger import Ledger
from node.privacy.secure import secure_plan
from node.runtime import audit

MEMBERS = [f"bank-{c}" for c in "abcd"]


@pytest.fixture
def state(tmp_path) -> Path:
    """A secure DP member that pinned its plan (range check: its δ is split) and charged
    nothing: no local privacy plan, no ledger."""
    st = tmp_path / "bank-a"
    shutil.copytree(Path(__file__).parent / "golden" / "run" / "state" / "telco-0", st)
    (st / "ledger.jsonl").unlink()
    (st / "privacy_plan.json").unlink()
    plan = secure_plan(rows_total=2160, members=4, coalition=1, epsilon=3.0, delta=1e-5,
                       dim=100, variant="range", rounds=64)
    plan.save(st / "secure_plan.json")
    return st


def charge(st: Path, outcomes: list[tuple[bool, str | None]]) -> Ledger:
    """Charge one round per outcome and write its audit line as the node does."""
    from node.privacy.secure import SecurePlan

    plan = SecurePlan.load(st / "secure_plan.json")
    ledger = Ledger(st / "ledger.jsonl")
    with open(st / "audit.jsonl", "a") as a:
        for r, (ok, reason) in enumerate(outcomes):
            ledger.charge(plan.record(r, digest=plan.digest()))
            dealt = MEMBERS[:3]
            diag = {"rule": "secure", "used": dealt if ok else [], "excluded": {},
                    "clipped": {}, "weight_capped": {}, "down_weighted": {}, "fallbacks": [],
                    "secure": {"ok": ok, "reason": reason, "detail": "", "dealt": dealt,
                               "entered": dealt, "named": {}, "evidence": {}}}
            a.write(json.dumps(audit.Aggregate(r, "bank-a", diag).to_json()) + "\n")
    return ledger


def test_a_pinned_secure_plan_with_nothing_charged_is_not_privacy_off(state):
    s = collect(state)
    text = render(s, now=0)
    assert "privacy off" not in text and "no differential privacy" not in text
    p = s["privacy"]
    assert p["mode"] == "secure" and p["epsilon_budget"] == 3.0 and p["epsilon_spent"] == 0
    line = next(x for x in text.splitlines() if x.startswith("privacy"))
    assert "DP on the secure sum, ε spent 0 of budget 3 (nothing charged yet)" in line
    assert "64 rounds planned" in line
    assert "no secure round charged yet (plan pinned: n 4, coalition t 1" in text


def test_failed_secure_rounds_are_shown_failed_with_their_reason(state):
    charge(state, [(False, "too_few_openers"), (False, "too_few_openers"), (True, None)])
    text = render(collect(state), now=0)
    line = next(x for x in text.splitlines() if x.startswith("secure"))
    assert ("3 secure round(s) charged: 1 opened, 2 failed (too_few_openers: rounds 1, 2)"
            in line), line


def test_delta_is_the_plans_with_the_accountants_beside_it_and_no_secure_level(state):
    ledger = charge(state, [(True, None)])
    s = collect(state)
    p = s["privacy"]
    acc = ledger.records[0].secure["delta"]
    assert acc < 1e-5 and p["delta"] == 1e-5 and p["accounting_delta"] == acc
    assert p["epsilon_spent"] == ledger.epsilon(acc)  # the accountant's, at its δ
    line = next(x for x in render(s, now=0).splitlines() if x.startswith("privacy"))
    assert "secure-level" not in line
    assert f"at δ 1e-05 (accountant {acc:.4g};" in line and "9.99509e-06" not in line


def test_the_model_card_and_the_report_state_the_plans_delta_as_status_does(state):
    """One δ for one run: the card's raw accountant δ (9.995090640866388e-06) read as a second
    δ beside the node's `ε 0.61 at δ 1e-05`."""
    from node.ops.model_card import own_epsilon
    from node.ops.report_html.card import _delta
    from node.ops.report_html.secure import read_secure
    from node.ops.report_html.secure_html import secure_section

    ledger = charge(state, [(True, None)])
    acc = ledger.records[0].secure["delta"]
    own = own_epsilon(state, 1)
    assert own["delta"] == 1e-5 and own["delta_accountant"] == acc
    assert own["epsilon"] == ledger.epsilon(acc)  # the accountant's, unchanged
    said = f"δ 1e-05 (accountant {acc:.4g}; the rest for the range check's bits)"
    assert _delta(own) == said.replace("'", "&#x27;")
    html_text = secure_section([read_secure(state, "state dir", "bank-a")])
    assert f"at {said}" in html_text and f"{acc:g}" not in html_text


def test_the_round_line_of_a_secure_round_says_who_dealt_not_shares_missing(capsys):
    """The trial's line `shares 0/1 missing: bank-d` for a round bank-a, -b and -c dealt in."""
    from types import SimpleNamespace

    from node.runtime.daemon import _print_round
    from node.runtime.round_report import RoundReport

    show = _print_round(SimpleNamespace(training=SimpleNamespace(rounds=3)), "bank-a",
                        "roc_auc")
    sec = {"ok": False, "reason": "too_few_openers", "members": MEMBERS,
           "dealt": MEMBERS[:3], "entered": [], "selected": []}
    show(RoundReport("bank-a", 0, {"roc_auc": 0.5}, 0.25, [], ["bank-d"], 1.0, 2.0,
                     secure=sec))
    line = capsys.readouterr().out
    assert "shares" not in line and "missing" not in line
    assert "secure FAILED (too_few_openers): dealt 3/4 (not bank-d), entered 0" in line
    show(RoundReport("bank-a", 1, {"roc_auc": 0.5}, 0.5, MEMBERS, [], 1.0, 2.0,
                     secure={**sec, "ok": True, "reason": None, "dealt": MEMBERS,
                             "entered": MEMBERS, "selected": MEMBERS}))
    assert "secure opened: dealt 4/4, entered 4, selected 4 " in capsys.readouterr().out


def test_training_rounds_off_the_secure_plan_are_warned_with_both_numbers(state):
    """[training] rounds = 3 against a 64-round plan ran without a word (ε 0.61 of 3 spent);
    more rounds than the plan cannot over-spend (charge_secure_round refuses past the
    budget: checked here on the plan itself), but those rounds fail."""
    from node.privacy.ledger import Ledger
    from node.privacy.secure import SecurePlan, SecureRoundRefused, charge_secure_round
    from node.runtime.build import secure_rounds_warning

    plan = SecurePlan.load(state / "secure_plan.json")
    assert secure_rounds_warning(64, plan) is None
    few = secure_rounds_warning(3, plan)
    assert "training.rounds = 3" in few and "has 64 rounds" in few
    assert f"ε {plan.epsilon_after(3):.2f} of the budget 3" in few
    assert "set [training] rounds = 64" in few
    many = secure_rounds_warning(80, plan)
    assert "from round 65" in many and "budget_exhausted" in many
    # what the warning says of round 65: the plan's rounds fit the budget, one more does not
    ledger = Ledger(state / "ledger.jsonl")
    for r in range(64):
        charge_secure_round(ledger, plan, round_=r)  # each within the budget
    with pytest.raises(SecureRoundRefused) as exc:
        charge_secure_round(ledger, plan, round_=64)
    assert exc.value.reason == "budget_exhausted"


def test_a_secure_consortium_without_dp_shows_its_failed_rounds_too(state):
    """No plan, no charge: the rounds' outcomes come from the audit lines alone; a long run's
    failed rounds are listed up to a bound."""
    (state / "secure_plan.json").unlink()
    with open(state / "audit.jsonl", "a") as a:
        for r in range(12):
            diag = {"rule": "secure", "used": [], "excluded": {}, "clipped": {},
                    "weight_capped": {}, "down_weighted": {}, "fallbacks": [],
                    "secure": {"ok": False, "reason": "too_few_openers", "detail": "",
                               "dealt": MEMBERS[:3], "entered": [], "named": {},
                               "evidence": {}}}
            a.write(json.dumps(audit.Aggregate(r, "bank-a", diag).to_json()) + "\n")
    text = render(collect(state), now=0)
    assert "privacy     off" in text
    assert ("secure      12 secure round(s): 0 opened, 12 failed (too_few_openers: rounds 1, 2, "
            "3, 4, 5, 6, 7, 8 and 4 more) (no DP on the sum: nothing charged)") in text


def test_an_oversized_plan_is_refused_by_status_as_by_the_report(state):
    """Status and the report read the pinned plan through one loader
    (node/ops/report_html/secure.py load_plan): refused from its size, before it is read,
    named, in both."""
    from node.ops.report_html.secure import read_secure

    path = state / "secure_plan.json"
    path.write_bytes(path.read_bytes() + b" " * (1 << 16))  # still valid JSON
    with pytest.raises(LocalError, match=r"unreadable secure plan \(more than 65536 bytes: not "
                                         "a plan flnode wrote\\)"):
        collect(state)
    view = read_secure(state, "bank-a")
    assert view is not None and "more than 65536 bytes" in (view.plan_problem or "")

"""`flnode simulate --secure`'s round lines say what the secure round did, in the node's
own words (node/runtime/round_report.py secure_text): who dealt, entered and was
selected, or that it failed and why. Before, the line showed only the mean metric, so
a round that failed for every member read like one that opened."""

from __future__ import annotations

import io
import json

from rich.console import Console

from node.rehearsal.simulation.output import RoundPrinter, secure_round_text
from node.runtime.round_report import RoundReport, secure_text

MEMBERS = ["bank-a", "bank-b", "bank-c", "bank-d"]
OPENED = {"ok": True, "reason": None, "members": MEMBERS, "dealt": MEMBERS,
          "entered": MEMBERS, "selected": ["bank-a", "bank-c", "bank-d"]}
FAILED = {"ok": False, "reason": "too_few_openers", "members": MEMBERS,
          "dealt": MEMBERS[:3], "entered": []}


class _Spec:
    rounds = 2


def _printer(names: list[str]) -> tuple[RoundPrinter, io.StringIO]:
    buf = io.StringIO()
    return RoundPrinter(_Spec(), names, "accuracy",
                        Console(file=buf, width=120, color_system=None)), buf


def _report(member: str, r: int, secure: dict | None) -> RoundReport:
    return RoundReport(member, r, {"accuracy": 0.75}, None, [], [], 0.0, 0.1, secure=secure)


def test_secure_text_names_who_the_selection_left_out_and_who_did_not_deal():
    assert secure_text(OPENED) == ("secure opened: dealt 4/4, entered 4, selected 3 "
                                   "(not bank-b)")
    assert secure_text(FAILED) == ("secure FAILED (too_few_openers): dealt 3/4 (not bank-d), "
                                   "entered 0")
    everyone = {**OPENED, "selected": MEMBERS}
    assert secure_text(everyone) == "secure opened: dealt 4/4, entered 4, selected 4"


def test_the_round_line_carries_the_members_secure_outcome_once_or_each_with_its_members():
    printer, buf = _printer(MEMBERS)
    for m in MEMBERS:
        printer.on_round(_report(m, 0, OPENED))
    for m in MEMBERS:  # bank-d's view of round 2 differs from the others'
        printer.on_round(_report(m, 1, FAILED if m == "bank-d" else OPENED))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("  round   1/2  mean accuracy 0.7500")
    assert lines[1].strip() == secure_text(OPENED)  # agreed: said once
    assert lines[3].strip() == f"{secure_text(OPENED)} (bank-a, bank-b, bank-c)"
    assert lines[4].strip() == f"{secure_text(FAILED)} (bank-d)"
    assert len(lines) == 5 and not printer.secure  # nothing left over for a later round


def test_a_plain_round_line_is_unchanged():
    printer, buf = _printer(MEMBERS[:2])
    for m in MEMBERS[:2]:
        printer.on_round(_report(m, 0, None))
    assert buf.getvalue() == ("  round   1/2  mean accuracy 0.7500  (0.750 0.750)  "
                              "ε ∞ (no DP)\n")
    assert secure_round_text({}) == ""


def test_a_real_secure_simulation_prints_who_dealt_entered_and_was_selected(tmp_path, capsys):
    """Five in-process members, one secure round (~6 s): the round line's secure outcome is
    the one every node wrote to its metrics.jsonl (who dealt, entered, was used)."""
    from node.cli import main

    out = tmp_path / "run"
    assert main(["simulate", "--nodes", "5", "--secure", "--rounds", "1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("  round   1/1  mean "))
    printed = lines[at + 1].strip()
    assert printed.startswith("secure opened: dealt 5/5, entered 5, selected "), text
    names = [f"bank-{i}" for i in range(5)]
    for name in names:
        agg = json.loads((out / "state" / name / "metrics.jsonl").read_text()
                         .splitlines()[-1])["aggregation"]
        assert printed == secure_text({**agg["secure"], "members": names,
                                       "selected": agg["used"]}), name

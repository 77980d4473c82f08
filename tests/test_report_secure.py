"""`flnode report`'s Secure aggregation section (issue 22; node/ops/report_html/secure*.py).

The run is real: 5 in-process `flnode simulate --secure` members (memory transport, sealing,
real training) where site-3 and site-4 keep their round-1 check message to themselves, so
round 1 fails by name (too_few_openers: 3 usable checks, 3t + 1 = 4 needed) and round 2
opens. The DP-on-the-sum state dir is built with the node's own writers (SecurePlan,
Ledger.charge, audit.Aggregate); the hostile variants edit those files by hand.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gossip.errors import LocalError
from node.ops.report_html import write_report
from node.ops.report_html.secure import read_secure
from node.ops.report_html.secure_html import secure_section
from node.ops.report_member import write_member_report
from node.privacy.ledger import Ledger
from node.privacy.secure import secure_plan
from node.runtime import audit
from node.runtime.secure_round import REASONS

MUTED = ("site-3", "site-4")  # they send no check in round 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    import torch
    from rich.console import Console

    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime import secure_node

    torch.set_num_threads(1)
    honest = secure_node.send_phase

    async def send_phase(node, a):  # their real nodes, minus one message each
        if node.name in MUTED and a.phase == "check" and a.round == 0:
            return
        await honest(node, a)

    out = tmp_path_factory.mktemp("secure") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(secure_node, "send_phase", send_phase)
        simulate(SimulationSpec(dataset="digits", nodes=5, partition="dirichlet:0.5", rounds=2,
                                seed=0, out=out, secure=True, round_deadline_s=5.0),
                 Console(quiet=True))
    return out


class Tables(HTMLParser):
    """Every table's body rows (cell texts), and the text after each h3."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.h3: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_h3 = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag == "td":
            self._cell = []
        elif tag == "h3":
            self._in_h3 = True
            self.h3.append("")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "h3":
            self._in_h3 = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_h3:
            self.h3[-1] += data


def secure_rows(html_text: str) -> list[list[str]]:
    """The rows of the table under "Each secure round"."""
    section = html_text.split("<h3>Each secure round</h3>", 1)[1]
    p = Tables()
    p.feed(section)
    return p.tables[0]


def aggregates(state: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
    return {x["round"]: x for x in lines if x.get("kind") == "aggregate"}


@pytest.mark.slow  # 5 members x 2 secure rounds (one waits out a 5 s deadline) + baselines
def test_report_of_a_real_secure_run_shows_each_round_and_the_failed_rounds_reason(
        run_dir, tmp_path):
    agg = aggregates(run_dir / "state" / "site-0")
    assert agg[0]["secure"]["ok"] is False and agg[0]["secure"]["reason"] in REASONS
    assert agg[1]["secure"]["ok"] is True
    reason, detail = agg[0]["secure"]["reason"], agg[0]["secure"]["detail"]

    text = write_report(run_dir, tmp_path / "r.html").read_text()
    assert "<h2>Secure aggregation</h2>" in text
    assert "2 closed: 1 opened, " in text and f"1 failed ({reason})" in text
    # every member's own records say the same of both rounds
    assert "the other 4 members' records give the same outcome" in text
    rows = secure_rows(text)
    assert [r[0] for r in rows] == ["1", "2"]
    assert rows[0][1].startswith(f"failed: {reason}") and detail[:40] in rows[0][1]
    assert rows[0][2] == "all 5"  # every member dealt; the round failed before entering
    assert rows[1][1] == "opened"
    used = agg[1]["used"]
    want = "all 5" if len(used) == 5 else f"{len(used)} of 5"
    assert rows[1][4].startswith(want), rows[1]
    for m in set(agg[1]["excluded"]):  # who the selection left out, and why, is named
        assert m in rows[1][5] and agg[1]["excluded"][m]["reason"] in rows[1][5]
    # no DP: no ledger charge and no ε columns, and the section says so
    assert len(rows[0]) == 7 and "no secure charge in the ledger (no DP on the sum)" in text
    assert "docs/privacy-secure.md" in text and "t 1 (colluding members tolerated)" in text
    # the run facts say the configured rule is not what combined the rounds
    assert "secure (t = 1, selection multi-krum)" in text and "is not used" in text

    # one member's own report: the same rounds, from its own files only; and report.json
    page, doc = write_member_report(run_dir / "state" / "site-1", tmp_path / "m.html")
    mrows = secure_rows(page.read_text())
    assert mrows[0][1].startswith(f"failed: {reason}") and mrows[1][1] == "opened"
    sec = json.loads(doc.read_text())["secure"]
    assert [r["outcome"] for r in sec["rounds"]] == [f"failed: {reason}", "opened"]
    assert sec["rounds"][1]["selected"] == aggregates(run_dir / "state" / "site-1")[1]["used"]

    # metrics.jsonl says what the secure round did, not only `received` (the selected: none
    # in the failed round) and the machine's `missing`
    lines = [json.loads(x) for x in (run_dir / "state" / "site-0" / "metrics.jsonl")
             .read_text().splitlines()]
    by_round = {x["round"]: x["aggregation"] for x in lines if "aggregation" in x}
    assert by_round[0]["secure"] == {"ok": False, "reason": reason,
                                     "dealt": agg[0]["secure"]["dealt"],
                                     "entered": agg[0]["secure"]["entered"]}
    assert by_round[1]["secure"]["ok"] is True and by_round[1]["used"] == agg[1]["used"]


@pytest.mark.slow  # reuses the run above
def test_members_that_disagree_on_a_round_are_shown_side_by_side(run_dir, tmp_path):
    """What the known hole looks like in the files: one member's record of round 2 names
    another selection. The report says the records differ and lists each view."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = run / "state" / "site-2" / "audit.jsonl"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if rec.get("kind") == "aggregate" and rec["round"] == 1:
            rec["used"] = rec["used"][:2]
            lines[i] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    text = write_report(run, run / "report.html").read_text()
    assert "records differ in 1 round(s)" in text
    assert "site-2: opened, entered 5, selected 2" in text


# --- DP on the sum: a state dir written by the node's own writers ---------------------------
def dp_state(path: Path, rounds_closed: int = 2, rounds_charged: int = 3) -> Path:
    """A member's state dir after `rounds_charged` secure DP charges, of which the first
    `rounds_closed` closed (opened): the plan pinned, the ledger charged, the audit and
    metrics lines written as the node writes them."""
    path.mkdir(parents=True)
    plan = secure_plan(rows_total=1000, members=5, coalition=1, epsilon=3.0, delta=1e-5, dim=100)
    plan.save(path / "secure_plan.json")
    ledger = Ledger(path / "ledger.jsonl")
    members = [f"bank-{i}" for i in range(5)]
    with open(path / "audit.jsonl", "w") as a, open(path / "metrics.jsonl", "w") as m:
        for r in range(rounds_charged):
            ledger.charge(plan.record(r, digest=plan.digest()))
            if r >= rounds_closed:
                continue
            diag = {"rule": "secure", "used": members, "excluded": {}, "clipped": {},
                    "weight_capped": {}, "down_weighted": {}, "fallbacks": [],
                    "secure": {"ok": True, "reason": None, "detail": "", "dealt": members,
                               "entered": members, "named": {}, "evidence": {}}}
            a.write(json.dumps(audit.Aggregate(r, "bank-0", diag).to_json()) + "\n")
            m.write(json.dumps({"round": r, "metrics": {"accuracy": 0.5},
                                "epsilon": ledger.epsilon(1e-5)}) + "\n")
    return path


def test_dp_section_takes_epsilon_from_the_ledger_by_the_accountant_and_shows_the_plan(
        tmp_path):
    state = dp_state(tmp_path / "bank-0")
    view = read_secure(state, "state dir", "bank-0")
    assert view is not None and view.notes == []
    want = Ledger(state / "ledger.jsonl").epsilon(1e-5)  # the same function status uses
    assert view.epsilon == want
    html_text = secure_section([view])
    assert f"{want:.4f} of 3" in html_text
    plan = view.plan
    assert (f"floor {plan.min_contributors} contributors" in html_text
            and f"σ {plan.noise_multiplier:.4g} on the sum" in html_text
            and "n 5 members, t 1" in html_text and plan.digest() in html_text)
    assert "a member learns the noised sum" in html_text
    rows = secure_rows(html_text)
    # rounds 1 and 2 opened alike: one row; round 3 was charged (before dealing) but never
    # closed: the node stopped mid-round
    assert [r[0] for r in rows] == ["1–22 rounds", "3"]
    assert rows[0][7] == f"{plan.min_contributors} contributors each"
    eps = [json.loads(x)["epsilon"] for x in (state / "metrics.jsonl").read_text().splitlines()]
    assert rows[0][8] == f"{eps[0]:.3f} → {eps[1]:.3f}"
    assert rows[1][1].startswith("charged, no outcome recorded")


def test_an_opened_dp_round_the_ledger_never_charged_is_flagged(tmp_path):
    state = dp_state(tmp_path / "bank-0")
    lines = (state / "ledger.jsonl").read_text().splitlines()
    (state / "ledger.jsonl").write_text(lines[0] + "\n")  # round 2's charge removed
    rows = secure_rows(secure_section([read_secure(state, "state dir", "bank-0")]))
    assert rows[1][1] == "opened" and "an opened round without a charge" in rows[1][7]


@pytest.mark.parametrize("edit, says", [
    (lambda rec: rec.update(secure="garbage"), "secure is not an object"),
    (lambda rec: rec["secure"].update(named=["bank-1"]), "secure.named is not an object"),
    (lambda rec: rec["secure"].update(ok="yes"), "secure.ok is not true or false"),
    (lambda rec: rec["secure"].update(ok=False, reason=None), "secure.reason is not a reason"),
    (lambda rec: rec.update(used="bank-0"), "used is not a list of member names"),
    (lambda rec: rec.update(excluded={"bank-1": 7}), "excluded[bank-1] is not a reason"),
])
def test_a_hand_edited_audit_line_is_shown_unreadable_naming_line_and_field(
        tmp_path, edit, says):
    state = dp_state(tmp_path / "bank-0")
    lines = (state / "audit.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    edit(rec)
    lines[1] = json.dumps(rec)
    (state / "audit.jsonl").write_text("\n".join(lines) + "\n")
    view = read_secure(state, "state dir", "bank-0")
    assert view.rounds[1].unreadable.startswith(f"state dir/audit.jsonl line 2: {says}")
    assert any("line 2" in n and says in n for n in view.notes)
    rows = secure_rows(secure_section([view]))
    assert rows[1][1].startswith("unreadable") and says in rows[1][1]
    assert rows[0][1] == "opened"  # the other rounds still show


def test_torn_lines_bad_round_numbers_and_hostile_names_never_crash(tmp_path):
    state = dp_state(tmp_path / "bank-0")
    lines = (state / "audit.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["secure"]["named"] = {"<script>x</script>": "inconsistent_pieces: <b>"}
    bad_round = dict(json.loads(lines[1]), round=-3)
    text = "\n".join([json.dumps(rec), json.dumps(bad_round), lines[1], '{"kind": "aggr'])
    (state / "audit.jsonl").write_text(text)
    view = read_secure(state, "state dir", "bank-0")
    assert any("without a valid round number" in n for n in view.notes)
    assert any("line 4: not JSON" in n for n in view.notes)
    out = secure_section([view])
    assert "<script>" not in out and "&lt;script&gt;x&lt;/script&gt;" in out


def test_a_hand_edited_ledger_or_plan_is_shown_unreadable_with_the_loaders_reason(tmp_path):
    state = dp_state(tmp_path / "bank-0")
    ledger = state / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["secure"]["contributors"] = 99  # more contributors than members: an edit
    ledger.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    view = read_secure(state, "state dir", "bank-0")
    assert view.epsilon is None and "line 1 is corrupt" in view.ledger_problem
    assert "unreadable" in secure_section([view])

    state = dp_state(tmp_path / "bank-1")
    plan = json.loads((state / "secure_plan.json").read_text())
    plan["noise_multiplier"] /= 10  # a plan that would spend past its own budget
    (state / "secure_plan.json").write_text(json.dumps(plan))
    view = read_secure(state, "state dir", "bank-1")
    assert view.plan is None and "the plan was edited" in view.plan_problem
    assert view.epsilon is not None  # the ledger still reads: ε is shown
    out = secure_section([view])
    assert "secure_plan.json: unreadable" in out

    (state / "secure_plan.json").write_text("{not json")
    assert "unreadable" in read_secure(state, "state dir", "bank-1").plan_problem


def test_status_names_a_hand_edited_secure_plan_instead_of_crashing(tmp_path):
    from node.ops.status import _pinned_secure_plan

    path = tmp_path / "secure_plan.json"
    assert _pinned_secure_plan(path) == {}
    for text in ('{"epsilon": ', "[1, 2]", '{"epsilon": "3", "steps": 4}',
                 '{"epsilon": 1%s, "steps": 4}' % ("0" * 400)):  # beyond a float: no budget
        path.write_text(text)
        with pytest.raises(LocalError, match="secure_plan.json"):
            _pinned_secure_plan(path)


def test_a_plain_state_dir_has_no_secure_section(tmp_path):
    state = tmp_path / "bank-0"
    state.mkdir()
    diag = {"rule": "mean", "used": ["bank-0"], "excluded": {}}
    (state / "audit.jsonl").write_text(json.dumps(audit.Aggregate(0, "bank-0", diag).to_json())
                                       + "\n")
    assert read_secure(state, "state dir", "bank-0") is None
    assert secure_section([]) == ""


def test_the_scenario_of_the_results_page_is_the_goal_run(tmp_path):
    """docs/results/secure_network.md's command: 8 digits members over libp2p, secure,
    record-level DP at ε = 3, and no rounds given (the node plans them)."""
    from node.rehearsal.simulation.scenario import build_spec

    root = Path(__file__).resolve().parent.parent
    s = build_spec(root / "network_configs" / "scenarios" / "digits-8-secure-dp.toml",
                   {"out": tmp_path / "o"}, network=True)
    assert (s.dataset, s.nodes, s.partition, s.transport) == ("digits", 8, "dirichlet:0.5",
                                                              "libp2p")
    assert (s.secure, s.privacy, s.epsilon, s.delta) == (True, "record", 3.0, 1e-5)
    text = (root / "network_configs" / "scenarios" / "digits-8-secure-dp.toml").read_text()
    assert not re.search(r"^rounds\s*=", text, re.M)  # the node's plan sets the rounds


def test_a_secure_dp_members_model_card_states_its_epsilon_not_no_dp(tmp_path):
    """DP on the secure sum has no local privacy plan: the card read it as privacy off
    ("no DP") for a member that spent ε 3. Its ε is the accountant's over its ledger."""
    from node.ops.model_card import own_epsilon

    state = dp_state(tmp_path / "bank-0")
    own = own_epsilon(state, 2)
    ledger = Ledger(state / "ledger.jsonl")
    assert own["mode"] == "secure" and own["epsilon"] == ledger.epsilon(1e-5)
    assert own["epsilon_budget"] == 3.0 and own["releases"] == 3
    from node.privacy.accountant import epsilon_of
    assert own["epsilon_model_rounds"] == epsilon_of(ledger.records[:2], 1e-5)
    (state / "secure_plan.json").write_text("{")
    with pytest.raises(LocalError, match="secure_plan.json is unreadable"):
        own_epsilon(state, 2)


@pytest.mark.slow  # reuses the real run
def test_hand_edited_audit_and_metrics_lines_never_crash_the_members_report(run_dir, tmp_path):
    """Lines that are not objects, an accepted line without member or round, a secure line
    with a reason that is not one: the member's report (and `flnode status` under it) skips
    or names them; the secure section shows the edited round as unreadable."""
    state = tmp_path / "site-0"
    shutil.copytree(run_dir / "state" / "site-0", state)
    with open(state / "audit.jsonl", "a") as f:
        f.write('[1]\n{"outcome": "accepted"}\n"str"\n'
                '{"kind": "aggregate", "rule": "secure", "round": 1, '
                '"secure": {"ok": false, "reason": 7}}\n')
    with open(state / "metrics.jsonl", "a") as f:
        f.write('[1]\n"metrics"\n{"round": 1, "metrics": 5}\n')
    page, doc = write_member_report(state, tmp_path / "m.html")
    rows = secure_rows(page.read_text())
    assert rows[1][1].startswith("unreadable") and "secure.reason is not a reason" in rows[1][1]
    assert rows[0][1].startswith("failed:")
    assert json.loads(doc.read_text())["secure"]["rounds"][1]["outcome"] == "unreadable"


def test_what_a_member_learns_links_what_the_agreement_does_not_close(tmp_path):
    """The sentence may not claim more than docs/privacy-secure.md: the report links the
    page's "What the agreement does not close" section, which must exist."""
    from node.ops.report_html.secure_html import HOLE_ANCHOR

    doc = (Path(__file__).resolve().parent.parent / "docs" / "privacy-secure.md").read_text()
    assert "### What the agreement does not close" in doc
    assert HOLE_ANCHOR == "#what-the-agreement-does-not-close"
    out = secure_section([read_secure(dp_state(tmp_path / "bank-0"), "state dir", "bank-0")])
    assert "docs/privacy-secure.md" in out and HOLE_ANCHOR in out


def test_a_split_view_rounds_evidence_as_the_node_writes_it_is_shown_not_unreadable(tmp_path):
    """Review 2 F4: the node keeps an agreement step's split as a LIST of files
    (secure_node.keep_split_evidence) and a dealer's deal as one file; the report read only
    the latter, so every round naming a member split_view showed as "unreadable". Here the
    evidence comes from the real split-view attack through the node's own writer."""
    from types import SimpleNamespace

    from gossip.bodies import decode_secagg
    from gossip.envelope import KIND_SECAGG, Accepted, decode_outer
    from node.runtime import secure_node
    from node.runtime.secure_round import AGREE_PHASE, CHECK_PHASE
    from node.runtime.state import StateDir
    from tests.helpers import verifier_for
    from tests.test_secure_agree import HOSTILE, _split_view_attack

    A = "bank-1"  # the member whose view bank-3 split (review s5 R4: the split moved)

    net, _ = _split_view_attack()
    out = net.outcome(A)
    state = StateDir(tmp_path / A)
    (tmp_path / A / "outbox").mkdir(parents=True)
    node = SimpleNamespace(name=A, state=state, secure=SimpleNamespace(signed={}))
    verifier = verifier_for(net.cons, net.sks[1], secure=True)
    secure_node.step_path(node, 0, AGREE_PHASE).write_bytes(net.members[A].sent[(0, AGREE_PHASE)])
    for sender in dict.fromkeys((HOSTILE, *out.disagreed[HOSTILE])):  # once each
        for step in (CHECK_PHASE, AGREE_PHASE):
            data = net.members[sender].sent[(0, step)]
            if sender == HOSTILE and step == CHECK_PHASE:  # what reached A
                data = next(d for s, to, d in net.delivered if s == HOSTILE and to == A
                            and decode_outer(d).kind == KIND_SECAGG
                            and decode_secagg(decode_outer(d).body, 4).step == CHECK_PHASE)
            acc = verifier.verify(data, 0)
            assert isinstance(acc, Accepted)
            secure_node.keep_signed_step(node, acc, data)
    kept = secure_node.keep_split_evidence(node, 0, HOSTILE, out)
    assert isinstance(kept, list) and len(kept) > 1
    members = sorted(net.members)
    diag = {"rule": "secure", "used": list(out.selected), "excluded": {},
            "secure": {"ok": out.ok, "reason": out.reason, "detail": out.detail,
                       "dealt": members, "entered": list(out.entered),
                       "named": {**out.named, "bank-9": "inconsistent_pieces: a test's"},
                       "evidence": {HOSTILE: kept, "bank-9": "evidence/secure/deal-bank-9"}}}
    with open(tmp_path / A / "audit.jsonl", "w") as f:
        f.write(json.dumps(audit.Aggregate(0, A, diag).to_json()) + "\n")
    view = read_secure(tmp_path / A, "state dir", A)
    sr = view.rounds[0]
    assert sr.unreadable is None and view.notes == [], view.notes
    # named with a proof (the dispute's revealed deal outranks the split claim since review 2)
    assert sr.named[HOSTILE].startswith(("bad_dealing", "split_view")), sr.named[HOSTILE]
    assert sr.evidence[HOSTILE] == kept
    row = secure_rows(secure_section([view]))[0]
    folder = kept[0].rsplit("/", 1)[0]
    assert f"the signed messages of the split kept: {folder} ({len(kept)} files)" in row[6]
    assert "its signed deal kept: evidence/secure/deal-bank-9" in row[6]
    from node.ops.report_html.secure import to_json
    assert to_json(view)["rounds"][0]["evidence"][HOSTILE] == kept
    # a list holding something else than file names is still refused, naming the member
    diag["secure"]["evidence"] = {HOSTILE: [kept[0], 7]}
    with open(tmp_path / A / "audit.jsonl", "w") as f:
        f.write(json.dumps(audit.Aggregate(0, A, diag).to_json()) + "\n")
    bad = read_secure(tmp_path / A, "state dir", A).rounds[0].unreadable
    assert f"secure.evidence[{HOSTILE}] is not a kept file or a list of them" in bad


DEEP = b"[" * 200_000 + b"]" * 200_000  # json.loads raises RecursionError (review 2 F13)


def _edit_line(path: Path, k: int, edit) -> None:
    lines = path.read_text().splitlines()
    rec = json.loads(lines[k])
    edit(rec)
    lines[k] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, says", [
    (lambda rec: rec.update(mode={}), "mode {}"),
    (lambda rec: rec.update(clip_norm=10 ** 400), "clip_norm 1000"),
    (lambda rec: rec["secure"].update(epsilon_after=10 ** 400), "epsilon_after 1000"),
], ids=["dict mode", "huge clip", "huge epsilon_after"])
def test_a_ledger_line_no_charge_holds_is_shown_unreadable_not_a_crash(tmp_path, edit, says):
    """Review 2 F5: these escaped Ledger() (TypeError, OverflowError) and crashed the report."""
    from node.privacy import secure_record

    state = dp_state(tmp_path / "bank-0")
    _edit_line(state / "ledger.jsonl", 0, edit)
    view = read_secure(state, "state dir", "bank-0")
    assert view.epsilon is None and "ledger.jsonl: unreadable" in view.ledger_problem
    assert "line 1 is corrupt" in view.ledger_problem and says in view.ledger_problem
    assert "unreadable" in secure_section([view])
    with pytest.raises(LocalError, match=f"line 1 is corrupt.*{re.escape(says)}"):
        secure_record.summary(Ledger(state / "ledger.jsonl").records)  # what status reads


def test_a_plan_without_a_budget_or_with_a_huge_number_is_shown_not_a_crash(tmp_path):
    state = dp_state(tmp_path / "bank-0")
    plan = json.loads((state / "secure_plan.json").read_text())
    (state / "secure_plan.json").write_text(json.dumps(dict(plan, epsilon=None)))
    view = read_secure(state, "state dir", "bank-0")
    assert view.plan is not None and view.plan.epsilon is None
    assert "ε budget none at δ 1e-05" in secure_section([view])
    (state / "secure_plan.json").write_text(json.dumps(dict(plan, clip_norm=10 ** 400)))
    view = read_secure(state, "state dir", "bank-0")
    assert view.plan is None and "clip norm must be a finite number" in view.plan_problem
    assert "secure_plan.json: unreadable" in secure_section([view])
    _edit_line(state / "metrics.jsonl", 0, lambda rec: rec.update(epsilon=10 ** 400))
    assert read_secure(state, "state dir", "bank-0").rounds[0].epsilon is None


@pytest.mark.parametrize("target", ["audit.jsonl", "metrics.jsonl", "ledger.jsonl"])
def test_a_deeply_nested_line_is_named_by_every_reader_never_a_recursion_error(
        tmp_path, target):
    from node.ops.status import _pinned_secure_plan
    from node.runtime.state import read_jsonl

    state = dp_state(tmp_path / "bank-0")
    n = len((state / target).read_text().splitlines())
    with open(state / target, "ab") as f:
        f.write(DEEP + b"\n")
    view = read_secure(state, "state dir", "bank-0")
    if target == "ledger.jsonl":  # the ledger refuses (skipping could under-count)
        assert f"line {n + 1} is corrupt (not JSON (JSON nested deeper" in view.ledger_problem
        with pytest.raises(LocalError, match=f"line {n + 1} is corrupt"):
            Ledger(state / target)
    else:
        assert view.rounds[0].ok is True and view.ledger_problem is None
        if target == "audit.jsonl":  # metrics.jsonl's notes are the main reader's
            assert f"state dir/{target} line {n + 1}: not JSON (nested too deep)" in " ".join(
                view.notes)
    assert len(read_jsonl(state / target)) == n  # `flnode status`: the line is skipped
    (state / "secure_plan.json").write_bytes(DEEP[:1 << 15] + DEEP[-(1 << 15):])
    with pytest.raises(LocalError, match="unreadable secure plan"):
        _pinned_secure_plan(state / "secure_plan.json")

"""`flnode report --state-dir DIR`: a real member's own report from its own files."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from gossip.errors import LocalError
from gossip.transports.memory import MemoryHub
from node.cli import main
from node.ops.intervals import auc_score_interval, hanley_mcneil, interval_text, metric_intervals, wilson
from node.ops.report_member import write_member_report
from node.ops.status import collect
from tests.test_runner import build, make, run_all


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Three members, update-level DP, 3 rounds, in process: their state dirs."""
    tmp = tmp_path_factory.mktemp("member")
    _, prep = make(tmp, nodes=3, rounds=3, privacy="update")
    nodes = build(prep, MemoryHub())
    asyncio.run(asyncio.wait_for(run_all(nodes), 300))
    return [n.state.path for n in nodes]


def test_member_report_shows_its_rounds_epsilon_peers_traffic_and_intervals(finished, capsys):
    state = finished[0]
    assert main(["report", "--state-dir", str(state)]) == 0
    assert "wrote" in capsys.readouterr().out
    html = (state / "report.html").read_text()
    doc = json.loads((state / "report.json").read_text())
    st = collect(state)  # what `flnode status` prints: the one source of ε
    assert doc["member"] == "bank-0" and "flnode report: member bank-0" in html
    assert doc["privacy"]["epsilon_spent"] == st["privacy"]["epsilon_spent"] > 0
    assert f"ε spent {st['privacy']['epsilon_spent']:.4f}" in html  # the status line, as is
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert all(r["interval"] and r["interval"][0] <= r[doc["metric"]] <= r["interval"][1]
               for r in doc["rounds"])
    assert set(doc["peers"]) == {"bank-1", "bank-2"}
    assert all(p["shares"] == 3 and p["last_round"] == 2 for p in doc["peers"].values())
    assert doc["bytes_sent"] == st["bytes_sent"] > 0
    assert "Members it heard from" in html and "95 % interval" in html
    assert html.count("data:image/png;base64,") >= 2  # metric (with band) and bytes, at least
    assert doc["final"]["same"] == ["bank-1", "bank-2"]


def test_member_table_has_its_own_row_counts_and_no_column_it_cannot_know(finished, tmp_path):
    """The "This member" table used to show "—" for rows, local-only and gain, and the
    chart caption described local-only, centralized and attacker lines it never draws."""
    import re

    state = finished[0]
    lines = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    train, held = lines[-1]["train_rows"], lines[-1]["eval_rows"]
    assert train > held > 0
    html = write_member_report(state, tmp_path / "r.html")[0].read_text()
    table = html.split("<h2>This member</h2>")[1].split("<h2>")[0]
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert heads[:4] == ["member", "training rows", "held-out rows", "consortium"], heads
    assert not {"local-only", "gain", "rows"} & set(heads)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", table.split("</thead>")[1])
    assert cells[1:3] == [str(train), str(held)], cells
    captions = " ".join(re.findall(r"<figcaption>([^<]*)</figcaption>", html))
    assert "Solid: bank-0&#x27;s model after each round." in captions, captions
    for absent in ("local-only", "centralized", "attacker"):
        assert absent not in captions
    assert "Newcombe" in captions  # the band is drawn: it is named


def test_member_report_notes_a_torn_metrics_line_and_keeps_the_rest(finished, tmp_path):
    import shutil

    state = tmp_path / "bank-1"
    shutil.copytree(finished[1], state)
    with open(state / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "metr')  # a kill mid-write
    html_path, _ = write_member_report(state, tmp_path / "r.html")
    html = html_path.read_text()
    assert "torn last line" in html and "flnode report: member bank-1" in html


def test_report_wants_exactly_one_of_run_dir_and_state_dir(finished, capsys):
    for argv in (["report"], ["report", "x", "--state-dir", str(finished[0])]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "one of them" in capsys.readouterr().err
    with pytest.raises(LocalError, match="no checkpoint.msgpack"):
        write_member_report(finished[0].parent.parent)  # a run dir is not a state dir


def test_wilson_and_hanley_mcneil_match_published_values():
    lo, hi = wilson(45, 50)  # Newcombe (1998), 45/50 -> 0.7864-0.9565 (Wilson)
    assert lo == pytest.approx(0.7864, abs=1e-4) and hi == pytest.approx(0.9565, abs=1e-4)
    # Hanley & McNeil (1982), table 1: AUC 0.8, 50 + 50 -> SE 0.0445 (by their formula)
    lo, hi = hanley_mcneil(0.8, 50, 50)
    assert (hi - lo) / 2 / 1.959964 == pytest.approx(0.0445, abs=2e-4)
    assert math.isnan(wilson(0, 0)[0]) and math.isnan(hanley_mcneil(0.9, 0, 10)[0])


def test_an_interval_narrows_with_rows_and_is_shown_in_the_round_line():
    few = metric_intervals({"accuracy": 0.8, "roc_auc": 0.8}, [0, 1] * 7)
    many = metric_intervals({"accuracy": 0.8, "roc_auc": 0.8}, [0, 1] * 100)
    for k in ("accuracy", "roc_auc"):
        assert few[k][1] - few[k][0] > many[k][1] - many[k][0] > 0
    assert few["roc_auc"][1] - few["roc_auc"][0] > 0.3  # 14 rows: a 0.3 swing is the rows
    assert interval_text("roc_auc", few, 14).startswith(" (95 % 0.") and "on 14 rows" in \
        interval_text("roc_auc", few, 14)
    assert "roc_auc" not in metric_intervals({"roc_auc": float("nan")}, [0] * 5)


def test_auc_interval_is_not_degenerate_at_the_boundary():
    # 13 held-out rows, all ranked right: the Wald form says 1.00-1.00 (nothing); the
    # score interval is wide, as 5 + 8 rows are
    assert hanley_mcneil(1.0, 5, 8) == (1.0, 1.0)
    lo, hi = metric_intervals({"roc_auc": 1.0}, [1] * 5 + [0] * 8)["roc_auc"]
    assert hi == 1.0 and 0.6 < lo < 0.8
    assert interval_text("roc_auc", {"roc_auc": [lo, hi]}, 13) == " (95 % 0.71-1.00 on 13 rows)"
    lo, hi = auc_score_interval(0.0, 5, 8)
    assert lo == 0.0 and 0.2 < hi < 0.4
    # many rows, mid AUC: close to Hanley-McNeil's Wald interval
    s, w = auc_score_interval(0.8, 500, 500), hanley_mcneil(0.8, 500, 500)
    assert s[0] == pytest.approx(w[0], abs=0.01) and s[1] == pytest.approx(w[1], abs=0.01)
    assert math.isnan(auc_score_interval(0.9, 0, 10)[0])
    assert math.isnan(auc_score_interval(1.5, 5, 5)[0])


def test_auc_interval_covers_about_95_percent_on_few_rows():
    import numpy as np

    from node.learn.auc import roc_auc

    # binormal scores 2 sd apart: true AUC = Phi(2 / sqrt 2) = 0.921; 5 + 8 rows, where
    # the Wald form covers ~71 % (measured) and often collapses to a point at 1.000
    rng = np.random.default_rng(0)
    true, y = 0.5 * (1 + math.erf(1.0)), np.r_[np.ones(5), np.zeros(8)].astype(int)
    hits = 0
    for _ in range(1500):
        lo, hi = auc_score_interval(roc_auc(y, np.r_[rng.normal(2, 1, 5), rng.normal(0, 1, 8)]),
                                    5, 8)
        hits += lo <= true <= hi
    assert 0.93 <= hits / 1500 <= 0.975


def test_wilson_covers_about_95_percent():
    import numpy as np

    rng = np.random.default_rng(0)
    p, n = 0.85, 30
    hits = sum(lo <= p <= hi for lo, hi in (wilson(k, n) for k in rng.binomial(n, p, 4000)))
    assert 0.93 <= hits / 4000 <= 0.97


def test_the_round_line_of_flnode_run_carries_the_interval(capsys, tmp_path):
    from node.runtime.config import validate_config
    from node.runtime.daemon import _print_round
    from node.runtime.node import RoundReport

    cfg = validate_config({"state_dir": "s", "identity": {"key": "k"}, "consortium": {
        "path": "c"}, "data": {"path": "d"}, "privacy": {"mode": "off"},
        "training": {"rounds": 30}}, "test")
    rep = RoundReport("bank-0", 4, {"roc_auc": 0.81}, None, ["bank-1"], [], 1.0, 2.0,
                      intervals={"roc_auc": [0.62, 0.97]}, eval_rows=26)
    _print_round(cfg, "bank-0", "roc_auc")(rep)
    assert "bank-0 round 5/30 roc_auc 0.8100 (95 % 0.62-0.97 on 26 rows) no DP" in \
        capsys.readouterr().out


def test_a_negative_mean_gain_on_own_rows_says_why(capsys):
    """`make demo`'s first table showed a negative mean gain with no word on why."""
    from rich.console import Console

    from node.ops.report_html import negative_gain_note
    from node.rehearsal.simulation.output import print_own_rows

    summary = {"dataset": "default", "metric": "roc_auc", "partition": "dirichlet:0.5",
               "rounds": 30, "epsilon": {"mode": "record", "budget": 3.0},
               "rows": {"bank-0": 4459, "bank-1": 34, "bank-3": 2739},
               "own_rows": {"bank-0": {"rows": 1129, "local_only": 0.9721, "consortium": 0.9629,
                                       "gain": -0.0092},
                            "bank-1": {"rows": 10, "local_only": 0.95, "consortium": 0.96,
                                       "gain": 0.01},
                            "bank-3": {"rows": 663, "local_only": 0.9533,
                                       "consortium": 0.9503, "gain": -0.0030}}}
    why = negative_gain_note(summary)
    assert why.startswith("why the mean gain on the members' own rows is negative (-0.0007): "
                          "the consortium model is trained "
                          "under record-level DP (ε 3); local-only trains without DP")
    assert "bank-0 (4459 of 7232 training rows, -0.0092)" in why and "bank-1 (" not in why
    assert "after 30 rounds" not in why
    print_own_rows(summary, Console(width=400))
    assert "why the mean gain on the members' own rows is negative" in capsys.readouterr().out
    summary["own_rows"]["bank-1"]["gain"] = 0.5  # mean gain positive: nothing to explain
    assert negative_gain_note(summary) is None


def test_result_and_files_written_are_not_glued_on_one_line(tmp_path, finished, capsys):
    """`flnode simulate` printed "consortium − centralized: …; wrote …" and `flnode report`
    "wrote … (open … in a browser)": a result and a note on one line."""
    from rich.console import Console

    from node.rehearsal.simulation.output import _print_run_facts

    summary = {"metric": "roc_auc", "consortium": {"mean": 0.9, "per_node": {"bank-0": 0.9}},
               "local_only": {"mean": 0.8}, "centralized": 0.95, "epsilon": {"mode": "off",
               "delta": 1e-5, "per_node": {"bank-0": None}}, "rows": {"bank-0": 10},
               "bytes": {"bank-0": {"sent": 1, "received": 1}}, "rejected_per_node": {}}
    _print_run_facts(summary, tmp_path, Console(width=200), pooled=False)
    lines = capsys.readouterr().out.splitlines()
    assert "  consortium − centralized: -0.0500" in lines
    assert f"  wrote {tmp_path / 'summary.json'} and {tmp_path / 'accuracy.png'}" in lines
    assert main(["report", "--state-dir", str(finished[2])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"wrote {finished[2] / 'report.html'} and "
                      f"{finished[2] / 'report.json'}")
    assert out[1].startswith("open file://") and out[1].endswith(" in a browser")


def test_the_simulators_round_line_says_when_few_rows_make_the_figures_noisy():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from node.rehearsal.simulation.output import RoundPrinter
    from node.runtime.node import RoundReport

    buf = io.StringIO()
    p = RoundPrinter(SimpleNamespace(rounds=3), ["bank-a", "bank-b"], "roc_auc",
                     Console(file=buf, width=200))
    for name, iv in (("bank-a", [0.40, 0.90]), ("bank-b", [0.55, 0.85])):
        p.on_round(RoundReport(name, 0, {"roc_auc": 0.7}, None, [], [], 1.0, 1.0,
                               intervals={"roc_auc": iv}, eval_rows=16))
    for name in ("bank-a", "bank-b"):  # 2,000 rows: nothing to say
        p.on_round(RoundReport(name, 1, {"roc_auc": 0.95}, None, [], [], 1.0, 1.0,
                               intervals={"roc_auc": [0.94, 0.96]}, eval_rows=2000))
    first, second = buf.getvalue().splitlines()
    assert first.endswith("95 % up to ±0.25 (few held-out rows)"), first
    assert "95 %" not in second

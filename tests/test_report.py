"""`flnode report RUN_DIR`: one self-contained report.html rendered from a real run dir.

The run dir comes from a real in-process `flnode simulate` (3 members, 3 rounds,
update-level DP so every plot exists); the hostile and partial variants are copies of
it with files rewritten the way a killed node or a hostile member name leaves them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from gossip.errors import LocalError
from node.cli import main
from node.ops.report_html import load_run, write_report
from node.rehearsal.simulation.output import simulate
from node.rehearsal.simulation.spec import SimulationSpec

pytestmark = pytest.mark.slow

MEMBERS = ["bank-0", "bank-1", "bank-2"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    simulate(SimulationSpec(dataset="default", nodes=3, partition="dirichlet:0.5", rounds=3,
                            seed=0, out=out, privacy="update", clip=0.1, sigma=1.0),
             Console(quiet=True))
    return out


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    (dst / "report.html").unlink(missing_ok=True)
    return dst


class Page(HTMLParser):
    """The first table's rows (cell texts) and every src/href of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.by_table: dict[int, list[list[str]]] = {}  # every table's body rows
        self.links: list[str] = []
        self.tables = 0
        self.cell: list[str] | None = None
        self.in_tbody = False

    def handle_starttag(self, tag, attrs):
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "table":
            self.tables += 1
        elif tag == "tbody":
            self.in_tbody = True
        elif tag == "tr" and self.in_tbody:
            self.by_table.setdefault(self.tables, []).append([])
        elif tag == "td" and self.in_tbody:
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_tbody = False
            self.rows = self.by_table.get(1, [])
        elif tag == "td" and self.cell is not None:
            self.by_table[self.tables][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


def pngs(text: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        data = base64.b64decode(b64, validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes every pixel: a truncated or corrupt PNG raises here
        assert img.format == "PNG" and img.width >= 400 and img.height >= 200
        out.append(img)
    return out


def rename(summary: dict, old: str, new: str) -> dict:
    """summary.json with member `old` called `new` everywhere (keys and values)."""
    def walk(x):
        if isinstance(x, dict):
            return {(new if k == old else k): walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return new if x == old else x
    return walk(summary)


def test_report_of_a_real_run_is_self_contained_with_a_row_and_plots_per_member(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    path = run_dir / "report.html"
    assert f"wrote {path}" in capsys.readouterr().out
    text = path.read_text()
    page = parse(text)
    # Self-contained: every src/href is an embedded PNG; nothing fetches anything.
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", text, re.I)
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<script|<link|@import|url\(", text, re.I)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {r[0]: r for r in page.rows}
    assert [r[0] for r in page.rows] == MEMBERS + ["mean", "centralized"]
    for name in MEMBERS:
        row = rows[name]
        assert row[1] == str(summary["rows"][name])
        assert row[2] == f"{summary['local_only']['per_node'][name]:.4f}"
        assert row[3] == f"{summary['consortium']['per_node'][name]:.4f}"
        assert row[5] == f"{summary['epsilon']['per_node'][name]:.2f}"  # update mode: no budget
        assert row[6] == row[7] == "3"                # rounds closed, shares released
        assert row[8] == "6"                          # 2 other members x 3 rounds
        assert row[9] == "none"
    assert rows["centralized"][3] == f"{summary['centralized']:.4f}"
    assert "trimmed_mean" in text  # the aggregation rule
    assert len(pngs(text)) == 3    # metric, ε, bytes per round


def test_bytes_per_round_add_up_to_the_cumulative_counters(run_dir):
    run = load_run(run_dir)
    for m in run.members:
        lines = [json.loads(x) for x in
                 (run_dir / "state" / m.name / "metrics.jsonl").read_text().splitlines()]
        assert sum(p.sent for p in m.rounds.values()) == lines[-1]["bytes_sent"]
        assert sum(p.received for p in m.rounds.values()) == lines[-1]["bytes_received"]
        assert [p.epsilon for _, p in sorted(m.rounds.items())] == [x["epsilon"] for x in lines]


def test_a_per_round_bytes_field_is_used_when_metrics_jsonl_has_it(copy):
    log = copy / "state" / "bank-0" / "metrics.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    for i, line in enumerate(lines):
        line["bytes"] = {"sent": 1000 * (i + 1), "received": 7}
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = next(m for m in load_run(copy).members if m.name == "bank-0")
    assert [p.sent for _, p in sorted(m.rounds.items())] == [1000, 2000, 3000]
    assert all(p.received == 7 for p in m.rounds.values())


def test_hostile_member_names_are_escaped_and_never_become_paths(copy):
    script, img, dollar = "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "a$\\frac{$b"
    summary = json.loads((copy / "summary.json").read_text())
    summary = rename(rename(rename(summary, "bank-1", script), "bank-2", img), "bank-0", dollar)
    (copy / "summary.json").write_text(json.dumps(summary))
    # The <img ...> member has a state dir under its name (found by listing state/); the
    # <script> one cannot (a '/' in it), and bank-0's stays: their curves come from history.
    (copy / "state" / "bank-2").rename(copy / "state" / img)
    text = write_report(copy).read_text()
    assert script not in text and "<img src=x" not in text and "alert(1)</" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert [r[0] for r in parse(text).rows][:3] == [dollar, script, img]
    assert len(pngs(text)) == 3  # a '$' in a name is no mathtext for matplotlib


def test_missing_summary_json_is_a_clear_error_naming_it(copy, capsys):
    (copy / "summary.json").unlink()
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'summary.json'}: missing" in err
    assert not (copy / "report.html").exists()


def test_a_field_of_the_wrong_type_is_an_error_naming_file_and_field(copy):
    summary = json.loads((copy / "summary.json").read_text())
    summary["consortium"]["per_node"]["bank-1"] = "high"
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(LocalError, match=r"summary\.json: consortium\.per_node\.bank-1: "
                                         r"expected a number, got 'high'"):
        write_report(copy)
    (copy / "summary.json").write_text("[1, 2]")
    with pytest.raises(LocalError, match=r"summary\.json: expected a JSON object, got list"):
        write_report(copy)


def test_a_node_killed_mid_run_still_renders_what_exists(copy):
    """bank-2 died after its first round, mid-write; bank-1's state dir is gone."""
    log = copy / "state" / "bank-2" / "metrics.jsonl"
    first = log.read_text().splitlines()[0]
    log.write_text(first + "\n" + first[: len(first) // 2])
    shutil.rmtree(copy / "state" / "bank-1")
    text = write_report(copy).read_text()
    rows = {r[0]: r for r in parse(text).rows}
    assert rows["bank-2"][7] == "1" and rows["bank-2"][8] == "2"  # 1 round; 2 shares in
    assert rows["bank-1"][7] == "—"                                # no log: not known
    assert "state/bank-2/metrics.jsonl line 2: not JSON (a torn last line" in text
    assert "bank-1: no state/bank-1/metrics.jsonl" in text
    assert len(pngs(text)) == 3


def test_out_flag_and_no_torch_import(copy, tmp_path):
    out = tmp_path / "elsewhere.html"
    code = ("import sys; from node.ops.report_html import write_report; "
            f"write_report({str(copy)!r}, {str(out)!r}); "
            "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("<!DOCTYPE html>") and not (copy / "report.html").exists()
    with pytest.raises(LocalError, match="does not exist"):
        write_report(copy, tmp_path / "no" / "such" / "dir.html")


def test_own_rows_table_and_local_training_are_shown(copy):
    """The gain on each member's own held-out rows (summary.json `own_rows`) gets its own
    table, and the local-training settings (FedProx, LR decay, ...) are in the facts."""
    summary = json.loads((copy / "summary.json").read_text())
    summary["own_rows"] = {"bank-0": {"local_only": 0.81, "consortium": 0.9, "gain": 0.09,
                                      "rows": 40},
                           "bank-1": {"local_only": float("nan"), "consortium": 0.5,
                                      "gain": float("nan"), "rows": 3}}
    summary["own_rows_source"] = "20 % of each member's rows"
    summary["training"] = {"epochs": 1, "lr": 0.05, "prox_mu": 0.01}
    (copy / "summary.json").write_text(json.dumps(summary))
    text = write_report(copy).read_text()
    page = parse(text)
    own = page.by_table[2]
    assert own == [["bank-0", "40", "0.8100", "0.9000", "+0.0900"],
                   ["bank-1", "3", "—", "0.5000", "—"],
                   ["mean gain", "", "", "", "+0.0900"]]  # the row the note speaks of
    assert "why the mean gain" not in text  # positive here: nothing to explain
    assert "On each member&#x27;s own held-out rows" in text or \
        "On each member's own held-out rows" in text
    assert "prox_mu = 0.01" in text and "lr = 0.05" in text
    # the trial's run: the consortium test set's mean gain positive, the own rows' negative:
    # the note names the own rows' mean, which the own-rows table shows
    summary["own_rows"]["bank-0"].update(consortium=0.7, gain=-0.11)
    (copy / "summary.json").write_text(json.dumps(summary))
    text = html.unescape(write_report(copy).read_text())
    assert parse(text).by_table[2][-1] == ["mean gain", "", "", "", "-0.1100"]
    assert "why the mean gain on the members' own rows is negative (-0.1100)" in text
    summary["own_rows"]["bank-0"]["rows"] = -1
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(LocalError, match=r"own_rows\.bank-0\.rows: expected a count"):
        write_report(copy)


def test_sealed_shares_says_what_the_nodes_did_not_the_setting(copy):
    """The run's seal is "auto" on the memory transport: its nodes sent shares unsealed (the
    terminal said so) while the facts said `auto`."""
    summary = json.loads((copy / "summary.json").read_text())
    assert (summary["seal"], summary["transport"]) == ("auto", "memory")
    text = html.unescape(write_report(copy).read_text())
    assert re.search(r"<dt>sealed shares</dt><dd>off: shares signed, not sealed \(gossip.seal "
                     r"= auto: sealed on MQTT only; this run's transport is memory\)</dd>", text)
    summary["transport"] = "mqtt"
    (copy / "summary.json").write_text(json.dumps(summary))
    text = html.unescape(write_report(copy).read_text())
    assert "<dt>sealed shares</dt><dd>on: each share sealed to its recipient (" in text


def test_the_terminal_summary_names_the_server_optimizer_the_rules_apply(run_dir, capsys):
    """A 3-member run under the default rules: trimmed_mean with the FedAdam step behind
    it (node/strategy/consortium_rules.py AUTO_PARAMS); the summary line says both, and says nothing of an
    optimizer where the rules have none."""
    from node.rehearsal.simulation.output import make_console, print_summary

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["aggregation"]["rule"] == "trimmed_mean"
    assert summary["aggregation"]["server_opt"] == "adam"

    def line(s: dict) -> str:
        console = make_console()
        with console.capture() as cap:
            print_summary(s, run_dir / "nowhere", console)
        text = " ".join(cap.get().split())
        return text[text.index("aggregation ("):]

    assert "trimmed_mean, f = 1" in line(summary)
    assert "then a FedAdam step (server_lr 0.03)" in line(summary)
    summary["aggregation"] = {**summary["aggregation"], "server_opt": "none"}
    assert "step" not in line(summary).split("consortium −")[0]


def test_a_rounds_mean_skips_members_whose_metric_is_undefined_and_names_them():
    """A member whose held-out rows hold one class has no ROC-AUC: the round's headline
    used to read "mean roc_auc nan" for the whole run (bring-your-own-data rehearsal)."""
    from node.rehearsal.simulation.output import mean_text

    nan = float("nan")
    assert mean_text({"a": 0.946, "b": 0.917, "c": nan}) == "0.9315 (n/a: c)"
    assert mean_text({"a": 0.5, "b": 0.75}) == "0.6250"
    assert mean_text({"a": nan}) == "n/a"


def test_the_terminal_own_rows_notes_say_which_member_and_why(capsys):
    """n/a used to say "(no rows, or rows of one class only)" for whichever applied, and
    a 10-row member's gain stood in the mean gain unremarked."""
    from node.rehearsal.simulation.output import make_console, print_own_rows

    nan = float("nan")
    summary = {"metric": "roc_auc", "dataset": "default", "own_rows": {
        "bank-0": {"local_only": 0.97, "consortium": 0.971, "gain": 0.001, "rows": 1129},
        "bank-1": {"local_only": 1.0, "consortium": 0.958, "gain": -0.042, "rows": 10},
        "bank-2": {"local_only": nan, "consortium": nan, "gain": nan, "rows": 198},
        "bank-3": {"local_only": nan, "consortium": nan, "gain": nan, "rows": 0}}}
    print_own_rows(summary, make_console())
    out = capsys.readouterr().out
    assert "undefined on bank-2's own rows: its 198 held-out rows hold one class only" in out
    assert "undefined on bank-3's own rows: it has no held-out rows" in out
    assert "few own rows: bank-1 (10)" in out and "bank-0 (" not in out

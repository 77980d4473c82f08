"""Golden contracts that need a run of today's node (issue 21, step 1): tests/golden/.

Not unit tier (they train small models): one seeded `flnode simulate` run whose
audit.jsonl / metrics.jsonl records and summary.json are compared with records.json,
an unfinished state dir (resume/) that today's node completes, and the Prometheus
metric names of the node that completed it. Goldens written by tests/golden/make_golden.py
(records, resume, prometheus); a failure means a contract a deployed node, an
operator's dashboard or a reader of the records holds has moved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gossip import envelope as E
from node.privacy.ledger import Ledger
from node.runtime.state import StateDir
from tests.golden import make_golden as G

GOLDEN = Path(__file__).parent / "golden"
RUN = json.loads((GOLDEN / "run.json").read_text())


# --- audit.jsonl / metrics.jsonl records and summary.json of a seeded simulate run ------

RECORDS = json.loads((GOLDEN / "records.json").read_text())
# Floats computed from the accountant (ε, δ, σ) or copied from the configuration: only
# the last digits may differ (the accountant's own float order), to this relative tolerance.
ACCOUNTANT_KEYS = frozenset({"epsilon", "delta", "budget", "noise_multiplier",
                             "noise_multiplier_per_node", "per_node", "clip",
                             "max_weight_fraction", "sigma"})
ACCOUNTANT_REL = 1e-9
# Floats computed from a trained model or the shares (ROC-AUC, accuracy, far_ratio, the
# control-variate correction norm, ...): a refactor may sum the shares or the batch in
# another order, and float32 sums differ in the last bits; a metric may then move by a
# tie flipped (1 / (positives x negatives), ~1e-5 on 2,000 test rows). Another seeded draw
# order or a changed rule moves them by far more than this.
MODEL_ABS = 1e-3


def _compare(got, want, path: str = "", accountant: bool = False) -> list[str]:
    """Field-by-field differences (path: why), numbers to the tolerances above."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: {type(got).__name__}, golden an object"]
        out = [f"{path}.{k}: missing" for k in sorted(set(want) - set(got))]
        out += [f"{path}.{k}: not in the golden record (a new field)"
                for k in sorted(set(got) - set(want))]
        for k in sorted(set(want) & set(got)):
            out += _compare(got[k], want[k], f"{path}.{k}", accountant or k in ACCOUNTANT_KEYS)
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {got!r} != golden {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True))
                for d in _compare(g, w, f"{path}[{i}]", accountant)]
    if isinstance(want, float) and isinstance(got, float):
        ok = (math.isclose(got, want, rel_tol=ACCOUNTANT_REL) if accountant
              else math.isclose(got, want, abs_tol=MODEL_ABS)) or (got != got and want != want)
        return [] if ok else [f"{path}: {got!r} != golden {want!r}"]
    if type(got) is not type(want) or got != want:
        return [f"{path}: {got!r} != golden {want!r}"]
    return []


def test_compare_finds_what_it_must():
    """The comparison itself can fail: a renamed key, a moved ε, a changed count."""
    want = {"epsilon": 2.5, "auc": 0.9, "n": 3, "m": {"a": [1, "x"]}}
    assert _compare(dict(want), want) == []
    assert _compare({**want, "auc": 0.9 + 5e-4}, want) == []
    assert _compare({**want, "auc": 0.91}, want) == [".auc: 0.91 != golden 0.9"]
    assert _compare({**want, "epsilon": 2.5 + 1e-6}, want) != []
    assert _compare({**want, "n": 3.0}, want) != []
    assert _compare({**{k: v for k, v in want.items() if k != "n"}, "count": 3}, want) == [
        ".n: missing", ".count: not in the golden record (a new field)"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """One seeded `flnode simulate` run of G.SIM_ARGV (about 5 s of CPU), shared by the
    record and summary tests below."""
    out = tmp_path_factory.mktemp("golden-simulate") / "run"
    G.run_simulate(out)
    return out


@pytest.mark.slow
def test_simulate_summary_matches_field_by_field(simulated):
    summary = json.loads((simulated / "summary.json").read_text())
    assert all(k in summary for k in G.SUMMARY_VOLATILE)
    for k in G.SUMMARY_VOLATILE:
        summary.pop(k)
    assert _compare(summary, RECORDS["summary"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("what", ["audit", "metrics"])
def test_every_record_writer_keeps_its_keys_and_value_types(simulated, what):
    """A key renamed, dropped or retyped in any writer of audit.jsonl / metrics.jsonl
    fails here: status, report, report_member and the scripts read these keys."""
    writer = G.audit_writer if what == "audit" else G.metrics_writer
    golden = RECORDS["shapes"][what]
    seen = set()
    for member, lines in G.read_records(simulated)[what].items():
        for i, line in enumerate(lines):
            kind = writer(line)
            assert kind in golden, f"{member} {what}.jsonl line {i + 1}: a new kind {kind!r}"
            seen.add(kind)
            shape = G.record_shape(line)
            want = golden[kind]
            assert sorted(shape["keys"]) == sorted(want["keys"]), (member, kind, i)
            for k, t in shape["keys"].items():  # null and a number both stand for "none"
                assert t == want["keys"][k] or "null" in (t, want["keys"][k]), (kind, k, t)
            for k, keys in want.get("nested", {}).items():
                if isinstance(line[k], dict):
                    assert sorted(line[k]) == keys, (member, kind, k)
    want_seen = set(golden) - set(G.FEDERATED_WRITERS if what == "audit" else ())
    assert seen == want_seen, f"kinds no longer written: {want_seen - seen}"


def test_normalization_refused_and_flood_records_keep_their_keys(tmp_path):
    """The audit writers the simulate run does not reach: federated normalization's line,
    a member's signed message refused on what it says (bad_stats), a flood (audit line,
    and flood_by_sender in that round's metrics line)."""
    state = G.federated_run(tmp_path / "run")
    audit = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
    for w in G.FEDERATED_WRITERS:
        lines = [x for x in audit if G.audit_writer(x) == w]
        assert lines, f"no {w} line written"
        for line in lines:
            assert G.record_shape(line) == RECORDS["shapes"]["audit"][w]
    refused = next(x for x in audit if G.audit_writer(x) == "refused")
    assert (refused["member"], refused["kind"], refused["outcome"]) == \
        ("bank-1", E.KIND_STATS, "bad_stats")
    flood = next(x for x in audit if G.audit_writer(x) == "flood")
    assert (flood["member"], flood["round"]) == ("bank-1", 0)
    assert flood["detail"].startswith(f"{G.FLOOD_OVER} messages over its share")
    line = json.loads((state / "metrics.jsonl").read_text().splitlines()[0])
    assert G.record_shape(line) == RECORDS["flooded_round"]
    assert line["flood_by_sender"] == {"bank-1": G.FLOOD_OVER}


@pytest.mark.slow
@pytest.mark.parametrize("what", ["audit", "metrics"])
def test_record_values_of_the_seeded_run_are_frozen(simulated, what):
    """Every line but the accepted ones (one per message, arrival-ordered), without the
    volatile fields (time, digests, signatures, byte counts): the same values."""
    recs = G.read_records(simulated)[what]
    if what == "audit":
        got = {m: G.stable_lines(lines, True) for m, lines in recs.items()}
        kinds = sorted({x["kind"] for lines in recs.values() for x in lines
                        if G.audit_writer(x) == "accepted"})
        assert kinds == RECORDS["values"]["accepted_kinds"]
    else:
        got = {m: G.stable_lines(lines, False) for m, lines in recs.items()}
    assert _compare(got, RECORDS["values"][what]) == []


# --- an unfinished run, resumed by today's node ---------------------------------------

RESUME = json.loads((GOLDEN / "resume.json").read_text())


def _outbox(state: Path, round_: int) -> Path:
    return state / "outbox" / f"round-{round_:08d}.env"


def test_golden_unfinished_run_is_what_it_claims(tmp_path):
    """resume/ is mid-run: both members checkpointed after round 0 of 2; telco-0 has its
    round-1 share released (charged in its ledger, stored in its outbox), telco-1 not."""
    run = G.copy_resume(tmp_path / "run")
    for name in ("telco-0", "telco-1"):
        cp = StateDir(run / "state" / name).load_checkpoint()
        assert (cp.next_round, cp.planned_rounds) == (1, 2)
        rounds = [r.round for r in Ledger(run / "state" / name / "ledger.jsonl").records]
        assert rounds == ([0, 0, 1] if name == G.RESUME_RELEASED else [0, 0])
    assert _outbox(run / "state" / G.RESUME_RELEASED, 1).exists()
    assert not _outbox(run / "state" / "telco-1", 1).exists()


def test_golden_unfinished_run_resumes_and_resends_its_stored_release(tmp_path):
    """Today's node loads the unfinished run and completes it; telco-0 re-sends the stored
    round-1 bytes (never re-trained, never charged again) and both end at the ε an
    uninterrupted run accounts (run.json, the same settings run through), telco-1 too,
    though configured for a third round its plan has no budget for; the node that
    completed it exposes the Prometheus metrics of prometheus.json (one run for both: it
    trains)."""
    run = G.copy_resume(tmp_path / "run")
    state0 = run / "state" / G.RESUME_RELEASED
    stored = _outbox(state0, 1).read_bytes()
    ledger_before = (state0 / "ledger.jsonl").read_bytes()
    nodes = G.finish_resume(run)
    for name in ("telco-0", "telco-1"):  # read from disk, as the next restart would
        assert StateDir(run / "state" / name).load_checkpoint().next_round == 2
    # No new charge for the re-sent release: the ledger is the one written before.
    assert (state0 / "ledger.jsonl").read_bytes() == ledger_before
    for name in ("telco-0", "telco-1"):
        want = RESUME[name]
        got = G.ledger_of(run / "state" / name)
        assert got["rounds"] == want["rounds"] == [0, 0, 1]
        assert math.isclose(got["epsilon"], want["epsilon"], rel_tol=1e-12)
        assert math.isclose(got["epsilon"], RUN["epsilon"], rel_tol=1e-12)
    # The share telco-1 accepted from telco-0 for round 1 is the stored envelope.
    digest = E.decode_outer(stored).digest.hex()
    audit = [json.loads(x) for x in
             (run / "state" / "telco-1" / "audit.jsonl").read_text().splitlines()]
    shares = [a for a in audit if a.get("outcome") == "accepted" and a["member"] ==
              G.RESUME_RELEASED and a["round"] == 1 and a["kind"] in (E.KIND_SHARE,
                                                                        E.KIND_SEALED)]
    assert shares and {a["digest"] for a in shares} == {digest}
    refused = [a for a in audit if G.audit_writer(a) in ("rejected", "refused")]
    assert refused == []
    # The member given a round more than its plan stopped at the budget (above: its ε is
    # the planned one) and wrote the "stopped" metrics line, keys and values frozen.
    stopped = json.loads((run / "state" / G.RESUME_OVER_BUDGET / "metrics.jsonl")
                         .read_text().splitlines()[-1])
    assert G.record_shape(stopped) == RESUME["stopped"]["shape"]
    assert _compare(G.stable(stopped), RESUME["stopped"]["line"]) == []
    # Prometheus: dashboards and alerts name these; a renamed metric or label fails here.
    assert G.prometheus_families(nodes[0]) == json.loads(
        (GOLDEN / "prometheus.json").read_text())



# --- the digest echo's audit writers (a run with [rules] echo = true) --------------------

def test_the_echo_audit_writers_keep_their_keys_and_value_types(tmp_path):
    """The "agreement" and "exclusion" lines of a seeded run with a split equivocator
    (G.ECHO_ARGV) have the key sets and value types of echo_records.json."""
    want = json.loads((GOLDEN / "echo_records.json").read_text())
    G.run_echo(tmp_path / "run")
    assert G.echo_contract(tmp_path / "run")["shapes"] == want["shapes"]

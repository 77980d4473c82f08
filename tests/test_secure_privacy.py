"""Issue 22, the privacy side of a secure round: the ledger's "secure" record kind, the
accountant reading it, the plan the node chooses, the charge, and the refusals
(node/privacy/secure.py, node/privacy/secure_record.py). Pure and fast: no torch."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.errors import LocalError
from node.privacy import secure_record
from node.privacy.accountant import LedgerRecord, epsilon_of
from node.privacy.distributed import (
    SumMechanism,
    SumRelease,
    choose_granularity,
    epsilon_of_sum,
    release_rdp,
)
from node.privacy.ledger import Ledger
from node.privacy.secure import (
    SecurePlan,
    SecureRoundRefused,
    calibrate_secure_sigma,
    charge_secure_round,
    may_open_round,
    secure_plan,
)

DIGITS = dict(rows_total=1437, members=8, coalition=2, epsilon=3.0, delta=1e-5, dim=4810)


def fixed_plan(**over) -> SecurePlan:
    """A plan with every number given (no calibration): n 8, t 2, the digits MLP."""
    base = SecurePlan(epsilon=None, delta=1e-5, members=8, coalition=2, min_contributors=6,
                      variant="sum_only", dim=4810, clip_norm=1.0,
                      granularity=choose_granularity(1.0, 4810), noise_multiplier=4.0,
                      sample_rate=0.25, steps=40, rows_total=1437, lr=0.8)
    return dataclasses.replace(base, **over)


# --- the accountant on a secure record --------------------------------------------------------

@pytest.mark.parametrize("m", [3, 5, 6, 8])
def test_a_sum_charge_is_the_distributed_accountant_of_the_sum(m):
    """Two implementations agree: the ledger's record RDP (secure_record) and the reviewed
    distributed.py release accountant, at m contributors."""
    plan = fixed_plan()
    mech = plan.mechanism()
    rec = dataclasses.replace(plan.record(0, m), steps=7)
    want = epsilon_of_sum(mech, plan.noise_multiplier, [SumRelease(plan.sample_rate, 7, m)],
                          plan.delta)
    assert epsilon_of([rec], plan.delta) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("clip,levels", [(1.0, None), (0.3, None), (3.0, None), (3.0, 37)])
@pytest.mark.parametrize("sigma", [0.1, 3.3])
def test_the_ledger_charge_and_the_release_accountant_are_one_computation(clip, levels, sigma):
    """secure_record.record_rdp and distributed.release_rdp share skellam.sum_rdp and
    honest_variance: the same RDP to the last bit at every clip and contribution count
    (before, two copies agreed to rounding only: sigma C / gamma multiplied in another
    order at C != 1)."""
    # the plan's granularity (C / 2^k), or any other a record may hold
    gamma = choose_granularity(clip, 4810) if levels is None else clip / levels
    plan = fixed_plan(clip_norm=clip, granularity=gamma, noise_multiplier=sigma)
    mech = plan.mechanism()
    for m in (0, 2, 3, 6, 8):
        rec = plan.record(0, m)
        got = secure_record.record_rdp(rec.secure, sigma, plan.sample_rate, 7, clip)
        want = release_rdp(mech, sigma, SumRelease(plan.sample_rate, 7, m))
        assert np.array_equal(got, want), m


def test_a_per_member_charge_is_one_members_noise():
    """reveal "per_member" (distances, norm_only): the noise of one member's share, the sum's
    charge at m - t = 1, whatever m is."""
    plan = fixed_plan(variant="distances")
    mech = plan.mechanism()
    want = epsilon_of_sum(mech, plan.noise_multiplier, [SumRelease(plan.sample_rate, 5, 3)],
                          plan.delta)
    for m in (6, 7, 8):
        rec = dataclasses.replace(plan.record(0, m), steps=5)
        assert rec.secure["reveal"] == "per_member"
        assert epsilon_of([rec], plan.delta) == pytest.approx(want, rel=1e-12)


def test_no_honest_contributor_is_infinite():
    plan = fixed_plan()
    for m in (0, 1, 2):
        assert epsilon_of([plan.record(0, m)], plan.delta) == math.inf


def test_the_charge_is_never_below_the_centralized_gaussian_one():
    """The centralized Gaussian limit: the sum's honest noise has std sigma_eff c in integer
    units (sigma_eff^2 = sigma^2 (m - t) / (n - t)), the record's sensitivity is at least
    c. Opacus' RDP accountant on the Gaussian at sigma_eff (all its orders, fractional ones
    included) is a lower bound the charge must never undercut, and at large noise the
    Skellam charge approaches it (its extra term and the rounding's inflation vanish)."""
    plan = fixed_plan()
    for sigma, q, steps, m in [(1.0, 0.01, 1000, 8), (4.0, 0.25, 40, 6), (10.0, 1.0, 10, 8),
                               (2.0, 0.05, 300, 3), (30.0, 0.5, 200, 7)]:
        p = dataclasses.replace(plan, noise_multiplier=sigma, sample_rate=q)
        rec = dataclasses.replace(p.record(0, m), steps=steps)
        eps = epsilon_of([rec], p.delta)
        sigma_eff = sigma * math.sqrt((m - 2) / 6)
        gauss = epsilon_of([LedgerRecord(0, "record", sigma_eff, q, steps, 1.0, "")], p.delta)
        assert eps >= gauss, (sigma, q, steps, m, eps, gauss)
        assert eps <= gauss * 1.25, (sigma, q, steps, m, eps, gauss)  # not absurdly loose
        # per_member: one share, sigma / sqrt(n - t): never below local DP-SGD at that sigma
        rec = dataclasses.replace(dataclasses.replace(p, variant="norm_only").record(0, m),
                                  steps=steps)
        local = epsilon_of([LedgerRecord(0, "record", sigma / math.sqrt(6), q, steps, 1.0, "")],
                           p.delta)
        per_member = epsilon_of([rec], p.delta)
        assert local <= per_member
        if sigma / math.sqrt(6) >= 1:  # at low noise Skellam's extra term dominates
            assert per_member <= local * 1.25, (sigma, q, steps, per_member, local)


def test_the_charge_is_monotone():
    """More contributors or more noise: less epsilon; more steps, a higher rate, a per-member
    reveal: more. (A charge that fell when it should rise would under-count.)"""
    plan = fixed_plan()

    def eps(**kw):
        m = kw.pop("m", 6)
        steps = kw.pop("steps", 10)
        p = dataclasses.replace(plan, **kw)
        return epsilon_of([dataclasses.replace(p.record(0, m), steps=steps)], p.delta)

    by_m = [eps(m=m) for m in range(3, 9)]
    assert all(a > b for a, b in zip(by_m, by_m[1:], strict=False))
    by_sigma = [eps(noise_multiplier=s) for s in (1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:], strict=False))
    by_steps = [eps(steps=s) for s in (1, 10, 100)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:], strict=False))
    by_q = [eps(sample_rate=q) for q in (0.01, 0.1, 0.5, 1.0)]
    assert all(a < b for a, b in zip(by_q, by_q[1:], strict=False))
    assert eps(variant="distances", m=8) > eps(m=8) > 0
    assert eps(variant="norm_only", m=8) == eps(variant="distances", m=8)


def test_a_ledger_mixing_secure_and_gaussian_charges_composes():
    """A count release then secure rounds: one RDP sum at the integer orders; never below
    either part alone, never above their epsilons added (basic composition)."""
    plan = fixed_plan()
    count = LedgerRecord(-1, "count", 10.0, 1.0, 1, 1.0, "")
    secure = [plan.record(r) for r in range(20)]
    both = epsilon_of([count, *secure], plan.delta)
    alone = epsilon_of(secure, plan.delta), epsilon_of([count], plan.delta)
    assert max(alone) < both <= sum(alone)
    # A ledger without secure records keeps its epsilon (Opacus' own orders).
    assert epsilon_of([count], plan.delta) == epsilon_of([count], plan.delta)


# --- the ledger --------------------------------------------------------------------------------

def test_a_secure_charge_is_written_read_back_and_counted(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, repair=True)
    ledger.charge(LedgerRecord(-1, "count", 10.0, 1.0, 1, 1.0, "weight:x"))
    plan = fixed_plan(epsilon=3.0)
    rec = charge_secure_round(ledger, plan, round_=0, digest="abc")
    lines = path.read_bytes().splitlines()
    assert b'"secure"' not in lines[0]  # other kinds: the line as it always was
    doc = json.loads(lines[1])
    assert doc["mode"] == "secure" and doc["secure"]["contributors"] == 6
    assert doc["secure"]["reveal"] == "sum" and doc["secure"]["dim"] == 4810
    again = Ledger(path)
    assert again.records == ledger.records and not again.recovered
    assert again.epsilon(1e-5) == pytest.approx(rec.secure["epsilon_after"], rel=1e-12)
    assert again.epsilon(1e-5) > epsilon_of(again.records[1:], 1e-5) > 0  # both counted


@pytest.mark.parametrize("edit", [
    lambda d: d["secure"].update(coalition=8),  # t >= n
    lambda d: d["secure"].update(contributors=9),
    lambda d: d["secure"].update(reveal="nothing"),
    lambda d: d["secure"].update(granularity=10.0),  # coarser than the clip
    lambda d: d["secure"].update(members=True),
    lambda d: d["secure"].update(dim=0),
    lambda d: d["secure"].update(beta=1.0),
    lambda d: d["secure"].pop("dim"),
    lambda d: d["secure"].update(extra=1),
    lambda d: d.update(secure=None),  # a secure charge without its parameters
    lambda d: d.update(mode="record"),  # secure parameters on another kind
])
def test_an_edited_secure_charge_is_refused_not_skipped(tmp_path, edit):
    """A whole secure line that is not a charge flnode wrote: the ledger refuses to load
    (skipping it would under-count)."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    plan = fixed_plan()
    ledger.charge(plan.record(0))
    ledger.charge(plan.record(1))
    lines = path.read_text().splitlines()
    doc = json.loads(lines[0])
    edit(doc)
    path.write_text(json.dumps(doc, sort_keys=True) + "\n" + lines[1] + "\n")
    with pytest.raises(LocalError, match="line 1 is corrupt"):
        Ledger(path)


def test_a_torn_secure_charge_is_dropped_and_a_glued_one_recovered(tmp_path):
    """The ledger's crash handling covers the new kind: a torn last line (never fsync'd,
    never released) is dropped; a torn record with a whole secure one glued on keeps it."""
    path = tmp_path / "ledger.jsonl"
    plan = fixed_plan()
    ledger = Ledger(path)
    ledger.charge(plan.record(0))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:57])
    assert Ledger(path, repair=True).records == [plan.record(0)]
    assert path.read_bytes() == whole
    path.write_bytes(whole[:40] + whole)  # an older flnode's glued tail
    got = Ledger(path, repair=True)
    assert got.records == [plan.record(0)] and got.recovered


# --- may a round open; the charge ------------------------------------------------------------

def test_may_open_round_names_its_reason():
    assert may_open_round(6, members=8, coalition=2, floor=6).ok
    assert may_open_round(3, members=8, coalition=2).ok
    for m, reason in [(2, "no_honest_noise"), (0, "no_honest_noise"), (9, "bad_count"),
                      (-1, "bad_count"), (True, "bad_count"), (2.5, "bad_count")]:
        got = may_open_round(m, members=8, coalition=2)
        assert (got.ok, got.reason) == (False, reason), m
    got = may_open_round(5, members=8, coalition=2, floor=6)
    assert (got.ok, got.reason) == (False, "below_charged_floor")
    assert "under-count" in got.detail


def test_a_charge_over_the_budget_or_below_the_floor_writes_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    plan = fixed_plan(epsilon=0.5)
    charged = 0
    with pytest.raises(SecureRoundRefused) as refused:
        for r in range(100):
            charge_secure_round(ledger, plan, round_=r)
            charged += 1
    assert refused.value.reason == "budget_exhausted" and 0 < charged < 100
    assert len(Ledger(path).records) == charged
    assert Ledger(path).epsilon(plan.delta) <= 0.5
    for m, reason in [(5, "below_charged_floor"), (2, "no_honest_noise")]:
        with pytest.raises(SecureRoundRefused) as refused:
            charge_secure_round(ledger, fixed_plan(), round_=0, contributors=m)
        assert refused.value.reason == reason
    assert len(Ledger(path).records) == charged


# --- the plan -------------------------------------------------------------------------------

def test_the_digits_plan_stays_within_budget_and_is_the_same_at_every_member():
    plan = secure_plan(**DIGITS)
    eps = plan.epsilon_after(plan.steps)
    assert eps <= 3.0 and eps > 3.0 / 1.01  # calibrated, not wasted
    # sigma to 0.1 %: 0.2 % less noise would overspend
    tighter = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 1.002)
    assert tighter.epsilon_after(plan.steps) > 3.0
    assert plan.noise_ratio <= 0.01 or plan.sample_rate == 1.0
    assert plan.min_contributors == 6 and plan.variant == "sum_only"
    assert secure_plan(**DIGITS) == plan  # every member computes the same plan
    assert secure_plan(**DIGITS).digest() == plan.digest()
    assert secure_plan(**{**DIGITS, "rows_total": 1438}).digest() != plan.digest()
    # The rounds it needs: the charges the runtime writes give the same epsilon.
    assert epsilon_of([plan.record(r) for r in range(plan.steps)], plan.delta) == \
        pytest.approx(eps, rel=1e-9)


def test_a_per_member_reveal_costs_more_noise_for_the_same_budget():
    """At the same rate and rounds, the distances variant's sigma must cover one member's
    noise share, the sum's charge at the floor m = 6 counts m - t = 4 of them: the same
    Skellam mechanism at a quarter of the variance, so exactly twice the sigma."""
    template = fixed_plan(epsilon=3.0, steps=30)
    s_sum = calibrate_secure_sigma(template, 3.0, 30)
    s_dist = calibrate_secure_sigma(dataclasses.replace(template, variant="distances"), 3.0, 30)
    assert s_dist == pytest.approx(2 * s_sum, rel=2e-3)
    plan = secure_plan(**DIGITS, variant="distances")
    assert plan.epsilon_after(plan.steps) <= 3.0


def test_pinned_rounds_and_save_load(tmp_path):
    plan = secure_plan(**DIGITS, rounds=50)
    assert plan.steps == 50 and plan.epsilon_after(50) <= 3.0
    plan.save(tmp_path / "p.json")
    assert SecurePlan.load(tmp_path / "p.json") == plan
    assert SecurePlan.load(tmp_path / "missing.json") is None
    good = json.loads((tmp_path / "p.json").read_text())
    for key, value, match in [("coalition", 8, "refusing to start"),
                              ("sample_rate", 1.5, "refusing to start"),
                              ("noise_multiplier", -1.0, "refusing to start"),
                              ("steps", 2.5, "refusing to start"),
                              ("min_contributors", 2, "refusing to start"),
                              ("variant", "plain", "refusing to start"),
                              ("extra", 1, "refusing to start"),
                              ("noise_multiplier", plan.noise_multiplier / 2, "was edited")]:
        (tmp_path / "p.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(LocalError, match=match):
            SecurePlan.load(tmp_path / "p.json")


@pytest.mark.parametrize("over, match", [
    (dict(delta=1e-3), "delta"),
    (dict(min_contributors=2), "min_contributors"),
    (dict(variant="plain"), "variant"),
    (dict(rows_total=0), "rows_total"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(rounds=0), "rounds"),
])
def test_secure_plan_refuses_bad_inputs_by_name(over, match):
    with pytest.raises(LocalError, match=match):
        secure_plan(**{**DIGITS, **over})


def test_the_noise_each_member_adds_is_the_plans():
    """SecurePlan.mechanism sizes a member's Skellam share so the n - t outside a coalition
    carry sigma C: variance 2 mu = (sigma c)^2 / (n - t)."""
    plan = fixed_plan()
    mech = plan.mechanism()
    assert isinstance(mech, SumMechanism)
    c = plan.clip_norm / plan.granularity
    assert 2 * mech.member_mu(plan.noise_multiplier) == pytest.approx(
        (plan.noise_multiplier * c) ** 2 / 6)
    assert secure_record.noise_variance(plan.record(0, 8).secure, plan.noise_multiplier,
                                        plan.clip_norm) == pytest.approx(
        6 * 2 * mech.member_mu(plan.noise_multiplier))
    assert np.isfinite(epsilon_of([plan.record(0, 8)], plan.delta))


# --- flnode status / report read the charges ----------------------------------------------

def test_status_and_report_show_secure_charges_from_the_ledger(tmp_path):
    """A node's state dir (the golden run's) with secure charges appended: `flnode status`
    counts them in epsilon spent (the accountant over the whole ledger) and says what they
    charged; with no privacy_plan.json (a secure-only node) its epsilon still comes from
    the ledger."""
    import shutil
    from pathlib import Path

    from node.ops.report_member import load_member
    from node.ops.status import collect, render

    state = tmp_path / "telco-0"
    shutil.copytree(Path(__file__).parent / "golden" / "run" / "state" / "telco-0", state)
    before = collect(state)["privacy"]["epsilon_spent"]
    ledger = Ledger(state / "ledger.jsonl")
    plan = fixed_plan()
    for r in range(3):
        charge_secure_round(ledger, plan, round_=2 + r)
    s = collect(state)
    p = s["privacy"]
    assert p["epsilon_spent"] == pytest.approx(ledger.epsilon(p["delta"])) and \
        p["epsilon_spent"] > before
    assert p["secure"]["rounds_charged"] == 3 and p["secure"]["reveal"] == "sum"
    assert "3 secure round(s) charged" in render(s)
    (state / "privacy_plan.json").unlink()
    s = collect(state)
    assert s["privacy"]["mode"] == "secure"
    assert s["privacy"]["epsilon_spent"] == pytest.approx(ledger.epsilon(1e-5))
    assert "DP on the secure sum, ε spent" in render(s)  # not "secure-level"
    run, st = load_member(state)  # `flnode report` of this member
    assert run.summary.doc["epsilon"]["per_node"]["telco-0"] == pytest.approx(
        ledger.epsilon(1e-5))


# --- golden: the record kind's bytes (tests/golden/make_golden.py --only secure) -------------

def test_golden_secure_ledger_reads_back_and_today_writes_the_same_bytes(tmp_path):
    """The "secure" record kind is a contract: deployed ledgers hold these lines. Reading the
    golden ledger gives its records and epsilon; writing the same charges today gives the
    same bytes (a changed key, order or number is a changed contract)."""
    from pathlib import Path

    from tests.golden.make_golden import secure_ledger

    golden = Path(__file__).parent / "golden"
    want = json.loads((golden / "secure_ledger.json").read_text())
    ledger = Ledger(golden / "secure_ledger.jsonl")
    assert [r.mode for r in ledger.records] == want["modes"] and not ledger.recovered
    assert ledger.epsilon(want["delta"]) == pytest.approx(want["epsilon"], rel=1e-9)
    assert ledger.records[1].secure["reveal"] == "sum"
    assert ledger.records[2].secure["reveal"] == "per_member"
    got = secure_ledger(tmp_path / "ledger.jsonl")
    assert (tmp_path / "ledger.jsonl").read_bytes() == (golden / "secure_ledger.jsonl").read_bytes()
    assert got["epsilon"] == pytest.approx(want["epsilon"], rel=1e-9)


# --- the wiring's rules (issue 22: DP on the secure sum in the node) -----------------------

def test_a_charge_survives_a_sigkill_right_after_it_returns(tmp_path):
    """A real process charges a secure round (what the node does before dealing) and is
    SIGKILLed as soon as charge_secure_round returns, before anything else: the record is on
    disk and the accountant counts it (a crash between charge and deal over-counts, never
    under-counts)."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from node.privacy.ledger import Ledger\n"
        "from node.privacy.secure import charge_secure_round, secure_plan\n"
        f"plan = secure_plan(**{DIGITS!r})\n"
        "charge_secure_round(Ledger(sys.argv[1]), plan, round_=0, digest=plan.digest())\n"
        "print('charged', flush=True)\n"
        "sys.stdin.read()\n")  # holds until killed: the deal would come next
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    path = tmp_path / "ledger.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"charged\n"  # waits for the event, no sleep
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    records = Ledger(path).records
    plan = secure_plan(**DIGITS)
    assert len(records) == 1 and records[0].mode == secure_record.MODE
    assert records[0].share_digest == plan.digest()
    assert epsilon_of(records, 1e-5) == pytest.approx(plan.epsilon_after(1))


def _rules(**over):
    from node.strategy.consortium_rules import check_secure, validate_rules

    table = {"aggregation": "mean", "secure": True, "secure_threshold": 2, **over}
    return check_secure(validate_rules(table, "test"), 8, "test")


def test_dp_on_the_sum_rules_are_all_or_none_and_sum_only():
    """The plan's inputs are pinned in the [rules] together (a member missing one could not
    plan the others' noise), and with them the selection must be "range" or "sum" (the
    variants charged at the sum's noise); without them the rules are as before."""
    dp = {"secure_rows": 1437, "secure_epsilon": 3.0, "secure_delta": 1e-5}
    assert _rules(secure_select="sum", **dp).variant == "sum_only"
    assert _rules().variant == "distances"  # no DP keys: the default selection as before
    with pytest.raises(LocalError, match="rules.secure_delta is missing"):
        _rules(secure_select="sum", secure_rows=1437, secure_epsilon=3.0)
    for select in ("multi-krum", "norm"):
        with pytest.raises(LocalError, match="use secure_select = \"range\" or \"sum\""):
            _rules(secure_select=select, **dp)
    with pytest.raises(LocalError, match="rules.secure_rows is set but rules.secure is not"):
        from node.strategy.consortium_rules import check_secure, validate_rules
        check_secure(validate_rules({"aggregation": "mean", "secure_rows": 10}, "t"), 8, "t")
    from node.strategy.consortium_rules import rules_table
    # new DP builds default to the one-bit range check; "sum" stays available, and "range"
    # without the DP keys is refused (its bound is the plan's)
    assert rules_table(8, secure=True, secure_dp=dp)["secure_select"] == "range"
    assert _rules(secure_select="range", **dp).variant == "range"
    with pytest.raises(LocalError, match="range.*needs secure_rows"):
        _rules(secure_select="range")
    assert "secure_rows" not in rules_table(8, secure=True)


# --- hand-edited files: a named refusal, never a traceback (review 2 F5, F13) ----------------

DEEP = b"[" * 200_000 + b"]" * 200_000  # json.loads raises RecursionError, not ValueError


def _ledger_with_first_line(tmp_path, edit):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    plan = fixed_plan()
    ledger.charge(plan.record(0))
    ledger.charge(plan.record(1))
    lines = path.read_bytes().splitlines()
    lines[0] = edit(json.loads(lines[0]))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _dump(edit):
    def run(doc):
        edit(doc)
        return json.dumps(doc, sort_keys=True).encode()
    return run


@pytest.mark.parametrize("edit, field", [
    (_dump(lambda d: d.update(mode={})), "mode {}"),
    (_dump(lambda d: d.update(mode=["secure"])), "mode ['secure']"),
    (_dump(lambda d: d.update(clip_norm=10 ** 400)), "clip_norm 1000"),
    (_dump(lambda d: d.update(noise_multiplier=-10 ** 400)), "noise_multiplier -1000"),
    (_dump(lambda d: d.update(sample_rate=10 ** 400)), "sample_rate 1000"),
    (_dump(lambda d: d["secure"].update(epsilon_after=10 ** 400)), "epsilon_after 1000"),
    (_dump(lambda d: d["secure"].update(granularity=10 ** 400)), "granularity 1000"),
    (_dump(lambda d: d.update(steps=10 ** 400)), "steps 1000"),
    (_dump(lambda d: d.update(extra=1)), "not an object with the ledger's fields"),
    (lambda d: DEEP, "nested deeper than the parser"),
])
def test_a_hand_edited_ledger_line_is_refused_naming_line_and_field(tmp_path, edit, field):
    """Each escaped Ledger() as a TypeError, OverflowError or RecursionError: the report,
    `flnode status` and the node's own start ended in a traceback. Now the ledger refuses
    to load (skipping would under-count) with the file, the line and what is wrong."""
    path = _ledger_with_first_line(tmp_path, edit)
    with pytest.raises(LocalError, match="line 1 is corrupt") as exc:
        Ledger(path)
    assert str(path) in str(exc.value) and field in str(exc.value), exc.value


def test_an_edited_last_charge_is_refused_not_dropped_as_torn(tmp_path):
    """A torn write never parses (a cut object is not JSON); a whole last line that is not a
    charge is an edit: dropping it (and cutting it off, with repair) would under-count."""
    path = tmp_path / "ledger.jsonl"
    plan = fixed_plan()
    Ledger(path).charge(plan.record(0))
    doc = dict(plan.record(1).__dict__, clip_norm=10 ** 400)
    whole = path.read_bytes()
    path.write_bytes(whole + json.dumps(doc, sort_keys=True).encode())  # no newline after it
    with pytest.raises(LocalError, match="line 2 is corrupt .*clip_norm"):
        Ledger(path, repair=True)
    assert path.read_bytes().startswith(whole) and len(path.read_bytes()) > len(whole)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10 ** 400, -10 ** 400, 2 ** 63])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)
LEDGER_PATHS = [("round",), ("mode",), ("noise_multiplier",), ("sample_rate",), ("steps",),
                ("clip_norm",), ("share_digest",), ("secure",)] + [
    ("secure", k) for k in sorted(secure_record.SECURE_KEYS)]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(LEDGER_PATHS), value=JSON_VALUES)
def test_any_json_value_in_any_ledger_field_loads_or_is_a_named_refusal(tmp_path, where, value):
    path = tmp_path / "ledger.jsonl"
    doc = json.loads(json.dumps(dataclasses.asdict(fixed_plan().record(0))))
    target = doc
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = value
    path.write_bytes(json.dumps(doc).encode() + b"\n")
    try:
        records = Ledger(path).records
    except LocalError as exc:
        assert "line 1 is corrupt" in str(exc)
    else:  # what loads is a charge the accountant takes
        epsilon_of(records, 1e-5)


PLAN_FIELDS = sorted(f.name for f in dataclasses.fields(SecurePlan))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(PLAN_FIELDS), value=JSON_VALUES)
def test_any_json_value_in_any_plan_field_loads_or_is_a_named_refusal(tmp_path, key, value):
    """SecurePlan.load is the node's start (plan_for) and the report's reader: a huge
    integer escaped it as an OverflowError (skellam's isfinite)."""
    path = tmp_path / "secure_plan.json"
    fixed_plan().save(path)
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    try:
        SecurePlan.load(path)
    except LocalError as exc:
        assert f"secure privacy plan {path}" in str(exc)


@pytest.mark.parametrize("key, value, says", [
    ("clip_norm", 10 ** 400, "clip norm must be a finite number"),
    ("noise_multiplier", 10 ** 400, "noise_multiplier 1000"),
    ("epsilon", 10 ** 400, "epsilon 1000"),
    ("delta", -10 ** 400, "delta -1000"),
    ("steps", 10 ** 400, "out of range"),
], ids=["clip_norm", "noise_multiplier", "epsilon", "delta", "steps"])
def test_a_plan_with_a_huge_integer_is_refused_by_name(tmp_path, key, value, says):
    path = tmp_path / "secure_plan.json"
    fixed_plan().save(path)
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(LocalError, match="is unreadable") as exc:
        SecurePlan.load(path)
    assert says in str(exc.value)
    path.write_bytes(DEEP)
    with pytest.raises(LocalError, match="nested deeper"):
        SecurePlan.load(path)

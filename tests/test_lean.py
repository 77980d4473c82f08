"""A lean node: what `flnode run` and `flnode status` import, the metrics that replaced
scikit-learn's, the accountant that no longer imports Opacus' torch side, the status
wording and the held-out warnings. Timings are not asserted (the machine is shared):
what is asserted is what a command imports, which decides its time."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "sklearn", "opacus", "matplotlib", "libp2p", "ray")


def imported_by(*args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m node.cli ARGS`; the process and every module it imported."""
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "node.cli", *args],
                       capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    mods = {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$",
                                            r.stderr, re.M)}
    assert "gossip.errors" in mods, r.stderr[-2000:]  # the parse found the import lines
    return r, mods


def heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


# --- ROC-AUC and PR-AUC without scikit-learn (scikit-learn is the oracle) ----------------

def test_auc_matches_sklearn_on_random_and_tied_scores():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from node.learn.auc import average_precision, roc_auc

    rng = np.random.default_rng(12)
    checked = 0
    for i in range(600):
        n = int(rng.integers(2, 400))
        y = (rng.random(n) < rng.uniform(0.02, 0.98)).astype(np.int64)
        if y.min() == y.max():
            continue
        score = rng.random(n)
        if i % 3:  # ties: few distinct values, as a saturated or coarse model gives
            score = np.round(score, int(rng.integers(0, 2)))
        if i % 5 == 0:
            score = score.astype(np.float32)
        assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        assert average_precision(y, score) == pytest.approx(
            average_precision_score(y, score), abs=1e-12)
        checked += 1
    assert checked > 500
    y = np.array([0, 1, 0, 1])
    assert roc_auc(y, np.full(4, 0.5)) == 0.5 == roc_auc_score(y, np.full(4, 0.5))
    assert roc_auc(y, np.array([0.1, 0.9, 0.2, 0.8])) == 1.0


def test_auc_refuses_one_class_and_bad_labels():
    from node.learn.auc import average_precision, roc_auc

    for fn in (roc_auc, average_precision):
        with pytest.raises(ValueError, match="one class"):
            fn(np.zeros(5, dtype=np.int64), np.linspace(0, 1, 5))
        with pytest.raises(ValueError, match="0 or 1"):
            fn(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]))
        with pytest.raises(ValueError, match="finite"):
            fn(np.array([0, 1]), np.array([0.1, np.nan]))


def test_evaluate_reports_auc_without_sklearn_in_the_process():
    code = ("import sys, numpy as np, torch; torch.manual_seed(0)\n"
            "from node.learn.train import evaluate\n"
            "m = torch.nn.Linear(3, 2); X = np.random.default_rng(0).random((50, 3), np.float32)\n"
            "y = (X[:, 0] > 0.5).astype(np.int64); out = evaluate(m, X, y)\n"
            "assert 0 <= out['roc_auc'] <= 1 and 0 <= out['pr_auc'] <= 1, out\n"
            "from node.learn.train import warn_about_held_out\n"
            "warn_about_held_out('b', y, ['No', 'Yes'], eval_path=None, eval_fraction=0.2,"
            " total_rows=250)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('sklearn', 'scipy')"
            " or k.split('.')[:2] == ['numpy', 'ma']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --- the accountant without Opacus' torch side ----------------------------------------------

def test_epsilon_equals_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    from node.privacy.accountant import RDP_ORDERS, LedgerRecord, epsilon_of

    assert RDP_ORDERS == RDPAccountant.DEFAULT_ALPHAS
    rng = np.random.default_rng(3)
    # Composed histories (2-5 records of mixed σ and q): the single-record cases are
    # test_epsilon_equals_opacus_accountant_on_a_grid's, over 81 points; 6 histories here
    # (20 cost 5 s more and proved nothing the grid and these do not)
    for _ in range(6):
        records, history = [], []
        for r in range(int(rng.integers(2, 6))):
            sigma, q, steps = float(rng.uniform(0.5, 4)), float(rng.choice([1.0, 0.01, 0.3])), \
                int(rng.integers(1, 200))
            records.append(LedgerRecord(r, "record", sigma, q, steps, 1.0, ""))
            history.append((sigma, q, steps))
        acc = RDPAccountant()
        acc.history = history
        delta = float(rng.choice([1e-5, 1e-6]))
        assert epsilon_of(records, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)


def test_ledger_epsilon_does_not_import_torch_nor_scipy():
    """Update mode (q = 1) and record mode (q < 1: the fractional orders, which call
    binom and log_ndtr): neither torch, Opacus' package nor scipy is imported."""
    code = ("import sys\nfrom node.privacy.accountant import LedgerRecord, epsilon_of\n"
            "e = epsilon_of([LedgerRecord(r, 'update', 1.0, 1.0, 1, 0.1, '') for r in range(30)],"
            " 1e-5)\nassert 39 < e < 41, e\n"
            "e = epsilon_of([LedgerRecord(r, 'record', 1.1, 0.007, 140, 1.0, '')"
            " for r in range(30)], 1e-5)\nassert 2 < e < 3, e\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('torch', 'opacus', 'scipy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def binom_errors(binom, n: float, kmax: int) -> list[float | None]:
    """Relative error of binom(n, k) against exact rational arithmetic (n as the float it
    is), k = 0..kmax; None where C(n, k) is 0 (and binom said 0). Integers only, no
    gcd: C(n, k) = prod_{j<k} (m - j d) / (d^k k!) for n = m / d."""
    m, d = float(n).as_integer_ratio()
    num, den, out = 1, 1, []
    for k in range(kmax + 1):
        got = binom(int(n), k) if float(n).is_integer() else binom(float(n), k)
        if num == 0:
            assert got == 0.0, (n, k, got)
            out.append(None)
        else:
            a, b = float(got).as_integer_ratio()
            out.append(((abs(a * den - num * b) << 100) // (abs(num) * b)) / 2.0**100)
        num *= m - k * d
        den *= d * (k + 1)
    return out


def test_binom_is_exact_to_rounding_and_matches_scipy():
    """node.privacy.special.binom on the orders Opacus' accountant uses (RDP_ORDERS: fractional
    ones reach binom with float alpha, integer ones with int alpha), a dense grid of
    orders and orders within 1e-7 of an integer: against exact rationals for k = 0..300
    (and to k = 3000 for a few orders: Opacus' loop for a fractional order ran to
    k = 1172 at sigma 0.3, q 0.03), and against scipy.special.binom on RDP_ORDERS.
    scipy is itself off by up to ~7e-13 there from k = 20 (its beta-function branch;
    up to 1e-6 near an integer order), so it is the looser oracle."""
    from scipy import special as sp

    from node.privacy.accountant import RDP_ORDERS
    from node.privacy.special import binom

    dense = np.round(np.linspace(1.01, 64.0, 300), 6).tolist() + [2.001259, 1.5, 63.5]
    near_int = [k + d for k in (1, 2, 3, 10, 63) for d in (1e-7, -1e-7, 1e-3)]
    worst_exact = worst_scipy = 0.0
    for n in RDP_ORDERS + dense + near_int:
        long = n in (1.1, 1.5, 2.001259, 10.9, 63.5, 3.0000001)
        errors = [e for e in binom_errors(binom, n, 3000 if long else 300) if e is not None]
        worst_exact = max(worst_exact, *errors)
    for n in RDP_ORDERS:
        for k in range(301):
            ref = float(sp.binom(n, k))
            if ref != 0:
                worst_scipy = max(worst_scipy, abs(binom(n, k) - ref) / abs(ref))
    assert worst_exact <= 2e-13, worst_exact
    assert worst_scipy <= 1e-12, worst_scipy
    # Each product continues the last one for its n (a cache): the same bits whatever
    # was asked before, in any order.
    import node.privacy.special

    for n in (1.1, 2.001259, 10.9, 40):
        node.privacy.special._PREFIX.clear()
        up = [binom(n, k) for k in range(1200)]
        down = [binom(n, k) for k in reversed(range(1200))][::-1]
        fresh = []
        for k in range(0, 1200, 37):
            node.privacy.special._PREFIX.clear()
            fresh.append(binom(n, k))
        assert up == down and up[::37] == fresh, n
    assert binom(5, 7) == 0.0 and binom(63, 63) == 1.0 and binom(10, 3) == 120.0
    assert math.isnan(binom(-3, 2)) and math.isnan(sp.binom(-3, 2))
    for bad in ((2.5, -1), (2.5, 1.5), (2.5, True), (math.inf, 2), ("2", 1)):
        with pytest.raises(ValueError, match="binom"):
            binom(*bad)


def test_log_ndtr_matches_scipy_down_to_minus_1e5():
    """log Phi(x) on a dense grid from -1e5 to 37 (where scipy's value is still a normal
    float), the log1p branch, the erfc branch and the asymptotic series: relative error
    against scipy.special.log_ndtr <= 1e-12 (measured: ~4e-13, at x ~ 37 where Phi's
    complement nears underflow; ~3e-15 for x <= 8)."""
    from scipy import special as sp

    from node.privacy.special import log_ndtr

    xs = np.concatenate([-np.logspace(-10, 5, 40000), np.logspace(-10, math.log10(37.0), 20000),
                         np.linspace(-60.0, 37.0, 40001), [-20.0, -19.999, -20.001, -1.0,
                                                           -0.999, -1.001, 0.0]])
    worst = 0.0
    for x in xs.tolist():
        ref, got = float(sp.log_ndtr(x)), log_ndtr(x)
        assert got <= 0.0
        worst = max(worst, abs(got - ref) / abs(ref))
    assert worst <= 1e-12, worst
    assert log_ndtr(math.inf) == 0.0 and log_ndtr(-math.inf) == -math.inf
    assert math.isnan(log_ndtr(math.nan))
    assert log_ndtr(0.0) == math.log(0.5)
    with pytest.raises(ValueError, match="log_ndtr"):
        log_ndtr("1")


def test_epsilon_equals_opacus_accountant_on_a_grid():
    """epsilon_of (Opacus' rdp.py run with node.privacy.special) against Opacus' own RDPAccountant
    (scipy) over noise multipliers, sample rates and step counts, to 1e-10 relative."""
    from opacus.accountants import RDPAccountant

    from node.privacy.accountant import LedgerRecord, epsilon_of

    checked = 0
    for a, sigma in enumerate((0.3, 0.5, 0.8, 1.0, 1.3, 2.0, 4.0, 10.0, 50.0)):
        for b, q in enumerate((1e-4, 0.001, 0.007, 0.03, 0.1, 0.25, 0.5, 0.9, 1.0)):
            steps = (1, 10, 300, 5000)[(a + b) % 4]
            delta = (1e-5, 1e-8)[(a + 2 * b) % 2]
            acc = RDPAccountant()
            acc.history = [(sigma, q, steps)]
            ref = acc.get_epsilon(delta)
            got = epsilon_of([LedgerRecord(0, "record", sigma, q, steps, 1.0, "")], delta)
            assert got == pytest.approx(ref, rel=1e-10), (sigma, q, steps, delta)
            checked += 1
    assert checked == 81


def test_an_rdp_file_without_the_scipy_line_is_loaded_as_it_is(tmp_path, caplog):
    """Another opacus' rdp.py (its scipy import spelled otherwise): loaded with scipy, and
    logged; the same epsilon."""
    import opacus

    from node.privacy.accountant import _load_rdp

    src = (Path(opacus.__file__).parent / "accountants" / "analysis" / "rdp.py").read_text()
    assert src.count("\nfrom scipy import special\n") == 1
    other = tmp_path / "rdp.py"
    other.write_text(src.replace("\nfrom scipy import special\n", "\nimport scipy.special as special\n"))
    with caplog.at_level(logging.INFO, logger="flnode.privacy"):
        plain = _load_rdp(other)
    assert "loaded as it is, with scipy" in caplog.text
    assert plain.special.__name__ == "scipy.special"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flnode.privacy"):
        ours = _load_rdp(Path(opacus.__file__).parent / "accountants" / "analysis" / "rdp.py")
    assert ours.special.__name__ == "node.privacy.special" and caplog.text == ""
    orders = [1.5, 2.0, 3.25, 8.0, 32.0]
    for m in (plain, ours):
        rdp = m.compute_rdp(q=0.01, noise_multiplier=1.1, steps=1000, orders=orders)
        eps, _ = m.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        assert 0 < eps < 10
    a = plain.compute_rdp(q=0.01, noise_multiplier=1.1, steps=1000, orders=orders)
    b = ours.compute_rdp(q=0.01, noise_multiplier=1.1, steps=1000, orders=orders)
    assert np.allclose(a, b, rtol=1e-11, atol=0)


def test_cli_default_rule_is_the_rules_default():
    from node.cli import build_parser
    from node.strategy.consortium_rules import DEFAULT_RULE

    args = build_parser().parse_args(["simulate", "--out", "x"])
    assert args.flag_defaults["aggregation"] == DEFAULT_RULE  # untyped: absent from args


# --- status wording ---------------------------------------------------------------------------

def test_status_round_line_counts_from_one():
    from node.ops.status import round_line

    assert round_line({"rounds_done": 30, "planned_rounds": 30, "next_round": 30}) == \
        "30 of 30 rounds completed (finished)"
    assert round_line({"rounds_done": 12, "planned_rounds": 30, "next_round": 12}) == \
        "12 of 30 rounds completed; in round 13"
    line = round_line({"rounds_done": 28, "planned_rounds": 30, "next_round": 30})
    assert line.startswith("28 of 30 rounds completed (finished; 2 closed without a result")
    line = round_line({"rounds_done": 30, "planned_rounds": None, "next_round": 30})
    assert line.startswith("30 rounds completed (") and "--config" in line
    assert "31" not in line


# --- the held-out warnings ------------------------------------------------------------------

def test_one_class_held_out_rows_are_warned_about(caplog):
    from node.learn.train import warn_about_held_out

    with caplog.at_level(logging.WARNING, logger="flnode.train"):
        warn_about_held_out("bank-7", np.zeros(40, dtype=np.int64), ["No", "Yes"],
                            eval_path=None, eval_fraction=0.2, total_rows=200)
    text = caplog.text
    assert "no data.eval_path: 40 of its 200 rows (data.eval_fraction 0.2) are held out" in text
    assert "all have label 'No'" in text and "ROC-AUC and PR-AUC are undefined" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flnode.train"):
        warn_about_held_out("bank-7", np.array([0, 1, 1]), ["No", "Yes"],
                            eval_path=Path("eval.csv"), eval_fraction=0.2, total_rows=200)
    assert caplog.text == ""  # both classes, its own eval file: nothing to say


# --- real `flnode run` processes ------------------------------------------------------------

@pytest.fixture(scope="module")
def consortium_dir(tmp_path_factory):
    """Two members on `default` over libp2p on 127.0.0.1, prepared by the simulator."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from ports import free_ports

    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec

    out = tmp_path_factory.mktemp("lean")
    a, b = free_ports(2)
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=2, seed=0, out=out,
                          transport="libp2p", round_deadline_s=60.0, privacy="update", clip=0.1,
                          sigma=1.0)
    prep = prepare(spec, {"bank-0": {"libp2p": f"/ip4/127.0.0.1/tcp/{a}"},
                          "bank-1": {"libp2p": f"/ip4/127.0.0.1/tcp/{b}"}})
    return out, prep.config_paths


def edited(config: Path, name: str, change) -> Path:
    doc = tomllib.loads(config.read_text())
    change(doc)
    path = config.with_name(name)
    path.write_text(tomli_w.dumps(doc))
    return path


def test_config_errors_come_before_torch_is_imported(tmp_path, consortium_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text('state_dir = "s"\nno_such_key = 1\n')
    r, mods = imported_by("run", "--config", str(bad))
    assert r.returncode == 2 and "no_such_key: unknown key" in r.stderr
    assert heavy(mods) == []

    _, configs = consortium_dir
    # A valid config whose data file is missing, and one whose key is another bank-0's.
    missing = edited(configs[0], "missing-data.toml",
                     lambda d: d["data"].update(path="../data/nowhere.parquet"))
    r, mods = imported_by("run", "--config", str(missing))
    assert r.returncode == 2 and "nowhere.parquet" in r.stderr, r.stderr[-500:]
    assert heavy(mods) == []
    from node.runtime.identity import Identity, save_identity

    impostor, _ = save_identity(Identity.generate("bank-0"), tmp_path / "keys")
    wrong_key = edited(configs[0], "wrong-key.toml",
                       lambda d: d["identity"].update(key=str(impostor)))
    r, mods = imported_by("run", "--config", str(wrong_key))
    assert r.returncode == 2 and "lists another public key" in r.stderr, r.stderr[-500:]
    assert heavy(mods) == []


@pytest.mark.slow
def test_two_real_nodes_then_status(consortium_dir):
    """bank-0 has no data.eval_path: it says so at start. Both finish and exit 0; then
    `flnode status` says "2 of 2 rounds" without importing torch."""
    out, configs = consortium_dir
    own_rows = edited(configs[0], "bank-0.toml", lambda d: d["data"].pop("eval_path"))
    procs = [subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--config", str(c)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=ROOT, start_new_session=True)
             for c in (own_rows, configs[1])]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], logs
    import pandas as pd

    rows = len(pd.read_parquet(out / "data" / "bank-0.parquet"))
    held = rows - int(rows * 0.8)
    assert (f"bank-0: no data.eval_path: {held} of its {rows} rows (data.eval_fraction 0.2) "
            "are held out of training") in logs[0]
    assert "no data.eval_path" not in logs[1]
    assert "finished at round 2/2" in logs[0] and "finished at round 2/2" in logs[1]

    r, mods = imported_by("status", "--state-dir", str(out / "state" / "bank-1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "round       2 of 2 rounds completed (finished)" in r.stdout
    assert "next 3" not in r.stdout
    assert heavy(mods) == []
    # A reader that goes away (`flnode status | head`): no traceback, exit 1
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        gone = subprocess.run([sys.executable, "-m", "node.cli", "status", "--state-dir",
                               str(out / "state" / "bank-1")], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60)
    finally:
        os.close(write_end)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr[-2000:]


def test_train_local_is_torch_sgd_bit_for_bit():
    """train_local steps by hand (torch.optim imports torch._dynamo): same parameters as
    torch.optim.SGD, exactly, and no torch._dynamo in the process."""
    code = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from node.learn.models import build_model
from node.learn.train import train_local

def model():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

rng = np.random.default_rng(1)
X = rng.normal(size=(301, 6)).astype(np.float32); y = rng.integers(0, 3, 301).astype(np.int64)
mine = train_local(model(), X, y, epochs=2, batch_size=32, lr=0.05,
                   generator=torch.Generator().manual_seed(9))
assert 'torch._dynamo' not in sys.modules
ref = model(); opt = torch.optim.SGD(ref.parameters(), lr=0.05); g = torch.Generator().manual_seed(9)
Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
for _ in range(2):
    order = torch.randperm(len(Xt), generator=g)
    for s in range(0, len(order), 32):
        i = order[s:s + 32]; opt.zero_grad(set_to_none=True)
        torch.nn.CrossEntropyLoss()(ref(Xt[i]), yt[i]).backward(); opt.step()
for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
    assert torch.equal(a, b), (a - b).abs().max()
assert not torch.equal(mine[0].weight, model()[0].weight)  # it did train
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# --- the node reads its files without pandas ------------------------------------------------

@pytest.mark.parametrize("dataset", ["default", "churn", "digits"])
def test_read_table_encodes_the_builtin_tables_as_pandas_does(tmp_path, dataset):
    """CSV and Parquet files of the built-in tables: read_table (no pandas) encodes them to
    the same bytes and dtypes as pandas' read_csv / read_parquet, and each column's text and
    numbers are pandas' astype(str) and to_numeric."""
    import pandas as pd

    from node.data.encode import encode
    from node.data.schema import fit_schema
    from node.data.table import read_table
    from node.rehearsal.simulation.datasets import load_demo

    df, label, categorical = load_demo(dataset)
    schema = fit_schema(df, label, categorical)
    df.to_csv(tmp_path / "t.csv", index=False)
    df.iloc[::3].to_parquet(tmp_path / "t.parquet")  # a non-default index, as the simulator's
    for path, ref in ((tmp_path / "t.csv", pd.read_csv(tmp_path / "t.csv")),
                      (tmp_path / "t.parquet", pd.read_parquet(tmp_path / "t.parquet"))):
        table = read_table(path)
        assert table.columns == [str(c) for c in ref.columns] and len(table) == len(ref)
        X0, y0 = encode(ref, schema, str(path))
        X1, y1 = encode(table, schema, str(path))
        assert (X1.dtype, y1.dtype) == (X0.dtype, y0.dtype) == (np.float32, np.int64)
        assert X1.tobytes() == X0.tobytes() and y1.tobytes() == y0.tobytes()
        for c in ref.columns:
            assert table.texts(c) == [v if isinstance(v, str) else None
                                      for v in ref[c].astype(str).tolist()], c
            assert np.array_equal(table.numbers(c), pd.to_numeric(ref[c], errors="coerce")
                                  .to_numpy(dtype=np.float64), equal_nan=True), c


def test_read_table_reads_numbers_and_text_as_pandas_does(tmp_path):
    """Column typing decides a categorical column's text: "1.50" in a number column is
    "1.5", "+3" in a whole-number column is "3", TRUE is "True"; empty cells are empty."""
    import pandas as pd

    from node.data.table import read_table

    rng = np.random.default_rng(4)
    v = rng.normal(size=3000) * 10.0 ** rng.integers(-30, 30, 3000)
    lines = ["a,b,c,d,e,f,g"] + [f"{x!r},{x:.20g},x{i % 3},+{i},{'TRUE' if i % 2 else 'false'},"
                                 f"{'' if i % 7 == 0 else '1.50'},{'NA' if i % 5 == 0 else 'q'}"
                                 for i, x in enumerate(v)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n\n")
    ref, table = pd.read_csv(path), read_table(path)
    assert len(table) == len(ref) == 3000
    for c in ref.columns:
        assert table.texts(c) == [x if isinstance(x, str) else None
                                  for x in ref[c].astype(str).tolist()], c
        assert np.array_equal(table.numbers(c), pd.to_numeric(ref[c], errors="coerce")
                              .to_numpy(dtype=np.float64), equal_nan=True), c
    assert table.texts("d")[:2] == ["0", "1"] and table.texts("f")[:2] == [None, "1.5"]


SCHEMA_DOC = {"label": "default", "classes": ["No", "Yes"], "columns": [
    {"name": "student", "kind": "categorical", "vocabulary": ["No", "Yes"]},
    {"name": "balance", "kind": "numeric", "mean": 800.0, "std": 480.0}]}


@pytest.mark.parametrize("text,expected", [
    ("", r"bad\.csv: empty file: expected a header line"),
    ("\n\n", r"bad\.csv: empty file"),
    ("student,balance,default\nNo,1.0,No\nYes,2.0\n",
     r"bad\.csv: line 3: 2 cell\(s\), but the header \(line 1\) names 3 column\(s\)"),
    ("student,balance,default\nNo,1.0,No,extra\n", r"bad\.csv: line 2: 4 cell\(s\)"),
    ("student,balance,default\nNo,1.0,No\nYes,abc,No\nNo,,Yes\n",
     r"bad\.csv: column 'balance': 2 row\(s\) are empty or not finite numbers "
     r"\(first at line 3: 'abc'\)"),
    ("student,balance,default\nNo,1.0,No\nYes,inf,No\n",
     r"column 'balance': 1 row\(s\) are empty or not finite numbers \(first at line 3: 'inf'\)"),
    ("student,balance\nNo,1.0\n", r"bad\.csv: missing column\(s\) the schema requires: "
     r"\['default'\]"),
    ("student,balance,default\n", r"bad\.csv: no rows \(only a header\?\)"),
    ("student,balance,default\nNo,1.0,No\n,2.0,No\n",
     r"bad\.csv: column 'student': 1 row\(s\) are empty \(first at line 3: empty\)"),
    ("student,balance,default\nNo,1.0,No\nMaybe,2.0,No\n",
     r"column 'student': value\(s\) not in the schema's vocabulary: \['Maybe'\] "
     r"\(first at line 3: 'Maybe'\)"),
    ("student,balance,default\nNo,1.0,No\nNo,2.0,Perhaps\n",
     r"label column 'default': value\(s\) not among the schema's classes \['No', 'Yes'\]: "
     r"\['Perhaps'\] \(first at line 3: 'Perhaps'\)"),
    ("student,balance,student\nNo,1.0,No\n", r"line 1 \(the header\): column\(s\) \['student'\] "
     r"named twice"),
    ('student,balance,default\nNo,"1.0,No\n', r"bad\.csv: line \d+: (not valid CSV|\d cell)"),
])
def test_malformed_csv_errors_name_the_file_line_and_column(tmp_path, text, expected):
    from gossip.errors import LocalError
    from node.data.encode import encode
    from node.data.schema import FeatureSchema
    from node.data.table import read_table

    path = tmp_path / "bad.csv"
    path.write_text(text)
    schema = FeatureSchema.from_dict(SCHEMA_DOC, "s")
    with pytest.raises(LocalError, match=expected):
        encode(read_table(path), schema, str(path))


def test_a_csv_that_is_not_utf8_names_its_line(tmp_path):
    from gossip.errors import LocalError
    from node.data.table import read_table

    path = tmp_path / "latin1.csv"
    path.write_bytes("student,balance,default\nNo,1.0,No\nJos\xe9,2.0,No\n".encode("latin-1"))
    with pytest.raises(LocalError, match=r"latin1\.csv: line 3: not UTF-8 text"):
        read_table(path)


LEAN_PROBE = """
import sys
from node.runtime.daemon import check_inputs
check_inputs(sys.argv[1])  # what `flnode run` reads and checks before torch
import torch
import gossip.transports.libp2p, node.runtime.daemon, node.runtime.node  # what it imports to run
print(sorted({m.split('.')[0] for m in sys.modules} & %r))
"""


def test_the_node_path_imports_neither_pandas_nor_unused_readers(consortium_dir, tmp_path):
    """`flnode run`'s modules, after reading a CSV member file or a Parquet one: no pandas,
    no pyarrow (a short-lived child process reads Parquet: node/data/parquet_child.py)."""
    import pandas as pd

    _, configs = consortium_dir
    data = Path(configs[0]).parent.parent / "data"
    for f in ("bank-0", "test"):
        pd.read_parquet(data / f"{f}.parquet").to_csv(tmp_path / f"{f}.csv", index=False)
    as_csv = edited(configs[0], "bank-0-csv.toml", lambda d: d["data"].update(
        path=str(tmp_path / "bank-0.csv"), eval_path=str(tmp_path / "test.csv")))
    watch = {"pandas", "pyarrow", "sklearn", "scipy", "opacus", "matplotlib"}
    for config, expected in ((as_csv, "[]"), (configs[0], "[]")):
        r = subprocess.run([sys.executable, "-c", LEAN_PROBE % watch, str(config)],
                           capture_output=True, text=True, cwd=ROOT, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == expected, (config, r.stdout)


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_libp2p_node_loads_no_mdns_upnp_or_autotls_code():
    """gossip.transports.libp2p registers stand-ins for py-libp2p's mDNS, UPnP, AutoTLS
    and relay-NAT modules before libp2p loads: their third-party code (zeroconf,
    requests, the ACME client) never enters a node, and a stand-in used raises."""
    out = _python(
        "import sys, json\n"
        "import gossip.transports.libp2p\n"
        "from gossip.transports.libp2p.trim import LEFT_OUT\n"
        "print(json.dumps({'stubs': [getattr(sys.modules[m], '__flnode_left_out__', False)"
        " for m in LEFT_OUT], 'loaded': sorted(x for x in ('zeroconf', 'requests',"
        " 'libp2p.security.tls.autotls.acme_client') if x in sys.modules)}))\n"
        "from libp2p.discovery.upnp.upnp import UpnpManager\n"
        "try:\n    UpnpManager()\nexcept RuntimeError as e:\n    print('raised:', e)\n")
    first, second = out.splitlines()[:2]
    import json

    got = json.loads(first)
    assert got == {"stubs": [True] * 5, "loaded": []}
    assert second.startswith("raised: py-libp2p's UPnP port mapping (UpnpManager) is left out")


def test_the_stand_ins_name_everything_py_libp2p_imports_from_those_modules():
    """Checked against the installed py-libp2p's source: every `from M import names` of a
    left-out module M outside M's own package is covered by the stand-in, and each name
    exists in the real module (an upgrade that renames or adds one fails here)."""
    import ast
    import importlib.util

    from gossip.transports.libp2p.trim import LEFT_OUT

    root = Path(importlib.util.find_spec("libp2p").origin).parent
    wanted: dict[str, set[str]] = {m: set() for m in LEFT_OUT}
    for path in root.rglob("*.py"):
        rel = ".".join(("libp2p", *path.relative_to(root).with_suffix("").parts))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in LEFT_OUT and node.level == 0:
                package = node.module.rsplit(".", 1)[0]
                if not rel.startswith(package):
                    wanted[node.module] |= {a.name for a in node.names}
    for module, (_, names) in LEFT_OUT.items():
        assert wanted[module] <= set(names), (module, wanted[module] - set(names))
    real = _python(
        "import importlib, json\n"
        "import libp2p  # first, so the package's leave_out() keeps the real modules\n"
        "from gossip.transports.libp2p.trim import LEFT_OUT\n"
        "print(json.dumps({m: [n for n in names if not hasattr(importlib.import_module(m), n)]"
        " for m, (_, names) in LEFT_OUT.items()}))\n")
    import json

    assert json.loads(real) == {m: [] for m in LEFT_OUT}


def test_the_finished_line_tells_benign_duplicates_from_refusals():
    """A clean run used to end "rejected {'duplicate': 2}": copies of messages already
    accepted (re-sends, redeliveries) read like refusals."""
    from node.runtime.daemon import rejected_text

    assert rejected_text({}) == "rejected none"
    assert rejected_text({"duplicate": 2}) == "rejected none (benign: duplicate 2)"
    assert rejected_text({"bad_signature": 1, "duplicate": 2}) == \
        "rejected bad_signature 1 (benign: duplicate 2)"

"""Rehearse on your own files: `flnode simulate --data-dir` and scripts/simulate_network.py
--data-dir, one CSV/Parquet per member, a common test set or each member's own held-out
rows, and the collaboration gain on those rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.errors import LocalError
from node.cli import main as cli_main
from node.rehearsal.simulation.prepare import held_out_split, prepare
from node.rehearsal.simulation.spec import SimulationSpec

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = ("bank-a", "bank-b", "bank-c")
ROWS = 900  # per member: quick, and enough of the rare class on every held-out set


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def make_dir(root: Path, test: bool = False, members=MEMBERS, rows: int = ROWS) -> Path:
    """Member CSVs cut from the built-in Default table (label column renamed 'label')."""
    from node.rehearsal.simulation.datasets import load_demo

    df, label, _ = load_demo("default")
    df = df.rename(columns={label: "label"})
    order = np.random.default_rng(7).permutation(len(df))
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(members):
        df.iloc[order[i * rows:(i + 1) * rows]].to_csv(root / f"{name}.csv", index=False)
    if test:
        start = len(members) * rows
        df.iloc[order[start:start + 1000]].to_csv(root / "test.csv", index=False)
    return root


def run_cli(*argv: str) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "node.cli", *argv], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


def refused(capsys, *argv: str) -> str:
    """The real `flnode` entry point, in process: exit 2 and the error it prints."""
    assert cli_main(list(argv)) == 2
    return capsys.readouterr().err


def spec(tmp_path: Path, data: Path, **kw) -> SimulationSpec:
    return SimulationSpec(dataset="default", nodes=0, partition="iid", rounds=2, seed=0,
                          out=tmp_path / "run", data_dir=data, **kw)


# --- in process, through the command line -----------------------------------------

def test_own_rows_only_each_member_evaluates_on_its_held_out_rows(tmp_path):
    data = make_dir(tmp_path / "data")
    code, out, err = run_cli("simulate", "--data-dir", str(data), "--rounds", "2",
                             "--out", str(tmp_path / "run"))
    assert code == 0, err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["nodes"] == 3 and list(s["consortium"]["per_node"]) == list(MEMBERS)
    assert s["common_test"] is False and s["data_dir"] == str(data)
    held = ROWS - int(ROWS * 0.8)
    assert s["rows"] == {m: ROWS - held for m in MEMBERS}
    assert set(s["own_rows"]) == set(MEMBERS)
    for m, r in s["own_rows"].items():
        assert r["rows"] == held
        assert r["gain"] == pytest.approx(r["consortium"] - r["local_only"])
        # The node's own per-round metric (on the rows IT held out) is the simulator's
        # "consortium on own rows" figure: the same rows, the same model.
        assert s["history"]["1"][m] == pytest.approx(r["consortium"], abs=1e-12)
        assert 0 <= r["local_only"] <= 1 and 0 <= r["consortium"] <= 1
    assert s["test_rows"] == 3 * held  # no common test set: the held-out rows pooled
    assert "own held-out rows" in out and "flnode schema infer" in out
    assert "gain" in out and "bank-a" in out


def test_with_a_common_test_set_both_tables(tmp_path):
    data = make_dir(tmp_path / "data", test=True)
    code, out, err = run_cli("simulate", "--data-dir", str(data), "--rounds", "2",
                             "--out", str(tmp_path / "run"))
    assert code == 0, err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["common_test"] is True and s["test_rows"] == 1000
    assert "test.csv" in s["test_set"] and "test" not in s["consortium"]["per_node"]
    assert set(s["consortium"]["per_node"]) == set(MEMBERS) == set(s["own_rows"])
    assert set(s["local_only"]["per_node"]) == set(MEMBERS)
    assert "common test set test.csv" in out and "own held-out rows" in out
    # --test names the same file explicitly: the same run
    code, _, err = run_cli("simulate", "--data-dir", str(data), "--test",
                           str(data / "test.csv"), "--rounds", "2", "--out",
                           str(tmp_path / "run2"))
    assert code == 0, err
    s2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert s2["own_rows"] == s["own_rows"] and s2["consortium"] == s["consortium"]


def released(run: Path) -> dict[str, tuple[float, bytes]]:
    """Per member: the noised row count it released and its final model's bytes."""
    from node.runtime.state import StateDir

    out = {}
    for state in sorted((run / "state").iterdir()):
        weight = json.loads((state / "released_weight.json").read_text())["weight"]
        cp = StateDir(state).load_checkpoint()
        assert cp is not None
        out[state.name] = (weight, cp.model)
    return out


def test_own_files_get_os_noise_and_only_the_demo_tables_seeded_noise(tmp_path):
    """Privacy audit: DP noise protecting the members' own rows (--data-dir) never comes
    from a config seed. The same seed twice, record-level DP: other noised counts, other
    models, and summary.json and the terminal say so. The demo tables stay reproducible."""
    from rich.console import Console

    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.run import NOISE_OS, NOISE_SEEDED

    data = make_dir(tmp_path / "data")
    dp = ("--privacy", "record", "--epsilon", "3", "--aggregation", "mean", "--rounds", "1",
          "--seed", "0")
    runs = []
    for sub in ("a", "b"):
        code, out, err = run_cli("simulate", "--data-dir", str(data), *dp,
                                 "--out", str(tmp_path / sub))
        assert code == 0, err
        s = json.loads((tmp_path / sub / "summary.json").read_text())
        assert s["noise"] == NOISE_OS and s["epsilon"]["weight"].startswith("row count +")
        assert "noise: drawn from os.urandom" in out
        runs.append(released(tmp_path / sub))
    a, b = runs
    assert set(a) == set(b) == set(MEMBERS)
    # Other noised counts (σ 10: two draws round to the same integer for one member with
    # probability ~0.03, for all three ~2e-5) and, every member, another model.
    assert [a[m][0] for m in MEMBERS] != [b[m][0] for m in MEMBERS]
    assert all(a[m][1] != b[m][1] for m in MEMBERS)

    def demo(sub: str) -> dict:
        return simulate(SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=1,
                                       seed=0, out=tmp_path / sub, privacy="record",
                                       epsilon=3.0, sigma=None, weight="noised",
                                       aggregation="mean"), Console(quiet=True))

    assert demo("demo-a")["noise"] == demo("demo-b")["noise"] == NOISE_SEEDED
    assert released(tmp_path / "demo-a") == released(tmp_path / "demo-b")


def test_held_out_rows_are_exactly_the_nodes(tmp_path):
    """The simulator's own rows per member are the rows Node.from_config holds out."""
    from gossip.transports.memory import MemoryHub
    from node.runtime.config import load_config
    from node.runtime.node import Node

    data = make_dir(tmp_path / "data")
    prep = prepare(spec(tmp_path, data))
    hub = MemoryHub()
    for i, (name, path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        node = Node.from_config(load_config(path), hub.attach(name, prep.names))
        assert np.array_equal(node.held_out.X, prep.own_parts[i][0])
        assert np.array_equal(node.held_out.y, prep.own_parts[i][1])
        assert np.array_equal(node.train_data.X, prep.train_parts[i][0])
        tr, held = held_out_split(ROWS, 0 * 1000 + i)
        assert np.array_equal(node.held_out.y, node.held_out.y) and len(held) == 180
        assert len(tr) == len(node.train_data.y)


def test_a_declared_schema_is_used_as_given_and_federated_is_rehearsed(tmp_path):
    import tomli_w

    data = make_dir(tmp_path / "data")
    doc = {"label": "label", "classes": ["No", "Yes"], "normalize": "declared", "columns": [
        {"name": "student", "kind": "categorical", "vocabulary": ["No", "Yes"]},
        {"name": "balance", "kind": "numeric", "mean": 800.0, "std": 500.0,
         "range": [0.0, 5000.0]},
        {"name": "income", "kind": "numeric", "mean": 33000.0, "std": 13000.0}]}
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(doc))
    prep = prepare(spec(tmp_path, data, schema_path=tmp_path / "schema.toml"))
    assert prep.schema.to_dict() == doc
    assert prep.consortium.schema == doc and prep.notes == []
    doc["normalize"] = "federated"
    for c in doc["columns"]:
        c.pop("mean", None), c.pop("std", None)
    doc["columns"][2]["range"] = [0.0, 250000.0]
    (tmp_path / "fed.toml").write_text(tomli_w.dumps(doc))
    fed = prepare(spec(tmp_path / "f", data, schema_path=tmp_path / "fed.toml"))
    assert fed.consortium.schema == doc  # the consortium carries ranges, no mean or std
    assert fed.raw_eval is not None and any("federated" in n for n in fed.notes)
    with pytest.raises(LocalError, match=r"--label 'balance'.*says the label is 'label'"):
        prepare(spec(tmp_path, data, schema_path=tmp_path / "schema.toml", label="balance"))


# --- what is refused, each naming what is wrong ---------------------------------------

def test_errors_name_the_file(tmp_path, capsys):
    def out(name):
        return str(tmp_path / f"out-{name}")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a member")
    err = refused(capsys, "simulate", "--data-dir", str(empty), "--out", out(1))
    assert "no member files" in err and str(empty) in err

    twice = make_dir(tmp_path / "twice")
    import pandas as pd
    pd.read_csv(twice / "bank-a.csv").to_parquet(twice / "bank-a.parquet")
    err = refused(capsys, "simulate", "--data-dir", str(twice), "--out", out(2))
    assert "bank-a.csv and bank-a.parquet both name member 'bank-a'" in err

    cols = make_dir(tmp_path / "cols")
    df = pd.read_csv(cols / "bank-b.csv")
    df.rename(columns={"income": "salary"}).to_csv(cols / "bank-b.csv", index=False)
    err = refused(capsys, "simulate", "--data-dir", str(cols), "--out", out(3))
    assert "bank-b.csv" in err and "['income']" in err and "['salary']" in err

    bad = make_dir(tmp_path / "bad")
    (bad / "bank-c.csv").rename(bad / "bank c!.csv")
    err = refused(capsys, "simulate", "--data-dir", str(bad), "--out", out(4))
    assert "bank c!.csv" in err and "member name" in err

    one = make_dir(tmp_path / "one", members=("solo",))
    err = refused(capsys, "simulate", "--data-dir", str(one), "--out", out(5))
    assert "at least 2 members" in err and "solo.csv" in err

    ok = make_dir(tmp_path / "ok", test=True)
    for flag, value in (("--nodes", "3"), ("--partition", "iid")):
        err = refused(capsys, "simulate", "--data-dir", str(ok), flag, value, "--out", out(6))
        assert f"{flag} does not apply with --data-dir" in err
    err = refused(capsys, "simulate", "--data-dir", str(ok), "--label", "nope", "--out", out(7))
    assert "--label 'nope': no such column" in err and "bank-a.csv" in err
    other = tmp_path / "other-test.csv"
    other.write_text((ok / "test.csv").read_text())
    err = refused(capsys, "simulate", "--data-dir", str(ok), "--test", str(other),
                  "--out", out(8))
    assert "also holds test.csv" in err
    err = refused(capsys, "simulate", "--label", "x", "--out", out(9))
    assert "--label applies only with --data-dir" in err

    nolabel = make_dir(tmp_path / "nolabel")
    for f in nolabel.iterdir():
        pd.read_csv(f).rename(columns={"label": "y"}).to_csv(f, index=False)
    err = refused(capsys, "simulate", "--data-dir", str(nolabel), "--out", out(10))
    assert "no column 'label'" in err and "--label COL" in err

    text = make_dir(tmp_path / "text")
    df = pd.read_csv(text / "bank-a.csv")
    df.loc[3, "income"] = math.nan
    df.to_csv(text / "bank-a.csv", index=False)
    err = refused(capsys, "simulate", "--data-dir", str(text), "--out", out(11))
    assert "bank-a.csv" in err and "'income'" in err and "1 row(s)" in err


# --- the same per-member metrics in process and as real processes ----------------------

FEDERATED = {"label": "label", "classes": ["No", "Yes"], "normalize": "federated", "columns": [
    {"name": "student", "kind": "categorical", "vocabulary": ["No", "Yes"]},
    {"name": "balance", "kind": "numeric", "range": [0.0, 3000.0]},
    {"name": "income", "kind": "numeric", "range": [0.0, 80000.0]}]}


@pytest.mark.parametrize("normalize", ["drafted", "federated"])
def test_in_process_and_real_processes_give_the_same_per_member_metrics(tmp_path, normalize):
    """Privacy off, same seed, 3 members, 3 rounds: `flnode simulate --data-dir` and
    scripts/simulate_network.py --data-dir (three `flnode run` processes over libp2p on
    loopback) agree on every member's metric in every round, on its own held-out rows
    and on the common test set, to 1e-6: with a schema drafted from the pooled files,
    and with federated normalization (the members agree mean and std before round 1)."""
    import tomli_w

    data = make_dir(tmp_path / "data", test=True)
    extra: tuple[str, ...] = ()
    if normalize == "federated":
        (tmp_path / "fed.toml").write_text(tomli_w.dumps(FEDERATED))
        extra = ("--schema", str(tmp_path / "fed.toml"))
    code, _, err = run_cli("simulate", "--data-dir", str(data), "--rounds", "3",
                           "--out", str(tmp_path / "mem"), *extra)
    assert code == 0, err
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate_network.py"),
                        "--data-dir", str(data), "--rounds", "3", "--out",
                        str(tmp_path / "net"), *extra], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    mem = json.loads((tmp_path / "mem" / "summary.json").read_text())
    net = json.loads((tmp_path / "net" / "summary.json").read_text())
    assert net["transport"] == "libp2p" and mem["transport"] == "memory"
    # Every share arrived everywhere (else the runs legitimately differ: see the report
    # on `seen` reports overtaking shares).
    # (A duplicate is benign: a member's statistics re-sent on a hello it also got.)
    for run in (net, mem):
        refused = {k: v for k, v in run["rejected"].items() if k != "duplicate"}
        assert refused == {}, run["rejected"]
    diffs = []
    for rnd, per in mem["history"].items():
        for m, v in per.items():
            diffs.append(abs(v - net["history"][rnd][m]))
    for m, row in mem["own_rows"].items():
        for k in ("local_only", "consortium"):
            diffs.append(abs(row[k] - net["own_rows"][m][k]))
        assert row["rows"] == net["own_rows"][m]["rows"]
    for m, v in mem["consortium"]["per_node"].items():
        diffs.append(abs(v - net["consortium"]["per_node"][m]))
    assert len(diffs) == 3 * 3 + 3 * 2 + 3
    assert max(diffs) <= 1e-6, max(diffs)


def test_drop_row_applies_to_the_whole_file_then_node_and_simulator_split_alike(
        tmp_path, monkeypatch, caplog):
    """missing = "drop_row" drops from the whole file first, then the rows left are split:
    the node and the simulator hold out the same rows, 20 % of the usable ones, and the
    normalization check (resolve) is given the training rows after dropping."""
    import logging

    import pandas as pd
    import tomli_w

    import node.runtime.build as runner
    from gossip.transports.memory import MemoryHub
    from node.runtime.config import load_config
    from node.runtime.node import Node

    rows, empty = 200, 11
    data = make_dir(tmp_path / "data", rows=rows)
    for i, name in enumerate(MEMBERS):
        df = pd.read_csv(data / f"{name}.csv")
        df.loc[df.index[i:i + 17 * empty:17], "balance"] = np.nan
        df.to_csv(data / f"{name}.csv", index=False)
    doc = {"label": "label", "classes": ["No", "Yes"], "normalize": "declared", "columns": [
        {"name": "student", "kind": "categorical", "vocabulary": ["No", "Yes"]},
        {"name": "balance", "kind": "numeric", "mean": 800.0, "std": 500.0,
         "range": [0.0, 5000.0], "missing": "drop_row"},
        {"name": "income", "kind": "numeric", "mean": 33000.0, "std": 13000.0}]}
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(doc))
    prep = prepare(spec(tmp_path, data, schema_path=tmp_path / "schema.toml"))
    seen = []
    real = runner.resolve

    def spy(schema, members, own_rows, *rest):
        seen.append(own_rows)
        return real(schema, members, own_rows, *rest)

    monkeypatch.setattr(runner, "resolve", spy)
    usable = rows - empty
    held = usable - int(usable * 0.8)
    hub = MemoryHub()
    for i, (name, path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            node = Node.from_config(load_config(path), hub.attach(name, prep.names))
        assert len(node.held_out.y) == held and len(node.train_data.y) == usable - held
        assert seen[-1] == usable - held
        assert np.array_equal(node.held_out.X, prep.own_parts[i][0])
        assert np.array_equal(node.train_data.X, prep.train_parts[i][0])
        assert f'drop_row" drops {empty} of its {rows} row(s)' in caplog.text
        assert f'{held} of its {usable} rows left after missing = "drop_row" dropped {empty}' \
            in caplog.text

"""`flnode export` and `flnode predict` (node/ops/export*.py, node/ops/predict.py).

The oracle everywhere is the node's own path: node/data/encode.py's encode on the rows,
the network the node builds, softmax (node/learn/train.py evaluate). Fast tests use the
golden unfinished run (tests/golden/resume: churn, logreg, categories, its data kept) and
hand-made schemas; the slow one runs `flnode simulate` (default, mlp, 2 rounds) and
compares with what the node itself recorded."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest
import torch

from gossip.errors import LocalError
from gossip.membership import load_consortium
from node.cli import main as cli
from node.data.encode import encode
from node.data.schema import FeatureSchema
from node.data.table import Table, read_table
from node.learn.models import build_model, set_flat
from node.learn.normalize import stats_digest
from node.learn.train import evaluate
from node.ops import export_onnx, export_torch
from node.ops.export import (
    encoding_schema,
    export,
    load_member,
    preprocessing,
    raw_from_table,
    reference,
)
from node.ops.predict import Scorer, onnx_session, score_table
from node.runtime.config import load_config
from node.runtime.state import StateDir, decode_checkpoint
from tests.golden import make_golden as G

TOL = 1e-5  # the bar: export == the node's own evaluation to 1e-5

# Every encoding path the schema offers: declared statistics, a range clip, a fill with
# and without an indicator, drop_row, no policy, a constant column, categories with and
# without a fill.
MIXED = FeatureSchema.from_dict({
    "label": "y", "classes": ["a", "b", "c"],
    "columns": [
        {"name": "amount", "kind": "numeric", "mean": 50.0, "std": 20.0, "range": [0, 100],
         "missing": {"fill": 10.0, "indicator": True}},
        {"name": "age", "kind": "numeric", "mean": 40.0, "std": 12.0,
         "missing": {"fill": 40.0}},
        {"name": "score", "kind": "numeric", "mean": 0.5, "std": 0.25, "missing": "drop_row"},
        {"name": "flat", "kind": "numeric", "mean": 3.0, "std": 0.0},
        {"name": "plain", "kind": "numeric", "mean": -1.0, "std": 2.0},
        {"name": "region", "kind": "categorical", "vocabulary": ["north", "south", "unknown"],
         "missing": {"fill": "unknown"}},
        {"name": "tier", "kind": "categorical", "vocabulary": ["1", "2", "3.5"]},
    ]}, "test")


def mixed_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "amount": rng.uniform(-20, 130, n), "age": rng.normal(40, 12, n),
        "score": rng.uniform(0, 1, n), "flat": np.full(n, 3.0), "plain": rng.normal(-1, 2, n),
        "region": rng.choice(["north", "south", "unknown"], n),
        "tier": rng.choice(["1", "2", "3.5"], n), "y": rng.choice(["a", "b", "c"], n)})


@pytest.fixture(scope="module")
def mixed_model():
    torch.set_num_threads(1)
    net = build_model("mlp", MIXED.n_features, MIXED.n_classes, 16, seed=3)
    net.eval()
    return net, preprocessing(MIXED.for_encoding())


@pytest.fixture(scope="module")
def mixed_exports(mixed_model, tmp_path_factory):
    net, spec = mixed_model
    where = tmp_path_factory.mktemp("mixed")
    (where / "onnx").mkdir()
    (where / "ts").mkdir()
    export_onnx.write(net, spec, where / "onnx")
    export_torch.write_script(net, spec, where / "ts")
    return where


def three_ways(where: Path, net, spec, raw) -> list[np.ndarray]:
    """ONNX Runtime, TorchScript and the numpy preprocessing, on the same raw columns."""
    X, invalid = export_torch.encode_raw(raw, spec)
    probs = reference(net, X)
    probs[invalid] = np.nan
    return [onnx_session(where / "onnx" / "model.onnx").run(["probabilities"], raw)[0],
            export_torch.score_script(where / "ts" / "model.pt", raw, spec=spec), probs]


def test_every_encoding_path_matches_the_node(mixed_model, mixed_exports):
    """Rows the node accepts: all three backends give the node's own probabilities."""
    net, spec = mixed_model
    df = mixed_rows(400)
    df.loc[::7, "amount"] = np.nan  # filled, with its indicator
    df.loc[::5, "age"] = np.nan  # filled
    df.loc[::9, "region"] = None  # filled with "unknown"
    X, _ = encode(df, MIXED, "rows")
    want = reference(net, X)
    raw = raw_from_table(Table.from_frame(df), spec)
    for got in three_ways(mixed_exports, net, spec, raw):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= TOL


def test_unseen_categories_and_refused_rows_score_as_documented(mixed_model, mixed_exports):
    """docs/operate/export.md: a category outside the vocabulary encodes as all zeros; a
    row the node would drop or refuse (empty without a fill, not finite, far out) is NaN."""
    net, spec = mixed_model
    df = mixed_rows(6, seed=1)
    X, _ = encode(df, MIXED, "rows")
    want = reference(net, X)
    raw = {k: v.copy() for k, v in raw_from_table(Table.from_frame(df), spec).items()}
    raw["tier"][0] = "4"  # unseen: the tier block of row 0 is all zeros
    X0 = X.copy()
    X0[0, -3:] = 0.0
    want[0] = reference(net, X0)[0]
    raw["score"][1] = np.nan  # drop_row column empty: the node drops the row
    raw["plain"][2] = np.nan  # no policy: the node refuses the file
    raw["tier"][3] = ""  # categorical, empty, no policy
    raw["plain"][4] = np.inf  # not finite
    raw["plain"][5] = 1e9  # 5e8 standard deviations out
    want[1:] = np.nan
    for got in three_ways(mixed_exports, net, spec, raw):
        assert np.isnan(got[1:]).all()
        assert np.max(np.abs(got[0] - want[0])) <= TOL


def test_score_table_streams_passes_extras_and_names_bad_columns(mixed_model, mixed_exports,
                                                                  tmp_path):
    net, spec = mixed_model
    model = tmp_path / "model"
    shutil.copytree(mixed_exports / "onnx", model)
    files = [{"path": "model.onnx", "sha256": _sha(model / "model.onnx")}]
    (model / "manifest.json").write_text(json.dumps({"format": "onnx", "files": files,
                                                     "schema": spec}))
    df = mixed_rows(300, seed=2)
    df.insert(0, "customer_id", [f"c{i:04d}" for i in range(300)])
    df["note"] = "NA"  # an extra column is copied as it is, even a cell pandas calls empty
    df.loc[10, "tier"] = "2.0"  # the same category by value: matched to "2"
    df.loc[11, "tier"] = "9"  # unseen: counted
    df.loc[12, "plain"] = None  # empty, no policy: scored empty
    df.to_csv(tmp_path / "in.csv", index=False)
    s = score_table(model, tmp_path / "in.csv", tmp_path / "out.csv", chunk_rows=64)
    assert (s.rows, s.empty, s.unseen) == (300, 1, {"tier": 1})
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(out.columns) == ["customer_id", "y", "note", "p_a", "p_b", "p_c", "predicted"]
    assert out["customer_id"].tolist() == df["customer_id"].tolist()
    assert (out["note"] == "NA").all()
    assert out.loc[12, "p_a"] == "" and out.loc[12, "predicted"] == ""
    ok = [i for i in range(300) if i not in (11, 12)]
    fixed = df.drop(index=[11, 12]).copy()
    fixed.loc[10, "tier"] = "2"
    want = reference(net, encode(fixed, MIXED, "rows")[0])
    got = out.loc[ok, ["p_a", "p_b", "p_c"]].astype(float).to_numpy()
    assert np.max(np.abs(got - want)) <= TOL
    assert out.loc[ok, "predicted"].tolist() == [["a", "b", "c"][k] for k in want.argmax(1)]
    # Parquet in, Parquet out: the same scores
    df.to_parquet(tmp_path / "in.parquet")
    score_table(model, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=100)
    pq = pd.read_parquet(tmp_path / "out.parquet")
    assert np.max(np.abs(pq.loc[ok, ["p_a", "p_b", "p_c"]].to_numpy() - want)) <= TOL
    # a categorical column stored as numbers: matched by value (1.0 is "1", 3.5 is "3.5")
    floats = df.drop(index=[11]).reset_index(drop=True)
    floats["tier"] = floats["tier"].astype(float)
    floats.to_parquet(tmp_path / "floats.parquet")
    s = score_table(model, tmp_path / "floats.parquet", tmp_path / "floats.csv")
    assert s.unseen == {}
    got = pd.read_csv(tmp_path / "floats.csv")[["p_a", "p_b", "p_c"]].to_numpy()
    assert np.max(np.abs(np.delete(got, 11, axis=0) - want)) <= TOL  # row 12 is now 11
    # a mistyped cell: named (column, type expected, what was found, the row)
    bad = df.copy()
    bad["age"] = bad["age"].astype(str)
    bad.loc[200, "age"] = "forty"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LocalError, match=r"column 'age': expected a number .* found 'forty' "
                                         r"at row 201"):
        score_table(model, tmp_path / "bad.csv", tmp_path / "o.csv", chunk_rows=64)
    assert not (tmp_path / "o.csv").exists()  # no half-written scores
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(LocalError, match=r"column 'age': expected a number .* found 'forty'"):
        score_table(model, tmp_path / "bad.parquet", tmp_path / "o.csv")
    df.drop(columns=["region"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(LocalError, match=r"missing column 'region' \(categorical"):
        score_table(model, tmp_path / "short.csv", tmp_path / "o.csv")
    # a model file changed after the export is refused before it is loaded
    with open(model / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(LocalError, match="model.onnx does not match its SHA-256"):
        Scorer(model)


def test_scoring_with_onnx_imports_no_torch(mixed_exports, mixed_model, tmp_path):
    """`flnode predict` on an ONNX export starts onnxruntime, not torch (a scoring
    service's process stays small); `flnode status` stays lean too (tests/test_lean.py)."""
    from tests.test_lean import heavy, imported_by

    _, spec = mixed_model
    model = tmp_path / "model"
    shutil.copytree(mixed_exports / "onnx", model)
    (model / "manifest.json").write_text(json.dumps({"format": "onnx", "schema": spec, "files": [
        {"path": "model.onnx", "sha256": _sha(model / "model.onnx")}]}))
    mixed_rows(50).to_csv(tmp_path / "in.csv", index=False)
    r, mods = imported_by("predict", "--model", str(model), "--data", str(tmp_path / "in.csv"),
                          "--out", str(tmp_path / "out.csv"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "onnxruntime" in mods and heavy(mods) == []


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_hostile_model_dir_is_refused_by_name(mixed_exports, mixed_model, tmp_path):
    _, spec = mixed_model
    model = tmp_path / "model"
    shutil.copytree(mixed_exports / "onnx", model)
    good = {"format": "onnx", "schema": spec,
            "files": [{"path": "model.onnx", "sha256": _sha(model / "model.onnx")}]}
    cases = [
        ({**good, "format": "pickle"}, "format 'pickle' is not one of"),
        ({**good, "files": [{"path": "../model.onnx", "sha256": "0"}]}, "not a plain name"),
        ({**good, "files": []}, "no files listed"),
        ({**good, "files": [{"path": "gone.onnx", "sha256": "0"}]}, "gone.onnx is listed"),
        ({k: v for k, v in good.items() if k != "schema"}, "not an flnode export's manifest"),
    ]
    for doc, pattern in cases:
        (model / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(LocalError, match=pattern):
            Scorer(model)
    (model / "manifest.json").write_text("{")
    with pytest.raises(LocalError, match="not valid JSON"):
        Scorer(model)
    with pytest.raises(LocalError, match="no readable manifest.json"):
        Scorer(tmp_path / "nothing")


def test_federated_statistics_come_from_the_state_dir(tmp_path):
    doc = {"label": "y", "classes": ["0", "1"], "normalize": "federated",
           "columns": [{"name": "x", "kind": "numeric", "range": [0, 10]}]}
    schema = FeatureSchema.from_dict(doc, "t")
    with pytest.raises(LocalError, match="normalization.json is missing"):
        encoding_schema(schema, tmp_path)
    stats, members = {"x": (4.0, 2.5)}, ("a", "b")
    agreed = {"mode": "federated", "stats": {"x": [4.0, 2.5]}, "members": list(members),
              "capped": {}, "digest": stats_digest(stats, members).hex()}
    (tmp_path / "normalization.json").write_text(json.dumps(agreed))
    enc, info = encoding_schema(schema, tmp_path)
    assert (enc.columns[0].mean, enc.columns[0].std) == (4.0, 2.5)
    assert info["digest"] == agreed["digest"]
    agreed["stats"]["x"] = [5.0, 2.5]  # edited after the agreement
    (tmp_path / "normalization.json").write_text(json.dumps(agreed))
    with pytest.raises(LocalError, match="digest does not match"):
        encoding_schema(schema, tmp_path)


# --- a real run's state dir: the golden unfinished run (churn, logreg) ------------------------

@pytest.fixture
def run(tmp_path) -> Path:
    return G.copy_resume(tmp_path / "run")


def node_probs(run: Path, member: str = "telco-0") -> tuple[np.ndarray, pd.DataFrame]:
    """The node's own probabilities on its held-out file: its config, its checkpoint
    (read by the node's loader), its encode, its network."""
    cfg = load_config(run / "nodes" / f"{member}.toml")
    schema = FeatureSchema.from_dict(load_consortium(cfg.consortium.path).schema, "c")
    cp = StateDir(cfg.state_dir).load_checkpoint()
    net = build_model(cfg.model.kind, schema.n_features, schema.n_classes, cfg.model.hidden)
    set_flat(net, torch.from_numpy(np.frombuffer(cp.model, dtype="<f4").copy()))
    held = read_table(cfg.data.eval_path)
    X, y = encode(held, schema.for_encoding(), "held-out")
    return reference(net, X), pd.read_parquet(cfg.data.eval_path)


def test_golden_run_exports_and_predicts_as_the_node_evaluates(run, tmp_path):
    """1,000 held-out rows through `flnode export` and `flnode predict` (ONNX) equal the
    node's own probabilities; the manifest says what and where from."""
    want, held = node_probs(run)
    assert len(held) == 1000
    state = run / "state" / "telco-0"
    assert cli(["export", str(state), "--out", str(tmp_path / "m")]) == 0  # config found
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert (m["format"], m["round"], m["planned_rounds"], m["finished"]) == ("onnx", 1, 2, False)
    assert m["consortium"]["id"] == load_consortium(run / "consortium.toml").id.hex()
    assert [f["path"] for f in m["files"]] == ["model.onnx"]
    assert m["checked"]["max_abs_difference"] <= TOL
    assert [i["name"] for i in m["inputs"]] == [c["name"] for c in m["schema"]["columns"]]
    held.to_csv(tmp_path / "held.csv", index=False)
    assert cli(["predict", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "held.csv"),
                "--out", str(tmp_path / "scores.csv")]) == 0
    out = pd.read_csv(tmp_path / "scores.csv")
    assert np.max(np.abs(out[["p_no", "p_yes"]].to_numpy() - want)) <= TOL
    assert out["churn"].tolist() == held["churn"].tolist()  # the label column is an extra


def test_round_and_hostile_state_dirs_are_named_errors(run, tmp_path):
    state = run / "state" / "telco-0"
    config = run / "nodes" / "telco-0.toml"
    with pytest.raises(LocalError, match=r"--round 2: .* keeps only the model after its latest "
                                         r"round, 1"):
        load_member(state, config, round_=2)
    cp_path = state / "checkpoint.msgpack"
    good = cp_path.read_bytes()

    def refused(data: bytes, pattern: str) -> None:
        cp_path.write_bytes(data)
        with pytest.raises(LocalError, match=pattern):
            export(state, tmp_path / "never", config=config)
        assert not (tmp_path / "never").exists()

    refused(good[: len(good) // 2], "is truncated")
    refused(b"", "is truncated")
    refused(b"\xc1" * 100, "checkpoint")
    refused(good + b"\0" * 64 * 1024 * 1024, "more than this model")
    doc = msgpack.unpackb(good, raw=False)
    cp = decode_checkpoint(good)
    wrong = dict(doc, model=cp.model[:-4])  # one parameter short: wrong shapes
    refused(msgpack.packb(wrong, use_bin_type=True),
            r"its model holds 147 float32 values .* has 148 \(weight \(2, 73\), bias \(2,\)\)")
    nan = bytearray(cp.model)
    nan[:4] = np.array([np.nan], dtype="<f4").tobytes()
    refused(msgpack.packb(dict(doc, model=bytes(nan)), use_bin_type=True), "not finite")
    refused(msgpack.packb(dict(doc, version=99), use_bin_type=True), "version")
    refused(msgpack.packb(dict(doc, next_round=-3), use_bin_type=True), "not a round number")
    refused(msgpack.packb(dict(doc, evil=[[[[]]]] * 8), use_bin_type=True), "unknown keys")
    refused(msgpack.packb(dict(doc, next_round=0), use_bin_type=True), "no round completed")
    cp_path.write_bytes(good)
    # the config of another kind of network: both shapes named
    text = config.read_text().replace('kind = "logreg"', 'kind = "mlp"')
    (run / "nodes" / "mlp.toml").write_text(text)
    with pytest.raises(LocalError, match=r"holds 148 float32 values .* model.kind = 'mlp'"):
        load_member(state, run / "nodes" / "mlp.toml")
    # final.json that does not match the checkpoint: the state dir was altered
    (state / "final.json").write_text(json.dumps({"round": 1, "digest": "00" * 32}))
    with pytest.raises(LocalError, match="final.json says"):
        load_member(state, config)


def test_torchscript_and_state_dict_exports_of_the_golden_run(run, tmp_path):
    want, held = node_probs(run)
    spec = preprocessing(load_member(run / "state" / "telco-0").schema)
    raw = raw_from_table(read_table(run / "data" / "test.parquet"), spec)
    for fmt in ("torchscript", "state_dict"):
        m = export(run / "state" / "telco-0", tmp_path / fmt, fmt)
        assert m["checked"]["max_abs_difference"] <= TOL
        got = Scorer(tmp_path / fmt).score(raw)
        assert np.max(np.abs(got - want)) <= TOL, fmt
    with pytest.raises(LocalError, match="exists; pass --force"):
        export(run / "state" / "telco-0", tmp_path / "torchscript", "torchscript")


# --- a finished run of `flnode simulate`: what the node itself recorded ------------------------

@pytest.mark.slow
def test_simulated_run_predicts_what_the_node_evaluated(tmp_path):
    """default, mlp, 2 members, 2 rounds: 1,000 held-out rows scored through ONNX Runtime
    and TorchScript equal the node's probabilities to 1e-5, and the ROC-AUC of the export's
    scores on the node's whole held-out file is the one its metrics.jsonl recorded."""
    torch.set_num_threads(1)
    sim = tmp_path / "sim"
    assert cli(["simulate", "--dataset", "default", "--nodes", "2", "--rounds", "2",
                "--partition", "iid", "--out", str(sim)]) == 0
    state = sim / "state" / "bank-0"
    cfg = load_config(sim / "nodes" / "bank-0.toml")
    member = load_member(state)
    held = read_table(cfg.data.eval_path)
    X, y = encode(held, member.schema, "held-out")
    want = reference(member.network, X)
    recorded = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    recorded = [r["metrics"] for r in recorded if "metrics" in r][-1]
    assert math.isclose(evaluate(member.network, X, y)["roc_auc"], recorded["roc_auc"],
                        abs_tol=1e-12)
    frame = pd.read_parquet(cfg.data.eval_path)
    first = frame.iloc[:1000]
    first.to_csv(tmp_path / "new.csv", index=False)
    for fmt in ("onnx", "torchscript"):
        assert cli(["export", str(state), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
        m = json.loads((tmp_path / fmt / "manifest.json").read_text())
        assert (m["round"], m["finished"], m["final"]["digest_matches_final_json"]) == \
            (2, True, True)
        assert cli(["predict", "--model", str(tmp_path / fmt), "--data",
                    str(tmp_path / "new.csv"), "--out", str(tmp_path / f"{fmt}.csv")]) == 0
        got = pd.read_csv(tmp_path / f"{fmt}.csv")[["p_No", "p_Yes"]].to_numpy()
        assert np.max(np.abs(got - want[:1000])) <= TOL, fmt
    from node.learn.auc import roc_auc

    whole = Scorer(tmp_path / "onnx").score(raw_from_table(held, preprocessing(member.schema)))
    assert math.isclose(roc_auc(y, whole[:, 1]), recorded["roc_auc"], abs_tol=1e-6)

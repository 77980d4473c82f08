"""`flnode schema infer | merge`, the schema's range / normalize / std-0 keys, and
the examples in network_configs/examples/ kept in step with the real loaders."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gossip.errors import LocalError
from node.cli import main
from node.data.encode import encode
from node.data.schema import FeatureSchema
from tests.helpers import SCHEMA

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "network_configs" / "examples"


def member_table(seed: int, regions: list[str], labels: list[str], rows: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.integers(18, 90, rows),
        "balance": rng.normal(1234.5678, 321.0, rows).round(4),
        "edge": np.full(rows, 7.25),  # constant, like digits' edge pixels
        "region": rng.choice(regions, rows),
        "y": rng.choice(labels, rows),
    })


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def fill_ranges(text: str, ranges: dict[str, str]) -> str:
    """Replace each named column's range placeholder, as an operator would by hand."""
    for name, value in ranges.items():
        text, n = re.subn(rf'(name = "{name}"\nkind = "numeric"\n(?:#.*\n)*)range = \[.*\]',
                          rf"\g<1>range = {value}", text)
        assert n == 1, name
    return text


# --- infer -----------------------------------------------------------------------

def test_infer_drafts_kinds_categories_and_classes_and_releases_no_statistic(tmp_path):
    df = member_table(0, ["north", "south", 'we"st'], ["no", "yes"])
    df.to_csv(tmp_path / "bank-0.csv", index=False)
    out = tmp_path / "draft.toml"
    cmd = [sys.executable, "-m", "node.cli", "schema", "infer", "bank-0.csv", "--label", "y",
           "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert p.stdout == text  # prints exactly what it writes
    assert "releases which values exist" in p.stderr and "'edge'" in p.stderr

    doc = tomllib.loads(text)
    assert doc["label"] == "y" and doc["classes"] == ["no", "yes"]
    assert doc["normalize"] == "federated"
    cols = {c["name"]: c for c in doc["columns"]}
    assert list(cols) == ["age", "balance", "edge", "region"]
    assert cols["region"] == {"name": "region", "kind": "categorical",
                              "vocabulary": ["north", "south", 'we"st']}
    for name in ("age", "balance", "edge"):
        assert cols[name] == {"name": name, "kind": "numeric",
                              "range": ["REQUIRED_MIN", "REQUIRED_MAX"]}
    # The constant column is kept and marked (a comment inside its table).
    edge_table = text.split('name = "edge"')[0].rsplit("[[columns]]", 1)[1]
    assert "constant" in edge_table
    # No number read from the rows' distribution is in the draft.
    for value in [df["edge"].iloc[0], *df["age"].agg(["min", "max", "mean", "std"]),
                  *df["balance"].agg(["min", "max", "mean", "std"])]:
        for shown in {f"{value:g}", repr(float(value)), str(value)}:
            assert shown not in text, shown

    # The draft is refused until the ranges are filled, naming the column ...
    with pytest.raises(LocalError, match="column 'age': range is still the draft's placeholder"):
        FeatureSchema.from_dict(doc, "draft.toml")
    # ... and once filled it is a schema: the constant column encodes as 0 (std 0).
    filled = fill_ranges(text, {"age": "[0, 120]", "balance": "[0, 10000]",
                                "edge": "[0, 10]"})
    schema = FeatureSchema.from_dict(tomllib.loads(filled), "filled.toml")
    with pytest.raises(LocalError, match="'age'.*federated.*not known yet"):
        encode(df, schema, "bank-0.csv")
    agreed = schema.with_stats({"age": (50.0, 20.0), "balance": (1200.0, 300.0),
                                "edge": (7.25, 0.0)})
    X, y = encode(df, agreed, "bank-0.csv")
    assert X.shape == (60, 3 + 3) and np.all(X[:, 2] == 0) and set(y) <= {0, 1}

    # --out refuses to replace a file without --force, and writes with it.
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert again.stdout == ""
    forced = subprocess.run(cmd + ["--force"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert forced.returncode == 0 and out.read_text() == text


def test_infer_reads_csv_and_parquet_together_and_takes_categorical_and_drop(tmp_path, capsys):
    a = member_table(1, ["north"], ["no"])
    a["id"] = np.arange(len(a))
    a.to_csv(tmp_path / "a.csv", index=False)
    b = member_table(2, ["east"], ["no"])
    b["id"] = np.arange(len(b)) + 1000
    b.to_parquet(tmp_path / "b.parquet")
    rc, out, err = run_cli(capsys, "schema", "infer", str(tmp_path / "a.csv"),
                           str(tmp_path / "b.parquet"), "--label", "y", "--categorical", "age",
                           "--drop", "id", "--normalize", "declared")
    assert rc == 0, err
    doc = tomllib.loads(out)
    cols = {c["name"]: c for c in doc["columns"]}
    assert "id" not in cols and doc["classes"] == ["no"] and doc["normalize"] == "declared"
    assert cols["age"]["kind"] == "categorical"
    assert cols["age"]["vocabulary"] == sorted({str(v) for v in pd.concat([a, b])["age"]})
    assert cols["region"]["vocabulary"] == ["east", "north"]
    assert cols["balance"] == {"name": "balance", "kind": "numeric", "mean": "REQUIRED",
                               "std": "REQUIRED"}
    assert "one class" in err
    with pytest.raises(LocalError, match="column 'balance': mean and std are still"):
        FeatureSchema.from_dict(doc | {"classes": ["no", "yes"]}, "d")


@pytest.mark.parametrize("setup, argv, message", [
    (lambda d: d, ["--label", "nope"], r"--label 'nope': no such column in .*a\.csv"),
    (lambda d: d.drop(columns=["edge"]), ["--label", "y"],
     r"b\.csv: no column\(s\) \['edge'\] \(.*a\.csv has them\)"),
    (lambda d: d.assign(balance=d["balance"].astype(object).where(d.index != 3, "unknown")),
     ["--label", "y"], r"b\.csv: column 'balance': numbers, except 1 cell\(s\) such as 'unknown'"),
    (lambda d: d.assign(region=[f"r{i}" for i in range(len(d))]).pipe(
        lambda x: pd.concat([x] * 20, ignore_index=True).assign(
            region=[f"r{i}" for i in range(len(x) * 20)])),
     ["--label", "y"], r"column 'region': more than 1000 distinct values"),
    (lambda d: d, ["--label", "y", "--drop", "y"], r"--drop 'y': that is the label column"),
])
def test_infer_errors_name_the_file_and_column(tmp_path, capsys, setup, argv, message):
    member_table(3, ["north"], ["no", "yes"]).to_csv(tmp_path / "a.csv", index=False)
    setup(member_table(4, ["north"], ["no", "yes"])).to_csv(tmp_path / "b.csv", index=False)
    rc, out, err = run_cli(capsys, "schema", "infer", str(tmp_path / "a.csv"),
                           str(tmp_path / "b.csv"), *argv)
    assert rc == 2 and out == ""
    assert re.search(message, err), err


# --- merge -----------------------------------------------------------------------

def draft(tmp_path: Path, capsys, name: str, df: pd.DataFrame, *extra: str) -> Path:
    df.to_csv(tmp_path / f"{name}.csv", index=False)
    out = tmp_path / f"{name}.toml"
    rc, _, err = run_cli(capsys, "schema", "infer", str(tmp_path / f"{name}.csv"), "--label", "y",
                         "--out", str(out), *extra)
    assert rc == 0, err
    return out


def test_merge_unions_categories_and_classes_and_ranges(tmp_path, capsys):
    a = draft(tmp_path, capsys, "a", member_table(5, ["south", "north"], ["no"]))
    b = draft(tmp_path, capsys, "b", member_table(6, ["east"], ["yes", "maybe"]))
    out = tmp_path / "schema.toml"
    rc, text, err = run_cli(capsys, "schema", "merge", str(a), str(b), "--out", str(out))
    assert rc == 0, err
    assert out.read_text() == text
    doc = tomllib.loads(text)
    assert doc["classes"] == ["maybe", "no", "yes"]
    assert {c["name"]: c.get("vocabulary") for c in doc["columns"]}["region"] == \
        ["east", "north", "south"]
    assert "still to fill" in err and "'age'" in err
    # Same drafts in the other order: the same schema (sorted unions).
    rc, text_ba, _ = run_cli(capsys, "schema", "merge", str(b), str(a), "--out",
                             str(tmp_path / "ba.toml"))
    assert rc == 0 and tomllib.loads(text_ba) == doc

    # Ranges filled by both members: different ones are unioned, and said so.
    fa, fb = tmp_path / "fa.toml", tmp_path / "fb.toml"
    fa.write_text(fill_ranges(a.read_text(), {"age": "[18, 100]", "balance": "[0, 5000]",
                                              "edge": "[0, 10]"}))
    fb.write_text(fill_ranges(b.read_text(), {"age": "[0, 120]", "balance": "[0, 5000]",
                                              "edge": "[0, 10]"}))
    rc, text, err = run_cli(capsys, "schema", "merge", str(fa), str(fb), "--out",
                            str(tmp_path / "filled.toml"))
    assert rc == 0, err
    ranges = {c["name"]: c.get("range") for c in tomllib.loads(text)["columns"]}
    assert ranges == {"age": [0, 120], "balance": [0, 5000], "edge": [0, 10], "region": None}
    assert re.search(r"column 'age': declared ranges differ .*unioned to \[0, 120\]", err)
    assert "complete" in err
    FeatureSchema.from_dict(tomllib.loads(text), "filled.toml")  # loads as a schema
    rc, _, err = run_cli(capsys, "schema", "merge", str(fa), str(fb), "--out",
                         str(tmp_path / "filled.toml"))
    assert rc == 2 and "exists; pass --force" in err


def test_merge_conflicts_name_the_column_and_file(tmp_path, capsys):
    base = member_table(7, ["north"], ["no", "yes"])
    a = draft(tmp_path, capsys, "a", base)
    cases = {
        "missing": (draft(tmp_path, capsys, "missing", base.drop(columns=["edge"])),
                    r"missing\.toml: no column 'edge' \(.*a\.toml has it\)"),
        "extra": (draft(tmp_path, capsys, "extra", base.assign(more=1.0)),
                  r"extra\.toml: column 'more' is not in .*a\.toml"),
        "kind": (draft(tmp_path, capsys, "kind", base, "--categorical", "age"),
                 r"column 'age': the drafts disagree on its kind \(numeric in .*a\.toml, "
                 r"categorical in .*kind\.toml\)"),
        "normalize": (draft(tmp_path, capsys, "declared", base, "--normalize", "declared"),
                      r"normalize: .*a\.toml says 'federated', .*declared\.toml says 'declared'"),
        "label": (tmp_path / "label.toml", r"label: .*a\.toml says 'y', .*label\.toml says 'z'"),
    }
    (tmp_path / "label.toml").write_text(a.read_text().replace('label = "y"', 'label = "z"'))
    for name, (other, message) in cases.items():
        rc, out, err = run_cli(capsys, "schema", "merge", str(a), str(other), "--out",
                               str(tmp_path / f"out-{name}.toml"))
        assert rc == 2 and out == "", name
        assert re.search(message, err), (name, err)
        assert not (tmp_path / f"out-{name}.toml").exists()

    # Declared means are one consortium constant: different ones are refused.
    d1 = tmp_path / "declared.toml"
    d2 = tmp_path / "declared2.toml"
    t = d1.read_text().replace('mean = "REQUIRED"', "mean = 1.0").replace(
        'std = "REQUIRED"', "std = 0.0")
    d1.write_text(t)
    d2.write_text(t.replace("mean = 1.0", "mean = 2.0", 1))
    rc, _, err = run_cli(capsys, "schema", "merge", str(d1), str(d2), "--out",
                         str(tmp_path / "m.toml"))
    assert rc == 2 and re.search(r"column 'age': declared mean differs \(.*declared\.toml 1, "
                                 r".*declared2\.toml 2\)", err), err
    # A garbled draft names its file.
    (tmp_path / "bad.toml").write_text("label = \n")
    rc, _, err = run_cli(capsys, "schema", "merge", str(a), str(tmp_path / "bad.toml"), "--out",
                         str(tmp_path / "m.toml"))
    assert rc == 2 and "bad.toml: cannot read a schema draft" in err


# --- the schema's keys -----------------------------------------------------------

def test_old_schemas_keep_their_dict_and_std_zero_and_ranges_encode():
    assert FeatureSchema.from_dict(SCHEMA, "s").to_dict() == SCHEMA  # consortium ids unchanged
    doc = {"label": "y", "classes": ["a", "b"], "columns": [
        {"name": "c", "kind": "numeric", "mean": 5.0, "std": 0.0},
        {"name": "x", "kind": "numeric", "mean": 0.0, "std": 2.0, "range": [-1.0, 1.0]}]}
    schema = FeatureSchema.from_dict(doc, "s")
    assert schema.to_dict() == doc
    X, _ = encode(pd.DataFrame({"c": [5.0, 5.0, 6.0], "x": [-4.0, 0.5, 9.0], "y": ["a", "b", "a"]}),
                  schema)
    np.testing.assert_array_equal(X, [[0, -0.5], [0, 0.25], [0, 0.5]])  # x clipped to [-1, 1]


@pytest.mark.parametrize("column, message", [
    ({"kind": "numeric", "mean": 0.0, "std": -1.0}, r"columns\[0\]\.std"),
    ({"kind": "numeric", "mean": 0.0, "std": 1.0, "range": [2.0, 1.0]}, "min <= max"),
    ({"kind": "numeric", "mean": 5.0, "std": 1.0, "range": [0.0, 1.0]}, "outside its range"),
    ({"kind": "numeric", "mean": 0.0}, "needs mean and std"),
    ({"kind": "categorical", "vocabulary": ["a"], "range": [0.0, 1.0]}, "belong to numeric"),
    ({"kind": "categorical", "vocabulary": ["a", "a"]}, "lists a value twice"),
])
def test_bad_schema_keys_are_refused_naming_the_column(column, message):
    with pytest.raises(LocalError, match=message):
        FeatureSchema.from_dict({"label": "y", "classes": ["a", "b"],
                                 "columns": [{"name": "c", **column}]}, "s.toml")
    federated = {"label": "y", "classes": ["a", "b"], "normalize": "federated",
                 "columns": [{"name": "c", "kind": "numeric"}]}
    with pytest.raises(LocalError, match="column 'c' needs range"):
        FeatureSchema.from_dict(federated, "s.toml")


# --- the examples ----------------------------------------------------------------

def test_example_schema_loads():
    doc = tomllib.loads((EXAMPLES / "schema.toml").read_text())
    schema = FeatureSchema.from_dict(doc, "schema.toml")
    assert schema.mode == "federated" and all(
        c.range is not None for c in schema.columns if c.kind == "numeric")


def test_example_node_config_has_every_key_commented_and_loads(tmp_path):
    from pydantic import BaseModel

    from node.runtime.config import NodeConfig, load_config

    path = EXAMPLES / "node.toml"
    cfg = load_config(path)
    lines = path.read_text().splitlines()

    # Every key of NodeConfig, as "section.key": set (active) or commented out.
    def fields(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
        out = {}
        for name, f in model.model_fields.items():
            sub = [t for t in (getattr(f.annotation, "__args__", None) or (f.annotation,))
                   if isinstance(t, type) and issubclass(t, BaseModel)]
            if sub:
                out |= fields(sub[0], f"{prefix}{name}.")
            else:
                out[prefix + name] = f
        return out

    expected = fields(NodeConfig)
    section, seen, commented = "", {}, {}
    for i, line in enumerate(lines):
        head = re.fullmatch(r"#?\s*\[([a-z_.]+)\]", line.strip())
        if head:
            section = head[1] + "."
            continue
        key = re.fullmatch(r"(#\s*)?([a-z_]+) = (.+)", line.strip())
        if key:
            name = section + key[2]
            (commented if key[1] else seen)[name] = i
            before = lines[i - 1].strip()
            assert before.startswith("#") and not re.fullmatch(r"#\s*[a-z_]+ = .+", before) \
                or name in ("faults.jitter_ms",), f"{name}: no comment above it"
    assert set(seen) | set(commented) == set(expected), \
        f"missing: {set(expected) - set(seen) - set(commented)}; " \
        f"unknown: {(set(seen) | set(commented)) - set(expected)}"

    # Active keys hold the defaults, except the choices this example makes on purpose.
    chosen = {"state_dir", "identity.key", "consortium.path", "data.path", "privacy.mode",
              "privacy.epsilon"}
    doc = tomllib.loads(path.read_text())
    for name in set(seen) - chosen:
        value = doc
        for part in name.split("."):
            value = value[part]
        assert value == expected[name].default, f"{name} = {value!r}: not the default"
    assert cfg.privacy.mode == "record" and cfg.privacy.epsilon == 3.0

    # Each commented-out key, uncommented (with its section if that is commented out too),
    # passes the real loader and changes the config.
    (tmp_path / "node.toml").write_text(path.read_text())
    same = load_config(tmp_path / "node.toml")
    for name, i in commented.items():
        text = list(lines)
        text[i] = text[i].lstrip("# ")
        sec = name.rsplit(".", 1)[0]
        for j, line in enumerate(lines):
            if line.strip() in (f"# [{sec}]", f"#[{sec}]"):
                text[j] = f"[{sec}]"
            if sec == "attack" and re.fullmatch(r"#\s*kind = .+", line):
                text[j] = line.lstrip("# ")
            if name == "privacy.sigma" and line.startswith("epsilon ="):
                text[j] = ""
            # A kind's own options need that kind (node/learn/kinds.py refuses them on mlp).
            kind = {"model.depth": "deep_mlp", "model.norm": "deep_mlp", "model.groups":
                    "deep_mlp", "model.dropout": "deep_mlp", "model.blocks": "res_mlp",
                    "model.options": "plugins.gated_mlp:build"}.get(name)
            if kind and line.startswith("kind = "):
                text[j] = f'kind = "{kind}"'
            if name == "model.options" and line.startswith("hidden = "):
                text[j] = ""  # a plug-in takes its options from [model.options] only
            if name == "model.groups" and re.fullmatch(r'#\s*norm = .+', line):
                text[j] = 'norm = "group"'
        variant = tmp_path / f"node-{name}.toml"
        variant.write_text("\n".join(text))
        assert load_config(variant) != same, name


def test_consortium_template_commands_run_and_show_the_rules_they_write(tmp_path, capsys,
                                                                          monkeypatch):
    from gossip.membership import load_consortium

    md = (EXAMPLES / "consortium-template.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", md, re.S)
    build = next(b for lang, b in blocks if lang == "sh" and "consortium build" in b)
    rules_shown = tomllib.loads(next(b for lang, b in blocks if lang == "toml"))
    argv = shlex.split(build.replace("\\\n", " "))
    assert argv[:3] == ["flnode", "consortium", "build"]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "schema.toml").write_text((EXAMPLES / "schema.toml").read_text())
    names = [re.search(r"keys/(.+)\.pub", a)[1] for a in argv if a.startswith("keys/")]
    assert names == [f"bank-{i}" for i in range(4)]
    for n in names:
        assert main(["keygen", "--out", "keys", "--name", n]) == 0
    assert main(argv[1:]) == 0, capsys.readouterr().err
    written = tomllib.loads((tmp_path / "consortium.toml").read_text())
    assert written["rules"] == rules_shown["rules"]
    c = load_consortium(tmp_path / "consortium.toml")
    assert [m.name for m in c.members] == names
    FeatureSchema.from_dict(c.schema, "consortium.toml")
    # The merge and infer commands it shows are the real flags.
    for line in re.findall(r"^flnode schema .*$", md, re.M):
        sub = shlex.split(line.split("#")[0].rstrip(" \\"))[1:3]
        with pytest.raises(SystemExit) as exc:
            main([*sub, "--help"])
        assert exc.value.code == 0

"""scripts/bench_own_tables.py's documented path (schema infer per member, schema merge
--ranges-from, the simulator over the real node code) on breast_cancer with empty cells:
the accuracy figures take minutes (docs/results/simulate.md); this checks the fast part, that
the consortium's stated rule decides at start, before anything is charged."""

from __future__ import annotations

import tomllib

from scripts.bench_own_tables import documented_path, tables


def test_three_small_members_are_refused_at_start_naming_the_columns_and_the_fix(tmp_path):
    res = documented_path("breast_cancer", 3, 0, 2, 3.0, "federated-refuse", tmp_path)
    text = res["refused"]
    assert res["fallback"] == "refuse"
    for want in ("'mean radius'", "and 24 more", "Nothing was released or charged",
                 "normalize = \"range\"", "normalize_noise = ", "training rows in all",
                 "normalize_rows = N"):
        assert want in text, (want, text)
    # what the documented path wrote on the way: drafts with the missing policy for the
    # emptied columns, ranges from the public table, the fallback rule
    schema = tomllib.loads((tmp_path / "schema.toml").read_text())
    cols = {c["name"]: c for c in schema["columns"]}
    assert sum(c.get("missing") == "drop_row" for c in cols.values()) == 3
    assert cols["mean area"]["range"] == [140.0, 2600.0]
    assert cols["clinic"]["kind"] == "categorical"
    assert not (tmp_path / "run" / "state").exists() or not any(
        (tmp_path / "run" / "state").iterdir())


def test_the_member_files_hold_raw_values_and_a_few_empty_cells():
    parts, test, reference, label = tables("breast_cancer", 3, 0)
    assert [len(p) for p in parts] == [65, 130, 260] and len(test) == 114
    assert all(int(p.isna().sum().sum()) >= 3 for p in parts)
    assert int(test.isna().sum().sum()) == 0 and label == "malignant"
    assert parts[2]["mean area"].max() > 500  # raw, not standardized

"""Missing values as a schema policy (drop_row, a declared fill, an indicator), applied
identically on a node's path (read_table) and the operator tools' (pandas), by encode
and by the federated statistics; schema infer/merge write and agree the policy, and
take ranges from a public reference; the local range check."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest

from gossip.errors import LocalError
from node.cli import main
from node.data.drafting import infer, merge, public_ranges, render
from node.data.encode import apply_missing, encode
from node.data.schema import FeatureSchema
from node.data.table import read_table
from node.learn.normalize import member_stats, range_report


def schema(**extra) -> FeatureSchema:
    doc = {"label": "y", "classes": ["0", "1"], "normalize": "range", "columns": [
        {"name": "a", "kind": "numeric", "range": [0.0, 10.0]},
        {"name": "b", "kind": "numeric", "range": [-5.0, 5.0]},
        {"name": "c", "kind": "categorical", "vocabulary": ["p", "q", "unknown"]}]}
    for name, policy in extra.pop("columns", {}).items():
        next(c for c in doc["columns"] if c["name"] == name)["missing"] = policy
    return FeatureSchema.from_dict({**doc, **extra}, "test")


CSV = "a,b,c,y\n1,2,p,0\n,3,q,1\n4,,p,0\n5,-1,,1\n9,4,q,0\n"


def both(tmp_path, s: FeatureSchema):
    path = tmp_path / "rows.csv"
    path.write_text(CSV)
    via_node = encode(read_table(path), s, str(path))
    via_pandas = encode(pd.read_csv(path), s, "frame")
    np.testing.assert_array_equal(via_node[0], via_pandas[0])
    np.testing.assert_array_equal(via_node[1], via_pandas[1])
    return via_node


def test_without_a_policy_an_empty_cell_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(CSV)
    with pytest.raises(LocalError, match=r"column 'a': 1 row\(s\) are empty.*line 3.*missing"):
        encode(read_table(path), schema(), str(path))


def test_drop_row_fill_and_indicator_encode_the_same_on_both_paths(tmp_path):
    s = schema(missing="drop_row")
    X, y = both(tmp_path, s)
    assert X.shape == (2, 2 + 3) and list(y) == [0, 0]  # rows 1 and 5 have no empty cell
    np.testing.assert_allclose(X[:, 0], [(1 - 5) / 5, (9 - 5) / 5])  # range scaling
    s = schema(columns={"a": {"fill": 5.0, "indicator": True}, "b": {"fill": 0.0},
                        "c": {"fill": "unknown"}})
    assert s.n_features == 2 + 1 + 3
    X, y = both(tmp_path, s)
    assert X.shape == (5, 6) and list(y) == [0, 1, 0, 1, 0]
    np.testing.assert_array_equal(X[:, 1], [0, 1, 0, 0, 0])  # a's indicator
    assert X[1, 0] == 0.0  # filled with 5: the middle of [0, 10]
    assert X[2, 2] == 0.0  # b filled with 0
    np.testing.assert_array_equal(X[3, 3:], [0, 0, 1])  # c -> "unknown"
    # a column-level policy wins over the schema-wide one
    s = schema(missing="drop_row", columns={"a": {"fill": 5.0}})
    X, _ = both(tmp_path, s)
    assert X.shape[0] == 3  # only rows with an empty b or c dropped


def test_the_statistics_see_exactly_the_rows_encode_sees(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(CSV)
    doc = schema(missing="drop_row").to_dict()
    s = FeatureSchema.from_dict({**doc, "normalize": "federated"}, "t")
    stats = member_stats(read_table(path), s, "rows")
    assert stats.rows == 2  # the count released is the count after dropping
    # centred: a = 1, 9 in [0, 10] and b = 2, 4 in [-5, 5] -> v = -0.4, 0.4 and 0.2, 0.4
    np.testing.assert_allclose(stats.sum, [0.0, 0.6], atol=1e-12)
    kept, masks = apply_missing(read_table(path), s)
    assert len(kept) == 2 and masks == {}


@pytest.mark.parametrize("policy,message", [
    ({"a": {"fill": 11.0}}, "fill 11 lies outside its range"),
    ({"c": {"fill": "r"}}, "not one of its categories"),
    ({"c": {"fill": "p", "indicator": True}}, "indicator = true is for numeric"),
    ({"a": {"fill": "x"}}, "must be a finite number"),
    ({"a": "drop"}, "missing"),
])
def test_a_policy_that_does_not_fit_is_refused_naming_the_column(policy, message):
    with pytest.raises(LocalError, match=message):
        schema(columns=policy)


def test_a_schema_wide_fill_that_does_not_fit_a_column_is_refused():
    with pytest.raises(LocalError, match="schema-wide missing, categorical column 'c'"):
        schema(missing={"fill": 1.0})


def test_infer_writes_the_policy_and_merge_agrees_it_and_takes_public_ranges(tmp_path,
                                                                              capsys):
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text(CSV)
    b.write_text("a,b,c,y\n1,2,p,0\n2,3,q,1\n")  # no empty cell: states no policy
    for f in (a, b):
        draft = infer([f], "y")
        text = render(draft)
        doc = tomllib.loads(text)
        assert doc["normalize"] == "federated" and doc["normalize_fallback"] == "range"
        (tmp_path / f"{f.stem}.toml").write_text(text)
    assert "\nmissing = \"drop_row\"\n" in (tmp_path / "a.toml").read_text()
    assert "empty cells in these files" in (tmp_path / "a.toml").read_text()
    assert "missing" not in (tmp_path / "b.toml").read_text()
    public = tmp_path / "public.csv"
    public.write_text("a,b\n0.0123,-4.56\n9.87,3.21\n")
    rc = main(["schema", "merge", str(tmp_path / "a.toml"), str(tmp_path / "b.toml"),
               "--ranges-from", str(public), "--out", str(tmp_path / "schema.toml")])
    err = capsys.readouterr().err
    assert rc == 0 and "from " + str(public) in err and "never a member's rows" in err
    merged = FeatureSchema.from_dict(tomllib.loads((tmp_path / "schema.toml").read_text()), "m")
    cols = {c.name: c for c in merged.columns}
    assert cols["a"].range == (0.012, 9.9) and cols["b"].range == (-4.6, 3.3)
    assert all(cols[n].missing == "drop_row" for n in "abc")
    # two members that state different policies for one column: refused, naming both
    (tmp_path / "b.toml").write_text((tmp_path / "a.toml").read_text().replace(
        '\nmissing = "drop_row"\n', '\nmissing = { fill = 1.0 }\n', 1))
    with pytest.raises(LocalError, match="column 'a': missing: the drafts differ"):
        merge([tmp_path / "a.toml", tmp_path / "b.toml"])


def test_public_ranges_round_outward():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.csv"
        p.write_text("x,z\n143.5,0\n2501,0.04974\n")
        assert public_ranges(p, ["x", "z", "w"]) == {"x": (140.0, 2600.0), "z": (0.0, 0.05)}


def test_the_local_range_check_says_how_much_is_clipped_and_releases_nothing(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,c,y\n" + "".join(f"{v},0,p,0\n" for v in
                                          [0.1, 0.2, 0.3, 12, 0.15] * 10))
    s = schema()
    lines = range_report(read_table(path), s, "bank-a")
    assert any("'a': 20.0 % of the rows lie outside the declared range [0, 10]" in x
               and "0.0 % below, 20.0 % above" in x for x in lines)
    assert any("'b': its rows spread over about 0.0 %" in x for x in lines)

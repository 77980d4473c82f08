"""The fast paths of `flnode predict` (node/ops/predict.py) score as the plain ones did.

The CSV reader parses the schema's numeric columns as numbers itself and falls back to
reading text, for the rest of the file, at the first cell it cannot parse; the CLI
scores without importing pandas. The ONNX graph's parity with the node is
tests/test_export.py's; scripts/bench_predict.py measures the speed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gossip.errors import LocalError
from node.ops.predict import _chunks, score_table
from tests.test_export import _sha, mixed_exports, mixed_model, mixed_rows  # noqa: F401

ROWS = 130_000  # ~9 MB of CSV: blocks of CSV_BLOCK_BYTES (1 MB), the bad cell in the 7th


@pytest.fixture()
def model(mixed_exports, mixed_model, tmp_path):  # noqa: F811 - the fixtures above
    _, spec = mixed_model
    where = tmp_path / "model"
    shutil.copytree(mixed_exports / "onnx", where)
    (where / "manifest.json").write_text(json.dumps({"format": "onnx", "schema": spec, "files": [
        {"path": "model.onnx", "sha256": _sha(where / "model.onnx")}]}))
    return where


def test_a_cell_the_number_reader_refuses_mid_file_scores_as_the_text_path(model, tmp_path):
    df = mixed_rows(ROWS, seed=4)
    df.loc[::11, "amount"] = np.nan  # empty cells: filled
    text = df.astype({"age": object, "plain": object})
    text.loc[100_000, "age"] = "True"  # the node reads True as 1
    text.loc[120_000, "plain"] = " 3"  # Python's float reads it; pyarrow's cast does not
    text.to_csv(tmp_path / "in.csv", index=False)
    kinds = [str(b.schema.field("age").type) for b in _chunks(
        tmp_path / "in.csv", 65536, frozenset({"amount", "age", "score", "flat", "plain"}))[0]]
    assert kinds[0] == "double" and kinds[-1] == "string", kinds  # the fallback, mid-file
    nums = df.copy()
    nums.loc[100_000, "age"], nums.loc[120_000, "plain"] = 1.0, 3.0
    nums.to_parquet(tmp_path / "in.parquet", index=False)  # the same numbers, typed
    a = score_table(model, tmp_path / "in.csv", tmp_path / "a.csv")
    b = score_table(model, tmp_path / "in.parquet", tmp_path / "b.csv")
    assert (a.rows, a.empty) == (b.rows, b.empty) == (ROWS, 0)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    text.loc[110_000, "age"] = "forty"  # after the fallback: still named, at its row
    text.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LocalError, match=r"column 'age': expected a number .* found 'forty' "
                                         r"at row 110001"):
        score_table(model, tmp_path / "bad.csv", tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_predict_imports_no_pandas(model, tmp_path):
    """pandas costs the CLI 0.2-0.35 s of start; scoring a CSV needs none of it."""
    from tests.test_lean import imported_by

    df = mixed_rows(300)
    df.loc[::7, "plain"] = np.nan  # empty, no policy: a row scored empty (nulls written)
    df.loc[::5, "tier"] = "9"  # unseen
    df.to_csv(tmp_path / "in.csv", index=False)
    r, mods = imported_by("predict", "--model", str(model), "--data", str(tmp_path / "in.csv"),
                          "--out", str(tmp_path / "out.csv"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pandas" not in mods


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_the_empty_rows_and_labels_by_column_are_numpys(classes):
    """empty_rows and _argmax, a class column at a time, give what numpy's axis-1
    reductions give (they were 25x and 10x slower): ties to the first maximum, NaN rows."""
    from node.ops.predict import _argmax, empty_rows

    rng = np.random.default_rng(classes)
    probs = rng.integers(0, 4, size=(5000, classes)).astype(np.float32)  # many ties
    probs[rng.random(5000) < 0.1] = np.nan  # rows scored empty: every class NaN
    probs[rng.random(5000) < 0.02, classes - 1] = np.nan  # one class NaN: empty too
    empty = np.isnan(probs).any(axis=1)
    assert np.array_equal(empty_rows(probs), empty)
    assert np.array_equal(_argmax(probs)[~empty], np.argmax(probs, axis=1)[~empty])

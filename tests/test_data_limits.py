"""A member's CSV file past the node's size limit is refused before it is read, naming the
file and the limit (its reader holds ~17x the file: node/data/table.py CSV_MAX_FILE_BYTES);
the Parquet reader's limits are tested in tests/test_parquet_child.py."""

from __future__ import annotations

import pytest

from gossip.errors import LocalError
from node.data import table as T
from node.data.table import read_table


def test_a_csv_file_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.csv"
    path.write_text("a,y\n" + "1.0,No\n" * 40)  # 284 bytes
    monkeypatch.setattr(T, "CSV_MAX_FILE_BYTES", 283)
    read = []
    monkeypatch.setattr(T.Path, "read_bytes", lambda self: read.append(self) or b"")
    with pytest.raises(LocalError, match=r"big\.csv: 284 bytes, more than the 283 a node "
                                         r"reads from one CSV file .* as a \.parquet file"):
        read_table(path)
    assert read == []
    monkeypatch.undo()
    monkeypatch.setattr(T, "CSV_MAX_FILE_BYTES", 284)
    assert len(read_table(path)) == 40


def test_a_csv_header_of_many_columns_is_checked_in_linear_time(tmp_path):
    """The header's duplicate check was quadratic (list.count per name): a 2 MB header
    line of 200,000 names took minutes before a single row was read. Now a hostile wide
    header is one pass; the duplicate is still named."""
    import threading

    header = [f"c{i}" for i in range(200_000)] + ["c7"]
    path = tmp_path / "wide.csv"
    path.write_text(",".join(header) + "\n")
    got: list = []

    def read():
        try:
            read_table(path)
        except LocalError as exc:
            got.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)  # linear: well under a second here; quadratic: ~6 minutes
    assert not reader.is_alive(), "the header check of 200,001 names did not end in 60 s"
    assert got and "['c7'] named twice" in got[0]

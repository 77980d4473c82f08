"""A member's Parquet file is read by a short-lived child process (node/data/parquet_child.py),
so `flnode run` never holds pyarrow: the rows come back as pandas reads them, and a hostile
file (garbage, truncated, a row-count lie, a decode bomb, a slow read) ends in a LocalError
naming the file and the reason while the calling process goes on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gossip.errors import LocalError
from node.data import table as T
from node.data.table import read_table

ROOT = Path(__file__).resolve().parent.parent


def test_parquet_rows_come_back_typed_as_pandas_reads_them(tmp_path):
    """Every kind a column can take (int, int with nulls, float64/32, bool with nulls,
    strings with nulls, a pandas categorical, other types as text), with a pandas index."""
    import pandas as pd

    df = pd.DataFrame({
        "i": [1, -2, 3, 4], "j": pd.array([1, None, 3, 4], dtype="Int64"),
        "f": [0.5, np.nan, 2.0, 1e300], "g": np.array([1.5, 2, 3, np.nan], dtype=np.float32),
        "b": pd.array([True, None, False, True], dtype="boolean"),
        "s": ["a", None, "b", "a"], "c": pd.Categorical(["x", "y", None, "x"]),
        "d": pd.to_datetime(["2020-01-01", "2021-02-03", None, "2022-03-04"]).date,
    }, index=[10, 20, 30, 40])
    path = tmp_path / "m.parquet"
    df.to_parquet(path)
    ref, table = pd.read_parquet(path), read_table(path)
    assert table.columns == list(ref.columns) and len(table) == 4
    assert table.origin.tolist() == [1, 2, 3, 4] and table.unit == "row"
    for c in ref.columns:
        if c != "j":  # pandas' nullable Int64 shows "1"; a node reads int with nulls as float
            assert table.texts(c) == [v if isinstance(v, str) else None
                                      for v in ref[c].astype(str).tolist()], c
        if c != "d":
            assert np.array_equal(table.numbers(c), pd.to_numeric(ref[c], errors="coerce")
                                  .to_numpy(dtype=np.float64), equal_nan=True), c
    assert table.texts("j") == ["1.0", None, "3.0", "4.0"]
    assert table.empty("s").tolist() == [False, True, False, False]
    assert table.empty("b").tolist() == [False, True, False, False]


def test_a_value_repeated_on_every_row_is_held_once(tmp_path):
    """Strings stay dictionary-encoded from the file to the node: 4,000 rows of one 64 kB
    value are one Python str, not 256 MB of copies."""
    path = tmp_path / "rep.parquet"
    pq.write_table(pa.table({"s": pa.array(["v" * 65536] * 4000), "y": [0] * 4000}), path)
    texts = read_table(path).texts("s")
    assert len(texts) == 4000 and len({id(t) for t in texts}) == 1


def _bomb(path: Path, rows: int, refs: int) -> None:
    """A list column whose rows each hold `refs` references to one 1 MiB dictionary value:
    a ~50 kB file that decodes to rows x refs MiB."""
    value = pa.array([b"x" * (1 << 20)], pa.binary())
    leaf = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows * refs, dtype=np.int32)),
                                          value)
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * refs + 1, refs,
                                                        dtype=np.int32)), leaf)
    pq.write_table(pa.table({"y": pa.array(["No"] * rows), "v": lists}), path)


@pytest.mark.parametrize("make,limits,expected", [
    (lambda p: p.write_bytes(b"PAR1" + b"\x00garbage" * 100), {},
     r"garbage\.parquet: not a readable Parquet file"),
    (lambda p: p.write_bytes(b""), {}, r"garbage\.parquet: not a readable Parquet file"),
    ("truncated", {}, r"garbage\.parquet: not a readable Parquet file"),
    ("rows", {"PARQUET_MAX_ROWS": 100}, r"garbage\.parquet: 101 rows, more than the 100"),
    ("ints", {"PARQUET_OUTPUT_BYTES": 1 << 20},
     r"garbage\.parquet: its rows decode to more than the 1 MiB a node reads from one file"),
    ("bomb", {"PARQUET_MEMORY_BYTES": 1 << 30},
     r"garbage\.parquet: decoding it needs more than the 1024 MiB a Parquet read may use"),
    ("ints", {"PARQUET_TIMEOUT_S": 0.01}, r"garbage\.parquet: reading it took longer than"),
    ("ints", {"PARQUET_MAX_FILE_BYTES": 1000}, r"garbage\.parquet: \d+ bytes, more than the "
                                                r"1000 a node reads"),
])
def test_a_hostile_parquet_file_is_a_named_error_and_the_caller_goes_on(
        tmp_path, monkeypatch, make, limits, expected):
    path = tmp_path / "garbage.parquet"
    if make == "truncated":
        pq.write_table(pa.table({"a": np.arange(5000), "y": ["No"] * 5000}), path)
        path.write_bytes(path.read_bytes()[:-100])
    elif make == "rows":
        pq.write_table(pa.table({"a": np.arange(101)}), path)
    elif make == "ints":  # 8 MB of zeros: a few kB of run-length encoding in the file
        pq.write_table(pa.table({"a": np.zeros(1 << 20, dtype=np.int64)}), path)
    elif make == "bomb":  # 2 GiB decoded
        _bomb(path, 200, 10)
    else:
        make(path)
    for name, value in limits.items():
        monkeypatch.setattr(T, name, value)
    with pytest.raises(LocalError, match=expected):
        read_table(path)
    monkeypatch.undo()
    assert len(read_table(_sound(tmp_path))) == 3  # this process reads on


def test_distinct_text_past_the_header_limit_is_refused_repeated_text_is_not(
        tmp_path, monkeypatch):
    """Review s4 F1: a column of distinct short strings (an ID column) costs the node a
    Python str per row, ~4.5x the reader's output; the distinct values (the output's JSON
    header) have their own, smaller limit so the node's peak stays bounded. The same rows
    of one repeated value pass."""
    monkeypatch.setattr(T, "PARQUET_HEADER_BYTES", 4 << 10)
    ids, same = tmp_path / "ids.parquet", tmp_path / "same.parquet"
    pq.write_table(pa.table({"s": [f"{i:x}" for i in range(2000)]}), ids)
    pq.write_table(pa.table({"s": ["a"] * 2000}), same)
    with pytest.raises(LocalError, match=r"ids\.parquet: its text columns' distinct values "
                                         r"take \d+ bytes of JSON, more than the 4096 a node"):
        read_table(ids)
    assert read_table(same).texts("s") == ["a"] * 2000


def _sound(tmp_path: Path) -> Path:
    path = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    return path


def test_a_reader_output_that_lies_about_its_lengths_is_refused(tmp_path):
    """The node checks the child's output before allocating: a header whose buffer runs
    past the end of the output is refused, not read."""
    out = tmp_path / "rows.bin"
    header = b'{"rows": 1000000000, "columns": [{"name": "a", "kind": "int", "dtype": "<i8", ' \
             b'"values": [0, 8000000000]}]}'
    out.write_bytes(T._MAGIC + len(header).to_bytes(8, "little") + header + b"\x00" * 16)
    with pytest.raises(LocalError, match=r"m\.parquet: the Parquet reader's output is malformed"):
        T._load_rows(tmp_path / "m.parquet", out)


def test_reading_parquet_leaves_no_pyarrow_in_the_process(tmp_path):
    path = _sound(tmp_path)
    code = ("import sys; from node.data.table import read_table; "
            f"assert len(read_table({str(path)!r})) == 3; "
            "print(sorted({'pyarrow', 'pandas'} & {m.split('.')[0] for m in sys.modules}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("bad", [0, 1])
def test_one_reader_for_several_files_names_the_hostile_one(tmp_path, bad):
    """A node's training and evaluation files share one child (read_tables): an error
    names the file it is about, not its neighbour."""
    from node.data.table import read_tables

    paths = [tmp_path / "train.parquet", tmp_path / "eval.parquet"]
    for p in paths:
        pq.write_table(pa.table({"a": [1, 2, 3], "y": ["x", None, "z"]}), p)
    assert [len(t) for t in read_tables(paths)] == [3, 3]
    paths[bad].write_bytes(b"not parquet at all")
    with pytest.raises(LocalError, match=rf"{paths[bad].name}: not a readable Parquet file"):
        read_tables(paths)


def test_rows_kept_at_the_check_are_handed_once_to_the_same_unchanged_file(tmp_path,
                                                                           monkeypatch):
    """`flnode run` checks its files then its node reads them: the second read of an
    unchanged Parquet file takes the Table the check kept (no second child), once; a file
    changed in between is read again."""
    from node.data.table import read_tables

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    [checked] = read_tables([path], keep=True)
    children = []
    real = T._read_parquet
    monkeypatch.setattr(T, "_read_parquet", lambda ps: children.append(ps) or real(ps))
    assert read_table(path) is checked and children == []
    assert read_table(path) is not checked and len(children) == 1  # handed once only
    read_tables([path], keep=True)
    pq.write_table(pa.table({"a": [1, 2, 3, 4]}), path)  # changed after the check
    assert len(read_table(path)) == 4 and len(children) == 3
    assert T._KEPT == {}


def test_a_parquet_file_naming_a_column_twice_is_the_files_fault(tmp_path):
    """Parquet allows two columns of one name; the node's rows cannot hold them. The error
    names the file and the column, as the CSV reader does, not "the reader's output is
    malformed" (which blamed flnode)."""
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1, 2]), pa.array([3, 4]), pa.array([5, 6])],
                                        names=["a", "b", "a"]), path)
    with pytest.raises(LocalError, match=r"dup\.parquet: column\(s\) \['a'\] named twice"):
        read_table(path)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status and b"parquet_child.py" in cmd:
                out.append(int(entry.name))
    return out


def _gone(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="the reader's parent-death signal is Linux's")
def test_a_killed_node_leaves_no_parquet_reader_running(tmp_path, monkeypatch):
    """A node killed (SIGKILL, the OOM killer) while its child reads a file must take the
    child with it: an orphan read on for up to PARQUET_TIMEOUT_S with gigabytes of address
    space, beside the restarted node's own reader. The file here is a FIFO nobody writes
    (the child blocks opening it: a stalled mount). The reader's temp dir (up to
    PARQUET_OUTPUT_BYTES of partial rows) outlives the kill; the next read removes it
    (review s4 F2: a kill/restart loop filled /tmp)."""
    import os
    import signal
    import tempfile
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    fifo = tmp_path / "stalled.parquet"
    os.mkfifo(fifo)
    code = f"from node.data.table import read_table; read_table({str(fifo)!r})"
    node = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while not (kids := _children(node.pid)):
            assert node.poll() is None and time.monotonic() < end, "no reader started"
            time.sleep(0.05)
        node.kill()
        node.wait(timeout=30)
        end = time.monotonic() + 30
        while not all(_gone(k) for k in kids) and time.monotonic() < end:
            time.sleep(0.05)
        alive = [k for k in kids if not _gone(k)]
        for k in alive:
            os.kill(k, signal.SIGKILL)
        assert not alive, "the Parquet reader outlived the node that started it"
        left = [p.name for p in tmp.iterdir()]
        assert left, "no reader dir left by the kill: the test no longer kills mid-read"
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "ok.parquet")
        assert read_table(tmp_path / "ok.parquet").numbers("x").tolist() == [1.0, 2.0]
        assert list(tmp.iterdir()) == [], "the killed node's reader dir was left in the temp dir"
    finally:
        if node.poll() is None:
            node.kill()


def test_the_sweep_removes_only_a_dead_readers_own_dirs(tmp_path):
    """The sweep deletes only what is surely a dead reader's: a real directory, ours, named
    with a pid that is gone. Never a symlink's target, another user's dir, a live pid's dir
    or a name that is not exactly the reader's."""
    import os

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs

    def made(name, owner=None):
        d = tmp_path / name
        d.mkdir()
        (d / "rows-0.bin.part").write_bytes(b"x" * 100)
        if owner is not None:
            os.chown(d, owner, owner)
        return d

    stale = made(f"flnode-parquet-{gone.pid}-abc_123")
    target = made("not-ours")
    (tmp_path / f"flnode-parquet-{gone.pid}-link").symlink_to(target)
    live = made(f"flnode-parquet-{os.getppid()}-abc")
    odd = made(f"flnode-parquet-{gone.pid}-a.b")
    kept = [target, live, odd]
    if os.geteuid() == 0:  # only root can give a dir away
        kept.append(made(f"flnode-parquet-{gone.pid}-theirs", owner=12345))
    T._sweep_stale_dirs(tmp_path)
    assert not stale.exists()
    assert all((d / "rows-0.bin.part").exists() for d in kept)
    assert (tmp_path / f"flnode-parquet-{gone.pid}-link").is_symlink()

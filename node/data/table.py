"""Reading a member's file (CSV or Parquet) into a `Table`: the node's path, no pandas."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gossip.errors import LocalError

if TYPE_CHECKING:
    import pandas as pd


# --- reading a member's file (the node's path: no pandas) ------------------------------

# The cells pandas' read_csv takes as empty (its default na_values): a node reads a file
# as the operator tools (pandas) do, so a schema drafted from it fits it.
NA_CELLS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                      "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                      "nan", "null"})
_TRUE, _FALSE = frozenset({"True", "TRUE", "true"}), frozenset({"False", "FALSE", "false"})
_INT = re.compile(r"\s*[+-]?\d+\s*")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _number(cell: str) -> float:
    """A cell as a number the way pandas parses one, NaN if it is not one."""
    if "_" in cell:  # Python's float() takes 1_000; pandas does not
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return math.nan


class _Cells:
    """One column of a Table: `kind` "int" (int64, no empty cell), "float" (float64 or
    float32, NaN where empty), "bool" (`empty` marks the empty cells), "text" (str, None
    where empty) or "series" (a pandas Series: the simulators' and tests' DataFrames)."""

    __slots__ = ("kind", "values", "empty")

    def __init__(self, kind: str, values: Any, empty: np.ndarray | None = None) -> None:
        self.kind, self.values, self.empty = kind, values, empty

    def take(self, idx: np.ndarray) -> _Cells:
        if self.kind == "text":
            return _Cells("text", [self.values[i] for i in idx.tolist()])
        if self.kind == "series":
            return _Cells("series", self.values.iloc[idx])
        return _Cells(self.kind, self.values[idx], None if self.empty is None else self.empty[idx])

    def numbers(self) -> np.ndarray:
        """float64, NaN where a cell is empty or not a number (pandas.to_numeric, coerce)."""
        if self.kind == "series":
            import pandas as pd  # lean start: only a DataFrame's cells (simulators, tests) need it

            return pd.to_numeric(self.values, errors="coerce").to_numpy(dtype=np.float64)
        if self.kind == "text":
            return np.array([math.nan if t is None else _number(t) for t in self.values],
                            dtype=np.float64)
        out = np.asarray(self.values, dtype=np.float64).copy()
        if self.empty is not None:
            out[self.empty] = math.nan
        return out

    def is_empty(self) -> np.ndarray:
        """bool per row: the cell is empty (pandas' isna of the column as read)."""
        if self.kind == "series":
            return self.values.isna().to_numpy(dtype=bool)
        if self.kind == "text":
            return np.array([t is None for t in self.values], dtype=bool)
        if self.kind == "int":
            return np.zeros(len(self.values), dtype=bool)
        if self.kind == "float":
            return np.isnan(self.values)
        return np.asarray(self.empty, dtype=bool).copy()

    def texts(self) -> list[str | None]:
        """Each cell as text, None where empty (pandas' astype(str) of the column)."""
        if self.kind == "text":
            return list(self.values)
        if self.kind == "series":
            return [v if isinstance(v, str) else None for v in self.values.astype(str).tolist()]
        if self.kind == "int":
            return [str(v) for v in self.values.tolist()]
        empty = np.isnan(self.values) if self.kind == "float" else self.empty
        text = self.values.astype(str).tolist()
        return [None if e else t for t, e in zip(text, empty.tolist(), strict=True)]

    def shown(self, i: int) -> str:
        """Cell i as an error message quotes it."""
        if self.kind == "series":
            v = self.values.iloc[i]
            return repr(v if isinstance(v, str) else str(v))
        t = self.texts()[i] if self.kind != "text" else self.values[i]
        return "empty" if t is None else repr(t)


class Table:
    """A member's rows as `flnode run` reads them (read_table), without pandas: named
    columns, equal lengths, and where each row came from (a CSV line, or a row number)
    so that an error can point at it. `encode` turns it into tensors."""

    def __init__(self, columns: dict[str, _Cells], origin: np.ndarray, unit: str) -> None:
        self._cols = columns
        self.origin = origin  # per row: its line in the file (unit "line") or "row" number
        self.unit = unit

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def __len__(self) -> int:
        return len(self.origin)

    @property
    def iloc(self) -> _Rows:
        """`table.iloc[positions]`: those rows, as a Table (as a DataFrame's iloc)."""
        return _Rows(self)

    def numbers(self, name: str) -> np.ndarray:
        return self._cols[name].numbers()

    def texts(self, name: str) -> list[str | None]:
        return self._cols[name].texts()

    def empty(self, name: str) -> np.ndarray:
        """bool per row: the cell in column `name` is empty."""
        return self._cols[name].is_empty()

    def where(self, name: str, bad: np.ndarray) -> str:
        """The first row marked in `bad`, for an error message."""
        i = int(np.flatnonzero(bad)[0])
        return f"first at {self.unit} {int(self.origin[i])}: {self._cols[name].shown(i)}"

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Table:
        """A DataFrame's rows (row numbers from 1), read with pandas' own conversions."""
        return cls({str(c): _Cells("series", df[c]) for c in df.columns},
                   np.arange(1, len(df) + 1), "row")


class _Rows:
    def __init__(self, table: Table) -> None:
        self._t = table

    def __getitem__(self, positions: Sequence[int] | np.ndarray) -> Table:
        idx = np.asarray(positions, dtype=np.int64).reshape(-1)
        t = self._t
        return Table({n: c.take(idx) for n, c in t._cols.items()}, t.origin[idx], t.unit)


def read_table(path: str | Path) -> Table:
    """A member's .csv or .parquet file as a Table (no pandas; no pyarrow in this process:
    a child reads Parquet). Errors name the file, and the line and column where there is one."""
    return read_tables([path])[0]


def read_tables(paths: Sequence[str | Path], keep: bool = False) -> list[Table]:
    """Several files as read_table reads each, the Parquet ones by one child process (it
    takes ~0.5 s to start idle, 2 s on a busy machine: a node's training and evaluation
    files share it). `keep`: hold the Parquet files' Tables until the next call, which takes
    those of its files that are unchanged (`flnode run` checks its files, then the node
    reads them)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.suffix not in (".csv", ".parquet"):
            raise LocalError(f"data file {path}: expected a .csv or .parquet file")
    kept = dict(_KEPT)
    _KEPT.clear()  # held for the next read only, whatever it reads
    keys = {p: _identity(p) for p in paths if p.suffix == ".parquet"}
    got = {p: kept[key] for p, key in keys.items() if key in kept}
    todo = [p for p in keys if p not in got]
    if todo:
        got.update(zip(todo, _read_parquet(todo), strict=True))
    if keep:
        for p in todo:
            if keys[p] is not None:  # the identity from before the read: a change misses
                _KEPT[keys[p]] = got[p]
    return [_read_csv(p) if p.suffix == ".csv" else got[p] for p in paths]


# Parquet Tables read with keep=True, held until the next read_tables call, which takes
# those of an unchanged file (`flnode run`'s check, then its node's read: one child process
# per start, not two).
_KEPT: dict[tuple[str, int, int, int, int], Table] = {}


def _identity(path: Path) -> tuple[str, int, int, int, int] | None:
    """A file as it is now (path, device, inode, size, mtime): None if it cannot be seen."""
    try:
        st = path.stat()
        return str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
    except OSError:
        return None


def read_frame(path: str | Path) -> pd.DataFrame:
    """The same file as a pandas DataFrame, for the operator tools (`flnode schema infer`,
    the simulators); a node reads with read_table."""
    import pandas as pd  # lean start: the operator tools only; a node reads with read_table

    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise LocalError(f"cannot read data file {path}: {exc}") from None
    raise LocalError(f"data file {path}: expected a .csv or .parquet file")


# A CSV file this big is refused before it is read: the reader holds the text and a Python
# str per cell, ~17x the file at its peak (measured: an 18.7 MB file of 600,000 rows x 4
# columns, 316 MB), so 256 MiB is ~4.3 GiB. Bigger rows go as Parquet (read by a child).
CSV_MAX_FILE_BYTES = 256 << 20


def _read_csv(path: Path) -> Table:
    try:
        size = path.stat().st_size
        if size > CSV_MAX_FILE_BYTES:
            raise LocalError(f"data file {path}: {size} bytes, more than the "
                             f"{CSV_MAX_FILE_BYTES} a node reads from one CSV file (its reader "
                             "holds ~17x the file in memory): give the rows as a .parquet file")
        raw = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"cannot read data file {path}: {exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise LocalError(f"{path}: line {line}: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    del raw
    reader = csv.reader(text.splitlines(keepends=True))
    header: list[str] | None = None
    header_line = 0
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for row in reader:
            here, start = start, reader.line_num + 1
            if not row:  # a blank line (pandas skips them too)
                continue
            if header is None:
                header, header_line = row, here
                _check_header(path, here, header)
                continue
            if len(row) != len(header):
                raise LocalError(f"{path}: line {here}: {len(row)} cell(s), but the header "
                                 f"(line {header_line}) names {len(header)} column(s)")
            rows.append(row)
            lines.append(here)
    except csv.Error as exc:
        raise LocalError(f"{path}: line {reader.line_num}: not valid CSV: {exc}") from None
    if header is None:
        raise LocalError(f"{path}: empty file: expected a header line naming the columns, "
                         "then one line per row")
    del text
    columns = {name: _typed([r[j] for r in rows]) for j, name in enumerate(header)}
    return Table(columns, np.array(lines, dtype=np.int64), "line")


def _check_header(path: Path, line: int, header: list[str]) -> None:
    for j, name in enumerate(header):
        if not name.strip():
            raise LocalError(f"{path}: line {line} (the header): column {j + 1} has no name")
    seen: set[str] = set()  # one pass: list.count per name was quadratic in the columns
    twice = sorted({n for n in header if n in seen or seen.add(n)})
    if twice:
        raise LocalError(f"{path}: line {line} (the header): column(s) {twice} named twice")


def _typed(cells: list[str]) -> _Cells:
    """One CSV column, typed as pandas' read_csv types it: int64 if every cell is a whole
    number, else float64 if every non-empty cell is a number, else bool if every cell is
    True/False, else text. Only a categorical or label column's text depends on the type
    (a cell "1.50" in a float column reads "1.5"; an int column's "+3" reads "3")."""
    empty = np.fromiter((c in NA_CELLS for c in cells), dtype=bool, count=len(cells))
    full = [c for c, e in zip(cells, empty.tolist(), strict=True) if not e]
    if full and not empty.any() and all(_INT.fullmatch(c) for c in full):
        ints = [int(c) for c in cells]
        if _INT64[0] <= min(ints) and max(ints) <= _INT64[1]:
            return _Cells("int", np.array(ints, dtype=np.int64))
    numbers = [math.nan if e else _number(c) for c, e in zip(cells, empty.tolist(), strict=True)]
    floats = np.array(numbers, dtype=np.float64)
    if not (np.isnan(floats) & ~empty).any():  # every non-empty cell is a number
        return _Cells("float", floats)
    if full and all(c in _TRUE or c in _FALSE for c in full):
        return _Cells("bool", np.array([c in _TRUE for c in cells], dtype=bool), empty)
    return _Cells("text", [None if e else c for c, e in zip(cells, empty.tolist(), strict=True)])


# --- Parquet: read in a short-lived child process (node/data/parquet_child.py) -----------
# pyarrow costs a node ~50 MB of RSS and four threads for as long as it runs; the child
# reads the file, hands back plain arrays and exits. The limits bound what a hostile file
# can make the child (and then the node) hold; module attributes, so a test can lower them.

# The child's address space: pyarrow and numpy take ~0.55 GiB of it before the file is
# opened (mapped code, pools); the rest is for the decoded table (measured: VmPeak 0.47-0.54
# GiB reading a 3,000-row file with the system allocator).
PARQUET_MEMORY_BYTES = 6 << 30
# What the child may hand back (RLIMIT_FSIZE on its output): the rows a node holds from one
# file. 8 bytes a cell, so ~270 M cells; a file past it is refused, naming the limit. The
# node then holds ~2x this for the rows (a text cell: 4 bytes here, a list slot there)
# plus ~5.5x the distinct text values' JSON (an ID column: a Python str per value; measured
# here: 2 M distinct hex strings, 26.9 MB of output of which 18.9 MB JSON, the node's peak
# RSS +115 MiB: ~4.5x the output).
PARQUET_OUTPUT_BYTES = 2 << 30
# Of that output, the header (JSON: the text columns' distinct values, the column names)
# may take at most this much: its strs cost the node ~5.5x their JSON, so by those factors
# the node's peak for one file stays ~2x PARQUET_OUTPUT_BYTES + 5.5x this = ~2.7x the cap
# (review s4 F1: all distinct strings made it ~4.5x, ~9 GiB). A file past it is refused.
PARQUET_HEADER_BYTES = PARQUET_OUTPUT_BYTES // 8
# Rows and columns the metadata may declare: checked before any page is decoded.
PARQUET_MAX_ROWS = 100_000_000
PARQUET_MAX_COLUMNS = 10_000
# A file this big is refused before the child starts (its rows could not fit the output).
PARQUET_MAX_FILE_BYTES = PARQUET_OUTPUT_BYTES
# Wall clock for one read (start, decode, write): a member's file of a few MB takes 0.5-2 s
# here; this only stops a read that hangs (a stalled mount, a pathological file).
PARQUET_TIMEOUT_S = 600.0
# The child's output dir in the temp dir: "flnode-parquet-<node's pid>-<random>". A node
# killed mid-read (SIGKILL, the OOM killer) cannot remove it, and it may hold up to
# PARQUET_OUTPUT_BYTES of partial rows: every read first removes such dirs whose pid is
# gone (review s4 F2), so a kill/restart loop does not fill the shared /tmp.
_TMP_PREFIX = "flnode-parquet-"
# How much of the child's stderr an error quotes.
_STDERR_QUOTED = 2000
_CHILD = Path(__file__).with_name("parquet_child.py")
_MAGIC = b"FLNPQ1\n"
_DTYPES = {"int": ("<i8",), "float": ("<f8", "<f4", "<f2"), "bool": ("|b1",), "text": ("<i4",)}


def _read_parquet(paths: list[Path]) -> list[Table]:
    """Members' Parquet files, read by one child process that holds pyarrow and exits.
    Errors name the file and what is wrong with it (the child's one line), or the limit
    the file passed; the node's own memory holds only the decoded rows."""
    import os  # lean start: the Parquet reader's child only; a CSV node needs neither
    import signal
    import subprocess
    import tempfile

    for path in paths:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise LocalError(f"cannot read data file {path}: {exc}") from None
        if size > PARQUET_MAX_FILE_BYTES:
            raise LocalError(f"data file {path}: {size} bytes, more than the "
                             f"{PARQUET_MAX_FILE_BYTES} a node reads from one Parquet file")
    _sweep_stale_dirs(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}{os.getpid()}-") as tmp:
        outs = [Path(tmp) / f"rows-{i}.bin" for i in range(len(paths))]
        err = Path(tmp) / "stderr.txt"
        argv = [sys.executable, "-I", str(_CHILD), str(PARQUET_MEMORY_BYTES),
                str(PARQUET_OUTPUT_BYTES), str(PARQUET_MAX_ROWS), str(PARQUET_MAX_COLUMNS)]
        for path, out in zip(paths, outs, strict=True):
            argv += [str(path.resolve()), str(out)]
        env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system",  # no jemalloc reserve
               "FLNODE_PARQUET_PARENT": str(os.getpid())}  # the child dies with us
        with err.open("wb") as stderr:
            try:
                rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, env=env, timeout=PARQUET_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                rc = None
            except OSError as exc:
                raise LocalError(f"data file {paths[0]}: cannot start the Parquet reader "
                                 f"({_CHILD}): {exc}") from None
        # The first file without its output is the one the child was reading.
        path = next((p for p, o in zip(paths, outs, strict=True) if not o.exists()), paths[-1])
        if rc is None:
            raise LocalError(f"data file {path}: reading it took longer than "
                             f"{PARQUET_TIMEOUT_S:g} s: stopped")
        said = err.read_bytes()[-_STDERR_QUOTED:].decode("utf-8", "replace").strip()
        if rc != 0:
            last = said.splitlines()[-1] if said else ""
            if rc < 0:
                how = (f"the Parquet reader was killed by {signal.Signals(-rc).name} reading "
                       "it: a malformed file" if -rc in signal.valid_signals() else f"status {rc}")
                if -rc == signal.SIGXFSZ:
                    how = (f"its rows decode to more than the {PARQUET_OUTPUT_BYTES >> 20} MiB "
                           "a node reads from one file")
                raise LocalError(f"data file {path}: {how}" + (f" ({last})" if last else ""))
            raise LocalError(f"data file {path}: {last or f'the Parquet reader failed ({rc})'}")
        return [_load_rows(p, o) for p, o in zip(paths, outs, strict=True)]


def _sweep_stale_dirs(tmp: Path) -> None:
    """Remove the output dirs of readers whose node is gone (killed before it could remove
    its own). Only what is surely ours: a real directory (no symlink followed; rmtree does
    not follow links inside it either), owned by our user, named with a pid that no longer
    runs. A pid reused by another process keeps its dir until that one ends too."""
    import os  # lean start: the Parquet reader only
    import re
    import shutil
    import stat

    try:
        names = [n for n in os.listdir(tmp) if n.startswith(_TMP_PREFIX)]
    except OSError:
        return
    for name in names:
        m = re.fullmatch(re.escape(_TMP_PREFIX) + r"([1-9][0-9]{0,9})-[A-Za-z0-9_]+", name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            st = os.lstat(tmp / name)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            os.kill(int(m.group(1)), 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(tmp / name, ignore_errors=True)
        except (OSError, OverflowError):  # gone already, or a pid of another user: alive
            continue


def _load_rows(path: Path, out: Path) -> Table:
    """The child's output as a Table, every length checked against the file's size before
    anything is allocated (the child is ours, its input is not)."""
    size = out.stat().st_size
    bad = f"data file {path}: the Parquet reader's output is malformed"
    with out.open("rb") as f:
        head = f.read(len(_MAGIC) + 8)
        if len(head) < len(_MAGIC) + 8 or head[:len(_MAGIC)] != _MAGIC:
            raise LocalError(bad)
        n = int.from_bytes(head[len(_MAGIC):], "little")
        if n > PARQUET_HEADER_BYTES:
            raise LocalError(f"data file {path}: its text columns' distinct values take {n} "
                             f"bytes of JSON, more than the {PARQUET_HEADER_BYTES} a node reads "
                             "from one file (PARQUET_HEADER_BYTES)")
        start = len(head) + n
        if start > size:
            raise LocalError(bad)
        try:
            header = json.loads(f.read(n))
            rows, entries = int(header["rows"]), list(header["columns"])
        except (ValueError, KeyError, TypeError):
            raise LocalError(bad) from None
        columns: dict[str, _Cells] = {}
        for e in entries:
            kind, dtype, name = e.get("kind"), e.get("dtype"), e.get("name")
            if (dtype not in _DTYPES.get(kind, ()) or not isinstance(name, str)
                    or name in columns):
                raise LocalError(bad)
            values = _buffer(f, start, size, e.get("values"), np.dtype(dtype), rows, bad)
            if kind == "text":
                vocab = e.get("vocab")
                if (not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab)
                        or (rows and (values.min() < -1 or values.max() >= len(vocab)))):
                    raise LocalError(bad)
                columns[name] = _Cells("text", [None if c < 0 else vocab[c]
                                                for c in values.tolist()])
            elif kind == "bool":
                empty = _buffer(f, start, size, e.get("empty"), np.dtype(bool), rows, bad)
                columns[name] = _Cells("bool", values, empty)
            else:
                columns[name] = _Cells(kind, values)
    return Table(columns, np.arange(1, rows + 1), "row")


def _buffer(f: Any, start: int, size: int, where: Any, dtype: np.dtype, rows: int,
            bad: str) -> np.ndarray:
    if (not isinstance(where, list) or len(where) != 2
            or not all(isinstance(v, int) and v >= 0 for v in where)
            or where[1] != rows * dtype.itemsize or start + where[0] + where[1] > size):
        raise LocalError(bad)
    f.seek(start + where[0])
    return np.fromfile(f, dtype=dtype, count=rows)

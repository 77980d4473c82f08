"""Reads one member's Parquet file in a short-lived child process, so that `flnode run`
never keeps pyarrow (~50 MB and four threads) resident: node/data/table.py runs this file as
`python -I parquet_child.py MEMORY_BYTES OUTPUT_BYTES MAX_ROWS MAX_COLUMNS IN OUT [IN OUT ...]`
and reads each OUT back as plain arrays (several files, one process: it takes ~0.5 s to start).

Standalone on purpose (stdlib, numpy, pyarrow; nothing of flnode): the file is a member's,
hostile until read. The limits are set on this process before the file is opened: its
address space (a decompression or dictionary bomb ends in a MemoryError here, not in the
node), the bytes it may write (RLIMIT_FSIZE: OUT cannot outgrow what the node will load) and
no core dump; a crash inside pyarrow on a malformed file kills this process only.

OUT: MAGIC, the header's length (8 bytes, little-endian), the header (JSON: rows, columns:
name, kind "int" / "float" / "bool" / "text", dtype, offset and nbytes of its values, of its
empty-cell mask (bool) if any, and a text column's distinct values), then the buffers. A text
column's values are int32 codes into its distinct values, -1 where empty: a string column
stays dictionary-encoded from the file to the node (one Python str per distinct value).
OUT is written as OUT.part and renamed once complete: the first IN without its OUT is the
file a failure is about. Exit status 0, or 2 with one line on stderr saying what is wrong
with that file. On Linux it dies with the node that started it (its pid in the environment's
FLNODE_PARQUET_PARENT): a killed node leaves no reader running.
"""

from __future__ import annotations

import json
import os
import resource
import sys

MAGIC = b"FLNPQ1\n"


def _limit(memory: int, output: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the node that started it dies (killed, or by the
    OOM killer), so no orphan reads on with its gigabytes of address space beside the
    restarted node's own reader. The node's pid comes in FLNODE_PARQUET_PARENT: if it died
    before the signal was set, this process ends at once. (The signal follows the thread
    that started us, which waits in subprocess.run until we end.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # lean start: Linux's prctl, this process only
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    parent = os.environ.get("FLNODE_PARQUET_PARENT")
    # getppid(), not the node's pid alive: a killed node is a zombie until reaped, but its
    # children are handed to another parent at once (table.py starts sys.executable itself)
    if parent is not None and str(os.getppid()) != parent:
        os._exit(3)  # the node is gone: nobody reads what this process would write


def _fail(reason: str) -> None:
    sys.stderr.write(reason.replace("\n", " ")[:1000] + "\n")
    sys.exit(2)


def main(argv: list[str]) -> None:
    _die_with_parent()
    memory, output, max_rows, max_columns = (int(a) for a in argv[:4])
    _limit(memory, output)
    try:  # lean start: imported only once this process's limits are set
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        _fail(f"reading Parquet needs pyarrow and numpy ({exc}): pip install pyarrow, "
              "or give the rows as a .csv file")
    pa.set_cpu_count(1)  # one small process: no thread pools to speak of
    pa.set_io_thread_count(1)
    files = argv[4:]
    for src, out in zip(files[::2], files[1::2], strict=True):
        _one(np, pa, pq, src, out, memory, output, max_rows, max_columns)


def _one(np, pa, pq, src: str, out: str, memory: int, output: int,  # noqa: ANN001, PLR0913
         max_rows: int, max_columns: int) -> None:
    try:
        pf = pq.ParquetFile(src)
        rows, ncols = pf.metadata.num_rows, pf.metadata.num_columns
        if rows > max_rows:
            _fail(f"{rows} rows, more than the {max_rows} a node reads from one file")
        if ncols > max_columns:
            _fail(f"{ncols} columns, more than the {max_columns} a node reads from one file")
        schema = pf.schema_arrow
        texts = [f.name for f in schema if _stringlike(pa, f.type)]
        # Strings stay dictionary-encoded: a value repeated on every row is held once.
        pf = pq.ParquetFile(src, read_dictionary=texts)
        table = pf.read(use_threads=False)
        meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    except MemoryError:
        _fail(f"decoding it needs more than the {memory >> 20} MiB a Parquet read may use")
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors are many; each is the file's fault
        _fail(f"not a readable Parquet file: {type(exc).__name__}: {exc}")
    if table.num_rows != rows:
        _fail(f"its metadata says {rows} rows, its data holds {table.num_rows}")
    index_columns = meta.get("index_columns", []) if isinstance(meta, dict) else []
    index = {c for c in index_columns if isinstance(c, str)}  # pandas' index, not a column
    names = [n for n in table.column_names if n not in index]
    seen: set[str] = set()
    twice = sorted({n for n in names if n in seen or seen.add(n)})
    if twice:  # Parquet allows it; a node's rows (and the CSV reader) do not
        _fail(f"column(s) {twice} named twice")
    columns, buffers, offset = [], [], 0
    try:
        for name, col in zip(table.column_names, table.columns, strict=True):
            if name in index:
                continue
            entry, arrays = _column(np, pa, col)
            entry["name"] = name
            for key, arr in zip(("values", "empty"), arrays, strict=False):
                if arr is not None:
                    entry[key] = [offset, arr.nbytes]
                    buffers.append(arr)
                    offset += arr.nbytes
            columns.append(entry)
        header = json.dumps({"rows": rows, "columns": columns}).encode()
        del table, columns  # the next file's rows get this memory
        with open(out + ".part", "wb") as f:
            f.write(MAGIC + len(header).to_bytes(8, "little") + header)
            for arr in buffers:
                f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        os.replace(out + ".part", out)
    except MemoryError:
        _fail(f"decoding it needs more than the {memory >> 20} MiB a Parquet read may use")
    except OSError as exc:  # EFBIG past RLIMIT_FSIZE
        _fail(f"its rows decode to more than the {output >> 20} MiB a node reads from one "
              f"file ({exc.strerror or exc})")
    except Exception as exc:  # noqa: BLE001 - a column pyarrow cannot convert: the file's fault
        _fail(f"a column pyarrow cannot convert: {type(exc).__name__}: {exc}")


def _column(np, pa, col):  # noqa: ANN001, ANN202 - modules passed in: imported after the limits
    """(header entry, (values, empty mask or None)) of one column, typed as pandas'
    read_parquet types it (node/data/table.py's _Cells kinds)."""
    t = col.type
    if pa.types.is_dictionary(t) and not _stringlike(pa, t.value_type):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_dictionary(t):
        return _text_codes(np, pa, col)
    if pa.types.is_integer(t) and col.null_count == 0:
        return {"kind": "int", "dtype": "<i8"}, (_values(np, col.cast(pa.int64()), np.int64),)
    if pa.types.is_integer(t) or t == pa.float64():  # int with nulls: float, as pandas
        return ({"kind": "float", "dtype": "<f8"},
                (_values(np, col.cast(pa.float64()), np.float64),))
    if pa.types.is_floating(t):  # float32 (float16): its own text, as pandas shows it
        dtype = np.float32 if t == pa.float32() else np.float16
        return {"kind": "float", "dtype": np.dtype(dtype).str}, (_values(np, col, dtype),)
    if pa.types.is_boolean(t):
        values = col.to_pylist()
        return ({"kind": "bool", "dtype": "|b1"},
                (np.array([bool(v) for v in values], dtype=bool),
                 np.array([v is None for v in values], dtype=bool)))
    values = col.to_pylist()  # anything else: its text, as str() shows it
    index: dict[str, int] = {}
    codes = np.fromiter((-1 if v is None else index.setdefault(str(v), len(index))
                         for v in values), dtype=np.int32, count=len(values))
    return {"kind": "text", "dtype": "<i4", "vocab": list(index)}, (codes,)


def _stringlike(pa, t) -> bool:  # noqa: ANN001
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t))


def _text_codes(np, pa, col):  # noqa: ANN001, ANN202
    """A dictionary-encoded string column as (distinct values, int32 codes, -1 where empty)."""
    col = col.unify_dictionaries()
    values = [] if col.num_chunks == 0 else col.chunk(0).dictionary.to_pylist()
    parts = [np.asarray(c.indices.fill_null(-1).cast(pa.int32())) for c in col.chunks]
    codes = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)
    nulls = [i for i, v in enumerate(values) if v is None]  # a null among the values: empty
    if nulls:
        codes[np.isin(codes, nulls)] = -1
    vocab = ["" if v is None else str(v) for v in values]
    return {"kind": "text", "dtype": "<i4", "vocab": vocab}, (codes,)


def _values(np, col, dtype):  # noqa: ANN001, ANN202
    """A fixed-width pyarrow column as a numpy array, NaN where null (dtype a float), read
    from its buffers (pyarrow's own to_numpy may import pandas)."""
    arr = col.combine_chunks()
    size = np.dtype(dtype).itemsize
    validity, data = arr.buffers()[:2]
    if data is None:  # an empty column
        return np.zeros(0, dtype=dtype)
    out = np.frombuffer(data, dtype=dtype, count=len(arr), offset=arr.offset * size).copy()
    if arr.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        out[~bits[arr.offset:arr.offset + len(arr)].astype(bool)] = np.nan
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

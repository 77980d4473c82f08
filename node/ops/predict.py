"""`flnode predict --model DIR --data FILE --out SCORES`: score a table with an export.

The same path as a Python function, for a scoring service:

    from node.ops.predict import Scorer, score_table

    summary = score_table("model/", "new.csv", "scores.csv")     # a file, streamed
    scorer = Scorer("model/")                                     # or rows in memory:
    probs = scorer.score({"balance": np.array([1200.0]), "income": np.array([41000.0]),
                          "student": np.array(["No"], dtype=object)})

`Scorer(DIR)` reads DIR/manifest.json (node/ops/export.py), checks every file it lists
against its SHA-256 before loading it, and loads the format's backend (onnxruntime,
TorchScript, or the state_dict with the numpy preprocessing). `Scorer.score` takes the
schema's columns as arrays (numbers float64, NaN for an empty cell; categories as text,
"" for an empty cell) and gives float32 probabilities [N, classes].

`score_table` reads a .csv or .parquet file in chunks of `chunk_rows` rows (bounded
memory on any size of file) and writes, per input row and in the same order: the file's
other columns, unchanged, then `p_<class>` for each class and `predicted`. A schema column
that is missing, or a cell in a numeric column that is not a number, is an error naming
the column, the type expected, what was found and the row. As documented in
docs/operate/export.md: an empty cell is filled as the schema's missing-value policy says
(rows the node would drop or refuse score empty: NaN probabilities, no label); a category
outside the vocabulary encodes as all zeros and is counted per column in the summary; a
number in a categorical column matches the vocabulary by value ("1" matches "1.0").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gossip.errors import LocalError
from node.data.table import NA_CELLS

# Rows per chunk: ~10 MB of columns for a dozen features; memory stays bounded whatever
# the file's size.
CHUNK_ROWS = 65536
# pyarrow's CSV reader reads blocks of this many bytes (~24,000 rows of a dozen columns; a
# chunk is at most one block). Its reader runs ahead of the scoring by up to a few dozen
# blocks: at 4 MB that was ~130 MB more peak RSS on 3M rows (323 MB against 195 MB), and
# no faster (bigger chunks also score slower: the [rows, features] blocks leave the cache).
CSV_BLOCK_BYTES = 1024 * 1024
# A progress bar from this file size on (smaller files score in a second or two).
PROGRESS_BYTES = 16 * 1024 * 1024
# manifest.json is a few KB plus the schema; a model file is checked against its digest.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_TRUE, _FALSE = frozenset({"True", "TRUE", "true"}), frozenset({"False", "FALSE", "false"})
FORMATS = ("onnx", "torchscript", "state_dict")
MANIFEST = "manifest.json"  # the export's manifest (node/ops/export.py)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_session(path: Path) -> Any:
    """An onnxruntime session of an exported model (CPU, its default threads)."""
    import onnxruntime as ort  # lean start: only ONNX scoring starts onnxruntime

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Threads that wait sleep instead of spinning: on 2 cores the spin took the CPU the
    # reading and writing threads of score_table need, and on a busy machine a graph of
    # ~20 small operations waited at every one (1.5-2x slower); the same results.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise LocalError(f"{path}: onnxruntime cannot load it ({str(exc)[:300]})") from None


@dataclass
class Summary:
    """What score_table did: rows in and scored, rows scored empty, unseen categories."""

    out: str
    rows: int = 0
    empty: int = 0  # rows scored NaN (the node would drop or refuse them)
    unseen: dict[str, int] = field(default_factory=dict)  # column -> rows with a category
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"out": self.out, "rows": self.rows, "empty": self.empty,
                "unseen": self.unseen, "seconds": round(self.seconds, 3)}


class Scorer:
    """An export loaded for scoring (module docstring)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self.manifest = _manifest(self.dir)
        self.spec: dict[str, Any] = self.manifest["schema"]
        self.format: str = self.manifest["format"]
        self.classes: list[str] = [str(c) for c in self.spec["classes"]]
        self.columns: list[dict[str, Any]] = self.spec["columns"]
        self._vocab = {c["name"]: set(c["vocabulary"]) for c in self.columns
                       if c["kind"] == "categorical"}
        files = [f["path"] for f in self.manifest["files"]]
        if self.format == "onnx":
            sess = onnx_session(self.dir / files[0])
            self._run: Callable[[dict[str, np.ndarray]], np.ndarray] = \
                lambda raw: sess.run(["probabilities"], raw)[0]
        elif self.format == "torchscript":
            from node.ops import export_torch  # lean start: torch only for its formats

            scorer = export_torch.load_script(self.dir / files[0])
            self._run = lambda raw: export_torch.score_script(self.dir, raw, scorer, self.spec)
        else:
            from node.ops import export_torch  # lean start: torch only for its formats

            loaded = export_torch.load_state_dict(self.dir)
            self._run = lambda raw: export_torch.score_state_dict(self.dir, raw, loaded)

    def score(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """Probabilities float32 [N, classes] for the schema's columns (module docstring)."""
        missing = [c["name"] for c in self.columns if c["name"] not in raw]
        if missing:
            raise LocalError(f"missing column(s) the model needs: {missing}")
        try:
            return np.asarray(self._run({c["name"]: raw[c["name"]] for c in self.columns}))
        except LocalError:
            raise
        except Exception as exc:  # noqa: BLE001 - the backends' own exception types
            raise LocalError(f"{self.dir}: the {self.format} model failed on these rows "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None

    def label_array(self, probs: np.ndarray, empty: np.ndarray | None = None) -> Any:
        """The most probable class per row (pyarrow strings), null where scored empty
        (`empty`: empty_rows(probs), if the caller has it)."""
        import pyarrow as pa  # lean start: predict only

        if empty is None:
            empty = empty_rows(probs)
        best = _argmax(probs)  # NaN rows: masked just below
        valid = None if not empty.any() else pa.py_buffer(np.packbits(~empty,
                                                                      bitorder="little"))
        best = pa.Array.from_buffers(pa.int32(), len(best), [valid, pa.py_buffer(best)])
        return _strings(self.classes).take(best)


def empty_rows(probs: np.ndarray) -> np.ndarray:
    """Rows with a NaN probability (scored empty), one class column at a time: numpy's
    isnan(probs).any(axis=1) on [N, 2] took 25x longer (0.05 s per million rows, twice
    per chunk, holding the GIL the reading and writing threads need)."""
    empty = np.isnan(probs[:, 0])
    for j in range(1, probs.shape[1]):
        empty |= np.isnan(probs[:, j])
    return empty


def _argmax(probs: np.ndarray) -> np.ndarray:
    """np.argmax(probs, axis=1) as int32 (the first of equal maxima), a column at a time
    (10x faster on a few classes); NaN rows give some class, masked by the caller."""
    best = np.zeros(len(probs), dtype=np.int32)
    top = probs[:, 0].copy()
    for j in range(1, probs.shape[1]):
        col = probs[:, j]
        higher = col > top
        best[higher] = j
        np.copyto(top, col, where=higher)
    return best


def _manifest(where: Path) -> dict[str, Any]:
    """DIR/manifest.json, checked: a known format, the files it lists present and with
    their SHA-256 (a file swapped after the export is refused, naming it)."""
    path = where / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise LocalError(f"{path}: over {MAX_MANIFEST_BYTES} bytes: not an flnode export")
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise LocalError(f"--model {where}: no readable manifest.json ({exc.strerror}): give "
                         "a directory `flnode export` wrote") from None
    except ValueError as exc:
        raise LocalError(f"{path}: not valid JSON ({exc})") from None
    try:
        fmt, files, spec = doc["format"], doc["files"], doc["schema"]
        assert fmt in FORMATS, f"format {fmt!r} is not one of {FORMATS}"
        assert isinstance(files, list) and files, "no files listed"
        for f in files:
            name = f["path"]
            assert isinstance(name, str) and name and "/" not in name and "\\" not in name \
                and name not in (".", ".."), f"file name {name!r} is not a plain name"
            assert isinstance(f["sha256"], str), "a file without its sha256"
        assert isinstance(spec["classes"], list) and spec["classes"], "no classes"
        assert isinstance(spec["columns"], list) and spec["columns"], "no columns"
        for c in spec["columns"]:
            assert isinstance(c["name"], str) and c["kind"] in ("numeric", "categorical"), \
                f"column {c!r:.80}"
            if c["kind"] == "categorical":
                assert isinstance(c["vocabulary"], list), f"column {c['name']!r}: no vocabulary"
    except (KeyError, TypeError, AssertionError) as exc:
        raise LocalError(f"{path}: not an flnode export's manifest ({exc})") from None
    for f in files:
        p = where / f["path"]
        if not p.is_file():
            raise LocalError(f"{where}: {f['path']} is listed in manifest.json but missing")
        if sha256(p) != f["sha256"]:
            raise LocalError(f"{where}: {f['path']} does not match its SHA-256 in "
                             "manifest.json: changed after the export; refusing to score "
                             "with it")
    return doc


# --- reading a table in chunks ------------------------------------------------------------------

def _chunks(path: Path, chunk_rows: int, numeric: frozenset[str] = frozenset()
            ) -> tuple[Iterator[Any], Callable[[], float], int]:
    """(record batches of at most chunk_rows rows, the fraction of the file read so far,
    the file's size). Parquet: the file's own types. CSV: the `numeric` columns parsed
    as float64 by the reader, NA_CELLS empty (no text to build, then cast); every other
    cell as text. A numeric cell the reader cannot parse ("True", " 3", "forty") sends
    the rest of the file, from the first row not yet given out, through the text path,
    which reads it as the node does or names the cell (_numbers): the numbers both paths
    parse are the same (pyarrow's one parser), so a file scores the same either way."""
    import pyarrow as pa  # lean start: only predict reads tables with pyarrow

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LocalError(f"cannot read data file {path}: {exc.strerror}") from None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # lean start: only a .parquet file needs it

        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError) as exc:
            raise LocalError(f"cannot read data file {path}: {exc}") from None
        total = max(pf.metadata.num_rows, 1)
        done = [0]

        def batches() -> Iterator[Any]:
            try:
                for b in pf.iter_batches(batch_size=chunk_rows):
                    done[0] += b.num_rows
                    yield b
            except (OSError, ValueError) as exc:
                raise LocalError(f"data file {path}: unreadable after row {done[0]}: {exc}") \
                    from None
        return batches(), lambda: done[0] / total, size
    if path.suffix != ".csv":
        raise LocalError(f"data file {path}: expected a .csv or .parquet file")
    import csv

    import pyarrow.csv as pcsv  # lean start: only predict reads CSV with pyarrow

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LocalError(f"{path}: cannot read its header line ({exc})") from None
    if not header:
        raise LocalError(f"{path}: empty file: expected a header line naming the columns")
    twice = sorted({n for n in header if header.count(n) > 1})
    if twice:
        raise LocalError(f"{path}: the header names column(s) {twice} twice")
    text = {n: pa.string() for n in header}
    typed = dict(text, **{n: pa.float64() for n in header if n in numeric})
    files: list[Any] = []  # the open file (a fallback opens it again)

    def open_reader(types: dict[str, Any], skip: int) -> Any:
        f = open(path, "rb")  # noqa: SIM115 - closed when the batches are done
        files.append(f)
        return pcsv.open_csv(
            f, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES,
                                             skip_rows_after_names=skip),
            convert_options=pcsv.ConvertOptions(
                column_types=types, strings_can_be_null=False, null_values=sorted(NA_CELLS)))

    def opened(skip: int, fallback: bool) -> Any:
        """A reader from data row skip + 1: typed, else (or if typed fails) text."""
        for types in ((typed, text) if fallback else (text,)):
            try:
                return open_reader(types, skip)
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                files.pop().close()
                if types is text:
                    raise LocalError(f"{path}: not valid CSV after data row {skip}: {exc}"
                                     if skip else f"{path}: not a CSV file pyarrow can read "
                                     f"({exc})") from None
        raise AssertionError("unreachable")

    reader = opened(0, typed != text)

    def batches() -> Iterator[Any]:
        nonlocal reader
        rows, fallback = 0, typed != text
        try:
            while True:
                try:
                    b = reader.read_next_batch()
                except StopIteration:
                    return
                except (OSError, ValueError) as exc:
                    if not fallback:
                        raise LocalError(f"{path}: not valid CSV after data row {rows}: "
                                         f"{exc}") from None
                    files.pop().close()
                    reader, fallback = opened(rows, False), False
                    continue
                for start in range(0, b.num_rows, chunk_rows):
                    part = b.slice(start, chunk_rows)
                    rows += part.num_rows
                    yield part
        finally:
            for f in files:
                f.close()

    def fraction() -> float:
        return files[-1].tell() / size if files and not files[-1].closed and size else 1.0
    return batches(), fraction, size


# --- one chunk's columns as the model's raw inputs -----------------------------------------------

def _numbers(col: Any, name: str, first_row: int, source: str) -> np.ndarray:
    """A numeric column as float64, NaN where empty; a cell that is not a number is an
    error naming the column, the row and the cell."""
    import pyarrow as pa  # lean start: predict only
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
            or pa.types.is_decimal(t):
        return _to_float(col.cast(pa.float64()))
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise LocalError(f"{source}: column {name!r}: expected numbers (a numeric column of the "
                         f"schema), found values of type {t}")
    empty = pc.is_in(col, value_set=_strings(sorted(NA_CELLS)))
    text = pc.if_else(empty, pa.nulls(1, pa.string())[0], col)
    try:
        return _to_float(text.cast(pa.float64()))
    except (ValueError, TypeError):  # pyarrow.ArrowInvalid: some cell is not its number
        pass
    cells = text.to_pylist()
    out = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):  # the slow path: a file pyarrow's cast refuses
        if cell is None:
            out[i] = math.nan
        elif cell in _TRUE or cell in _FALSE:
            out[i] = 1.0 if cell in _TRUE else 0.0
        else:
            try:
                out[i] = math.nan if "_" in cell else float(cell)
            except ValueError:
                out[i] = math.nan
            if math.isnan(out[i]) and cell.strip().lower() != "nan":
                raise LocalError(f"{source}: column {name!r}: expected a number (a numeric "
                                 f"column of the schema), found {cell[:60]!r} at row "
                                 f"{first_row + i} (counting data rows from 1)")
    return out


def _to_float(arr: Any) -> np.ndarray:
    import pyarrow as pa  # lean start: predict only

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    validity, data = arr.buffers()
    out = np.frombuffer(data, dtype=np.float64, count=arr.offset + len(arr))[arr.offset:]
    if arr.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        out = np.where(bits[arr.offset:arr.offset + len(arr)].astype(bool), out, math.nan)
    return out


def _strings(values: list[str]) -> Any:
    """A pyarrow string array of these texts, built from its buffers: pa.array,
    pa.scalar and a Python value given to a pyarrow.compute function import pandas
    (0.2 s of the CLI's start) and scoring needs none."""
    import pyarrow as pa  # lean start: predict only

    data = [v.encode() for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def _floats(v: np.ndarray) -> Any:
    """A float32 pyarrow array of v, null where NaN (an empty cell in the output), built
    from its buffers (_strings says why)."""
    import pyarrow as pa  # lean start: predict only

    v = np.ascontiguousarray(v, dtype=np.float32)
    nan = np.isnan(v)
    valid = None if not nan.any() else pa.py_buffer(np.packbits(~nan, bitorder="little"))
    return pa.Array.from_buffers(pa.float32(), len(v), [valid, pa.py_buffer(v)])


def _texts(col: Any, name: str, csv: bool, source: str) -> Any:
    """A categorical column as a pyarrow string array, "" where empty (as the node reads
    the cells: node/data/table.py)."""
    import pyarrow as pa  # lean start: predict only
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_floating(t):  # as the node shows a float cell: numpy's str
        v = col.to_numpy(zero_copy_only=False).astype(np.float64)
        text = v.astype(str).astype(object)
        text[np.isnan(v)] = ""
        return pa.array(text, type=pa.string())
    if pa.types.is_boolean(t):
        col = pc.if_else(col, "True", "False")
    elif pa.types.is_integer(t) or pa.types.is_decimal(t):
        col = col.cast(pa.string())
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise LocalError(f"{source}: column {name!r}: expected text (a categorical column of "
                         f"the schema), found values of type {t}")
    empty = _strings([""])[0]
    if csv:
        col = pc.if_else(pc.is_in(col, value_set=_strings(sorted(NA_CELLS))), empty, col)
    return pc.fill_null(col, empty)


def _canonical(col: Any, vocab: set[str]) -> tuple[np.ndarray, int]:
    """The cells as text objects (onnxruntime's string input), those spelled otherwise than
    their vocabulary entry by number ("1" for "1.0", "1.50" for "1.5") replaced by it; and
    how many cells are still outside the vocabulary. Worked out on the column's distinct
    values (pyarrow's dictionary encoding: the cost per row stays in C, and no pandas)."""
    import pyarrow as pa  # lean start: predict only

    enc = col.dictionary_encode()
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    distinct = enc.dictionary.to_pylist()
    known = np.ones(len(distinct), dtype=bool)
    for k, u in enumerate(distinct):
        if not u or u in vocab:
            continue
        try:
            x = float(u)
        except ValueError:
            x = math.nan
        for cand in ((str(x), str(int(x)) if x.is_integer() else None)
                     if math.isfinite(x) else ()):
            if cand in vocab:
                distinct[k] = cand
                break
        else:
            known[k] = False
    codes = np.frombuffer(enc.indices.buffers()[1], dtype=np.int32, count=len(enc) + enc.offset
                          )[enc.offset:]
    values = np.array(distinct, dtype=object)[codes]
    return values, int((~known[codes]).sum()) if not known.all() else 0


def raw_inputs(batch: Any, scorer: Scorer, first_row: int, csv: bool, source: str
               ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One chunk's schema columns as the model's raw inputs, and per categorical column
    how many rows hold a category outside the vocabulary."""
    names = set(batch.schema.names)
    missing = [c for c in scorer.columns if c["name"] not in names]
    if missing:
        c = missing[0]
        raise LocalError(f"{source}: missing column {c['name']!r} ({c['kind']}; the model "
                         f"needs {[m['name'] for m in missing]}); the file's columns: "
                         f"{sorted(names)[:20]}")
    raw, unseen = {}, {}
    for c in scorer.columns:
        col = batch.column(c["name"])
        if c["kind"] == "numeric":
            raw[c["name"]] = _numbers(col, c["name"], first_row, source)
        else:
            values, n = _canonical(_texts(col, c["name"], csv, source), scorer._vocab[c["name"]])
            raw[c["name"]] = values
            if n:
                unseen[c["name"]] = n
    return raw, unseen


# --- the whole table ----------------------------------------------------------------------------------

def output_names(classes: list[str]) -> list[str]:
    return [f"p_{c}" for c in classes] + ["predicted"]


def score_table(model: str | Path | Scorer, data: str | Path, out: str | Path, *,
                chunk_rows: int = CHUNK_ROWS, progress: bool | None = None) -> Summary:
    """Score every row of `data` (.csv or .parquet) into `out` (.csv or .parquet), in
    chunks (module docstring). `progress`: a progress bar on stderr (None: on files from
    PROGRESS_BYTES when stderr is a terminal; a log gets no bar, and the CLI no 0.1 s of
    importing rich). Written to a temporary file, renamed into place when complete.

    Three stages overlap, one chunk each (pyarrow and onnxruntime release the GIL): the
    next chunk is read and checked, this one scored, the last one written. At most three
    chunks are in memory at once."""
    from concurrent.futures import ThreadPoolExecutor  # lean start: predict only

    scorer = model if isinstance(model, Scorer) else Scorer(model)
    data, out = Path(data), Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise LocalError(f"--out {out}: expected a .csv or .parquet file name")
    if chunk_rows < 1:
        raise LocalError(f"chunk_rows must be at least 1, got {chunk_rows}")
    start = time.perf_counter()
    batches, fraction, size = _chunks(data, chunk_rows, frozenset(
        c["name"] for c in scorer.columns if c["kind"] == "numeric"))
    summary = Summary(str(out))
    tmp = out.with_name(f".{out.name}.partial")
    writer = None
    if progress is None:
        progress = size >= PROGRESS_BYTES and sys.stderr.isatty()
    bar = _progress(data) if progress else None

    def prepared() -> Iterator[tuple[Any, dict[str, np.ndarray], dict[str, int]]]:
        first = 1
        for batch in batches:
            raw, unseen = raw_inputs(batch, scorer, first, data.suffix == ".csv", str(data))
            first += batch.num_rows
            yield batch, raw, unseen

    reading, writing = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    chunks = prepared()
    written = None
    try:
        ahead = reading.submit(next, chunks, None)
        while (item := ahead.result()) is not None:
            ahead = reading.submit(next, chunks, None)
            batch, raw, unseen = item
            probs = scorer.score(raw)
            table, empty = _scored(batch, probs, scorer, str(data))
            if written is not None:
                written.result()
            writer = writer or _writer(tmp, out, table.schema)
            written = writing.submit(writer.write_table, table)
            summary.rows += batch.num_rows
            summary.empty += int(np.count_nonzero(empty))
            for k, v in unseen.items():
                summary.unseen[k] = summary.unseen.get(k, 0) + v
            if bar is not None:
                bar[0].update(bar[1], completed=fraction())
        if written is not None:
            written.result()
        if writer is None:
            raise LocalError(f"{data}: no rows (only a header?)")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        reading.shutdown(wait=True, cancel_futures=True)
        writing.shutdown(wait=True, cancel_futures=True)
        chunks.close()
        if bar is not None:
            bar[0].stop()
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    summary.seconds = time.perf_counter() - start
    return summary


def _scored(batch: Any, probs: np.ndarray, scorer: Scorer, source: str
            ) -> tuple[Any, np.ndarray]:
    """The output rows of one chunk (its other columns, then the scores), and which rows
    were scored empty."""
    import pyarrow as pa  # lean start: predict only

    if probs.shape != (batch.num_rows, len(scorer.classes)):
        raise LocalError(f"{scorer.dir}: the model gave {probs.shape} scores for "
                         f"{batch.num_rows} rows of {len(scorer.classes)} classes")
    schema_cols = {c["name"] for c in scorer.columns}
    outs = output_names(scorer.classes)
    keep = [n for n in batch.schema.names if n not in schema_cols]
    clash = sorted(set(keep) & set(outs))
    if clash:
        raise LocalError(f"{source}: column(s) {clash} would be overwritten by the scores: "
                         "rename them in the input")
    cols = [batch.column(n) for n in keep]
    cols += [_floats(probs[:, j]) for j in range(probs.shape[1])]
    empty = empty_rows(probs)
    cols.append(scorer.label_array(probs, empty))
    return pa.Table.from_arrays(cols, names=keep + outs), empty


def _writer(tmp: Path, out: Path, schema: Any) -> Any:
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq  # lean start: predict only

        return pq.ParquetWriter(tmp, schema)
    import pyarrow.csv as pcsv  # lean start: predict only

    # Rows per batch the writer formats at once (its default 1,024): fewer, bigger calls;
    # the same bytes.
    return pcsv.CSVWriter(tmp, schema, write_options=pcsv.WriteOptions(batch_size=CHUNK_ROWS))


def _progress(data: Path) -> tuple[Any, Any]:
    # lean start: the progress bar only on big files
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"scoring {data.name}"), BarColumn(), TextColumn(
        "{task.percentage:>3.0f}%"), TimeRemainingColumn(), console=Console(stderr=True),
        transient=True)
    task = bar.add_task("score", total=1.0)
    bar.start()
    return bar, task

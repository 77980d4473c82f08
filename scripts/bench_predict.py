#!/usr/bin/env python3
"""How fast `flnode predict` scores, against a bare onnxruntime session.

Prints JSON (and writes it to --out, default runs/bench/predict.json):

- a finished consortium run: `flnode simulate --dataset default` (2 members, 2 rounds,
  the mlp), member bank-0 exported to ONNX (`flnode export`); `export_bytes`: the size
  of the export's files (model.onnx, manifest.json, model_card.json; each in
  `export_files`);
- `--rows` rows (default 1,000,000) of ISLR `Default`, drawn with replacement, as a CSV
  (the label column kept: an extra column copied to the output);
- `function`: node.ops.predict.score_table on that CSV (read, check, encode inside the
  ONNX graph, score, write scores.csv), in this process;
- `cli`: `flnode predict` on the same CSV, a new process (its start included), and
  its peak RSS (`cli_peak_rss_mb`: the reads are chunked, so it does not grow with the
  file);
- `in_memory`: Scorer.score on the raw columns already in memory (the export's own
  preprocessing, no file);
- `bare`: a bare onnxruntime session of the network alone (torch's exporter, the same
  weights) on the features already encoded by node/data/encode.py, in the same chunks,
  with the session options the export is scored with (node/ops/predict.py
  onnx_session: waiting threads sleep); `bare_ort_defaults`: the same with
  onnxruntime's default options (waiting threads spin: slower on a loaded machine,
  so it made every ratio look better);
- `strings`: a session that only maps the categorical columns' strings to codes (the
  export graph's first step, a LabelEncoder per column) on the raw columns: what
  taking categories as text (the export's documented input) costs by itself;
- rows per second of each and the ratio of each to `bare` (goal: the function and the
  CLI at least 0.5x), from the medians and from the best runs (on a shared machine the
  best run is the least disturbed one), and `ratio_to_bare_paired`: the median over
  the repeats of each path's ratio to the bare run of the same repeat (measured seconds
  apart, so the least moved by the machine's load);
- `stages`: score_table's stages one after the other, not overlapped, in seconds for
  the whole file (median): `read` (pyarrow's CSV reader, numbers parsed), `columns`
  (checked and turned into the model's raw inputs), `graph` (the ONNX model: its
  preprocessing, the network, softmax; `graph - bare` is what the preprocessing and
  softmax add), `write` (scores joined to the passed-through columns and written as
  CSV). score_table runs read+columns, graph and write in three threads on 2 cores.

- `floor`: what no file-to-file scorer on this stack can go below, measured in the same
  repeats: `start` a new Python that imports what `flnode predict` cannot do without
  (numpy, pyarrow's CSV and compute modules, onnxruntime) and exits; `io` a new process
  that only reads the CSV (pyarrow's multithreaded reader, the numeric columns typed)
  and writes the same output table (the scores loaded from a .npy, no checks, no
  model), byte for byte the file `flnode predict` writes (`floor_output_identical`);
  `io_in_process` the same read and write without the process. `ceiling_ratio`: the
  paired median of bare / floor, the best ratio to bare a CLI (`io`) or a function
  (`io_in_process`) could reach on this machine; `share_of_floor`: floor / ours.

Every path runs `--repeats` times, interleaved. Thread counts are onnxruntime's
defaults in every path.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# The floor's process (and function): read the CSV, write the same output table. Only
# pyarrow and numpy; label strings built from buffers (pa.array would import pandas).
FLOOR_CODE = r"""
import sys
import numpy as np, pyarrow as pa, pyarrow.csv as pcsv

def io_floor(src, npy, dst, classes, schema_cols, numeric):
    t = pcsv.read_csv(src, convert_options=pcsv.ConvertOptions(
        column_types={n: pa.float64() for n in numeric}, strings_can_be_null=False))
    probs = np.load(npy)
    keep = [n for n in t.column_names if n not in schema_cols]
    data = [c.encode() for c in classes]
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    names = pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets),
                                                           pa.py_buffer(b"".join(data))])
    best = np.argmax(probs, axis=1).astype(np.int32)
    label = names.take(pa.Array.from_buffers(pa.int32(), len(best), [None, pa.py_buffer(best)]))
    cols = [t.column(n) for n in keep]
    cols += [pa.Array.from_buffers(pa.float32(), len(probs), [None, pa.py_buffer(
        np.ascontiguousarray(probs[:, j]))]) for j in range(probs.shape[1])]
    out = pa.Table.from_arrays(cols + [label], names=keep + [f"p_{c}" for c in classes]
                               + ["predicted"])
    pcsv.write_csv(out, dst, write_options=pcsv.WriteOptions(batch_size=65536))

if __name__ == "__main__":
    io_floor(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","),
             set(sys.argv[5].split(",")), sys.argv[6].split(",") if sys.argv[6] else [])
"""
START_CODE = "import numpy, pyarrow.csv, pyarrow.compute, onnxruntime"


def _strings_graph(cats: list[dict]) -> object:
    """An ONNX graph mapping each categorical column's text to its vocabulary code, the
    way the export's graph begins (node/ops/export_onnx.py: a LabelEncoder per column)."""
    from onnx import TensorProto, helper

    nodes, inputs, outputs = [], [], []
    for c in cats:
        vocab = [str(v) for v in c["vocabulary"]]
        nodes.append(helper.make_node("LabelEncoder", [c["name"]], [f"{c['name']}_code"],
                                      domain="ai.onnx.ml", keys_strings=vocab,
                                      values_int64s=list(range(len(vocab))),
                                      default_int64=len(vocab)))
        inputs.append(helper.make_tensor_value_info(c["name"], TensorProto.STRING, ["N"]))
        outputs.append(helper.make_tensor_value_info(f"{c['name']}_code", TensorProto.INT64,
                                                     ["N"]))
    return helper.make_model(helper.make_graph(nodes, "strings", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("ai.onnx.ml", 3)])


def _peak_rss_mb(proc: subprocess.Popen) -> int:
    """The process's own peak RSS (VmHWM of its address space, read until it exits; its
    ru_maxrss would count the pages of this big parent it was forked from)."""
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                if b"node.cli" not in f.read():  # not exec'd yet: still the parent's pages
                    continue
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
        time.sleep(0.02)
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "predict.json"))
    args = p.parse_args()

    import onnxruntime as ort
    import pandas as pd
    import pyarrow.csv as pcsv
    import torch

    from node.cli import main as cli
    from node.data.encode import encode
    from node.ops import export_onnx
    from node.ops.export import load_member
    from node.ops.predict import (
        CHUNK_ROWS,
        Scorer,
        _chunks,
        _scored,
        onnx_session,
        raw_inputs,
        score_table,
    )

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim = tmp / "sim"
        with open(os.devnull, "w") as null:
            old = sys.stdout
            sys.stdout = null
            try:
                cli(["simulate", "--dataset", "default", "--nodes", "2", "--rounds", "2",
                     "--out", str(sim)])
                cli(["export", str(sim / "state" / "bank-0"), "--out", str(tmp / "model")])
            finally:
                sys.stdout = old
        export_files = {f.name: f.stat().st_size for f in sorted((tmp / "model").iterdir())}
        export_bytes = sum(export_files.values())
        from node.rehearsal.simulation.datasets import load_demo

        df, label, _ = load_demo("default")
        rng = np.random.default_rng(0)
        big = df.iloc[rng.integers(0, len(df), args.rows)].reset_index(drop=True)
        csv = tmp / "rows.csv"
        big.to_csv(csv, index=False)
        member = load_member(sim / "state" / "bank-0")
        X, _ = encode(big, member.schema, "rows")
        net = tmp / "net.onnx"
        net.write_bytes(export_onnx.network_onnx(member.network, X.shape[1]).SerializeToString())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        bare = onnx_session(net)
        bare_defaults = ort.InferenceSession(str(net), sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        scorer = Scorer(tmp / "model")
        raw = {c["name"]: (big[c["name"]].to_numpy(np.float64) if c["kind"] == "numeric"
                           else big[c["name"]].astype(str).to_numpy(object))
               for c in scorer.columns}
        cats = [c for c in scorer.columns if c["kind"] == "categorical"]
        strings_onnx = tmp / "strings.onnx"
        strings_onnx.write_bytes(_strings_graph(cats).SerializeToString())
        strings = onnx_session(strings_onnx)
        times: dict[str, list[float]] = {"function": [], "cli": [], "in_memory": [], "bare": [],
                                         "bare_ort_defaults": [], "strings": []}
        stages: dict[str, list[float]] = {"read": [], "columns": [], "graph": [], "write": []}
        numeric = frozenset(c["name"] for c in scorer.columns if c["kind"] == "numeric")
        if "numeric" in inspect.signature(_chunks).parameters:
            chunks = _chunks
        else:  # the code before the typed CSV reader: the same script measures it too
            def chunks(path, rows, _numeric):  # noqa: ANN001, ANN202
                return _chunks(path, rows)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        rss: list[int] = []
        # the floor's inputs: the scores as the model gives them, the columns by kind
        npy = tmp / "probs.npy"
        np.save(npy, np.concatenate([scorer.score({k: v[i:i + CHUNK_ROWS] for k, v in
                                                   raw.items()})
                                     for i in range(0, len(X), CHUNK_ROWS)]))
        floor_args = [str(csv), str(npy), str(tmp / "floor.csv"), ",".join(scorer.classes),
                      ",".join(c["name"] for c in scorer.columns), ",".join(sorted(numeric))]
        floor_ns: dict = {}
        exec(compile(FLOOR_CODE, "io_floor", "exec"), floor_ns)  # noqa: S102 - our own code
        floors: dict[str, list[float]] = {"start": [], "io": [], "io_in_process": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", START_CODE], check=True)
            floors["start"].append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", FLOOR_CODE, *floor_args], check=True)
            floors["io"].append(time.perf_counter() - t)
            t = time.perf_counter()
            floor_ns["io_floor"](str(csv), str(npy), str(tmp / "floor_in.csv"),
                                 scorer.classes, {c["name"] for c in scorer.columns},
                                 sorted(numeric))
            floors["io_in_process"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, len(X), CHUNK_ROWS):
                bare.run(None, {"features": X[i:i + CHUNK_ROWS]})
            times["bare"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, len(X), CHUNK_ROWS):
                bare_defaults.run(None, {"features": X[i:i + CHUNK_ROWS]})
            times["bare_ort_defaults"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, len(X), CHUNK_ROWS):
                strings.run(None, {c["name"]: raw[c["name"]][i:i + CHUNK_ROWS] for c in cats})
            times["strings"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, len(X), CHUNK_ROWS):
                scorer.score({k: v[i:i + CHUNK_ROWS] for k, v in raw.items()})
            times["in_memory"].append(time.perf_counter() - t)
            t = time.perf_counter()
            score_table(scorer, csv, tmp / "scores.csv", progress=False)
            times["function"].append(time.perf_counter() - t)
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "node.cli", "predict", "--model",
                                     str(tmp / "model"), "--data", str(csv), "--out",
                                     str(tmp / "scores_cli.csv")], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rss.append(_peak_rss_mb(proc))
            times["cli"].append(time.perf_counter() - t)
            assert proc.returncode == 0, "flnode predict failed"
            t = time.perf_counter()
            batches = list(chunks(csv, CHUNK_ROWS, numeric)[0])
            stages["read"].append(time.perf_counter() - t)
            t = time.perf_counter()
            raws = [raw_inputs(b, scorer, 1, True, str(csv))[0] for b in batches]
            stages["columns"].append(time.perf_counter() - t)
            t = time.perf_counter()
            probs = [scorer.score(r) for r in raws]
            stages["graph"].append(time.perf_counter() - t)
            t = time.perf_counter()
            tables = [_scored(b, p, scorer, str(csv))[0] for b, p in zip(batches, probs, strict=True)]
            with pcsv.CSVWriter(tmp / "stage.csv", tables[0].schema, write_options=(
                    pcsv.WriteOptions(batch_size=CHUNK_ROWS))) as w:
                for table in tables:
                    w.write_table(table)
            stages["write"].append(time.perf_counter() - t)
            del batches, raws, probs, tables
        # the scores of both paths agree with the network on the node's own encoding
        probs = pd.read_csv(tmp / "scores.csv")[[f"p_{c}" for c in scorer.classes]].to_numpy()
        logits = np.concatenate([bare.run(None, {"features": X[i:i + CHUNK_ROWS]})[0]
                                 for i in range(0, len(X), CHUNK_ROWS)])
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        agree = float(np.max(np.abs(probs - e / e.sum(axis=1, keepdims=True))))
        same_cli = (tmp / "scores.csv").read_bytes() == (tmp / "scores_cli.csv").read_bytes()
        same_floor = (tmp / "scores.csv").read_bytes() == (tmp / "floor.csv").read_bytes() \
            == (tmp / "floor_in.csv").read_bytes()
        csv_bytes = csv.stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    rps = {k: round(args.rows / v) for k, v in med.items()}
    rps_best = {k: round(args.rows / v) for k, v in best.items()}
    doc = {"rows": args.rows, "csv_bytes": csv_bytes, "export_bytes": export_bytes,
           "export_files": export_files,
           "repeats": args.repeats, "chunk_rows": CHUNK_ROWS, "seconds_median": med,
           "seconds_all": times, "rows_per_s": rps,
           "ratio_to_bare": {k: round(rps[k] / rps["bare"], 3) for k in rps},
           "rows_per_s_best": rps_best,
           "ratio_to_bare_paired": {k: round(statistics.median(
               b / t for b, t in zip(times["bare"], v, strict=True)), 3)
               for k, v in times.items()},
           "ratio_to_bare_best": {k: round(rps_best[k] / rps_best["bare"], 3) for k in rps},
           "goal": "function and cli >= 0.5x bare",
           "stages_seconds_median": {k: round(statistics.median(v), 3)
                                     for k, v in stages.items()},
           "stages_seconds_all": stages,
           "max_abs_difference_vs_bare": agree, "cli_peak_rss_mb": max(rss),
           "cli_output_identical": same_cli,
           "ort_threads": "onnxruntime default", "cpus": os.cpu_count()}
    def paired(num: list[float], den: list[float]) -> float:
        return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 3)

    doc["floor"] = {
        "seconds_median": {k: round(statistics.median(v), 3) for k, v in floors.items()},
        "seconds_all": floors,
        "rows_per_s": {k: round(args.rows / statistics.median(v)) for k, v in floors.items()
                       if k != "start"},
        "ceiling_ratio": {"cli": paired(times["bare"], floors["io"]),
                          "function": paired(times["bare"], floors["io_in_process"]),
                          "start_alone": paired(times["bare"], floors["start"])},
        "share_of_floor": {"cli": paired(floors["io"], times["cli"]),
                           "function": paired(floors["io_in_process"], times["function"])},
        "floor_output_identical": same_floor}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

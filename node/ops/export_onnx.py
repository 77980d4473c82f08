"""The ONNX export: raw columns in, probabilities out (node/ops/export.py says what).

The network alone goes through torch's exporter (torch.onnx.export, dynamo); the
preprocessing is a graph built here with onnx.helper from the export's preprocessing
spec, and the two are joined into one model with the network's names prefixed:

- the numeric columns (inputs float64 [N]), joined into one [N, k] block so that each
  step is one operation for all of them: the fill where empty (IsNaN/Where), a 0/1
  indicator of the empty cells where the schema asks, Min/Max to the declared range (only
  if a column has one), (x - mean) / std (0 where std is 0); not finite after the fill,
  or beyond FAR standard deviations: the row is invalid;
- a categorical column (input string [N], "" for an empty cell): ai.onnx.ml LabelEncoder
  to its code (its fill's code where empty; -1 outside the vocabulary; -2 empty without a
  fill: invalid), then its one-hot by one Gather from a [k + 2, k] table (the codes -2
  and -1 index its two rows of zeros from the end);
- the features cast to float32 into the network (the arithmetic before is float64, as
  node/data/encode.py's) and put in the node's order by one Concat; Softmax; NaN
  probabilities in the invalid rows (a per-row term, 0 or NaN, added to them).

Every choice above was timed: onnxruntime runs each node over the whole chunk, so fewer,
cheaper nodes (no int casts, reductions over booleans or float64 Gather) are most of the
preprocessing's cost. The probabilities are bitwise those of the first graph (one-hot by
Equal, Gather to reorder, a Where factor): checked on 7 schemas x 50,000 hostile rows.

Output: "probabilities" float32 [N, classes], in the schema's class order (the manifest
lists it). No label output: onnxruntime computes every node of a graph, and a string
label per row cost 30 % of the scoring time (argmax the probabilities instead).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from gossip.errors import LocalError
from node.ops.export import FAR

MODEL_FILE = "model.onnx"
ML_OPSET = 3  # ai.onnx.ml: LabelEncoder with keys_strings / values_int64s
MISSING_CODE = -2  # an empty categorical cell without a fill policy
UNSEEN_CODE = -1  # a category outside the vocabulary
# The network's names in the joined graph start with this (no schema column does: the
# preprocessing's own names start with "pre/" and "post/").
NET_PREFIX = "net/"


class _Graph:
    """A growing list of nodes and constants with fresh names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"pre/{self.n}/{hint}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        name = self.name(hint)
        arr = np.array(value, dtype=dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op: str, inputs: list[str], hint: str = "", domain: str = "",
           **attrs: Any) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain, **attrs))
        return out


def _numerics(g: _Graph, cols: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """Every numeric column at once, as one [N, k] float64 block (a dozen operations per
    chunk, not a dozen per column): (standardized values [N, k] float32, indicators
    [N, m] float32 or None, invalid rows as a [N, 1] float32 term: 0, NaN where invalid).
    Per-column constants are vectors; a column without a fill fills NaN (stays empty, so
    invalid), without a range is not clipped, with std 0 is divided by 1 and multiplied
    by 0 (the node encodes it as 0)."""
    axes = g.const([1], np.int64, "axes")
    x = g.op("Concat", [g.op("Unsqueeze", [c["name"], axes]) for c in cols], "numeric", axis=1)

    def vec(values: list[float], hint: str) -> str:
        return g.const([values], np.float64, hint)

    fills = any(c["fill"] is not None for c in cols)
    nan = g.op("IsNaN", [x], "empty") if fills or any(c["indicator"] for c in cols) else ""
    xf = x if not fills else g.op(
        "Where", [nan, vec([math.nan if c["fill"] is None else float(c["fill"])
                            for c in cols], "fill"), x], "filled")
    # A row with a bad value computes on (NaN or inf through the network stays in its own
    # row) and is masked at the end: no Where to clean it here.
    ranged = any(c["range"] is not None for c in cols)
    if ranged:  # a clip makes inf finite: test "not finite" before it
        lo = [c["range"][0] if c["range"] is not None else -math.inf for c in cols]
        hi = [c["range"][1] if c["range"] is not None else math.inf for c in cols]
        bad = g.op("Or", [g.op("IsNaN", [xf]), g.op("IsInf", [xf])], "not_finite")
        xf = g.op("Max", [g.op("Min", [xf, vec(hi, "hi")]), vec(lo, "lo")], "clipped")
    z = g.op("Div", [g.op("Sub", [xf, vec([c["mean"] for c in cols], "mean")]),
                     vec([c["std"] if c["std"] != 0 else 1.0 for c in cols], "std")], "z")
    if any(c["std"] == 0 for c in cols):
        z = g.op("Mul", [z, vec([0.0 if c["std"] == 0 else 1.0 for c in cols], "keep")], "z")
    far = g.const(FAR, np.float64, "far")
    if ranged:
        bad = g.op("Or", [bad, g.op("Greater", [g.op("Abs", [z]), far])], "bad")
    else:  # unclipped, NaN or inf in a cell is NaN or inf in z: one test finds all three
        bad = g.op("Not", [g.op("LessOrEqual", [g.op("Abs", [z]), far])], "bad")
    # 0 or NaN per cell, summed per row: NaN in a row with any bad cell (no integer casts
    # and reductions)
    invalid = g.op("ReduceSum", [g.op("Where", [bad, g.const(np.nan, np.float32, "nan"),
                                               g.const(0.0, np.float32, "zero")]), axes],
                   "invalid", keepdims=1)
    which = [i for i, c in enumerate(cols) if c["indicator"]]
    ind = None if not which else g.op("Cast", [g.op(
        "Gather", [nan, g.const(which, np.int64, "indicators")], axis=1)], "indicator",
        to=TensorProto.FLOAT)
    return g.op("Cast", [z], "z32", to=TensorProto.FLOAT), ind, invalid


def _categorical(g: _Graph, x: str, c: dict[str, Any]) -> tuple[str, str | None]:
    """(one-hot [N, k] float32, invalid rows as a [N, 1] term or None): the code from
    ai.onnx.ml LabelEncoder, then one Gather from a table whose rows are the one-hots,
    a row of zeros for MISSING_CODE and one for UNSEEN_CODE (Gather counts a negative
    index from the end: -1 is the last row, -2 the one before)."""
    vocab = list(c["vocabulary"])
    # an empty cell is empty, even if "" is in the vocabulary (the node reads it so)
    keys = [v for v in vocab if v != ""]
    values = [vocab.index(v) for v in keys]
    keys.append("")
    values.append(vocab.index(c["fill"]) if c["fill"] is not None else MISSING_CODE)
    codes = g.op("LabelEncoder", [x], "code", domain="ai.onnx.ml", keys_strings=keys,
                 values_int64s=values, default_int64=UNSEEN_CODE)
    k = len(vocab)
    rows = k + 2  # the k one-hots, then the rows of MISSING_CODE and UNSEEN_CODE
    assert (rows + MISSING_CODE, rows + UNSEEN_CODE) == (k, k + 1)
    table = np.zeros((rows, k), dtype=np.float32)
    table[np.arange(k), np.arange(k)] = 1.0
    hot = g.op("Gather", [g.const(table, np.float32, "onehots"), codes], "onehot", axis=0)
    if c["fill"] is not None:
        return hot, None
    term = np.zeros((rows, 1), dtype=np.float32)
    term[rows + MISSING_CODE] = np.nan
    return hot, g.op("Gather", [g.const(term, np.float32, "empty"), codes], "invalid", axis=0)


def network_onnx(network: torch.nn.Module, n_features: int) -> onnx.ModelProto:
    """The network alone, through torch's exporter (batch dimension dynamic)."""
    import io  # lean start: only an export writes through a buffer
    import logging
    import warnings

    network.eval()
    example = (torch.zeros(2, n_features),)
    buf = io.BytesIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                network, example, input_names=["features"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                optimize=True, verbose=False, report=False)
        program.save(buf)  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; one message
        raise LocalError(f"torch's ONNX exporter could not export this network "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
    finally:
        quiet.setLevel(level)
    return onnx.load_from_string(buf.getvalue())


def _in_order(g: _Graph, blocks: list[tuple[str, list[int]]], n_features: int) -> None:
    """NET_PREFIX + "features" [N, n_features] float32 from blocks (name, the node's
    feature position of each of its columns): one Concat of the blocks, or of their runs
    of adjacent columns (Slice), in the node's order; no Gather over the rows."""
    where: dict[int, tuple[int, int]] = {}  # feature position -> (block, its column)
    for b, (_, places) in enumerate(blocks):
        for j, p in enumerate(places):
            where[p] = (b, j)
    if sorted(where) != list(range(n_features)):
        raise LocalError(f"the preprocessing spec places {len(where)} features, the "
                         f"network takes {n_features}: a broken export spec")
    runs: list[list[int]] = []  # [block, first column, last column + 1]
    for p in range(n_features):
        b, j = where[p]
        if runs and runs[-1][0] == b and runs[-1][2] == j:
            runs[-1][2] = j + 1
        else:
            runs.append([b, j, j + 1])
    parts = []
    for b, start, end in runs:
        name, places = blocks[b]
        parts.append(name if (start, end) == (0, len(places)) else g.op(
            "Slice", [name, g.const([start], np.int64, "start"),
                      g.const([end], np.int64, "end"), g.const([1], np.int64, "axes")]))
    g.nodes.append(helper.make_node("Concat" if len(parts) > 1 else "Identity", parts,
                                    [NET_PREFIX + "features"], **(
                                        {"axis": 1} if len(parts) > 1 else {})))


def build(network: torch.nn.Module, spec: dict[str, Any]) -> onnx.ModelProto:
    """The whole model: preprocessing, the network, softmax."""
    net = network_onnx(network, spec["n_features"])
    net = onnx.compose.add_prefix(net, NET_PREFIX)
    g = _Graph()
    inputs = [helper.make_tensor_value_info(
        c["name"], TensorProto.DOUBLE if c["kind"] == "numeric" else TensorProto.STRING, ["N"])
        for c in spec["columns"]]
    # Each column's place in the node's feature order: its features in schema order, a
    # numeric column's indicator right after it.
    place, at = {}, 0
    for c in spec["columns"]:
        place[c["name"]] = at
        at += (2 if c["indicator"] else 1) if c["kind"] == "numeric" else len(c["vocabulary"])
    nums = [c for c in spec["columns"] if c["kind"] == "numeric"]
    blocks: list[tuple[str, list[int]]] = []  # float32 [N, width], each column's place
    invalid: list[str] = []  # [N, 1] float32 terms: 0, NaN in a row the node refuses
    if nums:
        z, ind, bad = _numerics(g, nums)
        blocks.append((z, [place[c["name"]] for c in nums]))
        if ind is not None:
            blocks.append((ind, [place[c["name"]] + 1 for c in nums if c["indicator"]]))
        invalid.append(bad)
    for c in spec["columns"]:
        if c["kind"] != "numeric":
            hot, bad = _categorical(g, c["name"], c)
            blocks.append((hot, [place[c["name"]] + j for j in range(len(c["vocabulary"]))]))
            if bad is not None:
                invalid.append(bad)
    _in_order(g, blocks, spec["n_features"])
    pre = len(g.nodes)  # the nodes before the network's; the rest come after it
    probs = g.op("Softmax", [NET_PREFIX + "logits"], "probs", axis=1)
    if not invalid:
        g.nodes.append(helper.make_node("Identity", [probs], ["probabilities"]))
    else:
        # p + 0 is p, p + NaN is NaN: a per-row term broadcast over the classes (a
        # broadcast Where on [N, classes] was the slowest operation of the graph)
        term = invalid[0]
        for t in invalid[1:]:
            term = g.op("Add", [term, t], "invalid")
        g.nodes.append(helper.make_node("Add", [probs, term], ["probabilities"]))
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                             ["N", len(spec["classes"])])]
    graph = helper.make_graph(
        g.nodes[:pre] + list(net.graph.node) + g.nodes[pre:],
        "flnode_export", inputs, outputs,
        initializer=g.inits + list(net.graph.initializer))
    opsets = {o.domain: o.version for o in net.opset_import}
    opsets["ai.onnx.ml"] = ML_OPSET
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in sorted(opsets.items())],
                              producer_name="flnode export")
    model.ir_version = net.ir_version
    model.functions.extend(net.functions)
    onnx.checker.check_model(model, full_check=True)
    return model


def write(network: torch.nn.Module, spec: dict[str, Any], out: Path) -> list[str]:
    model = build(network, spec)
    (out / MODEL_FILE).write_bytes(model.SerializeToString())
    return [MODEL_FILE]

"""The ONNX export: raw columns in, probabilities out (node/ops/export.py says what).

The network alone goes through torch's exporter (torch.onnx.export, dynamo); the
preprocessing is a graph built here with onnx.helper from the export's preprocessing
spec, and the two are joined into one model with the network's names prefixed:

- the numeric columns (inputs float64 [N]), joined into one [N, k] block so that each
  step is one operation for all of them: the fill where empty (IsNaN/Where), a 0/1
  indicator of the empty cells where the schema asks, Min/Max to the declared range,
  (x - mean) / std (0 where std is 0); not finite after the fill, or beyond FAR standard
  deviations: the row is invalid;
- a categorical column (input string [N], "" for an empty cell): ai.onnx.ml LabelEncoder
  to its code (its fill's code where empty; -1 outside the vocabulary; -2 empty without a
  fill: invalid), then one-hot by Equal against 0..k-1 (all zeros for -1);
- the features put in the node's order (Gather), float64 as the node encodes, cast to
  float32 into the network; Softmax; NaN probabilities in the invalid rows.

Output: "probabilities" float32 [N, classes], in the schema's class order (the manifest
lists it). No label output: onnxruntime computes every node of a graph, and a string
label per row cost 30 % of the scoring time (argmax the probabilities instead).
Arithmetic before the network is float64, as node/data/encode.py's.
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
    chunk, not a dozen per column): (standardized values [N, k], indicators [N, m] or
    None, invalid rows [N]). Per-column constants are vectors; a column without a fill
    fills NaN (stays empty, so invalid), without a range clips to +-inf, with std 0
    is divided by 1 and multiplied by 0 (the node encodes it as 0)."""
    axes = g.const([1], np.int64, "axes")
    x = g.op("Concat", [g.op("Unsqueeze", [c["name"], axes]) for c in cols], "numeric", axis=1)

    def vec(values: list[float], hint: str) -> str:
        return g.const([values], np.float64, hint)

    nan = g.op("IsNaN", [x], "empty")
    xf = x if all(c["fill"] is None for c in cols) else g.op(
        "Where", [nan, vec([math.nan if c["fill"] is None else float(c["fill"])
                            for c in cols], "fill"), x], "filled")
    bad = g.op("Or", [g.op("IsNaN", [xf]), g.op("IsInf", [xf])], "not_finite")
    # A row with a bad value computes on (NaN or inf through the network stays in its own
    # row) and is masked at the end: no Where to clean it here.
    lo = [c["range"][0] if c["range"] is not None else -math.inf for c in cols]
    hi = [c["range"][1] if c["range"] is not None else math.inf for c in cols]
    clipped = g.op("Max", [g.op("Min", [xf, vec(hi, "hi")]), vec(lo, "lo")], "clipped")
    z = g.op("Div", [g.op("Sub", [clipped, vec([c["mean"] for c in cols], "mean")]),
                     vec([c["std"] if c["std"] != 0 else 1.0 for c in cols], "std")], "z")
    if any(c["std"] == 0 for c in cols):
        z = g.op("Mul", [z, vec([0.0 if c["std"] == 0 else 1.0 for c in cols], "keep")], "z")
    far = g.op("Greater", [g.op("Abs", [z]), g.const(FAR, np.float64, "far")], "far")
    bad = g.op("Cast", [g.op("Or", [bad, far])], "bad", to=TensorProto.INT32)
    invalid = g.op("Cast", [g.op("ReduceMax", [bad, axes], keepdims=0)], "invalid",
                   to=TensorProto.BOOL)
    which = [i for i, c in enumerate(cols) if c["indicator"]]
    ind = None if not which else g.op("Cast", [g.op(
        "Gather", [nan, g.const(which, np.int64, "indicators")], axis=1)], "indicator",
        to=TensorProto.DOUBLE)
    return z, ind, invalid


def _categorical(g: _Graph, x: str, c: dict[str, Any]) -> tuple[list[str], str | None]:
    vocab = list(c["vocabulary"])
    # an empty cell is empty, even if "" is in the vocabulary (the node reads it so)
    keys = [v for v in vocab if v != ""]
    values = [vocab.index(v) for v in keys]
    keys.append("")
    values.append(vocab.index(c["fill"]) if c["fill"] is not None else MISSING_CODE)
    codes = g.op("LabelEncoder", [x], "code", domain="ai.onnx.ml", keys_strings=keys,
                 values_int64s=values, default_int64=UNSEEN_CODE)
    hot = g.op("Equal", [g.op("Unsqueeze", [codes, g.const([1], np.int64, "axes")]),
                         g.const([list(range(len(vocab)))], np.int64, "codes")], "hot")
    bad = None if c["fill"] is not None else g.op(
        "Equal", [codes, g.const(MISSING_CODE, np.int64, "missing")], "empty")
    return [g.op("Cast", [hot], "onehot", to=TensorProto.DOUBLE)], bad


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


def build(network: torch.nn.Module, spec: dict[str, Any]) -> onnx.ModelProto:
    """The whole model: preprocessing, the network, softmax."""
    net = network_onnx(network, spec["n_features"])
    net = onnx.compose.add_prefix(net, NET_PREFIX)
    g = _Graph()
    inputs = [helper.make_tensor_value_info(
        c["name"], TensorProto.DOUBLE if c["kind"] == "numeric" else TensorProto.STRING, ["N"])
        for c in spec["columns"]]
    nums = [c for c in spec["columns"] if c["kind"] == "numeric"]
    feats, bads, order = [], [], []  # blocks, invalid-row masks, feature -> its place
    if nums:
        z, ind, bad = _numerics(g, nums)
        feats.append(z)
        bads.append(bad)
        if ind is not None:
            feats.append(ind)
    # Where each feature of the blocks [z | indicators | one-hots...] goes in the node's
    # order (a column's features in schema order, an indicator right after its column).
    place, at = {}, 0
    for c in spec["columns"]:
        place[c["name"]] = at
        at += (2 if c["indicator"] else 1) if c["kind"] == "numeric" else len(c["vocabulary"])
    order = [place[c["name"]] for c in nums]
    order += [place[c["name"]] + 1 for c in nums if c["indicator"]]
    for c in spec["columns"]:
        if c["kind"] != "numeric":
            f, bad = _categorical(g, c["name"], c)
            feats += f
            order += [place[c["name"]] + j for j in range(len(c["vocabulary"]))]
            if bad is not None:
                bads.append(bad)
    perm = np.argsort(np.array(order, dtype=np.int64))  # block position of each feature
    x = g.op("Concat", feats, "blocks", axis=1) if len(feats) > 1 else feats[0]
    if not np.array_equal(perm, np.arange(len(perm))):
        x = g.op("Gather", [x, g.const(perm, np.int64, "order")], "features64", axis=1)
    g.nodes.append(helper.make_node("Cast", [x], [NET_PREFIX + "features"],
                                    to=TensorProto.FLOAT))
    pre = len(g.nodes)  # the nodes before the network's; the rest come after it
    invalid = bads[0] if bads else None
    for b in bads[1:]:
        invalid = g.op("Or", [invalid, b], "invalid")
    probs = g.op("Softmax", [NET_PREFIX + "logits"], "probs", axis=1)
    if invalid is None:
        g.nodes.append(helper.make_node("Identity", [probs], ["probabilities"]))
    else:
        # NaN x p is NaN, 1 x p is p: a per-row factor (a broadcast Where on [N, classes]
        # was the slowest operation of the graph)
        factor = g.op("Where", [invalid, g.const(np.nan, np.float32, "nan"),
                                g.const(1.0, np.float32, "one")], "factor")
        rows = g.op("Unsqueeze", [factor, g.const([1], np.int64, "axes")], "invalid_rows")
        g.nodes.append(helper.make_node("Mul", [probs, rows], ["probabilities"]))
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

"""Export parity for every model kind (tests/model_kind_cases.py MODEL_KINDS): a network of
each kind, trained a few steps so that normalization layers hold non-initial weights,
exported to ONNX (node/ops/export_onnx.py) and TorchScript (node/ops/export_torch.py) with
a schema's preprocessing as `flnode export` builds it, scores 1,000 raw rows to within
1e-5 of the node's own evaluation: node/data/encode.py's encode, the network in eval mode
(dropout off), softmax (node/learn/train.py evaluate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.data.encode import encode
from node.data.table import Table
from node.learn.train import train_local
from node.ops import export_onnx, export_torch
from node.ops.export import preprocessing, raw_from_table, reference
from node.ops.predict import onnx_session
from tests.model_kind_cases import MODEL_KINDS, KindCase
from tests.test_export import MIXED, TOL, mixed_rows

ROWS = 1000  # the bar: 1,000 held-out rows


@pytest.mark.parametrize("case", MODEL_KINDS, ids=[c.id for c in MODEL_KINDS])
def test_every_kind_exports_to_onnx_and_torchscript_as_the_node_evaluates(case: KindCase,
                                                                          tmp_path):
    torch.set_num_threads(1)
    schema = MIXED.for_encoding()
    spec = preprocessing(schema)
    train = mixed_rows(256, seed=5)
    X, y = encode(train, MIXED, "training rows")
    net = case.build(schema.n_features, schema.n_classes, seed=1)
    before = [p.detach().clone() for p in net.parameters()]
    train_local(net, X, y, epochs=2, batch_size=32, lr=0.1,
                generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    net.eval()
    held = mixed_rows(ROWS, seed=6)
    Xh, _ = encode(held, MIXED, "held-out rows")
    want = reference(net, Xh)
    assert want.shape == (ROWS, schema.n_classes) and np.isfinite(want).all()
    if "dropout" in case.options:  # eval mode: two passes agree (dropout off)
        assert np.array_equal(want, reference(net, Xh))
    raw = raw_from_table(Table.from_frame(held), spec)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "ts").mkdir()
    files = export_onnx.write(net, spec, tmp_path / "onnx")
    got_onnx = onnx_session(tmp_path / "onnx" / files[0]).run(["probabilities"], raw)[0]
    files = export_torch.write_script(net, spec, tmp_path / "ts")
    got_ts = export_torch.score_script(tmp_path / "ts" / files[0], raw, spec=spec)
    for backend, got in (("onnx", got_onnx), ("torchscript", got_ts)):
        assert got.shape == want.shape, backend
        diff = float(np.max(np.abs(got.astype(np.float64) - want)))
        assert diff <= TOL, (case.id, backend, diff)

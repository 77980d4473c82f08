#!/usr/bin/env python3
"""What each model kind costs to train, plain and under DP-SGD, in the engine the node
picks for it (node/learn/dpsgd.py dp_engine: the closed-form fast path, or Opacus'
hooks for what the fast path cannot take).

Every kind of tests/model_kind_cases.py MODEL_KINDS (hidden 16), one epoch on --rows
synthetic rows of --features columns, batch 64, sigma 1, one thread; process CPU time,
best of --repeat (a busy machine's wall clock would measure the neighbours). Prints one
JSON object: per kind its parameter count, engine, and milliseconds plain and DP.

    PYTHONPATH=$PWD python scripts/bench_model_kinds.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.learn.dpsgd import dp_engine, train_local_dp_fast  # noqa: E402
from node.learn.train import train_local, train_local_dp  # noqa: E402
from node.privacy.mechanisms import SeededNoise  # noqa: E402
from tests.model_kind_cases import MODEL_KINDS  # noqa: E402


def one_epoch(case, X: np.ndarray, y: np.ndarray, dp: bool) -> float:
    model = case.build(X.shape[1], 2)
    engine = dp_engine(model, "fast")
    start = time.process_time()
    if not dp:
        train_local(model, X, y, epochs=1, batch_size=64, lr=0.1,
                    generator=torch.Generator().manual_seed(0))
    elif engine == "fast":
        train_local_dp_fast(model, X, y, epochs=1, batch_size=64, lr=0.1, clip_norm=1.0,
                            noise_multiplier=1.0, noise=SeededNoise(0))
    else:
        train_local_dp(model, X, y, epochs=1, batch_size=64, lr=0.1, clip_norm=1.0,
                       noise_multiplier=1.0, generator=torch.Generator().manual_seed(0),
                       grad_sample_mode=engine)
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--features", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")  # Opacus' secure_mode notice
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, args.features)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    out = {}
    for case in MODEL_KINDS:
        model = case.build(args.features, 2)
        plain = min(one_epoch(case, X, y, False) for _ in range(args.repeat))
        dp = min(one_epoch(case, X, y, True) for _ in range(args.repeat))
        out[case.id] = {"kind": case.kind, "parameters": sum(p.numel() for p in model.parameters()),
                        "engine": dp_engine(model, "fast"), "plain_ms": round(plain * 1000, 1),
                        "dp_ms": round(dp * 1000, 1), "dp_over_plain": round(dp / plain, 1)}
    print(json.dumps({"rows": args.rows, "features": args.features, "batch_size": 64,
                      "kinds": out}, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Privacy benchmark: utility at ε = 1, 3, 8 vs no DP, DP-SGD cost, and the audit.

1. Utility: `flnode simulate` in-process, 4 members, 30 rounds, seed 0, on
   `default` (dirichlet:0.5), `churn` (column:state) and `digits`
   (dirichlet:0.5), record-level DP at each ε vs privacy off; the consortium
   mean metric (ROC-AUC, or accuracy for digits) and its loss vs no DP.
2. Cost: one member's local round (its rows, 3 epochs, batch 32) with plain
   SGD vs DP-SGD: flnode's closed-form path (`fast`, node/learn/dpsgd.py) and
   Opacus in each grad_sample_mode, best of --repeat, in the same process (a
   ratio, not an absolute time).
3. Audit: `scripts/privacy_audit.py`'s default setting.

Prints tables; --json prints only one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.data.encode import encode  # noqa: E402
from node.data.schema import fit_schema  # noqa: E402
from node.learn.dpsgd import train_local_dp_fast  # noqa: E402
from node.learn.models import build_model  # noqa: E402
from node.learn.train import train_local, train_local_dp  # noqa: E402
from node.privacy.mechanisms import OsNoise  # noqa: E402
from node.rehearsal.simulation.datasets import load_demo  # noqa: E402
from node.rehearsal.simulation.output import simulate  # noqa: E402
from node.rehearsal.simulation.spec import SimulationSpec  # noqa: E402

DATASETS = {"default": "dirichlet:0.5", "churn": "column:state", "digits": "dirichlet:0.5"}


def utility(datasets: list[str], epsilons: list[float], rounds: int, log) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in datasets:
            out[ds] = {}
            for eps in [None, *epsilons]:
                key = "off" if eps is None else f"{eps:g}"
                t0 = time.perf_counter()
                s = simulate(SimulationSpec(
                    dataset=ds, nodes=4, partition=DATASETS[ds], rounds=rounds, seed=0,
                    out=Path(tmp) / f"{ds}-{key}", privacy="off" if eps is None else "record",
                    epsilon=eps, sigma=None), Console(quiet=True))
                out[ds][key] = {"metric": s["metric"], "consortium": round(s["consortium"]["mean"], 4),
                                "epsilon_max": None if eps is None else
                                round(max(s["epsilon"]["per_node"].values()), 4),
                                "seconds": round(time.perf_counter() - t0, 1)}
                log(f"  {ds:<8} {key:>4}: {s['metric']} {out[ds][key]['consortium']:.4f} "
                    f"({out[ds][key]['seconds']} s)")
            for r in out[ds].values():
                r["loss_vs_off"] = round(out[ds]["off"]["consortium"] - r["consortium"], 4)
    return out


def cost(repeat: int, log) -> dict:
    df, label, cat = load_demo("default")
    X, y = encode(df.iloc[:4459], fit_schema(df, label, cat))  # bank-0's size in the demo
    timings = {}
    for mode in ["plain", "fast", "hooks", "ew", "functorch"]:
        best = float("inf")
        for _ in range(repeat + 1):  # the first run pays warm-up; best-of hides it
            model = build_model("mlp", X.shape[1], 2, 64, seed=0)
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            if mode == "plain":
                train_local(model, X, y, epochs=3, batch_size=32, lr=0.05, generator=gen)
            elif mode == "fast":
                train_local_dp_fast(model, X, y, epochs=3, batch_size=32, lr=0.05, clip_norm=1.0,
                                    noise_multiplier=1.0, noise=OsNoise())
            else:
                train_local_dp(model, X, y, epochs=3, batch_size=32, lr=0.05, clip_norm=1.0,
                               noise_multiplier=1.0, generator=gen, grad_sample_mode=mode)
            best = min(best, time.perf_counter() - t0)
        timings[mode] = best
    out = {m: {"seconds": round(t, 4), "vs_plain": round(t / timings["plain"], 2)}
           for m, t in timings.items()}
    log("  local round, 4459 rows x 3 epochs: " + ", ".join(
        f"{m} {v['seconds']:.3f} s ({v['vs_plain']}x)" for m, v in out.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="default,churn,digits")
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-audit", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    def log(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    import warnings

    warnings.simplefilter("ignore")
    result = {"cost": cost(args.repeat, log),
              "utility": utility(args.datasets.split(","),
                                 [float(e) for e in args.epsilons.split(",")], args.rounds, log)}
    if not args.skip_audit:
        from scripts.privacy_audit import run as audit_run

        audit_args = argparse.Namespace(dataset="digits", members=200, epochs=150, batch_size=32,
                                        lr=0.1, hidden=256, clip=1.0, epsilons=[1.0, 3.0, 8.0],
                                        repeats=3, seed=0, seed_noise=False, json=True)
        result["audit"] = audit_run(audit_args)[0]
        log("  audit: " + ", ".join(f"{k} AUC {v['attack_auc']:.3f}"
                                    for k, v in result["audit"].items()))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Skewed members under record-level DP (issue 13, the DP half): the consortium at
epsilon per member next to centralized DP-SGD at the same epsilon on the pooled rows.

Same tables, partitions, model and rounds as scripts/bench_skew.py (its helpers are
imported): `default` (dirichlet 0.5, ROC-AUC), `churn` (column:state, ROC-AUC),
`digits` (dirichlet 0.5, accuracy), 8 members, 30 rounds, plain `mean` with the
consortium's default weight cap, every share weighed by its noised row count
(privacy.weight = "noised": rows + N(0, 10²), charged once). Per table and seed:

- centralized: the pooled training rows, no DP (bench_skew.centralized);
- centralized DP-SGD: the pooled rows, the same model and initial weights, the same
  mechanism (node.dpsgd, Poisson sampling) and accountant (Opacus' RDP, delta 1e-5),
  sigma calibrated for the pooled rows' q and steps (no count release: nothing is
  shared). Twice: the fixed recipe (batch 32, lr 0.05, 30 epochs) and the auto rule
  (node/recipe.py) applied to the pooled row count;
- FedAvg without DP (the reference for what DP costs each member);
- FedAvg, record DP at epsilon per member, privacy.recipe = "fixed" (today's);
- FedAvg, record DP, privacy.recipe = "auto";
- FedAvgM (server momentum 0.9, bench_skew's choice without DP), recipe "auto":
  the server step is post-processing of released shares, no extra cost.

Per member (first seed): its training rows, sigma, batch size, lr, epochs, the
epsilon its ledger spent, and what privacy costs it in metric: the final model its
node holds under DP minus the one it holds without DP, both on the member's own
held-out rows (NaN where those rows hold one class only: ROC-AUC is undefined).

    .venv/bin/python scripts/bench_skew_dp.py               # 1 seed
    .venv/bin/python scripts/bench_skew_dp.py --seeds 3
    .venv/bin/python scripts/bench_skew_dp.py --tables digits --rounds 3   # a smoke run

Writes runs/bench/skew_dp.json, prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_skew import TABLES, _mean, centralized  # noqa: E402

DELTA = 1e-5
MOMENTUM = {"server_opt": "momentum", "server_momentum": 0.9, "server_lr": 1.0}
# label -> (privacy mode, recipe, server params)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "fedavg (no DP)": ("off", "fixed", {}),
    "fedavg dp fixed": ("record", "fixed", {}),
    "fedavg dp auto": ("record", "auto", {}),
    "fedavgm dp auto": ("record", "auto", MOMENTUM),
}


def consortium(table: str, seed: int, rounds: int, epsilon: float, privacy: str, recipe: str,
               params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One consortium run; the final metrics and, per member, what its plan chose."""
    import numpy as np
    import torch

    from node.simulation import SimulationSpec, evaluate_rows, prepare, run_consortium
    from node.train import evaluate, metric_name

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="skewdp-", dir=workdir))
    t0 = time.perf_counter()
    try:
        spec = SimulationSpec(
            dataset=table, nodes=8, partition=TABLES[table], rounds=rounds, seed=seed, out=out,
            aggregation="mean", aggregation_params=params, round_deadline_s=300.0,
            privacy=privacy, epsilon=epsilon if privacy != "off" else None,
            sigma=None if privacy != "off" else 1.0, delta=DELTA, recipe=recipe)
        prep = prepare(spec)
        metric = metric_name(prep.schema.n_classes)
        nodes = asyncio.run(run_consortium(spec, prep))
        members = {}
        finals = []
        for i, n in enumerate(nodes):
            final = evaluate(n.model, *prep.test)[metric]
            finals.append(final)
            plan = n.budget.plan
            tc = n.cfg.training
            epochs, batch, lr = (plan.training(tc.epochs, tc.batch_size, tc.lr) if plan
                                 else (tc.epochs, tc.batch_size, tc.lr))
            members[n.name] = {
                "rows": int(len(n.train_data.X)), "final": final,
                "own": evaluate_rows(n.model, prep.own_parts[i])[metric],
                "own_rows": int(len(prep.own_parts[i][1])),
                "sigma": plan.noise_multiplier if plan else None,
                "sample_rate": plan.sample_rate if plan else None,
                "batch_size": batch, "epochs": epochs, "lr": lr,
                "noise_ratio": (plan.noise_multiplier / (plan.sample_rate * len(n.train_data.X))
                                if plan else None),
                "epsilon": n.epsilon(), "stopped": n.stopped}
        return {"metric": metric, "final": float(np.mean(finals)), "members": members,
                "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def centralized_dp(table: str, seed: int, rounds: int, epsilon: float, recipe: str,
                   workdir: Path) -> dict[str, Any]:
    """DP-SGD on the pooled training rows for `rounds` epochs (x the recipe's epochs)."""
    import torch

    from node.dpsgd import train_local_dp_fast
    from node.models import build_model
    from node.privacy import SeededNoise, calibrate_sigma, epsilon_of, plan_history
    from node.recipe import choose
    from node.simulation import SimulationSpec, init_seed_from, prepare
    from node.train import evaluate, metric_name

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="skewdp-c-", dir=workdir))
    try:
        spec = SimulationSpec(dataset=table, nodes=8, partition=TABLES[table], rounds=rounds,
                              seed=seed, out=out, aggregation="mean")
        prep = prepare(spec)
        X, y = prep.train_all
        n = len(y)

        def sigma_for(q: float, spr: int) -> float:
            return calibrate_sigma(epsilon, DELTA, "record", q, spr, rounds, None)

        if recipe == "auto":
            r = choose(n, spec.batch_size, spec.lr, spec.epochs, sigma_for)
            batch, lr, epochs, sigma, q, spr = (r.batch_size, r.lr, r.epochs, r.sigma,
                                                r.sample_rate, r.steps_per_round)
        else:
            batch, lr, epochs = spec.batch_size, spec.lr, spec.epochs
            per = max(1, math.ceil(n / batch))
            q, spr = 1.0 / per, epochs * per
            sigma = sigma_for(q, spr)
        model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes,
                            spec.hidden, seed=init_seed_from(prep.consortium))
        history = train_local_dp_fast(model, X, y, epochs=epochs * rounds, batch_size=batch,
                                      lr=lr, clip_norm=spec.clip, noise_multiplier=sigma,
                                      noise=SeededNoise(seed * 7919 + 99))
        (s, q_done, steps), = history
        assert (s, q_done, steps) == (sigma, q, spr * rounds)
        spent = epsilon_of(plan_history("record", sigma, q, spr, rounds, None), DELTA)
        return {"final": evaluate(model, *prep.test)[metric_name(prep.schema.n_classes)],
                "rows": n, "batch_size": batch, "lr": lr, "epochs": epochs * rounds,
                "sigma": sigma, "epsilon": spent, "noise_ratio": sigma / (q * n)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default=",".join(TABLES))
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (issue: 3)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epsilon", type=float, default=3.0, help="per member, and centralized")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "skew_dp.json")
    args = ap.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    for t in tables:
        if t not in TABLES:
            ap.error(f"table {t!r}: choose from {', '.join(TABLES)}")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"variant {v!r}: choose from {', '.join(VARIANTS)}")
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        ap.error(f"--epsilon {args.epsilon!r}: a finite number > 0")
    if args.seeds < 1 or args.rounds < 1:
        ap.error("--seeds and --rounds must be at least 1")
    logging.getLogger("flnode").setLevel(logging.CRITICAL)
    seeds = list(range(args.seeds))
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-skew-dp-"))
    results: dict[str, Any] = {}
    try:
        for t in tables:
            res: dict[str, Any] = {"centralized": {}, "runs": {}}
            res["centralized"]["no DP"] = {"per_seed": [centralized(t, s, args.rounds, workdir)
                                                        for s in seeds]}
            for recipe in ("fixed", "auto"):
                cells = [centralized_dp(t, s, args.rounds, args.epsilon, recipe, workdir)
                         for s in seeds]
                res["centralized"][f"dp {recipe}"] = {
                    "per_seed": [c["final"] for c in cells], "seed0": cells[0]}
            for c in res["centralized"].values():
                c["final"] = _mean(c["per_seed"])
                print(f"{t:8s} centralized {c['final']:.4f}", flush=True)
            for v in variants:
                privacy, recipe, params = VARIANTS[v]
                cells = [consortium(t, s, args.rounds, args.epsilon, privacy, recipe, params,
                                    workdir) for s in seeds]
                res["runs"][v] = {"final": _mean([c["final"] for c in cells]),
                                  "per_seed": [c["final"] for c in cells],
                                  "metric": cells[0]["metric"],
                                  "seconds": _mean([c["seconds"] for c in cells]),
                                  "members_seed0": cells[0]["members"]}
                print(f"{t:8s} {v:18s} {res['runs'][v]['final']:.4f} "
                      f"({res['runs'][v]['seconds']:.0f} s)", flush=True)
            base = res["runs"].get("fedavg (no DP)", {}).get("members_seed0")
            if base:  # what DP costs each member, on its own held-out rows (seed 0)
                for run in res["runs"].values():
                    for name, m in run["members_seed0"].items():
                        m["own_cost_vs_no_dp"] = m["own"] - base[name]["own"]
            results[t] = res
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "config": {"tables": {t: TABLES[t] for t in tables}, "nodes": 8, "rounds": args.rounds,
                   "seeds": seeds, "epsilon_per_member": args.epsilon, "delta": DELTA,
                   "accountant": "Opacus RDP (node.privacy.epsilon_of)",
                   "rule": "mean (default weight cap), weights = noised row counts",
                   "base recipe": "mlp 64, sgd lr 0.05, batch 32, 1 local epoch, clip 1",
                   "variants": {v: {"privacy": VARIANTS[v][0], "recipe": VARIANTS[v][1],
                                    "server": VARIANTS[v][2]} for v in variants},
                   "own_cost": "final model under DP minus without DP, on the member's own "
                               "held-out rows (seed 0)"},
        "results": results, "seconds": round(time.monotonic() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, allow_nan=True))
    print(f"\n{'table':8s} {'run':22s} {'final':>7s} {'vs central DP (fixed)':>22s}")
    for t in tables:
        res = results[t]
        ref = res["centralized"]["dp fixed"]["final"]
        for label, c in res["centralized"].items():
            print(f"{t:8s} {'centralized ' + label:22s} {c['final']:7.4f} "
                  f"{c['final'] - ref:+22.4f}")
        for v, run in res["runs"].items():
            print(f"{t:8s} {v:22s} {run['final']:7.4f} {run['final'] - ref:+22.4f}")
    print("\nper member (seed 0): rows, sigma, batch, lr, own-rows cost of DP vs no DP")
    for t in tables:
        for v, run in results[t]["runs"].items():
            if VARIANTS[v][0] == "off":
                continue
            cells = [f"{m['rows']}:σ{m['sigma']:.2f}/b{m['batch_size']}/lr{m['lr']:.2g}/"
                     f"{m.get('own_cost_vs_no_dp', float('nan')):+.3f}"
                     for m in run["members_seed0"].values()]
            print(f"{t:8s} {v:16s} " + " ".join(cells))
    print(f"\nwrote {args.out} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

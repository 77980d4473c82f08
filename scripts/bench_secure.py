#!/usr/bin/env python3
"""Secure rounds (issue 22), the quality part at the privacy level: does noise on the sum
reach centralized DP-SGD at the same epsilon, before the protocol is wired in?

Per table (digits by default; 8 members, the bench_skew partition: dirichlet 0.5) and seed:

- centralized DP-SGD on the pooled rows (scripts/bench_skew_dp.centralized_dp): the fixed
  recipe (batch 32, lr 0.05, --rounds epochs: issue 22's reference) and the auto rule
  (node/privacy/recipe.py on the pooled rows); sigma from Opacus' RDP accountant;
- distributed DP-SGD, simulated: the plan node/privacy/secure.py's `secure_plan` chooses
  from the pooled row count, n = 8, t = 2, epsilon and delta (no hand tuning), then per
  step every member's `consortium_step` (node/learn/dstep.py: Poisson sampling at the
  plan's q, per-example clipping, conditional rounding, its Skellam share), the integer
  vectors summed exactly (what the secure aggregation opens), decoded and applied by every
  member: w -= lr * sum / (q rows). Epsilon: the ledger's secure charges through the
  accountant. Once at the plan's floor of contributors n - t (the default: t dropouts
  tolerated), once at floor n (no dropout tolerated: less noise).

Same model and initial weights as the centralized runs, the test set of the simulation.
Noise: seeded (a bench, not a node: SeededNoise for sampling, os_generator's test seed for
rounding and Skellam).

    .venv/bin/python scripts/bench_secure.py --seeds 3 [--tables digits,default,churn]

`--protocol`: the real thing instead of the simulated sum: `flnode simulate --secure
--privacy record --epsilon E --dataset digits --nodes 8` (a subprocess: the CLI path a user
runs; every round a secure DP-SGD step through the node, the round machine, sealing and the
memory transport; rounds, q, sigma and lr from the consortium's secure_plan) per seed,
against centralized DP-SGD at the same epsilon (the fixed recipe, as above): accuracy,
epsilon from the ledgers, wall and CPU time of the whole simulate (its local-only and
non-private centralized baselines included), bytes sent per member per round.

    .venv/bin/python scripts/bench_secure.py --protocol --seeds 1

Writes runs/bench/secure.json unless --out; prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_skew import TABLES, _mean  # noqa: E402
from scripts.bench_skew_dp import DELTA, centralized_dp  # noqa: E402

MEMBERS, COALITION = 8, 2


def distributed(table: str, seed: int, rounds: int, epsilon: float, workdir: Path,
                floor: int | None, epochs: float | None = None) -> dict[str, Any]:
    """The simulated secure DP-SGD run (module docstring)."""
    import numpy as np
    import torch

    from node.learn.dstep import consortium_step
    from node.learn.models import build_model, init_seed_from
    from node.learn.train import evaluate, metric_name
    from node.privacy.accountant import epsilon_of
    from node.privacy.distributed import decode_sum, os_generator
    from node.privacy.mechanisms import SeededNoise
    from node.privacy.secure import secure_plan
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="secure-d-", dir=workdir))
    try:
        spec = SimulationSpec(dataset=table, nodes=MEMBERS, partition=TABLES[table],
                              rounds=rounds, seed=seed, out=out, aggregation="mean")
        prep = prepare(spec)
        model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes,
                            spec.hidden, seed=init_seed_from(prep.consortium))
        params = list(model.parameters())
        dim = sum(p.numel() for p in params)
        rows = len(prep.train_all[1])
        t0 = time.perf_counter()
        plan = secure_plan(rows_total=rows, members=MEMBERS, coalition=COALITION,
                           epsilon=epsilon, delta=DELTA, dim=dim, clip_norm=spec.clip,
                           min_contributors=floor,
                           **({} if epochs is None else {"epochs": epochs}))
        plan_s = time.perf_counter() - t0
        mech = plan.mechanism()
        noises = [SeededNoise(seed * 7919 + 17 * i + 5) for i in range(MEMBERS)]
        rngs = [os_generator(test_only_seed=seed * 1009 + i) for i in range(MEMBERS)]
        t0 = time.perf_counter()
        for _ in range(plan.steps):
            total = np.zeros(dim, dtype=np.int64)
            for i, (X, y) in enumerate(prep.train_parts):
                vec, _ = consortium_step(model, X, y, sample_rate=plan.sample_rate, mech=mech,
                                         sigma=plan.noise_multiplier, noise=noises[i],
                                         rng=rngs[i])
                total += vec
            step = torch.from_numpy(decode_sum(total, mech) / plan.expected_batch)
            with torch.no_grad():
                offset = 0
                for p in params:
                    k = p.numel()
                    p -= plan.lr * step[offset:offset + k].reshape(p.shape).to(p.dtype)
                    offset += k
        train_s = time.perf_counter() - t0
        spent = epsilon_of([plan.record(r) for r in range(plan.steps)], DELTA)
        return {"final": evaluate(model, *prep.test)[metric_name(prep.schema.n_classes)],
                "rows": rows, "dim": dim, "sigma": plan.noise_multiplier,
                "sample_rate": plan.sample_rate, "expected_batch": plan.expected_batch,
                "steps": plan.steps, "lr": plan.lr, "min_contributors": plan.min_contributors,
                "noise_ratio": plan.noise_ratio,
                "noise_on_full_sum": plan.noise_multiplier * math.sqrt(
                    MEMBERS / (MEMBERS - COALITION)),
                "epsilon": spent, "plan_seconds": plan_s, "train_seconds": train_s}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def protocol_run(seed: int, epsilon: float, workdir: Path) -> dict[str, Any]:
    """One `flnode simulate --secure --privacy record` run (module docstring)."""
    import resource
    import subprocess

    out = workdir / f"protocol-{seed}"
    cmd = [sys.executable, "-m", "node.cli", "simulate", "--secure", "--privacy", "record",
           "--epsilon", str(epsilon), "--dataset", "digits", "--nodes", str(MEMBERS),
           "--partition", "dirichlet:0.5", "--seed", str(seed), "--out", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((out / "summary.json").read_text())
    per_round = []
    for state in sorted((out / "state").iterdir()):
        for line in (state / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "round_bytes_sent" in rec:
                per_round.append(rec["round_bytes_sent"])
    plan = json.loads(next((out / "state").iterdir()).joinpath("secure_plan.json").read_text())
    accs = list(summary["consortium"]["per_node"].values())
    return {"final": sum(accs) / len(accs), "members_same_model": len(set(accs)) == 1,
            "epsilon": max(summary["epsilon"]["per_node"].values()),
            "rounds": summary["rounds"], "rounds_done": summary["rounds_done"],
            "sigma": plan["noise_multiplier"], "sample_rate": plan["sample_rate"],
            "steps": plan["steps"], "lr": plan["lr"], "rows": plan["rows_total"],
            "wall_seconds": wall,
            "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "bytes_per_member_per_round": sum(per_round) / max(1, len(per_round)),
            "noise": summary["noise"], "command": " ".join(cmd[1:])}


def protocol_main(args: argparse.Namespace) -> int:
    seeds = list(range(args.seeds))
    res: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for s in seeds:
            res.setdefault("secure protocol (flnode simulate)", []).append(
                protocol_run(s, args.epsilon, work))
            if not args.no_central:
                res.setdefault("centralized dp fixed", []).append(
                    centralized_dp("digits", s, args.rounds, args.epsilon, "fixed", work))
    runs = {label: {"final": _mean([r["final"] for r in rs]), "per_seed": rs}
            for label, rs in res.items()}
    doc = {"config": {"protocol": True, "table": "digits", "members": MEMBERS,
                      "seeds": seeds, "epsilon": args.epsilon, "delta": DELTA,
                      "central_epochs": args.rounds}, "runs": runs}
    out = args.out if args.out != DEFAULT_OUT else args.out.with_name("secure_protocol.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(json.dumps(doc, sort_keys=True))
    ref = runs.get("centralized dp fixed", {}).get("final", math.nan)
    print(f"{'run':36s} {'final':>7s} {'vs central':>10s} {'eps':>6s} {'rounds':>6s} "
          f"{'wall s':>7s} {'cpu s':>7s} {'KB/member/round':>16s}")
    for label, r in runs.items():
        f = r["per_seed"][0]
        extra = (f"{f['rounds']:6d} {f['wall_seconds']:7.1f} {f['cpu_seconds']:7.1f} "
                 f"{f['bytes_per_member_per_round'] / 1e3:16.1f}") if "wall_seconds" in f else ""
        print(f"{label:36s} {r['final']:7.4f} {r['final'] - ref:+10.4f} "
              f"{f['epsilon']:6.3f} {extra}")
    print(f"wrote {out}")
    return 0


DEFAULT_OUT = ROOT / "runs" / "bench" / "secure.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", default="digits")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=30,
                    help="the centralized fixed recipe's epochs (issue 22's reference)")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--epochs", type=float, default=None,
                    help="the secure plan's epochs (default: secure_plan's own default)")
    ap.add_argument("--no-central", action="store_true", help="skip the centralized runs")
    ap.add_argument("--protocol", action="store_true",
                    help="run the real `flnode simulate --secure --privacy record` path "
                         "(digits, 8 members) instead of the simulated sum")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.protocol:
        return protocol_main(args)
    seeds = list(range(args.seeds))
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for table in args.tables.split(","):
            res: dict[str, list[dict[str, Any]]] = {}
            for s in seeds:
                for recipe in () if args.no_central else ("fixed", "auto"):
                    res.setdefault(f"centralized dp {recipe}", []).append(
                        centralized_dp(table, s, args.rounds, args.epsilon, recipe, work))
                res.setdefault("secure sum, floor n - t", []).append(
                    distributed(table, s, args.rounds, args.epsilon, work, None, args.epochs))
                res.setdefault("secure sum, floor n", []).append(
                    distributed(table, s, args.rounds, args.epsilon, work, MEMBERS, args.epochs))
            runs[table] = {label: {"final": _mean([r["final"] for r in rs]),
                                   "per_seed": [r["final"] for r in rs], "first_seed": rs[0]}
                           for label, rs in res.items()}
    doc = {"config": {"tables": args.tables, "seeds": seeds, "epsilon": args.epsilon,
                      "secure_epochs": args.epochs, "delta": DELTA, "members": MEMBERS,
                      "coalition": COALITION,
                      "rounds": args.rounds}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"{'table':8s} {'run':26s} {'final':>7s} {'vs central fixed':>17s} {'sigma':>7s} "
          f"{'q':>6s} {'steps':>6s} {'eps':>6s}")
    for table, res in runs.items():
        ref = res.get("centralized dp fixed", {}).get("final", math.nan)
        for label, r in res.items():
            f = r["first_seed"]
            q = f.get("sample_rate", 1 / max(1, math.ceil(f["rows"] / f.get("batch_size", 1))))
            steps = f.get("steps", round(f.get("epochs", 0) / q))
            print(f"{table:8s} {label:26s} {r['final']:7.4f} {r['final'] - ref:+17.4f} "
                  f"{f['sigma']:7.3f} {q:6.3f} {steps:6d} {f['epsilon']:6.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

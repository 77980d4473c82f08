#!/usr/bin/env python3
"""What noise on the secure sum buys (issue 22, distributed DP-SGD): per step, the noise a
member must add under distributed DP next to the noise today's per-member DP puts on its
share, at the same record-level epsilon.

Setting (digits-sized by default): 8 members, 1,797 rows split evenly (224-225 each),
record-level epsilon 3 at delta 1e-5, clip C = 1, Poisson sampling at q = 1/8 (batch 32
on 225 rows: 1/ceil(225/32)), the digits MLP (64-64-10, 4,810 parameters), T steps for
each T in --steps. Per T:

- today: each member's share is DP on its own: sigma from node/privacy/calibrate.py
  (calibrate_sigma, record mode, Opacus' RDP accountant; no count release: the default
  rule counts every share once), noise sigma C on its clipped sum every step. The sum of
  the 8 shares carries sqrt(8) sigma C.
- centralized DP-SGD on the pooled rows at the same q and T: the same sigma (the
  accountant sees the same q and T), the ideal the distributed mode aims at.
- distributed, per coalition size t: sigma_d from node/privacy/distributed.py
  (calibrate_sum_sigma: Skellam on the sum, per-example conditional rounding at the default
  granularity, the accountant of the secure sum); each member adds Skellam noise of std
  sigma_d C / sqrt(n - t) (in gradient units), the sum carries sigma_d C against any t.
  "field bits": log2 of the range a coordinate of the secure sum needs (2 bound + 1,
  coordinate_bound at failure 2^-40): what the secure aggregation's field must hold.

Every epsilon printed is recomputed by the accountant at the sigma shown. Also timed: one
member's contribution (clip, round, sum, Skellam share) for an expected batch of 28
examples of the model's size, numpy, one thread.

    .venv/bin/python scripts/bench_distributed_dp.py [--json] [--out FILE]

Writes runs/bench/distributed_dp.json unless --out; prints a table (--json: the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.privacy.accountant import LedgerRecord, epsilon_of, steps_per_epoch  # noqa: E402
from node.privacy.calibrate import calibrate_sigma  # noqa: E402
from node.privacy.distributed import (  # noqa: E402
    SumMechanism,
    SumRelease,
    calibrate_sum_sigma,
    choose_granularity,
    coordinate_bound,
    epsilon_of_sum,
    member_contribution,
    os_generator,
)

DIGITS_ROWS = 1797
DIGITS_DIM = 64 * 64 + 64 + 64 * 10 + 10  # mlp 64-64-10 (training.hidden = 64)
TIMING_REPEATS = 20


def run(args: argparse.Namespace) -> dict:
    sizes = [len(part) for part in np.array_split(np.arange(args.rows), args.members)]
    q = 1.0 / steps_per_epoch(max(sizes), args.batch)
    gamma = choose_granularity(args.clip, args.dim)
    out: dict = {"members": args.members, "rows": args.rows, "rows_per_member": sizes,
                 "epsilon": args.epsilon, "delta": args.delta, "clip": args.clip,
                 "dim": args.dim, "sample_rate": q, "granularity": gamma,
                 "scaled_clip": args.clip / gamma, "mechanism": "skellam", "steps": []}
    for steps in args.steps:
        sigma_local = calibrate_sigma(args.epsilon, args.delta, "record", q, steps, 1, None)
        eps_local = epsilon_of([LedgerRecord(0, "record", sigma_local, q, steps, args.clip, "")],
                               args.delta)
        row: dict = {"steps": steps, "epochs": steps * q,
                     "today": {"sigma": sigma_local, "epsilon": eps_local,
                               "member_std": sigma_local * args.clip,
                               "sum_std": math.sqrt(args.members) * sigma_local * args.clip},
                     "central": {"sigma": sigma_local, "sum_std": sigma_local * args.clip},
                     "distributed": []}
        for t in args.coalitions:
            mech = SumMechanism(args.clip, gamma, args.dim, args.members, t)
            sigma_d = calibrate_sum_sigma(mech, args.epsilon, args.delta, q, steps)
            eps_d = epsilon_of_sum(mech, sigma_d, [SumRelease(q, steps, args.members)], args.delta)
            eps_drop = epsilon_of_sum(mech, sigma_d, [SumRelease(q, steps, args.members - 1)],
                                      args.delta)
            bound = coordinate_bound(mech, sigma_d, args.rows)
            row["distributed"].append({
                "coalition": t, "sigma": sigma_d, "epsilon": eps_d,
                "member_std": mech.member_std(sigma_d), "sum_std": sigma_d * args.clip,
                "member_mu": mech.member_mu(sigma_d), "inflation": mech.inflation,
                "sum_noise_vs_today": sigma_d / (math.sqrt(args.members) * sigma_local),
                "sigma_vs_central": sigma_d / sigma_local,
                "epsilon_if_one_member_drops_every_step": eps_drop,
                "field_bits": math.log2(2 * bound + 1)})
        out["steps"].append(row)
    out["timing"] = time_contribution(args, gamma, q, sizes)
    return out


def time_contribution(args: argparse.Namespace, gamma: float, q: float, sizes: list[int]) -> dict:
    mech = SumMechanism(args.clip, gamma, args.dim, args.members, args.coalitions[0])
    batch = round(q * max(sizes))
    grads = os_generator().normal(size=(batch, args.dim))
    member_contribution(grads, mech, 1.0, os_generator())  # warm-up
    start = time.perf_counter()
    for _ in range(TIMING_REPEATS):
        member_contribution(grads, mech, 1.0, os_generator())
    seconds = (time.perf_counter() - start) / TIMING_REPEATS
    return {"batch": batch, "dim": args.dim, "seconds_per_contribution": seconds}


def table(result: dict) -> str:
    lines = [f"{result['members']} members, {result['rows']} rows, epsilon {result['epsilon']:g} "
             f"at delta {result['delta']:g}, C = {result['clip']:g}, q = {result['sample_rate']:.4f}, "
             f"d = {result['dim']}, gamma = C/{result['scaled_clip']:g}",
             "",
             "| steps | epochs | today: σ per share | today: std on the sum | t | distributed σ on the sum "
             "| std each member adds | sum std vs today | σ vs central | ε (accountant) "
             "| ε if one member drops every step | field bits |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["steps"]:
        for d in row["distributed"]:
            lines.append(
                f"| {row['steps']} | {row['epochs']:g} | {row['today']['sigma']:.3f} "
                f"| {row['today']['sum_std']:.3f} | {d['coalition']} | {d['sigma']:.3f} "
                f"| {d['member_std']:.3f} | {d['sum_noise_vs_today']:.3f} "
                f"| {d['sigma_vs_central']:.4f} | {d['epsilon']:.3f} "
                f"| {d['epsilon_if_one_member_drops_every_step']:.3f} | {d['field_bits']:.1f} |")
    t = result["timing"]
    lines += ["", f"one member's contribution (batch {t['batch']}, d = {t['dim']}): "
                  f"{1000 * t['seconds_per_contribution']:.1f} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--rows", type=int, default=DIGITS_ROWS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=DIGITS_DIM)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")],
                   default=[8, 40, 80, 240, 800, 2400])
    p.add_argument("--coalitions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--out", type=Path, default=Path("runs/bench/distributed_dp.json"))
    args = p.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Can any per-round selection see a sign-flip or label-flip member under DP on the sum?
(issue 22's robustness goal under DP; docs/results/secure.md "Direction attacks under DP").

A study, not the protocol: one process trains the digits MLP (64-64-10, 4,810 parameters) as a
secure DP consortium of 8 members (dirichlet 0.5, the simulator's own loader, split and
partitioner) takes its steps: each member's Poisson-sampled clipped gradient sum plus its
noise share (Gaussian at the Skellam share's variance, sigma C / sqrt(n - t) per
coordinate), the plan's q, steps and learning rate from node/privacy/secure.py
`secure_plan` (digits, epsilon 3: sigma 8.71). One member (the largest by default) attacks.
The selection rules see MORE than any charged variant may open at that plan: each member's
noised contribution projected on a direction, for free:

- none: every contribution summed (what `range` does with an attacker inside the bound);
- ema: exclude a member whose projection on the running mean of the past aggregates is below
  -kappa noise standard deviations (a public direction every member has);
- oracle: the same on the honest members' noise-free gradient sum of this very step (which
  no member has: an upper bound on what any direction test could see).
- others: the same on the sum of the other members' noised contributions of this step
  (a function of the opened Gram matrix: free once distances are charged per member);
- cap: every member's gradient sum projected onto a ball of radius CAP before its noise
  (the attacker too: a range check at that bound would enforce it).

    PYTHONPATH=. .venv/bin/python scripts/bench_dp_direction.py --seeds 3 \
        --out docs/results/dp_direction.json

Prints a table and writes JSON (command, config, per-row accuracy per seed, how often the
attacker and honest members were excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.privacy.secure import secure_plan  # noqa: E402
from node.rehearsal.simulation.datasets import load_demo, partition  # noqa: E402

MEMBERS, COALITION, EPSILON, DELTA, CLIP = 8, 2, 3.0, 1e-5, 1.0
KAPPA = 3.0  # exclusion threshold, in the projection's noise standard deviations
EMA = 0.8  # weight of the past in the public direction
TEST_FRACTION = 0.2  # as node/rehearsal/simulation/prepare.py


def data(seed: int):
    from sklearn.model_selection import train_test_split  # lean start: the study only

    df, label, _ = load_demo("digits")
    train, test = train_test_split(df, test_size=TEST_FRACTION, random_state=seed,
                                   stratify=df[label])
    parts = partition(train.reset_index(drop=True), label, MEMBERS, "dirichlet:0.5",
                      np.random.default_rng(seed))
    x = train.drop(columns=[label]).to_numpy(np.float32)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd)
    yt = torch.tensor(train[label].astype(int).to_numpy())
    xe = torch.tensor((test.drop(columns=[label]).to_numpy(np.float32) - mu) / sd)
    ye = torch.tensor(test[label].astype(int).to_numpy())
    return xt, yt, xe, ye, parts


def run(seed: int, attack: str, rule: str, rank: int, plan, cap: float) -> dict:
    from torch.func import functional_call, grad, vmap  # lean start: the study only

    xt, yt, xe, ye, parts = data(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    names = [k for k, _ in model.named_parameters()]
    att = int(np.argsort([len(p) for p in parts])[::-1][rank])
    s = plan.noise_multiplier * CLIP / math.sqrt(MEMBERS - COALITION)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))

    def loss_one(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x[None],)),
                                                 y[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    ema, excluded_att, excluded_honest = None, 0, 0
    for _ in range(plan.steps):
        params = {k: v.detach() for k, v in model.named_parameters()}
        qs, clean = [], []
        for i, p in enumerate(parts):
            p = p[torch.rand(len(p), generator=gen).numpy() < plan.sample_rate]
            y = yt[p]
            if attack == "label-flip" and i == att:
                y = 9 - y
            g = per_example(params, xt[p], y)
            flat = torch.cat([g[k].reshape(len(p), -1) for k in names], 1)
            flat = flat / torch.clamp(flat.norm(dim=1, keepdim=True) / CLIP, min=1.0)
            total = flat.sum(0)
            if cap > 0:
                total = total * min(1.0, cap / max(float(total.norm()), 1e-12))
            clean.append(total)
            q = total + torch.randn(total.shape[0], generator=gen) * s
            qs.append(-q if attack == "sign-flip" and i == att else q)
        keep = list(range(MEMBERS))
        if rule == "others":  # each member's projection on the others' noised sum (the Gram)
            total_q = torch.stack(qs).sum(0)
            dirs = [(total_q - qs[i]) / (total_q - qs[i]).norm() for i in range(MEMBERS)]
            keep = [i for i in keep if float(qs[i] @ dirs[i]) >= -KAPPA * s]
            excluded_att += att not in keep
            excluded_honest += sum(1 for i in range(MEMBERS) if i != att and i not in keep)
        u = ema if rule == "ema" else (
            torch.stack([clean[i] for i in keep if i != att]).sum(0) if rule == "oracle" else None)
        if u is not None and float(u.norm()) > 0:
            u = u / u.norm()
            keep = [i for i in keep if float(qs[i] @ u) >= -KAPPA * s]
            excluded_att += att not in keep
            excluded_honest += sum(1 for i in range(MEMBERS) if i != att and i not in keep)
        agg = torch.stack([qs[i] for i in keep]).sum(0)
        ema = agg.clone() if ema is None else EMA * ema + (1 - EMA) * agg
        step = plan.lr * agg / (plan.sample_rate * plan.rows_total)
        with torch.no_grad():
            off = 0
            for v in model.parameters():
                v -= step[off:off + v.numel()].reshape(v.shape)
                off += v.numel()
    with torch.no_grad():
        acc = float((model(xe).argmax(1) == ye).float().mean())
    return {"accuracy": acc, "attacker": att, "attacker_rows": int(len(parts[att])),
            "attacker_excluded": excluded_att, "honest_excluded": excluded_honest,
            "steps": plan.steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rules", default="none,ema,oracle,cap:40")
    ap.add_argument("--attacks", default="clean,sign-flip,label-flip")
    ap.add_argument("--variant", default="sum_only",
                    help="the plan's charge: sum_only (sigma for the sum) or distances (per member)")
    ap.add_argument("--ranks", default="0", help="attacker by size: 0 the largest, 3 median")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "dp_direction.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    xt, *_ = data(0)
    plan = secure_plan(rows_total=int(xt.shape[0]), members=MEMBERS, coalition=COALITION,
                       epsilon=EPSILON, delta=DELTA, dim=4810, clip_norm=CLIP,
                       variant=args.variant)
    doc = {"command": "scripts/bench_dp_direction.py " + " ".join(sys.argv[1:]),
           "config": {"variant": args.variant, "members": MEMBERS, "coalition": COALITION, "epsilon": EPSILON,
                      "sigma": plan.noise_multiplier, "q": plan.sample_rate,
                      "steps": plan.steps, "lr": plan.lr, "kappa": KAPPA, "ema": EMA,
                      "share_std": plan.noise_multiplier * CLIP / math.sqrt(MEMBERS - COALITION),
                      "load": os.getloadavg()}, "rows": []}
    print(f"plan: sigma {plan.noise_multiplier:.3g}, q {plan.sample_rate:.3g}, "
          f"{plan.steps} steps, lr {plan.lr:.3g}; {args.seeds} seeds", flush=True)
    print("| rule | attacker rank | attack | accuracy | vs clean | per seed | attacker excluded "
          "(steps) | honest excluded (member-steps) |\n|---|---|---|---|---|---|---|---|")
    for rule_spec in args.rules.split(","):
        rule, _, cap = rule_spec.partition(":")
        for rank in map(int, args.ranks.split(",")):
            clean_acc = None
            for attack in args.attacks.split(","):
                t0 = time.perf_counter()
                res = [run(seed, attack, rule, rank, plan, float(cap or 0))
                       for seed in range(args.seeds)]
                acc = float(np.mean([r["accuracy"] for r in res]))
                clean_acc = acc if attack == "clean" else clean_acc
                row = {"rule": rule_spec, "rank": rank, "attack": attack, "accuracy": acc,
                       "vs_clean": None if clean_acc is None else acc - clean_acc,
                       "seeds": res, "seconds": time.perf_counter() - t0}
                doc["rows"].append(row)
                vs = "" if row["vs_clean"] is None else f"{row['vs_clean']:+.4f}"
                print(f"| {rule_spec} | {rank} | {attack} | {acc:.4f} | {vs} | "
                      f"{', '.join(format(r['accuracy'], '.3f') for r in res)} | "
                      f"{', '.join(str(r['attacker_excluded']) for r in res)} of {plan.steps} | "
                      f"{', '.join(str(r['honest_excluded']) for r in res)} |", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

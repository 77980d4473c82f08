#!/usr/bin/env python3
"""Skewed members under record-level DP (issue 13, the DP half): the consortium at
epsilon per member next to centralized DP-SGD at the same epsilon on the pooled rows.

Same tables, partitions, model and rounds as scripts/bench_skew.py (its helpers are
imported): `default` (dirichlet 0.5, ROC-AUC), `churn` (column:state, ROC-AUC),
`digits` (dirichlet 0.5, accuracy), 8 members, 30 rounds, plain `mean` with the
consortium's default weight cap, every share weighed by its noised row count
(privacy.weight = "auto": rows + N(0, 10²), charged once, where the rule weighs by
declared weight; weight 1 and no count released under a rule that counts every share
once, rule:NAME or w:equal). Per table and seed:

- centralized: the pooled training rows, no DP (bench_skew.centralized);
- centralized DP-SGD: the pooled rows, the same model and initial weights, the same
  mechanism (node.learn.dpsgd, Poisson sampling) and accountant (Opacus' RDP, delta 1e-5),
  sigma calibrated for the pooled rows' q and steps (no count release: nothing is
  shared). Twice: the fixed recipe (batch 32, lr 0.05, 30 epochs) and the auto rule
  (node/privacy/recipe.py) applied to the pooled row count;
- FedAvg without DP (the reference for what DP costs each member);
- FedAvg, record DP at epsilon per member, privacy.recipe = "fixed" (today's);
- FedAvg, record DP, privacy.recipe = "auto";
- FedAvgM (server momentum 0.9, bench_skew's choice without DP), recipe "auto":
  the server step is post-processing of released shares, no extra cost.

Per member (first seed): its training rows, sigma, batch size, lr, epochs, the
epsilon its ledger spent, and what privacy costs it in metric: the final model its
node holds under DP minus the one it holds without DP, both on the member's own
held-out rows (NaN where those rows hold one class only: ROC-AUC is undefined).

Any grid label 'dp <fixed|auto> <server>[ clip<C>][ lr<lr0>]' is a variant too: server
none, m<beta> (FedAvgM, server lr 1) or adam<lr> (FedAdam); clip the privacy.clip; lr0
the base lr (the fixed recipe's lr, what the auto rule scales). --grid chooses among them
on the validation split of the members' own rows (bench_skew._split_validation: each
member trains on 80 % of its rows, the 20 % held back are pooled and scored; the test set
is not touched): stage 1 recipe x server optimizer, stage 2 clip and lr0 around stage 1's
best; --full runs every point on every --tune-on table and takes the best mean, otherwise
the first --tune-on table screens and the best --finalists run on the others. Cells run
in --jobs spawned worker processes; each memoizes calibrate_sigma (a pure function).

    .venv/bin/python scripts/bench_skew_dp.py               # 1 seed
    .venv/bin/python scripts/bench_skew_dp.py --seeds 3
    .venv/bin/python scripts/bench_skew_dp.py --tables digits --rounds 3   # a smoke run
    .venv/bin/python scripts/bench_skew_dp.py --grid --full --seeds 2 \
        --out runs/bench/skew_dp-grid-full.json                # about 12 min on 2 busy cores
    .venv/bin/python scripts/bench_skew_dp.py --seeds 3 --no-central \
        --variants "fedavg (no DP),dp auto adam0.03 lr0.2"      # a chosen point on the test set

Writes runs/bench/skew_dp.json (with --grid: skew_dp-grid.json) unless --out, prints a
table.
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

from scripts.bench_skew import TABLES, _mean, _split_validation, centralized  # noqa: E402

DELTA = 1e-5
MOMENTUM = {"server_opt": "momentum", "server_momentum": 0.9, "server_lr": 1.0}
# label -> (privacy mode, recipe, server params); any grid label (parse_variant) works too
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "fedavg (no DP)": ("off", "fixed", {}),
    "fedavg dp fixed": ("record", "fixed", {}),
    "fedavg dp auto": ("record", "auto", {}),
    "fedavgm dp auto": ("record", "auto", MOMENTUM),
}

# The grid (--grid), on the validation split of the members' own rows only:
# stage 1: recipe x server optimizer at clip 1, lr0 0.05; stage 2: clip and the base lr
# (what the auto rule scales) around the best two of stage 1.
GRID_RECIPES = ("fixed", "auto")
GRID_SERVERS = ("none", "m0.9", "m0.95", "adam0.01", "adam0.03", "adam0.1")
GRID_CLIPS = (0.5, 2.0)
GRID_LRS = (0.025, 0.1, 0.2)
BASE_CLIP, BASE_LR = 1.0, 0.05


def server_params(token: str) -> dict[str, Any]:
    """'none' | 'm<beta>' (FedAvgM, server lr 1) | 'adam<lr>[b<beta1>]' (FedAdam, beta1
    0.9 unless given)."""
    try:
        if token == "none":  # said, so that rule:auto's default FedAdam is not added
            return {"server_opt": "none"}
        if token.startswith("adam"):  # adam<lr>[b<beta1>]
            lr_s, _, b1_s = token[4:].partition("b")
            lr = float(lr_s)
            if not (0 < lr < 10):
                raise ValueError
            if not b1_s:
                return {"server_opt": "adam", "server_lr": lr}
            b1 = float(b1_s)
            if not (0 <= b1 < 1):
                raise ValueError
            return {"server_opt": "adam", "server_lr": lr, "server_momentum": b1}
        if token.startswith("m"):
            beta = float(token[1:])
            if not (0 <= beta < 1):
                raise ValueError
            return {"server_opt": "momentum", "server_momentum": beta, "server_lr": 1.0}
    except ValueError:
        pass
    raise ValueError(f"server {token!r}: none, m<beta in [0, 1)> or adam<lr in (0, 10)>"
                     "[b<beta1 in [0, 1)>]")


def grid_label(recipe: str, server: str, clip: float = BASE_CLIP, lr: float = BASE_LR) -> str:
    label = f"dp {recipe} {server}"
    if clip != BASE_CLIP:
        label += f" clip{clip:g}"
    if lr != BASE_LR:
        label += f" lr{lr:g}"
    return label


def parse_variant(label: str) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """A variant's (privacy, recipe, server params, SimulationSpec extras): one of
    VARIANTS, or 'dp <fixed|auto> <server>[ clip<C>][ lr<lr0>][ ep<E>][ rule:NAME][ w:W]'
    (grid_label; rule:auto is the consortium default for 8 members, multi_krum_staged;
    w:declared|equal the rule's weighting; ep<E> every member's local epochs)."""
    if label in VARIANTS:
        return (*VARIANTS[label], {})
    parts = label.split()
    if len(parts) < 3 or parts[0] != "dp" or parts[1] not in GRID_RECIPES:
        raise ValueError(f"variant {label!r}: one of {', '.join(VARIANTS)}, or "
                         "'dp <fixed|auto> <server>[ clip<C>][ lr<lr0>]'")
    extras: dict[str, Any] = {}
    weighting: dict[str, Any] = {}
    for tok in parts[3:]:
        if tok.startswith("w:"):  # the rule's weighting ([rules.params] weighting)
            if weighting or tok[2:] not in ("declared", "equal"):
                raise ValueError(f"variant {label!r}: {tok!r}: w:declared or w:equal, once")
            weighting["weighting"] = tok[2:]
            continue
        if tok.startswith("rule:"):  # the consortium's rule (default: the plain mean)
            from node.strategy.registry import RULE_NAMES

            name = tok[len("rule:"):]
            if "aggregation" in extras or name not in (*RULE_NAMES, "auto"):
                raise ValueError(f"variant {label!r}: {tok!r}: rule:NAME once, NAME one of "
                                 f"auto, {', '.join(RULE_NAMES)}")
            extras["aggregation"] = name
            continue
        if tok.startswith("ep"):  # every member's local epochs (training.epochs)
            if "epochs" in extras or not tok[2:].isdigit() or not 1 <= int(tok[2:]) <= 20:
                raise ValueError(f"variant {label!r}: {tok!r}: ep<E>, E local epochs in "
                                 "1..20, once")
            extras["epochs"] = int(tok[2:])
            continue
        key = "clip" if tok.startswith("clip") else "lr" if tok.startswith("lr") else None
        try:
            val = float(tok[len(key):]) if key else math.nan
        except ValueError:
            val = math.nan
        if key is None or key in extras or not (0 < val < 100):
            raise ValueError(f"variant {label!r}: {tok!r} is not clip<C> or lr<lr0> "
                             "(a number in (0, 100), each at most once)")
        extras[key] = val
    return "record", parts[1], {**server_params(parts[2]), **weighting}, extras


def consortium(table: str, seed: int, rounds: int, epsilon: float, privacy: str, recipe: str,
               params: dict[str, Any], workdir: Path, extras: dict[str, Any] | None = None,
               validation: bool = False) -> dict[str, Any]:
    """One consortium run; the final metrics and, per member, what its plan chose.
    validation: each member trains on 80 % of its own rows (bench_skew._split_validation)
    and every score is on the held-back 20 % (pooled; "own": the member's own 20 %); the
    test set is not touched."""
    import numpy as np
    import pandas as pd
    import torch

    from node.data.encode import encode
    from node.learn.train import evaluate, metric_name
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.run import evaluate_rows, run_consortium
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="skewdp-", dir=workdir))
    t0 = time.perf_counter()
    extras = dict(extras or {})
    try:
        spec = SimulationSpec(
            dataset=table, nodes=8, partition=TABLES[table], rounds=rounds, seed=seed, out=out,
            aggregation=extras.pop("aggregation", "mean"), aggregation_params=params,
            round_deadline_s=300.0,
            privacy=privacy, epsilon=epsilon if privacy != "off" else None,
            sigma=None if privacy != "off" else 1.0, delta=DELTA, recipe=recipe, **extras)
        prep = prepare(spec)
        metric = metric_name(prep.schema.n_classes)
        if validation:
            val = _split_validation(prep, seed)
            score_rows = encode(pd.concat(list(val.values()), ignore_index=True), prep.schema,
                                "val")
            own_rows = [encode(val[name], prep.schema, name) for name in prep.names]
        else:
            score_rows, own_rows = prep.test, prep.own_parts
        nodes = asyncio.run(run_consortium(spec, prep))
        members = {}
        finals = []
        for i, n in enumerate(nodes):
            final = evaluate(n.model, *score_rows)[metric]
            finals.append(final)
            plan = n.budget.plan
            tc = n.cfg.training
            epochs, batch, lr = (plan.training(tc.epochs, tc.batch_size, tc.lr) if plan
                                 else (tc.epochs, tc.batch_size, tc.lr))
            members[n.name] = {
                "rows": int(len(n.train_data.X)), "final": final,
                "own": evaluate_rows(n.model, own_rows[i])[metric],
                "own_rows": int(len(own_rows[i][1])),
                "sigma": plan.noise_multiplier if plan else None,
                "sample_rate": plan.sample_rate if plan else None,
                "batch_size": batch, "epochs": epochs, "lr": lr,
                "clip": plan.clip_norm if plan else None,
                "noise_ratio": (plan.noise_multiplier / (plan.sample_rate * len(n.train_data.X))
                                if plan else None),
                "epsilon": n.epsilon(), "stopped": n.stopped}
        return {"metric": metric, "final": float(np.mean(finals)), "members": members,
                "scored_on": "validation" if validation else "test",
                "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def centralized_dp(table: str, seed: int, rounds: int, epsilon: float, recipe: str,
                   workdir: Path, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """DP-SGD on the pooled training rows for `rounds` epochs (x the recipe's epochs);
    extras: SimulationSpec fields (clip, lr) other than the first-slice recipe's."""
    import torch

    from node.learn.dpsgd import train_local_dp_fast
    from node.learn.models import build_model, init_seed_from
    from node.learn.train import evaluate, metric_name
    from node.privacy.accountant import epsilon_of
    from node.privacy.calibrate import calibrate_sigma, plan_history
    from node.privacy.mechanisms import SeededNoise
    from node.privacy.recipe import choose
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="skewdp-c-", dir=workdir))
    try:
        spec = SimulationSpec(dataset=table, nodes=8, partition=TABLES[table], rounds=rounds,
                              seed=seed, out=out, aggregation="mean", **(extras or {}))
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
                "clip": spec.clip,
                "sigma": sigma, "epsilon": spent, "noise_ratio": sigma / (q * n)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _cache_calibration() -> None:
    """calibrate_sigma is a pure function of (epsilon, delta, mode, q, steps, rounds,
    count sigma) and costs 0.5-1.5 s; a worker's later runs of the same table and seed ask
    for the same values. Memoized in this worker process only: the same sigmas, faster."""
    import functools

    import node.privacy.budget

    # PrivacyBudget calls calibrate_sigma through node.privacy.budget's namespace
    if not hasattr(node.privacy.budget.calibrate_sigma, "cache_info"):
        node.privacy.budget.calibrate_sigma = functools.cache(node.privacy.budget.calibrate_sigma)


def _run_cell(cell: tuple, rounds: int, epsilon: float, workdir: str) -> dict[str, Any]:
    """One unit of work, in a worker process: ("central", table, seed),
    ("central_dp", table, seed, recipe, extras) or ("run", table, seed, label, validation)."""
    logging.getLogger("flnode").setLevel(logging.CRITICAL)
    _cache_calibration()
    kind, table, seed = cell[:3]
    if kind == "central":
        return {"final": centralized(table, seed, rounds, Path(workdir))}
    if kind == "central_dp":
        return centralized_dp(table, seed, rounds, epsilon, cell[3], Path(workdir), cell[4])
    privacy, recipe, params, extras = parse_variant(cell[3])
    return consortium(table, seed, rounds, epsilon, privacy, recipe, params, Path(workdir),
                      extras, validation=cell[4])


def run_cells(cells: dict[tuple, tuple], jobs: int, rounds: int, epsilon: float,
              workdir: Path) -> dict[tuple, dict[str, Any]]:
    """Every cell ({key: cell}), `jobs` worker processes at a time (spawned: each imports
    torch once); the results by key."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done: dict[tuple, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=jobs,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_cell, c, rounds, epsilon, str(workdir)): k
                   for k, c in cells.items()}
        for fut in as_completed(futures):
            k = futures[fut]
            done[k] = fut.result()
            extra = f" ({done[k]['seconds']:.0f} s)" if "seconds" in done[k] else ""
            print(f"  {' '.join(str(x) for x in k[:5])}: {done[k]['final']:.4f}{extra}",
                  flush=True)
    return done


def _extras_label(extras: dict[str, Any]) -> str:
    return "".join(f" rule:{v}" if k == "aggregation" else f" ep{v}" if k == "epochs"
                   else f" {k}{v:g}"
                   for k, v in sorted(extras.items()))


def grid(args: argparse.Namespace, seeds: list[int], workdir: Path) -> dict[str, Any]:
    """Choose on the validation split (never the test set). With --full, every point
    runs on every --tune-on table and the best mean wins. Otherwise the first table
    screens: stage 1 recipe x server optimizer (clip 1, lr0 0.05), stage 2 clip and base
    lr around stage 1's best; the best --finalists of both stages then run on the other
    --tune-on tables, and the finalist with the best mean over all of them is chosen."""
    tune = [t for t in args.tune_on.split(",") if t]
    screen, rest = tune[0], tune[1:]
    validation: dict[str, Any] = {}

    def score(labels: list[str], tables: list[str], stage: int) -> None:
        cells = [("run", t, s, lb, True) for t in tables for lb in labels for s in seeds]
        done = run_cells({c: c for c in cells}, args.jobs, args.rounds, args.epsilon, workdir)
        for lb in labels:
            v = validation.setdefault(lb, {"stage": stage, "per_table": {}, "seconds": {},
                                           "members_seed0": {}})
            for t in tables:
                v["per_table"][t] = _mean([done[("run", t, s, lb, True)]["final"]
                                           for s in seeds])
                v["seconds"][t] = _mean([done[("run", t, s, lb, True)]["seconds"]
                                         for s in seeds])
                v["members_seed0"][t] = done[("run", t, seeds[0], lb, True)]["members"]
            v["mean"] = _mean(list(v["per_table"].values()))

    def best(n: int) -> list[str]:
        key = "mean" if args.full else "per_table"
        return sorted(validation, key=lambda lb: (validation[lb]["mean"] if args.full else
                                                  validation[lb][key][screen]),
                      reverse=True)[:n]

    if args.validate:  # the given --variants, every one on every --tune-on table
        labels = [v for v in args.variants.split(",") if v]
        score(labels, tune, 1)
        chosen = max(labels, key=lambda lb: validation[lb]["mean"])
        return {"tune_on": tune, "screened_on": None, "validation": validation,
                "finalists": labels, "chosen": chosen}
    first = tune if args.full else [screen]
    score([grid_label(r, sv) for r in GRID_RECIPES for sv in GRID_SERVERS], first, 1)
    _, recipe, server = best(1)[0].split()[:3]
    score([grid_label(recipe, server, clip=c) for c in GRID_CLIPS]
          + [grid_label(recipe, server, lr=lr) for lr in GRID_LRS], first, 2)
    finalists = best(args.finalists)
    if rest and not args.full:
        score(finalists, rest, 3)
    chosen = max(finalists, key=lambda lb: validation[lb]["mean"])
    return {"tune_on": tune, "screened_on": screen, "validation": validation,
            "finalists": finalists, "chosen": chosen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default=",".join(TABLES))
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (issue: 3)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epsilon", type=float, default=3.0, help="per member, and centralized")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of: {', '.join(VARIANTS)}, or grid labels "
                         "'dp <fixed|auto> <none|m<beta>|adam<lr>>[ clip<C>][ lr<lr0>]'")
    choose = ap.add_mutually_exclusive_group()
    choose.add_argument("--grid", action="store_true",
                        help="choose instead: the grid on the validation split of the "
                             "members' own rows of --tune-on (never the test set)")
    choose.add_argument("--validate", action="store_true",
                        help="choose among --variants instead of the grid: each on the "
                             "validation split of every --tune-on table (never the test set)")
    ap.add_argument("--tune-on", default="digits,default",
                    help="--grid: the first table screens every point, the rest confirm the "
                         "best --finalists")
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--full", action="store_true",
                    help="--grid: every point on every --tune-on table (no screening)")
    ap.add_argument("--no-central", action="store_true",
                    help="skip the centralized baselines (run them in another invocation)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--out", type=Path, default=None,
                    help="default runs/bench/skew_dp.json (skew_dp-grid.json with --grid)")
    args = ap.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    for t in tables + [t for t in args.tune_on.split(",") if t]:
        if t not in TABLES:
            ap.error(f"table {t!r}: choose from {', '.join(TABLES)}")
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as e:
            ap.error(str(e))
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        ap.error(f"--epsilon {args.epsilon!r}: a finite number > 0")
    if min(args.seeds, args.rounds, args.jobs, args.finalists) < 1:
        ap.error("--seeds, --rounds, --jobs and --finalists must be at least 1")
    out = args.out or ROOT / "runs" / "bench" / ("skew_dp-grid.json" if args.grid or args.validate
                                                 else "skew_dp.json")
    logging.getLogger("flnode").setLevel(logging.CRITICAL)
    seeds = list(range(args.seeds))
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-skew-dp-"))
    config = {"nodes": 8, "rounds": args.rounds, "seeds": seeds,
              "epsilon_per_member": args.epsilon, "delta": DELTA,
              "accountant": "Opacus RDP (node.privacy.accountant.epsilon_of)",
              "rule": "mean (default weight cap) unless a variant says rule:NAME; "
                      "weights = noised row counts where the rule reads them, else 1 "
                      "(privacy.weight = auto)",
              "base recipe": "mlp 64, sgd lr 0.05, batch 32, 1 local epoch, clip 1",
              "variant labels": "dp <recipe> <server>[ clip<C>][ lr<lr0>]: server none, "
                                "m<beta> (FedAvgM, server lr 1), adam<lr> (FedAdam, beta1 "
                                "0.9, beta2 0.99, tau 1e-3); lr0 is the base lr the auto "
                                "rule scales (fixed: the lr)"}
    try:
        if args.grid or args.validate:
            g = grid(args, seeds, workdir)
            summary = {"config": {**config, "tables": {t: TABLES[t] for t in g["tune_on"]},
                                  "scored_on": "validation split: 20 % of each member's own "
                                               "training rows (bench_skew._split_validation), "
                                               "pooled; the test set is not touched",
                                  "grid": {"variants": {
                                      v: dict(zip(("privacy", "recipe", "server", "extras"),
                                                  parse_variant(v), strict=True))
                                      for v in g["finalists"]}} if args.validate else {
                                      "stage 1 recipes": GRID_RECIPES,
                                      "stage 1 servers": GRID_SERVERS,
                                      "stage 2 clips": GRID_CLIPS,
                                      "stage 2 lrs": GRID_LRS,
                                      "stage 3": "the best --finalists of stages 1-2 on the "
                                                 "other --tune-on tables"}},
                       **g, "seconds": round(time.monotonic() - t0, 1)}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(summary, indent=2, allow_nan=True))
            print(f"\n{'variant':28s} {'stage':>5s} {'mean':>7s} "
                  + " ".join(f"{t:>8s}" for t in g["tune_on"]))
            for lb, v in sorted(g["validation"].items(),
                                key=lambda kv: (-len(kv[1]["per_table"]), -kv[1]["mean"])):
                print(f"{lb:28s} {v['stage']:5d} {v['mean']:7.4f} "
                      + " ".join(f"{v['per_table'].get(t, math.nan):8.4f}"
                                 for t in g["tune_on"]))
            print(f"\nchosen: {g['chosen']}\nwrote {out} ({summary['seconds']:.0f} s)")
            return 0
        # centralized DP-SGD has no rule and no rounds: a variant's rule:NAME and ep<E>
        # play no part in it
        central = [{k: x for k, x in parse_variant(v)[3].items()
                    if k not in ("aggregation", "epochs")}
                   for v in variants]
        extras_seen = {_extras_label(e): e for e in central}
        extras_seen.setdefault("", {})
        central_keys = [] if args.no_central else [(recipe, el) for el in extras_seen
                                                   for recipe in ("fixed", "auto")]
        cells: list[tuple] = []
        for t in tables:
            for s in seeds:
                cells += [("run", t, s, v, False) for v in variants]
                cells += [] if args.no_central else [("central", t, s)]
                cells += [("central_dp", t, s, recipe, extras_seen[el])
                          for recipe, el in central_keys]
        # dict extras are not hashable: key the central_dp cells by their label instead
        keyed = {(c[0], c[1], c[2], c[3], _extras_label(c[4])) if c[0] == "central_dp"
                 else c: c for c in cells}
        done_raw = run_cells(keyed, args.jobs, args.rounds, args.epsilon, workdir)
        results: dict[str, Any] = {}
        for t in tables:
            res: dict[str, Any] = {"centralized": {}, "runs": {}}
            if not args.no_central:
                res["centralized"]["no DP"] = {
                    "per_seed": [done_raw[("central", t, s)]["final"] for s in seeds]}
            for recipe, el in central_keys:
                cs = [done_raw[("central_dp", t, s, recipe, el)] for s in seeds]
                res["centralized"][f"dp {recipe}{el}"] = {
                    "per_seed": [c["final"] for c in cs], "seed0": cs[0]}
            for c in res["centralized"].values():
                c["final"] = _mean(c["per_seed"])
            for v in variants:
                cs = [done_raw[("run", t, s, v, False)] for s in seeds]
                res["runs"][v] = {"final": _mean([c["final"] for c in cs]),
                                  "per_seed": [c["final"] for c in cs],
                                  "metric": cs[0]["metric"],
                                  "seconds": _mean([c["seconds"] for c in cs]),
                                  "members_seed0": cs[0]["members"]}
            base = res["runs"].get("fedavg (no DP)", {}).get("members_seed0")
            if base:  # what DP costs each member, on its own held-out rows (seed 0)
                for run in res["runs"].values():
                    for name, m in run["members_seed0"].items():
                        m["own_cost_vs_no_dp"] = m["own"] - base[name]["own"]
            results[t] = res
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "config": {**config, "tables": {t: TABLES[t] for t in tables},
                   "variants": {v: dict(zip(("privacy", "recipe", "server", "extras"),
                                            parse_variant(v), strict=True))
                                for v in variants},
                   "own_cost": "final model under DP minus without DP, on the member's own "
                               "held-out rows (seed 0)"},
        "results": results, "seconds": round(time.monotonic() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, allow_nan=True))
    print(f"\n{'table':8s} {'run':30s} {'final':>7s} {'sd':>6s} {'vs central DP fixed':>20s}")
    for t in tables:
        res = results[t]
        ref = res["centralized"].get("dp fixed", {}).get("final", math.nan)
        for label, c in list(res["centralized"].items()) + list(res["runs"].items()):
            name = ("centralized " + label) if label in res["centralized"] else label
            print(f"{t:8s} {name:30s} {c['final']:7.4f} {_sd(c['per_seed']):6.4f} "
                  f"{c['final'] - ref:+20.4f}")
    print("\nper member (seed 0): rows, sigma, batch, lr, own-rows cost of DP vs no DP")
    for t in tables:
        for v, run in results[t]["runs"].items():
            if parse_variant(v)[0] == "off":
                continue
            cells_txt = [f"{m['rows']}:σ{m['sigma']:.2f}/b{m['batch_size']}/lr{m['lr']:.2g}/"
                         f"{m.get('own_cost_vs_no_dp', float('nan')):+.3f}"
                         for m in run["members_seed0"].values()]
            print(f"{t:8s} {v:16s} " + " ".join(cells_txt))
    print(f"\nwrote {out} ({summary['seconds']:.0f} s)")
    return 0


def _sd(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


if __name__ == "__main__":
    sys.exit(main())

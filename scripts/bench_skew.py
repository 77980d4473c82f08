#!/usr/bin/env python3
"""Options against skewed members (issue 13), in-process: FedAvg, FedAvgM, FedAdam,
FedYogi (server optimizers, node/strategy/base.py `ServerOptimizer`), FedProx
(training.prox_mu, node/learn/train.py), SCAFFOLD-style control variates
(training.control_variates, node/learn/control.py) and more local epochs with a decaying
learning rate (training.epochs, training.lr_decay), next to centralized training on
the pooled rows.

Every run is a whole consortium in one process (node.rehearsal.simulation: real nodes, real
signed envelopes on the memory transport), 8 members, 30 rounds, the first-slice
recipe (MLP 64, SGD 0.05, batch 32, 1 local epoch), every member applying the plain
weighted `mean` (with the consortium's default weight cap) so that only the option
differs. Tables: `default` (dirichlet 0.5, ROC-AUC), `churn` (column:state,
ROC-AUC), `digits` (dirichlet 0.5, accuracy).

Choosing the settings, never on the test set: each member splits its own training
rows 80/20 (a fixed per-member seed); the consortium trains on the 80 % and each
option's grid point is scored by the members' final models on the union of the
members' 20 % validation rows (a simulator can pool them; a consortium would sum
per-member counts). The schema's scaling constants still come from all training
rows (the validation rows included), as `prepare` fits them. The setting with the best
mean validation metric over the tuning tables (`--tune-on`, default `default` and
`digits`) and seeds is the option's choice; `churn` played no part in choosing and
confirms it. Every grid point is then run on the full training rows and scored on
the consortium test set; the table shows the chosen one per option (the JSON has all).

Per run: the final metric (mean over members on the test set), the first round
whose mean metric is within 0.01 of the final value (1-based), bytes sent per
member, seconds. Writes runs/bench/skew.json (`--out`) and prints it and a table.

`--rule` runs every option under another of the consortium's rules instead of the
plain mean (`auto`: the consortium default for --nodes members, multi_krum_staged at 8; the
server optimizer then steps on that rule's result), `--points` only the grid
points named (the chosen few, for a 3-seed confirmation).

    .venv/bin/python scripts/bench_skew.py                  # 1 seed (about 2 min on 2 cores)
    .venv/bin/python scripts/bench_skew.py --seeds 3                   # about 6 min
    .venv/bin/python scripts/bench_skew.py --tables digits --rounds 5 --no-tune   # small
    .venv/bin/python scripts/bench_skew.py --seeds 3 --rule auto --options fedavg,fedadam_local \
        --points 'fedavg;fedadam lr=0.03 epochs=2 decay=1' --out runs/bench/skew-recipe.json
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

TABLES = {"default": "dirichlet:0.5", "churn": "column:state", "digits": "dirichlet:0.5"}
VAL_FRACTION = 0.2
NEAR = 0.01

# option -> grid of (label, server params, training settings: SimulationSpec fields,
# every member's [training]: prox_mu, epochs, lr_decay, control_variates)
GRID: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {
    "fedavg": [("fedavg", {}, {})],
    "fedavgm": [(f"fedavgm b={b:g}", {"server_opt": "momentum", "server_momentum": b,
                                       "server_lr": 1.0}, {}) for b in (0.7, 0.9, 0.95)],
    "fedadam": [(f"fedadam lr={lr:g}", {"server_opt": "adam", "server_lr": lr}, {})
                for lr in (0.01, 0.03, 0.1)],
    "fedyogi": [(f"fedyogi lr={lr:g}", {"server_opt": "yogi", "server_lr": lr}, {})
                for lr in (0.01, 0.03, 0.1)],
    "fedprox": [(f"fedprox mu={mu:g}", {}, {"prox_mu": mu}) for mu in (0.01, 0.1)],
    "scaffold": [(f"scaffold e={e}", {}, {"control_variates": True, "epochs": e})
                 for e in (1, 2)],
    "local_steps": [(f"epochs={e} decay={d:g}", {}, {"epochs": e, "lr_decay": d})
                    for e, d in ((2, 1.0), (2, 0.95), (4, 0.95), (4, 0.9))],
    # combined: a server optimizer on the averaged update with more local epochs
    "fedadam_local": [(f"fedadam lr={lr:g} epochs={e} decay={d:g}",
                       {"server_opt": "adam", "server_lr": lr}, {"epochs": e, "lr_decay": d})
                      for lr, e, d in ((0.1, 2, 1.0), (0.1, 4, 0.95), (0.03, 2, 1.0))],
    "fedavgm_local": [(f"fedavgm b=0.9 epochs={e}", {"server_opt": "momentum",
                                                     "server_momentum": 0.9, "server_lr": 1.0},
                       {"epochs": e}) for e in (2,)],
    # FedAdam with more local work: epochs, a decay, a larger local learning rate
    "fedadam_more": [(f"fedadam lr={slr:g} epochs={e}" + (f" decay={d:g}" if d != 1 else "")
                      + (f" local_lr={lr:g}" if lr != 0.05 else ""),
                      {"server_opt": "adam", "server_lr": slr},
                      {"epochs": e, "lr_decay": d, "lr": lr})
                     for slr, e, d, lr in ((0.03, 3, 1.0, 0.05), (0.03, 4, 0.97, 0.05),
                                           (0.03, 1, 1.0, 0.1), (0.03, 2, 1.0, 0.1),
                                           (0.05, 2, 1.0, 0.05), (0.03, 3, 1.0, 0.1),
                                           (0.03, 5, 0.95, 0.05))],
    # FedAdam whose server rate decays with the round (server_lr_decay), 1 or 2 epochs
    "fedadam_decay": [(f"fedadam lr={slr:g} sdecay={sd:g}" + (f" epochs={e}" if e != 1 else "")
                       + (f" local_lr={lr:g}" if lr != 0.05 else ""),
                       {"server_opt": "adam", "server_lr": slr, "server_lr_decay": sd},
                       {"epochs": e, "lr": lr})
                      for slr, sd, e, lr in ((0.03, 0.95, 1, 0.05), (0.05, 0.93, 1, 0.05),
                                             (0.1, 0.9, 1, 0.05), (0.03, 0.95, 2, 0.05),
                                             (0.05, 0.93, 2, 0.05), (0.1, 0.9, 2, 0.05),
                                             (0.03, 0.95, 3, 0.05), (0.03, 0.95, 2, 0.1))],
    # FedAdam's β1 (server_momentum) and β2: 30 rounds are few for a 10-round memory
    "fedadam_beta": [(f"fedadam lr={slr:g} b1={b1:g} b2={b2:g}",
                      {"server_opt": "adam", "server_lr": slr, "server_momentum": b1,
                       "server_beta2": b2}, {})
                     for slr, b1, b2 in ((0.03, 0.5, 0.99), (0.03, 0.0, 0.99),
                                         (0.03, 0.9, 0.9), (0.03, 0.5, 0.9))],
}


def _split_validation(prep: Any, seed: int) -> dict[str, Any]:
    """Rewrite each member's training file to 80 % of its rows and point its config's
    data.eval_path at the other 20 %; return member -> its validation frame."""
    import tomllib

    import numpy as np
    import pandas as pd
    import tomli_w

    val = {}
    for i, (name, cfg_path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        cfg = tomllib.loads(cfg_path.read_text())
        data_file = (cfg_path.parent / cfg["data"]["path"]).resolve()
        df = pd.read_parquet(data_file)
        order = np.random.default_rng(10_007 * seed + i).permutation(len(df))
        n_val = max(1, int(round(VAL_FRACTION * len(df)))) if len(df) > 1 else 0
        val[name] = df.iloc[order[:n_val]].reset_index(drop=True)
        df.iloc[order[n_val:]].reset_index(drop=True).to_parquet(data_file)
        val_file = data_file.with_name(f"{name}-val.parquet")
        val[name].to_parquet(val_file)
        cfg["data"]["eval_path"] = f"../data/{val_file.name}"
        cfg_path.write_text(tomli_w.dumps(cfg))
    return val


def run_one(table: str, seed: int, rounds: int, params: dict[str, Any], train: dict[str, Any],
            validation: bool, workdir: Path, rule: str = "mean", nodes: int = 8
            ) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import torch

    from node.data.encode import encode
    from node.learn.train import evaluate, metric_name
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.run import run_consortium
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime.state import read_jsonl

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="skew-", dir=workdir))
    t0 = time.perf_counter()
    try:
        spec = SimulationSpec(dataset=table, nodes=nodes, partition=TABLES[table],
                              rounds=rounds, seed=seed, out=out, aggregation=rule,
                              aggregation_params=params,
                              round_deadline_s=300.0, **train)
        prep = prepare(spec)
        metric = metric_name(prep.schema.n_classes)
        if validation:
            val = _split_validation(prep, seed)
            X, y = encode(pd.concat(list(val.values()), ignore_index=True), prep.schema, "val")
        else:
            X, y = prep.test
        nodes = asyncio.run(run_consortium(spec, prep))
        finals = [evaluate(n.model, X, y)[metric] for n in nodes]
        cell: dict[str, Any] = {"metric": metric, "final": float(np.mean(finals)),
                                "final_min": float(np.min(finals)),
                                "bytes_sent_per_member": float(np.mean(
                                    [n.transport.stats.bytes_sent for n in nodes]))}
        if not validation:  # per-round metrics: the nodes evaluate on the test set
            per_round: dict[int, list[float]] = {}
            for n in nodes:
                for line in read_jsonl(n.state.path / "metrics.jsonl"):
                    per_round.setdefault(line["round"], []).append(line["metrics"][metric])
            curve = [float(np.mean(per_round[r])) for r in sorted(per_round)]
            cell["curve"] = [round(v, 4) for v in curve]
            final = curve[-1] if curve else float("nan")
            cell["round_within_0.01"] = next(
                (r + 1 for r, v in enumerate(curve) if abs(v - final) <= NEAR), None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    cell["seconds"] = round(time.perf_counter() - t0, 2)
    return cell


def centralized(table: str, seed: int, rounds: int, workdir: Path, nodes: int = 8) -> float:
    """The pooled training rows, the same recipe for `rounds` epochs (node.rehearsal.simulation)."""
    import torch

    from node.learn.train import metric_name
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.run import baselines
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="skew-c-", dir=workdir))
    try:
        spec = SimulationSpec(dataset=table, nodes=nodes, partition=TABLES[table],
                              rounds=rounds, seed=seed, out=out, aggregation="mean")
        prep = prepare(spec)
        central, _ = baselines(spec, prep)
        return float(central[metric_name(prep.schema.n_classes)])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """Per round, the mean over seeds of the members' mean metric (rounds every seed has)."""
    n = min((len(c) for c in curves), default=0)
    return [round(_mean([c[r] for c in curves]), 4) for r in range(n)]


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    """One panel per table: each run's mean curve over seeds (test set, members' mean
    metric per round) and centralized as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = list(summary["test"])
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.5), squeeze=False)
    seeds = len(summary["config"]["seeds"])
    plain = all(r["aggregation"] == "mean" for r in summary["config"]["rules"].values())
    for ax, t in zip(axes[0], tables, strict=True):
        res = summary["test"][t]
        metric = "?"
        for label, run in res["runs"].items():
            curve = run.get("curve_mean") or run.get("curve_seed0") or []
            metric = run.get("metric", metric)
            name = label if label != "fedavg" or plain else f"{label}: the rule, no optimizer"
            ax.plot(range(1, len(curve) + 1), curve, label=f"{name} ({run['final']:.3f})")
        ax.axhline(res["centralized"], color="black", linestyle="--",
                   label=f"centralized ({res['centralized']:.3f})")
        lo = min([res["centralized"]] + [min(r.get("curve_mean") or [1.0])
                                         for r in res["runs"].values()])
        ax.set_ylim(max(lo, res["centralized"] - 0.15), res["centralized"] + 0.02)
        ax.set_title(f"{t} ({summary['config']['tables'][t]})")
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric}, test set, mean of members and {seeds} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{summary['config']['nodes']} members, rule {summary['config']['rule']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default=",".join(TABLES))
    ap.add_argument("--options", default=",".join(GRID))
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (issue: 3)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--nodes", type=int, default=8,
                    help="members (the issue: 8); auto then resolves for this many")
    ap.add_argument("--tune-on", default="default,digits",
                    help="tables whose validation split chooses each option's setting")
    ap.add_argument("--no-tune", action="store_true",
                    help="skip choosing; report every grid point on the test set only")
    ap.add_argument("--points", default="",
                    help="only these grid points of the options (labels, ';'-separated, "
                         "e.g. 'fedavg;fedadam lr=0.1'); default: every point")
    ap.add_argument("--rule", default="mean",
                    help="the consortium's [rules] aggregation every member applies, with "
                         "its default f and weight cap: mean (the default here, so only the "
                         "option differs), a rule name (node.strategy), or auto (what the "
                         "consortium default resolves to for --nodes members, "
                         "node/strategy/consortium_rules.py)")
    ap.add_argument("--rule-param", action="append", default=[], metavar="KEY=VALUE",
                    help="a [rules.params] entry added to every point (repeatable), e.g. "
                         "weighting=declared; read as flnode's --aggregation-param (an int, "
                         "else a float, else the text)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "skew.json")
    args = ap.parse_args(argv)
    from gossip.errors import LocalError
    from node.ops.flags import parse_params
    try:
        extra_params = parse_params(args.rule_param, "--rule-param")
    except LocalError as exc:
        ap.error(str(exc))
    tables = [t for t in args.tables.split(",") if t]
    options = [o for o in args.options.split(",") if o]
    tune_on = [t for t in args.tune_on.split(",") if t]
    for t in tables + tune_on:
        if t not in TABLES:
            ap.error(f"table {t!r}: choose from {', '.join(TABLES)}")
    for o in options:
        if o not in GRID:
            ap.error(f"option {o!r}: choose from {', '.join(GRID)}")
    wanted = [lb.strip() for lb in args.points.split(";") if lb.strip()]
    known = {p[0] for o in options for p in GRID[o]}
    for lb in wanted:
        if lb not in known:
            ap.error(f"--points: {lb!r} is not a grid point of the options: choose from "
                     f"{'; '.join(sorted(known))}")
    if wanted:  # options left without a point are dropped
        options = [o for o in options if any(p[0] in wanted for p in GRID[o])]
    grid = {o: [(p[0], {**p[1], **extra_params}, p[2]) for p in GRID[o]
                if not wanted or p[0] in wanted] for o in options}
    from node.strategy.consortium_rules import pin_rules, resolve_rule, rules_table
    if not 2 <= args.nodes <= 64:
        ap.error(f"--nodes {args.nodes}: 2 to 64 members")
    rule = resolve_rule(args.rule, args.nodes)
    try:  # every point's server parameters under this rule, checked before any run
        rules = {p[0]: pin_rules(rules_table(args.nodes, rule, **p[1]), args.nodes, "--rule")
                 for o in options for p in grid[o]}
    except LocalError as exc:
        ap.error(f"--rule {args.rule!r}: {exc}")
    logging.getLogger("flnode").setLevel(logging.CRITICAL)
    seeds = list(range(args.seeds))
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-skew-"))
    points = [p for o in options for p in grid[o]]
    try:
        validation: dict[str, dict[str, Any]] = {}
        if not args.no_tune:
            for label, params, train in points:
                per_table = {t: _mean([run_one(t, s, args.rounds, params, train, True,
                                               workdir, rule, args.nodes)["final"]
                                       for s in seeds])
                             for t in tune_on}
                validation[label] = {"mean": _mean(list(per_table.values())),
                                     "per_table": per_table}
                print(f"validation {label:20s} {validation[label]['mean']:.4f}", flush=True)
        chosen = {}
        for o in options:
            labels = [p[0] for p in grid[o]]
            chosen[o] = max(labels, key=lambda lb: validation[lb]["mean"]) \
                if validation else labels[0]
        tests: dict[str, dict[str, Any]] = {}
        for t in tables:
            tests[t] = {"centralized": _mean([centralized(t, s, args.rounds, workdir,
                                                          args.nodes) for s in seeds]),
                        "runs": {}}
            for label, params, train in points:
                cells = [run_one(t, s, args.rounds, params, train, False, workdir, rule,
                                 args.nodes) for s in seeds]
                tests[t]["runs"][label] = {
                    "final": _mean([c["final"] for c in cells]),
                    "per_seed": [c["final"] for c in cells],
                    "round_within_0.01": _mean([c["round_within_0.01"] for c in cells]),
                    "bytes_sent_per_member": _mean([c["bytes_sent_per_member"] for c in cells]),
                    "seconds": _mean([c["seconds"] for c in cells]),
                    "curve_seed0": cells[0]["curve"], "metric": cells[0]["metric"],
                    "curve_mean": _mean_curve([c["curve"] for c in cells])}
                print(f"test {t:8s} {label:20s} {tests[t]['runs'][label]['final']:.4f}",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "config": {"tables": {t: TABLES[t] for t in tables}, "nodes": args.nodes,
                   "rounds": args.rounds,
                   "seeds": seeds,
                   "rule": f"{rule} (its default f and weight cap; --rule {args.rule})",
                   "rule_params": extra_params,
                   "rules": rules,
                   "recipe": "mlp 64, sgd 0.05, batch 32, 1 local epoch, privacy off "
                             "(unless the option's training settings say otherwise)",
                   "training": {p[0]: p[2] for o in options for p in grid[o]},
                   "grid": {o: [p[0] for p in grid[o]] for o in options},
                   "chosen_on": None if args.no_tune else
                   f"validation split ({int(VAL_FRACTION * 100)} % of each member's own "
                   f"training rows) of {', '.join(tune_on)}",
                   "confirm_tables": [t for t in tables if t not in tune_on]},
        "validation": validation, "chosen": chosen, "test": tests,
        "seconds": round(time.monotonic() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, allow_nan=True))
    print(json.dumps({k: summary[k] for k in ("config", "validation", "chosen")}, indent=2))
    print(f"\n{'table':8s} {'option (chosen setting)':36s} {'final':>7s} {'vs central':>10s} "
          f"{'vs fedavg':>9s} {'round≈':>6s} {'kB/member':>9s}")
    for t in tables:
        c = tests[t]["centralized"]
        base = tests[t]["runs"].get("fedavg", {}).get("final", float("nan"))
        print(f"{t:8s} {'centralized':36s} {c:7.4f}")
        rows = [(o, p[0]) for o in options for p in grid[o]]  # every point, grid order
        for o, lb in rows:
            r = tests[t]["runs"][lb]
            mark = "" if lb == chosen[o] or o == "fedavg" else " (not chosen)"
            print(f"{t:8s} {lb + mark:36s} {r['final']:7.4f} {r['final'] - c:+10.4f} "
                  f"{r['final'] - base:+9.4f} {r['round_within_0.01']:6.1f} "
                  f"{r['bytes_sent_per_member'] / 1000:9.0f}")
    png = plot_curves(summary, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {png} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

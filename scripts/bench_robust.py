#!/usr/bin/env python3
"""What each aggregation rule survives: hostile members with valid keys, in-process.

Every cell is a whole consortium in one process (node.rehearsal.simulation: real nodes, real
signed envelopes on the memory transport): 8 members, dirichlet 0.5, 30 rounds, the
last f members attacking with one model-level attack (`--attack` of the
simulators, node/rehearsal/config.py AttackConfig), every member applying one rule from the
consortium's [rules] with that f. The number is the honest members' mean metric
(roc_auc for `default`, accuracy for `digits`) on the consortium test set, next to
the clean plain-mean run of the same seed.

Attacks (strength as used here):

    sign-flip   start - 4 x update
    scale       -1000 x the model (the issue's attack 4)
    noise       + N(0, 1) on every value
    huge        every value 1e30
    weight      declared weight 1e12 on a sign-flipped (K = 4) share
    label-flip  trained on flipped labels

Columns: clean (no attacker, the rule at f = 1), each attack at f = 1 and f = 2 (the
rule configured for that f; `mean` is f = 0 whatever the column), and a column with
record-level DP (DP-SGD) at ε = 3 per member at f = 1 (its loss is against the
clean plain mean with the same DP). `absent f=F` (plain mean, the F would-be
attackers never start) separates the loss of their data from the harm of their
shares: no rule can win back what only the attackers held.

The full grid (2 datasets x 7 rules x (1 + 6 x 2 + 7 DP) cells x 3 seeds) takes
hours on 2 cores; `--grid reduced` (the default) is what fits in 30 minutes, and the
JSON says exactly what ran: f = 1 and clean cells with every seed, f = 2 cells with
the first seed, the DP column with the first seed for `mean` and the default rule
only (DP-SGD is 5-10x slower than plain training). The plain mean's scale and huge
cells wait out the round deadline every round (its members' training diverges and
they release nothing): ~35 s each, ~150 s with DP.
Cells run in `--jobs` processes. Writes runs/bench/robust.json and prints it
and a table.

    .venv/bin/python scripts/bench_robust.py                 # reduced grid
    .venv/bin/python scripts/bench_robust.py --grid full
    .venv/bin/python scripts/bench_robust.py --datasets digits --rules mean,median \\
        --attacks sign-flip --seeds 1 --rounds 5             # a small run
    .venv/bin/python scripts/bench_robust.py --f 2 --seeds 1 \\
        --rules 'mean,centered_clipping[weighting=declared],multi_krum[m=4]'

`--defaults` measures the default [rules] (the rule label `auto`: what `flnode
consortium build` writes for 8 members, f = 2 and the far filter included) under every
attack with each --f attackers, the same seeds' clean runs of the plain mean (the
reference), of the default and of the old default (f = 1, no far filter; also under
two attackers), both with --f members down (`absent`), and what the far filter saw
(`far`: the largest honest far_ratio, honest shares it left out). docs/results/robustness.md:

    .venv/bin/python scripts/bench_robust.py --defaults --f 1,2,3 --seeds 3 --no-dp \
        --out runs/bench/robust-defaults.json --cache runs/bench/robust-defaults-cells.jsonl

A rule is a name, or a configuration `NAME[KEY=VALUE;KEY=VALUE]` with the rule's
parameters (node.strategy.rule_params; `none` for None); its label in the JSON is
the text as given; `f=F` there fixes the rule's f whatever the number of attackers.
The consortium's weight cap (max(2/n, 0.25)) applies to all.
The keys in TRAINING (`epochs`, `lr_decay`, `prox_mu`, `control_variates`) in the
brackets are every member's [training] settings for that row, not rule parameters
(a recipe: 'multi_krum_staged[server_opt=adam;server_lr=0.1;epochs=2]'); the
reference stays the plain `mean` with the first-slice recipe (1 local epoch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT = "auto"  # a rule label: the default [rules] for the member count, f included
RULES = ("mean", "median", "trimmed_mean", "multi_krum", "multi_krum_staged",
         "centered_clipping", "norm_bounded_mean")
SIGN_FLIP_K = 4
# bench name -> the --attack kinds (KIND[=PARAM]) each attacker uses
ATTACKS: dict[str, tuple[str, ...]] = {
    "sign-flip": (f"sign-flip={SIGN_FLIP_K}",),
    "scale": ("scale=-1000",),
    "noise": ("noise=1",),
    "huge": ("huge",),
    "weight": ("weight=1e12", f"sign-flip={SIGN_FLIP_K}"),
    "label-flip": ("label-flip",),
}
DATASETS = ("default", "digits")
# A reference, not an attack: the would-be attackers never start (plain mean), so the
# loss that is only the attackers' missing data shows apart from what their shares do.
ABSENT = "absent"
DP_EPSILON = 3.0
GOAL = 0.02  # absolute: honest mean within this of the clean plain mean
# Shares arrive at once in process; the deadline only matters when a member releases
# nothing (its training diverged after a poisoned round: the plain mean under scale or
# huge, every round): a short one keeps such a cell from costing minutes. It must
# exceed one round of all members' training in one process: ~0.2 s plain (3 s), under
# 1 s with DP-SGD (5 s), with room for a loaded machine.
DEADLINE_S = 3.0
DEADLINE_DP_S = 5.0
# Keys of a rule label's brackets that are every member's [training] settings
# (SimulationSpec fields), with the type each must have
TRAINING = {"epochs": int, "lr_decay": float, "prox_mu": float, "control_variates": bool}


def split_training(label: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rule parameters, training settings) of a parsed rule label; raises ValueError
    naming a training setting of the wrong type or range."""
    rule = {k: v for k, v in params.items() if k not in TRAINING}
    train: dict[str, Any] = {}
    for key in TRAINING.keys() & params.keys():
        value = params[key]
        if TRAINING[key] is bool:
            if value not in (0, 1, "true", "false"):
                raise ValueError(f"rule {label!r}: {key} must be true or false, got {value!r}")
            value = value in (1, "true")
        elif TRAINING[key] is int:
            if not isinstance(value, int) or not 1 <= value <= 100:
                raise ValueError(f"rule {label!r}: {key} must be an integer in 1..100, "
                                 f"got {value!r}")
        else:
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
                    or (key == "lr_decay" and not 0 < value <= 1):
                raise ValueError(f"rule {label!r}: {key} must be a number "
                                 f"{'in (0, 1]' if key == 'lr_decay' else '>= 0'}, "
                                 f"got {value!r}")
            value = float(value)
        train[key] = value
    return rule, train


def parse_rule(label: str) -> tuple[str, dict[str, Any]]:
    """`NAME` or `NAME[KEY=VALUE;...]` -> (name, params); values are int, float, none
    or text. Raises ValueError naming what is wrong."""
    name, _, rest = label.partition("[")
    params: dict[str, Any] = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"rule {label!r}: a configuration ends with ']'")
        for item in filter(None, rest[:-1].split(";")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"rule {label!r}: {item!r} is not KEY=VALUE")
            params[key.strip()] = _value(value.strip())
    return name.strip(), params


def _value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_rules(text: str) -> list[str]:
    """Comma-separated rules; commas inside [...] do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [r.strip() for r in [*out, cur] if r.strip()]


def run_cell(dataset: str, rule: str, f: int, attack: str | None, seed: int, rounds: int,
             nodes: int = 8, partition: str = "dirichlet:0.5", dp: bool = False,
             workdir: str | None = None) -> dict[str, Any]:
    """One consortium run. The honest members' final metrics, or the crash."""
    import torch

    from node.learn.train import evaluate, metric_name
    from node.rehearsal.simulation.prepare import member_names, prepare
    from node.rehearsal.simulation.run import run_consortium
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    quiet = logging.getLogger("flnode")
    level = quiet.level  # restored below: a test calling this in-process keeps its logs
    quiet.setLevel(logging.CRITICAL)
    out = Path(tempfile.mkdtemp(prefix="robust-", dir=workdir))
    t0 = time.perf_counter()
    cell: dict[str, Any] = {"dataset": dataset, "rule": rule, "f": f, "attack": attack,
                            "seed": seed, "rounds": rounds, "dp": dp, "nodes": nodes,
                            "partition": partition}
    try:
        name, params = parse_rule(rule)
        params, train = split_training(rule, params)
        # f in the label: the rule's f whatever the number of attackers (the cell's f)
        rule_f = params.pop("f", None)
        cell["training"] = train
        # "auto": the default rules as `flnode consortium build` writes them (the rule, its
        # f and its parameters for this many members); the cell's f is only the attackers
        base = dict(dataset=dataset, nodes=nodes, partition=partition, rounds=rounds,
                    seed=seed, out=out, aggregation=name,
                    f=rule_f if rule_f is not None else None if name == DEFAULT
                    else 0 if name == "mean" else f,
                    aggregation_params=params,
                    round_deadline_s=DEADLINE_DP_S if dp else DEADLINE_S, **train)
        if dp:
            base.update(privacy="record", epsilon=DP_EPSILON, sigma=None, weight="uniform")
        names = member_names(SimulationSpec(**base))
        attackers = names[len(names) - f:] if attack else []
        if attack == ABSENT:  # the same members, never started: their data is missing
            spec = SimulationSpec(**base, absent=tuple(attackers))
        else:
            attacks = tuple(f"{kind}:{','.join(attackers)}" for kind in ATTACKS[attack]) \
                if attack else ()
            spec = SimulationSpec(**base, attacks=attacks)
        prep = prepare(spec)
        nodes_ = asyncio.run(run_consortium(spec, prep))
        metric = metric_name(prep.schema.n_classes)
        honest = {n.name: evaluate(n.model, *prep.test)[metric] for n in nodes_
                  if n.name not in attackers}
        if attack == ABSENT:
            attackers = []
        vals = [v for v in honest.values()]
        cell.update(metric=metric, attackers=attackers, honest=honest,
                    mean=float(sum(vals) / len(vals)) if all(map(math.isfinite, vals))
                    else float("nan"),
                    min=min(vals) if all(map(math.isfinite, vals)) else float("nan"),
                    caught=_caught(out, honest, attackers), far=_far(out, honest, attackers))
    except Exception as exc:  # a crash is a result here: the cell says so
        cell.update(crash=f"{type(exc).__name__}: {exc}"[:500], mean=float("nan"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        quiet.setLevel(level)
    cell["seconds"] = round(time.perf_counter() - t0, 2)
    return cell


def _far(out: Path, honest: dict, attackers: list[str]) -> dict[str, Any]:
    """What the far filter saw at the honest members: the largest `far_ratio` (the
    furthest other share's distance / the median distance) over their rounds, and how
    often it left out an honest share and an attacker's."""
    from node.runtime.state import read_jsonl

    ratios: list[float] = []
    dropped = {"honest": 0, "attackers": 0}
    for name in honest:
        rounds: dict[int, dict] = {}
        for line in read_jsonl(out / "state" / name / "audit.jsonl"):
            if line.get("kind") == "aggregate":
                rounds[line["round"]] = line
        for line in rounds.values():
            if isinstance(line.get("far_ratio"), int | float):
                ratios.append(float(line["far_ratio"]))
            for member, note in line.get("excluded", {}).items():
                if note.get("reason") == "far_outlier":
                    dropped["attackers" if member in attackers else "honest"] += 1
    return {"max_ratio": max(ratios) if ratios else None, **dropped}


def _caught(out: Path, honest: dict, attackers: list[str]) -> dict[str, int]:
    """Over honest members x rounds: how often an attacker's share was refused or
    excluded, clipped, capped or mostly trimmed (any of these counts once)."""
    from node.rehearsal.simulation.results import AGGREGATION_ACTIONS, seen_by

    counts = {"rounds": 0, "used": 0, "rejected": 0, **{w: 0 for w in AGGREGATION_ACTIONS}}
    for name in honest:
        for e in seen_by(out / "state" / name, attackers).values():
            counts["rounds"] += e["rounds"]
            counts["used"] += e["used"]
            counts["rejected"] += sum(e["rejected"].values())
            for w in AGGREGATION_ACTIONS:
                counts[w] += sum(e[w].values())
    return counts


# The default [rules] before issue 19 at 8 members (f = 1, no far filter), for the clean
# cost of the stronger default on the same seeds (`--defaults`).
OLD_DEFAULT = ("multi_krum_staged[f=1;far_factor=0;server_opt=adam;server_lr=0.03;"
               "server_momentum=0.5]")


LABELS = {OLD_DEFAULT: "old default f=1"}  # short names in the printed table


def defaults_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--defaults`: the default rules ("auto") with each --f attackers under every
    attack, and clean; the plain mean clean (the reference) and the old default clean
    (f = 1, no far filter: what the stronger default costs) and under two attackers;
    both with each --f members down (`absent`: never started), every seed."""
    cells = []
    for ds in args.datasets:
        for seed in range(args.seeds):
            cells.append(dict(dataset=ds, rule="mean", f=1, attack=None, seed=seed))
            cells.append(dict(dataset=ds, rule=OLD_DEFAULT, f=1, attack=None, seed=seed))
            cells.append(dict(dataset=ds, rule=DEFAULT, f=1, attack=None, seed=seed))
            for f in args.f:  # members down, not hostile: what f costs in availability
                for rule in (DEFAULT, OLD_DEFAULT):
                    cells.append(dict(dataset=ds, rule=rule, f=f, attack=ABSENT, seed=seed))
            for attack in args.attacks:
                for f in args.f:
                    cells.append(dict(dataset=ds, rule=DEFAULT, f=f, attack=attack, seed=seed))
                    if f == 2:  # what two colluders did to the old default (issue 19)
                        cells.append(dict(dataset=ds, rule=OLD_DEFAULT, f=f, attack=attack,
                                          seed=seed))
    return cells


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    from node.strategy.consortium_rules import DEFAULT_RULE, resolve_rule

    default = resolve_rule(DEFAULT_RULE, args.nodes)  # what auto is for this many members
    cells = []
    for ds in args.datasets:
        for seed in range(args.seeds):
            first = seed == 0
            full = args.grid == "full"
            for f in args.f:
                if f == 1 or full or first:
                    cells.append(dict(dataset=ds, rule="mean", f=f, attack=ABSENT, seed=seed))
            for rule in args.rules:
                cells.append(dict(dataset=ds, rule=rule, f=1, attack=None, seed=seed))
                if rule == "mean" and args.mean_reference_only:
                    continue
                for attack in args.attacks:
                    cells.append(dict(dataset=ds, rule=rule, f=1, attack=attack, seed=seed))
                    if (full or first) and 2 in args.f:
                        cells.append(dict(dataset=ds, rule=rule, f=2, attack=attack, seed=seed))
                if args.dp and (full or first) and (full or rule.split("[")[0] in ("mean",
                                                                                    default)):
                    cells.append(dict(dataset=ds, rule=rule, f=1, attack=None, seed=seed,
                                      dp=True))
                    for attack in args.attacks:
                        cells.append(dict(dataset=ds, rule=rule, f=1, attack=attack,
                                          seed=seed, dp=True))
    if 1 not in args.f:
        cells = [c for c in cells if c["f"] != 1 or c["attack"] is None]
    return cells


def _run(kw: dict[str, Any]) -> dict[str, Any]:
    return run_cell(**kw)


KEY = ("dataset", "rule", "f", "attack", "seed", "dp", "rounds", "nodes")


def _key(c: dict[str, Any]) -> tuple:
    return tuple(c.get(k, False if k == "dp" else None) for k in KEY)


def run_grid(cells: list[dict[str, Any]], rounds: int, jobs: int, nodes: int = 8,
             workdir: str | None = None, progress: bool = True,
             cache: Path | None = None) -> list[dict[str, Any]]:
    """Run the cells; with `cache` (JSONL), each finished cell is appended there at once
    and cells already in it are not run again (a stopped run resumes)."""
    todo = [{**c, "rounds": rounds, "nodes": nodes, "workdir": workdir} for c in cells]
    done: dict[tuple, dict[str, Any]] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            try:
                cell = json.loads(line)
            except ValueError:
                continue
            done[_key(cell)] = cell
    results = [done[_key(c)] for c in todo if _key(c) in done]
    todo = [c for c in todo if _key(c) not in done]
    # Seeds in order (a stopped run has whole seeds), each seed's DP cells first (the
    # slowest: the pool does not end on one long cell).
    todo.sort(key=lambda c: (c["seed"], not c.get("dp"), c["dataset"] != "digits"))
    t0 = time.monotonic()
    if jobs <= 1:
        it = map(_run, todo)
    else:
        pool = ProcessPoolExecutor(jobs)
        it = pool.map(_run, todo)
    try:
        for i, cell in enumerate(it, 1):
            results.append(cell)
            if cache is not None:
                with open(cache, "a") as fh:
                    fh.write(json.dumps(cell, sort_keys=True, default=str) + "\n")
            if progress:
                print(f"  [{i}/{len(todo)} {time.monotonic() - t0:6.0f}s] {cell['dataset']} "
                      f"{cell['rule']} f={cell['f']} {cell['attack'] or 'clean'}"
                      f"{' dp' if cell['dp'] else ''} seed {cell['seed']}: "
                      f"{cell['mean']:.4f} ({cell['seconds']:.1f}s)"
                      + (f" CRASH {cell['crash']}" if "crash" in cell else ""),
                      file=sys.stderr, flush=True)
    finally:
        if jobs > 1:
            pool.shutdown()
    return results


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs and all(map(math.isfinite, xs)) else float("nan")


def summarize(results: list[dict[str, Any]], rules: list[str], attacks: list[str],
              nodes: int = 8) -> dict:
    """Per dataset: the clean plain-mean reference per seed, and per (column, rule) the
    honest mean averaged over the seeds that ran, with its loss against the reference
    of the same seeds."""
    from node.strategy.consortium_rules import DEFAULT_RULE, resolve_rule

    out: dict[str, Any] = {}
    for ds in sorted({r["dataset"] for r in results}):
        rs = [r for r in results if r["dataset"] == ds]
        ref = {r["seed"]: r["mean"] for r in rs
               if r["rule"] == "mean" and r["attack"] is None and not r["dp"]}
        ref_dp = {r["seed"]: r["mean"] for r in rs
                  if r["rule"] == "mean" and r["attack"] is None and r["dp"]}
        table: dict[str, dict[str, Any]] = {}
        for r in rs:
            col = ("dp " if r["dp"] else "") + (f"{r['attack']} f={r['f']}" if r["attack"]
                                                 else "clean")
            e = table.setdefault(col, {}).setdefault(r["rule"], {"per_seed": {}, "crash": []})
            e["per_seed"][r["seed"]] = r["mean"]
            far = r.get("far") or {}
            if far.get("max_ratio") is not None:  # what the far filter saw (honest members)
                e["far_max_ratio"] = max(e.get("far_max_ratio", 0.0), far["max_ratio"])
            e["far_dropped_honest"] = e.get("far_dropped_honest", 0) + far.get("honest", 0)
            if "crash" in r:
                e["crash"].append(r["crash"])
        for col, per_rule in table.items():
            reference = ref_dp if col.startswith("dp ") else ref
            for e in per_rule.values():
                seeds = sorted(e["per_seed"])
                e["mean"] = _mean([e["per_seed"][s] for s in seeds])
                e["clean_mean_ref"] = _mean([reference[s] for s in seeds if s in reference])
                e["loss"] = e["clean_mean_ref"] - e["mean"] \
                    if math.isfinite(e["mean"]) and math.isfinite(e["clean_mean_ref"]) else None
                e["seeds"] = seeds
        for col, per_rule in table.items():  # against the same rule's clean run, same seeds
            for rule, e in per_rule.items():
                own = table.get("dp clean" if col.startswith("dp ") else "clean", {}).get(rule)
                own_mean = _mean([own["per_seed"][s] for s in e["seeds"]
                                  if s in own["per_seed"]]) if own else float("nan")
                e["loss_vs_own_clean"] = own_mean - e["mean"] \
                    if math.isfinite(own_mean) and math.isfinite(e["mean"]) else None
        metric = next((r["metric"] for r in rs if "metric" in r), None)
        goals = {}
        f1 = [c for c in table if c.endswith("f=1") and not c.startswith(("dp ", ABSENT))]
        f2 = [c for c in table if c.endswith("f=2") and not c.startswith(ABSENT)]
        for rule in rules:
            worst1 = [table[c][rule]["loss"] for c in f1 if rule in table[c]]
            worst2 = [table[c][rule]["loss"] for c in f2 if rule in table[c]]
            by_f = {}
            for k in sorted({int(c.rsplit("f=", 1)[1]) for c in table if "f=" in c}):
                cols = [c for c in table if c.endswith(f"f={k}") and rule in table[c]
                        and not c.startswith(("dp ", ABSENT))]
                own = [table[c][rule]["loss_vs_own_clean"] for c in cols]
                by_f[k] = {"worst_loss_vs_own_clean": None if None in own or not own
                           else max(own),
                           "within_goal_vs_own_clean": bool(own) and None not in own
                           and max(own) <= GOAL}
            goals[rule] = {
                "by_f": by_f,
                "clean_loss": table.get("clean", {}).get(rule, {}).get("loss"),
                "worst_loss_f1": None if None in worst1 or not worst1 else max(worst1),
                "worst_loss_f2": None if None in worst2 or not worst2 else max(worst2),
                "f1_within_goal": bool(worst1) and None not in worst1 and max(worst1) <= GOAL,
                "f2_within_goal": bool(worst2) and None not in worst2 and max(worst2) <= GOAL,
            }
        out[ds] = {"metric": metric, "clean_plain_mean": ref, "clean_plain_mean_dp": ref_dp,
                   "table": table, "goals": goals}
    crashes = [r for r in results if "crash" in r]
    # The rule that survives f = 1 (every attack within the goal on every dataset)
    # with the least loss on clean data.
    survivors = [rule for rule in rules if all(
        out[ds]["goals"][rule]["f1_within_goal"] for ds in out)]
    best = min(survivors, key=lambda rule: sum(
        out[ds]["goals"][rule]["clean_loss"] or 0.0 for ds in out), default=None)
    return {"datasets": out, "crashes": len(crashes), "crashed_cells": crashes,
            "default_rule": resolve_rule(DEFAULT_RULE, nodes), "best_rule_f1": best,
            "survivors_f1": survivors,
            "goal": GOAL}


def print_table(summary: dict, rules: list[str], attacks: list[str]) -> None:
    for ds, d in summary["datasets"].items():
        ref = d["clean_plain_mean"]
        print(f"\n{ds}: honest members' mean {d['metric']} (loss vs the clean plain mean "
              f"{_mean(list(ref.values())):.4f} in brackets; seeds as listed in the JSON)")
        cols = ["clean"] + [f"{a} f={f}" for f in (1, 2, 3) for a in [ABSENT, *attacks]] + \
            ["dp clean"] + [f"dp {a} f=1" for a in attacks]
        cols = [c for c in cols if c in d["table"]]
        for chunk in (cols[:8], cols[8:15], cols[15:22], cols[22:]):
            if not chunk:
                continue
            print(f"  {'rule':<18}" + "".join(f"{c:>20}" for c in chunk))
            for rule in rules:
                if not any(rule in d["table"][c] for c in chunk):
                    continue
                row = f"  {LABELS.get(rule, rule):<18}"
                for c in chunk:
                    e = d["table"][c].get(rule)
                    if e is None:
                        row += f"{'-':>20}"
                    elif e["crash"]:
                        row += f"{'CRASH':>20}"
                    else:
                        loss = e["loss"]
                        row += f"{e['mean']:>11.4f} ({'  nan ' if loss is None else f'{loss:+.3f}'})"
                print(row)
    print(f"\ncrashed cells: {summary['crashes']}; default rule {summary['default_rule']}; "
          f"rules within {summary['goal']} at f=1 for every attack: "
          f"{', '.join(summary['survivors_f1']) or 'none'}; of those the least clean loss: "
          f"{summary['best_rule_f1']}")


def resolve(nodes: int, params: dict[str, Any]) -> dict[str, Any]:
    """The pinned default [rules] table for `nodes` members with `params` on top."""
    from node.strategy.consortium_rules import pin_rules, rules_table

    return pin_rules(rules_table(nodes, DEFAULT, privacy_mode="off", **params), nodes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=["reduced", "full"], default="reduced")
    p.add_argument("--defaults", action="store_true",
                   help="only the default rules (auto) under every attack with --f attackers, "
                        "and clean: the plain mean (the reference), the old default (f = 1, "
                        "no far filter; also under 2 attackers) and the default, every seed "
                        "(sets --rules)")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--rules", default=",".join(RULES),
                   help="comma-separated rules, each NAME or NAME[KEY=VALUE;...] with the "
                        "rule's parameters, e.g. 'mean,multi_krum[score=staged;m=5]'; "
                        f"the keys {', '.join(TRAINING)} there are every member's "
                        "[training] settings for that row")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--f", default="1,2", help="attacker counts (comma-separated)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--mean-reference-only", action="store_true",
                   help="run the plain mean clean (the reference) but under no attack: its "
                        "failures are then not shown (a partial run; a plain mean owned by "
                        "a non-finite share waits out the round deadline every round)")
    p.add_argument("--no-dp", dest="dp", action="store_false",
                   help=f"leave out the record-DP (ε = {DP_EPSILON:g}) column")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "robust.json"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench" / "robust-cells.jsonl"),
                   help="finished cells, one JSON line each; a rerun skips them ('' : none)")
    args = p.parse_args(argv)
    args.datasets = args.datasets.split(",")
    args.rules = split_rules(args.rules)
    args.attacks = args.attacks.split(",")
    args.f = [int(x) for x in args.f.split(",")]
    if args.defaults:
        args.rules = ["mean", OLD_DEFAULT, DEFAULT]
    for a in args.attacks:
        if a not in ATTACKS:
            p.error(f"--attacks: {a!r}: choose from {', '.join(ATTACKS)}")
    from node.strategy import StrategyError, check_strategy
    for rule in args.rules:
        try:
            name, params = parse_rule(rule)
            params, _ = split_training(rule, params)
            # --defaults runs the mean and the old default at f = 1 and 2 only
            for f in ([1, 2] if args.defaults and rule != DEFAULT else args.f):
                if name == DEFAULT:
                    resolve(args.nodes, params)
                else:
                    check_strategy(name, {"f": 0 if name == "mean" else f, **params}, args.nodes)
        except (ValueError, StrategyError) as exc:
            p.error(f"--rules: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cells = defaults_grid(args) if args.defaults else grid(args)
    kind = "defaults" if args.defaults else args.grid
    print(f"bench_robust: {len(cells)} cells ({kind} grid), {args.nodes} members, "
          f"dirichlet 0.5, {args.rounds} rounds, {args.jobs} jobs", file=sys.stderr)
    t0 = time.monotonic()
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    results = run_grid(cells, args.rounds, args.jobs, args.nodes, cache=cache)
    summary = summarize(results, args.rules, args.attacks, args.nodes)
    summary["config"] = {
        "grid": "defaults" if args.defaults else args.grid, "datasets": args.datasets,
        "rules": args.rules,
        "default_rules": resolve(args.nodes, {}),
        "attacks": {a: list(ATTACKS[a]) for a in args.attacks}, "f": args.f,
        "seeds": args.seeds, "rounds": args.rounds, "members": args.nodes,
        "mean_reference_only": args.mean_reference_only,
        "partition": "dirichlet:0.5", "attackers": "the last f members by name",
        "dp": {"mode": "record", "epsilon": DP_EPSILON, "weight": "uniform"} if args.dp
        else None,
        "reduction": None if args.grid == "full" else
        "clean and f=1 cells: every seed; f=2 cells and the DP column: the first seed only; "
        "the DP column: mean and the default rule only",
    }
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["cells"] = results
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, sort_keys=True, default=str)
    out.write_text(text + "\n")
    # stdout: the summary without the per-cell records (those are in the file)
    print(json.dumps({k: v for k, v in summary.items() if k != "cells"}, indent=1,
                     sort_keys=True, default=str))
    print_table(summary, args.rules, args.attacks)
    print(f"\nwrote {out} ({summary['seconds']:.0f} s)")
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())

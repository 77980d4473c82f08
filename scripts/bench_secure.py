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

`--grid robust,cost,quality` (issue 22's "What it must show", every row a real `flnode
simulate` subprocess; its JSON rewritten after each row, so an interrupted run keeps its
rows; the load average beside each figure; a table at the end):

- robust: one attacker (--attacker, default site-1: the member with the most rows, the
  worst case for kinds whose weight follows rows) at 8 members, dirichlet 0.5, digits, for
  sign-flip, scale, noise, label-flip (node/rehearsal/attacks.py; in secure mode the
  model-level kinds act on the dealt contribution, HostileCodec): with DP on the sum
  (--privacy record --epsilon E: secure_select "sum", nothing per member opened), honest
  accuracy against the clean run of the same mode; and without DP with secure_select
  "multi-krum" (--robust-rounds rounds), where the selection on distances can leave the
  attacker out (who was excluded, and why, per attacker);
- cost: per-round seconds and bytes sent per member per round, secure vs today's plain
  sealed round (--seal on, the default rule), privacy off, --cost-rounds rounds (the first
  round, with its warm-up, left out of the seconds), digits iid, at 4, 8, 16, 32 members and
  an MLP of hidden 64 (4,810 parameters: the ~5k size) and hidden 1333 (99,985: the ~100k);
- quality: per table and seed, the secure DP run (`--secure --privacy record --epsilon E`,
  the node's own plan) against centralized DP-SGD (fixed recipe, same epsilon and
  accountant), and the secure run without DP (secure_select "sum", privacy off,
  --rounds rounds) against simulate's centralized non-private baseline. The DP rows run the
  plan's rounds: digits 43, churn 235, default 938 (20 minutes of rounds at load ~20, one
  seed: `--tables default --seeds 1 --only "DP eps" --row-timeout 2700`).

    .venv/bin/python scripts/bench_secure.py --grid robust --out-dir docs/results
    .venv/bin/python scripts/bench_secure.py --grid cost --out-dir docs/results
    .venv/bin/python scripts/bench_secure.py --grid quality --seeds 3 --out-dir docs/results

Writes runs/bench/secure.json unless --out (--grid: OUT_DIR/secure_<grid>.json); prints a
table.
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

# --- --grid: rows of real `flnode simulate` runs -----------------------------------------
ATTACKS = ("sign-flip", "scale", "noise", "label-flip")
# cost grid: the MLP hidden widths on digits (64 features, 10 classes: 75 h + 10 parameters)
COST_SIZES = {"5k": 64, "100k": 1333}
COST_MEMBERS = (4, 8, 16, 32)
# a row's subprocess is stopped after this long (a row, not the grid, is lost)
ROW_TIMEOUT_S = 1800.0
GOALS = {"robust": 0.02, "cost_ratio_8": 3.0, "dp": {"digits": 0.01, "default": 0.003,
                                                     "churn": 0.02}, "nodp": 0.01}


def inner_simulate(argv: list[str]) -> int:
    """`bench_secure.py --inner OVERRIDES_JSON SIMULATE_ARGS...`: `flnode simulate` with
    SimulationSpec fields the command line does not reach (secure_select "sum", the MLP's
    hidden width) replaced after parsing; everything else is the CLI's path."""
    import dataclasses

    from node.cli import build_parser
    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.scenario import spec_from_args

    overrides = json.loads(argv[0])
    args = build_parser().parse_args(["simulate", *argv[1:]])
    by_kind, cap = overrides.pop("_by_kind", None), overrides.pop("_rounds_cap", None)
    if overrides.pop("_dp_distances", None):  # a measurement of what the node refuses
        import node.strategy.consortium_rules as cr

        cr.DP_SELECTS = (*cr.DP_SELECTS, "multi-krum")  # charged per member (variant distances)
    if by_kind:  # --by-kind: count every message by kind (scripts/bench_secure_bytes.py)
        from scripts.bench_secure_bytes import install

        install(Path(by_kind), args.nodes)
    if cap:  # a DP cost row: the plan's [rules] unchanged, only its first `cap` rounds run
        import node.rehearsal.simulation.prepare as prep

        rules = prep.secure_dp_rules
        prep.secure_dp_rules = lambda *a, **k: (rules(*a, **k)[0], min(cap, rules(*a, **k)[1]))
    notes: list[str] = []
    spec = dataclasses.replace(spec_from_args(args, notes=notes), **overrides)
    simulate(spec, notes=notes)
    return 0


def simulate_row(label: str, flags: list[str], overrides: dict[str, Any],
                 workdir: Path, timeout: float = ROW_TIMEOUT_S) -> dict[str, Any]:
    """One `flnode simulate` (through inner_simulate) and what its run directory says."""
    import os
    import resource
    import subprocess

    out = workdir / f"row-{len(list(workdir.iterdir()))}"
    by_kind = out.with_suffix(".bykind.json") if overrides.get("_by_kind") else None
    if by_kind is not None:
        overrides = {**overrides, "_by_kind": str(by_kind)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", json.dumps(overrides),
           *flags, "--out", str(out)]
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        error = None if proc.returncode == 0 else \
            f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        error = f"timeout after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row: dict[str, Any] = {
        "label": label, "command": "flnode simulate " + " ".join(flags) + (
            f"  (SimulationSpec overrides {overrides})" if overrides else ""),
        "wall_seconds": wall,
        "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()], "error": error}
    if error is not None or not (out / "summary.json").exists():
        row["error"] = error or "no summary.json"
        return row
    summary = json.loads((out / "summary.json").read_text())
    secs, sent, failed, rounds_seen = [], [], 0, 0
    reasons: dict[str, int] = {}  # failed secure rounds (member-rounds) by reason
    for state in sorted((out / "state").iterdir()):
        for line in (state / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "round_bytes_sent" not in rec:
                continue
            sent.append(rec["round_bytes_sent"])
            if rec.get("round", 0) >= 1 and "seconds" in rec:  # round 0: warm-up; a
                # failed secure round's record has no duration
                secs.append(rec["seconds"])
            rounds_seen += 1
        for line in (state / "audit.jsonl").read_text().splitlines():
            rec = json.loads(line)  # a secure round's outcome is in its audit line only
            sec = rec.get("secure") if rec.get("kind") == "aggregate" else None
            if isinstance(sec, dict) and not sec.get("ok", True):
                failed += 1
                why = str(sec.get("reason"))
                reasons[why] = reasons.get(why, 0) + 1
    honest = summary.get("honest") or summary["consortium"]
    row.update({
        "metric": summary["metric"], "honest": honest["mean"],
        "consortium": summary["consortium"]["mean"], "centralized": summary["centralized"],
        "same_model": len(set(summary["consortium"]["per_node"].values())) == 1,
        "rounds": summary["rounds"], "rounds_done": summary["rounds_done"],
        "member_rounds_without_aggregate": failed, "member_rounds": rounds_seen,
        "failed_reasons": reasons,
        "round_seconds": sum(secs) / max(1, len(secs)),
        "bytes_per_member_per_round": sum(sent) / max(1, len(sent)),
        "epsilon": max((e for e in summary["epsilon"]["per_node"].values() if e is not None),
                       default=None),
        "rules": {k: summary["rules"].get(k) for k in ("secure", "secure_threshold",
                                                       "secure_select", "aggregation")}})
    seen = summary.get("attack", {}).get("seen_by", {})
    if seen:  # per attacker: what the honest members did with it, summed over them
        excl: dict[str, dict[str, int]] = {}
        for by in seen.values():
            for attacker, s in by.items():
                tally = excl.setdefault(attacker, {})
                for why, k in s.get("excluded", {}).items():
                    tally[why] = tally.get(why, 0) + k
                tally["member_rounds"] = tally.get("member_rounds", 0) + s.get("rounds", 0)
        row["attacker_excluded"] = excl
    if by_kind is not None and by_kind.exists():  # bytes per member and round, by kind
        from scripts.bench_secure_bytes import per_member_round

        row["bytes_by_kind"] = per_member_round(json.loads(by_kind.read_text()), rounds_seen)
    plan = next((out / "state").iterdir()) / "secure_plan.json"
    if plan.exists():
        p = json.loads(plan.read_text())
        row["plan"] = {k: p.get(k) for k in ("noise_multiplier", "sample_rate", "steps", "lr",
                                             "rows_total", "dim")}
    shutil.rmtree(out, ignore_errors=True)
    return row


def grid_rows(grid: str, args: argparse.Namespace) -> list[tuple[str, list[str], dict]]:
    """(label, simulate flags, SimulationSpec overrides) of a grid, cheap rows first."""
    eps = ["--privacy", "record", "--epsilon", f"{args.epsilon:g}"]
    base = ["--dataset", "digits", "--nodes", "8", "--partition", "dirichlet:0.5", "--secure"]
    rows: list[tuple[str, list[str], dict]] = []
    if grid == "robust":
        nodp = [*base, "--rounds", str(args.robust_rounds)]
        for mode, flags, ov in (("multi-krum, no DP", nodp, {"secure_select": "multi-krum"}),
                                (f"sum, DP eps {args.epsilon:g}", [*base, *eps],
                                 {"secure_select": "sum"}),
                                (f"range, DP eps {args.epsilon:g}", [*base, *eps],
                                 {"secure_select": "range"}),
                                # the selecting variant under DP, which the node refuses:
                                # distances opened and charged per member (node/privacy/
                                # secure.py "distances"), run here to show why it is refused
                                (f"multi-krum under DP eps {args.epsilon:g}", [*base, *eps],
                                 {"secure_select": "multi-krum", "_dp_distances": True})):
            rows.append((f"{mode}: clean", flags, ov))
            rows += [(f"{mode}: {k}", [*flags, "--attack", f"{k}:{args.attacker}"], ov)
                     for k in ATTACKS]
    elif grid == "cost":
        for n in COST_MEMBERS:
            for size, hidden in COST_SIZES.items():
                flags = ["--dataset", "digits", "--nodes", str(n), "--partition", "iid",
                         "--rounds", str(args.cost_rounds), "--seal", "on"]
                ov = {"hidden": hidden, **({"_by_kind": True} if args.by_kind else {})}
                rows.append((f"cost n={n} {size}: plain sealed", flags, ov))
                rows.append((f"cost n={n} {size}: secure", [*flags, "--secure"], ov))
                # DP on the sum (sum_only, the default with DP): the plan's first
                # --cost-rounds rounds (bytes and seconds are per round)
                rows.append((f"cost n={n} {size}: secure DP", [*flags, "--secure", *eps],
                             {**ov, "_rounds_cap": args.cost_rounds}))
    elif grid == "quality":
        for table in args.tables.split(","):
            for seed in range(args.seeds):
                flags = ["--dataset", table, "--nodes", "8", "--partition", TABLES[table],
                         "--secure", "--seed", str(seed)]
                rows.append((f"quality {table} seed {seed}: secure, no DP (sum)",
                             [*flags, "--rounds", str(args.rounds)], {"secure_select": "sum"}))
                rows.append((f"quality {table} seed {seed}: secure DP eps {args.epsilon:g}",
                             [*flags, *eps], {}))
    else:
        raise SystemExit(f"--grid {grid!r}: robust, cost or quality")
    return rows


def grid_main(args: argparse.Namespace) -> int:
    for grid in args.grid.split(","):
        out = args.out_dir / f"secure_{grid}.json"
        if args.show:  # the table of an earlier (or running) grid's file
            print(table_text(json.loads(out.read_text())))
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {"grid": grid, "config": {
            "epsilon": args.epsilon, "attacker": args.attacker, "seeds": args.seeds,
            "robust_rounds": args.robust_rounds, "cost_rounds": args.cost_rounds,
            "rounds": args.rounds, "tables": args.tables, "only": args.only,
            "cpus": __import__("os").cpu_count()}, "rows": []}
        if args.merge and out.exists():  # re-run some rows (--only) into an earlier run's file
            doc = json.loads(out.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for label, flags, ov in grid_rows(grid, args):
                if args.only and not any(o in label for o in args.only.split(",")):
                    continue
                row = simulate_row(label, flags, ov, work, args.row_timeout)
                if grid == "quality" and "DP eps" in label and row.get("error") is None:
                    table, seed = label.split()[1], int(label.split()[3][:-1])
                    row["central_dp"] = centralized_dp(table, seed, 30, args.epsilon, "fixed",
                                                       work)["final"]
                doc["rows"] = [r for r in doc["rows"] if r["label"] != label] + [row]
                if args.merge:  # keep the grid's order
                    order = [lb for lb, _, _ in grid_rows(grid, args)]
                    doc["rows"].sort(key=lambda r: order.index(r["label"])
                                     if r["label"] in order else len(order))
                out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
                print(row_line(grid, row, doc["rows"]), flush=True)
        print(f"wrote {out}")
        print(table_text(doc))
    return 0


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def row_line(grid: str, row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    if row.get("error"):
        return f"{row['label']}: FAILED ({row['error']}), load {row['load_before'][0]}"
    return (f"{row['label']}: honest {row['honest']:.4f} rounds/member-rounds without aggregate "
            f"{row['member_rounds_without_aggregate']}/{row['member_rounds']}, round "
            f"{row['round_seconds']:.2f} s, {row['bytes_per_member_per_round'] / 1e3:.1f} KB, "
            f"wall {row['wall_seconds']:.0f} s, load {row['load_before'][0]}")


def table_text(doc: dict[str, Any]) -> str:
    """The grid's markdown table (docs/results/secure.md takes it as printed)."""
    grid, rows = doc["grid"], doc["rows"]
    lines = []
    if grid == "robust":
        clean = {r["label"].split(":")[0]: r.get("honest") for r in rows
                 if r["label"].endswith(": clean")}
        lines += ["| mode: attack | honest acc | vs clean | goal 0.02 | rounds without "
                  "aggregate | attacker excluded (member-rounds) | eps | wall s | load 1m |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            mode = r["label"].split(":")[0]
            if r.get("error"):
                lines.append(f"| {r['label']} | FAILED: {r['error']} | | | | | | "
                             f"{r['wall_seconds']:.0f} | {r['load_before'][0]} |")
                continue
            ref = clean.get(mode)
            d = None if ref is None else r["honest"] - ref
            ok = "" if d is None or r["label"].endswith("clean") else (
                "met" if d >= -GOALS["robust"] else "NOT met")
            ex = "; ".join(f"{k}: " + ", ".join(f"{w} {n}" for w, n in sorted(v.items())
                                                 if w != "member_rounds")
                           + ("" if len(v) > 1 else "none") + f" of {v.get('member_rounds', 0)}"
                           for k, v in r.get("attacker_excluded", {}).items())
            lines.append(f"| {r['label']} | {r['honest']:.4f} | {_fmt(d, '+.4f')} | {ok} | "
                         f"{r['member_rounds_without_aggregate']}/{r['member_rounds']} | {ex} | "
                         f"{_fmt(r['epsilon'], '.3f')} | {r['wall_seconds']:.0f} | "
                         f"{r['load_before'][0]} |")
    elif grid == "cost":
        plain = {r["label"].rsplit(":", 1)[0]: r for r in rows if r["label"].endswith("plain sealed")}
        lines += ["| members, size | mode | s / round | KB / member / round | bytes vs plain | "
                  "s vs plain | wall s | load 1m |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            key, mode = r["label"].removeprefix("cost ").rsplit(":", 1)
            if r.get("error"):
                lines.append(f"| {key} | {mode.strip()} FAILED: {r['error']} | | | | | "
                             f"{r['wall_seconds']:.0f} | {r['load_before'][0]} |")
                continue
            p = plain.get(r["label"].rsplit(":", 1)[0])
            ok = p is not None and not p.get("error") and mode.strip().startswith("secure")
            rb = r["bytes_per_member_per_round"] / p["bytes_per_member_per_round"] if ok else None
            rs = r["round_seconds"] / p["round_seconds"] if ok else None
            lines.append(f"| {key} | {mode.strip()} | {r['round_seconds']:.3f} | "
                         f"{r['bytes_per_member_per_round'] / 1e3:.1f} | {_fmt(rb, '.2f')} | "
                         f"{_fmt(rs, '.2f')} | {r['wall_seconds']:.0f} | {r['load_before'][0]} |")
    else:
        lines += ["| run | metric | secure | reference | difference | eps | rounds | wall s | "
                  "load 1m |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['label']} | FAILED: {r['error']} | | | | | | "
                             f"{r['wall_seconds']:.0f} | {r['load_before'][0]} |")
                continue
            ref, what = (r["central_dp"], "central DP-SGD") if "central_dp" in r else \
                (r["centralized"], "central")
            lines.append(f"| {r['label']} | {r['metric']} | {r['consortium']:.4f} | "
                         f"{ref:.4f} ({what}) | {r['consortium'] - ref:+.4f} | "
                         f"{_fmt(r['epsilon'], '.3f')} | {r['rounds']} | "
                         f"{r['wall_seconds']:.0f} | {r['load_before'][0]} |")
    return "\n".join(lines)


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
    ap.add_argument("--grid", default=None,
                    help="comma list of robust, cost, quality (real simulate runs per row)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--attacker", default="site-1")
    ap.add_argument("--robust-rounds", type=int, default=30)
    ap.add_argument("--cost-rounds", type=int, default=4)
    ap.add_argument("--by-kind", action="store_true",
                    help="cost grid: count each row's bytes per member and round by message "
                         "kind and step (scripts/bench_secure_bytes.py), into the row's JSON")
    ap.add_argument("--row-timeout", type=float, default=ROW_TIMEOUT_S,
                    help="seconds before a row's simulate is stopped (the row says so)")
    ap.add_argument("--show", action="store_true",
                    help="print the tables of OUT_DIR/secure_<grid>.json, run nothing")
    ap.add_argument("--merge", action="store_true",
                    help="replace the --only rows in OUT_DIR/secure_<grid>.json, keep the rest")
    ap.add_argument("--only", default="",
                    help="comma list: run only the grid rows whose label contains one")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inner"]:
        return inner_simulate(argv[1:])
    args = ap.parse_args(argv)
    if args.grid:
        return grid_main(args)
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

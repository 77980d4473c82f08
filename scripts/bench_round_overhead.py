#!/usr/bin/env python3
"""Issue 22's "many small rounds must be cheap": the per-round cost of secure DP rounds,
before and after a change, in one invocation.

Runs `flnode simulate --secure --privacy record --epsilon 3 --dataset digits --nodes 8
--partition dirichlet:0.5 --seed 0` (the node's own plan: 43 rounds) alternately from two
source trees (before, after, then after, before, ...), each a subprocess with that tree
first on PYTHONPATH, and prints JSON: per run the wall and CPU seconds of the whole simulate
(getrusage of the child: its baselines and start-up included), the mean of the members'
round seconds (metrics.jsonl, round 0 left out), epsilon and the 1-minute load; then the
means per tree, after / before, and per round (whole run / rounds). Alternating in one
invocation is what makes the ratio mean something on a shared machine.

    git archive BASE_COMMIT | tar -x -C /tmp/base
    PYTHONPATH=. .venv/bin/python scripts/bench_round_overhead.py --before /tmp/base --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIMULATE = ["-m", "node.cli", "simulate", "--secure", "--privacy", "record", "--epsilon", "3",
            "--dataset", "digits", "--nodes", "8", "--partition", "dirichlet:0.5",
            "--seed", "0"]


def one_run(tree: Path, out: Path) -> dict[str, Any]:
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *SIMULATE, "--out", str(out)], cwd=tree, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(tree)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    secs = []
    for state in sorted((out / "state").iterdir()):
        for line in (state / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "round_bytes_sent" in rec and rec.get("round", 0) >= 1:
                secs.append(rec["seconds"])
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 2),
            "cpu_s": round((after.ru_utime + after.ru_stime)
                           - (before.ru_utime + before.ru_stime), 2),
            "rounds": summary["rounds"], "round_seconds_mean": round(sum(secs) / len(secs), 3),
            "epsilon": max(e for e in summary["epsilon"]["per_node"].values()),
            "consortium": summary["consortium"]["mean"], "load_1m_before": round(load, 2),
            "load_1m_after": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the base tree")
    ap.add_argument("--after", type=Path, default=ROOT, help="the changed tree (this one)")
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for label in ("before", "after") if i % 2 == 0 else ("after", "before"):
                out = Path(tmp) / f"{label}-{i}"
                row = {"tree": label, "pair": i, **one_run(trees[label], out)}
                shutil.rmtree(out, ignore_errors=True)
                runs.append(row)
                print(json.dumps(row), flush=True)

    def mean(key: str, tree: str) -> float:
        vals = [r[key] for r in runs if r["tree"] == tree]
        return sum(vals) / len(vals)

    summary: dict[str, Any] = {
        key: {"before": round(mean(key, "before"), 3), "after": round(mean(key, "after"), 3),
              "after/before": round(mean(key, "after") / mean(key, "before"), 3)}
        for key in ("wall_s", "cpu_s", "round_seconds_mean")}
    summary["per_round"] = {t: {"wall_s": round(mean("wall_s", t) / runs[0]["rounds"], 3),
                                "cpu_s": round(mean("cpu_s", t) / runs[0]["rounds"], 3)}
                            for t in trees}
    print(json.dumps({"command": "flnode simulate " + " ".join(SIMULATE[3:]),
                      "trees": {k: str(v) for k, v in trees.items()}, "runs": runs,
                      "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Wall of one seeded `flnode simulate` in process and with `--backend ray` (issue 24),
and whether the two summary.json and round records agree (all but wall times). Each run
is its own `flnode simulate` process, so the Ray run's wall includes starting a local Ray
head (or joining --address) and its member actors, as a user's does. Prints JSON and a
table row; docs/operate/ray.md keeps the figures.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_ray.py                 # 8 members, 10 rounds, digits
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_ray.py --address HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Round-record fields that are wall times: not compared.
WALL_TIME_FIELDS = ("seconds",)


def run(argv: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "node.cli", *argv, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench_ray: {' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall


def records(run_dir: Path) -> dict[str, list[dict]]:
    return {f.parent.name: [{k: v for k, v in json.loads(x).items() if k not in WALL_TIME_FIELDS}
                            for x in f.read_text().splitlines()]
            for f in sorted((run_dir / "state").glob("*/metrics.jsonl"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", help="a Ray head's HOST:PORT (default: a local Ray)")
    p.add_argument("--out", default="runs/bench_ray")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = ["simulate", "--dataset", args.dataset, "--nodes", str(args.members), "--rounds",
              str(args.rounds), "--model", args.model, "--seed", str(args.seed),
              "--privacy", "off"]
    ray_flags = ["--backend", "ray", *(["--address", args.address] if args.address else [])]
    load0 = os.getloadavg()[0]
    wall_process = run(common, out / "process")
    wall_ray = run([*common, *ray_flags], out / "ray")
    a = json.loads((out / "process" / "summary.json").read_text())
    b = json.loads((out / "ray" / "summary.json").read_text())
    # bytes: a hello's answer depends on who started first (not promised: docs/operate/ray.md)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "bytes")
    result = {"members": args.members, "rounds": args.rounds, "dataset": args.dataset,
              "model": args.model, "seed": args.seed, "address": args.address or "local",
              "wall_process_s": round(wall_process, 1), "wall_ray_s": round(wall_ray, 1),
              "ratio_ray_over_process": round(wall_ray / wall_process, 2),
              "summary_fields_that_differ": differ, "bytes_equal": a["bytes"] == b["bytes"],
              "round_records_equal": records(out / "process") == records(out / "ray"),
              "final_mean": a["consortium"]["mean"],
              "load_average_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
              "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))
    print("| members | rounds | data, model | in process | --backend ray | ratio | summary "
          "equal | records equal | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.members} | {args.rounds} | {args.dataset}, {args.model} | "
          f"{wall_process:.1f} s | {wall_ray:.1f} s | {wall_ray / wall_process:.2f}x | "
          f"{'yes' if not differ else 'no: ' + ', '.join(differ)} | "
          f"{'yes' if result['round_records_equal'] else 'no'} | "
          f"{load0:.1f} → {os.getloadavg()[0]:.1f} |")
    return 0 if not differ and result["round_records_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())

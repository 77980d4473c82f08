#!/usr/bin/env python3
"""The in-process simulator at scale: N members (default 1,000) on one MemoryHub, each a
full Node with its own state dir, under a sparse topology (default random-out:8), logreg,
20 rounds, privacy off. Prints JSON and a table: wall (prepare and run), peak RSS, bytes
each member sent per round, the final metric (mean over members on the common test set)
and the last round's consensus distance. Virtual time by default (no wall-clock
deadline inside the process: node/rehearsal/simulation/virtual_time.py). No baselines
(the local-only models of N members are not what this measures). Progress on the
terminal: one line per round once every member has closed it.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_scale.py --members 100
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_scale.py --members 300 --rounds 20

Goal (issue 24): 1,000 members, 20 rounds under 10 minutes and 16 GiB on 2 cores.
Figures and what the time goes to: docs/results/scale.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Progress:
    """One line per round once every member reported it (elapsed, mean metric)."""

    def __init__(self, members: int, rounds: int, metric: str, t0: float) -> None:
        self.members, self.rounds, self.metric, self.t0 = members, rounds, metric, t0
        self.got: dict[int, list[float]] = {}
        self.history: dict[int, float] = {}

    def on_round(self, rep) -> None:  # noqa: ANN001 - a RoundReport
        if rep.stopped:
            self.members -= 1
            return
        vals = self.got.setdefault(rep.round, [])
        vals.append(rep.metrics.get(self.metric, float("nan")))
        if len(vals) >= self.members:
            mean = sum(vals) / len(vals)
            self.history[rep.round] = mean
            print(f"  round {rep.round + 1:>3}/{self.rounds}  {len(vals)} members  mean "
                  f"{self.metric} {mean:.4f}  {time.perf_counter() - self.t0:7.1f} s  "
                  f"peak RSS {peak_rss_mib():.0f} MiB", flush=True)
            del self.got[rep.round]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from node.learn.train import evaluate, metric_name
    from node.rehearsal.simulation import virtual_time
    from node.rehearsal.simulation.consensus import ConsensusTracker
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.run import run_consortium
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    # N members' "waiting for round r shares" lines would bury the progress: errors only
    logging.getLogger("flnode").setLevel(logging.ERROR)
    out = Path(args.out) / f"{args.members}-{args.topology.replace(':', '_')}"
    if out.exists():
        shutil.rmtree(out)
    spec = SimulationSpec(dataset=args.dataset, nodes=args.members, partition=args.partition,
                          rounds=args.rounds, seed=args.seed, out=out, model=args.model,
                          privacy="off", topology=args.topology, compression=args.compression,
                          round_deadline_s=args.round_deadline)
    t0 = time.perf_counter()
    prep = prepare(spec)
    t_prep = time.perf_counter() - t0
    metric = metric_name(prep.schema.n_classes)
    print(f"bench_scale: {args.members} members, {args.topology}, {args.model}, "
          f"{args.rounds} rounds, {args.dataset} ({args.partition}); prepared in "
          f"{t_prep:.1f} s, peak RSS {peak_rss_mib():.0f} MiB", flush=True)
    t1 = time.perf_counter()
    progress = Progress(args.members, args.rounds, metric, t1)
    tracker = ConsensusTracker(args.members)
    coro = run_consortium(spec, prep, progress.on_round, tracker)
    nodes = virtual_time.run(coro) if args.clock == "virtual" else asyncio.run(coro)
    t_run = time.perf_counter() - t1
    finals = [evaluate(n.model, *prep.test)[metric] for n in nodes]
    sent = sum(n.transport.stats.bytes_sent for n in nodes)
    done = sum(max(1, n.book.current) for n in nodes)
    consensus = tracker.close()
    last = str(args.rounds - 1)
    return {"members": args.members, "topology": args.topology, "model": args.model,
            "rounds": args.rounds, "dataset": args.dataset, "partition": args.partition,
            "compression": args.compression, "clock": args.clock, "metric": metric,
            "final": float(np.mean(finals)), "final_min": float(np.min(finals)),
            "final_max": float(np.max(finals)),
            "history": {str(r): v for r, v in sorted(progress.history.items())},
            "consensus_relative_last": consensus["consensus_relative"].get(last),
            "wall_prepare_s": round(t_prep, 1), "wall_run_s": round(t_run, 1),
            "wall_s": round(t_prep + t_run, 1), "peak_rss_mib": round(peak_rss_mib()),
            "bytes_per_member_per_round": round(sent / done),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count()}


def table(r: dict) -> str:
    return "\n".join([
        "| members | topology | model | rounds | wall (prepare + run) | peak RSS | "
        "bytes/member/round | final (min-max) | consensus (last) | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['members']} | {r['topology']} | {r['model']} | {r['rounds']} | "
        f"{r['wall_s']} s ({r['wall_prepare_s']} + {r['wall_run_s']}) | "
        f"{r['peak_rss_mib']} MiB | {r['bytes_per_member_per_round']} | "
        f"{r['final']:.4f} ({r['final_min']:.3f}-{r['final_max']:.3f}) | "
        f"{r['consensus_relative_last']:.3g} | {r['load_average_1m_at_end']} |"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--topology", default="random-out:8")
    p.add_argument("--model", default="logreg", choices=("logreg", "mlp"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--dataset", default="default", choices=("default", "churn", "digits"))
    p.add_argument("--partition", default="iid")
    p.add_argument("--compression", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-deadline", type=float, default=600.0,
                   help="seconds a member waits for its in-peers (wall clock; default 600)")
    p.add_argument("--clock", choices=("virtual", "wall"), default="virtual",
                   help="virtual (default): node/rehearsal/simulation/virtual_time.py, "
                        "deadlines pass only when every member waits; wall: asyncio's clock")
    p.add_argument("--out", default="runs/bench_scale")
    args = p.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale-{args.members}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

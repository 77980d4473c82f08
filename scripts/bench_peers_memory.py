#!/usr/bin/env python3
"""Does a node's memory grow with its peers? RSS of real `flnode run` processes.

Runs `scripts/simulate_network.py` (real `flnode run` processes on 127.0.0.1) once
per (transport, members, variant) and samples every member process's RSS and
thread count every `--interval` seconds from /proc (psutil), by PID, for the
whole run. Per run it reports:

- `peak_rss_mb`: each process's highest sampled RSS (and VmHWM, the kernel's
  own peak, read at the last sample before the process ended), median and max
  over the members;
- `steady_rss_mb`: median over the members of each one's median RSS from
  `--steady-after` seconds after its start to its end;
- `threads`: the most threads any member had at once;
- `helpers`, `helper_peak_rss_mb_max`: the members' own child processes seen (the
  Parquet reader, node/data/parquet_child.py, which lives for a second at start: it may
  fall between samples) and the highest RSS one reached; never counted as members;
- `load_max`: the highest 1-minute load average during the run (a shared machine);
- `metric_mean`: the members' mean metric after the last round (summary.json);
- `wall_s`: simulate_network.py's wall clock (building the split, starting,
  all rounds, stopping).

Variants (`--variant NAME=ENV[,ENV]`, repeatable) run the same consortium with
extra environment variables for every node, e.g. `arena2=MALLOC_ARENA_MAX=2`;
`base` (no extra variables) always runs. The runs alternate (each member count:
every variant, then the next count), so a variant's ratio to `base` is measured
on the same busy machine at nearly the same time. The growth per peer is the
slope of peak RSS (median over members) between the smallest and largest member
count.

`--tracemalloc S` makes every node process write its top Python allocations
(tracemalloc, grouped by file:line) to NODE_STATE/../tracemalloc-NAME.txt every S
seconds (via a `sitecustomize.py` this script puts first on the nodes'
PYTHONPATH: no node code changes; slow, for diagnosis only).

Prints JSON (also written to --out) and a table. Keep member counts modest on a
shared machine: 32 processes at once need ~10 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# What marks a member process among simulate_network.py's children.
NODE_MARKERS = (("node.cli", "run"), ("node.rehearsal.member",))
MB = 1024 * 1024
# PSS/USS (memory_full_info) every this many samples: it reads /proc/PID/smaps.
PSS_EVERY = 10

SITECUSTOMIZE = '''
import os, threading, time, tracemalloc
_every = float(os.environ.get("FLNODE_BENCH_DUMP_S", "0"))
_trace = os.environ.get("FLNODE_BENCH_TRACEMALLOC") == "1"
if _every > 0:
    if _trace:
        tracemalloc.start(1)
    def _smaps():
        by, cur = {}, "?"
        for line in open("/proc/self/smaps"):
            f = line.split()
            if not f[0].endswith(":"):
                cur = f[5] if len(f) > 5 else "[anon]"
                if "site-packages/" in cur:
                    cur = cur.split("site-packages/")[1].split("/")[0] + ":" + os.path.basename(cur)
            elif f[0] in ("Rss:", "Anonymous:"):
                d = by.setdefault(cur, [0, 0])
                d[f[0] == "Anonymous:"] += int(f[1])
        return sorted(by.items(), key=lambda kv: -kv[1][0])
    def _dump():
        import sys
        argv = sys.argv
        name = os.path.basename(argv[argv.index("--config") + 1]) if "--config" in argv else str(os.getpid())
        out = os.path.join(os.environ["FLNODE_BENCH_DUMP_DIR"], f"dump-{name}.txt")
        while True:
            time.sleep(_every)
            lines = [f"at {time.time():.0f} threads {threading.active_count()} python-threads: "
                     + ", ".join(t.name for t in threading.enumerate())]
            tops = {}
            for m in list(sys.modules):
                tops[m.split(".")[0]] = tops.get(m.split(".")[0], 0) + 1
            lines.append(f"modules {len(sys.modules)}: " + ", ".join(
                f"{k} {v}" for k, v in sorted(tops.items(), key=lambda kv: -kv[1])[:25]))
            rows = _smaps()
            lines.append(f"smaps total rss {sum(v[0] for _, v in rows) / 1024:.1f} MB, anonymous "
                         f"{sum(v[1] for _, v in rows) / 1024:.1f} MB; by mapping (rss, anon MB):")
            lines += [f"{v[0] / 1024:8.1f} {v[1] / 1024:8.1f} {k}" for k, v in rows[:25]]
            if _trace:
                stats = tracemalloc.take_snapshot().statistics("lineno")
                lines.append(f"tracemalloc total {sum(s.size for s in stats) / 1e6:.1f} MB; top:")
                lines += [f"{s.size / 1e6:8.2f} MB {s.count:8d} {s.traceback}" for s in stats[:40]]
            with open(out[:-4] + "-history.txt", "a") as f:  # one line per dump
                top = {k: round(v[0] / 1024, 1) for k, v in rows[:6]}
                f.write(f"{time.time():.1f} modules {len(sys.modules)} threads "
                        f"{threading.active_count()} rss {sum(v[0] for _, v in rows) / 1024:.1f} "
                        f"{top}\\n")
            with open(out + ".tmp", "w") as f:
                f.write("\\n".join(lines) + "\\n")
            os.replace(out + ".tmp", out)
    threading.Thread(target=_dump, daemon=True, name="bench-dump").start()
'''


def is_node(cmdline: list[str]) -> bool:
    return any(all(m in cmdline for m in marker) for marker in NODE_MARKERS)


def hwm_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_once(args: argparse.Namespace, transport: str, members: int, env_extra: dict[str, str],
             out_dir: Path) -> dict:
    # With `-- --data-dir DIR` the members are DIR's files (one per member): the
    # member count is theirs, and simulate_network.py refuses --dataset beside it.
    table = [] if "--data-dir" in args.extra else ["--nodes", str(members),
                                                   "--dataset", args.dataset]
    cmd = [sys.executable, str(ROOT / "scripts" / "simulate_network.py"),
           "--transport", transport, *table,
           "--model", args.model, "--rounds", str(args.rounds), "--privacy", "off",
           "--out", str(out_dir)] + args.extra
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env_extra.get("_SITE", ""), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("_SITE", None)
    t0 = time.monotonic()
    sim = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True)
    parent = psutil.Process(sim.pid)
    procs: dict[int, dict] = {}
    helpers: dict[int, float] = {}  # pid -> peak RSS (MB) of the members' own children
    load = 0.0  # the highest 1-minute load average seen: others share this machine
    while sim.poll() is None:
        now = time.monotonic() - t0
        load = max(load, os.getloadavg()[0])
        try:
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            try:
                if child.pid in helpers or child.ppid() in procs:
                    # A member's own child (the Parquet reader, node/data/parquet_child.py;
                    # between fork and exec it still shows the member's command line): not
                    # a member, its peak reported apart.
                    rss = child.memory_info().rss / MB
                    helpers[child.pid] = max(helpers.get(child.pid, 0.0), rss)
                    continue
                info = procs.get(child.pid)
                if info is None:
                    if not is_node(child.cmdline()):
                        continue
                    info = procs[child.pid] = {"start": now, "samples": [], "hwm": None,
                                               "threads": 0, "pss": 0.0, "uss": 0.0}
                rss = child.memory_info().rss / MB
                info["samples"].append((now, rss))
                info["threads"] = max(info["threads"], child.num_threads())
                info["hwm"] = hwm_mb(child.pid) or info["hwm"]
                if len(info["samples"]) % PSS_EVERY == 0:  # reads smaps: costly
                    full = child.memory_full_info()
                    info["pss"] = max(info["pss"], full.pss / MB)
                    info["uss"] = max(info["uss"], full.uss / MB)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        time.sleep(args.interval)
    output = sim.stdout.read() if sim.stdout else ""
    wall = time.monotonic() - t0
    code = sim.wait()
    try:  # the members' mean metric after the last round (simulate_network.py's summary)
        mean = json.loads((out_dir / "summary.json").read_text())["consortium"]["mean"]
    except (OSError, ValueError, KeyError, TypeError):
        mean = None
    peaks, hwms, steadies, series = [], [], [], []
    for info in procs.values():
        samples = info["samples"]
        if not samples:
            continue
        peaks.append(max(r for _, r in samples))
        if info["hwm"] is not None:
            hwms.append(info["hwm"])
        late = [r for t, r in samples if t - info["start"] >= args.steady_after]
        steadies.append(statistics.median(late or [r for _, r in samples]))
        series.append([(round(t - info["start"], 1), round(r, 1)) for t, r in samples[::10]])
    return {
        "transport": transport, "members": members, "exit_code": code,
        "wall_s": round(wall, 1), "processes": len(peaks),
        "peak_rss_mb_median": round(statistics.median(peaks), 1) if peaks else None,
        "peak_rss_mb_max": round(max(peaks), 1) if peaks else None,
        "vmhwm_mb_median": round(statistics.median(hwms), 1) if hwms else None,
        "steady_rss_mb_median": round(statistics.median(steadies), 1) if steadies else None,
        "peak_pss_mb_median": round(statistics.median(
            [i["pss"] for i in procs.values()]), 1) if procs else None,
        "peak_uss_mb_median": round(statistics.median(
            [i["uss"] for i in procs.values()]), 1) if procs else None,
        "threads_max": max((i["threads"] for i in procs.values()), default=0),
        "load_max": round(load, 1), "metric_mean": mean,
        "helpers": len(helpers),
        "helper_peak_rss_mb_max": round(max(helpers.values()), 1) if helpers else None,
        "series_first_member": series[0] if series else [],
        "tail": output.strip().splitlines()[-3:] if code else [],
    }


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition("=")
    env = {}
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition("=")
        env[k] = v
    return name, env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", default="4,8,16", help="comma-separated member counts")
    p.add_argument("--transport", default="libp2p", help="libp2p, mqtt or both")
    p.add_argument("--dataset", default="churn")
    p.add_argument("--model", default="mlp")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    p.add_argument("--steady-after", type=float, default=5.0)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ENV[,ENV]",
                   help="extra environment for every node, e.g. arena2=MALLOC_ARENA_MAX=2")
    p.add_argument("--dump", type=float, default=0.0, metavar="S",
                   help="nodes write their threads, modules and RSS by mapping to the run "
                        "directory every S seconds")
    p.add_argument("--tracemalloc", action="store_true",
                   help="with --dump: also their top Python allocations (slow)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "peers_memory.json")
    p.add_argument("extra", nargs="*", help="after --: more simulate_network.py flags")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.members.split(",")]
    transports = ["libp2p", "mqtt"] if args.transport == "both" else [args.transport]
    variants = [("base", {})] + [parse_variant(v) for v in args.variant]
    work = Path(tempfile.mkdtemp(prefix="bench-peers-mem-"))
    if args.dump:
        site = work / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for _, env in variants:
            env.update(_SITE=str(site), FLNODE_BENCH_DUMP_S=str(args.dump),
                       FLNODE_BENCH_TRACEMALLOC="1" if args.tracemalloc else "0")
    rows = []
    for rep in range(args.repeats):
        for transport in transports:
            for n in counts:
                for name, env in variants:
                    out_dir = work / f"{transport}-{n}-{name}-{rep}"
                    run_env = dict(env)
                    if args.dump:
                        out_dir.mkdir(parents=True)
                        run_env["FLNODE_BENCH_DUMP_DIR"] = str(out_dir)
                    row = run_once(args, transport, n, run_env, out_dir)
                    row.update(variant=name, repeat=rep, run_dir=str(out_dir))
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "series_first_member"}),
                          file=sys.stderr, flush=True)
    growth = {}
    for transport in transports:
        for name, _ in variants:
            pts = [(r["members"], r["peak_rss_mb_median"]) for r in rows
                   if r["transport"] == transport and r["variant"] == name
                   and r["peak_rss_mb_median"] is not None]
            lo = min(pts, default=None)
            hi = max(pts, default=None)
            if lo and hi and hi[0] > lo[0]:
                growth[f"{transport}/{name}"] = round((hi[1] - lo[1]) / (hi[0] - lo[0]), 2)
    result = {"dataset": args.dataset, "model": args.model, "rounds": args.rounds,
              "privacy": "off", "runs": rows, "peak_mb_per_extra_peer": growth,
              "goal": "<= 300 MB per process at 8 members, <= 2 MB more per extra peer"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\n{'transport':9} {'variant':10} {'n':>3} {'peak med':>9} {'peak max':>9} "
          f"{'steady':>7} {'pss':>6} {'uss':>6} {'thr':>4} {'wall s':>7} {'load':>5} "
          f"{'metric':>6} {'helper':>6} rc")
    for r in rows:
        print(f"{r['transport']:9} {r['variant']:10} {r['members']:3d} "
              f"{r['peak_rss_mb_median'] or 0:9.1f} {r['peak_rss_mb_max'] or 0:9.1f} "
              f"{r['steady_rss_mb_median'] or 0:7.1f} {r['peak_pss_mb_median'] or 0:6.1f} "
              f"{r['peak_uss_mb_median'] or 0:6.1f} {r['threads_max']:4d} "
              f"{r['wall_s']:7.1f} {r['load_max']:5.1f} {r['metric_mean'] or 0:6.3f} "
              f"{r['helper_peak_rss_mb_max'] or 0:6.1f} {r['exit_code']}")
    for k, v in growth.items():
        print(f"peak RSS growth {k}: {v} MB per extra peer")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

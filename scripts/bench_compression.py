#!/usr/bin/env python3
"""What each share compression costs in bytes and in the final metric, in process.

Every cell is one `flnode simulate` run (node.rehearsal.simulation: real nodes, real
signed envelopes on the memory transport) of the consortium's default rule with
[rules].compression set to one codec (gossip/compress.py): `--dataset` (digits),
`--nodes` (8) members, dirichlet 0.5, `--rounds` (10) rounds, each of `--seeds` (0); once
without DP and once with record-level DP (DP-SGD) at ε = `--epsilon` (3) per member.

Per cell: the bytes of one share envelope (signed, as it crosses the wire; from
the outbox, `keep_releases`), the bytes each member sent per round in all (shares,
hellos, prekeys, seen and final reports: summary.json's "bytes" / rounds / members),
the consortium's final mean metric on the consortium test set, and each member's ε
from the accountant (compression is post-processing: it must be the uncompressed
run's), and where one share's bytes go (`account`: outer fields, body keys, tensor
wrappers, data headers, values). `--aggregation RULE` runs another rule than the
default; `--select block:B|shared:P` swaps top-k's selection (the sender's choice) to
measure it under DP; `--leak`, `--server lazy`, `--combine count`, `--params` and
`--alloc` patch error feedback, the server step, multi-Krum's mean, the rule's
parameters and top-k's k per tensor in process, to find which side loses top-k's
points under DP (docs/results/compression.md, "fifth session"): measured, none
adopted. Writes `--out`/compression.json (and .jsonl, row by row) and
prints it and a table.

    .venv/bin/python scripts/bench_compression.py
    .venv/bin/python scripts/bench_compression.py --modes none,int8 --privacy off
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("none", "fp16", "int8", "topk:0.1")
# Goals (issue 24), against the uncompressed run: (x fewer share bytes at least, final
# metric within this many points, 1 point = 0.01).
GOALS = {"int8": (3.5, 0.3), "topk": (30.0, 1.0)}


def goal(mode: str, fewer: float, delta: float) -> str:
    """"met" / "missed (...)" for a mode with a goal, "" otherwise."""
    g = GOALS.get(mode.split(":")[0])
    if g is None:
        return ""
    ok = fewer >= g[0] and abs(delta) * 100 <= g[1]
    return "met" if ok else f"missed (needs {g[0]:g}x, {g[1]:g} point)"


def _size(item: object) -> int:
    import msgpack

    return len(msgpack.packb(item, use_bin_type=True))


def account(raw: bytes) -> dict[str, int]:
    """Where one signed share envelope's bytes go (issue 24: the framing no codec
    shrinks): each outer field as msgpack encodes it, the body's map keys and weight,
    each tensor's name, dtype and shape, and its data split into the values' own bytes
    ("payload": float32/float16 raw, int8 q, scales, top-k gaps) and their msgpack
    headers. The parts add up to len(raw) (asserted)."""
    import msgpack

    outer = msgpack.unpackb(raw, raw=False)
    names = ("protocol", "consortium_id", "sender_key", "kind", "round", "seq", "body", "sig")
    out = {"outer array header": _size(outer) - sum(_size(i) for i in outer)}
    for name, item in zip(names, outer, strict=True):
        if name == "body":
            out["body bin header"] = _size(item) - len(item)
        elif name == "sig":
            out["signature (64) + header"] = _size(item)
        else:
            out[name] = _size(item)
    doc = msgpack.unpackb(outer[6], raw=False)
    out["body map header"] = _size(doc) - sum(_size(k) + _size(v) for k, v in doc.items())
    payload = header = names_ = 0
    for key, value in doc.items():
        out[f"body key {key!r}"] = _size(key)
        if key != "tensors":
            out[f"body value {key}"] = _size(value)
            continue
        out["tensors array header"] = _size(value) - sum(_size(t) for t in value)
        for t in value:
            wrapped = isinstance(t, list) and len(t) == 4 and isinstance(t[0], str)
            data = t[3] if wrapped else t  # top-k v2: the data alone
            names_ += _size(t) - _size(data)  # [ , name, dtype, shape, ] around the data
            parts = [data] if isinstance(data, bytes) else data
            raw_parts = [p for p in parts if isinstance(p, bytes)]
            payload += sum(len(p) for p in raw_parts)
            header += _size(data) - sum(len(p) for p in raw_parts)
    out["tensor items: name, dtype, shape"] = names_
    out["tensor data: headers, block, k"] = header
    out["tensor data: values (payload)"] = payload
    assert sum(out.values()) == len(raw), (sum(out.values()), len(raw))
    return out


def per_block(block: int):
    """top-k's selection per block of `block` consecutive values (the same share of each
    block's largest, then the k largest of those): issue 24 asked whether spreading the
    kept values helps under DP, where the largest |values| are partly noise. A sender's
    choice (gossip/compress.py select_top), not a wire change: measured, not adopted."""
    import numpy as np

    def select(mag, k):
        n = mag.size
        blocks = -(-n // block)
        each = min(block, -(-k // blocks))
        if k >= n or each >= block:
            return np.sort(np.argpartition(-mag, k - 1)[:k]) if k < n else np.arange(n)
        padded = np.full(blocks * block, -np.inf)
        padded[:n] = mag
        top = np.argpartition(-padded.reshape(blocks, block), each - 1, axis=1)[:, :each]
        cand = (top + np.arange(blocks)[:, None] * block).reshape(-1)
        cand = cand[cand < n]
        return np.sort(cand[np.argpartition(-mag[cand], k - 1)[:k]])
    return select


def shared_support(public: float) -> None:
    """top-k whose first `public` share of each tensor's k is the same for every member:
    the coordinates of the largest |last aggregate step| (this round's start minus the
    last round's, which every member holds: post-processing of what was released), the
    rest the member's own largest |update + residual|. Under DP the rule then sees up to
    eight values on those coordinates and averages their noise, as it does uncompressed.
    A sender's choice (receivers read any increasing indices): measured, not adopted.
    The first round a member compresses (no last start) is plain top-k."""
    import threading

    import numpy as np

    import gossip.compress
    from node.learn.models import flat_to_named
    from node.runtime import compression

    if getattr(compression.Compressor.apply, "shared", None) is not None:
        return  # installed by an earlier cell of this run
    local = threading.local()
    apply, plain = compression.Compressor.apply, gossip.compress.select_top

    def apply_shared(self, trained):
        start = trained.start.detach().float().clone()
        last = getattr(self, "_bench_last_start", None)
        self._bench_last_start = start
        local.steps = (None if last is None else
                       iter([a.reshape(-1) for _, a in flat_to_named(self.model,
                                                                     (start - last).abs())]))
        try:
            return apply(self, trained)
        finally:
            local.steps = None

    def select(mag, k):
        steps = getattr(local, "steps", None)
        if steps is None:
            return plain(mag, k)
        step = next(steps)  # the tensors come in the model's order, one call each
        shared = int(k * public)
        if shared == 0 or k >= mag.size:
            return plain(mag, k)
        first = np.argpartition(-step, shared - 1)[:shared]
        own = np.array(mag, dtype=np.float64)
        own[first] = -1.0  # below any |value|: taken already
        rest = np.argpartition(-own, k - shared - 1)[:k - shared] if k > shared else first[:0]
        return np.sort(np.concatenate([first, rest]))

    apply_shared.shared = public
    compression.Compressor.apply = apply_shared
    gossip.compress.select_top = select


def leaky(beta: float) -> None:
    """Leaky error feedback: the residual kept is beta x (update + residual - sent), so
    a coordinate's unsent noise decays by beta a round instead of random-walking until
    top-k selects it. Post-processing: the residual is still made of the released
    (noised) update and what was sent of it. Measured under DP (issue 24); scaled when
    the release commits, so the outbox's residual file (a restart's) is unscaled: a bench."""
    from node.runtime import compression

    plain = compression.Compressor.commit
    if getattr(plain, "leak", None) is not None:
        return

    def commit(self, pending):
        if pending.residual is not None:
            pending = compression.Pending(pending.residual * beta)
        return plain(self, pending)
    commit.leak = beta
    compression.Compressor.commit = commit


def lazy_server() -> None:
    """The server optimizer steps a coordinate only in a round some combined share
    carried it (its Δ is not 0): m, v and the model stay as they were elsewhere (lazy
    Adam), so one sparse carry is one step, not a decaying momentum tail. Measured
    under DP (issue 24)."""
    import torch

    from node.strategy.server_opt import ServerOptimizer

    plain = ServerOptimizer.step
    if getattr(plain, "lazy", None):
        return

    def step(self, round, reference, combined, result):
        m0, v0 = self.m, self.v
        out = plain(self, round, reference, combined, result)
        carried = (combined - reference).abs() > 1e-10 * reference.abs() + 1e-30
        if m0 is None:
            m0 = torch.zeros_like(self.m)
            v0 = None if self.v is None else torch.zeros_like(self.v)
        keep = ~carried
        if self.m is not m0:  # the step was taken: undo it where nothing was carried
            self.m = torch.where(keep, m0, self.m)
            if self.v is not None and v0 is not None:
                self.v = torch.where(keep, v0, self.v)
            out = torch.where(keep, reference, out)
        return out
    step.lazy = True
    ServerOptimizer.step = step


def count_mean() -> None:
    """The rule's weighted mean of the shares it kept taken per coordinate over the
    shares that carried it (their value differs from the reference the compressed
    shares are read on), with the weights renormalised over those; the reference
    where none carried it. Which shares are kept is still decided on whole shares.
    Measured under DP (issue 24)."""
    import torch

    from node.strategy import rules

    plain = rules.MultiKrum.combine
    if getattr(plain, "count", None):
        return

    def combine(self, shares, ctx):
        center = ctx.center
        captured = {}

        def wsum(picked, fractions):
            stacked = torch.stack([c.vector for c in picked])
            w = torch.tensor(fractions, dtype=torch.float64)[:, None]
            carried = (stacked != center).double() * w
            den = carried.sum(dim=0)
            num = (stacked * carried).sum(dim=0)
            captured["n"] = den
            return torch.where(den > 0, num / den.clamp_min(1e-300), center)
        rules.weighted_sum = wsum
        try:
            return plain(self, shares, ctx)
        finally:
            rules.weighted_sum = original
    original = rules.weighted_sum
    combine.count = True
    rules.MultiKrum.combine = combine


def allocate(spec: str) -> None:
    """top-k's k per tensor skewed by size: "SMALL/BIG/LIMIT": tensors of fewer than
    LIMIT values send SMALL x the fraction, larger ones BIG x it (same total on
    `digits` with 2.5/0.75/1024: 195 values against 194). A codec change (receivers
    check k), measured in process, where sender and receivers share the patch."""
    import math

    import gossip.compress

    codec = gossip.compress.Codec
    if getattr(codec.k, "alloc", None):
        return
    if spec.startswith("sqrt:"):  # sqrt:N1,N2,...: the model's tensor sizes
        sizes = [int(x) for x in spec[5:].split(",")]

        def k(self, n):  # ceil(F x d) kept values split over the tensors as sqrt(n)
            total = math.ceil(self.fraction * sum(sizes))
            return min(n, max(1, round(total * math.sqrt(n) / sum(map(math.sqrt, sizes)))))
    else:
        small, big, limit = (float(x) for x in spec.split("/"))

        def k(self, n):
            f = self.fraction * (small if n < limit else big)
            return min(n, max(1, math.ceil(f * n)))
    k.alloc = spec
    codec.k = k


def cell(args: argparse.Namespace, mode: str, privacy: str, seed: int) -> dict:
    from rich.console import Console

    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec

    if args.select.startswith("block:"):
        import gossip.compress

        gossip.compress.select_top = per_block(int(args.select.split(":")[1]))
    elif args.select.startswith("shared:"):
        shared_support(float(args.select.split(":")[1]))
    if args.leak < 1:
        leaky(args.leak)
    if args.server == "lazy":
        lazy_server()
    if args.alloc:
        allocate(args.alloc)
    if args.combine == "count":
        count_mean()
    out = Path(args.out) / "runs" / f"{privacy}-{mode.replace(':', '_')}-{seed}"
    if out.exists():
        shutil.rmtree(out)
    dp = {"privacy": "record", "epsilon": args.epsilon, "sigma": None} \
        if privacy == "record" else {}
    rule = {"aggregation": args.aggregation} if args.aggregation else {}
    if args.params:
        rule["aggregation_params"] = json.loads(args.params)
    t0 = time.perf_counter()
    summary = simulate(SimulationSpec(dataset=args.dataset, nodes=args.nodes,
                                      partition="dirichlet:0.5", rounds=args.rounds,
                                      seed=seed, out=out, compression=mode,
                                      keep_releases=True, **dp, **rule),
                       console=Console(quiet=True))
    wall = time.perf_counter() - t0
    envs = sorted((out / "state").glob("*/outbox/round-*.env"))
    shares = [p.stat().st_size for p in envs]
    sent = sum(v["sent"] for v in summary["bytes"].values())
    eps = [v for v in summary["epsilon"]["per_node"].values() if v is not None]
    return {"mode": mode, "privacy": privacy, "seed": seed, "epsilon_budget": dp.get("epsilon"),
            "select": args.select, "leak": args.leak, "server": args.server,
            "combine": args.combine, "params": args.params,
            "alloc": args.alloc,
            "aggregation": args.aggregation or "default",
            "share_bytes": round(sum(shares) / len(shares)) if shares else None,
            "sent_per_member_per_round": round(
                sent / sum(max(1, r) for r in summary["rounds_done"].values())),
            "metric": summary["metric"], "final": summary["consortium"]["mean"],
            "epsilon_max": max(eps) if eps else None, "rejected": summary["rejected"],
            "wall_s": round(wall, 1),
            "share_bytes_by_part": account(envs[-1].read_bytes()) if envs else None}


def table(rows: list[dict]) -> str:
    """One line per (privacy, mode): the mean over the seeds it shares with "none" (all
    its seeds if none), and each of those seeds' final."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["privacy"], r["mode"]), []).append(r)

    def mean(rs: list[dict], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs)
    lines = ["| privacy | mode | share bytes | x fewer | sent/member/round | final (mean) "
             "| vs none | per seed | ε (max) | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (privacy, mode), rs in groups.items():
        base = groups.get((privacy, "none"))
        if base:  # compare on the seeds both ran: seeds differ by more than the codecs
            seeds = {r["seed"] for r in rs} & {r["seed"] for r in base}
            base = [r for r in base if r["seed"] in seeds] or None
            rs = [r for r in rs if r["seed"] in seeds] or rs
        fewer = (f"{mean(base, 'share_bytes') / mean(rs, 'share_bytes'):.1f}"
                 if base and rs[0]["share_bytes"] else "-")
        delta = f"{mean(rs, 'final') - mean(base, 'final'):+.4f}" if base else "-"
        eps = [r["epsilon_max"] for r in rs if r["epsilon_max"] is not None]
        priv = "off" if privacy == "off" else f"record ε={rs[0]['epsilon_budget']:g}"
        per_seed = " ".join(f"{r['final']:.3f}" for r in rs)
        epsilon = f"{max(eps):.3f}" if eps else "off"
        met = (goal(mode, mean(base, "share_bytes") / mean(rs, "share_bytes"),
                    mean(rs, "final") - mean(base, "final"))
               if base and rs[0]["share_bytes"] else "")
        lines.append(f"| {priv} | {mode} | {round(mean(rs, 'share_bytes'))} | {fewer} | "
                     f"{round(mean(rs, 'sent_per_member_per_round'))} | "
                     f"{mean(rs, 'final'):.4f} | {delta} | "
                     f"{per_seed} | {epsilon} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--privacy", default="off,record", help="off, record or both")
    p.add_argument("--dataset", default="digits", choices=("default", "churn", "digits"))
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--aggregation", default=None, help="the rule (default: the consortium "
                   "default, node/strategy/consortium_rules.py)")
    p.add_argument("--select", default="top", help="top-k's selection: top (the k largest "
                   "of a tensor, the codec's), block:B (the same share of each block of B) or shared:P "
                   "(P of k on the last aggregate step's largest coordinates, as every member)")
    p.add_argument("--leak", type=float, default=1.0, help="top-k's error feedback keeps "
                   "this share of the residual a round (1: all, the codec's)")
    p.add_argument("--server", default="plain", choices=("plain", "lazy"),
                   help="lazy: the server optimizer steps only coordinates a share carried")
    p.add_argument("--combine", default="mean", choices=("mean", "count"),
                   help="count: multi-Krum's mean per coordinate over the kept shares that "
                   "carried it")
    p.add_argument("--params", default=None, help="the rule's parameters as JSON "
                   "([rules].aggregation_params), e.g. '{\"server_tau\": 0.01}'")
    p.add_argument("--alloc", default=None, help="SMALL/BIG/LIMIT: top-k's fraction x "
                   "SMALL for tensors under LIMIT values, x BIG for the others")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # small models: one thread is several times faster here
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for privacy in args.privacy.split(","):
        for mode in args.modes.split(","):
            for seed in seeds:
                rows.append(cell(args, mode, privacy, seed))
                rows[-1].update(dataset=args.dataset, rounds=args.rounds,
                                load_average_1m=round(os.getloadavg()[0], 2))
                with (out / "compression.jsonl").open("a") as f:  # row by row, as they come
                    f.write(json.dumps(rows[-1]) + "\n")
                print(table(rows), flush=True)
    result = {"dataset": args.dataset, "nodes": args.nodes, "rounds": args.rounds,
              "seeds": seeds, "partition": "dirichlet:0.5", "cells": rows}
    (out / "compression.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Simulate a consortium as N real `flnode run` processes on 127.0.0.1.

Takes the flags of `flnode simulate` plus `--transport`. Builds the same
split, partitions and consortium test set from the same seed, generates keys
and node configs on free loopback ports, starts one OS process per member,
shows their progress, waits for them (stopping every one by PID, whatever
happens) and merges their per-member results into the same `summary.json`
and `accuracy.png` as the in-process simulator.

`--data-dir DIR` (one CSV/Parquet per member; `--label`, `--schema`, `--test`) and
`--scenario FILE` work as in `flnode simulate` (node/rehearsal/simulation/scenario.py build_spec; flags
override the file, whose `transport` applies here). Each member's final model is read
from its checkpoint and scored on the common test set and on its own held-out rows,
as the in-process simulator scores its nodes' models: with privacy off both give the
same per-member figures. Each member's ε is recomputed from its ledger at the run's δ,
as `flnode status` does, so a member stopped between charging a round and writing its
metrics line is counted in full.

`--transport mqtt` gossips through mosquitto: with no `--mqtt-broker` it
starts its own on a free loopback port (one user and password per member, an
ACL that confines each member to its own topic prefix; see
`scripts/mqtt_broker.py`) and stops it by PID afterwards.

`--kill NAME@ROUND` sends SIGKILL to that member once it has finished ROUND
(1-based) and restarts it `--restart-after` seconds later: the others go on
without it (deadline), and it resumes from its state dir and catches up.
`--chaos N` does that N times to members and rounds drawn from the seed, each
kill a random 0-2 s after the round so it lands in any phase (training,
charging, sending, collecting, checkpointing), each restart 0.5-3 s later.

The fault flags (`--loss`, `--delay`, `--net-partition`, `--absent`,
`--straggler`) are those of `flnode simulate`: each node's config gets a
`[faults]` section (gossip/testing/faults.py); an absent member is listed in
the consortium and never started. A member whose config has `[faults]` or `[attack]`
runs as `python -m node.rehearsal.member --config F` (`flnode run` with the rehearsal's
wrappers; `flnode run` itself refuses those sections); the others are `flnode run`.

`--attack KIND[=PARAM]:MEMBER[,MEMBER...]` (as in `flnode simulate`) makes those
members hostile: their configs get an `[attack]` section (node/rehearsal/config.py
AttackConfig), so each is a real node process with a valid key that releases,
signs and sends what the attack says. summary.json names the attackers, reports
the honest members' metrics apart (`honest`) and what each honest member did
about each attacker (`attack.seen_by`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import msgpack  # noqa: E402
import tomli_w  # noqa: E402

from gossip.errors import LocalError  # noqa: E402
from node.cli import model_kind  # noqa: E402
from node.learn.train import metric_name  # noqa: E402
from node.ops.flags import (  # noqa: E402
    SIMULATE_EPILOG,
    add_attack_flags,
    add_data_dir_flags,
    add_fault_flags,
    add_privacy_flags,
    add_rules_flags,
    add_seal_flag,
    track_given,
)
from node.privacy.ledger import Ledger  # noqa: E402
from node.rehearsal.simulation.output import (  # noqa: E402
    make_console,
    mean_text,
    plot_history,
    print_attack,
    print_noise,
    print_summary,
)
from node.rehearsal.simulation.prepare import evaluation_rows, prepare  # noqa: E402
from node.rehearsal.simulation.results import MemberResult, summarize  # noqa: E402
from node.rehearsal.simulation.run import NOISE_OS, baselines, evaluate_rows, model_from_state  # noqa: E402
from node.rehearsal.simulation.scenario import spec_from_args  # noqa: E402
from node.rehearsal.simulation.spec import SimulationSpec  # noqa: E402
from node.runtime.config import seals  # noqa: E402
from node.runtime.state import StateDir, read_jsonl  # noqa: E402
from scripts.ports import free_ports  # noqa: E402

POLL_S = 0.25


def member_command(config: Path) -> list[str]:
    """`flnode run --config F` for an honest member; a member whose config has [attack] or
    [faults] (which `flnode run` refuses) runs as `python -m node.rehearsal.member`."""
    with open(config, "rb") as f:
        rehearsal = not {"attack", "faults"}.isdisjoint(tomllib.load(f))
    if rehearsal:
        return [sys.executable, "-m", "node.rehearsal.member", "--config", str(config)]
    return [sys.executable, "-m", "node.cli", "run", "--config", str(config)]


@dataclass
class Member:
    name: str
    config: Path
    state: Path
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        out = open(self.log, "a")
        out.write(f"--- start {self.starts} at {time.strftime('%H:%M:%S')} ---\n")
        out.flush()
        self.proc = subprocess.Popen(
            member_command(self.config),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            start_new_session=True)
        out.close()

    def metrics(self) -> list[dict]:
        return read_jsonl(self.state / "metrics.jsonl")

    def stop(self, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def history_of(members: list[Member], metric: str) -> dict[int, dict[str, dict[str, float]]]:
    history: dict[int, dict[str, dict[str, float]]] = {}
    for m in members:
        for line in m.metrics():  # a round re-run after a restart: the last line wins
            if "metrics" in line:  # not the "stopped sharing" line
                history.setdefault(line["round"], {})[m.name] = line["metrics"]
    return history


def ledger_epsilon(spec: SimulationSpec, state: Path) -> float | None:
    """A member's ε as `flnode status` computes it (node/ops/status.py): recomputed from its
    ledger by the accountant at the run's δ, never read from a metrics line, which a
    member killed after charging a round (or before its first line) has not written.
    None only with privacy off. A ledger that cannot be read is a LocalError naming it."""
    if spec.privacy == "off":
        return None
    return Ledger(state / "ledger.jsonl").epsilon(spec.delta)  # StateDir.ledger_path; read only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="--scenario FILE: a scenario file (network_configs/scenarios/) holds these "
               "settings in one TOML; flags given on the command line override the file's "
               "values. " + SIMULATE_EPILOG.split(". ", 1)[1])
    p.add_argument("--scenario", type=Path, metavar="FILE",
                   help="a scenario file (network_configs/scenarios/); flags override it")
    p.add_argument("--dataset", choices=["default", "churn", "digits"], default="default")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=model_kind, default="mlp", metavar="KIND",
                   help="logreg, mlp, deep_mlp, res_mlp or a plug-in package.module:factory "
                        "(importable by every member process: on PYTHONPATH); its options "
                        "from the scenario file's [model]")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--prox-mu", type=float, default=0.0, metavar="MU",
                   help="FedProx proximal term (training.prox_mu; 0: off)")
    p.add_argument("--lr-decay", type=float, default=1.0, metavar="D",
                   help="round r trains at lr * D**r (training.lr_decay; 1: constant)")
    p.add_argument("--control-variates", action="store_true",
                   help="SCAFFOLD-style control variates (training.control_variates)")
    add_privacy_flags(p)
    add_seal_flag(p)
    p.add_argument("--transport", choices=["libp2p", "mqtt"], default="libp2p")
    p.add_argument("--mqtt-broker", metavar="URL",
                   help="use this broker (mqtt://HOST:PORT) instead of starting mosquitto; "
                        "members log in as their names with <--mqtt-password-dir>/<name>.password")
    p.add_argument("--mqtt-password-dir", metavar="DIR")
    p.add_argument("--mqtt-tls", action="store_true",
                   help="our own mosquitto listens with TLS (a CA generated for this run; "
                        "every node gets it as gossip.mqtt.ca_file)")
    p.add_argument("--record-wire", action="store_true",
                   help="mqtt with our own broker: an observer account subscribed to '#' "
                        "records every message (what the broker's operator sees) to "
                        "OUT/wire.msgpack and the run prints which kinds crossed it")
    p.add_argument("--network-config", help="template with member names")
    p.add_argument("--round-deadline", type=float, default=20.0,
                   help="seconds a node waits for missing shares after its own release")
    p.add_argument("--kill", action="append", default=[], metavar="NAME@ROUND",
                   help="SIGKILL member NAME after it finished ROUND, then restart it")
    p.add_argument("--restart-after", type=float, default=3.0)
    p.add_argument("--chaos", type=int, default=0, metavar="N",
                   help="N SIGKILL/restarts of members and rounds drawn from --seed")
    add_rules_flags(p)
    add_fault_flags(p)
    add_attack_flags(p)
    add_data_dir_flags(p)
    p.add_argument("--timeout", type=float, default=None,
                   help="give up after this many seconds (default: from rounds and deadline)")
    p.add_argument("--out", help="run directory (required unless the scenario file gives out)")
    # The flags that shape the spec: a scenario file's value stands unless one is typed
    # (the script's own flags are not in a scenario file).
    own = ("scenario", "mqtt_broker", "mqtt_password_dir", "mqtt_tls", "record_wire", "kill",
           "restart_after", "chaos", "timeout")
    p.set_defaults(flag_defaults=track_given(p, keep=own))
    return p.parse_args(argv)


def setup_mqtt(args: argparse.Namespace, prep, port: int, console):
    """Start our own mosquitto (unless --mqtt-broker) and point every node config at it.
    Returns the broker (or None) and the wire recorder (or None)."""
    broker = recorder = None
    password_dir = Path(args.mqtt_password_dir) if args.mqtt_password_dir else None
    if args.mqtt_broker is None:
        from mqtt_broker import WireRecorder, start_broker

        password_dir = prep.config_paths[0].parent.parent / "broker"
        observers = {"observer": secrets.token_urlsafe(24)} if args.record_wire else None
        broker = start_broker(prep.consortium, password_dir, port, observers=observers,
                              tls=args.mqtt_tls)
        console.print(f"  mosquitto pid {broker.pid} on {broker.url} (per-member passwords and "
                      f"ACL; log {broker.log_path})")
        if observers:
            recorder = WireRecorder(broker, "observer", observers["observer"])
            console.print("  recording the wire as the broker's operator sees it (observer "
                          "subscribed to '#')")
    for name, path in zip(prep.names, prep.config_paths, strict=True):
        cfg = tomllib.loads(path.read_text())
        if password_dir is not None:
            cfg["gossip"]["mqtt"] = {"password_file": str((password_dir / f"{name}.password")
                                                          .resolve())}
        if broker is not None and broker.ca_file is not None:
            cfg["gossip"].setdefault("mqtt", {})["ca_file"] = str(broker.ca_file)
        path.write_text(tomli_w.dumps(cfg))
    return broker, recorder


def save_wire(recorder, out: Path, console) -> None:
    """Write what the observer recorded and say which envelope kinds crossed the broker."""
    from collections import Counter

    from gossip.envelope import decode_outer
    from gossip.errors import RemoteError

    messages = recorder.stop()
    (out / "wire.msgpack").write_bytes(msgpack.packb(messages, use_bin_type=True))
    kinds: Counter[str] = Counter()
    for _, payload in messages:
        try:
            kinds[decode_outer(payload).kind] += 1
        except RemoteError:
            kinds["(not an envelope)"] += 1
    total = sum(len(p) for _, p in messages)
    console.print(f"  the broker relayed {len(messages)} messages ({total / 1e6:.1f} MB) to the "
                  f"observer: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                  + f"; wrote {out / 'wire.msgpack'}")


def main(argv: list[str] | None = None) -> int:
    import torch

    # The baselines train here: with torch's default two threads and other work on the
    # 2 cores, its spinning threads took minutes instead of seconds (one thread: ~3-15x
    # faster for these models, measured on the 2-core machine).
    torch.set_num_threads(1)
    args = parse_args(argv)
    console = make_console()
    try:
        from dataclasses import replace

        from node.rehearsal.simulation.prepare import member_names

        spec = spec_from_args(args, network=True)
        spec = replace(spec, out=spec.out.resolve())
        names = member_names(spec)
        ports = free_ports(len(names) + 1)
        if spec.transport == "mqtt":
            scheme = "mqtts" if args.mqtt_tls else "mqtt"
            url = args.mqtt_broker or f"{scheme}://127.0.0.1:{ports[-1]}"
            addresses = {n: {"mqtt": url} for n in names}
        else:
            addresses = {n: {"libp2p": f"/ip4/127.0.0.1/tcp/{p}"} for n, p in zip(names, ports,
                                                                                   strict=False)}
        prep = prepare(spec, addresses)
        if prep.rounds is not None:  # --secure with DP: the consortium plan's rounds
            spec = dataclasses.replace(spec, rounds=prep.rounds)
        # Per member, the kills still to come: (after round, seconds after it, restart after).
        kills: dict[str, list[tuple[int, float, float]]] = {}
        for k in args.kill:
            name, _, rnd = k.partition("@")
            if name not in spec.present(prep.names) or not rnd.isdigit() or \
                    not 1 <= int(rnd) <= spec.rounds:
                raise LocalError(f"--kill {k!r}: expected NAME@ROUND with NAME one of "
                                 f"{spec.present(prep.names)} and ROUND in 1..{spec.rounds}")
            kills.setdefault(name, []).append((int(rnd), 0.0, args.restart_after))
        rng = random.Random(f"chaos:{spec.seed}")
        for _ in range(args.chaos):
            name = rng.choice(spec.present(prep.names))
            kills.setdefault(name, []).append((rng.randint(1, max(1, spec.rounds - 1)),
                                               rng.uniform(0, 2), rng.uniform(0.5, 3)))
        for plan in kills.values():
            plan.sort()
    except LocalError as exc:
        print(f"simulate_network: error: {exc}", file=sys.stderr)
        return 2
    metric = metric_name(prep.schema.n_classes)
    logs = spec.out / "logs"
    logs.mkdir(exist_ok=True)
    members = [Member(n, c, spec.out / "state" / n, logs / f"{n}.log")
               for n, c in zip(prep.names, prep.config_paths, strict=True)
               if n not in spec.absent]
    timeout = args.timeout or 120 + spec.rounds * (spec.round_deadline_s + 30)
    sealed = seals(spec.node_seal, spec.transport)  # as the nodes' configs say (--secure: on)
    where = (f"{spec.dataset} ({spec.partition})" if spec.data_dir is None else
             f"data dir {spec.data_dir} (one file per member)")
    console.print(f"[bold]simulate_network[/]: {len(members)} `flnode run` processes over "
                  f"{spec.transport} on 127.0.0.1, {where}, "
                  f"{spec.rounds} rounds, seed {spec.seed}, privacy {spec.privacy}, shares "
                  f"{'sealed' if sealed else 'not sealed'}; "
                  f"run dir {spec.out}\n  {prep.test_source}; "
                  + ("each round's metric on the member's own held-out rows"
                     if spec.data_dir is not None else "each round's metric on it"))
    for note in prep.notes:
        console.print(f"  [yellow]note[/]: {note}")
    pids = spec.out / "pids"
    broker = recorder = None
    t0 = time.monotonic()
    try:
        if spec.transport == "mqtt":
            broker, recorder = setup_mqtt(args, prep, ports[-1], console)
        for m in members:
            m.start()
        pids.write_text("".join(f"{m.name} {m.proc.pid}\n" for m in members if m.proc))
        shown = -1
        restart_at: dict[str, float] = {}
        armed: dict[str, float] = {}  # member -> when its next kill fires
        killed = 0
        while True:
            for m in members:
                plan = kills.get(m.name)
                if plan and m.proc is not None and m.proc.poll() is None:
                    done = max((ln["round"] for ln in m.metrics()), default=-1) + 1
                    if m.name not in armed and done >= plan[0][0]:
                        armed[m.name] = time.monotonic() + plan[0][1]
                    if m.name in armed and time.monotonic() >= armed[m.name]:
                        after, _, restart = plan.pop(0)
                        del armed[m.name]
                        m.proc.kill()
                        if m.proc.wait() != -signal.SIGKILL:
                            # It ended on its own between poll() and kill(): a finished
                            # member, not a kill; its exit code is recorded at the end.
                            continue
                        m.exit_codes.append(-signal.SIGKILL)
                        killed += 1
                        console.print(f"  [red]SIGKILL[/] {m.name} (pid {m.proc.pid}) after round "
                                      f"{after}; restarting in {restart:.3g} s")
                        restart_at[m.name] = time.monotonic() + restart
                        m.proc = None
                if m.name in restart_at and time.monotonic() >= restart_at[m.name]:
                    del restart_at[m.name]
                    m.start()
                    console.print(f"  restarted {m.name} (pid {m.proc.pid})")
            history = history_of(members, metric)
            newest = {m.name: max((r for r in history if m.name in history[r]), default=-1)
                      for m in members}
            # A round is shown once every member reported it or went past it
            # (a restarted member may skip rounds it missed: shown as "-").
            while shown + 1 < spec.rounds and all(v > shown for v in newest.values()):
                shown += 1
                row = history.get(shown, {})
                vals = {m.name: row[m.name][metric] for m in members if m.name in row}
                eps = max((ln["epsilon"] for m in members for ln in m.metrics()
                           if ln["round"] <= shown and ln["epsilon"] is not None), default=None)
                console.print(f"  round {shown + 1:>3}/{spec.rounds}  mean {metric} "
                              f"{mean_text(vals)}  [dim]("
                              + " ".join(f"{row[m.name][metric]:.3f}" if m.name in row
                                         else "  -  " for m in members) + ")[/]"
                              + ("  ε ∞ (no DP)" if eps is None else f"  ε {eps:.2f}"))
            running = [m for m in members if m.proc is not None and m.proc.poll() is None]
            if not running and not restart_at:
                break
            if time.monotonic() - t0 > timeout:
                console.print(f"[red]timeout after {timeout:.0f} s; stopping every node[/]")
                break
            time.sleep(POLL_S)
    except LocalError as exc:
        print(f"simulate_network: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for m in members:
            m.stop()
            if m.proc is not None and m.proc.returncode is not None:
                m.exit_codes.append(m.proc.returncode)
        pids.unlink(missing_ok=True)
        if recorder is not None:
            save_wire(recorder, spec.out, console)
        if broker is not None:
            broker.stop()
            console.print(f"  stopped mosquitto (pid {broker.pid})")
    elapsed = time.monotonic() - t0
    failed = [m.name for m in members if not m.exit_codes or m.exit_codes[-1] != 0]
    for m in members:
        if m.name in failed:
            tail = m.log.read_text().splitlines()[-15:]
            console.print(f"[red]{m.name} did not finish cleanly[/] (exit {m.exit_codes}); "
                          f"last lines of {m.log}:\n  " + "\n  ".join(tail))
    console.print(f"  all processes stopped after {elapsed:.1f} s; training the centralized "
                  "and local-only baselines …")
    results = []
    try:
        epsilons = {m.name: ledger_epsilon(spec, m.state) for m in members}
    except LocalError as exc:
        print(f"simulate_network: error: {exc}", file=sys.stderr)
        return 2
    for m in members:
        lines = m.metrics()
        last = lines[-1] if lines else {"epsilon": None, "bytes_sent": 0, "bytes_received": 0,
                                        "rejected": {}}
        rounds = [ln for ln in lines if "metrics" in ln]
        final = rounds[-1]["metrics"] if rounds else {metric: float("nan"),
                                                       "pr_auc": float("nan")}
        plan_file = m.state / "privacy_plan.json"
        plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
        sigma, weight = plan.get("noise_multiplier"), plan.get("weight")
        # Its final model, from its checkpoint: scored on the common test set (the last
        # metrics line is the same figure when the node evaluated on it) and on its own
        # held-out rows (the collaboration gain), exactly as the in-process simulator does.
        own = None
        cp = StateDir(m.state).load_checkpoint()  # None: the member never checkpointed
        model = model_from_state(spec, prep, cp)
        if model is not None:
            test, own_parts = evaluation_rows(prep, m.state)  # its agreed normalization
            final = evaluate_rows(model, test)
            if own_parts:
                own = evaluate_rows(model, own_parts[prep.names.index(m.name)])
        # Traffic and rejections: the checkpoint's, written after the last metrics line
        # and once more when the node finishes, when the sends still in the background
        # at the last round's close have landed (`flnode status` reads the same).
        sent, got, rejected = last["bytes_sent"], last["bytes_received"], last["rejected"]
        if cp is not None:
            sent, got, rejected = cp.bytes_sent, cp.bytes_received, cp.rejected
        results.append(MemberResult(m.name, final, epsilons[m.name], sent, got, rejected,
                                    len({ln["round"] for ln in rounds}), last.get("stopped"),
                                    sigma, own, weight))
    centralized, local_only = baselines(spec, prep)
    # Every `flnode run` draws its privacy noise from os.urandom (node/runtime/daemon.py).
    summary = summarize(spec, prep, results, history_of(members, metric), centralized,
                        local_only, NOISE_OS)
    summary["processes"] = {m.name: {"starts": m.starts, "exit_codes": m.exit_codes}
                            for m in members}
    summary["sigkills"] = killed
    summary["seconds"] = round(elapsed, 1)
    (spec.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    plot_history(summary, spec.out / "accuracy.png")
    print_summary(summary, spec.out, console)
    print_noise(summary, console)
    print_attack(summary, console)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

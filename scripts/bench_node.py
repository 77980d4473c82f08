#!/usr/bin/env python3
"""How quick and lean one `flnode run` process is, in every privacy mode.

Prints JSON (and writes it to --out, default runs/bench/node.json):

- `start_s`: seconds from exec to listening for a real `flnode run` node (the
  transport's start event, a log line shown with `flnode -v`: libp2p's "listening on";
  MQTT's "connected to MQTT broker", logged once connected and subscribed; the JSON
  says which, per transport), next to `python -c "import torch"` exec-to-exit measured
  in the same run, interleaved, `--repeats` times each; medians and their ratio.
- `config_error_s`: seconds from exec to exit of `flnode run --config BAD`
  (a config with an unknown key), and whether it said what is wrong.
- `rounds`: a demo-sized consortium (4 members, `default`, dirichlet 0.5, MLP,
  `--rounds` rounds, on 127.0.0.1 over libp2p or MQTT; the members' rows as CSV files, or
  Parquet with `--data-format parquet`) as four `flnode run` processes: each
  node's peak RSS (`os.wait4`'s ru_maxrss of that very process) and the seconds
  from its "finished" line to its exit (the process waited for, nothing skipped).
- `import_torch_rss_mb_median`: peak RSS of `python -c "import torch"`, printed beside them.
- `torch_train_rss_mb`: the floor: peak RSS of a bare script (no flnode code) that imports
  torch, sets one thread as a node does, and trains the demo's MLP (the consortium's
  input width, hidden size and classes) on random rows of the largest member's row count
  with node/learn/train.py's hand-stepped SGD (p.grad = None, backward, p -= lr * grad) for the
  node's number of steps (rounds x epochs x ceil(rows / batch_size)): the least any torch
  node could use for this run. Measured in each transport x mode's run (the same script
  each time).

The consortium is prepared in a child process, so this process stays small:
ru_maxrss of a child counts what it shared with its parent before exec (a
vfork), and a parent that had imported torch would inflate every figure.

Transports (`--transport libp2p|mqtt|both`, default both): libp2p, each node
listening on its own loopback port; mqtt, through a mosquitto of this run's own on a
free loopback port, with per-member accounts, passwords and ACL as the simulators
generate them (scripts/mqtt_broker.py's files; shares sealed, as `auto` does for
mqtt), one broker per transport x mode, stopped by its PID whatever happens. A node
on MQTT does not import libp2p. Goals are judged per transport and mode.

Privacy modes: off; update (C 0.1, σ 1.0, as `make demo`); record (DP-SGD at a
total ε 3 per member, σ calibrated up front). Every process is started and
stopped by its own PID here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import tomli_w  # noqa: E402

MODES = {
    "off": dict(privacy="off"),
    "update": dict(privacy="update", clip=0.1, sigma=1.0),
    "record": dict(privacy="record", clip=1.0, sigma=None, epsilon=3.0),
}
TRANSPORTS = ("libp2p", "mqtt")
# Each transport's start event: a line `flnode -v run` logs once the node can gossip.
START_EVENTS = {
    "libp2p": (re.compile(r": libp2p \S+ listening on "),
               "'<name>: libp2p <peer id> listening on <addr>' (gossip/transports/libp2p/__init__.py)"),
    "mqtt": (re.compile(r": connected to MQTT broker "),
             "'<name>: connected to MQTT broker <url> as <user>' (gossip/transports/mqtt.py, "
             "logged once connected and subscribed)"),
}
FINISHED = re.compile(r": finished at round")


def flnode_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("flnode")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "node.cli"]


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def wait_rss(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap proc with wait4: (exit status, its own peak RSS in MB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # Linux: KiB


def time_torch_import() -> tuple[float, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", "import torch"], env=child_env())
    code, rss = wait_rss(proc)
    if code != 0:
        raise SystemExit(f"python -c 'import torch' exited {code}")
    return time.monotonic() - t0, rss


def time_to_listening(config: Path, timeout: float, event: re.Pattern) -> float:
    """exec -> the transport's start event (a log line); then SIGKILL (a throwaway state
    dir)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(flnode_cmd() + ["-v", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=child_env(), text=True,
                            start_new_session=True)
    seen: list[float] = []
    tail: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if not seen and event.search(line):
                seen.append(time.monotonic())
                proc.send_signal(signal.SIGKILL)
            tail.append(line)
            del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not seen:
        proc.kill()
        proc.wait()
        raise SystemExit(f"{config}: no {event.pattern!r} within {timeout:.0f} s:\n"
                         + "".join(tail))
    proc.wait()
    return seen[0] - t0


def time_config_error(bad: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(flnode_cmd() + ["run", "--config", str(bad)], capture_output=True,
                          text=True, env=child_env(), timeout=120)
    return time.monotonic() - t0, proc.stderr.strip().splitlines()[-1] if proc.stderr else ""


def prepare_mode(mode: str, transport: str, rounds: int, work: Path, data_format: str
                 ) -> dict:
    """The members' config paths, the training shape (for the floor) and, for mqtt, the
    broker's files, from a child process (see the module docstring)."""
    proc = subprocess.run([sys.executable, __file__, "--prepare", mode, "--transport", transport,
                           "--rounds", str(rounds), "--work", str(work), "--data-format",
                           data_format], capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        raise SystemExit(f"preparing the {transport} {mode} consortium failed:\n{proc.stderr}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["configs"] = [Path(p) for p in doc["configs"]]
    return doc


def prepare_here(mode: str, transport: str, rounds: int, work: Path, data_format: str) -> dict:
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec
    from scripts.ports import free_ports

    out = work / transport / mode
    spec = SimulationSpec(dataset="default", nodes=4, partition="dirichlet:0.5", rounds=rounds,
                          seed=0, out=out, round_deadline_s=20.0, transport=transport,
                          network_config=ROOT / "network_configs" / "demo-4-banks.toml",
                          **MODES[mode])
    names = ["bank-0", "bank-1", "bank-2", "bank-3"]
    ports = free_ports(len(names))
    if transport == "mqtt":
        addresses = {n: {"mqtt": f"mqtt://127.0.0.1:{ports[0]}"} for n in names}
    else:
        addresses = {n: {"libp2p": f"/ip4/127.0.0.1/tcp/{p}"} for n, p in zip(names, ports,
                                                                               strict=True)}
    prep = prepare(spec, addresses)
    configs = [Path(p) for p in prep.config_paths]
    if prep.names != names:
        raise SystemExit(f"the demo consortium's members are {prep.names}, not {names}")
    if data_format == "csv":
        as_csv(out, configs)
    doc = {"configs": [str(c) for c in configs], "shape": training_shape(configs)}
    if transport == "mqtt":
        doc["broker"] = broker_files(prep.consortium, dict(zip(names, configs, strict=True)),
                                     out / "broker", ports[0])
    return doc


def broker_files(consortium, configs: dict[str, Path], password_dir: Path, port: int) -> dict:
    """What `scripts/simulate_network.py --transport mqtt` sets up, without starting it:
    one mosquitto account per member (a random password, in password_dir/<member>.password,
    0600, named by each member's gossip.mqtt.password_file) and the per-member ACL, in a
    config dir of its own (scripts/mqtt_broker.py's write_broker_files). The parent starts
    and stops mosquitto itself, by PID (a child of its own, see `mosquitto`)."""
    import secrets
    import tempfile

    from mqtt_broker import INSTALL_HINT, mosquitto_available, write_broker_files

    if not mosquitto_available():
        raise SystemExit(INSTALL_HINT)
    passwords = {m.name: secrets.token_urlsafe(24) for m in consortium.members}
    password_dir.mkdir(parents=True, exist_ok=True)
    for name, password in passwords.items():
        path = password_dir / f"{name}.password"
        path.touch(mode=0o600)
        path.write_text(password + "\n")
    conf_dir = Path(tempfile.mkdtemp(prefix="flnode-mosquitto-"))
    conf = write_broker_files(consortium, conf_dir, port, passwords)
    for name, cfg in configs.items():
        if name not in passwords:
            raise SystemExit(f"{cfg}: member {name!r} has no broker account")
        doc = tomllib.loads(cfg.read_text())
        doc["gossip"]["mqtt"] = {"password_file": str((password_dir / f"{name}.password")
                                                      .resolve())}
        cfg.write_text(tomli_w.dumps(doc))
    return {"conf": str(conf), "conf_dir": str(conf_dir), "port": port,
            "url": f"mqtt://127.0.0.1:{port}"}


class Mosquitto:
    """mosquitto on the config broker_files wrote: started here (a child of this process,
    waited for by its PID), stopped by its PID on leaving, whatever happened, and its
    config dir removed."""

    START_TIMEOUT_S = 10.0

    def __init__(self, broker: dict, log_path: Path) -> None:
        self.broker, self.log_path = broker, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Mosquitto:
        import socket

        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(["mosquitto", "-c", self.broker["conf"]],
                                             stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + self.START_TIMEOUT_S
            while True:  # listening: a TCP connect succeeds (as scripts/mqtt_broker.py waits)
                if self.proc.poll() is not None:
                    raise SystemExit(f"mosquitto exited {self.proc.returncode} at start; log "
                                     f"{self.log_path}:\n{self.log_path.read_text()[-2000:]}")
                try:
                    with socket.create_connection(("127.0.0.1", self.broker["port"]), 0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"mosquitto did not listen on {self.broker['url']} "
                                         f"in {self.START_TIMEOUT_S:.0f} s; log "
                                         f"{self.log_path}") from None
                    time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        from scripts.procs import stop

        stop(self.proc)
        shutil.rmtree(self.broker["conf_dir"], ignore_errors=True)


def training_shape(configs: list[Path]) -> dict:
    """What the floor trains: the model's widths and the largest member's training rows
    and steps, from the members' configs (the child's job: it imports flnode)."""
    from gossip.membership import load_consortium
    from node.data.encode import held_out_positions
    from node.data.schema import FeatureSchema
    from node.data.table import read_table
    from node.runtime.config import load_config

    shape: dict = {}
    for path in configs:
        cfg = load_config(path)
        schema = FeatureSchema.from_dict(load_consortium(cfg.consortium.path).schema, str(path))
        rows = len(read_table(cfg.data.path))
        if cfg.data.eval_path is None:
            rows = len(held_out_positions(rows, cfg.training.seed, cfg.data.eval_fraction)[0])
        if rows >= shape.get("rows", -1):
            if cfg.model.kind != "mlp":
                raise SystemExit(f"{path}: the floor trains an MLP, not {cfg.model.kind!r}")
            t = cfg.training
            shape = {"n_in": schema.n_features, "hidden": cfg.model.hidden,
                     "n_out": schema.n_classes, "rows": rows, "epochs": t.epochs,
                     "batch_size": t.batch_size, "lr": t.lr, "rounds": t.rounds,
                     "steps": t.rounds * t.epochs * -(-rows // t.batch_size)}
    return shape


# The floor (see the module docstring): torch and node/learn/train.py's loop, nothing else.
FLOOR = """
import sys
import torch
torch.set_num_threads(1)
n_in, hidden, n_out, rows, epochs, batch, rounds = map(int, sys.argv[1:8])
lr = float(sys.argv[8])
g = torch.Generator().manual_seed(0)
X = torch.randn(rows, n_in, generator=g)
y = torch.randint(0, n_out, (rows,), generator=g)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(),
                            torch.nn.Linear(hidden, n_out))
params = [p for p in model.parameters() if p.requires_grad]
loss_fn = torch.nn.CrossEntropyLoss()
model.train()
steps = 0
for _ in range(rounds * epochs):
    order = torch.randperm(rows, generator=g)
    for start in range(0, rows, batch):
        idx = order[start:start + batch]
        for p in params:
            p.grad = None
        loss_fn(model(X[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-lr)
        steps += 1
print(steps)
"""


def torch_train_rss(shape: dict) -> float:
    """Peak RSS (MB) of the floor script for this shape; checks it took the node's steps."""
    args = [str(shape[k]) for k in ("n_in", "hidden", "n_out", "rows", "epochs", "batch_size",
                                    "rounds", "lr")]
    proc = subprocess.Popen([sys.executable, "-c", FLOOR, *args], stdout=subprocess.PIPE,
                            text=True, env=child_env())
    assert proc.stdout is not None
    said = proc.stdout.read()
    code, rss = wait_rss(proc)
    if code != 0 or said.strip() != str(shape["steps"]):
        raise SystemExit(f"the torch-training floor exited {code} after {said.strip()!r} steps "
                         f"(expected {shape['steps']})")
    return round(rss, 1)


def as_csv(out: Path, configs: list[Path]) -> None:
    """The simulator writes the members' rows as Parquet; an institution brings CSV
    (docs/operate/own-data.md), which a node reads without pyarrow (Parquet costs a
    node ~55 MB more: `--data-format parquet` measures it). Same rows, same values (a
    float64 written by pandas reads back bit-identical)."""
    import pandas as pd

    for f in sorted((out / "data").glob("*.parquet")):
        pd.read_parquet(f).to_csv(f.with_suffix(".csv"), index=False)
        f.unlink()
    for cfg in configs:
        doc = tomllib.loads(cfg.read_text())
        doc["data"] = {k: str(v).replace(".parquet", ".csv") for k, v in doc["data"].items()}
        cfg.write_text(tomli_w.dumps(doc))


def start_config(config: Path, i: int) -> Path:
    """A copy of a member's config with a fresh state dir (a first start, every time)."""
    doc = tomllib.loads(config.read_text())
    doc["state_dir"] = f"../start-state/{config.stem}-{i}"
    path = config.with_name(f"{config.stem}-start-{i}.toml")
    path.write_text(tomli_w.dumps(doc))
    return path


def run_rounds(configs: list[Path], logs: Path, timeout: float) -> dict[str, dict]:
    logs.mkdir(parents=True, exist_ok=True)
    procs, finished, files = {}, {}, {}

    def read(name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with open(logs / f"{name}.log", "w") as f:
            for line in proc.stdout:
                if FINISHED.search(line):
                    finished[name] = time.monotonic()
                f.write(line)

    threads = []
    for cfg in configs:
        name = cfg.stem
        proc = subprocess.Popen(flnode_cmd() + ["run", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env(), text=True,
                                start_new_session=True)
        procs[name] = proc
        t = threading.Thread(target=read, args=(name, proc), daemon=True)
        t.start()
        threads.append(t)
        files[name] = cfg
    results: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    pending = dict(procs)
    try:
        while pending:
            # Each node by its own PID (never wait4(-1): mosquitto is a child here too).
            reaped = False
            for name, proc in list(pending.items()):
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == 0:
                    continue
                reaped = True
                exited = time.monotonic()
                del pending[name]
                proc.returncode = os.waitstatus_to_exitcode(status)
                results[name] = {"exit_code": proc.returncode,
                                 "peak_rss_mb": usage.ru_maxrss / 1024,
                                 "exit_after_finished_s": None, "_exited": exited}
            if not reaped:
                if time.monotonic() > deadline:
                    raise SystemExit(f"nodes still running after {timeout:.0f} s: "
                                     f"{sorted(pending)}; logs in {logs}")
                time.sleep(0.05)  # a measuring loop: the exit time is read to 50 ms
    finally:
        for p in pending.values():
            p.kill()
            p.wait()
    for t in threads:
        t.join(10)
    for name, r in results.items():
        exited = r.pop("_exited")
        if name in finished:
            r["exit_after_finished_s"] = round(exited - finished[name], 3)
        r["peak_rss_mb"] = round(r["peak_rss_mb"], 1)
    return results


# Issue 12's goals for one node, in every privacy mode.
GOALS = {"start_ratio_max": 1.5, "peak_rss_mb_max": 300.0, "exit_after_finished_s_max": 1.0,
         "config_error_s_max": 1.0}


def judge(result: dict) -> dict:
    """Each goal, per transport and mode: met or not (figures from this run; nothing
    re-measured)."""
    out: dict = {}
    for transport, t in result["transports"].items():
        for mode, e in t["modes"].items():
            verdict = {"start_ratio": e["start_s"]["ratio"] <= GOALS["start_ratio_max"]}
            if "peak_rss_mb_max" in e:
                verdict["peak_rss_mb"] = e["peak_rss_mb_max"] <= GOALS["peak_rss_mb_max"]
                verdict["exit_after_finished_s"] = (
                    e["exit_after_finished_s_max"] is not None
                    and e["exit_after_finished_s_max"] <= GOALS["exit_after_finished_s_max"])
                verdict["all_finished"] = e["all_finished"]
            out.setdefault(transport, {})[mode] = verdict
    out["config_error_s"] = result["config_error_s"]["max"] <= GOALS["config_error_s_max"]
    return {"targets": GOALS, "met": out}


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def measure(transport: str, mode: str, args: argparse.Namespace, work: Path, bad: Path,
            sink: dict) -> dict:
    """One transport x mode: start figures (interleaved with bare `import torch` and the
    config error), then the consortium's rounds and the floor. `sink` collects the bare
    torch figures and config-error times across the whole run."""
    prepared = prepare_mode(mode, transport, args.rounds, work, args.data_format)
    configs, shape = prepared["configs"], prepared["shape"]
    event = START_EVENTS[transport][0]
    starts, bare = [], []
    entry: dict = {}
    # mqtt: the broker (files from the prepare child) runs for the start figures and the
    # rounds, and is stopped by its PID on leaving this block, whatever happened.
    broker = prepared.get("broker")
    with (Mosquitto(broker, work / transport / mode / "mosquitto.log") if broker
          else contextlib.nullcontext()):
        if broker:
            entry["broker"] = {"url": broker["url"], "accounts": "one per member, ACL per member "
                               "(scripts/mqtt_broker.py write_broker_files)"}
        for i in range(args.repeats):  # interleaved: noise on the box hits both alike
            t, rss = time_torch_import()
            bare.append(t)
            sink["torch_rss"].append(rss)
            starts.append(time_to_listening(start_config(configs[0], i), 180, event))
            t_err, sink["said"] = time_config_error(bad)
            sink["err_times"].append(t_err)
        sink["torch_times"] += bare
        entry["start_s"] = {"node_median": median(starts), "import_torch_median": median(bare),
                            "ratio": round(statistics.median(starts) / statistics.median(bare),
                                           2),
                            "node_all": [round(x, 3) for x in starts],
                            "import_torch_all": [round(x, 3) for x in bare]}
        nodes = None
        if not args.no_rounds:
            nodes = run_rounds(configs, work / transport / mode / "logs",
                               timeout=300 + args.rounds * 30)
    if nodes is not None:
        entry["nodes"] = nodes
        entry["peak_rss_mb_max"] = max(n["peak_rss_mb"] for n in nodes.values())
        exits = [n["exit_after_finished_s"] for n in nodes.values()
                 if n["exit_after_finished_s"] is not None]
        entry["exit_after_finished_s_max"] = max(exits) if exits else None
        entry["all_finished"] = all(n["exit_code"] == 0 and n["exit_after_finished_s"]
                                    is not None for n in nodes.values())
        floor = torch_train_rss(shape)
        sink["floors"].append(floor)
        entry["torch_train_rss_mb"] = floor
        entry["training_shape"] = shape
        entry["peak_rss_over_floor_mb"] = round(entry["peak_rss_mb_max"] - floor, 1)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", choices=(*TRANSPORTS, "both"), default="both",
                   help="libp2p, mqtt (through a mosquitto of this run's own) or both "
                        "(default: both, one after the other)")
    p.add_argument("--modes", default="off,update,record")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5, help="start measurements per mode")
    p.add_argument("--no-rounds", action="store_true", help="only the start figures")
    p.add_argument("--work", default="runs/bench/node-work", help="scratch run dirs (replaced)")
    p.add_argument("--out", default="runs/bench/node.json")
    p.add_argument("--data-format", choices=("csv", "parquet"), default="csv",
                   help="the members' data files (default csv, as an institution brings them)")
    p.add_argument("--prepare", metavar="MODE", help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args(argv)
    import shutil

    transports = list(TRANSPORTS) if args.transport == "both" else [args.transport]
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    if args.rounds < 1 or args.repeats < 1:
        raise SystemExit(f"--rounds {args.rounds} and --repeats {args.repeats} must be >= 1")
    if args.prepare:
        if args.transport not in TRANSPORTS:
            raise SystemExit(f"--prepare needs --transport {' or '.join(TRANSPORTS)}")
        print(json.dumps(prepare_here(args.prepare, args.transport, args.rounds,
                                      Path(args.work), args.data_format)))
        return 0
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bad = work / "bad.toml"
    bad.write_text('state_dir = "x"\nno_such_key = 1\n')
    result: dict = {"cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0],
                    "rounds": args.rounds, "data_format": args.data_format,
                    "transports": {}}
    sink: dict = {"torch_times": [], "torch_rss": [], "floors": [], "err_times": [],
                  "said": ""}
    for transport in transports:
        t_out: dict = {"start_event": START_EVENTS[transport][1], "modes": {}}
        result["transports"][transport] = t_out
        for mode in modes:
            entry = measure(transport, mode, args, work, bad, sink)
            t_out["modes"][mode] = entry
            print(f"# {transport} {mode}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    result["import_torch_s_median"] = median(sink["torch_times"])
    result["import_torch_rss_mb_median"] = round(statistics.median(sink["torch_rss"]), 1)
    if sink["floors"]:
        result["torch_train_rss_mb"] = round(statistics.median(sink["floors"]), 1)
    result["config_error_s"] = {"median": median(sink["err_times"]),
                                "max": round(max(sink["err_times"]), 3),
                                "message": sink["said"]}
    result["load_avg_at_end"] = os.getloadavg()[0]
    result["goals"] = judge(result)
    for transport, t in result["transports"].items():
        for mode, e in t["modes"].items():
            line = (f"# {transport} {mode}: start {e['start_s']['node_median']} s = "
                    f"{e['start_s']['ratio']} x bare import torch (goal <= "
                    f"{GOALS['start_ratio_max']:g})")
            if "peak_rss_mb_max" in e:
                line += (f"; node peak RSS {e['peak_rss_mb_max']} MB (goal <= "
                         f"{GOALS['peak_rss_mb_max']:g}; bare import torch "
                         f"{result['import_torch_rss_mb_median']}; torch training floor "
                         f"{e['torch_train_rss_mb']}; node - floor "
                         f"{e['peak_rss_over_floor_mb']}); exit after finished "
                         f"{e['exit_after_finished_s_max']} s")
            print(line, file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=True)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

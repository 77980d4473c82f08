"""`flnode run`: one member as a long-running process on a real network transport.

Clean shutdown on SIGINT/SIGTERM: the round in progress is abandoned, the
checkpoint is written and the transport closed. A release that was already
charged and stored is re-sent on restart (never re-drawn), and the node
resumes at its checkpointed round and catches up with the others as
`gossip.protocol.book` describes.

Lean by construction: the config, the key, the consortium file and the data
files are read and checked before torch, the transport or the training code is
imported, so a mistake in any of them is reported within a second; and the
`flnode run` entry point ends the process at once after the node has finished
(`exit_now`: every file is written, fsync'd and closed by then), skipping the
interpreter's slow teardown of torch's and libp2p's objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from gossip.errors import LocalError
from gossip.membership import Consortium, load_consortium
from node.ops.intervals import interval_text
from node.runtime import pidfile
from node.runtime.config import NodeConfig, load_config
from node.runtime.identity import Identity, load_identity
from node.runtime.round_report import secure_text

if TYPE_CHECKING:
    from gossip.transports.base import Transport
    from node.runtime.node import Node, RoundReport

    # How a node is built from its checked config on its transport: Node.from_config, or
    # a rehearsal's builder (python -m node.rehearsal.member).
    BuildNode = Callable[[NodeConfig, Transport], Node]

log = logging.getLogger("flnode.daemon")


def open_transport(cfg: NodeConfig, identity: Identity, consortium: Consortium) -> Transport:
    if cfg.gossip.transport == "libp2p":
        # lean start: py-libp2p (trio, multiaddr) only for the member that uses it
        from gossip.transports.libp2p import Libp2pTransport

        return Libp2pTransport(bytes(identity.signing_key), identity.name, consortium.members,
                               max_message_bytes=cfg.gossip.max_envelope_bytes)
    if cfg.gossip.transport == "mqtt":
        return open_mqtt_transport(cfg, identity, consortium)
    raise LocalError(f"gossip.transport = {cfg.gossip.transport!r} only works inside "
                     "`flnode simulate` (one process); a daemon needs a network transport: "
                     "set gossip.transport = \"libp2p\" or \"mqtt\"")


def open_mqtt_transport(cfg: NodeConfig, identity: Identity, consortium: Consortium) -> Transport:
    """The broker is the member's addresses.mqtt in the consortium file (part of the
    consortium id, so agreed by every member). gossip.mqtt.broker, if set, must name the
    same broker: the node never sends its password to a broker the members did not
    agree on. addresses.mqtt_cert_sha256, if set, pins the broker's TLS certificate."""
    # lean start: paho and aiomqtt only for the member that uses them
    from gossip.transports.mqtt import MqttTransport
    from gossip.transports.mqtt.broker import BrokerAddress, parse_cert_fingerprint

    mc = cfg.gossip.mqtt
    member = consortium.by_name(identity.name)
    text = member.addresses.get("mqtt")
    if not text:
        raise LocalError(f"gossip.transport = \"mqtt\" but member {identity.name!r} has no "
                         "addresses.mqtt in the consortium file (e.g. \"mqtts://broker.example:"
                         "8883\"): the broker is part of what the members agree on (the "
                         "consortium id), so the node does not log in to one named only in its "
                         "own config")
    broker = BrokerAddress.parse(text, f"consortium file: member {identity.name!r} "
                                 "addresses.mqtt")
    if mc.broker is not None:
        configured = BrokerAddress.parse(mc.broker, "gossip.mqtt.broker")
        if configured != broker:
            raise LocalError(f"gossip.mqtt.broker is {configured} but the consortium file "
                             f"agrees on {broker} for member {identity.name!r} (addresses.mqtt): "
                             "refusing to send the broker password to a broker the members did "
                             "not agree on; remove gossip.mqtt.broker or make it the same")
    pin = member.addresses.get("mqtt_cert_sha256")
    return MqttTransport(
        consortium.id, identity.name, [m.name for m in consortium.members], broker,
        username=mc.username or identity.name,
        password=None if mc.password_file is None else read_password(mc.password_file),
        ca_file=None if mc.ca_file is None else str(mc.ca_file),
        cert_sha256=None if pin is None else parse_cert_fingerprint(
            pin, f"consortium file: member {identity.name!r} addresses.mqtt_cert_sha256"),
        max_message_bytes=cfg.gossip.max_envelope_bytes, max_packet_bytes=mc.max_packet_bytes,
        allow_plaintext=mc.allow_plaintext,
        # An honest member has up to lookahead + 1 shares parked un-acked (ours are acked
        # once their round is checkpointed) plus a few still in the inbox.
        max_unacked_per_sender=cfg.gossip.lookahead + 4)


def read_password(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise LocalError(f"gossip.mqtt.password_file: cannot read {path}: {exc}") from None
    if mode & 0o077:
        raise LocalError(f"gossip.mqtt.password_file: {path} is readable by group or others; "
                         f"fix with: chmod 600 {path}")
    password = text.strip("\r\n")
    if not password or "\n" in password:
        raise LocalError(f"gossip.mqtt.password_file: {path} must hold one non-empty line")
    return password


class JsonFormatter(logging.Formatter):
    """`flnode run --log-format json`: one JSON object per log record."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


# "text" (lines for people) or "json" (one object per line, for log collectors): what
# `flnode run` prints on stdout, and how its log records look on stderr.
LOG_FORMAT = {"format": "text"}


def say(event: str, text: str, **fields: object) -> None:
    """One line on stdout: `text` for people, or {"event": ..., **fields} as JSON."""
    if LOG_FORMAT["format"] == "json":
        print(json.dumps({"time": round(time.time(), 3), "event": event, **fields},
                         ensure_ascii=False, default=str), flush=True)
    else:
        print(text, flush=True)


def _print_round(cfg: NodeConfig, name: str, metric: str):
    def show(rep: RoundReport) -> None:
        if rep.stopped:
            say("stopped", f"{name}: {rep.stopped}", member=name, reason=rep.stopped)
            return
        eps = "no DP" if rep.epsilon is None else f"ε {rep.epsilon:.2f}"
        n = len(rep.received) + len(rep.missing)
        # a secure round: who dealt, entered, was selected (a "shares" count would read the
        # machine's view of a round that aggregates no share)
        shares = (secure_text(rep.secure) if rep.secure is not None else
                  f"shares {len(rep.received)}/{n}"
                  f"{' (resent stored release)' if rep.resent else ''}"
                  f"{' missing: ' + ', '.join(rep.missing) if rep.missing else ''}")
        line = (f"{name} round {rep.round + 1}/{cfg.training.rounds} {metric} "
                f"{rep.metrics.get(metric, float('nan')):.4f}"
                f"{interval_text(metric, rep.intervals, rep.eval_rows)} {eps} "
                f"{shares} {rep.seconds:.1f} s")
        say("round", line, member=name, round=rep.round + 1, rounds=cfg.training.rounds,
            metrics=rep.metrics, intervals=rep.intervals, eval_rows=rep.eval_rows,
            epsilon=rep.epsilon, received=rep.received,
            missing=rep.missing, resent=rep.resent, seconds=round(rep.seconds, 3),
            **({"secure": rep.secure} if rep.secure is not None else {}))
    return show


def check_inputs(config_path: str | Path,
                 load: Callable[[str | Path], NodeConfig] = load_config,
                 ) -> tuple[NodeConfig, Identity, Consortium]:
    """Everything an operator can get wrong in the files, checked before any heavy import:
    the config, the key, the consortium file (and that the key is a member of it), the
    schema it carries, and each data file against that schema. `load` reads the config
    (a rehearsal's reads its [attack] / [faults] too)."""
    # lean start: numpy after the config, key and consortium are read (neither pandas nor torch)
    from node.data.encode import encode
    from node.data.schema import FeatureSchema
    from node.data.table import read_tables

    cfg = load(config_path)
    identity = load_identity(cfg.identity.key)
    consortium = load_consortium(cfg.consortium.path)
    if consortium.by_name(identity.name).public_key != identity.public_key:
        raise LocalError(f"key file {cfg.identity.key} is for {identity.name!r} but the consortium "
                         f"file {cfg.consortium.path} lists another public key for that member: "
                         "wrong key file or stale peer list")
    schema = FeatureSchema.from_dict(consortium.schema, str(cfg.consortium.path))
    if schema.mode == "federated":  # mean and std are agreed before round 1: check the rest
        from node.learn.normalize import provisional_schema  # lean start: federated schemas only

        schema = provisional_schema(schema)
    paths = [p for p in (cfg.data.path, cfg.data.eval_path) if p is not None]
    # One Parquet reader for both files; their rows kept for the node's own read (run_node)
    for path, rows in zip(paths, read_tables(paths, keep=True), strict=True):
        encode(rows, schema, str(path))
    return cfg, identity, consortium


async def run_node(cfg: NodeConfig, identity: Identity, consortium: Consortium,
                   metrics_port: int | None = None, metrics_addr: str = "127.0.0.1",
                   build: BuildNode | None = None) -> int:
    """Run the node whose files check_inputs has read and checked (built by `build`, by
    default Node.from_config)."""
    # lean start: torch and the training code, once the files are known sound
    from node.runtime.node import Node

    transport = open_transport(cfg, identity, consortium)
    # privacy noise from os.urandom
    node = (build or Node.from_config)(cfg, transport)
    say("start", f"{node.name}: consortium {consortium.name} ({consortium.id.hex()[:16]}…), "
        f"{len(node.train_data.X)} training rows, starting at round {node.book.current + 1}"
        f"/{cfg.training.rounds}, privacy {cfg.privacy.mode}, transport {cfg.gossip.transport}",
        member=node.name, consortium=consortium.name, consortium_id=consortium.id.hex(),
        training_rows=len(node.train_data.X), round=node.book.current + 1,
        rounds=cfg.training.rounds, privacy=cfg.privacy.mode, transport=cfg.gossip.transport)
    plan = getattr(node.secure, "plan", None)  # DP on the secure sum: the pinned plan
    if plan is not None:
        from node.runtime.build import secure_rounds_warning  # lean start: built with the node

        off = secure_rounds_warning(cfg.training.rounds, plan)
        if off is not None:
            log.warning("%s: %s", node.name, off)
    server = None
    if metrics_port is not None:
        from node.runtime.metrics import serve  # lean start: prometheus_client, --metrics-port only

        try:
            server, _ = serve(node, metrics_port, metrics_addr)
        except OSError as exc:
            raise LocalError(f"--metrics-port {metrics_port} on {metrics_addr}: {exc}") from None
        port = server.server_port
        say("metrics", f"{node.name}: Prometheus metrics on http://{metrics_addr}:{port}/metrics"
            + ("" if metrics_addr in ("127.0.0.1", "localhost", "::1") else
               " (NOT loopback: they include a metric computed on private rows)"),
            member=node.name, url=f"http://{metrics_addr}:{port}/metrics", port=port)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    got: list[int] = []

    def stop(signum: int) -> None:
        got.append(signum)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        await node.run(_print_round(cfg, node.name, node.metric))
    except asyncio.CancelledError:
        if not got:
            raise
        say("signal", f"{node.name}: {signal.Signals(got[0]).name}: stopped during round "
            f"{node.book.current + 1}; checkpoint saved in {cfg.state_dir}", member=node.name,
            signal=signal.Signals(got[0]).name, round=node.book.current + 1)
        return 128 + got[0]
    finally:
        if server is not None:
            server.shutdown()
    eps = node.epsilon()
    say("finished", f"{node.name}: {'stopped early' if node.stopped else 'finished'} "
        f"at round {node.book.current}/{cfg.training.rounds}; "
        f"{'no DP' if eps is None else f'ε {eps:.2f} at δ {cfg.privacy.delta:g}'}; "
        f"{rejected_text(node.rejected())}", member=node.name,
        stopped=node.stopped, round=node.book.current, rounds=cfg.training.rounds,
        epsilon=eps, delta=cfg.privacy.delta, rejected=node.rejected())
    return 0


def rejected_text(rejected: dict[str, int]) -> str:
    """"rejected none (benign: duplicate 2)": a copy of a message already accepted (a
    re-send after a restart, a broker's redelivery) is counted, not a refusal to worry about."""
    from gossip.envelope import BENIGN_REASONS  # lean start: msgpack and numpy, after the checks

    bad = {k: v for k, v in sorted(rejected.items()) if k not in BENIGN_REASONS}
    benign = {k: v for k, v in sorted(rejected.items()) if k in BENIGN_REASONS}
    text = "rejected " + (", ".join(f"{k} {v}" for k, v in bad.items()) or "none")
    return text + (f" (benign: {', '.join(f'{k} {v}' for k, v in benign.items())})"
                   if benign else "")


def main(config_path: str, metrics_port: int | None = None, metrics_addr: str = "127.0.0.1",
         log_format: str = "text", load: Callable[[str | Path], NodeConfig] = load_config,
         build: BuildNode | None = None) -> int:
    """`flnode run`; a rehearsal member passes its own config loader and node builder."""
    LOG_FORMAT["format"] = log_format
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        cfg, identity, consortium = check_inputs(config_path, load)
        pidfile.claim(cfg.state_dir)  # for `flnode status`: running, exited or killed
    except LocalError as exc:
        _error(exc)
        return 2
    code: int | None = None  # None: ended by an exception (a bug), recorded as such
    try:
        import torch  # lean start: after check_inputs, so a bad file is reported in a second

        torch.set_num_threads(1)  # measured 3-15x faster for small models on 2 cores
        try:
            code = asyncio.run(run_node(cfg, identity, consortium, metrics_port, metrics_addr,
                                        build))
        except LocalError as exc:
            _error(exc)
            code = 2
        return code
    finally:
        pidfile.record_exit(cfg.state_dir, code)


def _error(exc: LocalError) -> None:
    if LOG_FORMAT["format"] == "json":
        print(json.dumps({"time": round(time.time(), 3), "event": "error", "error": str(exc)},
                         ensure_ascii=False), file=sys.stderr, flush=True)
    else:
        print(f"flnode: error: {exc}", file=sys.stderr)


def exit_now(code: int) -> NoReturn:
    """End the `flnode run` process without the interpreter's teardown.

    Only for the `flnode run` entry point, once `main` has returned: the node has then
    written, fsync'd and closed every file it keeps (checkpoint, ledger, outbox, audit
    and metrics lines are written with os.write on descriptors it closes), the transport
    is closed and the event loop is gone. What remains is Python's shutdown collecting
    torch's and libp2p's objects one by one, which took seconds per process and saves
    nothing. Never call this from library code or from an in-process simulation.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to save
            pass
    os._exit(code)

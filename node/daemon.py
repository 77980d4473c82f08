"""`flnode run`: one member as a long-running process on a real network transport.

Clean shutdown on SIGINT/SIGTERM: the round in progress is abandoned, the
checkpoint is written and the transport closed. A release that was already
charged and stored is re-sent on restart (never re-drawn), and the node
resumes at its checkpointed round and catches up with the others as
`gossip.rounds` describes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import torch

from gossip.errors import LocalError
from gossip.membership import Consortium, load_consortium
from gossip.transports.base import Transport
from node.config import NodeConfig, load_config
from node.identity import Identity, load_identity
from node.runner import Node, RoundReport

log = logging.getLogger("flnode.daemon")


def open_transport(cfg: NodeConfig, identity: Identity, consortium: Consortium) -> Transport:
    if cfg.gossip.transport == "libp2p":
        from gossip.transports.libp2p import Libp2pTransport

        return Libp2pTransport(bytes(identity.signing_key), identity.name, consortium.members,
                               max_message_bytes=cfg.gossip.max_envelope_bytes)
    if cfg.gossip.transport == "mqtt":
        return open_mqtt_transport(cfg, identity, consortium)
    raise LocalError(f"gossip.transport = {cfg.gossip.transport!r} only works inside "
                     "`flnode simulate` (one process); a daemon needs a network transport: "
                     "set gossip.transport = \"libp2p\" or \"mqtt\"")


def open_mqtt_transport(cfg: NodeConfig, identity: Identity, consortium: Consortium) -> Transport:
    """The broker is gossip.mqtt.broker if set, else the member's addresses.mqtt."""
    from gossip.transports.mqtt import BrokerAddress, MqttTransport

    mc = cfg.gossip.mqtt
    if mc.broker is not None:
        broker = BrokerAddress.parse(mc.broker, "gossip.mqtt.broker")
    else:
        text = consortium.by_name(identity.name).addresses.get("mqtt")
        if not text:
            raise LocalError(f"gossip.transport = \"mqtt\" but gossip.mqtt.broker is not set and "
                             f"member {identity.name!r} has no addresses.mqtt in the consortium "
                             "file (e.g. \"mqtts://broker.example:8883\")")
        broker = BrokerAddress.parse(text, f"consortium file: member {identity.name!r} "
                                     "addresses.mqtt")
    return MqttTransport(
        consortium.id, identity.name, [m.name for m in consortium.members], broker,
        username=mc.username or identity.name,
        password=None if mc.password_file is None else read_password(mc.password_file),
        ca_file=None if mc.ca_file is None else str(mc.ca_file),
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


def _print_round(cfg: NodeConfig, name: str, metric: str):
    def show(rep: RoundReport) -> None:
        if rep.stopped:
            print(f"{name}: {rep.stopped}", flush=True)
            return
        eps = "no DP" if rep.epsilon is None else f"ε {rep.epsilon:.2f}"
        n = len(rep.received) + len(rep.missing)
        line = (f"{name} round {rep.round + 1}/{cfg.training.rounds} {metric} "
                f"{rep.metrics.get(metric, float('nan')):.4f} {eps} shares {len(rep.received)}/{n}"
                f"{' (resent stored release)' if rep.resent else ''}"
                f"{' missing: ' + ', '.join(rep.missing) if rep.missing else ''}"
                f" {rep.seconds:.1f} s")
        print(line, flush=True)
    return show


async def run_node(config_path: str | Path) -> int:
    cfg = load_config(config_path)
    identity = load_identity(cfg.identity.key)
    consortium = load_consortium(cfg.consortium.path)
    transport = open_transport(cfg, identity, consortium)
    node = Node.from_config(cfg, transport)  # privacy noise from os.urandom
    print(f"{node.name}: consortium {consortium.name} ({consortium.id.hex()[:16]}…), "
          f"{len(node.train_data.X)} training rows, starting at round {node.book.current + 1}"
          f"/{cfg.training.rounds}, privacy {cfg.privacy.mode}, transport {cfg.gossip.transport}",
          flush=True)
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
        print(f"{node.name}: {signal.Signals(got[0]).name}: stopped during round "
              f"{node.book.current + 1}; checkpoint saved in {cfg.state_dir}", flush=True)
        return 128 + got[0]
    eps = node.epsilon()
    print(f"{node.name}: {'stopped early' if node.stopped else 'finished'} "
          f"at round {node.book.current}/{cfg.training.rounds}; "
          f"{'no DP' if eps is None else f'ε {eps:.2f} at δ {cfg.privacy.delta:g}'}; "
          f"rejected {node.rejected() or 'none'}", flush=True)
    return 0


def main(config_path: str) -> int:
    torch.set_num_threads(1)  # measured 3-15x faster for small models on 2 cores
    try:
        return asyncio.run(run_node(config_path))
    except LocalError as exc:
        print(f"flnode: error: {exc}", file=sys.stderr)
        return 2

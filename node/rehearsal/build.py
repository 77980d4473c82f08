"""`build_rehearsal_node`: a node as the simulators rehearse it: an honest node
(node/runtime/node.py) whose parts are wrapped as its config's `[faults]` and `[attack]` say
(node/rehearsal/faults.py, attacks.py). Without either section it is the honest node."""

from __future__ import annotations

import logging

from gossip.membership import load_consortium
from gossip.transports.base import Transport
from node.data.schema import FeatureSchema
from node.privacy.mechanisms import NoiseSource
from node.rehearsal.attacks import (
    HostileReleaser,
    HostileSigner,
    flip_labels,
    hostile_secure_codec,
)
from node.rehearsal.config import RehearsalNodeConfig
from node.rehearsal.faults import SlowReleaser, faulty_transport
from node.runtime.build import build_node
from node.runtime.config import NodeConfig
from node.runtime.identity import load_identity
from node.runtime.node import Node
from node.runtime.release import Releaser
from node.runtime.signer import Signer

log = logging.getLogger("flnode.node")


def build_rehearsal_node(cfg: NodeConfig, transport: Transport,
                         noise: NoiseSource | None = None) -> Node:
    """The node of `cfg` (a RehearsalNodeConfig, or a plain NodeConfig: an honest member)
    on `transport`; privacy noise from os.urandom unless a simulation passes its own."""
    faults = cfg.faults if isinstance(cfg, RehearsalNodeConfig) else None
    attack = cfg.attack if isinstance(cfg, RehearsalNodeConfig) else None
    consortium = load_consortium(cfg.consortium.path)
    name = load_identity(cfg.identity.key).name
    if faults is not None:  # a rehearsal: drop and delay what we receive, on purpose
        log.warning("%s: [faults] set: loss %g, delay %g±%g ms, partitions %s, training "
                    "%gx slower (a rehearsal, not a deployment)", name, faults.loss,
                    faults.delay_ms, faults.jitter_ms, faults.partition or "none",
                    faults.straggle)
        transport = faulty_transport(transport, name, consortium, faults)
    if attack is not None:  # a rehearsal: this member is hostile on purpose
        log.warning("%s: [attack] set: %s. THIS MEMBER ATTACKS THE CONSORTIUM (a "
                    "rehearsal of a hostile member, never a deployment)", name,
                    attack.describe())
    flip = None
    if attack is not None and attack.kind == "label-flip":
        schema = FeatureSchema.from_dict(consortium.schema, str(cfg.consortium.path))
        flip = flip_labels(schema.n_classes)
    def compose(releaser: Releaser, signer: Signer,
                transport: Transport) -> tuple[Releaser, Signer]:
        if attack is not None:
            hostile = HostileReleaser(releaser, attack)
            releaser, signer = hostile, HostileSigner(signer, attack, hostile, transport)
        if faults is not None and faults.straggle > 1:  # a rehearsed straggler
            releaser = SlowReleaser(releaser, faults.straggle)
        return releaser, signer

    node = build_node(cfg, transport, node_cls=Node, noise=noise, rows_transform=flip,
                      compose=compose)
    if attack is not None:  # secure rounds deal an encoded contribution, not a share body
        hostile_secure_codec(node, attack)
    return node


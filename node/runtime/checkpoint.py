"""Checkpoint <-> a running node's state: what a restart resumes from.

The file's format is node/runtime/state.py's explicit codec (CHECKPOINT_KEYS): this
module only says which part of a node each field comes from and goes back to. Two
privacy invariants are restored here: the ledger must still start with the records the
checkpoint was written with (a rolled-back ledger would under-count epsilon), and the
sequence counter never goes back below what was reserved on disk (Signer.sign) or used
by a stored release (released, then killed before the checkpoint). Top-k compression's
error-feedback residual is restored here too (`_resume_residual`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from gossip import envelope
from gossip.errors import RemoteError
from node.learn.models import get_flat, set_flat
from node.runtime.compression import Compressor, residual_from, residual_path
from node.runtime.release import Releaser
from node.runtime.state import Checkpoint

if TYPE_CHECKING:
    from node.runtime.node import Node

log = logging.getLogger("flnode.node")


def snapshot(node: Node) -> Checkpoint:
    """The node's state as a Checkpoint (model as flat float32 little-endian)."""
    return Checkpoint(
        next_round=node.book.current,
        model=get_flat(node.model).numpy().astype("<f4").tobytes(),
        seq=node.signer.seq,
        replay=node.verifier.export_state(),
        rejected=node.rejected(),
        bytes_sent=node.transport.stats.bytes_sent,
        bytes_received=node.transport.stats.bytes_received,
        peer_prekeys=node.sealing.export_peers() if node.sealing is not None else {},
        strategy=node.strategy.state_dict(),
        control=node.control.state_dict() if node.control is not None else {},
        planned_rounds=node.cfg.training.rounds,
        ledger_records=len(node.ledger.records),
        ledger_digest=node.ledger.digest(),
        retired=sorted({m.name for m in node.consortium.members} - {node.name}
                       - node.book.neighbours),
        residual=c.state() if (c := compressor(node)) is not None else None,
    )


def compressor(node: Node) -> Compressor | None:
    """The node's share compressor (node/runtime/compression.py), through a rehearsal's
    wrappers of its releaser (node/rehearsal/: each keeps the one it wraps as `inner`)."""
    releaser = node.releaser
    while not isinstance(releaser, Releaser) and hasattr(releaser, "inner"):
        releaser = releaser.inner
    return releaser.compressor if isinstance(releaser, Releaser) else None


def save(node: Node) -> None:
    """Write the checkpoint, then prune the outbox of releases it no longer needs."""
    node.state.save_checkpoint(snapshot(node))
    node.state.prune_outbox(node.book.current, node.cfg.keep_releases)


def resume(node: Node) -> None:
    """Restore the node from its state dir's checkpoint; with none, write the first."""
    cp = node.state.load_checkpoint()
    if cp is None:
        save(node)
        return
    if cp.ledger_records is not None:
        node.ledger.check_covers(cp.ledger_records, cp.ledger_digest,
                                 f"the checkpoint {node.state.checkpoint_path} "
                                 f"(at round {cp.next_round + 1})")
    set_flat(node.model, torch.from_numpy(np.frombuffer(cp.model, dtype="<f4").copy()))
    # type(book): a sparse topology's book (gossip/sparse.py) keeps its topology
    node.book = type(node.book)(node.book.neighbours - set(cp.retired), node.book.lookahead,
                                cp.next_round)
    # The counter is persisted before any signed message leaves (Signer.sign): a kill
    # after a send and before the checkpoint never re-uses a number.
    node.signer.seq = max(cp.seq, node.state.reserved_seq())
    stored = node.state.stored_release(cp.next_round)
    if stored is not None:  # released, then stopped before the checkpoint
        env = envelope.decode_outer(stored, node.cfg.gossip.max_envelope_bytes)
        node.signer.seq = max(node.signer.seq, env.seq + 1)
    node.verifier.load_state(cp.replay)
    if node.sealing is not None:
        try:
            dropped = node.sealing.load_peers(cp.peer_prekeys, cp.next_round)
            for member, why in sorted(dropped.items()):
                log.warning("%s: dropped %s's saved prekey from %s (%s); its next "
                            "announcement (our hello asks for it) brings a fresh one",
                            node.name, member, node.state.checkpoint_path, why)
        except (RemoteError, ValueError, TypeError) as exc:
            log.warning("%s: the members' prekeys in %s do not verify (%s); waiting for "
                        "their answers to our hello instead", node.name,
                        node.state.checkpoint_path, exc)
            node.sealing.peers.clear()
    node.counters.rejected.update(cp.rejected)
    if cp.strategy:
        node.strategy.load_state_dict(cp.strategy)
    if cp.control and node.control is not None:
        node.control.load_state_dict(cp.control)
    _resume_residual(node, cp)
    node.transport.stats.bytes_sent += cp.bytes_sent
    node.transport.stats.bytes_received += cp.bytes_received
    log.info("%s: resumed at round %d from %s", node.name, cp.next_round, node.state.path)


def _resume_residual(node: Node, cp: Checkpoint) -> None:
    """Top-k's error-feedback residual: the one the stored release of the round we resume
    at left (released, then stopped before the checkpoint), else the checkpoint's; none
    in a checkpoint from before compression (or of a node that never compressed)."""
    c = compressor(node)
    if c is None:
        if cp.residual:
            log.warning("%s: %s holds an error-feedback residual but the consortium agrees "
                        "no compression: dropped", node.name, node.state.checkpoint_path)
        return
    source = str(node.state.checkpoint_path)
    why = c.load(cp.residual, source)
    if why is not None:
        log.warning("%s: dropped the error-feedback residual of %s: %s", node.name, source, why)
    side = residual_path(node.state, cp.next_round)
    if c.codec.feedback and side.exists() and node.state.stored_release(cp.next_round):
        c.residual = residual_from(side.read_bytes(), node.model, str(side))

"""Our share: the release task the driver starts at Train, packing the share, the sends.

`release` runs Releaser.release(r) in its own task and feeds its outcome back to the
round machine (Released, then Signed); `pack_share` is the Releaser's last step before it
charges: sign the share, sealed to the prekeys of the members the machine names
(gossip/protocol/machine.py decides; this module only carries it out). Then the sends:
our prekeys (`rotate_prekeys`), a send handed to the run's TaskGroup (`in_background`),
to one peer (`send`) and to all (`broadcast`): a refused message is logged, never fatal;
a dead transport ends the run. All are Node's (node.py keeps its method names, which
call these), moved here as functions taking the node, as closing.py's are: every call a
rehearsal wraps (node.releaser, node.signer) is made exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from gossip import envelope
from gossip.envelope import KIND_PREKEY, KIND_SEALED, KIND_SHARE
from gossip.errors import LocalError
from gossip.protocol import events as ev
from gossip.transports.base import TransportFailed
from node.runtime.release import NotReleased, Release, Stopped

if TYPE_CHECKING:
    from node.runtime.node import Node

log = logging.getLogger("flnode.node")


async def release(node: Node, r: int) -> None:
    """Releaser.release(r) in its own task (the driver goes on reading messages); its
    outcome fed back to the machine: Released, then (once packed) Signed."""
    m, loop, st = node.machine, asyncio.get_running_loop(), node._round
    assert st is not None
    st.packing = False
    st.result = result = await node.releaser.release(r)
    if isinstance(result, Stopped):
        node._feed(m.released(ev.Released(r, "stopped", why=result.reason), loop.time()))
        return
    if isinstance(result, NotReleased):
        st.own, st.norm = result.own, float("nan")
        if not st.packing:
            node.counters.rejected["non_finite_local"] += 1
            node._feed(m.released(ev.Released(r, "non_finite"), loop.time()))
        else:
            node._feed(m.signed(ev.Signed(r, None), loop.time()))
        return
    assert isinstance(result, Release)
    st.own, st.resent = result.own, result.resent
    st.norm = float("nan") if result.norm is None else result.norm
    if result.resent:
        node._feed(m.released(ev.Released(r, "stored", own=result.sent), loop.time()))
        return
    if result.data is not None:
        sends = node.signer.outgoing(r, result.data, sorted(node.book.still_in(r)))
        if sends is None:  # not awaited: a member that is down must not hold us up
            await node._in_background(node._broadcast(r, result.data), f"share-{r}")
        else:  # a rehearsal's own sends (node/rehearsal/attacks.py), in order
            for peer, message in sends:
                await (node._broadcast(r, message) if peer is None
                       else node._send(peer, message))
            node.signer.after_send(r, result.data)
    node._feed(m.signed(ev.Signed(r, result.sent), loop.time()))


async def pack_share(node: Node, r: int, body: bytes) -> bytes | None:
    """Sign the share (the Releaser's last step before it charges), sealed to the
    prekeys of the members the machine names once it stops waiting for them. None if
    nobody could be sealed for."""
    if node._round is not None:
        node._round.packing = True
    if node._tg is None:  # outside a run (a test releasing one round): no waiting
        seal_for: tuple[str, ...] = tuple(node.book.still_in(r))
    else:
        node._go = asyncio.get_running_loop().create_future()
        node._feed(node.machine.released(ev.Released(r, "new"),
                                         asyncio.get_running_loop().time()))
        seal_for = await node._go
    if node.sealing is None:
        return node._sign(KIND_SHARE, r, body)
    recipients, missing = node.sealing.recipients(r, list(seal_for))
    if missing:
        log.warning("%s: round %d: no prekey for epoch %d from %s by the deadline; they "
                    "cannot read our share", node.name, r + 1, node.sealing.epoch(r),
                    ", ".join(missing))
    if not recipients:
        if missing:
            log.error("%s: round %d: no member's prekey arrived; our share is not sent",
                      node.name, r + 1)
        else:
            log.info("%s: round %d: every member has moved past it; our share is not "
                     "sent", node.name, r + 1)
        return None
    sealed = node.signer.seal(r, body, recipients)
    return None if sealed is None else node._sign(KIND_SEALED, r, sealed)


async def rotate_prekeys(node: Node, r: int, announce: bool = False) -> None:
    """Hold prekeys for the epochs round r may need, delete older ones, and tell the
    members when that changed (and always at start: we may have missed theirs)."""
    messages = node.signer.rotate_prekeys(r, announce)
    if not messages:
        return
    packed = [node._sign(KIND_PREKEY, r, body) for body in messages]
    node._announcement = packed[0]  # for replies to a prekey hello
    await node._in_background(node._broadcast(r, packed[-1]), f"prekeys-{r}")


async def in_background(node: Node, coro: Coroutine[Any, Any, None], what: str) -> None:
    """Hand a send to the run's TaskGroup (which awaits it, or cancels it with the
    run) and go on; outside a run (a test driving one step) it is simply awaited."""
    if node._tg is not None:
        node._tg.create_task(coro, name=f"{node.name}-{what}")
    else:
        await coro


async def send(node: Node, peer: str, data: bytes) -> None:
    try:
        await node.transport.send(peer, data)
    except TransportFailed:
        raise  # the transport is dead, not one peer: the run ends with this error
    except LocalError as exc:
        log.warning("%s: could not send to %s: %s", node.name, peer, exc)


async def broadcast(node: Node, r: int, data: bytes) -> None:
    """A message the transport refuses (e.g. a share over the broker's packet limit) is
    logged and counted; the round goes on with what the others send. Under a sparse
    topology (gossip/sparse.py) a share or seen report goes to the round's peers only."""
    route = getattr(node.book, "recipients", None)
    if route is not None:
        env = envelope.decode_outer(data, node.cfg.gossip.max_envelope_bytes)  # our own
        peers = route(env.kind, env.round)
        if peers is not None:
            for peer in peers:
                await send(node, peer, data)
            return
    try:
        await node.transport.broadcast(data)
    except TransportFailed:
        raise  # the transport is dead, not one peer: the run ends with this error
    except LocalError as exc:
        node.counters.send_failed += 1
        log.error("%s: round %d: our %s was not sent: %s", node.name, r + 1,
                  envelope.decode_outer(data).kind, exc)

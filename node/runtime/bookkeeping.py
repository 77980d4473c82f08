"""The machine's bookkeeping actions, carried out by the driver as soon as they come.

Counters, audit lines (audit.py), evidence (findings.py), the presence log lines, the
transport's acks and the wait reports (activity.py): nothing here sends, trains or
waits, so Node carries these out even from handle(), outside a run, unless an action
that needs the driver is queued before them (then in the machine's order, after it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gossip.envelope import BENIGN_REASONS
from gossip.protocol import events as ev
from node.runtime import activity, audit

if TYPE_CHECKING:
    from node.runtime.node import Node

log = logging.getLogger("flnode.node")

# Actions carried out as soon as the machine returns them, even from handle() outside a
# run (bookkeeping, logs, acks of messages not buffered); the rest wait for the driver.
AT_ONCE = (ev.Filed, ev.Refused, ev.Equivocation, ev.SeenMismatch, ev.Presence, ev.Ack,
           ev.Waiting, ev.WaitOver)


def loop_time() -> float:
    """The running loop's clock, which every deadline of the machine is on (asyncio's
    default is the monotonic clock; an in-process simulation's is virtual:
    node/rehearsal/simulation/virtual_time.py); the monotonic clock outside a loop."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def carry_out(node: Node, a: ev.Action) -> None:
    """One bookkeeping action (AT_ONCE) of the machine, carried out."""
    match a:
        case ev.Filed(acc, where):
            node.counters.accepted[acc.sender] += 1
            if where == "retired":
                log.warning("%s: %s has stopped sharing (retire message); rounds no "
                            "longer wait for it", node.name, acc.sender)
            node.audit.write(audit.Accepted(acc.round, acc.sender, acc.envelope.seq,
                                            acc.envelope.digest.hex(), acc.envelope.kind,
                                            where))
        case ev.Refused(r, member, reason, detail, digest, acc):
            node.counters.rejected[reason] += 1
            if acc is not None:
                node.audit.write(audit.Refused(acc.round, acc.sender, digest,
                                               acc.envelope.kind, reason, detail))
            else:
                node.audit.write(audit.Rejected(r, member, digest, reason, detail))
            level = logging.DEBUG if reason in BENIGN_REASONS else logging.WARNING
            if node.audit.once(member, reason):
                log.log(level, "%s: refused a message from %s: %s: %s (further %r from "
                        "%s are counted, not logged)", node.name, member, reason, detail,
                        reason, member)
        case ev.Equivocation(first, second):
            node.findings.equivocation(first, second, node.book.current)
        case ev.SeenMismatch():
            node.findings.mismatch(a)
        case ev.Presence(member, what, missed):
            if what == "absent":
                log.warning("%s: %s sent no share by %d deadline(s) in a row; rounds no "
                            "longer wait for it until its shares arrive again", node.name,
                            member, missed)
            elif what == "back":
                log.info("%s: a share from %s again; rounds wait for it again",
                         node.name, member)
            else:
                log.info("%s: heard from %s again (no share yet); rounds wait for it "
                         "for one deadline, then only once its shares arrive",
                         node.name, member)
        case ev.Ack(tokens):
            for ack in tokens:
                ack()
        case ev.Waiting(what, who, since, gives_up):
            now = loop_time()  # the clock `since` and `gives_up` are on
            heard = node.liveness.up & {m.name for m in node.consortium.members}
            activity.report_wait(node.state.path, node.name, what, who, now - since,
                                 None if gives_up is None else gives_up - now,
                                 bool(heard))
        case ev.WaitOver():
            activity.write(node.state.path, node.name, None)

"""Closing a round: what the driver does with the machine's `Close`, `Advanced`, `Retire`.

The round's own state as Node carries it out (`RoundState`: from Train to the metrics
line), the aggregation of the shares the machine closed the round with (`aggregate`:
shares encoded with other normalization statistics refused, the strategy, the model
kept finite, the held-out evaluation), the round's report and metrics line (`report`),
and the round at which we stop sharing because our budget is spent (`retire`). The
machine decides when and with which shares (gossip/protocol/machine.py); this module
only carries it out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gossip.envelope import KIND_RETIRE, Accepted
from gossip.protocol import events as ev
from node.learn.models import set_flat
from node.learn.train import evaluate
from node.ops.intervals import metric_intervals
from node.runtime import audit, bookkeeping, checkpoint, secure_node
from node.runtime.compression import share_vector
from node.runtime.release import Result
from node.runtime.round_report import RoundReport
from node.strategy import WeightedShare

if TYPE_CHECKING:
    from node.runtime.node import Node

log = logging.getLogger("flnode.node")

# Why a round closed without some members, as the warning says it (Close.why).
WHY_MISSING = {"moved_on": "they had moved on to later rounds",
               "absent": "not waited for: silent since an earlier deadline",
               "deadline": "deadline passed"}


@dataclass
class RoundState:
    """The current round as the driver carries it out (set at Train, read at Advanced)."""

    # What every honest member started this round from: the strategy measures shares'
    # distances from it.
    reference: torch.Tensor
    t0: float  # time.perf_counter() at Train: the round's seconds in its report
    packing: bool = False  # the release reached signing (sharing.pack_share)
    result: Result | None = None  # the Releaser's outcome
    own: WeightedShare | None = None  # what we released (or the start, if nothing was)
    norm: float = math.nan  # our update's norm as trained (nan: none, or re-sent)
    resent: bool = False  # the stored release of a restart
    close: ev.Close | None = None  # what the machine closed the round with
    received: list[str] = field(default_factory=list)  # whose shares were aggregated
    diagnostics: dict[str, Any] = field(default_factory=dict)  # the strategy's
    metrics: dict[str, float] = field(default_factory=dict)  # held-out, after aggregation


def aggregate(node: Node, c: ev.Close) -> dict[str, Accepted]:
    """Aggregate the round's shares with our own release, evaluate; the shares used."""
    if node.secure is not None:  # the secure sum (secure_node.py)
        return secure_node.aggregate(node, c)
    st = node._round
    assert st.own is not None
    r, own = c.round, st.own
    received = dict(c.shares)
    for member, acc in sorted(received.items()):
        if acc.share is None:  # the Verifier refuses such kinds (wrong_kind): a safety net
            del received[member]
            bookkeeping.carry_out(node, ev.Refused(r, member, "wrong_kind", (
                f"its {acc.envelope.kind!r} message carries no share: nothing of it is "
                "aggregated"), acc.envelope.digest.hex(), acc))
            continue
        if acc.share.norm != node._norm():  # encoded with other statistics than ours
            del received[member]
            theirs, ours = acc.share.norm, node._norm()
            bookkeeping.carry_out(node, ev.Refused(r, member, "norm_mismatch", (
                f"its share is encoded with normalization "
                f"{theirs.hex()[:16] if theirs else 'none'}, ours is "
                f"{ours.hex()[:16] if ours else 'none'}: the members combined different "
                "statistics (or one sent different ones to different members)"),
                acc.envelope.digest.hex(), acc))
    # a compressed share is an update: read on top of the round's start, explicitly
    shares = {s.sender: WeightedShare(s.sender, s.share.weight,
                                      share_vector(node.model, s.share.tensors, st.reference))
              for s in received.values()}
    agg = node.strategy.aggregate(r, own, shares, set(c.missing), reference=st.reference)
    diagnostics = agg.to_json()
    node.audit.aggregate(r, diagnostics, node.counters.aggregation)
    if bool(torch.isfinite(agg.vector).all()):
        set_flat(node.model, agg.vector)
    else:  # the strategy never returns one; never carried on if it did
        log.error("%s: round %d: the %s of %d share(s) is not finite; keeping our own "
                  "released share as the model", node.name, r + 1, agg.rule, len(shares) + 1)
        node.counters.rejected["non_finite_aggregate"] += 1
        set_flat(node.model, own.vector)
    if c.missing:  # rounds are 0-based inside, 1-based for people
        log.warning("%s: round %d closed without %s (%s)", node.name, r + 1,
                    ", ".join(c.missing), WHY_MISSING[c.why])
    st.close, st.received, st.diagnostics = c, sorted(received), diagnostics
    st.metrics = evaluate(node.model, node.held_out.X, node.held_out.y)
    return received


async def aggregate_off_loop(node: Node, c: ev.Close) -> dict[str, Accepted]:
    """`aggregate`, a secure round's opening first in a worker thread: decoding the sum
    (Berlekamp-Welch per coordinate when pieces are wrong) costs what the peers' pieces make
    it cost, and must not stall the event loop (transports, deadlines). The driver awaits
    it before its next action, as it does a secure step (secure_node.send_phase)."""
    if node.secure is not None:
        await asyncio.to_thread(secure_node.open_sum, node, c)
    return aggregate(node, c)


async def closed(node: Node, c: ev.Close, now: float) -> list[ev.Action]:
    """Close c carried out: the round aggregated (off the loop), then the machine told with
    the shares used and, in a secure round, who took part."""
    used = await aggregate_off_loop(node, c)
    return node.machine.closed(c.round, used, now, took_part(node, c.round))


def took_part(node: Node, r: int) -> set[str] | None:
    """A secure round's members whose final model we compare ours with after the last round
    (gossip/protocol/seen.py): who dealt to us, entered or opened the sum while we could not.
    Every honest one of them that opened applied the same sum (or, if the round failed for
    it, kept the same start); one whose final differs is named in final.json. None: a plain
    round (its seen reports say whose share was used)."""
    if node.secure is None:
        return None
    out = node.secure.outcomes[r]  # set by `aggregate` just before
    return set(out.dealt) | set(out.entered) | set(out.missed)


def report(node: Node, r: int, nxt: int) -> RoundReport:
    """The round's report and metrics line (before the checkpoint that follows: a crash
    in between re-runs the round and appends a second line, readers take the last)."""
    if nxt != r + 1:
        log.warning("%s: behind the consortium: skipping round(s) %d-%d, going on at "
                    "round %d", node.name, r + 2, nxt, nxt + 1)
    st = node._round
    d, c, metrics = st.diagnostics, st.close, st.metrics
    assert c is not None
    eps, intervals = node.epsilon(), metric_intervals(metrics, node.held_out.y.tolist())
    sec = d.get("secure")  # a secure round: who dealt, entered, was selected (secure_node)
    secure = None if sec is None else {
        "ok": sec["ok"], "reason": sec["reason"],
        "members": [m.name for m in node.consortium.members], "dealt": sec["dealt"],
        "entered": sec["entered"], "selected": list(d["used"])}
    out = RoundReport(node.name, r, metrics, eps, st.received, list(c.missing), st.norm,
                      time.perf_counter() - st.t0, st.resent, nxt, intervals=intervals,
                      eval_rows=len(node.held_out.y), secure=secure)
    node.last_round = node.audit.write(audit.RoundMetrics(
        r, metrics, eps, out.received, out.seconds, intervals, len(node.held_out.y),
        len(node.train_data.y), list(c.missing), c.why,
        {**{k: d[k] for k in ("rule", "used", "excluded", "clipped", "weight_capped",
                              "fallbacks") if d[k] or k in ("rule", "used")},
         # a secure round: opened or why not, who dealt and entered (`used`: selected)
         **({"secure": {k: secure[k] for k in ("ok", "reason", "dealt", "entered")}}
            if secure is not None else {})},
        node._traffic(r)))
    return out


async def retire(node: Node, r: int, why: str) -> RoundReport:
    """The machine's Retire (our budget is spent): say once, clearly, that we stop
    sharing; tell the members; write the stopped metrics line; keep the model. The
    report of round r says why."""
    node.stopped = why
    log.warning("%s: %s", node.name, why)
    await node._broadcast(r, node._sign(KIND_RETIRE, r, b""))
    node.audit.write(audit.StoppedMetrics(r, why, node.epsilon(), node._traffic(r)))
    checkpoint.save(node)
    return RoundReport(node.name, r, {}, node.epsilon(), [], [], math.nan, 0.0, stopped=why)

"""A window into a running node: Prometheus metrics (`flnode run --metrics-port P`).

Served by prometheus-client's own HTTP server (a daemon thread) on 127.0.0.1 unless
the operator names another address: the local metric is computed on the member's
private held-out rows, so it is not for the world.

Nothing here counts anything itself. `NodeCollector` reads the node's own counters
at scrape time (the same numbers `metrics.jsonl`, `flnode status` and summary.json
show), so a scrape can never disagree with the run records and costs the event loop
nothing between scrapes. The counters are plain dicts that the event-loop thread
updates; a scrape copies each one in a single C-level call (dict copy holds the GIL),
so it sees a consistent snapshot of each counter.

Metric names (all prefixed `flnode_`):

| name | type | labels | what |
|---|---|---|---|
| round | gauge | | rounds this node has closed (its next round, 0-based) |
| rounds_planned | gauge | | training.rounds |
| epsilon_spent / epsilon_budget | gauge | | ε from the accountant / the budget (not with privacy off) |
| messages_received_total | counter | member | authentic messages accepted (shares, prekeys, ...) |
| rejected_total | counter | reason | messages refused, by reason (envelope, round book, transport) |
| flood_dropped_total | counter | member | rejected_total{reason="flood"} by member (a flood) |
| messages_sent_total / bytes_sent_total / bytes_received_total | counter | | the transport's counts |
| round_bytes_sent / round_bytes_received | gauge | | bytes of the last closed round |
| round_duration_seconds | gauge | | wall time of the last closed round |
| local_metric | gauge | metric | the last evaluation on the held-out rows (roc_auc, accuracy, ...) |
| aggregation_actions_total | counter | member, action, reason | what the strategy did to a member's share |
| digest_mismatch_total | counter | reporter | seen reports disagreeing with our copy (a claim) |
| equivocations_total | counter | member | rounds with two envelopes it signed (proven) |
| echo_excluded_total | counter | member, reason | rounds the digest echo left its share out ([rules] echo) |
| echo_bytes_sent_total | counter | | bytes of our signed echoes, each once ([rules] echo) |
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.runtime.node import Node


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        n = self.node
        yield _gauge("round", "rounds this node has closed (its next round, 0-based)",
                     n.book.current)
        yield _gauge("rounds_planned", "training.rounds", n.cfg.training.rounds)
        eps = n.epsilon()
        if eps is not None:
            yield _gauge("epsilon_spent", "privacy spent so far, from the accountant", eps)
            if n.cfg.privacy.epsilon is not None:
                yield _gauge("epsilon_budget", "the configured total privacy budget",
                             n.cfg.privacy.epsilon)
        received = CounterMetricFamily("flnode_messages_received", "authentic messages "
                                       "accepted, by sending member", labels=["member"])
        for member, count in sorted(dict(n.counters.accepted).items()):
            received.add_metric([member], count)
        yield received
        rejected = CounterMetricFamily("flnode_rejected", "messages refused, by reason",
                                       labels=["reason"])
        for reason, count in sorted(n.rejected().items()):
            rejected.add_metric([reason], count)
        yield rejected
        stats = n.transport.stats
        flood = CounterMetricFamily("flnode_flood_dropped", "messages the transport dropped "
                                    "before verification because the member was over its "
                                    "share of our intake (a flood), by member",
                                    labels=["member"])
        for member, count in sorted(dict(stats.flood_by_sender).items()):
            flood.add_metric([member], count)
        yield flood
        yield CounterMetricFamily("flnode_messages_sent", "messages the transport sent",
                                  value=stats.messages_sent)
        yield CounterMetricFamily("flnode_bytes_sent", "bytes the transport sent",
                                  value=stats.bytes_sent)
        yield CounterMetricFamily("flnode_bytes_received", "bytes the transport received",
                                  value=stats.bytes_received)
        last = n.last_round
        if last is not None:
            yield _gauge("round_bytes_sent", "bytes sent in the last closed round",
                         last["round_bytes_sent"])
            yield _gauge("round_bytes_received", "bytes received in the last closed round",
                         last["round_bytes_received"])
            yield _gauge("round_duration_seconds", "wall time of the last closed round",
                         last["seconds"])
            local = GaugeMetricFamily("flnode_local_metric", "the last evaluation on this "
                                      "member's held-out rows", labels=["metric"])
            for name, value in sorted(last["metrics"].items()):
                if isinstance(value, int | float) and math.isfinite(value):
                    local.add_metric([name], float(value))
            yield local
        actions = CounterMetricFamily("flnode_aggregation_actions", "what the aggregation "
                                      "strategy did to a member's share",
                                      labels=["member", "action", "reason"])
        for key, count in sorted(dict(n.counters.aggregation).items()):
            member, action, reason = key.split(":", 2)
            actions.add_metric([member, action, reason], count)
        yield actions
        mismatch = CounterMetricFamily("flnode_digest_mismatch", "seen reports that disagree "
                                       "with the share we accepted, by reporter (a claim, "
                                       "not proof)", labels=["reporter"])
        for reporter, count in sorted(dict(n.counters.digest_mismatch).items()):
            mismatch.add_metric([reporter], count)
        yield mismatch
        proven = CounterMetricFamily("flnode_equivocations", "rounds in which the member "
                                     "signed two different messages we hold (proven)",
                                     labels=["member"])
        for member, count in sorted(dict(n.counters.equivocation).items()):
            proven.add_metric([member], count)
        yield proven
        if n.machine.echo is not None:  # a consortium with the digest echo (echo_round.py)
            echo = n.echo_records
            excluded = CounterMetricFamily("flnode_echo_excluded", "rounds in which the "
                                           "digest echo left the member's share out, by "
                                           "reason", labels=["member", "reason"])
            for key, count in sorted(dict(echo.excluded).items()):
                excluded.add_metric(key.rsplit(":", 1), count)
            yield excluded
            yield CounterMetricFamily("flnode_echo_bytes_sent", "bytes of our signed echoes "
                                      "(each once, however many it went to)",
                                      value=echo.bytes_sent)


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"flnode_{name}", doc, value=float(value))


def serve(node: Node, port: int, addr: str = "127.0.0.1") -> tuple[Any, Any]:
    """Start serving `node`'s metrics; returns (server, thread) (`server.shutdown()` stops
    it). Port 0 picks a free port: `server.server_port` says which."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return start_http_server(port, addr=addr, registry=registry)

"""Prometheus metrics of a running node: scraped over real HTTP while rounds go on."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from gossip.transports.memory import MemoryHub
from node.runtime.metrics import serve
from tests.test_runner import build, make


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_a_scrape_shows_the_rounds_epsilon_shares_and_rejections_move(tmp_path):
    _, prep = make(tmp_path, nodes=3, rounds=3, privacy="update")
    hub = MemoryHub()
    nodes = build(prep, hub)
    watched = nodes[0]
    server, thread = serve(watched, 0)  # port 0: a free one
    port = server.server_port
    try:
        before = await asyncio.to_thread(scrape, port)
        assert before[("flnode_round", ())] == 0
        assert before[("flnode_rounds_planned", ())] == 3
        seen: list[dict] = []

        def on_round(report) -> None:  # the server thread answers while the loop waits
            seen.append(scrape(port))

        async with asyncio.TaskGroup() as tg:
            runs = [tg.create_task(n.run(on_round if n is watched else None)) for n in nodes]
        assert all(len(t.result()) == 3 for t in runs)
        # Garbage from a member's address after the run: counted under its reason.
        from gossip.transports.base import Incoming
        watched.handle(Incoming(b"\x93garbage", "bank-1"))
        after = await asyncio.to_thread(scrape, port)
    finally:
        server.shutdown()
        thread.join(timeout=30)
    assert after[("flnode_round", ())] == 3
    rounds = [s[("flnode_round", ())] for s in seen]
    assert rounds == [1, 2, 3]  # scraped after each round: it moved with the node
    eps = after[("flnode_epsilon_spent", ())]
    assert eps == watched.epsilon() and eps > 0
    assert after[("flnode_messages_received_total", (("member", "bank-1"),))] >= 3
    eps_seen = [s[("flnode_epsilon_spent", ())] for s in seen]
    assert eps_seen == sorted(eps_seen) and eps_seen[0] < eps_seen[-1]
    assert after[("flnode_messages_received_total", (("member", "bank-1"),))] > \
        before.get(("flnode_messages_received_total", (("member", "bank-1"),)), 0)
    assert after[("flnode_rejected_total", (("reason", "malformed"),))] >= 1
    assert after[("flnode_bytes_sent_total", ())] == watched.transport.stats.bytes_sent > 0
    metric = watched.metric
    assert 0 <= after[("flnode_local_metric", (("metric", metric),))] <= 1
    assert after[("flnode_round_bytes_sent", ())] == watched.last_round["round_bytes_sent"]
    assert after[("flnode_round_duration_seconds", ())] > 0


async def test_a_flooding_member_is_named_in_the_flood_counter(tmp_path):
    """bank-1 sends bank-0 2,000 messages while bank-0 reads none: its fair intake holds
    256 of bank-1's (SENDER_QUEUE_MESSAGES, within the burst), drops the other 1,744
    unparsed, and the scrape names bank-1 with exactly that count, the same as the
    transport's own count and `rejected_total{reason="flood"}`; bank-2 is not named."""
    from gossip.transports.base import SENDER_QUEUE_MESSAGES

    _, prep = make(tmp_path, nodes=3, rounds=1, privacy="off")
    hub = MemoryHub()
    watched = build(prep, hub)[0]
    server, thread = serve(watched, 0)
    try:
        clean = await asyncio.to_thread(scrape, server.server_port)
        for i in range(2000):
            await hub.deliver("bank-1", "bank-0", b"stale share %d" % i)
        await hub.deliver("bank-2", "bank-0", b"one message")
        after = await asyncio.to_thread(scrape, server.server_port)
    finally:
        server.shutdown()
        thread.join(timeout=30)
    assert not [k for k in clean if k[0] == "flnode_flood_dropped_total"]
    dropped = 2000 - SENDER_QUEUE_MESSAGES
    assert watched.transport.stats.flood_by_sender == {"bank-1": dropped}
    floods = {k: v for k, v in after.items() if k[0] == "flnode_flood_dropped_total"}
    assert floods == {("flnode_flood_dropped_total", (("member", "bank-1"),)): dropped}
    assert after[("flnode_rejected_total", (("reason", "flood"),))] == dropped


# --- a real `flnode run` process ---------------------------------------------------------

def test_flnode_run_serves_metrics_that_move_with_its_rounds(tmp_path):
    """bank-0 runs as `flnode run --metrics-port 0 --log-format json`; bank-1 stops after
    round 1, so bank-0 is then waiting in round 2 (a state, not a guessed time). The
    scrapes before and after show the round, ε, messages and bytes moving."""
    import json
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    import tomli_w

    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec
    from scripts.ports import free_ports

    root = Path(__file__).resolve().parent.parent
    a, b = free_ports(2)
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=3, seed=0,
                          out=tmp_path, transport="libp2p", round_deadline_s=120.0,
                          privacy="update", clip=0.1, sigma=1.0)
    prep = prepare(spec, {"bank-0": {"libp2p": f"/ip4/127.0.0.1/tcp/{a}"},
                          "bank-1": {"libp2p": f"/ip4/127.0.0.1/tcp/{b}"}})
    one = tomllib.loads(prep.config_paths[1].read_text())
    one["training"]["rounds"] = 1
    short = prep.config_paths[1].with_name("bank-1-short.toml")
    short.write_text(tomli_w.dumps(one))

    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "node.cli", "run", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=root, start_new_session=True)

    node = start("--config", str(prep.config_paths[0]), "--metrics-port", "0",
                 "--log-format", "json")
    peer = None
    try:
        events = (json.loads(line) for line in node.stdout)  # one JSON object per line
        started = next(e for e in events if e["event"] == "start")
        assert started["member"] == "bank-0" and started["rounds"] == 3
        port = next(e for e in events if e["event"] == "metrics")["port"]
        first = scrape(port)
        assert first[("flnode_round", ())] == 0
        assert first.get(("flnode_messages_received_total", (("member", "bank-1"),)), 0) == 0
        peer = start("--config", str(short))
        done = next(e for e in events if e["event"] == "round")
        assert done["round"] == 1 and done["received"] == ["bank-1"]
        assert peer.wait(timeout=300) == 0  # bank-1 finished its one round: bank-0 waits
        later = scrape(port)
        assert later[("flnode_round", ())] == 1
        assert later[("flnode_messages_received_total", (("member", "bank-1"),))] >= 1
        # round 2's share is already released (charged before it left) while it waits
        assert later[("flnode_epsilon_spent", ())] > done["epsilon"] > 0
        assert later[("flnode_epsilon_spent", ())] > first.get(("flnode_epsilon_spent", ()), 0)
        assert later[("flnode_bytes_received_total", ())] > first[("flnode_bytes_received_total", ())]
        assert later[("flnode_round_bytes_received", ())] > 0
        metric = [k for k in later if k[0] == "flnode_local_metric"]
        assert metric and 0 <= later[metric[0]] <= 1
    finally:
        for p in (node, peer):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
    err = node.stderr.read()
    for line in filter(None, err.splitlines()):  # the log records are JSON too
        assert json.loads(line)["level"] in ("debug", "info", "warning", "error"), line

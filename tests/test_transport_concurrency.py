"""Structured concurrency in the transports, with real parts: real py-libp2p hosts on
127.0.0.1 (the transport's own trio thread, stock hosts as peers) and a real mosquitto.

- Cancelling a send on the asyncio side cancels the trio task doing it, and the send
  returns only once that task has ended (the receiver sees a reset, no further bytes).
- A dead libp2p thread (trio loop crashed or ended) is `TransportFailed` from
  `incoming()`, `send` and `broadcast`, and it ends a node's run.
- A programming error inside `send` propagates; only "unreachable" counts as dropped.
- A full inbox pushes back (libp2p: the transfer waits for its acknowledgement); on
  MQTT each sender has its own queue, and only the sender over it loses messages.

Every wait is on a state or an event with a generous limit (a loaded 2-core machine).
"""

from __future__ import annotations

import asyncio
import threading

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from nacl.signing import SigningKey

from gossip.errors import LocalError
from gossip.transports.base import TransportFailed
from gossip.transports.libp2p import SHARE_PROTOCOL, Libp2pTransport
from gossip.transports.mqtt import MqttTransport
from gossip.transports.mqtt.broker import BrokerAddress
from scripts.ports import free_ports
from tests.helpers import consortium, keys, libp2p_members, until
from tests.mqtt_support import mqtt_broker, require_mosquitto

CAP = 64 * 1024 * 1024
MiB = 1024 * 1024


def send_tasks_in_trio(t: Libp2pTransport) -> list[str]:
    """Names of the bridge-call tasks in the transport's nursery (the dialers aside)."""
    nursery = t._nursery
    if nursery is None:
        return []
    return [task.name for task in list(nursery.child_tasks) if "_send_trio" in task.name]


# --- libp2p: cancellation crosses the bridge -----------------------------------------

class SlowReader:
    """A stock py-libp2p host holding member m1's key, on m1's address. For each share
    stream it reads the length and then trickles (64 KiB every 0.2 s: yamux keeps the
    sender waiting for window, never timing it out) until `resume` is set, then reads
    as fast as it can until the stream ends, acknowledging a complete one. Records what
    it saw."""

    def __init__(self, seed: bytes, listen: str) -> None:
        self.seed, self.listen = seed, listen
        self.receiving = threading.Event()  # some body bytes have arrived
        self.resume = threading.Event()
        self.finished = threading.Event()
        self.up = threading.Event()
        self.stop = threading.Event()
        self.declared = 0
        self.got = 0
        self.outcome = ""

    async def _on_stream(self, stream) -> None:
        try:
            header = b""
            while len(header) < 8:
                header += await stream.read(8 - len(header))
            self.declared = int.from_bytes(header, "big")
            while self.got < self.declared:
                fast = self.resume.is_set()
                chunk = await stream.read(MiB if fast else 64 * 1024)
                if not chunk:
                    self.outcome = "eof"
                    return
                self.got += len(chunk)
                self.receiving.set()
                if not fast:
                    await trio.sleep(0.2)
            await stream.write(b"\x01")  # the acknowledgement the sender waits for
            self.outcome = "complete"
        except Exception as exc:  # noqa: BLE001 - the outcome is the test's subject
            self.outcome = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished.set()

    def run(self) -> None:
        async def main() -> None:
            host = new_host(key_pair=create_new_key_pair(self.seed))
            host.set_stream_handler(SHARE_PROTOCOL, self._on_stream)
            async with host.run(listen_addrs=[multiaddr.Multiaddr(self.listen)]):
                self.up.set()
                while not self.stop.is_set():
                    await trio.sleep(0.05)
                with trio.move_on_after(5):
                    await host.close()

        trio.run(main)


async def test_a_cancelled_large_send_stops_the_trio_transfer_and_the_receiver_sees_a_reset():
    ks = [SigningKey.generate() for _ in range(2)]
    members = libp2p_members(ks)
    reader = SlowReader(bytes(ks[1]), members[1].addresses["libp2p"])
    reader_thread = asyncio.create_task(asyncio.to_thread(reader.run))
    sender = Libp2pTransport(bytes(ks[0]), "m0", members, CAP)
    try:
        assert await asyncio.to_thread(reader.up.wait, 60)
        await sender.start()
        await sender.wait_connected(["m1"], 60)
        payload = b"\x07" * (40 * MiB)  # ~125 s at the reader's trickle
        send = asyncio.create_task(sender.send("m1", payload))
        assert await asyncio.to_thread(reader.receiving.wait, 60), "no body bytes arrived"
        assert sender.trio_calls == 1 and len(send_tasks_in_trio(sender)) == 1
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        # The send returned only once its trio task had ended: nothing is left running.
        assert sender.trio_calls == 0
        assert send_tasks_in_trio(sender) == []
        assert sender.stats.messages_sent == 0 and sender.stats.dropped == 0
        # The receiver now reads as fast as it can: it gets what was in flight, then the
        # reset. (Before the fix the trio task went on, and the whole 40 MiB arrived.)
        reader.resume.set()
        assert await asyncio.to_thread(reader.finished.wait, 60)
        assert reader.declared == len(payload)
        assert reader.got < reader.declared, reader.outcome
        # py-libp2p 0.8.1's yamux drops a stream on RST, so a read waiting for data
        # raises StreamEOF (StreamReset if the RST was seen first): either way the
        # stream ended short of its declared length.
        assert reader.outcome.startswith(("StreamReset", "StreamEOF")), reader.outcome
        # The transport goes on: the next share gets through.
        reader.finished.clear()
        reader.got = 0
        await sender.send("m1", b"after the cancelled one")
        assert await asyncio.to_thread(reader.finished.wait, 60)
        assert reader.outcome == "complete" and sender.stats.messages_sent == 1
    finally:
        reader.resume.set()
        reader.stop.set()
        await sender.close()
        await asyncio.wait_for(reader_thread, 60)


async def test_a_send_cancelled_or_timed_out_while_waiting_for_the_peer_leaves_no_trio_task():
    ks = [SigningKey.generate() for _ in range(2)]
    members = libp2p_members(ks)  # m1 never starts: the send waits up to CONNECT_WAIT_S for it
    t = Libp2pTransport(bytes(ks[0]), "m0", members, CAP)
    await t.start()
    try:
        send = asyncio.create_task(t.send("m1", b"share"))
        await until(lambda: t.trio_calls == 1, "the trio task of the send started")
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        assert t.trio_calls == 0 and send_tasks_in_trio(t) == []
        # The same through asyncio.timeout: TimeoutError to the caller, nothing left.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await t.send("m1", b"share")
        assert t.trio_calls == 0 and send_tasks_in_trio(t) == []
        assert t.stats.dropped == 0 and t.stats.messages_sent == 0
    finally:
        await t.close()
    assert not t._thread.is_alive()


# --- libp2p: a dead thread is a transport error ----------------------------------------

async def _crash(t: Libp2pTransport) -> None:
    raise RuntimeError("simulated crash in the host")


@pytest.mark.parametrize("how", ["crash", "exit"])
async def test_a_dead_libp2p_thread_makes_incoming_send_and_broadcast_raise(how):
    ks = [SigningKey.generate() for _ in range(3)]
    members = libp2p_members(ks)
    ts = [Libp2pTransport(bytes(k), m.name, members, CAP) for k, m in zip(ks, members,
                                                                          strict=True)]
    for t in ts[:2]:  # m2 stays away: a send to it waits for it
        await t.start()
    t0 = ts[0]
    try:
        await t0.wait_connected(["m1"], 60)
        received = []

        async def receive() -> None:
            async for msg in t0.incoming():
                received.append(msg.data)

        receiver = asyncio.create_task(receive())
        await ts[1].send("m0", b"before the crash")
        await until(lambda: received == [b"before the crash"], "the first message")
        waiting = asyncio.create_task(t0.send("m2", b"to a member that is not up"))
        await until(lambda: t0.trio_calls == 1, "a send waiting in the trio thread")
        if how == "crash":  # a task in the host's nursery fails: the trio loop ends with it
            t0._token.run_sync_soon(lambda: t0._nursery.start_soon(_crash, t0))
            cause = "its trio loop crashed: RuntimeError: simulated crash in the host"
        else:  # the trio loop returns without close()
            t0._token.run_sync_soon(t0._stop.set)
            cause = "its trio loop ended on its own"
        with pytest.raises(TransportFailed, match="libp2p transport of 'm0' stopped: " + cause):
            await asyncio.wait_for(receiver, 60)
        assert isinstance(receiver.exception(), LocalError)
        with pytest.raises(TransportFailed, match=cause):  # the send under way
            await asyncio.wait_for(waiting, 60)
        with pytest.raises(TransportFailed, match=cause):
            await t0.send("m1", b"after")
        with pytest.raises(TransportFailed, match=cause):
            await t0.broadcast(b"after")
        with pytest.raises(TransportFailed, match=cause):  # a new reader too
            await anext(t0.incoming())
        await asyncio.to_thread(t0._thread.join, 30)  # it has ended (or is just ending)
        assert not t0._thread.is_alive() and t0.trio_calls == 0
        assert t0.stats.dropped == 0
    finally:
        for t in ts[:2]:
            await t.close()
        await t0.close()  # idempotent, also after the thread died


async def test_a_node_whose_libp2p_thread_dies_ends_its_run_with_the_transport_error(tmp_path):
    """The node sees the dead transport: its run's TaskGroup ends with TransportFailed
    (the daemon turns that into a non-zero exit) instead of going on as if alone."""
    from node.rehearsal.simulation.prepare import member_names, prepare
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime.config import load_config
    from node.runtime.identity import load_identity
    from node.runtime.node import Node

    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=50, seed=0,
                          out=tmp_path, privacy="off", round_deadline_s=30.0,
                          transport="libp2p")
    ports = free_ports(2)
    prep = prepare(spec, {name: {"libp2p": f"/ip4/127.0.0.1/tcp/{port}"}
                          for name, port in zip(member_names(spec), ports, strict=True)})
    nodes = []
    for path in prep.config_paths:
        cfg = load_config(path)
        identity = load_identity(cfg.identity.key)
        t = Libp2pTransport(bytes(identity.signing_key), identity.name,
                            prep.consortium.members, cfg.gossip.max_envelope_bytes)
        nodes.append(Node.from_config(cfg, t))
    rounds_done = [0, 0]

    def on_round(i: int):
        def show(_report) -> None:
            rounds_done[i] += 1
        return show

    runs = [asyncio.create_task(n.run(on_round(i))) for i, n in enumerate(nodes)]
    try:
        await until(lambda: rounds_done[0] >= 1, "node 0 finished a round", 180)
        t0 = nodes[0].transport
        t0._token.run_sync_soon(lambda: t0._nursery.start_soon(_crash, t0))
        with pytest.raises(BaseException) as info:
            await asyncio.wait_for(runs[0], 120)
        failed = info.value
        if isinstance(failed, BaseExceptionGroup):
            group = failed.subgroup(TransportFailed)
            assert group is not None, failed
            failed = group.exceptions[0]
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
        assert isinstance(failed, TransportFailed), failed
        assert "simulated crash in the host" in str(failed)
        assert rounds_done[0] < spec.rounds
    finally:
        for r in runs:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)


# --- libp2p: what counts as "dropped" -----------------------------------------------

async def test_a_programming_error_inside_send_propagates_and_is_not_counted_as_dropped():
    ks = [SigningKey.generate() for _ in range(2)]
    members = libp2p_members(ks)
    t0, t1 = (Libp2pTransport(bytes(k), m.name, members, CAP) for k, m in zip(ks, members,
                                                                              strict=True))
    await t0.start()
    await t1.start()
    try:
        await t0.wait_connected(["m1"], 60)
        # A str where bytes belong: a bug in the caller, raised inside the trio transfer.
        with pytest.raises(TypeError):
            await t0.send("m1", "a str, not bytes")  # type: ignore[arg-type]
        with pytest.raises(TypeError):  # broadcast raises the error itself, not a group
            await t0.broadcast("a str, not bytes")  # type: ignore[arg-type]
        assert t0.stats.dropped == 0 and t0.trio_calls == 0
        # An unreachable peer is still "dropped": t1 goes away.
        await t1.close()
        await t0.send("m1", b"to a member that went away")
        assert t0.stats.dropped == 1
    finally:
        await t0.close()
        await t1.close()


# --- inbox back-pressure ---------------------------------------------------------------

async def test_a_full_libp2p_inbox_holds_the_transfer_until_the_node_takes_a_message():
    ks = [SigningKey.generate() for _ in range(2)]
    members = libp2p_members(ks)
    t0 = Libp2pTransport(bytes(ks[0]), "m0", members, CAP)
    t1 = Libp2pTransport(bytes(ks[1]), "m1", members, CAP, inbox_depth=1)
    await t0.start()
    await t1.start()
    try:
        await t0.wait_connected(["m1"], 60)
        await t0.send("m1", b"first")  # takes the one place in m1's inbox
        second = asyncio.create_task(t0.send("m1", b"second"))
        await until(lambda: t1.waiting_for_room == 1, "the second transfer waits for room")
        assert not second.done()  # not acknowledged: it has no place yet
        inbox = t1.incoming()
        assert (await asyncio.wait_for(anext(inbox), 60)).data == b"first"
        await asyncio.wait_for(second, 60)  # now acknowledged
        assert (await asyncio.wait_for(anext(inbox), 60)).data == b"second"
        assert t0.stats.messages_sent == 2 and t0.stats.dropped == 0
        assert t1.stats.refused["inbox_full"] == 0 and t1.stats.messages_received == 2
    finally:
        await t0.close()
        await t1.close()


def mqtt_transport(cons, b, name, **kw):
    return MqttTransport(cons.id, name, [m.name for m in cons.members],
                         BrokerAddress.parse(b.url, "t"), username=name,
                         password=b.passwords[name], max_message_bytes=CAP, **kw)


async def test_one_mqtt_sender_over_its_queue_is_dropped_and_the_others_are_served_in_turn():
    """Each sender has its own queue (4 here). bank-1 sends 30 while the node reads
    nothing: its first 4 wait, the rest are dropped unparsed, acknowledged and counted
    against bank-1 by name (and the node stops listening to bank-1 for a while);
    bank-2's 3 all wait in their own queue, and the node gets them in turn with
    bank-1's, not behind them. What waits is not acknowledged: a
    node killed with messages queued gets every one again."""
    require_mosquitto()
    cons = consortium(keys(3))
    b = mqtt_broker.start_broker(cons)
    try:
        t0 = mqtt_transport(cons, b, "bank-0", inbox_depth=4, receive_maximum=40)
        t1 = mqtt_transport(cons, b, "bank-1")
        t2 = mqtt_transport(cons, b, "bank-2")
        for t in (t0, t1, t2):
            await t.start()
        try:
            flood = [b"share %d" % i for i in range(30)]
            for m in flood:
                await t1.send("bank-0", m)
            honest = [b"honest %d" % i for i in range(3)]
            for m in honest:
                await t2.send("bank-0", m)
            await until(lambda: t0.queued("bank-2") == 3 and t0.stats.flood_by_sender["bank-1"]
                        >= 1, "bank-1 over its queue, bank-2's messages queued")
            # (the rest of bank-1's 30 are dropped, or never sent to us once we stopped
            # listening to it)
            assert t0.queued("bank-1") == 4
            assert t0.stats.refused["flood"] == t0.stats.flood_by_sender["bank-1"]
            assert "bank-2" not in t0.stats.flood_by_sender
            got = []
            inbox = t0.incoming()
            while len(got) < 7:
                msg = await asyncio.wait_for(anext(inbox), 60)
                got.append(msg.data)
                msg.ack()  # what the node does once the message is used and checkpointed
            assert got[:6:2] == flood[:3] and got[1:6:2] == honest  # in turn
            assert got[6] == flood[3]

            # bank-1 went over its share: the node stopped listening to it for a while.
            assert t0.quenches["bank-1"] == 1 and "bank-1" in t0._quenched
            assert "bank-2" not in t0._quenched

            # Killed with messages queued: none was acknowledged, all come again.
            second = [b"second %d" % i for i in range(3)]
            for m in second:
                await t2.send("bank-0", m)
            await until(lambda: t0.queued("bank-2") == 3, "queued again")
            await t0.close()
            back = mqtt_transport(cons, b, "bank-0")
            await back.start()
            try:
                again: set[bytes] = set()
                while not set(second) <= again:
                    msg = await asyncio.wait_for(anext(back.incoming()), 60)
                    again.add(msg.data)
                    msg.ack()
            finally:
                await back.close()
        finally:
            for t in (t0, t1, t2):
                await t.close()
    finally:
        b.stop()


async def test_a_bug_in_the_mqtt_connection_task_is_a_transport_error_not_a_silence():
    require_mosquitto()
    cons = consortium(keys(2))
    b = mqtt_broker.start_broker(cons)
    try:
        t0, t1 = mqtt_transport(cons, b, "bank-0"), mqtt_transport(cons, b, "bank-1")
        await t0.start()
        await t1.start()
        try:
            def broken(topic: str) -> str:
                raise ZeroDivisionError("a bug in the receive path")

            t0._sender_of = broken  # a programming error on the connection task
            reader = asyncio.create_task(anext(t0.incoming()))
            await t1.broadcast(b"share")
            with pytest.raises(TransportFailed, match="MQTT transport of 'bank-0' stopped: its "
                                                      "connection task crashed: "
                                                      "ZeroDivisionError: a bug"):
                await asyncio.wait_for(reader, 60)
            with pytest.raises(TransportFailed):
                await t0.broadcast(b"after")
            with pytest.raises(TransportFailed):
                await t0.send("bank-1", b"after")
        finally:
            await t0.close()
            await t1.close()
    finally:
        b.stop()

"""Transports admit only members, and bound what one member can make a node hold.

Real parts only: a real mosquitto (started by PID on a free loopback port by
scripts/mqtt_broker.py) and real py-libp2p hosts on 127.0.0.1. The hostile side
is a stock client or host holding a real account or member key. Tests wait for
states (counters, messages), never for fixed times, and use generous limits.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import aiomqtt
import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo
from nacl.signing import SigningKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gossip.membership import Member
from gossip.transports.libp2p import SHARE_PROTOCOL, Libp2pTransport
from gossip.transports.mqtt import MqttTransport
from gossip.transports.mqtt.broker import (
    BrokerAddress,
    client_id,
    consortium_prefix,
    direct_topic,
    share_topic,
)
from tests.helpers import consortium, keys, libp2p_members, until
from tests.mqtt_support import mqtt_broker, require_mosquitto

CAP = 64 * 1024 * 1024
MiB = 1024 * 1024


# --- MQTT ----------------------------------------------------------------------------

def mqtt_transport(cons, b, name, **kw):
    return MqttTransport(cons.id, name, [m.name for m in cons.members],
                         BrokerAddress.parse(b.url, "t"), username=name,
                         password=b.passwords[name], max_message_bytes=CAP, **kw)


async def next_message(t, timeout=20.0, ack=True):
    msg = await asyncio.wait_for(anext(t.incoming()), timeout)
    if ack and msg.ack is not None:
        msg.ack()
    return msg


def raw_client(b, user, password, **kw):
    return aiomqtt.Client("127.0.0.1", b.port, username=user, password=password,
                          protocol=aiomqtt.ProtocolVersion.V5, **kw)


@pytest.fixture
def broker3():
    require_mosquitto()
    cons = consortium(keys(3))
    b = mqtt_broker.start_broker(cons, observers={"watcher": "watcher-password"},
                                 extra_users={"outsider": "outsider-password"})
    yield cons, b
    b.stop()


def test_the_generated_acl_has_no_pattern_lines_and_binds_client_ids(broker3):
    cons, b = broker3
    acl = "\n".join(line for line in (b.conf_dir / "acl").read_text().splitlines()
                    if not line.startswith("#"))
    assert "pattern" not in acl
    prefix = consortium_prefix(cons.id)
    blocks = acl.split("user ")[1:]
    watcher = next(x for x in blocks if x.startswith("watcher"))
    assert "write" not in watcher and "topic read #" in watcher
    bank0 = next(x for x in blocks if x.startswith("bank-0"))
    assert f"topic write {prefix}/bank-0/share" in bank0
    assert f"topic write {prefix}/bank-0/to/+" in bank0
    assert sum("write" in line for line in bank0.splitlines()) == 2
    assert "outsider" not in acl  # no line: reads and writes nothing
    assert "use_username_as_clientid true" in (b.conf_dir / "mosquitto.conf").read_text()


async def test_observer_and_outsider_publishes_never_reach_a_members_receive_path(broker3):
    """Attack 5: with `pattern write flnode/<id>/%u/#` an observer could publish into
    members' inboxes. Now its publishes (and an outsider's) are dropped by the broker:
    the member's transport sees only the member's marker that follows them."""
    cons, b = broker3
    t0, t1 = mqtt_transport(cons, b, "bank-0"), mqtt_transport(cons, b, "bank-1")
    await t0.start()
    await t1.start()
    try:
        # (One connection per account: the client id is the user name.)
        async with raw_client(b, "watcher", "watcher-password") as watcher, \
                raw_client(b, "outsider", "outsider-password") as outsider:
            await watcher.subscribe("#", qos=1)  # an observer still reads
            for user, c in (("watcher", watcher), ("outsider", outsider)):
                for topic in (direct_topic(cons.id, "bank-1", "bank-0"),
                              share_topic(cons.id, "bank-1"),
                              share_topic(cons.id, user),
                              direct_topic(cons.id, user, "bank-0")):
                    await c.publish(topic, b"\x98" * 1000, qos=1)  # PUBACKed, dropped
            await t1.send("bank-0", b"marker from bank-1")
            msg = await next_message(t0)
            assert msg.data == b"marker from bank-1" and msg.peer_hint == "bank-1"
            seen = await asyncio.wait_for(anext(aiter(watcher.messages)), 20)
            assert seen.payload == b"marker from bank-1"
        assert t0.stats.messages_received == 1 and t0.queued() == 0
        assert not t0.stats.refused  # nothing even reached the transport's filter
    finally:
        await t0.close()
        await t1.close()


async def test_a_member_using_another_members_client_id_cannot_take_its_session(broker3):
    """Attack 5: a member logs in with the victim's (predictable) client id. The broker
    takes the client id from the user name: the thief gets its own session, the victim
    online stays connected, and the victim's queued share waits for the victim."""
    cons, b = broker3
    victim_id = client_id(cons.id, "bank-0")
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    t0, t2 = mqtt_transport(cons, b, "bank-0"), mqtt_transport(cons, b, "bank-2")
    await t0.start()
    await t2.start()
    try:
        # Victim online: the thief's login does not disconnect it.
        async with raw_client(b, "bank-1", b.passwords["bank-1"], identifier=victim_id,
                              clean_start=False, properties=props):
            await t2.send("bank-0", b"while the thief is logged in")
            assert (await next_message(t0)).data == b"while the thief is logged in"
        assert t0.connects == 1 and t0._connected.is_set()
        # Victim away: its session holds a share; the thief logs in with its id.
        await t0.close()
        await t2.send("bank-0", b"queued for bank-0")
        async with raw_client(b, "bank-1", b.passwords["bank-1"], identifier=victim_id,
                              clean_start=False, properties=props) as thief:
            await thief.subscribe(direct_topic(cons.id, "+", "bank-0"), qos=1)  # ACL: denied
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await anext(aiter(thief.messages))
        assert f"as {victim_id}" not in b.log_text()  # the broker only ever saw user names
        back = mqtt_transport(cons, b, "bank-0")  # a new process, same member
        await back.start()
        try:
            assert (await next_message(back)).data == b"queued for bank-0"
        finally:
            await back.close()
    finally:
        await t0.close()
        await t2.close()


async def test_a_message_on_a_non_member_topic_never_reaches_the_node():
    """Defence in depth behind the ACL: a broker that lets an account write where it
    should not (here an extra ACL line) still cannot reach the verifier. The transport
    subscribes to the members' own topics only, so the broker does not even send it
    messages under a non-member's name or our own; and a topic that does not fit (if a
    broker sent one anyway) is refused as `bad_topic`, acknowledged, never parsed."""
    require_mosquitto()
    cons = consortium(keys(2))
    prefix = consortium_prefix(cons.id)
    b = mqtt_broker.start_broker(cons, extra_users={"mallory": "mallory-password"},
                                 extra_acl=["user mallory", f"topic write {prefix}/#"])
    try:
        t0, t1 = mqtt_transport(cons, b, "bank-0"), mqtt_transport(cons, b, "bank-1")
        await t0.start()
        await t1.start()
        bomb = b"\x98\x98" * 500_000  # would be a deep msgpack array, if anyone parsed it
        async with raw_client(b, "mallory", "mallory-password") as mallory:
            for topic in (share_topic(cons.id, "mallory"),
                          direct_topic(cons.id, "mallory", "bank-0"),
                          share_topic(cons.id, "bank-0")):  # bank-0's own prefix
                await mallory.publish(topic, bomb, qos=1)
        await t1.broadcast(b"marker")  # after mallory's, on the same broker
        assert (await next_message(t0)).data == b"marker"
        assert t0.stats.messages_received == 1 and t0.queued() == 0
        assert t0.stats.bytes_received == len(b"marker")

        class Stray:  # what a broker ignoring the subscriptions could still send
            topic, payload, mid, qos, retain = share_topic(cons.id, "mallory"), bomb, 1, 1, False

        t0._on_message(None, None, Stray)
        assert t0.stats.refused["bad_topic"] == 1 and t0.queued() == 0
    finally:
        await t0.close()
        await t1.close()
        b.stop()


async def _flood_then_marker(bound: int):
    """bank-1 sends 30 messages the node parks unacknowledged; then bank-2 sends one.
    Receive maximum (the broker's in-flight window to bank-0) 10. Returns bank-0's
    transport and what it received."""
    cons = consortium(keys(3))
    b = mqtt_broker.start_broker(cons, max_inflight_messages=10)
    kw = {"receive_maximum": 10}
    try:
        t0 = mqtt_transport(cons, b, "bank-0", max_unacked_per_sender=3, **kw)
        t0.max_unacked_per_sender = bound  # 30: no bound in effect, as before
        t1 = mqtt_transport(cons, b, "bank-1", **kw)
        t2 = mqtt_transport(cons, b, "bank-2", **kw)
        for t in (t0, t1, t2):
            await t.start()
        try:
            for i in range(30):
                await t1.send("bank-0", b"far-ahead share %d" % i)
            got = []

            async def read():
                while True:
                    msg = await next_message(t0, timeout=3600, ack=False)  # parked
                    got.append(msg.data)
                    if msg.peer_hint == "bank-2":
                        return

            reader = asyncio.create_task(read())
            await until(lambda: len(got) >= 10, "the first window of bank-1's messages")
            await t2.send("bank-0", b"honest share")
            try:
                await asyncio.wait_for(asyncio.shield(reader), 20 if bound < 30 else 3)
            except TimeoutError:
                pass
            reader.cancel()
            return t0, got
        finally:
            for t in (t0, t1, t2):
                await t.close()
    finally:
        b.stop()


async def test_one_sender_cannot_fill_the_brokers_in_flight_window():
    """Attack 6 (MQTT): the node parks the ack of every accepted far-ahead share. With
    no bound per sender, one member's 30 parked messages stop all delivery (the broker
    sends at most 10 unacknowledged); with the bound, the transport acks that sender's
    oldest early, and the honest member's share still arrives."""
    require_mosquitto()
    unbounded, got = await _flood_then_marker(bound=30)
    assert b"honest share" not in got and len(got) == 10  # the attack, reproduced
    t0, got = await _flood_then_marker(bound=3)
    assert got[-1] == b"honest share"
    assert [g for g in got if g != b"honest share"] == [b"far-ahead share %d" % i
                                                       for i in range(30)]  # nothing lost
    assert t0.early_acks["bank-1"] == 27 and t0.unacked("bank-1") == 3
    assert t0.unacked("bank-2") == 1 and not t0.early_acks["bank-2"]


# --- libp2p --------------------------------------------------------------------------

def rogue_member(seed: bytes, addr: str, peer, stop: threading.Event, out: Counter, *,
                 streams: int, declare: int, send: int, trickle_s: float | None = None
                 ) -> None:
    """A stock py-libp2p host with a member's key: opens `streams` share streams at once,
    declares `declare` bytes on each, sends `send` of them, then holds each stream open
    (sending one byte every `trickle_s` if set) until `stop`. Runs trio in this thread."""

    async def one(host) -> None:
        try:
            s = await host.new_stream(peer, [SHARE_PROTOCOL])
            await s.write(declare.to_bytes(8, "big"))
            sent = 0
            while sent < send:
                k = min(64 * 1024, send - sent)
                await s.write(b"\0" * k)
                sent += k
            out["sent_all"] += 1
            while not stop.is_set():
                if trickle_s is not None:
                    await s.write(b"\0")
                await trio.sleep(trickle_s or 0.05)
        except Exception:  # noqa: BLE001 - refused streams fail here
            out["failed"] += 1

    async def main() -> None:
        host = new_host(key_pair=create_new_key_pair(seed))
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(30):
                    await host.connect(PeerInfo(peer, [multiaddr.Multiaddr(addr)]))
                out["connected"] += 1
                async with trio.open_nursery() as nursery:
                    for _ in range(streams):
                        nursery.start_soon(one, host)
            finally:
                with trio.move_on_after(5):
                    await host.close()

    trio.run(main)


class Rogue:
    def __init__(self, key, node: Libp2pTransport, node_member: Member, **kw) -> None:
        self.stop = threading.Event()
        self.out: Counter = Counter()
        self.task = asyncio.create_task(asyncio.to_thread(
            rogue_member, bytes(key), node_member.addresses["libp2p"], node.peer_id,
            self.stop, self.out, **kw))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


async def test_a_member_over_the_per_peer_stream_limit_is_refused_and_memory_stays_bounded():
    """Attack 6 (libp2p): a member opens 8 concurrent streams, each declaring 8 MiB and
    sending 2 MiB, then holds them. With max_streams_per_peer = 2 six are reset at
    once (too_many_streams); the node holds the body bytes of two, and another member
    still delivers meanwhile."""
    ks = [SigningKey.generate() for _ in range(3)]
    members = libp2p_members(ks)
    m0 = Libp2pTransport(bytes(ks[0]), "m0", members, 16 * MiB, max_streams_per_peer=2,
                         rate_window_s=600)
    m2 = Libp2pTransport(bytes(ks[2]), "m2", members, CAP)
    await m0.start()
    await m2.start()
    try:
        rogue = Rogue(ks[1], m0, members[0], streams=8, declare=8 * MiB, send=2 * MiB)
        await until(lambda: m0.stats.refused["too_many_streams"] == 6 and
                    m0.buffered == 2 * 2 * MiB, "6 refused, 2 held with 2 MiB each")
        assert m0.streams["m1"] == 2 and m0.reserved["m1"] == 2 * 8 * MiB
        assert m0.reserved_total <= m0.max_peer_inflight_bytes
        await m2.wait_connected(["m0"], 30)
        await m2.send("m0", b"honest" * 100_000)  # not blocked by m1's streams
        msg = await asyncio.wait_for(anext(m0.incoming()), 60)
        assert msg.data == b"honest" * 100_000 and msg.peer_hint == "m2"
        await until(lambda: rogue.out["failed"] == 6, "the rogue saw 6 streams fail")
        await rogue.finish()
        await until(lambda: m0.stats.refused["stream_error"] == 2 and not m0.streams,
                    "the two held streams end when the rogue goes")
        assert m0.buffered == 0 and m0.reserved_total == 0 and not m0.reserved
        assert m0.stats.messages_received == 1
    finally:
        await m0.close()
        await m2.close()


async def test_a_trickling_member_is_cut_off_by_the_rate_rule():
    """A member declares 10 MiB, sends 256 KiB, then one byte every 0.1 s: the old
    timeout (30 s + 1 s per declared MB) let it hold the stream ~40 s; the rate rule
    (64 KiB/s over 2 s windows, on bytes actually received) resets it after a window.
    An honest transfer under the same rule goes through."""
    ks = [SigningKey.generate() for _ in range(3)]
    members = libp2p_members(ks)
    m0 = Libp2pTransport(bytes(ks[0]), "m0", members, 16 * MiB, rate_window_s=2.0,
                         min_rate_bytes_per_s=64 * 1024)
    m2 = Libp2pTransport(bytes(ks[2]), "m2", members, CAP)
    await m0.start()
    await m2.start()
    try:
        rogue = Rogue(ks[1], m0, members[0], streams=1, declare=10 * MiB, send=256 * 1024,
                      trickle_s=0.1)
        await until(lambda: m0.stats.refused["too_slow"] == 1, "the trickler is cut off")
        await until(lambda: rogue.out["failed"] == 1, "the rogue's stream was reset")
        await rogue.finish()
        assert m0.buffered == 0 and m0.reserved_total == 0 and not m0.streams
        await m2.wait_connected(["m0"], 30)
        await m2.send("m0", b"x" * 5_000_000)
        assert (await asyncio.wait_for(anext(m0.incoming()), 60)).data == b"x" * 5_000_000
        assert m0.stats.refused["too_slow"] == 1 and m2.stats.dropped == 0
    finally:
        await m0.close()
        await m2.close()


async def test_a_transfer_over_the_global_budget_waits_for_room_then_goes_through():
    """Global in-flight budget 6 MiB, per member 5 MiB: m1 holds a 4 MiB transfer half
    sent; m2's 3 MB share does not fit and waits (nothing read), and goes through once
    m1's transfer ends. With a short wait it is refused as `busy` instead."""
    ks = [SigningKey.generate() for _ in range(3)]
    members = libp2p_members(ks)
    m0 = Libp2pTransport(bytes(ks[0]), "m0", members, 4 * MiB,
                         max_peer_inflight_bytes=5 * MiB, max_inflight_bytes=6 * MiB,
                         rate_window_s=600, budget_wait_s=600)
    m2 = Libp2pTransport(bytes(ks[2]), "m2", members, CAP)
    await m0.start()
    await m2.start()
    try:
        rogue = Rogue(ks[1], m0, members[0], streams=1, declare=4 * MiB, send=MiB)
        await until(lambda: m0.buffered == MiB, "m1's transfer is half sent")
        await m2.wait_connected(["m0"], 30)
        send = asyncio.create_task(m2.send("m0", b"y" * 3_000_000))
        await until(lambda: m0.streams["m2"] == 1, "m2's transfer is waiting")
        assert m0.reserved_total == 4 * MiB and not send.done()
        await rogue.finish()
        msg = await asyncio.wait_for(anext(m0.incoming()), 60)
        assert msg.data == b"y" * 3_000_000
        await send
        assert m2.stats.dropped == 0 and not m0.stats.refused["busy"]
        # The same with a budget wait of 1 s: refused as busy, counted, not delivered.
        m0.budget_wait_s = 1.0
        rogue = Rogue(ks[1], m0, members[0], streams=1, declare=4 * MiB, send=MiB)
        await until(lambda: m0.buffered == MiB, "m1's transfer is half sent again")
        await m2.send("m0", b"z" * 3_000_000)
        assert m0.stats.refused["busy"] == 1 and m2.stats.dropped == 1
        await rogue.finish()
    finally:
        await m0.close()
        await m2.close()


async def test_a_handshake_flood_is_bounded_and_members_keep_delivering():
    """Connections that never finish a handshake (as a non-member can open at will):
    at most 3 from one address are in handshake at once, the rest are closed at once
    (handshake_limit); those in handshake are closed after handshake_timeout_s. A
    member already connected delivers meanwhile, and all slots are free afterwards."""
    ks = [SigningKey.generate() for _ in range(2)]
    members = libp2p_members(ks)
    m0 = Libp2pTransport(bytes(ks[0]), "m0", members, CAP, max_pending_handshakes=8,
                         max_handshakes_per_ip=3, handshake_timeout_s=3.0,
                         per_ip_on_loopback=True)
    m1 = Libp2pTransport(bytes(ks[1]), "m1", members, CAP)
    await m0.start()
    await m1.start()
    socks = []
    try:
        await m1.wait_connected(["m0"], 30)
        await m0.wait_connected(["m1"], 30)
        port = int(members[0].addresses["libp2p"].rsplit("/", 1)[1])
        for _ in range(12):
            socks.append(await asyncio.open_connection("127.0.0.1", port))
        await until(lambda: m0.stats.refused["handshake_limit"] >= 9, "9 refused at once")
        assert m0.handshakes <= 3
        await m1.send("m0", b"during the flood")
        assert (await asyncio.wait_for(anext(m0.incoming()), 60)).data == b"during the flood"
        await until(lambda: m0.stats.refused["handshake_timeout"] == 3 and m0.handshakes == 0,
                    "the 3 in handshake time out")
        for reader, _ in socks:  # every flood connection was closed by the node
            await asyncio.wait_for(reader.read(), 30)  # returns at EOF
            assert reader.at_eof()
    finally:
        for _, writer in socks:
            writer.close()
        await m0.close()
        await m1.close()

"""flnode's libp2p transport with real py-libp2p hosts on 127.0.0.1 (one process, threads)."""

from __future__ import annotations

import asyncio

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.ping import PingService
from libp2p.identity.identify.identify import ID as IDENTIFY
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.peer.peerinfo import PeerInfo
from nacl.signing import SigningKey

from gossip.transports.libp2p import SHARE_PROTOCOL, Libp2pTransport, peer_id_of
from tests.helpers import libp2p_members

CAP = 64 * 1024 * 1024


@pytest.fixture
async def trio_of_members():
    keys = [SigningKey.generate() for _ in range(3)]
    members = libp2p_members(keys)
    ts = [Libp2pTransport(bytes(k), m.name, members, CAP) for k, m in zip(keys, members,
                                                                              strict=True)]
    for t in ts:
        await t.start()
    await ts[0].wait_connected(["m1", "m2"], 30)
    yield keys, members, ts
    for t in ts:
        await t.close()


def test_peer_id_derives_from_the_public_key_alone():
    key = SigningKey(b"\x07" * 32)
    assert peer_id_of(bytes(key.verify_key)) == \
        __import__("libp2p.peer.id", fromlist=["ID"]).ID.from_pubkey(
            create_new_key_pair(b"\x07" * 32).public_key)


async def test_members_exchange_shares_both_ways_and_count_bytes(trio_of_members):
    _, _, ts = trio_of_members
    inbox1, inbox0 = ts[1].incoming(), ts[0].incoming()
    await ts[0].broadcast(b"share-from-m0" * 1000)
    msg = await asyncio.wait_for(anext(inbox1), 30)
    assert msg.data == b"share-from-m0" * 1000 and msg.peer_hint == "m0"
    await ts[1].send("m0", b"x" * 3_000_000)
    assert (await asyncio.wait_for(anext(inbox0), 30)).data == b"x" * 3_000_000
    assert ts[0].stats.messages_sent == 2 and ts[0].stats.bytes_sent == 2 * 13_000
    assert ts[0].stats.bytes_received == 3_000_000


async def test_non_member_peer_is_refused_after_noise_and_counted(trio_of_members):
    _, members, ts = trio_of_members
    outsider_key = SigningKey.generate()
    # The outsider knows the members' addresses and lists itself among them.
    outsider_view = members + libp2p_members([outsider_key], ["mallory"])
    mallory = Libp2pTransport(bytes(outsider_key), "mallory", outsider_view, CAP)
    await mallory.start()
    try:
        await mallory.send("m0", b"poisoned share")
        assert mallory.stats.messages_sent == 0 and mallory.stats.dropped == 1
        assert ts[0].stats.refused["non_member_peer"] >= 1
        assert ts[0].stats.messages_received == 0
    finally:
        await mallory.close()


async def test_share_over_the_cap_is_refused_before_it_is_buffered():
    keys = [SigningKey.generate() for _ in range(2)]
    members = libp2p_members(keys)
    small = Libp2pTransport(bytes(keys[0]), "m0", members, max_message_bytes=100_000)
    big = Libp2pTransport(bytes(keys[1]), "m1", members, max_message_bytes=CAP)
    await small.start()
    await big.start()
    try:
        await big.wait_connected(["m0"], 30)
        await big.send("m0", b"\x00" * 20_000_000)  # announces 20 MB; m0's cap is 100 kB
        assert big.stats.dropped == 1
        for _ in range(100):
            if small.stats.refused["too_large"]:
                break
            await asyncio.sleep(0.05)
        assert small.stats.refused["too_large"] == 1
        assert small.stats.bytes_received == 0 and small.stats.messages_received == 0
        await big.send("m0", b"ok")  # the connection and the node are still fine
        assert (await asyncio.wait_for(anext(small.incoming()), 30)).data == b"ok"
    finally:
        await small.close()
        await big.close()


def _vanilla_host_probe(seed: bytes, target_addr: str, target_peer) -> dict:
    """A stock py-libp2p host (default config) dials, identifies and pings the node."""
    out: dict = {}

    async def main() -> None:
        host = new_host(key_pair=create_new_key_pair(seed))
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(20):
                    await host.connect(PeerInfo(target_peer, [multiaddr.Multiaddr(target_addr)]))
                    stream = await host.new_stream(target_peer, [IDENTIFY])
                    raw = b""
                    try:
                        while chunk := await stream.read(65536):
                            raw += chunk
                    except EOFError:  # py-libp2p raises StreamEOF (an EOFError) at the end
                        pass
                    out["protocols"] = list(parse_identify_response(raw).protocols)
                    out["rtt"] = await PingService(host).ping(target_peer)
            except Exception as exc:  # noqa: BLE001 - the outcome is the test's subject
                out["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                await host.close()

    trio.run(main)
    return out


async def test_a_stock_libp2p_host_with_a_member_key_can_identify_and_ping():
    keys = [SigningKey.generate() for _ in range(2)]
    members = libp2p_members(keys)
    node = Libp2pTransport(bytes(keys[0]), "m0", members, CAP)
    await node.start()
    try:
        member = await asyncio.to_thread(_vanilla_host_probe, bytes(keys[1]),
                                         members[0].addresses["libp2p"], node.peer_id)
        assert "error" not in member, member
        assert SHARE_PROTOCOL in member["protocols"] and "/ipfs/ping/1.0.0" in member["protocols"]
        assert len(member["rtt"]) == 1
        stranger = await asyncio.to_thread(_vanilla_host_probe, bytes(SigningKey.generate()),
                                           members[0].addresses["libp2p"], node.peer_id)
        assert "error" in stranger and "protocols" not in stranger
        assert node.stats.refused["non_member_peer"] >= 1
    finally:
        await node.close()

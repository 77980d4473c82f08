"""Sealing wired into the node: prekey messages, sealed shares, rotation and deletion."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
from nacl.bindings import crypto_sign_ed25519_sk_to_curve25519
from nacl.public import PrivateKey

from gossip import bodies, envelope
from gossip.envelope import (
    KIND_ECHO,
    KIND_FINAL,
    KIND_HELLO,
    KIND_PREKEY,
    KIND_RETIRE,
    KIND_SEALED,
    KIND_SEEN,
    KIND_SHARE,
    Verifier,
)
from gossip.errors import RemoteError
from gossip.protocol.book import RoundBook
from gossip.seal import PrekeyStore, Sealing, encode_announcement, open_sealed, seal_ad
from gossip.transports.memory import MemoryHub
from node.learn.train import evaluate
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.config import load_config
from node.runtime.identity import load_identity
from node.runtime.node import Node
from tests.helpers import SPEC, consortium, keys, tensors


def sealing_pair(n=3, rotate_every=2, lookahead=3):
    ks = keys(n)
    cons = consortium(ks)
    members = {m.public_key: m.name for m in cons.members}
    sealings = [Sealing(cons.id, k, members, rotate_every, lookahead) for k in ks]
    verifiers = [Verifier(cons.id, members, bytes(k.verify_key), SPEC, sealing=s)
                 for k, s in zip(ks, sealings, strict=True)]
    return ks, cons, sealings, verifiers


def announce(ks, cons, sealings, verifiers, round_=0, seq=0):
    """Every member rotates for round_ and every other member verifies its prekey message."""
    for i, (k, s) in enumerate(zip(ks, sealings, strict=True)):
        s.rotate(round_)
        data = envelope.pack(k, cons.id, KIND_PREKEY, round_, seq, s.announcement())
        for j, v in enumerate(verifiers):
            if j != i:
                acc = v.verify(data, round_)
                assert acc.share is None and len(acc.prekeys) == len(s.own.keys)


def test_rotation_keeps_the_epochs_a_share_may_need_and_forgets_closed_ones():
    ks, cons, sealings, _ = sealing_pair(rotate_every=2, lookahead=3)
    s = sealings[0]
    assert s.ahead == 2  # a sender 3 rounds ahead of round 1 is in epoch 2
    assert s.rotate(1) == ([0, 1, 2], [])
    assert s.rotate(1) == ([], [])
    assert s.rotate(2) == ([3], [0])
    assert sorted(s.own.keys) == [1, 2, 3]
    assert s.rotate(9) == ([4, 5, 6], [1, 2, 3])


def test_a_sealed_share_opens_only_for_its_recipients_and_only_in_its_own_envelope():
    ks, cons, sealings, verifiers = sealing_pair()
    announce(ks, cons, sealings, verifiers)
    body = bodies.encode_share(tensors(0.25), 7.0)
    recipients, missing = sealings[0].recipients(1, ["bank-1", "bank-2"])
    assert missing == [] and set(recipients) == {"bank-1", "bank-2"}
    sealed = sealings[0].seal(body, 1, recipients)
    data = envelope.pack(ks[0], cons.id, KIND_SEALED, 1, 1, sealed)
    assert tensors(0.25)[0][1].tobytes() not in data
    for v in verifiers[1:]:
        acc = v.verify(data, 0)
        assert acc.share is not None and acc.share.weight == 7.0
        assert np.array_equal(acc.share.tensors["w"], tensors(0.25)[0][1])
    # bank-2 lifts the ciphertext into an envelope of its own: it was bound to bank-0.
    lifted = envelope.pack(ks[2], cons.id, KIND_SEALED, 1, 1, sealed)
    with pytest.raises(RemoteError, match="bad_seal") as exc:
        verifiers[1].verify(lifted, 0)
    assert exc.value.peer == "bank-2"
    # The same sender re-signs it for another round: bound to round 1.
    moved = envelope.pack(ks[0], cons.id, KIND_SEALED, 2, 2, sealed)
    with pytest.raises(RemoteError, match="bad_seal"):
        verifiers[1].verify(moved, 0)


def test_sealing_nodes_refuse_plain_shares_and_plain_nodes_refuse_sealed_ones():
    ks, cons, sealings, verifiers = sealing_pair()
    announce(ks, cons, sealings, verifiers)
    plain = envelope.pack(ks[0], cons.id, KIND_SHARE, 0, 5,
                          bodies.encode_share(tensors(), 1.0))
    with pytest.raises(RemoteError, match="unsealed"):
        verifiers[1].verify(plain, 0)
    members = {m.public_key: m.name for m in cons.members}
    no_seal = Verifier(cons.id, members, bytes(ks[1].verify_key), SPEC)
    recipients, _ = sealings[0].recipients(0, ["bank-1"])
    sealed = envelope.pack(ks[0], cons.id, KIND_SEALED, 0, 6,
                           sealings[0].seal(bodies.encode_share(tensors(), 1.0), 0, recipients))
    with pytest.raises(RemoteError, match="seal_off"):
        no_seal.verify(sealed, 0)


def test_a_prekey_message_must_carry_the_senders_own_prekeys():
    ks, cons, sealings, verifiers = sealing_pair()
    sealings[2].rotate(0)
    # bank-0 re-announces bank-2's prekeys as its own (e.g. to redirect bank-2's mail).
    forged = envelope.pack(ks[0], cons.id, KIND_PREKEY, 0, 0, sealings[2].announcement())
    with pytest.raises(RemoteError, match="bad_prekey"):
        verifiers[1].verify(forged, 0)
    for junk in (b"", b"\x90", b"\x91\xc4\x03abc", b"\xff" * 10, b"\x81\xa5hello\xc3"):
        with pytest.raises(RemoteError, match="bad_prekey"):
            verifiers[1].verify(envelope.pack(ks[0], cons.id, KIND_PREKEY, 0, 1, junk), 0)


def test_a_prekey_message_tells_the_round_book_the_member_left_earlier_rounds():
    ks, cons, sealings, verifiers = sealing_pair()
    sealings[1].rotate(4)
    data = envelope.pack(ks[1], cons.id, KIND_PREKEY, 4, 0, sealings[1].announcement())
    book = RoundBook(["bank-1"], lookahead=3)
    assert book.add(verifiers[0].verify(data, 0)) == "prekey"
    assert book.complete(0) and book.complete(3) and not book.complete(4)
    assert book.advance() == 4  # every neighbour is in round 4: catch up


class TapHub(MemoryHub):
    """A memory network that records every byte string on the wire, as a broker could."""

    def __init__(self) -> None:
        super().__init__()
        self.wire: list[bytes] = []

    async def deliver(self, sender: str, peer: str, data: bytes) -> bool:
        self.wire.append(bytes(data))
        return await super().deliver(sender, peer, data)


async def run_nodes(prep, hub, seal, rotate=2, spy=None):
    nodes = []
    for name, path in zip(prep.names, prep.config_paths, strict=True):
        cfg = load_config(path)
        cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(update={
            "seal": seal, "prekey_rotate_rounds": rotate})})
        nodes.append(Node.from_config(cfg, hub.attach(name, prep.names)))
        if spy is not None:
            spy(nodes[-1])
    async with asyncio.TaskGroup() as tg:
        for node in nodes:
            tg.create_task(node.run())
    return nodes


def test_a_sealed_consortium_learns_the_same_model_and_old_traffic_stays_closed(tmp_path):
    rounds = 6
    results = {}
    plain: list[bytes] = []  # every share body a member sealed
    deleted: dict[str, dict[int, bytes]] = {}  # member -> the prekeys it deleted, by epoch

    def spy(node):
        if node.sealing is None:
            return
        seal, delete = node.sealing.seal, node.state.delete_prekey

        def record_seal(body, round_, recipients):
            plain.append(body)
            return seal(body, round_, recipients)

        def record_delete(epoch):
            deleted.setdefault(node.name, {})[epoch] = bytes(node.sealing.own.keys[epoch]) \
                if epoch in node.sealing.own.keys else node.state.load_prekeys()[epoch]
            delete(epoch)

        node.sealing.seal, node.state.delete_prekey = record_seal, record_delete

    for seal in ("off", "on"):
        spec = SimulationSpec(dataset="default", nodes=3, partition="dirichlet:0.5",
                              rounds=rounds, seed=0, out=tmp_path / seal, privacy="off",
                              round_deadline_s=30.0)
        prep = prepare(spec)
        hub = TapHub()
        nodes = asyncio.run(run_nodes(prep, hub, seal, spy=spy))
        results[seal] = (prep, hub, nodes)
        for node in nodes:
            assert node.rejected() == {}, (seal, node.name, node.rejected())
            assert node.book.current == rounds
    # Sealing changes the bytes, not the learning: same seed, same models.
    for a, b in zip(results["off"][2], results["on"][2], strict=True):
        assert evaluate(a.model, *results["off"][0].test) == \
            evaluate(b.model, *results["on"][0].test)

    prep, hub, nodes = results["on"]
    envs = [envelope.decode_outer(d) for d in hub.wire]
    kinds = {e.kind for e in envs}
    # no share in clear; seen reports and echoes ([rules] echo) carry only the digests
    # of sealed envelopes, the final message only a digest of the model every member holds
    assert kinds == {KIND_SEALED, KIND_PREKEY, KIND_HELLO, KIND_SEEN, KIND_ECHO,
                     KIND_FINAL}, kinds
    sealed = [e for e in envs if e.kind == KIND_SEALED]
    assert len({(e.sender, e.round) for e in sealed}) == 3 * rounds
    # No plaintext tensor bytes on the wire: every member's released tensors, looked for
    # in everything the tap recorded.
    wire = b"".join(hub.wire)
    assert len(plain) == 3 * rounds
    for body in plain:
        for array in bodies.decode_share(body, nodes[0].verifier.spec).tensors.values():
            assert array.tobytes()[:64] not in wire
    # Forward secrecy: prekeys are deleted as their epochs close, and all of them once
    # the run is over (no round is left to read a share in). What is left on disk plus
    # the identity key, converted to X25519, opens nothing that was recorded ...
    for node in nodes:
        assert node.state.load_prekeys() == {} and node.sealing.own.keys == {}
        assert not list((node.state.path / "outbox").glob("*.body"))  # own plaintext too
        ident = load_identity(node.cfg.identity.key)
        sk = bytes(ident.signing_key) + ident.public_key
        thief = PrekeyStore({-1: PrivateKey(crypto_sign_ed25519_sk_to_curve25519(sk))})
        for_it = [e for e in sealed if e.sender != ident.public_key]
        assert len(for_it) >= 2 * rounds
        for e in for_it:
            with pytest.raises(RemoteError, match="no_prekey"):
                open_sealed(e.body, thief, seal_ad(e.consortium_id, e.sender, e.round))
        # ... while the keys it deleted would have opened every one (the test can fail).
        was = PrekeyStore({e: PrivateKey(raw) for e, raw in deleted[node.name].items()})
        assert sorted(was.keys) == list(range((rounds - 1) // 2 + node.sealing.ahead + 1))
        for e in for_it:
            assert open_sealed(e.body, was, seal_ad(e.consortium_id, e.sender, e.round))


def test_a_restarted_sealing_node_resends_its_sealed_release_byte_for_byte(tmp_path):
    """Killed after releasing round 2 and before its checkpoint: the restart must not draw
    a new share (nor a new seq); it cannot open its own sealed share, so it reads the
    plain body stored next to it. Its prekeys come back from disk, not fresh."""
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=3, seed=0,
                          out=tmp_path, privacy="off", round_deadline_s=20.0)
    prep = prepare(spec)

    def killed_before_the_prune(node):  # the kill comes after round 2's release
        node.state.prune_outbox = lambda before_round, keep_releases=False: None

    first = asyncio.run(run_nodes(prep, TapHub(), "on", spy=killed_before_the_prune))
    stored = first[0].state.stored_release(2)
    assert stored is not None and envelope.decode_outer(stored).kind == KIND_SEALED
    cp = first[0].state.load_checkpoint()
    first[0].state.save_checkpoint(dataclasses.replace(cp, next_round=2, seq=0))

    async def restart():
        cfg = load_config(prep.config_paths[0])
        cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(update={
            "seal": "on", "prekey_rotate_rounds": 2})})
        node = Node.from_config(cfg, MemoryHub().attach(prep.names[0], prep.names))
        # never reused (the final message after the last round used the next one)
        assert node.signer.seq > envelope.decode_outer(stored).seq
        return node, await node.releaser.release(2)

    node, release = asyncio.run(restart())
    own = release.own
    assert release.resent and release.data == stored
    body = bodies.decode_share(node.state.stored_plain_body(2), node.verifier.spec)
    assert own.weight == body.weight


def test_a_duplicate_prekey_message_still_teaches_a_restarted_node_the_prekeys():
    """A restart keeps the replay table but not the members' prekeys: the reply to its
    hello may be a copy it accepted before the restart. It is counted as a duplicate and
    its prekeys are learned all the same."""
    ks, cons, sealings, verifiers = sealing_pair(2)
    sealings[0].rotate(0)
    data = envelope.pack(ks[0], cons.id, KIND_PREKEY, 0, 3, sealings[0].announcement())
    verifiers[1].verify(data, 0)
    sealings[1].peers.clear()  # the restart
    with pytest.raises(RemoteError, match="duplicate"):
        verifiers[1].verify(data, 0)
    assert set(sealings[1].recipients(0, ["bank-0"])[0]) == {"bank-0"}


def test_a_sealing_node_down_for_many_epochs_catches_up_without_a_deadline_per_round(tmp_path):
    """bank-2 misses rounds 2-9 (prekeys rotate every 2 rounds, so the others sealed those
    rounds without it and its old prekeys are long gone on their side). Restarted, it
    learns from the answers to its hello where the others are, skips ahead instead of
    sitting out a 60 s deadline per round, and from then on reads and is read."""
    spec = SimulationSpec(dataset="default", nodes=3, partition="iid", rounds=2, seed=0,
                          out=tmp_path, privacy="off", round_deadline_s=60.0)
    prep = prepare(spec)

    def build(hub, names, rounds, deadline):
        out = []
        for name, path in zip(prep.names, prep.config_paths, strict=True):
            if name not in names:
                continue
            cfg = load_config(path)
            cfg = cfg.model_copy(update={
                "training": cfg.training.model_copy(update={"rounds": rounds}),
                "gossip": cfg.gossip.model_copy(update={
                    "seal": "on", "prekey_rotate_rounds": 2, "lookahead": 1,
                    "round_deadline_s": deadline})})
            out.append(Node.from_config(cfg, hub.attach(name, prep.names)))
        return out

    async def run(nodes):
        async with asyncio.TaskGroup() as tg:
            for n in nodes:
                tg.create_task(n.run())

    asyncio.run(run(build(MemoryHub(), prep.names, 2, 60.0)))
    # bank-0 and bank-1 go on to round 10 without bank-2 (a short deadline for its share)
    asyncio.run(run(build(MemoryHub(), prep.names[:2], 10, 0.5)))
    nodes = build(TapHub(), prep.names, 13, 60.0)
    assert [n.book.current for n in nodes] == [10, 10, 2]

    async def timed():
        await asyncio.wait_for(run(nodes), 40)  # a deadline per missed round: 8 x 60 s

    asyncio.run(timed())
    late = nodes[2]
    assert late.book.current == 13
    lines = [json.loads(x) for x in (late.state.path / "metrics.jsonl").read_text().splitlines()]
    # It learned from the hellos' answers that both were at round 10 and joined them
    # there (no round 2 alone), then had both shares in every round.
    assert [ln["round"] for ln in lines if "metrics" in ln][-4:] == [1, 10, 11, 12]
    assert all(ln["received"] == ["bank-0", "bank-1"] for ln in lines[-3:])
    for n in nodes[:2]:
        tail = [json.loads(x) for x in (n.state.path / "metrics.jsonl").read_text().splitlines()]
        assert all("bank-2" in ln["received"] for ln in tail[-3:])


def test_a_member_that_never_starts_does_not_make_the_others_miss_each_other(tmp_path):
    """Found in review: waiting for a silent member's prekey used up the round deadline,
    the others then closed their rounds at once and refused each other's shares as
    stale. A member that let a deadline pass without a prekey is not waited for again,
    and collecting gets a full deadline from our own release. The run sits out two
    deadlines for the silent member (its prekey, then its round-1 share): 6 s each, still
    far more than the three running members, in one process, take to reach each other."""
    spec = SimulationSpec(dataset="default", nodes=4, partition="iid", rounds=3, seed=0,
                          out=tmp_path, privacy="off", round_deadline_s=6.0)
    prep = prepare(spec)
    hub = MemoryHub()
    nodes = []
    for name, path in list(zip(prep.names, prep.config_paths, strict=True))[:3]:
        cfg = load_config(path)
        cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(update={"seal": "on"})})
        nodes.append(Node.from_config(cfg, hub.attach(name, prep.names)))

    async def run():
        async with asyncio.TaskGroup() as tg:
            for n in nodes:
                tg.create_task(n.run())

    asyncio.run(run())
    for n in nodes:
        assert n.rejected() == {}
        lines = [json.loads(x) for x in (n.state.path / "metrics.jsonl").read_text().splitlines()]
        others = sorted(set(prep.names[:3]) - {n.name})
        assert [ln["received"] for ln in lines] == [others] * 3
        assert n.liveness.silent == {prep.names[3]}


def test_old_prekey_messages_teach_a_restarted_node_but_never_override_newer_keys():
    """Review findings: a hello reply re-sends the announcement of the member's last
    rotation, which may be older than the restarted node's replay window; and a replayed
    old announcement must not bring back keys the member has replaced."""
    ks, cons, sealings, verifiers = sealing_pair(2)
    sealings[0].rotate(0)
    old = envelope.pack(ks[0], cons.id, KIND_PREKEY, 0, 5, sealings[0].announcement())
    verifiers[1].verify(old, 0)
    later = envelope.pack(ks[0], cons.id, KIND_RETIRE, 0, 5 + 1500, b"")
    verifiers[1].verify(later, 0)  # the window has moved far past seq 5
    sealings[1].peers.clear()  # bank-1 restarts: replay table kept, prekeys not
    with pytest.raises(RemoteError, match="replay"):
        verifiers[1].verify(old, 0)
    first = sealings[0].own.keys[0].public_key
    assert sealings[1].recipients(0, ["bank-0"])[0]["bank-0"].x25519 == bytes(first)
    # bank-0 lost its state and made new keys (seq 2000); the old message comes again.
    fresh = Sealing(cons.id, ks[0], dict(sealings[0].members), 2, 3)
    fresh.rotate(0)
    verifiers[1].verify(envelope.pack(ks[0], cons.id, KIND_PREKEY, 0, 2000,
                                      fresh.announcement()), 0)
    with pytest.raises(RemoteError, match="replay"):
        verifiers[1].verify(old, 0)
    assert sealings[1].recipients(0, ["bank-0"])[0]["bank-0"].x25519 == \
        bytes(fresh.own.keys[0].public_key)


def test_a_member_announcing_ever_more_epochs_only_crowds_out_its_own():
    ks, cons, sealings, verifiers = sealing_pair(2)
    from gossip.seal import KEEP_EPOCHS, sign_prekey

    for i in range(200):
        p = sign_prekey(ks[0], cons.id, i, PrivateKey.generate().public_key)
        body = envelope.pack(ks[0], cons.id, KIND_PREKEY, 0, i, encode_announcement([p], False))
        verifiers[1].verify(body, 0)
    assert len(sealings[1].peers["bank-0"]) == KEEP_EPOCHS
    assert len(sealings[1]._learned_seq) == KEEP_EPOCHS


def test_a_restarted_node_seals_at_once_with_the_prekeys_in_its_checkpoint(tmp_path):
    """Found in the 4-process kill test: a node restarted within an epoch waited for
    answers to its hello before it could seal. The members' (public, signed) prekeys now
    ride in the checkpoint, and are verified again when loaded."""
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=2, seed=0,
                          out=tmp_path, privacy="off", round_deadline_s=20.0)
    prep = prepare(spec)
    first = asyncio.run(run_nodes(prep, TapHub(), "on", rotate=5))
    learned = first[0].sealing.peers["bank-1"]
    cfg = load_config(prep.config_paths[0])
    cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(update={
        "seal": "on", "prekey_rotate_rounds": 5})})
    again = Node.from_config(cfg, MemoryHub().attach("bank-0", prep.names))
    recipients, missing = again.sealing.recipients(2, ["bank-1"])
    assert missing == [] and recipients["bank-1"] == learned[0]
    # A checkpoint whose prekeys do not verify is not trusted.
    cp = again.state.load_checkpoint()
    seq, encoded = cp.peer_prekeys["bank-1"][0]
    garbled = encoded[:-1] + bytes([encoded[-1] ^ 1])
    again.state.save_checkpoint(dataclasses.replace(
        cp, peer_prekeys={"bank-1": [[seq, garbled]]}))
    third = Node.from_config(cfg, MemoryHub().attach("bank-0", prep.names))
    assert third.sealing.peers == {}


def test_the_prekey_wait_is_reported_like_any_long_wait(tmp_path, monkeypatch, caplog):
    """A sealing node waiting for a member's prekey said nothing until the deadline; now
    it says whom it waits for (log and activity.json), as for shares."""
    import logging

    from gossip.protocol import machine as protocol_machine
    from node.runtime.activity import ACTIVITY_FILE

    monkeypatch.setattr(protocol_machine, "WAIT_REPORT_FIRST_S", 0.2)
    spec = SimulationSpec(dataset="default", nodes=3, partition="iid", rounds=1, seed=0,
                          out=tmp_path, privacy="off", round_deadline_s=2.0)
    prep = prepare(spec)
    hub = MemoryHub()
    nodes = []
    for name, path in list(zip(prep.names, prep.config_paths, strict=True))[:2]:
        cfg = load_config(path)
        cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(update={"seal": "on"})})
        nodes.append(Node.from_config(cfg, hub.attach(name, prep.names)))
    caplog.set_level(logging.WARNING, logger="flnode.node")

    async def run():
        async with asyncio.TaskGroup() as tg:
            for n in nodes:
                tg.create_task(n.run())

    asyncio.run(run())
    waits = [r.getMessage() for r in caplog.records if "for round 1 prekeys" in r.getMessage()]
    assert waits and all("from bank-2 (gives up in" in w for w in waits), waits
    for n in nodes:
        assert "bank-2" in n.liveness.silent
        doc = json.loads((n.state.path / ACTIVITY_FILE).read_text())
        assert doc["waiting_for"] == []  # cleared once the wait ended

"""Evidence of equivocation (issue 19, item 6): a seen report is its reporter's claim, never
counted against the member it accuses; proofs (two envelopes a member signed for one round)
are kept apart from the rotating audit log, bounded per offender. Hostile inputs are signed
with members' keys."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os

import numpy as np
import pytest

from gossip import bodies, envelope
from gossip.envelope import HELLO_ASK, HELLO_REPLY, KIND_HELLO, KIND_SEEN, KIND_SHARE
from gossip.transports.base import Incoming
from gossip.transports.memory import MemoryHub
from node.rehearsal.simulation.results import seen_by
from node.runtime.evidence import EvidenceStore, envelope_bytes, verify_equivocation
from node.runtime.identity import load_identity
from node.runtime.state import read_jsonl
from tests.test_liveness import make, node_of


class Members:
    """Sign as any member of the prepared consortium."""

    def __init__(self, prep, tmp_path):
        self.prep = prep
        self.keys = {n: load_identity(tmp_path / "keys" / f"{n}.key").signing_key
                     for n in prep.names}
        self.seq = itertools.count(1)

    def pub(self, name):
        return bytes(self.keys[name].verify_key)

    def pack(self, name, kind, round_, body):
        return envelope.pack(self.keys[name], self.prep.consortium.id, kind, round_,
                             next(self.seq), body)

    def msg(self, name, kind, round_, body):
        return Incoming(self.pack(name, kind, round_, body), name)


def share_body(node, value=0.0):
    return bodies.encode_share(
        [(s.name, np.full(s.shape, value, "<f4")) for s in node.verifier.spec], 10.0)


async def test_a_false_seen_report_is_counted_against_its_reporter_not_the_accused(tmp_path):
    """bank-2 (a member, its own key) reports that honest bank-1 sent it a share other than
    the one bank-1 sent us. On 819e161 bank-0's counters and audit evidence named bank-1."""
    prep = make(tmp_path)
    node = node_of(prep, 0, MemoryHub())
    await node.transport.start()
    m = Members(prep, tmp_path)
    honest, liar = prep.names[1], prep.names[2]
    assert node.handle(m.msg(honest, KIND_SHARE, 0, share_body(node))) is not None
    # round 1 closed with bank-1's share (what RoundMachine.closed files)
    for found in node.seen.close(0, {m: (a.envelope.seq, a.envelope.digest, a.envelope.sig)
                                     for m, a in node.book.shares(0).items()}):
        node.findings.mismatch(found)
    lie = bodies.encode_seen([(m.pub(honest), os.urandom(32))])
    assert node.handle(m.msg(liar, KIND_SEEN, 0, lie)) is not None
    assert node.counters.digest_mismatch == {liar: 1}  # the claim is the reporter's
    assert not node.counters.equivocation  # nothing proven against anyone
    lines = [x for x in read_jsonl(node.state.path / "audit.jsonl")
             if x.get("outcome") == "digest_mismatch"]
    assert len(lines) == 1 and lines[0]["kind"] == "claim"
    assert lines[0]["member"] == liar and lines[0]["accused"] == honest
    # what a rehearsal's summary reads from the log: no evidence against bank-1
    seen = seen_by(node.state.path, [honest, liar])
    assert seen[honest]["evidence"] == 0 and seen[honest]["digest_mismatch"] == 0
    assert seen[honest]["accused"] == 1 and seen[liar]["digest_mismatch"] == 1
    assert not node.evidence.proofs()


async def test_an_equivocation_proof_survives_a_flood_that_rotates_the_audit_log(tmp_path):
    """bank-3 signs two different shares for round 1: the proof (both envelopes) is kept in
    state/evidence/proofs/ and counted; then a flood of its signed hellos rotates the audit
    log many times over. The audit line is gone, the proof is still there and checks."""
    prep = make(tmp_path)
    node = node_of(prep, 0, MemoryHub())
    node.state.rotate_bytes = 4096  # a small log, so a short flood rotates it out
    m = Members(prep, tmp_path)
    bad = prep.names[3]
    assert node.handle(m.msg(bad, KIND_SHARE, 0, share_body(node, 0.0))) is not None
    assert node.handle(m.msg(bad, KIND_SHARE, 0, share_body(node, 1.0))) is None
    assert node.handle(m.msg(bad, KIND_SHARE, 0, share_body(node, 2.0))) is None  # a third
    assert node.counters.equivocation == {bad: 1}  # one proven round, counted once
    [proof] = node.evidence.proofs()
    assert verify_equivocation(proof.read_bytes(), m.pub(bad), prep.consortium.id) == \
        (0, KIND_SHARE)

    def evidence_lines():
        return [x for x in read_jsonl(node.state.path / "audit.jsonl")
                if x.get("outcome") == "equivocation" and x.get("kind") == "evidence"]
    assert evidence_lines()[0]["proof"] == str(proof.relative_to(node.state.path))
    for _ in range(400):
        node.handle(m.msg(bad, KIND_HELLO, 0, HELLO_REPLY))
    assert not evidence_lines()  # rotated out of the audit log ...
    assert node.evidence.proofs() == [proof]  # ... not out of the evidence store
    verify_equivocation(proof.read_bytes(), m.pub(bad), prep.consortium.id)


async def test_an_equivocating_copy_filed_while_the_round_closes_counts_in_its_metrics(tmp_path):
    """bank-3's first share completes round 1 and its second, different copy arrives before
    the driver closes the round: the refusal is counted in round 1's metrics line, as the
    round loop before the driver counted it (the golden run's rejected.equivocation). On
    0152a2d the Close's answer jumped ahead of the queued refusal: 0 in that line."""
    prep = make(tmp_path, rounds=1)
    node = node_of(prep, 0, MemoryHub())
    m = Members(prep, tmp_path)
    run = asyncio.create_task(node.run())
    try:
        for peer in prep.names[1:]:  # the others are up: the start barrier passes
            node.handle(m.msg(peer, KIND_HELLO, 0, HELLO_ASK))
        async with asyncio.timeout(60):  # our share is out, the round collects
            while node.machine.stage != "collect":
                await asyncio.sleep(0.01)
        for peer in prep.names[1:3]:
            assert node.handle(m.msg(peer, KIND_SHARE, 0, share_body(node))) is not None
        bad = prep.names[3]
        # back to back, as a transport hands over what it holds: no await in between
        assert node.handle(m.msg(bad, KIND_SHARE, 0, share_body(node, 0.0))) is not None
        assert node.handle(m.msg(bad, KIND_SHARE, 0, share_body(node, 1.0))) is None
        metrics = node.state.path / "metrics.jsonl"
        async with asyncio.timeout(60):
            while not metrics.exists():
                await asyncio.sleep(0.01)
        [line] = read_jsonl(metrics)
        assert line["round"] == 0 and sorted(line["received"]) == prep.names[1:]
        assert line["rejected"] == {"equivocation": 1}
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


def test_the_proof_store_keeps_the_earliest_proofs_and_its_bound_outlives_a_restart(tmp_path):
    prep = make(tmp_path)
    m = Members(prep, tmp_path)
    bad, other = prep.names[3], prep.names[2]

    def pair(name, r):
        return tuple(envelope.decode_outer(m.pack(name, KIND_SHARE, r, bytes([i])))
                     for i in range(2))
    store = EvidenceStore(tmp_path / "state", max_per_member=3)
    kept = [store.keep_equivocation(bad, *pair(bad, r)) for r in range(5)]
    assert all(kept[:3]) and kept[3:] == [None, None] and store.full == {bad: 2}
    assert store.keep_equivocation(bad, *pair(bad, 0)) == kept[0]  # one per round
    again = EvidenceStore(tmp_path / "state", max_per_member=3)  # a restart
    assert again.keep_equivocation(bad, *pair(bad, 9)) is None
    assert again.keep_equivocation(other, *pair(other, 9)) is not None  # per offender
    assert sorted(p.name for p in again.proofs()) == sorted(
        [p.name for p in kept[:3]] + [f"{other}-round9.equivocation"])
    # what is refused as a proof, however it is signed
    a, b = pair(bad, 0)
    with pytest.raises(ValueError, match="not an equivocation"):
        store.keep_equivocation(bad, a, a)
    with pytest.raises(ValueError, match="not an equivocation"):
        store.keep_equivocation(bad, a, pair(bad, 1)[0])


@pytest.mark.parametrize("forged", ["same", "other_round", "other_sender", "bad_sig",
                                    "other_consortium", "garbage", "not_a_map"])
def test_a_forged_proof_is_refused_with_the_reason(tmp_path, forged):
    import msgpack

    prep = make(tmp_path)
    m = Members(prep, tmp_path)
    bad, other = prep.names[3], prep.names[2]
    first = m.pack(bad, KIND_SHARE, 0, b"a")
    second = m.pack(bad, KIND_SHARE, 0, b"b")
    if forged == "same":
        second = first
    elif forged == "other_round":
        second = m.pack(bad, KIND_SHARE, 1, b"b")
    elif forged == "other_sender":  # another member's envelope blamed on bank-3
        second = m.pack(other, KIND_SHARE, 0, b"b")
    elif forged == "bad_sig":
        env = envelope.decode_outer(second)
        second = envelope_bytes(envelope.Envelope(env.consortium_id, env.sender, env.kind,
                                                  env.round, env.seq, b"c", env.sig))
    elif forged == "other_consortium":
        second = envelope.pack(m.keys[bad], bytes(32), KIND_SHARE, 0, 99, b"b")
    doc = {"version": 1, "first": first, "second": second}
    data = msgpack.packb(doc, use_bin_type=True)
    if forged == "garbage":
        data = os.urandom(300)
    elif forged == "not_a_map":
        data = msgpack.packb([first, second], use_bin_type=True)
    with pytest.raises(ValueError):
        verify_equivocation(data, m.pub(bad), prep.consortium.id)
    good = msgpack.packb({"version": 1, "first": first, "second": m.pack(bad, KIND_SHARE, 0,
                                                                         b"b")},
                         use_bin_type=True)
    assert verify_equivocation(good, m.pub(bad), prep.consortium.id) == (0, KIND_SHARE)


def test_envelope_bytes_are_the_bytes_that_were_signed(tmp_path):
    prep = make(tmp_path)
    m = Members(prep, tmp_path)
    raw = m.pack(prep.names[1], KIND_SHARE, 3, b"\x00" * 300)
    assert envelope_bytes(envelope.decode_outer(raw)) == raw

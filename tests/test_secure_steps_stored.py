"""A secure round's received step messages on disk (node/runtime/secure_deals.py keep_step,
restored_steps, refeed): stored as they arrived, given back at a restart, and a stored file
is hostile input: one forged with a member's real key (another member's, another round's,
another step's), truncated or edited is refused naming the file, the member and why,
counted (`stored_step`) and set aside; the rest are used. Pure file logic, real keys, no
network (the real-process restart: tests/test_secure_sigkill.py)."""

from __future__ import annotations

import logging
import tracemalloc
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gossip.bodies import SecAgg, encode_secagg
from gossip.envelope import KIND_SECAGG, Accepted, decode_outer, pack
from gossip.errors import RemoteError
from gossip.membership import Consortium, Member
from node.runtime import secure_deals
from node.runtime.state import StateDir
from tests.helpers import SCHEMA, consortium, keys, verifier_for

KEYS = keys(4)
CID = consortium(KEYS).id
NAMES = [f"bank-{i}" for i in range(4)]
PHASES = ["check", "agree", "sum", "confirm", "fallback"]


def _node(tmp_path: Path, max_bytes: int = 1 << 20) -> SimpleNamespace:
    cons = consortium(KEYS)  # bank-0 .. bank-3, our real test keys
    return SimpleNamespace(
        name="bank-0", state=StateDir(tmp_path / "state"),
        counters=SimpleNamespace(rejected=Counter()), consortium=cons,
        verifier=verifier_for(cons, KEYS[0], secure=True),
        model=torch.nn.Linear(3, 1), book=SimpleNamespace(current=0, shares=lambda r: {}),
        cfg=SimpleNamespace(gossip=SimpleNamespace(max_envelope_bytes=max_bytes)),
        machine=SimpleNamespace(phases=[SimpleNamespace(name=p) for p in ["share", *PHASES]]),
        sealing=None)


def _msg(member: int, step: str, r: int = 0, seq: int = 1, cid: bytes = CID) -> bytes:
    pieces = (bytes([member]) * 32,) if step == "confirm" else ()
    return pack(KEYS[member], cid, KIND_SECAGG, r, seq, encode_secagg(SecAgg(step, pieces)))


def _keep(node, member: int, step: str, data: bytes) -> None:
    acc = Accepted(NAMES[member], decode_outer(data), None, secagg=SecAgg(step, ()))
    secure_deals.keep_step(node, acc, data)


def test_a_filed_step_is_stored_once_as_it_arrived_and_given_back_in_the_steps_order(tmp_path):
    node = _node(tmp_path)
    confirm, check = _msg(2, "confirm"), _msg(1, "check")
    _keep(node, 2, "confirm", confirm)
    _keep(node, 1, "check", check)
    _keep(node, 2, "confirm", _msg(2, "confirm", seq=9))  # a re-signed copy: the first kept
    path = secure_deals.step_file(node, 0, "bank-2", "confirm")
    assert path.name == "round-00000000.bank-2.confirm.step" and path.read_bytes() == confirm
    fed: list[tuple[str, str, bytes]] = []

    def receive(node, acc, now, data, token):
        assert token is None and now == 5.0
        fed.append((acc.sender, acc.secagg.step, data))
        return []

    node._feed = lambda actions: None
    node.secure = SimpleNamespace(audited={})
    assert secure_deals.refeed(node, 0, 5.0, receive) == 2
    assert fed == [("bank-1", "check", check), ("bank-2", "confirm", confirm)]
    assert not node.counters.rejected
    # the verifier now knows them: the transport's redelivered copy is a benign duplicate
    with pytest.raises(RemoteError) as exc:
        node.verifier.verify(check, 0)
    assert exc.value.reason == "duplicate"
    # and a restart whose replay table already holds them (a checkpoint after they came)
    # still gets them back
    assert secure_deals.refeed(node, 0, 5.0, receive) == 2 and not node.counters.rejected
    # one that came again since this process started (the transport redelivered it before
    # the round's Train) is not given twice
    node.secure.audited[0] = {("bank-2", "confirm")}
    fed.clear()
    assert secure_deals.refeed(node, 0, 5.0, receive) == 1 and fed[0][:2] == ("bank-1", "check")


def test_a_step_over_its_bound_is_not_stored(tmp_path):
    node = _node(tmp_path, max_bytes=100)  # below a confirm's envelope
    _keep(node, 2, "confirm", _msg(2, "confirm"))
    assert node.counters.rejected["stored_step_size"] == 1
    assert not secure_deals.step_file(node, 0, "bank-2", "confirm").exists()


FORGED = {  # file name's (member, step) <- what is written there, and why it is refused
    "another_member": (3, "confirm", lambda: _msg(2, "confirm"), "not signed by bank-3's key"),
    "another_round": (2, "confirm", lambda: _msg(2, "confirm", r=1),
                      "a 'secagg' of round 2, not a secure step of round 1"),
    "another_step": (2, "fallback", lambda: _msg(2, "sum"), "a sum message, not a fallback one"),
    "another_consortium": (2, "confirm", lambda: _msg(2, "confirm", cid=b"d" * 32),
                           "another consortium's message"),
    "truncated": (2, "confirm", lambda: _msg(2, "confirm")[:40], "not an envelope"),
    "flipped_byte": (2, "confirm", lambda: (lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:])(
        _msg(2, "confirm")), "bank-2's signature does not verify"),
    "over_the_bound": (2, "confirm", lambda: _msg(2, "confirm") + b"x" * 5000, "over a confirm"),
}


@pytest.mark.parametrize("edit", sorted(FORGED))
def test_a_forged_or_corrupted_stored_step_is_refused_by_name_and_the_rest_kept(
        tmp_path, caplog, edit):
    """Written with a member's real key where a forgery can be: refused naming the file,
    the member the file names and why; counted; renamed .refused (its name free for the
    genuine message); the other stored steps given back; nothing raised."""
    node = _node(tmp_path)
    good = _msg(1, "check")
    _keep(node, 1, "check", good)
    member, step, make, why = FORGED[edit]
    path = secure_deals.step_file(node, 0, NAMES[member], step)
    path.write_bytes(make())
    caplog.set_level(logging.WARNING, logger="flnode.secure")
    got = secure_deals.restored_steps(node, 0, PHASES)
    assert [(a.sender, a.secagg.step, d) for a, d in got] == [("bank-1", "check", good)]
    assert node.counters.rejected["stored_step"] == 1
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"refusing the stored {step} message {path} (from {NAMES[member]})" in msg, msg
    assert why in msg, msg
    assert not path.exists() and path.with_name(path.name + ".refused").exists()
    # the genuine message, if it comes again, is stored in its place
    genuine = _msg(member, step)
    _keep(node, member, step, genuine)
    assert path.read_bytes() == genuine
    # the round's close prunes all of it, the set-aside file and a write a kill cut short too
    (secure_deals.folder(node) / f".{path.name}.tmp").write_bytes(b"half")
    secure_deals.prune(node, 1)
    assert not list(secure_deals.folder(node).iterdir())


# A stored file over its bound is refused from its size, never read whole: another process
# (or a power cut's torn metadata) can leave a file of any size, or a link to a device,
# under the state dir. 64 MiB sparse: reading it whole would take 64 MiB of memory.
HUGE = 64 << 20


@pytest.mark.parametrize("kind", ["step", "deal", "link_to_dev_zero"])
def test_a_huge_stored_file_is_refused_without_reading_it(tmp_path, caplog, kind):
    node = _node(tmp_path)
    good = _msg(1, "check")
    _keep(node, 1, "check", good)
    path = secure_deals.deal_path(node, 0, "bank-2") if kind == "deal" else \
        secure_deals.step_file(node, 0, "bank-2", "confirm")
    if kind == "link_to_dev_zero":  # endless: read whole, it never returns
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as f:
            f.truncate(HUGE)
    caplog.set_level(logging.WARNING, logger="flnode.secure")
    tracemalloc.start()
    try:
        if kind == "deal":
            got = secure_deals.restored_deals(node, 0, set())
            assert got == {} and node.counters.rejected["stored_deal"] == 1
        else:
            got = secure_deals.restored_steps(node, 0, PHASES)
            assert [(a.sender, d) for a, d in got] == [("bank-1", good)]
            assert node.counters.rejected["stored_step"] == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated to refuse a file over its bound"
    (msg,) = [r.getMessage() for r in caplog.records]
    assert str(path) in msg and "bank-2" in msg, msg
    assert not path.exists() and not path.is_symlink()


def test_members_whose_names_differ_only_in_dot_and_underscore_keep_their_own_files(tmp_path):
    """Member names may hold '.', the files' separator: "site.a" and "site_a" (both valid)
    mapped to one file name, so whichever was stored first took the other's place: the
    other's deal or step was silently not kept (lost at a restart) and, at the restart, the
    one file refused as "not signed by" the first name's key: both lost. A member whose name
    collides (its real key) could so pre-empt another's stored messages every round."""
    names = ["bank-0", "site.a", "site_a", "bank-3"]
    cons = Consortium("test-consortium", SCHEMA, tuple(
        Member(nm, bytes(k.verify_key), {"memory": nm}) for nm, k in zip(names, KEYS, strict=True)))
    node = _node(tmp_path)
    node.consortium, node.verifier = cons, verifier_for(cons, KEYS[0], secure=True)
    assert len({secure_deals.step_file(node, 0, nm, "confirm") for nm in names}) == 4
    assert len({secure_deals.deal_path(node, 0, nm) for nm in names}) == 4

    def msg(member: int) -> bytes:
        body = encode_secagg(SecAgg("confirm", (bytes([member]) * 32,)))
        return pack(KEYS[member], cons.id, KIND_SECAGG, 0, 1, body)

    hostile, genuine = msg(2), msg(1)  # "site_a" first, then "site.a"
    for member, data in ((2, hostile), (1, genuine)):
        acc = Accepted(names[member], decode_outer(data), None, secagg=SecAgg("confirm", ()))
        secure_deals.keep_step(node, acc, data)
    got = secure_deals.restored_steps(node, 0, PHASES)
    assert sorted((a.sender, d) for a, d in got) == [("site.a", genuine), ("site_a", hostile)]
    assert not node.counters.rejected

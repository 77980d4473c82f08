"""A member's RECEIVED deals survive a restart (node/runtime/secure_deals.py): stored as they
arrived when filed, reloaded when the round book lost them, refused by name when the file is
not the dealer's deal of this round to us. Real nodes through `flnode simulate --secure`
(memory transport, sealing on, real training); the restart's loss is the round book's
memory: site-0's book holds none of the round's deals when its check is computed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


def _simulate(out: Path) -> dict:
    from rich.console import Console

    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    return simulate(SimulationSpec(dataset="digits", nodes=5, partition="dirichlet:0.5",
                                   rounds=1, seed=0, out=out, secure=True),
                    console=Console(quiet=True))


def _aggregates(run: Path, member: str) -> list[dict]:
    lines = (run / "state" / member / "audit.jsonl").read_text().splitlines()
    return [x for x in map(json.loads, lines) if x.get("kind") == "aggregate"]


class _LostDeals:
    """site-0's round book after the restart: the round's received deals gone from memory
    (the rest of the book as it is: the machine's own state is not what this tests)."""

    def __init__(self, book):
        self._book = book

    def shares(self, r):
        return {}

    def __getattr__(self, name):
        return getattr(self._book, name)


def _restart(monkeypatch, at: str, edit=None) -> dict:
    """site-0 restarts in round 0 just before its `at` step (check: before its check left;
    enter: after its check was stored and sent): its round book lost every received deal
    (what a SIGKILL and `flnode run` again leave in memory) and, at enter, its round state
    too: rebuilt from its stored dealing, then the check step runs again (the stored check
    re-sent, read as ours), as after a real restart. `edit(folder)` first changes the stored
    received deals. Returns what site-0 stored and sent: the files, its counters, the
    dealers its check holds, the detail of its round's outcome."""
    from gossip.bodies import decode_secagg
    from gossip.envelope import decode_outer
    from gossip.protocol import events as ev
    from node.runtime import secure_deals, secure_node

    seen: dict = {}
    original = secure_node.send_phase

    async def send_phase(node, a):
        if node.name != "site-0" or a.round != 0:
            return await original(node, a)
        if a.phase == at:  # the restart
            folder = secure_deals.folder(node)
            seen["stored"] = sorted(p.name for p in folder.glob("*.deal"))
            if edit is not None:
                edit(folder)
            seen["book"] = node.book
            node.book = _LostDeals(node.book)
            node.secure.restored.clear()
            if at != "check":  # the round's state is gone too: rebuilt as release() does
                doc = secure_node.stored_deals(node, 0)
                node.secure.rounds.rounds.pop(0)
                node.secure.rounds.round(0).restore(doc["own"][:2], doc["own"][2])
                await original(node, ev.SendPhase(0, "check", a.peers, {}))
        try:
            await original(node, a)
        finally:
            if a.phase == "check":
                sent = decode_outer(secure_node.step_path(node, 0, "check").read_bytes())
                seen["check_holds"] = decode_secagg(sent.body, 5).held
            seen["counters"] = node.counters.rejected
            seen["detail"] = node.secure.rounds.round(0).out.detail

    monkeypatch.setattr(secure_node, "send_phase", send_phase)
    return seen


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    """The same round without a restart (training seeded, the field sum exact)."""
    out = tmp_path_factory.mktemp("base") / "run"
    return out, _simulate(out)


@pytest.mark.slow  # a 5-member secure round in real nodes (and the baseline once): ~5 s
@pytest.mark.parametrize("at", ["check", "enter"])
def test_a_restarted_member_reloads_its_received_deals_and_the_round_is_unchanged(
        tmp_path, monkeypatch, base, at):
    """Without the stored deals site-0's check holds no dealing and its pieces abstain; with
    them it takes part normally: it enters, nobody is named, every member applies the same
    model, the one of the same round without the restart."""
    base_dir, base = base
    seen = _restart(monkeypatch, at)
    summary = _simulate(tmp_path / "run")
    assert seen["stored"] == [f"round-00000000.site-{i}.deal" for i in range(1, 5)]
    assert seen["counters"].get("stored_deal", 0) == 0
    assert seen["check_holds"] == (1, 2, 3, 4, 5)  # every dealing: none lost to the restart
    assert not seen["detail"].startswith("lost_pieces"), seen["detail"]
    for m in (f"site-{i}" for i in range(5)):
        (agg,) = _aggregates(tmp_path / "run", m)
        (before,) = _aggregates(base_dir, m)
        sec = agg["secure"]
        assert sec["ok"] and not sec["detail"].startswith("lost_pieces"), sec
        assert sec["named"] == {} and "site-0" in sec["entered"], sec
        assert (agg["used"], sec["entered"]) == (before["used"], before["secure"]["entered"])
    assert summary["consortium"]["per_node"] == base["consortium"]["per_node"]
    assert len(set(summary["consortium"]["per_node"].values())) == 1
    # closed: the round's received deals are pruned (only the current round's are kept)
    assert not list((tmp_path / "run" / "state" / "site-0" / "received").glob("*.deal"))


@pytest.mark.slow  # a 5-member secure round in real nodes: ~5 s each
@pytest.mark.parametrize("edit", ["truncated", "other_member", "flipped_byte"])
def test_a_corrupt_stored_deal_is_refused_by_name_and_the_round_completes(
        tmp_path, monkeypatch, caplog, edit):
    """site-3's stored deal hand-edited: refused at the restart naming the file, the dealer
    and why (`stored_deal` counted); site-0's pieces of site-3's dealing take the abstain
    path, the other stored deals are used, and the round completes at every member with one
    model."""
    def change(folder: Path) -> None:
        path = folder / "round-00000000.site-3.deal"
        data = path.read_bytes()
        if edit == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif edit == "other_member":  # site-4's genuine deal to us, filed as site-3's
            path.write_bytes((folder / "round-00000000.site-4.deal").read_bytes())
        else:
            path.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])

    seen = _restart(monkeypatch, "enter", change)
    caplog.set_level(logging.WARNING, logger="flnode.secure")
    summary = _simulate(tmp_path / "run")
    assert seen["counters"]["stored_deal"] == 1
    refused = [r.getMessage() for r in caplog.records if "refusing the stored deal" in
               r.getMessage()]
    assert len(refused) == 1 and "round-00000000.site-3.deal" in refused[0], refused
    assert "from site-3" in refused[0]
    assert seen["check_holds"] == (1, 2, 3, 4, 5)  # the check left before the restart
    assert seen["detail"].startswith("lost_pieces"), seen["detail"]  # today's abstain path
    assert len(set(summary["consortium"]["per_node"].values())) == 1
    for m in (f"site-{i}" for i in range(5)):
        (agg,) = _aggregates(tmp_path / "run", m)
        assert agg["secure"]["ok"], agg["secure"]


def test_a_received_deal_is_stored_within_its_bound_and_earlier_rounds_are_pruned(tmp_path):
    """keep_received (pure file logic, no network): a deal over a deal's bound is not stored
    (counted); one within it is stored byte for byte as it arrived, once; storing a deal of
    round 2 unlinks round 0's (only the rounds the machine still takes deals for stay), and
    a round's close prunes it."""
    from collections import Counter

    from gossip.envelope import KIND_DEAL, Accepted, decode_outer, pack
    from node.runtime import secure_deals
    from node.runtime.state import StateDir
    from tests.helpers import keys

    key = keys(2)[1]
    state = StateDir(tmp_path / "state")
    node = SimpleNamespace(
        name="site-0", state=state, counters=SimpleNamespace(rejected=Counter()),
        consortium=SimpleNamespace(members=[SimpleNamespace(name="site-0"),
                                            SimpleNamespace(name="site-1")]),
        model=torch.nn.Linear(3, 1), book=SimpleNamespace(current=0),
        cfg=SimpleNamespace(gossip=SimpleNamespace(max_envelope_bytes=2000)))

    def deal(r: int, size: int) -> tuple[Accepted, bytes]:
        data = pack(key, b"c" * 32, KIND_DEAL, r, r, b"x" * size)
        return Accepted("site-1", decode_outer(data), None), data

    big, _ = deal(0, 3000)
    secure_deals.keep_received(node, big)
    assert node.counters.rejected["stored_deal_size"] == 1
    assert not secure_deals.deal_path(node, 0, "site-1").exists()
    acc, data = deal(0, 100)
    secure_deals.keep_received(node, acc)
    assert secure_deals.deal_path(node, 0, "site-1").read_bytes() == data
    node.book.current = 2
    acc2, data2 = deal(2, 100)
    secure_deals.keep_received(node, acc2)
    assert sorted(p.name for p in secure_deals.folder(node).iterdir()) == \
        ["round-00000002.site-1.deal"]
    secure_deals.prune(node, 3)
    assert not list(secure_deals.folder(node).iterdir())

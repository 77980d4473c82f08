"""C1 of the issue 22 review, end to end: a real in-process consortium of four sealed
plain nodes (`flnode simulate`'s path: real Node, Verifier, round machine, memory
transport) where site-3 signs, seals and sends a secure-aggregation "deal" with its own
member key instead of its share. Before the fix the deal was filed as site-3's share and
every honest node's aggregation read its missing tensors: each node's task group died.
Now every honest node refuses it (`wrong_kind`, naming site-3) and finishes its rounds."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_a_deal_in_a_plain_consortium_is_refused_and_the_rounds_complete(tmp_path, monkeypatch):
    from rich.console import Console

    from gossip.bodies import SecAgg, encode_secagg
    from gossip.envelope import KIND_DEAL
    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime import sharing

    honest = sharing.pack_share

    async def pack_share(node, r, body):
        data = await honest(node, r, body)
        if node.name != "site-3" or data is None:
            return data
        recipients, _ = node.sealing.recipients(r, list(node.book.still_in(r)))
        sealed = node.signer.seal(r, encode_secagg(SecAgg("deal", (b"x", b"y", b"z"))),
                                  recipients)
        return node._sign(KIND_DEAL, r, sealed)

    monkeypatch.setattr(sharing, "pack_share", pack_share)
    torch.set_num_threads(1)
    summary = simulate(SimulationSpec(dataset="digits", nodes=4, partition="iid", rounds=1,
                                      seed=0, out=tmp_path / "run", seal="on",
                                      round_deadline_s=5.0), console=Console(quiet=True))
    honest_nodes = ("site-0", "site-1", "site-2")
    assert all(summary["rejected_per_node"][m].get("wrong_kind") == 1 for m in honest_nodes), \
        summary["rejected_per_node"]
    assert summary["rounds_done"] == {f"site-{i}": 1 for i in range(4)}, summary["rounds_done"]

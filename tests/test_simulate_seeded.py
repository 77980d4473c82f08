"""Two seeded in-process simulations with privacy off end with the same models.

The cause found (issue 24): every run generated fresh member keys, so the consortium id
changed run to run, and with it everything drawn from the id (a sparse topology's peers:
gossip/topology.py) and the member order the ring and the aggregation sort by (member
keys). On the built-in demo tables the simulator now derives its keys from --seed
(node/rehearsal/simulation/prepare.py `member_identity`), as it already did its noise.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from node.learn.models import get_flat
from node.rehearsal.simulation.prepare import keys_seeded, member_identity, prepare
from node.rehearsal.simulation.run import NOISE_OS, noise_kind, run_consortium
from node.rehearsal.simulation.spec import SimulationSpec


def _spec(out, **kw) -> SimulationSpec:
    base = dict(dataset="default", nodes=6, partition="iid", rounds=3, seed=5, out=out,
                model="logreg", privacy="off", topology="random-out:2")
    return SimulationSpec(**{**base, **kw})


def _final_models(spec: SimulationSpec) -> tuple[str, dict[str, list[float]]]:
    prep = prepare(spec)
    nodes = asyncio.run(run_consortium(spec, prep))
    return prep.consortium.id.hex(), {n.name: get_flat(n.model).tolist() for n in nodes}


def test_two_seeded_runs_under_random_out_end_with_the_same_models(tmp_path):
    """Fails without seeded keys: random-out:2 draws each round's peers from the
    consortium id, which fresh keys change (measured: final models differ every time)."""
    torch.set_num_threads(1)
    logging.getLogger("flnode").setLevel(logging.ERROR)
    id_a, first = _final_models(_spec(tmp_path / "a"))
    id_b, second = _final_models(_spec(tmp_path / "b"))
    assert first == second  # bit for bit: same peers, same order, same sums
    assert id_a == id_b


def test_keys_follow_the_seed_on_demo_tables_and_the_os_on_members_own_files(tmp_path):
    spec = _spec(tmp_path / "a")
    assert keys_seeded(spec) and noise_kind(spec) != NOISE_OS
    same = member_identity(spec, "bank-0").public_key
    assert same == member_identity(_spec(tmp_path / "b"), "bank-0").public_key
    assert same != member_identity(_spec(tmp_path / "a", seed=6), "bank-0").public_key
    assert same != member_identity(spec, "bank-1").public_key
    # --data-dir (the members' own rows): fresh keys from the OS, as its noise is
    own = _spec(tmp_path / "c", data_dir=tmp_path)
    assert not keys_seeded(own) and noise_kind(own) == NOISE_OS
    assert member_identity(own, "bank-0").public_key != member_identity(own, "bank-0").public_key
    # --secure with DP: the sum's noise is the OS's; so are the keys its masks come from
    secure = _spec(tmp_path / "d", secure=True, privacy="record", epsilon=3.0)
    assert not keys_seeded(secure) and noise_kind(secure) == NOISE_OS

"""`flnode simulate --backend ray`: the members' training on Ray actors of a local Ray
head on loopback (one per module), the rest on the driver; a seeded run's summary.json
and round records equal the in-process run's (node/rehearsal/simulation/ray_backend.py)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import ray
import torch

from node.cli import main
from node.rehearsal.simulation.ray_backend import (
    RayBackendError,
    check_reachable,
    probe_head,
    split_address,
)

# A dropout (site-4 never starts) and a straggler (site-1, 199 simulated seconds late:
# past the 120 s deadline): both backends run on the same virtual clock
# (node/rehearsal/simulation/virtual_time.py), so the rounds left without site-1 are the same.
RUN = ["simulate", "--dataset", "digits", "--nodes", "5", "--rounds", "3", "--model", "logreg",
       "--seed", "3", "--privacy", "off", "--absent", "site-4", "--straggler", "site-1:200"]
# Round-record fields that are wall times (each member's training seconds): not a
# contract between backends.
WALL_TIME_FIELDS = ("seconds",)
# One xdist worker runs this module (make test passes --dist loadgroup): one Ray head,
# not one per worker on a 2-core machine.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def local_ray():
    """A Ray head on loopback in this process, 2 CPUs, no dashboard; shut down after."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as ray_backend.py
    ray.init(address="local", include_dashboard=False, num_cpus=2,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _records(run: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted((run / "state").glob("*/metrics.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        out[f.parent.name] = [{k: v for k, v in r.items() if k not in WALL_TIME_FIELDS}
                              for r in lines]
    return out


@pytest.mark.slow  # 25-35 s: an in-process run and a Ray run (4 actor processes start torch)
def test_ray_and_in_process_agree_on_a_seeded_run(tmp_path, local_ray, capsys):
    torch.set_num_threads(1)
    assert main([*RUN, "--out", str(tmp_path / "process")]) == 0
    assert main([*RUN, "--backend", "ray", "--out", str(tmp_path / "ray")]) == 0
    assert "--backend ray: 4 member actors on 1 Ray node(s)" in capsys.readouterr().out
    process = json.loads((tmp_path / "process" / "summary.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert process["history"]  # a run with rounds, not two empty files
    assert set(process) == set(on_ray)
    for key in sorted(process):  # field by field (byte counts too), named if one differs
        assert process[key] == on_ray[key], key
    records, ray_records = _records(tmp_path / "process"), _records(tmp_path / "ray")
    assert sorted(records) == ["site-0", "site-1", "site-2", "site-3"]
    assert len(records["site-0"]) == 3
    assert records["site-0"][0]["closed"] == "deadline"  # without the straggler
    assert records == ray_records


def test_an_address_nobody_listens_at_is_refused_naming_it_at_once(tmp_path, capsys):
    with socket.socket() as s:  # a free loopback port, closed again
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    rc = main([*RUN, "--backend", "ray", "--address", f"127.0.0.1:{port}",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--address 127.0.0.1:{port}: no Ray head answers at 127.0.0.1:{port}" in err
    assert "connection refused" in err
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "o").exists()  # refused before the run directory is written


def test_an_open_port_that_is_not_a_ray_head_is_refused_within_the_bound():
    """ray.init would retry such a port for minutes (measured: over 3 minutes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        check_reachable(address)  # the port answers TCP ...
        t0 = time.monotonic()
        with pytest.raises(RayBackendError, match=f"--address {address}: something listens "
                                                  "there but does not answer as a Ray head"):
            probe_head(address, timeout=3.0)  # ... but no Ray head does
        assert time.monotonic() - t0 < 15


@pytest.mark.slow  # the module's Ray head: 5-16 s to start (loaded machine) when first used
def test_the_probe_accepts_a_real_ray_head(local_ray):
    probe_head(local_ray.get_runtime_context().gcs_address)


@pytest.mark.parametrize("bad", ["nohost", "host:", ":6379", "host:0", "host:70000",
                                 "host:63a79"])
def test_a_malformed_address_is_named(bad):
    with pytest.raises(RayBackendError, match=f"--address '{bad}': expected HOST:PORT"):
        split_address(bad)


def test_address_without_the_ray_backend_is_refused(tmp_path, capsys):
    assert main([*RUN, "--address", "127.0.0.1:6379", "--out", str(tmp_path / "o")]) == 2
    assert "--address: only with --backend ray" in capsys.readouterr().err


@pytest.mark.slow  # the module's Ray head (as above) and an actor
def test_a_dead_actor_fails_its_members_training_naming_the_member(local_ray):
    """A member's actor lost mid-run (its machine gone): the training's future carries a
    RayBackendError naming the member and where its actor ran, not a hang."""
    import contextvars
    import functools

    import numpy as np

    from node.learn.models import build_model
    from node.learn.train import train_local
    from node.rehearsal.simulation.ray_backend import RayTraining
    from node.rehearsal.simulation.run import MEMBER

    executor = RayTraining(local_ray, ["bank-0"])
    try:
        model = build_model("logreg", 4, 2, 8, seed=1)
        X = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
        y = (X[:, 0] > 0).astype(np.int64)
        gen = torch.Generator().manual_seed(0)
        call = functools.partial(contextvars.copy_context().run, train_local, model, X, y,
                                 epochs=1, batch_size=8, lr=0.1, generator=gen)
        token = MEMBER.set("bank-0")
        try:
            before = gen.get_state()
            executor.submit(call).result(timeout=120)  # a live actor trains ...
            assert executor.remote_trainings == 1 and not torch.equal(before, gen.get_state())
            local_ray.kill(executor.actors["bank-0"])
            with pytest.raises(RayBackendError, match=r"bank-0: its training on Ray actor "
                                                      r"\(.+/.+\) failed"):
                executor.submit(call).result(timeout=120)  # ... a dead one says so
        finally:
            MEMBER.reset(token)
    finally:
        executor.shutdown()


def test_without_ray_installed_the_backend_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main([*RUN, "--backend", "ray", "--out", str(tmp_path / "o")]) == 2
    assert "the ray package is not installed here: pip install 'flnode[ray]'" in \
        capsys.readouterr().err


@pytest.mark.slow  # the module's Ray head (as above)
def test_actors_no_node_can_take_are_refused_within_the_bound(local_ray, monkeypatch):
    from node.rehearsal.simulation import ray_backend

    monkeypatch.setattr(ray_backend, "ACTOR_CPUS", 64)  # more than the head's 2 CPUs
    monkeypatch.setattr(ray_backend, "ACTOR_START_TIMEOUT_S", 3.0)
    with pytest.raises(RayBackendError, match="the 2 member actors did not all start "
                                              "within 3 s"):
        ray_backend.RayTraining(local_ray, ["bank-0", "bank-1"])


@pytest.mark.slow  # the module's Ray head (as above) and two actors
def test_members_sharing_an_actor_each_train_on_their_own_rows(local_ray):
    """--members-per-actor 2: three members on two actor processes; each member's
    training on its actor equals the same training here, bit for bit (its own rows, its
    own generator), whichever member shares the process."""
    import contextvars
    import functools

    import numpy as np

    from node.learn.models import build_model, get_flat
    from node.learn.train import train_local
    from node.rehearsal.simulation.ray_backend import RayTraining
    from node.rehearsal.simulation.run import MEMBER

    names = ["bank-0", "bank-1", "bank-2"]
    with pytest.raises(RayBackendError, match="--members-per-actor 0: must be 1"):
        RayTraining(local_ray, names, 0)
    executor = RayTraining(local_ray, names, 2)
    try:
        assert len(executor.pool) == 2
        assert executor.actors["bank-0"] is executor.actors["bank-1"]
        assert executor.actors["bank-2"] is not executor.actors["bank-0"]
        rng = np.random.default_rng(0)
        for i, name in enumerate(names):
            X = rng.normal(size=(24 + 8 * i, 4)).astype(np.float32)  # rows of its own
            y = (X[:, i] > 0).astype(np.int64)
            remote, here = (build_model("logreg", 4, 2, 8, seed=1) for _ in range(2))
            kw = dict(epochs=2, batch_size=8, lr=0.1)
            call = functools.partial(contextvars.copy_context().run, train_local, remote, X, y,
                                     generator=torch.Generator().manual_seed(i), **kw)
            token = MEMBER.set(name)
            try:
                executor.submit(call).result(timeout=120)
            finally:
                MEMBER.reset(token)
            train_local(here, X, y, generator=torch.Generator().manual_seed(i), **kw)
            assert torch.equal(get_flat(remote), get_flat(here)), name
        assert executor.remote_trainings == 3
        assert all(r > 0 for r in executor.actor_rss())
    finally:
        executor.shutdown()


def test_members_per_actor_without_the_ray_backend_is_refused(tmp_path, capsys):
    assert main([*RUN, "--members-per-actor", "4", "--out", str(tmp_path / "o")]) == 2
    assert "--members-per-actor: only with --backend ray" in capsys.readouterr().err

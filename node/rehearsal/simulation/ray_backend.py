"""`flnode simulate --backend ray [--address HOST:PORT]`: members' training on Ray actors.

The driver (the process running `flnode simulate`) keeps what the in-process simulator
runs: every member's Node and round machine, the memory hub between them, and so every
message, its order and every aggregation. Each member's local training, the work of a
round, runs on a Ray actor of its own (`MemberActor`) that holds the member's training
rows: the driver sends the model to train, its shuffling generator and the recipe, and
writes back the trained weights and the generators' states, as if the training had run in
the member's thread. The actors are spread over the cluster's machines (SPREAD).

Why a seeded run gives the in-process run's summary: what a member trains is a pure
function of (model, rows, recipe, generator state), all sent; aggregation sorts the shares
by member (node/strategy/base.py); keys, partitions, shuffles and dropout masks come from
--seed; and both backends run on the same virtual clock (virtual_time.py): a training takes
WORK_S simulated seconds wherever it runs, the clock waiting while an actor works, so every
deadline, straggler and dropout falls at the same simulated time and the events come in
the same order. What differs: wall times only.

Only plain training (privacy off or update-level DP, whose clipping and noise stay on
the driver as a node's do) goes to the actors; record-level DP training and a secure
round's contribution draw OS noise inside the training and run on the driver.

One actor is one Ray worker process (torch loaded: ~200 MB): `members_per_actor` K puts
K members on each actor (member i on actor i // K, each member's rows kept apart, its
trainings run one at a time), so a machine holds hundreds of members, not tens.

`import ray` happens here only (tests/test_lean.py: `flnode` starts without it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch

from gossip.errors import LocalError
from node.learn.train import train_local
from node.rehearsal.simulation.run import MEMBER

# How long `--address` may take to answer a TCP connect before the run is refused: a
# Ray head on a LAN answers in milliseconds; an unreachable host would otherwise leave
# ray.init retrying for minutes.
CONNECT_TIMEOUT_S = 10.0
# How long a Ray head at --address may take to answer as one (its GCS: the cluster id):
# ray.init itself retries an open port that is not a Ray head for minutes; a probe in a
# child process is killed at this bound instead.
PROBE_TIMEOUT_S = 20.0
# The probe: construct a GCS client (it fetches the cluster id) and read one key.
_PROBE = ("import sys, ray._raylet as r; "
          "c = r.GcsClient(address=sys.argv[1]); c.internal_kv_get(b'x', b'flnode', timeout=5)")
# How long the member actors may take to start (each a worker process importing torch:
# 2-5 s alone, tens of seconds for many on a loaded machine) before the run is refused.
ACTOR_START_TIMEOUT_S = 300.0
# A plain executor's threads for what stays on the driver (record-level DP training, a
# secure round's contribution): as many as asyncio's default would use on 2 cores.
DRIVER_THREADS = 4
# The CPU share each member actor reserves: members must all exist at once (a round waits
# for its peers), so an actor may not wait for a whole free CPU; SPREAD spreads them.
ACTOR_CPUS = 0.01
# How long the actors may take to say their resident memory at the end of a run.
RSS_TIMEOUT_S = 30.0
# --members-per-actor: at most this many members share one actor (one process). Far above
# a useful value (a member's rows and one training at a time each); bounds a typo.
MAX_MEMBERS_PER_ACTOR = 10_000


class RayBackendError(LocalError):
    """--backend ray could not start or reach its cluster (the operator's to fix)."""


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT of a Ray head (`ray start --head --port PORT` prints it)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayBackendError(f"--address {address!r}: expected HOST:PORT of a Ray head "
                              "(the address `ray start --head --port PORT` prints)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an --address nothing answers at, within `timeout`, naming why."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        why = (f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
               else (exc.strerror or str(exc)).lower())
        raise RayBackendError(
            f"--address {address}: no Ray head answers at {host}:{port} ({why}): start one "
            f"there with `ray start --head --port {port} --node-ip-address {host}` or correct "
            "the address") from None


def probe_head(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse an --address whose open port is not a Ray head (or not answering as one)
    within `timeout`, instead of letting ray.init retry it for minutes."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RayBackendError(f"--address {address}: something listens there but does not "
                              f"answer as a Ray head within {timeout:g} s (is it the port "
                              "`ray start --head` printed?)") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no error text"])[-1]
        raise RayBackendError(f"--address {address}: not a Ray head this Ray can join: {last}")


@contextlib.contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """The `ray` module connected to a cluster: `address`'s, or a Ray already started in
    this process (the tests'), or a new local one on loopback; shut down on leaving if
    started here."""
    if address is not None:
        check_reachable(address)
        probe_head(address)
    # Ray 2.52 warns at init that a later version will stop overriding accelerator
    # variables when no GPU is asked for; none is, so the future behaviour is taken now
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        import ray  # lean start: ray (~1 s, a cluster) only for --backend ray
    except ImportError:
        raise RayBackendError("--backend ray: the ray package is not installed here: "
                              "pip install 'flnode[ray]' (the same Ray version on every "
                              "machine of the cluster)") from None

    started = False
    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(address="local", include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=True)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayBackendError(f"--address {address or 'local'}: Ray could not connect: "
                                  f"{exc}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class MemberActor:
    """Some members' training on a Ray worker: each member's rows (set once per encoding)
    and train_local on whatever model and generator the driver sends for it."""

    def __init__(self, names: list[str]) -> None:
        torch.set_num_threads(1)  # as the driver (output.py): small models, shared cores
        self.names = names
        self.rows: dict[str, tuple[int, Any, Any]] = {}

    def set_rows(self, name: str, token: int, X: Any, y: Any) -> None:
        # the object store's arrays are read-only; train_local's torch.from_numpy wants
        # them writable (it never writes): a copy, once per encoding
        self.rows[name] = (token, X.copy(), y.copy())

    def where(self) -> str:
        """host/Ray node id (a machine may run more than one Ray node)."""
        import ray  # lean start: in the actor's process, where ray is loaded already

        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"

    def rss(self) -> int:
        """This actor process's resident memory now, bytes (Linux; 0 elsewhere)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def train(self, name: str, token: int, model: torch.nn.Module, kwargs: dict[str, Any]
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        rows = self.rows.get(name)
        if rows is None or rows[0] != token:
            raise RuntimeError(f"{name}: the actor holds no rows for this training "
                               "(the driver sends them before the first)")
        train_local(model, rows[1], rows[2], **kwargs)
        return (model.state_dict(), _dropout_states(model), kwargs["generator"].get_state())


def _dropout_states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each dropout layer's own generator state (node/learn/nets.py seed_dropout)."""
    return {name: m.generator.get_state() for name, m in model.named_modules()
            if isinstance(getattr(m, "generator", None), torch.Generator)}


class RayTraining(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor under --backend ray: `asyncio.to_thread(
    train_local, model, X, y, ...)` from a member's task (run.py MEMBER names it) runs on
    the member's actor; anything else in a driver thread as asyncio's default would."""

    def __init__(self, ray: Any, names: list[str], members_per_actor: int = 1) -> None:
        if not 1 <= members_per_actor <= MAX_MEMBERS_PER_ACTOR:
            raise RayBackendError(f"--members-per-actor {members_per_actor}: must be 1 to "
                                  f"{MAX_MEMBERS_PER_ACTOR}")
        super().__init__(max_workers=DRIVER_THREADS, thread_name_prefix="driver")
        remote = ray.remote(num_cpus=ACTOR_CPUS, scheduling_strategy="SPREAD")(MemberActor)
        self.ray = ray
        groups = [names[i:i + members_per_actor]
                  for i in range(0, len(names), members_per_actor)]
        self.pool = [remote.remote(g) for g in groups]  # one per process
        self.actors = {n: a for g, a in zip(groups, self.pool, strict=True) for n in g}
        self.rows: dict[str, tuple[int, Any]] = {}  # member -> (token, X kept alive)
        self.remote_trainings = 0
        self.last_rss: list[int] = []  # each actor's resident bytes at shutdown
        self.hosts = {n: where for g, where in zip(groups, self._started(), strict=True)
                      for n in g}

    def _started(self) -> list[str]:
        """Each actor's host/Ray node, once every actor runs; a named error if one cannot
        start (its machine cannot import flnode, say) or not within ACTOR_START_TIMEOUT_S
        (no Ray node takes it)."""
        try:
            return self.ray.get([a.where.remote() for a in self.pool],
                                timeout=ACTOR_START_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - Ray's errors, named for the operator
            n = len(self.pool)
            self.shutdown(wait=False)
            if isinstance(exc, self.ray.exceptions.GetTimeoutError):
                raise RayBackendError(
                    f"--backend ray: the {n} member actors did not all start within "
                    f"{ACTOR_START_TIMEOUT_S:g} s (`ray status`: are the cluster's nodes up, "
                    "with room for them?)") from None
            raise RayBackendError(f"--backend ray: a member actor could not start: "
                                  f"{type(exc).__name__}: {str(exc)[-600:]} (is the same "
                                  "flnode installed on every Ray node?)") from None

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        member = MEMBER.get(None)
        if (isinstance(fn, functools.partial) and fn.args and fn.args[0] is train_local
                and member in self.actors and not args and not kwargs):
            return self._train(member, *fn.args[1:], **fn.keywords)
        return super().submit(fn, *args, **kwargs)

    def _train(self, member: str, model: torch.nn.Module, X: Any, y: Any,
               **kw: Any) -> concurrent.futures.Future:
        actor = self.actors[member]
        token = id(X)
        if self.rows.get(member, (None,))[0] != token:  # first round, or rows re-encoded
            actor.set_rows.remote(member, token, X, y)  # an actor runs one caller's calls in order
            self.rows[member] = (token, X)
        self.remote_trainings += 1
        ref = actor.train.remote(member, token, model, kw)
        out: concurrent.futures.Future = concurrent.futures.Future()

        def done(f: concurrent.futures.Future) -> None:
            try:
                state, dropouts, gen = f.result()
                model.load_state_dict(state)
                for name, m in model.named_modules():
                    if name in dropouts:
                        m.generator.set_state(dropouts[name])
                kw["generator"].set_state(gen)
            except Exception as exc:  # noqa: BLE001 - handed to the member's task
                out.set_exception(RayBackendError(
                    f"{member}: its training on Ray actor ({self.hosts.get(member)}) failed: "
                    f"{type(exc).__name__}: {exc}"))
                return
            out.set_result(model)

        ref.future().add_done_callback(done)
        return out

    def actor_rss(self) -> list[int]:
        """Each actor process's resident memory now, bytes."""
        return self.ray.get([a.rss.remote() for a in self.pool], timeout=RSS_TIMEOUT_S)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Kill the actors (the event loop's close calls this), first noting their resident
        memory in `last_rss` if they trained (best effort: the run's figure on the terminal)."""
        if self.pool and self.remote_trainings:
            try:
                self.last_rss = self.actor_rss()
            except Exception:  # noqa: BLE001 - a lost actor: no figure, the run stands
                self.last_rss = []
        for a in self.pool:
            self.ray.kill(a)
        self.pool, self.actors = [], {}
        super().shutdown(wait, cancel_futures=cancel_futures)

"""Running a prepared consortium in one process (the memory hub, one Node per member)
and training the baselines it is compared with (centralized, local-only)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
from typing import Any

import numpy as np
import torch

from gossip.membership import shared_loads
from gossip.transports.base import RateBudget
from gossip.transports.memory import MemoryHub
from node.learn.models import build_model, init_seed_from, set_flat
from node.learn.nets import seed_dropout
from node.learn.train import evaluate, train_local
from node.privacy.mechanisms import NoiseSource, OsNoise, SeededNoise
from node.rehearsal.build import build_rehearsal_node
from node.rehearsal.config import load_rehearsal_config
from node.rehearsal.simulation import virtual_time
from node.rehearsal.simulation.prepare import XY, Prepared, keys_seeded
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.node import Node
from node.runtime.state import Checkpoint, unsynced

# A simulated model's dropout masks come from a generator of its own (node/learn/nets.py
# seed_dropout), seeded training.seed * DROPOUT_STREAM + 1: a stream apart from the
# shuffling's (training.seed itself), repeatable from --seed. Not privacy noise.
DROPOUT_STREAM = 104729  # a prime


def dropout_seed(seed: int) -> int:
    return seed * DROPOUT_STREAM + 1


def train_baseline(spec: SimulationSpec, prep: Prepared, X: np.ndarray, y: np.ndarray,
                   seed: int, own: XY | None = None) -> dict[str, float]:
    """Same model, same initial weights, same recipe, R epochs on X alone; its metrics
    on the test set (and, given `own` rows, under "own" its metrics on them)."""
    model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes, spec.hidden,
                        seed=init_seed_from(prep.consortium), options=spec.model_options)
    seed_dropout(model, dropout_seed(seed))
    train_local(model, X, y, epochs=spec.rounds, batch_size=spec.batch_size, lr=spec.lr,
                generator=torch.Generator().manual_seed(seed))
    out: dict[str, Any] = evaluate(model, *prep.test)
    if own is not None:
        out["own"] = evaluate_rows(model, own)
    return out


def evaluate_rows(model: Any, rows: XY) -> dict[str, float]:
    """evaluate() that also takes no rows (a member that owns none of a test set)."""
    if len(rows[1]) == 0:
        return {"accuracy": float("nan"), "roc_auc": float("nan"), "pr_auc": float("nan")}
    return evaluate(model, *rows)


def model_from_state(spec: SimulationSpec, prep: Prepared, cp: Checkpoint | None) -> Any:
    """A member's final model from its checkpoint (a `flnode run` process's
    `node.runtime.state.Checkpoint`), or None without one."""
    if cp is None:
        return None
    model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes, spec.hidden,
                        seed=init_seed_from(prep.consortium), options=spec.model_options)
    flat = torch.frombuffer(bytearray(cp.model), dtype=torch.float32)
    set_flat(model, flat)
    return model


# What summary.json's "noise" says the members' privacy noise came from.
NOISE_OS = "os"
NOISE_SEEDED = "seeded (demo data: reproducible, not a guarantee)"


def noise_kind(spec: SimulationSpec) -> str:
    """The in-process simulator's noise: reproducible from --seed on a built-in demo
    table; from os.urandom when the rows are the members' own (--data-dir), since noise
    that protects real data must never be predictable from a config seed."""
    # --secure with DP: the sum's noise is drawn from the OS by every node (secure_node.py);
    # the member keys follow the same rule (prepare.py keys_seeded)
    return NOISE_SEEDED if keys_seeded(spec) else NOISE_OS


def noise_for(spec: SimulationSpec, index: int) -> NoiseSource:
    """Member `index`'s noise source in the in-process simulator (see noise_kind)."""
    if noise_kind(spec) == NOISE_OS:
        return OsNoise()
    return SeededNoise(spec.seed * 7919 + index)


# The member whose task is running: set in each member's task (and so in every task and
# asyncio.to_thread call it starts), read by --backend ray's executor (ray_backend.py) to
# send a member's training to its actor.
MEMBER: contextvars.ContextVar[str] = contextvars.ContextVar("simulated_member")


async def run_consortium(spec: SimulationSpec, prep: Prepared,
                         on_round: Any = None, tracker: Any = None,
                         executor: concurrent.futures.Executor | None = None) -> list[Node]:
    """Every present member's Node on one MemoryHub until all end. `tracker`
    (consensus.py's ConsensusTracker) sees each member's model as it closes a round.
    `executor`: the loop's default executor (where asyncio.to_thread runs: local training),
    ray_backend.RayTraining under --backend ray; asyncio's threads without one."""
    if executor is not None:
        asyncio.get_running_loop().set_default_executor(executor)
    # The run directory is the simulation's own: no fsync (node/runtime/state.py unsynced);
    # every member's node reads the one consortium file: parsed once (gossip/membership.py)
    with unsynced(), shared_loads():
        return await _build_and_run(spec, prep, on_round, tracker)


def _as_member(name: str) -> contextvars.Context:
    ctx = contextvars.copy_context()
    ctx.run(MEMBER.set, name)
    return ctx


def simulate_members(spec: SimulationSpec, prep: Prepared, on_round: Any = None,
                     tracker: Any = None,
                     executor: concurrent.futures.Executor | None = None) -> list[Node]:
    """run_consortium on a virtual clock (virtual_time.py): every deadline, hello and
    liveness timer, rehearsed delay and straggler on simulated time that moves only when
    every member waits, so which shares make a round never depends on the host's load."""
    return virtual_time.run(run_consortium(spec, prep, on_round, tracker, executor))


async def _build_and_run(spec: SimulationSpec, prep: Prepared, on_round: Any,
                         tracker: Any) -> list[Node]:
    hub = MemoryHub()
    loop = asyncio.get_running_loop()
    nodes = []
    for i, (name, path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        if name in spec.absent:  # listed, never started
            continue
        cfg = load_rehearsal_config(path)
        # The intake's rate budget on the loop's clock (virtual under simulate_members),
        # as the members' deadlines are: a flooder's refused count does not depend on load
        transport = hub.attach(name, prep.names,
                               max_message_bytes=cfg.gossip.max_envelope_bytes,
                               sender_rate=RateBudget(clock=loop.time))
        # Reproducible noise on the built-in demo tables only; the members' own files
        # (--data-dir) get os.urandom, as a real node (`flnode run`) always does.
        nodes.append(build_rehearsal_node(cfg, transport, noise_for(spec, i)))
        seed_dropout(nodes[-1].model, dropout_seed(cfg.training.seed))
    # Every node's long-lived objects (models, keys, configs, books) out of the collector's
    # sight while the run churns: its full collections re-walked them all, ~7 % of a
    # 300-member run. Unfrozen after, so the run's own garbage is still collected.
    gc.freeze()
    try:
        async with asyncio.TaskGroup() as tg:
            for node in nodes:
                tg.create_task(node.run(on_round if tracker is None else _tracked(
                    node, tracker, on_round)), name=f"node-{node.name}",
                    context=_as_member(node.name))
    finally:
        gc.unfreeze()
    return nodes


def _tracked(node: Node, tracker: Any, on_round: Any) -> Any:
    def report(rep: Any) -> None:
        tracker.seen(node, rep)
        if on_round is not None:
            on_round(rep)
    return report


def baselines(spec: SimulationSpec, prep: Prepared) -> tuple[dict[str, float],
                                                              dict[str, dict[str, float]]]:
    """Centralized (pooled training rows) and each member's local-only model; the latter's
    metrics on the member's own held-out rows under "own"."""
    centralized = train_baseline(spec, prep, *prep.train_all, seed=spec.seed)
    local_only = {name: train_baseline(spec, prep, *prep.train_parts[i], seed=spec.seed + i,
                                       own=prep.own_parts[i] if prep.own_parts else None)
                  for i, name in enumerate(prep.names)}
    return centralized, local_only

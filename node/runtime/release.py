"""Releaser: this member's share for a round: train -> DP -> charge -> body.

Privacy invariants that live here:

- **Charged before released**: every charge of a round is written to the ledger and
  fsync'd (`_charge`) before the share's bytes exist anywhere but in memory: before it
  is stored in the outbox, before the node can broadcast it. A crash never under-counts.
- **The budget is checked twice before anything is charged or sent**: the plan's cost
  before training, what the training actually did (record mode) after it. Over the
  budget: `Stopped`, nothing charged, nothing released.
- **A stored release is re-sent, never re-trained**: after a restart the round's share
  is the outbox's bytes, exactly as first charged and sent (`_stored`); a second draw
  of the noise would release the same data twice under different noise.
- **Nothing non-finite is released**, but the round is charged all the same (the
  mechanism ran on the data; no share coming is an output of it): `NotReleased`.

A round is released in two steps, `train` then `publish(r, trained, body)`, so that a
rehearsal can wrap one of them (node/rehearsal/): `body` says what goes on the wire.

With the consortium's `[rules] compression` (node/runtime/compression.py) `publish`
compresses the released update first (post-processing: after the noise, before the
checks, the charge and the signature); what receivers decode is what the member goes
on from, and top-k's residual is kept only once the release is stored.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gossip import bodies, envelope
from gossip.bodies import TensorSpec
from gossip.compress import NO_COMPRESSION, Compressed
from gossip.envelope import KIND_SEALED
from gossip.errors import LocalError
from node.learn.control import ControlVariates, local_steps, per_parameter
from node.learn.dpsgd import dp_engine, train_local_dp_fast
from node.learn.models import flat_to_named, get_flat
from node.learn.train import round_lr, train_local, train_local_dp
from node.privacy.accountant import LedgerRecord
from node.privacy.budget import PrivacyBudget
from node.privacy.ledger import Ledger
from node.privacy.mechanisms import NoiseSource, privatize_update
from node.runtime import audit
from node.runtime.compression import Compressor, residual_bytes, residual_path, share_vector
from node.runtime.config import NodeConfig
from node.runtime.state import StateDir, atomic_write
from node.strategy import WeightedShare

log = logging.getLogger("flnode.node")


@dataclass(frozen=True)
class Release:
    """Our share for the round, charged (and stored, if `data` is set)."""

    data: bytes | None  # the signed envelope; None: sealing on and nobody to seal for
    own: WeightedShare  # what we released: our model goes on from it
    norm: float | None  # the update's norm as trained (None: re-sent, not trained now)
    resent: bool  # the stored release of a restart, not new training
    # (seq, digest, sig) of the envelope (for the seen reports); None without `data`
    sent: tuple[int, bytes, bytes] | None


@dataclass(frozen=True)
class NotReleased:
    """Local training produced non-finite values: nothing released, the round charged."""

    own: WeightedShare  # the round's start: our model goes on from it
    reason: str


@dataclass(frozen=True)
class Stopped:
    """Releasing the round would exceed the privacy budget: nothing charged or sent."""

    reason: str


Result = Release | NotReleased | Stopped


@dataclass(frozen=True)
class Trained:
    """A round's local training, before anything is checked, charged or sent."""

    start: torch.Tensor  # the model the round started from
    update: torch.Tensor  # released - start (noised in update mode)
    released: torch.Tensor  # what the share carries (honest)
    weight: float  # the weight the share declares
    charges: list[LedgerRecord]  # what releasing it costs
    norm: float  # the update's norm (update mode: after clipping, as released)
    seconds: float  # the training's own time (a rehearsed straggler sleeps a multiple)
    # Compressed (the consortium's rules.compression): the body's items; update and
    # released are then what receivers decode (node/runtime/compression.py)
    encoded: Compressed | None = None


def _unbound(*_: object) -> Any:
    raise LocalError("Releaser used before Node bound it to its rows and signer: a bug")


class Releaser:
    """Train, privatize, charge and sign this member's share for a round."""

    def __init__(self, cfg: NodeConfig, name: str, model: torch.nn.Module,
                 spec: Sequence[TensorSpec],
                 state: StateDir, ledger: Ledger, budget: PrivacyBudget, noise: NoiseSource,
                 control: ControlVariates | None) -> None:
        """Built with the node's other parts (node/runtime/build.py); `model` is the node's
        (changed in place by the round). What only the node knows is given by `bind`."""
        self.cfg = cfg
        self.name = name
        self.model = model
        self.spec = spec
        self.state = state
        self.ledger = ledger
        self.budget = budget
        self.noise = noise
        self.control = control
        self.rows: Callable[[], tuple] = _unbound
        self.norm: Callable[[], bytes | None] = _unbound
        self.pack: Callable[[int, bytes], Awaitable[bytes | None]] = _unbound
        self._shuffle = torch.Generator().manual_seed(cfg.training.seed)
        # The consortium's compression (None: "none"), wired in by node/runtime/build.py
        self.compressor: Compressor | None = None

    def bind(self, rows: Callable[[], tuple], norm: Callable[[], bytes | None],
             pack: Callable[[int, bytes], Awaitable[bytes | None]]) -> None:
        """The node's (Node.__init__): `rows()` the current training rows (X, y) (they
        change once normalization is agreed); `norm()` the agreed normalization's digest
        our shares carry; `pack(r, body)` signs (and seals) a share body, once the round
        machine names the members to seal for."""
        self.rows, self.norm, self.pack = rows, norm, pack

    async def release(self, r: int) -> Result:
        """Our share for round r: the stored one after a restart, else a new one."""
        trained = await self.train(r)
        if not isinstance(trained, Trained):
            return trained
        return await self.publish(r, trained, self.body)

    async def train(self, r: int) -> Trained | Release | Stopped:
        """The stored release of round r (a restart), or the budget's refusal, or a newly
        trained (and, update mode, clipped and noised) share, nothing charged yet."""
        stored = self._stored(r)
        if stored is not None:
            return stored
        pc, tc = self.cfg.privacy, self.cfg.training
        weight, charges = self.budget.weight(r, self.noise)
        if pc.mode != "off":
            over = self.budget.would_exceed(charges + self.budget.next_release(r))
            if over is not None:
                return Stopped(
                    f"privacy budget ε = {pc.epsilon:g} at δ = {pc.delta:g} reached: releasing "
                    f"round {r + 1} would bring ε to {over:.3f}; stopped sharing, serving the "
                    f"round-{r} model for evaluation")
        start = get_flat(self.model)
        local = copy.deepcopy(self.model)
        plan = self.budget.plan
        lr = round_lr(tc.lr, tc.lr_decay, r)  # tc.lr exactly at the default lr_decay = 1
        correction = None
        if self.control is not None:
            self.control.begin(r, start)
            fix = self.control.correction()
            correction = None if fix is None else per_parameter(local, fix)
            self._log_control(r, fix)
        X, y = self.rows()
        trained = time.perf_counter()
        if pc.mode == "record":
            assert plan is not None
            # privacy.recipe = "auto": the plan's pinned epochs, batch size and lr (decayed
            # as training.lr is); "fixed": the training section's, so this is `lr` exactly
            epochs, batch_size, base_lr = self.budget.training(tc.epochs, tc.batch_size, tc.lr)
            kwargs = dict(epochs=epochs, batch_size=batch_size,
                          lr=round_lr(base_lr, tc.lr_decay, r),
                          clip_norm=plan.clip_norm, noise_multiplier=plan.noise_multiplier,
                          prox_mu=tc.prox_mu, correction=correction)
            engine = dp_engine(local, pc.grad_sample_mode)  # Opacus for what "fast" can't take
            if engine == "fast":
                history = await asyncio.to_thread(train_local_dp_fast, local, X, y, **kwargs,
                                                  noise=self.noise)
            else:
                history = await asyncio.to_thread(train_local_dp, local, X, y, **kwargs,
                                                  generator=self.noise.torch_generator(),
                                                  grad_sample_mode=engine)
            charges += [LedgerRecord(r, "record", s, q, n, plan.clip_norm, "")
                        for s, q, n in history]
        else:
            await asyncio.to_thread(train_local, local, X, y,
                                    epochs=tc.epochs, batch_size=tc.batch_size, lr=lr,
                                    generator=self._shuffle, prox_mu=tc.prox_mu,
                                    correction=correction)
        seconds = time.perf_counter() - trained
        update = get_flat(local) - start
        norm = float(torch.linalg.vector_norm(update))
        if pc.mode == "update":
            assert plan is not None
            update, norm = privatize_update(update, plan.clip_norm, plan.noise_multiplier,
                                            self.noise)
            charges += self.budget.next_release(r)
        return Trained(start, update, start + update, weight, charges, norm, seconds)

    def body(self, r: int, t: Trained) -> bytes:
        """The share body that goes on the wire: what we trained, as released."""
        if t.encoded is not None:
            assert self.compressor is not None
            return bodies.encode_compressed_share(self.compressor.codec, t.encoded, t.weight,
                                                  self.norm())
        return bodies.encode_share(flat_to_named(self.model, t.released), t.weight,
                                   self.norm())

    def encode(self, vector: torch.Tensor, start: torch.Tensor, weight: float) -> bytes:
        """A share body for `vector` (a model) with the consortium's compression, without
        error feedback: a rehearsed attack's own body (node/rehearsal/attacks.py)."""
        if self.compressor is None:
            return bodies.encode_share(flat_to_named(self.model, vector), weight, self.norm())
        comp, _ = self.compressor.compress(vector - start)
        return bodies.encode_compressed_share(self.compressor.codec, comp, weight, self.norm())

    async def publish(self, r: int, t: Trained,
                      body: Callable[[int, Trained], bytes]) -> Result:
        """Check, charge (fsync'd), sign and store a trained share; `body(r, t)` is what
        goes on the wire (`self.body` but in a rehearsal)."""
        pc = self.cfg.privacy
        pending = None
        if self.compressor is not None and bool(torch.isfinite(t.released).all()):
            # post-processing of the released update (node/runtime/compression.py); what
            # receivers decode is what we go on from. float16 can overflow: then it is
            # not finite, and not released, below.
            t, pending = self.compressor.apply(t)
        if not bool(torch.isfinite(t.released).all()):
            # Local training diverged (a learning rate too high, a value that overflows
            # float32): nothing non-finite is ever released. The mechanism did run on the
            # data, and the peers see that no share came this round (an output of it):
            # the round is charged all the same, fsync'd before it goes on (over-counting
            # is safe, under-counting never). A noised count charged here is stored, so it
            # is the one later rounds release, not a second draw.
            # "not-released:..." in place of a digest: no share exists
            self._charge(t.charges, "not-released:non-finite", t.weight)
            log.error("%s: round %d: local training produced non-finite parameters (check "
                      "training.lr and the data's ranges); nothing released this round (its "
                      "privacy cost is charged all the same), the round goes on with the "
                      "others' shares", self.name, r + 1)
            return NotReleased(WeightedShare(self.name, t.weight, t.start), "non-finite")
        if pc.mode != "off":
            # The plan's cost was checked before training; record mode charges what the
            # training actually did. Check that too, before anything is charged or sent.
            over = self.budget.would_exceed(t.charges)
            if over is not None:
                return Stopped(
                    f"privacy budget ε = {pc.epsilon:g} at δ = {pc.delta:g} reached: round "
                    f"{r + 1} as trained would bring ε to {over:.3f}; its share is discarded "
                    f"(never released, evaluated or carried on); serving the round-{r} model")
        wire = body(r, t)
        data = await self.pack(r, wire)
        # The ledger names a release by its envelope digest: what the signature covers,
        # and what every receiver writes to its audit log for the share it accepted.
        packed = (envelope.decode_outer(data, self.cfg.gossip.max_envelope_bytes)
                  if data is not None else None)
        digest = packed.digest.hex() if packed is not None else blake(wire)
        # Charged and fsync'd before the bytes exist anywhere but in memory, and also
        # when nobody could be sealed for: our model goes on from this share.
        self._charge(t.charges, digest, t.weight)
        if data is not None:
            if pending is not None and pending.residual is not None:
                # before the release: a restart that re-sends it resumes with this residual
                atomic_write(residual_path(self.state, r), residual_bytes(pending.residual))
            self.state.store_release(r, data, wire if packed.kind == KIND_SEALED else None)
        if pending is not None:
            self.compressor.commit(pending)
        if self.control is not None:  # c_i from what we released (node/learn/control.py)
            self.control.released(r, t.start, t.released, self._step_scale(r))
        return Release(data, WeightedShare(self.name, t.weight, t.released), t.norm, False,
                       None if packed is None else (packed.seq, packed.digest, packed.sig))

    def _stored(self, r: int) -> Release | None:
        """The release stored for round r (charged and sent before a restart), re-sent
        byte for byte: never trained or noised again."""
        stored = self.state.stored_release(r)
        if stored is None:
            return None
        env = envelope.decode_outer(stored, self.cfg.gossip.max_envelope_bytes)
        body = self.state.stored_plain_body(r) if env.kind == KIND_SEALED else env.body
        codec = self.compressor.codec if self.compressor is not None else NO_COMPRESSION
        share = bodies.decode_share(body, self.spec, codec)
        start = get_flat(self.model)  # the round's start: nothing of it is trained yet
        own = WeightedShare(self.name, share.weight,
                            share_vector(self.model, share.tensors, start))
        if self.control is not None:  # as when it was released (node/learn/control.py)
            self.control.begin(r, start)
            self._log_control(r, self.control.correction())
            self.control.released(r, start, own.vector, self._step_scale(r))
        return Release(stored, own, None, True, (env.seq, env.digest, env.sig))

    def _charge(self, charges: list[LedgerRecord], digest: str, weight: float) -> None:
        """Each charge to the ledger (fsync'd), named by `digest` (a count charge also
        keeps what names the weight it released: node/privacy.py), then a noised count
        stored, so later rounds release that one, never a second draw."""
        for record in charges:
            self.ledger.charge(dataclasses.replace(
                record, share_digest=digest if not record.share_digest
                else f"{digest} {record.share_digest}"))
        if any(c.mode == "count" for c in charges):
            self.budget.store_weight(weight)

    def _log_control(self, r: int, fix: torch.Tensor | None) -> None:
        c = self.control
        assert c is not None

        def rnd(x: int | None) -> str:  # 1-based for people
            return "none" if x is None else str(x + 1)
        norm = 0.0 if fix is None else float(torch.linalg.vector_norm(fix))
        log.info("%s: round %d: control variates c from round %s, c_i from round %s, "
                 "|c - c_i| = %.4g", self.name, r + 1, rnd(c.c_round), rnd(c.own_round), norm)
        # Which rounds' released values this round's correction comes from (0-based, as
        # every audit line): what a restart restored from the checkpoint, checkable later.
        audit.write(self.state, audit.Control(r, self.name, c.c_round, c.own_round, norm))

    def _step_scale(self, r: int) -> float:
        """K x lr of round r: the local steps and rate its share was trained with (record
        mode: the privacy plan's, which privacy.recipe = "auto" pins, as in `train`)."""
        tc = self.cfg.training
        epochs, batch_size, lr = tc.epochs, tc.batch_size, tc.lr
        if self.cfg.privacy.mode == "record":
            epochs, batch_size, lr = self.budget.training(epochs, batch_size, lr)
        return local_steps(len(self.rows()[0]), epochs, batch_size) * \
            round_lr(lr, tc.lr_decay, r)


def blake(data: bytes) -> str:
    """The hex BLAKE2b-256 digest the audit log and the seen reports name a message by."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()

"""Rehearsed attacks (`[attack]`, node/rehearsal/config.py AttackConfig): a hostile member
with a valid key, built as wrappers around an honest node's parts (node/rehearsal/build.py).

- Model-level kinds wrap the Releaser (`HostileReleaser`): the member trains, is charged
  and keeps its model exactly as an honest one; only the share body that goes on the wire
  is replaced. Label flip is a transform of its training rows (`flip_labels`).
- In a secure consortium (node/runtime/secure_node.py) no share body goes on the wire: the
  member deals its encoded contribution (the clipped update, or with DP on the sum its
  integer DP-SGD vector). There the model-level kinds wrap the encoding (`HostileCodec`,
  installed on the node's `secure.codec` by node/rehearsal/build.py): the attacked
  contribution is entered into the field as it is, without the honest encoding's bound
  checks (an attacker sends whatever field elements it likes); the secure round's own
  checks (norm bound, distances, the sum's coordinate bound) are what meet it.
- Protocol-level kinds wrap the Signer (`HostileSigner`): a different signed share per
  member (equivocation), every message it signed re-sent (replay), all-zero prekeys, a
  flood of re-signed stale shares.

Never imported by the runtime (node/runtime/node.py, node/runtime/daemon.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
import torch
from nacl.public import PublicKey

from gossip import envelope
from gossip.envelope import KIND_SEALED, KIND_SHARE
from gossip.errors import LocalError
from gossip.seal import encode_announcement, sign_prekey
from gossip.transports.base import Transport
from node.rehearsal.config import AttackConfig
from node.runtime.normalization import LocalData
from node.runtime.release import Releaser, Result, Trained
from node.runtime.signer import Send, Signer

log = logging.getLogger("flnode.node")

# flood: sends in flight at once (enough that it never waits on one ack).
FLOOD_IN_FLIGHT = 256
# replay: the newest signed messages re-sent each round.
REPLAY_KEEP = 32


def flip_labels(n_classes: int):
    """label-flip: every training label c becomes n_classes - 1 - c (binary: swapped);
    the held-out rows keep the real ones."""
    def flip(rows: LocalData) -> LocalData:
        return LocalData(rows.X, (n_classes - 1 - rows.y).astype(rows.y.dtype))
    return flip


class WrappedReleaser:
    """A Releaser's steps, passed through (a rehearsal overrides one of them)."""

    def __init__(self, inner: Releaser | WrappedReleaser) -> None:
        self.inner = inner

    @property
    def model(self) -> torch.nn.Module:
        return self.inner.model

    def norm(self) -> bytes | None:
        return self.inner.norm()

    async def release(self, r: int) -> Result:
        trained = await self.train(r)
        if not isinstance(trained, Trained):
            return trained
        return await self.publish(r, trained, self.body)

    async def train(self, r: int) -> Trained | Result:
        return await self.inner.train(r)

    def body(self, r: int, t: Trained) -> bytes:
        return self.inner.body(r, t)

    def encode(self, vector: torch.Tensor, start: torch.Tensor, weight: float) -> bytes:
        """A body for `vector` in the consortium's compression (Releaser.encode)."""
        return self.inner.encode(vector, start, weight)

    async def publish(self, r: int, t: Trained, body) -> Result:
        return await self.inner.publish(r, t, body)


class HostileReleaser(WrappedReleaser):
    """Model-level kinds: the body released instead of the honest one. The member's own
    model goes on from its honest share (it knows what it sent)."""

    def __init__(self, inner: Releaser | WrappedReleaser, attack: AttackConfig) -> None:
        super().__init__(inner)
        self.attack = attack
        # The last share as trained (start, update, weight): equivocation signs versions
        # of it (HostileSigner).
        self.last: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def vector(self, r: int, t: Trained) -> torch.Tensor:
        a = self.attack
        if a.kind == "sign-flip":
            return t.start - a.value * t.update
        if a.kind == "scale":
            return t.released * a.value
        if a.kind == "noise":
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + r)
            return t.released + a.value * torch.randn(t.released.shape, generator=g)
        if a.kind == "huge":
            return torch.full_like(t.released, 1e30)
        if a.kind == "nan":
            return torch.full_like(t.released, float("nan"))
        return t.released  # weight, label-flip (trained on flipped labels), protocol kinds

    def body(self, r: int, t: Trained) -> bytes:
        a = self.attack
        self.last = (t.start, t.update, t.weight)
        vec = self.vector(r, t)
        declared = a.declared_weight if a.declared_weight is not None else t.weight
        # A scale large enough overflows float32 to inf: then that is what it sends
        # (compressed as the consortium agrees, or its shares would all be refused).
        return self.encode(vec, t.start, declared)


# secure mode, huge: every coordinate of the attacker's contribution this far from zero in the
# field (half the field: the most out-of-range value there is).
SECURE_HUGE = (1 << 60) - 1


class HostileCodec:
    """Model-level kinds in a secure consortium: the node's agreed encoding (FixedPoint
    without DP, IntegerCodec with DP on the sum; `hostile_codec` builds the subclass, so the
    node's own type checks still hold) with the attack applied to our contribution before it
    is entered into the field, and no bound check after. Decoding is the honest codec's.
    The kinds on the contribution c (an update, or a DP-SGD integer vector):

    - sign-flip[=K]: -K c;  scale[=K]: K c (the contribution, not the whole model: a secure
      member sends no model);
    - noise[=SIGMA]: c + noise that moves the consortium's model by N(0, SIGMA^2 / n^2) per
      value, what plain rounds' noise attack does through the mean of n shares
      (`model_units`: encoded units per model unit of one contribution);
    - huge: every coordinate SECURE_HUGE; nan: not encodable in a field, sent as huge;
    - label-flip and the protocol kinds: c unchanged (the rows or the signer carry those).
    """

    attack: AttackConfig
    model_units: float
    draws: list[int]  # noise: contributions drawn so far (a fresh draw each)

    def attacked(self, c: np.ndarray) -> np.ndarray:
        a = self.attack
        if a.kind == "sign-flip":
            return -a.value * c
        if a.kind == "scale":
            return a.value * c
        if a.kind == "noise":
            g = np.random.default_rng(a.seed * 1_000_003 + len(self.draws))
            self.draws.append(1)
            members = self.members  # type: ignore[attr-defined]
            return c + (a.value / members) * self.model_units * g.standard_normal(c.shape)
        return c

    def encode(self, c: np.ndarray) -> np.ndarray:
        from node.secagg.field import P  # lean start: secure mode only

        if self.attack.kind in ("huge", "nan"):
            return np.full(np.asarray(c).size, SECURE_HUGE, dtype=np.uint64)
        if self.attack.kind not in ("sign-flip", "scale", "noise"):
            return super().encode(c)  # type: ignore[misc]
        x = self.attacked(np.asarray(c, dtype=np.float64).reshape(-1))
        scale = getattr(self, "scale", 1.0)  # FixedPoint's 2^s; IntegerCodec: integers
        q = np.clip(np.rint(x * scale), -SECURE_HUGE, SECURE_HUGE).astype(np.int64)
        return np.where(q < 0, q + P, q).astype(np.uint64)


def hostile_codec(codec, attack: AttackConfig, model_units: float):
    """`codec` (a frozen FixedPoint or IntegerCodec) as a HostileCodec of the same type."""
    import dataclasses  # lean start: secure rehearsal only

    cls = type(f"Hostile{type(codec).__name__}", (HostileCodec, type(codec)), {})
    out = cls(**{f.name: getattr(codec, f.name) for f in dataclasses.fields(codec)})
    for key, value in (("attack", attack), ("model_units", model_units), ("draws", [])):
        object.__setattr__(out, key, value)
    return out


def hostile_secure_codec(node, attack: AttackConfig) -> None:
    """Install HostileCodec on a secure node (a no-op for plain rounds). Model units: without
    DP the contribution is an update (aggregate: start + sum / m, so 1 model unit per unit);
    with DP on the sum the step is lr * granularity * q / (expected batch), so one model unit
    is expected_batch / (lr * granularity) integer units. Only our encoding is replaced: the
    round's decoding keeps the honest codec (SecureRounds holds its own reference)."""
    sec = getattr(node, "secure", None)
    if sec is None:
        return
    plan = sec.plan
    units = 1.0 if plan is None else plan.expected_batch / (plan.lr * plan.granularity)
    sec.codec = hostile_codec(sec.codec, attack, units)
    if sec.rounds.range_params is not None:  # variant range: deal a forged witness
        make = sec.rounds.round

        def round_(r: int):
            sr = make(r)
            sr.witness_of = forged_witness
            return sr
        sec.rounds.round = round_


def forged_witness(sr, encoded):
    """Variant range: the honest witness where one exists, else the best a dealer can forge
    (its projections' bits mod 2^L, the slack's mod 2^S), so an out-of-range member deals
    and is caught by the check instead of refusing to deal as an honest node does."""
    from node.runtime import secure_range  # lean start: secure rehearsal only
    from node.secagg import field as F  # lean start: secure rehearsal only
    from node.secagg import range_check as RC  # lean start: secure rehearsal only

    honest = secure_range.dealer_witness(sr, encoded)

    def witness(parts):
        try:
            return honest(parts)
        except RC.OutOfRange:
            rp = sr.rp
            u = RC.projections(rp, secure_range._x_challenge(sr, sr.i))
            y = [v - F.P if v > F.P // 2 else v for v in RC.project(u, encoded).tolist()]
            return np.concatenate([
                RC._bits([(v + rp.offset) % (1 << rp.bits) for v in y], rp.bits),
                RC._bits([(rp.bound_sq - sum(v * v for v in y)) % (1 << rp.slack_bits)],
                         rp.slack_bits)])
    return witness


class HostileSigner:
    """Protocol-level kinds, around the member's Signer: what it signs and sends."""

    def __init__(self, inner: Signer, attack: AttackConfig, releaser: HostileReleaser,
                 transport: Transport) -> None:
        self.inner = inner
        self.attack = attack
        self.releaser = releaser  # the share as trained (equivocation's versions)
        self.transport = transport  # the flood's own sends
        self.signed: list[bytes] = []  # replay: the newest REPLAY_KEEP messages signed
        self._flood: asyncio.Task[None] | None = None

    # the honest signer's state and steps, unchanged
    @property
    def seq(self) -> int:
        return self.inner.seq

    @seq.setter
    def seq(self, value: int) -> None:
        self.inner.seq = value

    @property
    def sealing(self):
        return self.inner.sealing

    def seal(self, r: int, body: bytes, recipients: dict) -> bytes | None:
        return self.inner.seal(r, body, recipients)

    def forget_prekeys(self) -> None:
        self.inner.forget_prekeys()

    def sign(self, kind: str, r: int, body: bytes | Sequence[bytes]) -> bytes:
        data = self.inner.sign(kind, r, body)
        if self.attack.kind == "replay":
            self.signed = [*self.signed[-(REPLAY_KEEP - 1):], data]
        return data

    def rotate_prekeys(self, r: int, announce: bool = False) -> list[bytes]:
        """zero-prekey: announcements whose prekeys are all-zero X25519 keys, properly
        signed (the honest ones are kept on disk as usual)."""
        messages = self.inner.rotate_prekeys(r, announce)
        if not messages or self.attack.kind != "zero-prekey":
            return messages
        sealing = self.inner.sealing
        assert sealing is not None
        ident = self.inner.identity
        zero = [sign_prekey(ident.signing_key, self.inner.consortium_id, e,
                            PublicKey(bytes(32))) for e in sorted(sealing.own.keys)]
        return [encode_announcement(zero, hello=False)] + \
            ([encode_announcement(zero, hello=True)] if announce else [])

    def outgoing(self, r: int, data: bytes, peers: list[str]) -> list[Send] | None:
        """Our share for round r as a hostile member sends it (in order, awaited)."""
        a = self.attack
        if a.kind in ("equivocate", "equivocate-split") and self.releaser.last is not None:
            if len(peers) >= 2:
                start, update, weight = self.releaser.last
                versions = []
                for i, _ in enumerate(peers):  # a different share for each member
                    vec = start + (1.0 + 0.25 * i) * update
                    body = self.releaser.encode(vec, start, weight)
                    versions.append(data if i == 0 else self._pack(r, body, peers))
                split = a.kind == "equivocate-split"
                sends: list[Send] = []
                for i, peer in enumerate(peers):  # its own, then its neighbour's version
                    for v in (versions[i],) if split else (versions[i],
                                                          versions[(i + 1) % len(peers)]):
                        if v is not None:
                            sends.append((peer, v))
                return sends
        sends: list[Send] = [(None, data)]
        if a.kind == "replay":  # every message we signed before, again
            sends += [(None, old) for old in self.signed if old is not data]
        return sends

    def after_send(self, r: int, data: bytes) -> None:
        """flood: from our first share on (once it is out), a flood of copies of it."""
        if self.attack.kind == "flood" and self._flood is None and r == 0:
            env = envelope.decode_outer(data)
            self._flood = asyncio.get_running_loop().create_task(
                self._flood_loop(env.kind, env.body, self.attack.value),
                name=f"{self.inner.name}-flood")

    def close(self) -> None:
        if self._flood is not None:
            self._flood.cancel()
        self.inner.close()

    def _pack(self, r: int, body: bytes, peers: list[str]) -> bytes | None:
        sealing = self.inner.sealing
        if sealing is None:
            return self.sign(KIND_SHARE, r, body)
        recipients, _ = sealing.recipients(r, peers)
        if not recipients:
            return None
        return self.sign(KIND_SEALED, r, sealing.seal(body, r, recipients))

    async def _flood_loop(self, kind: str, body: bytes, rate: float) -> None:
        """flood: our round-0 share (its kind and body), signed with fresh sequence numbers
        (not reserved on disk: an attacker does not care), broadcast at `rate` a second
        with up to FLOOD_IN_FLIGHT sends at once, until the run ends (cancelled with it)."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(FLOOD_IN_FLIGHT)
        start, sent = loop.time(), 0

        async def one(data: bytes) -> None:
            try:
                await self.transport.broadcast(data)
            except LocalError:
                pass  # the transport refused it; a flooder goes on
            finally:
                slots.release()

        async with asyncio.TaskGroup() as tg:
            while True:
                await slots.acquire()
                data = envelope.pack(self.inner.identity.signing_key, self.inner.consortium_id,
                                     kind, 0, self.inner.seq, body)
                self.inner.seq += 1
                tg.create_task(one(data))
                sent += 1
                ahead = sent / rate - (loop.time() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)


"""Compressing this member's share (gossip/compress.py's codecs, torch side) and top-k's
error-feedback residual.

Compression is post-processing of what the privacy mechanism released: it runs on the
trained (record mode) or clipped and noised (update mode) update, after the round is
checked against the budget and before the body is signed (node/runtime/release.py). It
reads nothing but that update, the residual (made of earlier released updates) and the
rounding's uniform numbers, so it changes no ε. The rounding's numbers (int8) are
not privacy noise but come from the OS too; a simulation on demo data, whose privacy
noise is seeded, gets a seeded rounding stream of its own (node/runtime/build.py).

Error feedback (top-k): what a round's share left out is kept and added to the next
round's update, so nothing is lost, only delayed. The residual is part of the
checkpoint (node/runtime/checkpoint.py), and written next to a stored release
(`outbox/round-N.residual`) before the release itself, so a node killed between its
release and its checkpoint resumes with the residual that release left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gossip.compress import Codec, Compressed, Rebased, compress
from gossip.errors import LocalError
from node.learn.models import flat_to_named, named_to_flat
from node.privacy.mechanisms import NoiseSource
from node.runtime.state import RESIDUAL_SUFFIX, StateDir


def share_vector(model: torch.nn.Module, tensors: Mapping[str, np.ndarray],
                 reference: torch.Tensor) -> torch.Tensor:
    """A share's tensors as one flat float32 vector in the model's order. A compressed
    share carries the sender's update (gossip/compress.py `Rebased`): it is read on top of
    `reference`, the round-start model (flat, float32) the caller names, never on what the
    model holds when it is read (the Verifier is given no base: reading it as a model
    raises). An uncompressed share is its own tensors."""
    if isinstance(tensors, Rebased):
        return reference + named_to_flat(model, tensors.deltas)
    return named_to_flat(model, tensors)


@dataclass(frozen=True)
class Pending:
    """A compressed round, not yet released: the residual it leaves (top-k)."""

    residual: torch.Tensor | None


class Compressor:
    """One member's codec and its error-feedback residual (None: none yet, or a codec
    without feedback)."""

    def __init__(self, codec: Codec, model: torch.nn.Module, noise: NoiseSource) -> None:
        if not codec.compressed:
            raise LocalError("Compressor: the codec is none")
        self.codec = codec
        self.model = model
        self.noise = noise
        self.residual: torch.Tensor | None = None

    def _uniform(self, n: int) -> np.ndarray:
        return self.noise.uniform(n).numpy()

    def compress(self, update: torch.Tensor) -> tuple[Compressed, torch.Tensor]:
        """`update` (flat) encoded, and the flat update a receiver decodes from it."""
        comp = compress(self.codec, flat_to_named(self.model, update.detach().float()),
                        self._uniform)
        decoded = torch.cat([torch.from_numpy(np.ascontiguousarray(d)).reshape(-1)
                             for d in comp.decoded])
        return comp, decoded

    def apply(self, trained):
        """A Trained (node/runtime/release.py) as it goes on the wire: its update and
        released model are what receivers decode, `encoded` the body's items; and the
        residual to keep once it is released."""
        update = trained.update
        if self.codec.feedback and self.residual is not None:
            update = update + self.residual
        comp, decoded = self.compress(update)
        pending = Pending(update - decoded if self.codec.feedback else None)
        return dataclasses.replace(trained, update=decoded, released=trained.start + decoded,
                                   encoded=comp), pending

    def commit(self, pending: Pending) -> None:
        if self.codec.feedback:
            self.residual = pending.residual

    # --- the checkpoint's field, and the outbox's residual file -------------------------
    def state(self) -> dict | None:
        if self.residual is None:
            return None
        return {"codec": self.codec.name, "values": residual_bytes(self.residual)}

    def load(self, state: dict | None, source: str) -> str | None:
        """Restore the residual from a checkpoint field; why it was dropped, if it was
        (another codec: a file from before the consortium changed it)."""
        if not state:
            self.residual = None
            return None
        try:
            codec, values = state["codec"], state["values"]
        except (KeyError, TypeError):
            raise LocalError(f"{source}: the residual is not {{codec, values}}") from None
        if codec != self.codec.name or not self.codec.feedback:
            self.residual = None
            return (f"it was kept for compression = {codec!r}, the consortium now agrees "
                    f"{self.codec.name!r}")
        self.residual = residual_from(values, self.model, source)
        return None


def residual_path(state: StateDir, round_: int) -> Path:
    """The residual left by the release stored for round N: outbox/round-N.residual,
    pruned with it (node/runtime/state.py)."""
    return state.outbox_path(round_).with_suffix(RESIDUAL_SUFFIX)


def residual_bytes(residual: torch.Tensor) -> bytes:
    return residual.detach().numpy().astype("<f4").tobytes()


def residual_from(raw: bytes, model: torch.nn.Module, source: str) -> torch.Tensor:
    d = sum(p.numel() for p in model.state_dict().values())
    if not isinstance(raw, bytes | bytearray) or len(raw) != 4 * d:
        raise LocalError(f"{source}: the error-feedback residual is "
                         f"{len(raw) if isinstance(raw, bytes | bytearray) else '?'} bytes, "
                         f"the model's {d} float32 values take {4 * d}")
    values = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(values).all():
        raise LocalError(f"{source}: the error-feedback residual holds NaN or inf")
    return torch.from_numpy(values.copy())

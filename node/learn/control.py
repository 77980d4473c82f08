"""Control variates against client drift, in serverless form (SCAFFOLD-style;
Karimireddy et al. 2020, "SCAFFOLD", option II), `training.control_variates`.

What is kept, by whom. Every member i that turns the option on keeps, for itself:

- c_i, its own control variate (an estimate of its average local gradient);
- c, its estimate of the consortium's average control variate;
- the round start x_p of its last release p and the step scale s_p = K_p η_p of
  that round (K_p local steps, η_p the round's learning rate), until round p's
  aggregate is known.

All four start at zero / empty; they are float32 vectors the size of the model, in
the node's checkpoint (node/runtime/state.py `Checkpoint.control`), so they survive a restart.

The algorithm, round r, member i, x = the model it starts the round from (its
previous aggregate, the `reference` every honest member shares), K = epochs x
ceil(rows / batch_size) local steps at learning rate η = η_r:

1. fold in the previous release p < r: c <- (x_p - x) / s_p. x is round p's result as
   this node combined it (the node adopts the aggregate), so x_p - x is the
   consortium's movement in round p, and c is that movement per own local step.
2. local training on the corrected gradient: each step is w <- w - η (g + c - c_i),
   written as the plain step followed by w <- w - η (c - c_i) (node/learn/train.py,
   node/learn/dpsgd.py); c - c_i is fixed for the whole round.
3. release y_i (after DP noise when DP is on: the released share, never the local
   model before noise), then c_i <- c_i - c + (x - y_i) / (K η) and remember
   (x_p, s_p) = (x, K η) for step 1 of the next round this member trains in.

Why this is SCAFFOLD. In the paper, with every client taking K steps at η, full
participation and the plain mean, the server's c+ = mean_j c_j+ = (x - mean_j y_j)
/ (K η) (the invariant c = mean_j c_j holds from c = c_j = 0 on): exactly step 1,
with the mean of the shares being the round's aggregate. Step 3 is option II as
written. What differs serverless: there is no server to send c, so each member
derives c from the aggregate it computed itself (members that combined the same
shares get the same c up to their own K η), and a receiver cannot divide another
member's displacement by that member's K_j η_j (K_j gives its row count away; it
is never sent). Dividing the consortium's movement by the member's OWN K η instead
says: "the consortium moved this far in one round; per one of my steps that is c".
When members take different numbers of steps this is the FedNova-like choice: each
member is pulled towards the consortium's per-round movement, spread over its own
steps. The result is taken after the consortium's rule, so a share the rule
excluded or trimmed moves nobody's c more than it moved the aggregate (a hostile
member cannot steer every honest member's correction through c). A server
optimizer (`server_opt` in [rules.params]) would make x_p - x its step, not the
rule's movement, so the two are refused together (`for_node`).

Why it costs no privacy. c is computed from x_p and x (previous aggregates: functions
of released shares), c_i from c, x and y_i (our own released share, after the DP
noise in either mode), and K η from our own configuration and the public round
index. Nothing kept across rounds is derived from an un-noised gradient or from the
local model before noise: it is post-processing of released values. In record-level
DP-SGD the correction c - c_i is fixed before the round's first step and depends on
no record of this round, so adding it after the per-example clipping and the noise
is post-processing of each noised step: the clipping, σ and the accountant's charge
are those of plain DP-SGD. In update-level DP the local update (correction included)
is clipped and noised as a whole, as before.

Neutral setting: while c = c_i = 0 (a member's first round with the option on) no
correction is computed at all, so the round is plain training bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gossip.errors import LocalError
from node.privacy.accountant import steps_per_epoch


def local_steps(rows: int, epochs: int, batch_size: int) -> int:
    """K: the local steps one round takes (train_local, DP-SGD: the same count)."""
    return epochs * steps_per_epoch(rows, batch_size)


def per_parameter(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    """A flat vector (node.learn.models.get_flat order) as one tensor per model.parameters()."""
    params = list(model.parameters())
    if len(model.state_dict()) != len(params):
        raise LocalError("control variates need a model whose state is its parameters "
                         "(no buffers)")
    sizes = [p.numel() for p in params]
    if flat.numel() != sum(sizes):
        raise LocalError(f"control variates have {flat.numel()} values but the model has "
                         f"{sum(sizes)}: the checkpoint belongs to another model")
    return [t.reshape(p.shape) for t, p in zip(flat.split(sizes), params, strict=True)]


class ControlError(LocalError, ValueError):
    """Control-variate state that cannot be used (a bad checkpoint, a wrong size)."""


@dataclass
class ControlVariates:
    """One member's control-variate state (module docstring). float32 vectors."""

    c_own: torch.Tensor | None = None  # c_i
    c: torch.Tensor | None = None  # the consortium's, as this member derives it
    c_round: int | None = None  # the round whose aggregate c came from
    own_round: int | None = None  # the last release folded into c_i
    pending_round: int | None = None  # released, its aggregate not yet folded into c
    pending_start: torch.Tensor | None = None  # x of that round
    pending_scale: float | None = None  # K η of that round

    @classmethod
    def for_node(cls, enabled: bool, strategy_params: Mapping[str, Any]
                 ) -> ControlVariates | None:
        """The state a node keeps (None when the option is off); refuses a server optimizer."""
        if not enabled:
            return None
        opt = strategy_params.get("server_opt", "none")
        if opt not in (None, "none"):
            raise LocalError(
                f"training.control_variates = true with the consortium's server_opt = {opt!r}: "
                "the consortium's control variate is the rule's movement in a round, which a "
                "server optimizer's step replaces. Use one of the two (server_opt = \"none\" "
                "in [rules.params], or training.control_variates = false)")
        return cls()

    # -- the round ------------------------------------------------------------------------
    def begin(self, round_: int, start: torch.Tensor) -> None:
        """Round `round_` starts from `start` (this node's previous aggregate): fold the
        pending release's round into c (step 1). A pending round at or after `round_`
        (a re-run of the same round after a restart) is left as it is."""
        if self.pending_round is None or self.pending_round >= round_:
            return
        assert self.pending_start is not None and self.pending_scale is not None
        self._size(start)
        c = (self.pending_start.double() - start.double()) / self.pending_scale
        if bool(torch.isfinite(c.float()).all()):
            self.c, self.c_round = c.float(), self.pending_round
        self.pending_round = self.pending_start = self.pending_scale = None

    def correction(self) -> torch.Tensor | None:
        """c - c_i (flat float32), or None while both are zero (no correction computed)."""
        if self.c is None and self.c_own is None:
            return None
        ref = self.c if self.c is not None else self.c_own
        assert ref is not None
        c = self.c.double() if self.c is not None else torch.zeros_like(ref, dtype=torch.float64)
        ci = self.c_own.double() if self.c_own is not None else torch.zeros_like(c)
        return (c - ci).float()

    def released(self, round_: int, start: torch.Tensor, share: torch.Tensor,
                 scale: float) -> None:
        """Our share for `round_` is `share` (as released), trained from `start` with
        K η = `scale`: c_i <- c_i - c + (start - share) / scale (step 3); round_'s
        aggregate is folded into c when the next round begins."""
        if not (math.isfinite(scale) and scale > 0):
            raise ControlError(f"control variates: step scale K x lr = {scale!r} is not a "
                               "positive number")
        self._size(start)
        self._size(share)
        zero = torch.zeros(start.numel(), dtype=torch.float64)
        ci = self.c_own.double() if self.c_own is not None else zero
        c = self.c.double() if self.c is not None else zero
        new = ci - c + (start.double() - share.double()) / scale
        if bool(torch.isfinite(new.float()).all()):
            self.c_own, self.own_round = new.float(), round_
        self.pending_round, self.pending_start, self.pending_scale = (
            round_, start.detach().float().clone(), float(scale))

    def _size(self, t: torch.Tensor) -> None:
        for name, v in (("c_i", self.c_own), ("c", self.c), ("x_p", self.pending_start)):
            if v is not None and v.numel() != t.numel():
                raise ControlError(f"control variates: {name} has {v.numel()} values but the "
                                   f"model has {t.numel()}: the checkpoint belongs to another "
                                   "model")

    # -- the checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def raw(t: torch.Tensor | None) -> bytes | None:
            return None if t is None else t.numpy().astype("<f4").tobytes()
        return {"c_own": raw(self.c_own), "c": raw(self.c), "c_round": self.c_round,
                "own_round": self.own_round, "pending_round": self.pending_round,
                "pending_start": raw(self.pending_start), "pending_scale": self.pending_scale}

    def load_state_dict(self, d: Any) -> None:
        """Restore `state_dict`'s data, checked (a checkpoint is a file, not trusted);
        nothing is changed unless all of it is valid."""
        def bad(why: str) -> ControlError:
            return ControlError(f"control-variate state in the checkpoint: {why}")
        if not isinstance(d, Mapping):
            raise bad(f"not a mapping: {str(d)[:80]}")
        unknown = set(d) - set(self.state_dict())
        if unknown:
            raise bad(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")

        def vec(key: str) -> torch.Tensor | None:
            b = d.get(key)
            if b is None:
                return None
            if not isinstance(b, bytes) or len(b) % 4 or not b:
                raise bad(f"{key} is not float32 bytes")
            t = torch.frombuffer(bytearray(b), dtype=torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise bad(f"{key} has non-finite values")
            return t

        def rnd(key: str) -> int | None:
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise bad(f"{key} {v!r} is not a round number")
            return v
        c_own, c, start = vec("c_own"), vec("c"), vec("pending_start")
        sizes = {t.numel() for t in (c_own, c, start) if t is not None}
        if len(sizes) > 1:
            raise bad(f"c_i, c and x_p differ in size ({sorted(sizes)})")
        c_round, own_round, pending = rnd("c_round"), rnd("own_round"), rnd("pending_round")
        scale = d.get("pending_scale")
        if pending is not None:
            ok = isinstance(scale, int | float) and not isinstance(scale, bool) \
                and math.isfinite(scale) and scale > 0
            if start is None or not ok:
                raise bad(f"pending round {pending} without its start x_p or a positive "
                          f"step scale (got {scale!r})")
        elif start is not None or scale is not None:
            raise bad("x_p or a step scale without a pending round")
        if (c is None) != (c_round is None) or (c_own is None) != (own_round is None):
            raise bad("a vector without the round it belongs to, or a round without its vector")
        self.c_own, self.c, self.c_round, self.own_round = c_own, c, c_round, own_round
        self.pending_round, self.pending_start = pending, start
        self.pending_scale = None if scale is None else float(scale)

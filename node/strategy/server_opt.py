"""The server optimizer: FedAvgM / FedAdam / FedYogi on the pseudo-gradient
Δ = (the rule's result) - reference, each node keeping its own state (step 6 of the
pipeline in node/strategy/base.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from node.strategy.types import Aggregate, Note, StrategyError, _num

SERVER_OPTS = ("none", "momentum", "adam", "yogi")
SERVER_LR_DEFAULT = {"momentum": 1.0, "adam": 0.01, "yogi": 0.01}


@dataclass
class ServerOptimizer:
    """A step on the pseudo-gradient Δ = (the rule's result) - reference, per node.

    The serverless form of FedAvgM / FedAdam / FedYogi (Reddi et al. 2021, "Adaptive
    Federated Optimization", Algorithm 2, without bias correction, state starting at 0):

    - momentum: m <- β m + Δ; result = reference + η m
      (β = 0, η = 1 is exactly the rule's result, up to float rounding);
    - adam: m <- β1 m + (1 - β1) Δ; v <- β2 v + (1 - β2) Δ²;
      result = reference + η m / (sqrt(v) + τ)
    - yogi: as adam but v <- v - (1 - β2) Δ² sign(v - Δ²).

    η decays with the round when `server_lr_decay` = d < 1: round r (0-based, the
    round number every member shares, not the node's own step count, so members
    that skipped rounds still step alike) uses η d^r. At d = 1 (the default) η is
    used exactly. An adaptive step does not shrink as the updates do (m / sqrt(v) is
    about ±1 per coordinate), so a constant η keeps the model moving by about η per
    coordinate to the last round; the decay lets it settle.

    Adam and yogi have no exactly neutral setting: β1 = β2 = 0 makes the step
    η Δ / (|Δ| + τ), which tends to Δ only as τ = η grows (tests/test_skew.py).

    Privacy: Δ is computed from `reference` (the previous aggregate) and the rule's
    result, both functions of released shares only (our own *released* share, never
    the un-noised local model), so the step and the state m, v kept across rounds are
    DP post-processing: they cost no privacy budget and see no un-noised gradient.
    Deterministic: float64 arithmetic in a fixed order, the state kept (and
    checkpointed) as float32, so members that combined the same shares from the same
    reference with the same state compute the same vector, and a restart from the
    checkpoint continues exactly where an uninterrupted node would be.
    """

    opt: str
    lr: float
    beta1: float
    beta2: float
    tau: float
    decay: float = 1.0  # server_lr_decay: round r steps with lr * decay**r
    m: torch.Tensor | None = None  # float32, the size of the model
    v: torch.Tensor | None = None  # float32 (adam / yogi)
    last_round: int | None = None  # the round the last step was taken in
    steps: int = 0

    @classmethod
    def from_params(cls, rule: str, p: Mapping[str, Any]) -> ServerOptimizer | None:
        """The optimizer `p` asks for (None for "none"); raises StrategyError naming the key."""
        opt = p["server_opt"]
        if opt not in SERVER_OPTS:
            raise StrategyError(f"aggregation {rule!r}: server_opt = {opt!r}: choose one of "
                                f"{', '.join(SERVER_OPTS)}")
        if p["server_lr"] is not None:
            _num(rule, "server_lr", p["server_lr"], lo=0, lo_open=True, hi=1e9)
        _num(rule, "server_momentum", p["server_momentum"], lo=0)
        _num(rule, "server_beta2", p["server_beta2"], lo=0)
        for key in ("server_momentum", "server_beta2"):
            if p[key] >= 1:
                raise StrategyError(f"aggregation {rule!r}: {key} must be below 1 (a decay "
                                    f"factor in [0, 1)), got {p[key]!r}")
        _num(rule, "server_tau", p["server_tau"], lo=0, lo_open=True, hi=1e9)
        _num(rule, "server_lr_decay", p["server_lr_decay"], lo=0, lo_open=True, hi=1)
        if opt == "none":
            return None
        lr = SERVER_LR_DEFAULT[opt] if p["server_lr"] is None else float(p["server_lr"])
        return cls(opt, lr, float(p["server_momentum"]), float(p["server_beta2"]),
                   float(p["server_tau"]), float(p["server_lr_decay"]))

    def step(self, round: int, reference: torch.Tensor, combined: torch.Tensor,
             result: Aggregate) -> torch.Tensor:
        """reference + the optimizer's step on combined - reference (float64 in and out).
        A step whose new state or result would not be finite in float32 is not taken
        (recorded; the state stays as it was)."""
        delta = combined - reference
        n = delta.numel()
        # η exactly at the default decay 1; the round number is public and shared
        lr = self.lr if self.decay == 1 else self.lr * self.decay ** max(int(round), 0)
        if self.m is not None and self.m.numel() != n:
            raise StrategyError(f"the server optimizer state has {self.m.numel()} values but the "
                                f"model has {n}: the checkpoint belongs to another model")
        m = torch.zeros_like(delta) if self.m is None else self.m.double()
        if self.opt == "momentum":
            m = self.beta1 * m + delta
            v = None
            step = lr * m
        else:
            v = torch.zeros_like(delta) if self.v is None else self.v.double()
            m = self.beta1 * m + (1 - self.beta1) * delta
            d2 = delta * delta
            if self.opt == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d2
            else:  # yogi
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            step = lr * m / (v.sqrt() + self.tau)
        m32, v32 = m.float(), None if v is None else v.float()
        out = reference + step
        if not (bool(torch.isfinite(m32).all()) and (v32 is None or bool(torch.isfinite(v32).all()))
                and bool(torch.isfinite(out.float()).all())):
            result.fallbacks.append(Note("server_opt_non_finite", (
                f"the {self.opt} step on this round's update is not finite: kept the rule's "
                "result, the optimizer state unchanged")))
            return combined
        self.m, self.v = m32, v32
        self.last_round, self.steps = round, self.steps + 1
        result.server_opt = {"opt": self.opt, "lr": lr, "steps": self.steps,
                             "update_norm": float(torch.linalg.vector_norm(delta)),
                             "step_norm": float(torch.linalg.vector_norm(step))}
        return out

    def state_dict(self) -> dict[str, Any]:
        def raw(t: torch.Tensor | None) -> bytes | None:
            return None if t is None else t.numpy().astype("<f4").tobytes()
        return {"opt": self.opt, "m": raw(self.m), "v": raw(self.v),
                "last_round": self.last_round, "steps": self.steps}

    def load_state_dict(self, d: Any) -> None:
        """Restore `state_dict`'s data, checked (a checkpoint is a file, not trusted). State
        of another optimizer (the consortium changed `server_opt`) carries nothing over."""
        def bad(why: str) -> StrategyError:
            return StrategyError(f"server optimizer state in the checkpoint: {why}")
        if not isinstance(d, Mapping) or not isinstance(d.get("opt"), str):
            raise bad(f"not a mapping with an 'opt' name: {str(d)[:80]}")
        if d["opt"] != self.opt:
            return
        last, steps = d.get("last_round"), d.get("steps")
        if not (last is None or (isinstance(last, int) and not isinstance(last, bool) and last >= 0)):
            raise bad(f"last_round {last!r} is not a round number")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise bad(f"steps {steps!r} is not a count")

        def vec(key: str, required: bool) -> torch.Tensor | None:
            b = d.get(key)
            if b is None and not required:
                return None
            if not isinstance(b, bytes) or len(b) % 4:
                raise bad(f"{key} is not float32 bytes")
            t = torch.frombuffer(bytearray(b), dtype=torch.float32) if b else torch.zeros(0)
            if not bool(torch.isfinite(t).all()):
                raise bad(f"{key} has non-finite values")
            return t
        m = vec("m", required=False)
        v = vec("v", required=False) if self.opt == "momentum" else None
        if self.opt != "momentum" and m is not None:
            v = vec("v", required=True)
            assert v is not None
            if v.numel() != m.numel() or bool((v < 0).any()):
                raise bad(f"v has {v.numel()} values (m {m.numel()}) or negative ones")
        if m is None and steps:
            raise bad(f"{steps} step(s) recorded but no state m")
        self.m, self.v, self.last_round, self.steps = m, v, last, steps


"""The config of a rehearsal member: a node config plus `[attack]` and `[faults]`.

Only the rehearsal entry points read these sections (`python -m node.rehearsal.member`,
`flnode simulate`, scripts/simulate_network.py); `flnode run` refuses a config that has
either (node/runtime/config.py `NodeConfig`). The simulators write them into the configs of the
members they make hostile or faulty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from node.runtime.config import NodeConfig, _Section, load_config


class FaultsConfig(_Section):
    """[faults]: rehearsal only (the simulators write it; gossip/testing/faults.py).
    A node with this section drops and delays what it receives, on purpose."""

    loss: float = Field(default=0.0, ge=0, lt=1)  # drop each incoming message with this p
    delay_ms: float = Field(default=0.0, ge=0, le=600_000)
    jitter_ms: float = Field(default=0.0, ge=0, le=600_000)
    # "A,B@ROUND:ROUNDS": A and B cut off from the others for ROUNDS rounds from ROUND.
    partition: list[str] = Field(default_factory=list, max_length=100)
    straggle: float = Field(default=1.0, ge=1, le=1000)  # local training this many times slower
    seed: int = Field(default=0, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _partitions(self) -> FaultsConfig:
        # lean start: the fault transport (asyncio, msgpack) only for a config with [faults]
        from gossip.testing.faults import parse_network_partition

        for p in self.partition:
            parse_network_partition(p)
        return self


# Rehearsed attacks ([attack], node/rehearsal/attacks.py): what a hostile member with a valid key
# does, so both simulators can measure what the others' aggregation survives.
# Model-level: they change the share the member releases (its own model is honest).
MODEL_ATTACKS = ("sign-flip", "scale", "noise", "huge", "weight", "nan", "label-flip")
# Protocol-level: they change what the member signs and sends, not the values.
PROTOCOL_ATTACKS = ("zero-prekey", "equivocate", "equivocate-split", "replay")
ATTACKS = MODEL_ATTACKS + PROTOCOL_ATTACKS
# The parameter each kind takes (None: none) and its default.
ATTACK_PARAMS: dict[str, tuple[str, float] | None] = {
    "sign-flip": ("K", 1.0), "scale": ("K", -1000.0), "noise": ("SIGMA", 1.0),
    "weight": ("W", 1e12), "huge": None, "nan": None, "label-flip": None,
    "zero-prekey": None, "equivocate": None, "equivocate-split": None, "replay": None,
    "flood": ("RATE", 2000.0),
}


class AttackConfig(_Section):
    """[attack]: rehearsal only (the simulators write it into an attacker's config).
    A node with this section is a hostile member on purpose; it logs so loudly.

    - sign-flip (param K, default 1): releases start - K x update;
    - scale (K, default -1000): releases K x (start + update), the whole model scaled;
    - noise (SIGMA, default 1): releases start + update + N(0, SIGMA²) per value;
    - huge: every released value is 1e30 (finite);
    - weight (W, default 1e12): declares weight W (with `weight` set, on top of any kind);
    - nan: a share whose values are NaN (signed; every receiver must refuse it);
    - label-flip: trains on flipped labels (class c -> n_classes - 1 - c);
    - zero-prekey: announces a properly signed all-zero X25519 prekey (sealing on);
    - equivocate: a different signed share to each member for the same round, and each
      member also gets its neighbour's version (so the conflict is seen);
    - equivocate-split: a different signed share to each member, each only its own
      (no member holds two: only comparing the seen reports shows it);
    - replay: each round re-sends every message it signed before;
    - flood (RATE messages a second, default 2000): besides its honest shares, from its
      first release on, broadcasts its round-0 share signed again and again with fresh
      sequence numbers (valid, stale: what issue 19's flood sent), as fast as RATE asks
      and its transport takes.

    In a secure consortium the model-level kinds act on the dealt contribution instead
    (node/rehearsal/attacks.py HostileCodec).
    """

    kind: Literal["sign-flip", "scale", "noise", "huge", "weight", "nan", "label-flip",
                  "zero-prekey", "equivocate", "equivocate-split", "replay", "flood"]
    param: float | None = None  # K, SIGMA (the kind's default if not set)
    weight: float | None = Field(default=None, gt=0, le=1e12)  # declared weight, any kind
    seed: int = Field(default=0, ge=0, lt=2**63)  # the noise attack's generator

    @model_validator(mode="after")
    def _param(self) -> AttackConfig:
        spec = ATTACK_PARAMS[self.kind]
        if self.param is not None:
            if spec is None:
                raise ValueError(f"attack kind {self.kind!r} takes no parameter")
            if not math.isfinite(self.param):
                raise ValueError(f"attack param {self.param!r} must be finite")
            if self.kind == "noise" and self.param <= 0:
                raise ValueError("attack noise: SIGMA must be > 0")
            if self.kind == "flood" and not 0 < self.param <= 1e6:
                raise ValueError(f"attack flood: RATE must be in (0, 1e6], got {self.param!r}")
        if self.kind == "weight" and self.param is not None and not 0 < self.param <= 1e12:
            raise ValueError(f"attack weight: W must be in (0, 1e12], got {self.param!r}")
        return self

    @property
    def value(self) -> float:
        """The kind's parameter, or its default."""
        spec = ATTACK_PARAMS[self.kind]
        assert spec is not None
        return self.param if self.param is not None else spec[1]

    @property
    def declared_weight(self) -> float | None:
        """The weight the attacker declares (None: its honest one)."""
        if self.weight is not None:
            return self.weight
        return self.value if self.kind == "weight" else None

    def describe(self) -> str:
        spec = ATTACK_PARAMS[self.kind]
        text = self.kind if spec is None else f"{self.kind}={self.value:g}"
        if self.weight is not None and self.kind != "weight":
            text += f" with declared weight {self.weight:g}"
        return text


class RehearsalNodeConfig(NodeConfig):
    """A node config that may also say how this member misbehaves, on purpose."""

    faults: FaultsConfig | None = None  # drops, delays, partitions, a slow trainer
    attack: AttackConfig | None = None  # this member is hostile on purpose


def load_rehearsal_config(path: str | Path) -> RehearsalNodeConfig:
    """A member's config for a rehearsal: with `[attack]` / `[faults]` if it has them."""
    cfg = load_config(path, RehearsalNodeConfig)
    assert isinstance(cfg, RehearsalNodeConfig)
    return cfg

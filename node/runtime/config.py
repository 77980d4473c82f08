"""NodeConfig: a node's TOML file -> a validated object. Every error names the key.

Relative paths in the file are relative to the file's own directory, so a
run directory can be moved as a whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gossip.errors import LocalError
from gossip.membership import read_toml
from gossip.seal import MAX_ANNOUNCED
from node.learn.kinds import EXTRA_OPTIONS, check_kind, is_plugin, resolve


class _Section(BaseModel):
    # strict: TOML has types, so `epsilon = "3"` (a string) or `rounds = 30.5` is a mistake
    # to name, never a value to coerce (pydantic's lax mode would take "3" as 3.0, "true"
    # as True, 1 as True). An integer still counts as a float. Paths come as strings
    # (LaxPath below).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: object) -> object:
        """TOML `rounds = true` is a typo, not 1: pydantic's lax mode would take it."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation is not bool:
                    raise ValueError(f"{key} = {str(value).lower()}: expected a number, not a "
                                     "boolean")
        return data


# A path in TOML is a string: the one place a coercion (str -> Path) is wanted.
LaxPath = Annotated[Path, Field(strict=False)]


class IdentityConfig(_Section):
    key: LaxPath  # the private key file (0600)


class ConsortiumConfig(_Section):
    path: LaxPath


class DataConfig(_Section):
    path: LaxPath  # CSV or Parquet, read with the consortium's schema
    eval_path: LaxPath | None = None  # held-out rows; else a split of `path`
    eval_fraction: float = Field(default=0.2, gt=0, lt=1)


class ModelConfig(_Section):
    """[model]: the network (node/learn/kinds.py; docs/operate/models.md). `kind` is a
    built-in kind or "package.module:factory" (a plug-in: its code runs at start);
    depth, blocks, norm, groups and dropout are the deeper kinds' options, [model.options]
    a plug-in's. A consortium file with a [model] table pins all of it."""

    kind: str = "mlp"
    hidden: int = Field(default=64, ge=1, le=65536)
    depth: int | None = None  # deep_mlp: hidden blocks (node/learn/kinds.py)
    blocks: int | None = None  # res_mlp: residual blocks
    norm: str | None = None  # deep_mlp, res_mlp: "layer" (default), "group" or "none"
    groups: int | None = None  # norm = "group": GroupNorm's groups (divides hidden)
    dropout: float | None = None  # deep_mlp, res_mlp: in [0, 1)
    options: dict[str, Any] = Field(default_factory=dict)  # a plug-in's keyword arguments

    @field_validator("kind")
    @classmethod
    def _kind(cls, kind: str) -> str:
        return check_kind(kind)

    def extra(self) -> dict[str, Any]:
        """The options besides kind and hidden, as given (a plug-in's: [model.options])."""
        if is_plugin(self.kind):
            return dict(self.options)
        if self.options:
            raise ValueError(f"options: [model.options] is a plug-in's; {self.kind} takes "
                             f"{', '.join(EXTRA_OPTIONS)} as keys of [model]")
        return {k: getattr(self, k) for k in EXTRA_OPTIONS if getattr(self, k) is not None}

    def resolved(self) -> dict[str, Any]:
        """The complete options the network is built from (and a consortium pins)."""
        plugin_hidden = "hidden" in self.model_fields_set and is_plugin(self.kind)
        return resolve(self.kind, self.hidden if plugin_hidden or not is_plugin(self.kind)
                       else None, self.extra())

    @model_validator(mode="after")
    def _options(self) -> ModelConfig:
        self.resolved()  # a ValueError names the option
        return self


class TrainingConfig(_Section):
    rounds: int = Field(default=30, ge=1, le=1_000_000)
    epochs: int = Field(default=1, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    lr: float = Field(default=0.05, gt=0, le=100)
    seed: int = Field(default=0, ge=0, lt=2**63)  # shuffling; never privacy noise
    # FedProx: mu/2 ||w - w_start||^2 added to the local loss (0: off); node/train.py
    prox_mu: float = Field(default=0.0, ge=0, le=1e6, allow_inf_nan=False)
    # Round r's (0-based) learning rate is lr * lr_decay**r (1: constant); node/train.py
    lr_decay: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    # SCAFFOLD-style control variates kept by this member; node/control.py
    control_variates: bool = Field(default=False, strict=True)  # a TOML true/false only


class PrivacyConfig(_Section):
    """What is protected, and how much budget it may spend.

    - `off`: no differential privacy (say so, don't fake it with sigma = 0).
    - `update`: each round's whole update is clipped to `clip` and noised with
      sigma * clip: protects the institution's contribution per round.
    - `record`: DP-SGD (Opacus): per-example clipping to `clip`, Poisson
      sampling, noise sigma * clip per step: protects each record.

    Give either `epsilon` (the total budget over the planned rounds, at
    `delta`; sigma is calibrated once, up front) or `sigma` directly.
    """

    mode: Literal["off", "update", "record"] = "update"
    clip: float = Field(default=1.0, gt=0)
    sigma: float | None = Field(default=None, ge=0)
    epsilon: float | None = Field(default=None, gt=0, le=1000)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    # Record mode never sends the exact row count: "noised" sends the count
    # plus Gaussian noise of std count_sigma once (charged to the ledger) and
    # reuses it; "uniform" gives every member weight 1 and leaks nothing; "auto"
    # (the default) is "noised" only where the consortium's rule weighs shares by
    # their declared weight (the plain mean), else "uniform": a rule that counts
    # every share once (every robust rule, the default one too) never reads it, so
    # it is neither released nor charged. Resolved once, pinned in the privacy plan.
    weight: Literal["auto", "noised", "uniform"] = "auto"
    count_sigma: float = Field(default=10.0, gt=0)
    # DP-SGD engine: "fast" = node.dpsgd (Linear/ReLU models, closed-form
    # per-example norms); the others are Opacus' grad_sample modes.
    grad_sample_mode: Literal["fast", "hooks", "functorch", "ew"] = "fast"
    # Record mode's DP-SGD recipe: "fixed" uses the training section's batch_size, lr
    # and epochs as given; "auto" chooses them from this member's rows and budget
    # (node/recipe.py), once, pinned in the privacy plan at first start.
    recipe: Literal["fixed", "auto"] = "fixed"

    @model_validator(mode="after")
    def _noise(self) -> PrivacyConfig:
        if self.mode == "off":
            return self
        if self.sigma is not None and self.epsilon is not None:
            raise ValueError("give privacy.epsilon (a total budget; sigma is then calibrated) "
                             "or privacy.sigma, not both")
        if self.sigma is None and self.epsilon is None:
            raise ValueError(f"privacy.mode = \"{self.mode}\" needs privacy.epsilon (a total "
                             "budget over the run) or privacy.sigma (a noise multiplier)")
        if self.sigma == 0:
            raise ValueError("privacy.sigma = 0 gives no privacy; use mode = \"off\" to say so")
        if self.recipe == "auto" and self.mode != "record":
            raise ValueError(f"privacy.recipe = \"auto\" chooses DP-SGD's batch size and "
                             f"learning rate: it needs mode = \"record\", not \"{self.mode}\"")
        return self


class MqttConfig(_Section):
    """[gossip.mqtt]: only read when gossip.transport = "mqtt"."""

    # mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; default: this member's
    # addresses.mqtt in the consortium file.
    broker: str | None = None
    username: str | None = None  # default: the member name (what scripts/mqtt_broker.py uses)
    password_file: LaxPath | None = None  # one line, the password; 0600
    ca_file: LaxPath | None = None  # PEM CA bundle for mqtts://; default: the system's
    # The broker's packet limit if it does not advertise one (MQTT 5 CONNACK).
    max_packet_bytes: int | None = Field(default=None, ge=1024, le=2**31)
    # Plain mqtt:// to a broker that is not on loopback is refused unless set.
    allow_plaintext: bool = False


def quorum(min_members: int | str, members: int) -> int:
    """The members (us included) gossip.min_members asks for before round 1, in a
    consortium of `members`: "majority" is members // 2 + 1."""
    return members // 2 + 1 if min_members == "majority" else int(min_members)


def seals(seal: str, transport: str) -> bool:
    """Whether gossip.seal means sealing on this transport ("auto": on for mqtt only)."""
    return seal == "on" or (seal == "auto" and transport == "mqtt")


class GossipConfig(_Section):
    transport: Literal["memory", "libp2p", "mqtt"] = "libp2p"
    round_deadline_s: float = Field(default=60.0, gt=0, le=86_400)
    # Rounds ahead of ours whose shares we buffer; further ahead means we are
    # behind and skip forward.
    lookahead: int = Field(default=3, ge=1, le=100)
    # A member whose share has not come by this many round deadlines in a row is not
    # waited for until it is heard from again (any authentic, fresh message).
    absent_after: int = Field(default=1, ge=1, le=1_000_000)
    # Round 1 starts only once this many members (ourselves included) are up (their
    # hello heard), without a time limit: "majority" (the default: more than half of
    # the consortium's members, so a node up first never trains and releases round 1,
    # spending ε, alone), a number, or 0: no quorum, start at once (the simulators,
    # which start every member together). A restarted node always waits up to one
    # round deadline for a majority's hello to join the round they are in.
    min_members: Annotated[int, Field(ge=0, le=100_000)] | Literal["majority"] = "majority"
    # normalize = "federated" (the schema): how long to wait before round 1 for every
    # member's statistics; without all of them by then the node stops with an error
    # naming who is missing (every member must combine the same messages).
    normalize_wait_s: float = Field(default=300.0, gt=0, le=86_400)
    # The consortium file's [rules] say how shares are combined (node/rules.py); this
    # is only for a consortium file without them (and must not contradict them).
    aggregation: str | None = None
    max_envelope_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=2**31)
    # End-to-end sealing of shares to the members' rotated prekeys (gossip/seal.py).
    # "auto": on for mqtt (a broker relays the bytes), off for libp2p (Noise
    # already encrypts each hop, and there is no relay) and memory. Every member
    # of a consortium must agree: a sealing node refuses plain shares.
    seal: Literal["auto", "on", "off"] = "auto"
    # Prekeys rotate every this many rounds; a prekey is deleted once the
    # rounds it served are closed (forward secrecy for recorded traffic).
    prekey_rotate_rounds: int = Field(default=5, ge=1, le=1_000_000)
    mqtt: MqttConfig = MqttConfig()

    @property
    def sealed(self) -> bool:
        return seals(self.seal, self.transport)

    @model_validator(mode="after")
    def _rule(self) -> GossipConfig:
        if self.aggregation is not None:
            from node.strategy import RULE_NAMES  # lean start: imports torch; only when a rule is named

            if self.aggregation not in RULE_NAMES:
                raise ValueError(f"aggregation {self.aggregation!r}: choose one of "
                                 f"{', '.join(RULE_NAMES)}")
        live = -(-self.lookahead // self.prekey_rotate_rounds) + 1
        if self.sealed and live > MAX_ANNOUNCED:
            raise ValueError(f"prekey_rotate_rounds = {self.prekey_rotate_rounds} with lookahead = "
                             f"{self.lookahead} needs {live} live prekeys (at most "
                             f"{MAX_ANNOUNCED}): rotate less often or look ahead less")
        return self


# Sections only a rehearsal reads (node/rehearsal/config.py), and what they make a node do.
REHEARSAL_SECTIONS = {"attack": "attack the consortium (a hostile member)",
                      "faults": "drop, delay or cut off what it receives, or train slower"}


class NodeConfig(_Section):
    state_dir: LaxPath
    identity: IdentityConfig
    consortium: ConsortiumConfig
    data: DataConfig
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig  # required: a node states what it protects
    # Keep every released envelope in outbox/ (an audit that wants the bytes, not only
    # their digests in the ledger): one whole share per round, forever. Off: only the
    # release of the round in progress is kept (a restart re-sends it).
    keep_releases: bool = False
    gossip: GossipConfig = GossipConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_rehearsal(cls, data: object) -> object:
        """A production node never acts as a hostile or faulty member: a config with a
        rehearsal section (copied from a simulator's run, say) is refused, naming it and
        the entry points that rehearse (node/rehearsal/config.py RehearsalNodeConfig)."""
        if isinstance(data, dict) and cls.model_fields.keys().isdisjoint(REHEARSAL_SECTIONS):
            for section in REHEARSAL_SECTIONS:
                if section in data:
                    raise ValueError(
                        f"[{section}] is a rehearsal section: a node run with it would "
                        f"{REHEARSAL_SECTIONS[section]} on purpose, so `flnode run` refuses "
                        "it. Remove it to run this member; to rehearse, use `python -m "
                        "node.rehearsal.member --config FILE`, `flnode simulate` or "
                        "scripts/simulate_network.py")
        return data


def _key_path(loc: tuple[object, ...]) -> str:
    return ".".join(str(x) for x in loc if not str(x).startswith("function-"))


def validate_config(doc: dict, source: str, model: type[NodeConfig] = NodeConfig) -> NodeConfig:
    """`model`: NodeConfig, or a rehearsal's subclass of it (node/rehearsal/config.py)."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = _key_path(err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (a typo?)"
            elif err["type"].endswith("_type") and isinstance(err.get("input"), str):
                # strict mode (_Section): a quoted number or boolean in the TOML
                msg += f", not the string {err['input'][:40]!r} (write it without quotes)"
            elif err["type"] == "int_type" and isinstance(err.get("input"), float):
                msg += f", not {err['input']!r}"
            lines.append(f"{source}: {key}: {msg}")
        raise LocalError("\n".join(lines)) from None


def load_config(path: str | Path, model: type[NodeConfig] = NodeConfig) -> NodeConfig:
    path = Path(path)
    cfg = validate_config(read_toml(path, "node config"), str(path), model)
    base = path.parent

    def rel(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    return cfg.model_copy(update={
        "state_dir": rel(cfg.state_dir),
        "identity": cfg.identity.model_copy(update={"key": rel(cfg.identity.key)}),
        "consortium": cfg.consortium.model_copy(update={"path": rel(cfg.consortium.path)}),
        "data": cfg.data.model_copy(update={"path": rel(cfg.data.path),
                                            "eval_path": rel(cfg.data.eval_path)}),
        "gossip": cfg.gossip.model_copy(update={"mqtt": cfg.gossip.mqtt.model_copy(update={
            "password_file": rel(cfg.gossip.mqtt.password_file),
            "ca_file": rel(cfg.gossip.mqtt.ca_file)})}),
    })

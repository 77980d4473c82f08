"""What one simulated run is: SimulationSpec (every setting of `flnode simulate` and
scripts/simulate_network.py), the member names it implies and its attackers' [attack]
sections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from node.rehearsal.config import ATTACK_PARAMS, AttackConfig
from node.strategy.consortium_rules import DEFAULT_RULE

MEMBER_PREFIX = {"default": "bank", "churn": "telco", "digits": "site"}
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class SimulationSpec:
    dataset: str
    nodes: int
    partition: str
    rounds: int
    seed: int
    out: Path
    model: str = "mlp"  # a kind of node/learn/kinds.py (the scenario file's [model] kind)
    hidden: int = 64
    # The kind's other options as a node config's [model] gives them: depth, blocks, norm,
    # groups, dropout; a plug-in's [model.options]. Kinds other than logreg and mlp are
    # pinned in the consortium file's [model] table (prepare).
    model_options: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    privacy: str = "off"
    clip: float = 1.0
    sigma: float | None = 1.0
    epsilon: float | None = None  # total budget per member; sigma is then calibrated
    delta: float = 1e-5
    weight: str = "auto"  # record mode: "auto", "noised" or "uniform" (privacy.weight)
    recipe: str = "fixed"  # record mode's privacy.recipe: "fixed" or "auto" (node/privacy/recipe.py)
    network_config: Path | None = None
    round_deadline_s: float = 120.0
    transport: str = "memory"
    seal: str = "auto"  # gossip.seal for every node: auto (on for mqtt), on, off
    keep_releases: bool = False  # keep every released envelope in outbox/ (audits, tests)
    # Rehearsed faults (node.cli.add_fault_flags; gossip/testing/faults.py)
    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    net_partitions: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()  # listed members that never start
    stragglers: tuple[tuple[str, float], ...] = ()
    # The consortium's [rules] (node/strategy/consortium_rules.py); None: the documented default
    aggregation: str = DEFAULT_RULE
    f: int | None = None
    max_weight_fraction: float | None = None
    aggregation_params: Mapping[str, Any] = field(default_factory=dict)
    compression: str = "none"  # rules.compression: none, fp16, int8, topk:F (gossip/compress.py)
    # [rules] echo: the digest echo (gossip/protocol/echo.py); None (--echo off): no key
    echo: bool | None = True
    # [rules] secure (issue 22, node/runtime/secure_node.py): secure aggregation; its t (None:
    # the largest with n >= 3t + 1) and selection ("multi-krum", "norm" or "sum"; None: the
    # default for n and t, "sum" with DP)
    secure: bool = False
    secure_threshold: int | None = None
    secure_select: str | None = None
    # rounds came from --rounds or the scenario file (not the default): with --secure and
    # DP the consortium's plan picks the rounds, and prepare refuses a given count it overrides
    rounds_given: bool = False
    topology: str = "full"  # rules.topology: full, ring, k-regular:K, ... (gossip/topology.py)
    prox_mu: float = 0.0  # every member's training.prox_mu (FedProx; 0: off)
    lr_decay: float = 1.0  # every member's training.lr_decay (round r: lr * lr_decay**r)
    control_variates: bool = False  # every member's training.control_variates (SCAFFOLD)
    # Rehearsed attacks: "KIND[=PARAM]:MEMBER[,MEMBER...]" (node.cli.add_attack_flag);
    # the members named get an [attack] section (node.rehearsal.config.AttackConfig)
    attacks: tuple[str, ...] = ()
    # The members' own files instead of a built-in table (--data-dir; see read_data_dir):
    # one CSV/Parquet per member, `nodes` and `partition` then do not apply.
    data_dir: Path | None = None
    label: str | None = None  # the label column (default: the schema's, else "label")
    schema_path: Path | None = None  # the consortium's filled schema; else drafted (pooled)
    test_path: Path | None = None  # a common test set; else DIR/test.csv|parquet if present

    @property
    def source(self) -> str:
        """What the members' rows are: the built-in table's name or the data dir's."""
        return self.data_dir.name if self.data_dir is not None else self.dataset

    def faults_for(self, name: str) -> dict | None:
        """The [faults] section of member `name`'s config (None: no faults)."""
        straggle = dict(self.stragglers).get(name, 1.0)
        if not (self.loss or self.delay_ms or self.jitter_ms or self.net_partitions
                or straggle != 1.0):
            return None
        return {"loss": self.loss, "delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms,
                "partition": list(self.net_partitions), "straggle": straggle, "seed": self.seed}

    def attackers(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Member -> its [attack] section (only the members that attack)."""
        return parse_attacks(self.attacks, names, self.seed)

    @property
    def node_seal(self) -> str:
        """gossip.seal as every node's config has it (prepare): a secure round seals each
        member's pieces to their recipient, so --secure runs sealed whatever --seal says."""
        return "on" if self.secure else self.seal

    def present(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.absent]


ATTACK_SYNTAX = "KIND[=PARAM]:MEMBER[,MEMBER...] (or KIND:PARAM:MEMBERS)"


def parse_attacks(specs: tuple[str, ...] | list[str], names: list[str],
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """--attack values -> member -> [attack] section. One kind per member, except that
    `weight` combines with any other kind (the other kind's share, declared with W)."""
    out: dict[str, dict[str, Any]] = {}
    for text in specs:
        head, sep, members = text.rpartition(":")
        if not sep or not head or not members:
            raise LocalError(f"--attack {text!r}: expected {ATTACK_SYNTAX}")
        kind, eq, param = head.partition("=")
        if not eq and ":" in kind:  # KIND:PARAM:MEMBERS
            kind, _, param = kind.partition(":")
            eq = "="
        if kind not in ATTACK_PARAMS:
            raise LocalError(f"--attack {text!r}: no attack kind {kind!r}; choose one of "
                             f"{', '.join(ATTACK_PARAMS)}")
        value: float | None = None
        if eq:
            if ATTACK_PARAMS[kind] is None:
                raise LocalError(f"--attack {text!r}: {kind} takes no parameter")
            try:
                value = float(param)
            except ValueError:
                raise LocalError(f"--attack {text!r}: {ATTACK_PARAMS[kind][0]} must be a "
                                 f"number, got {param!r}") from None
        for name in members.split(","):
            if name not in names:
                raise LocalError(f"--attack {text!r}: no such member {name!r}; the members "
                                 f"are {names}")
            section: dict[str, Any] = {"kind": kind, "seed": seed * 7919 + names.index(name)}
            if value is not None:
                section["param"] = value
            prev = out.get(name)
            if prev is not None:  # weight combines with another kind
                if (prev["kind"] == "weight") == (kind == "weight"):
                    raise LocalError(f"--attack {text!r}: {name} already attacks with "
                                     f"{prev['kind']}; a member has one kind (plus weight)")
                w, other = (section, prev) if kind == "weight" else (prev, section)
                section = {**other, "weight": w.get("param", ATTACK_PARAMS["weight"][1])}
            try:
                AttackConfig.model_validate(section)
            except ValueError as exc:
                raise LocalError(f"--attack {text!r}: {exc}") from None
            out[name] = section
    return out

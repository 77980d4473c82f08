"""`flnode simulate`: a whole consortium in one process on the memory transport.

Everything a real member does happens here too — key files, a consortium
file, node configs on disk, parquet data files, signed envelopes verified on
arrival — only the network is an in-process hub. Same seed, same run: the
split, the partitions, shuffling and, on a built-in demo table only, the privacy
noise all derive from `--seed`. On the members' own files (`--data-dir`) the
noise comes from os.urandom, as a real node's does: summary.json's "noise" says
which.

The rows come from a built-in table (split, partitioned) or from the members'
own files (`--data-dir`: one file per member, read in place by its node; each
holds out its rows as a node without data.eval_path does). A run's settings come
together in `build_spec`: defaults, a scenario file, the flags typed. Both
simulators (this one and scripts/simulate_network.py) report, per member, its
local-only and consortium models on its own held-out rows (`own_rows`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch

from gossip.errors import LocalError
from gossip.membership import (
    Consortium,
    Member,
    check_member_name,
    read_toml,
    save_consortium,
)
from gossip.transports.memory import MemoryHub
from node.data import FeatureSchema, encode, fit_schema, load_demo, member_split, partition
from node.identity import Identity, save_identity
from node.models import build_model, init_seed_from
from node.privacy import ACCOUNTANT, NoiseSource, OsNoise, SeededNoise
from node.rehearsal.build import build_rehearsal_node
from node.rehearsal.config import ATTACK_PARAMS, AttackConfig, load_rehearsal_config
from node.rules import DEFAULT_RULE, build_strategy, pin_rules, rules_table
from node.runtime.config import seals
from node.runtime.node import Node
from node.state import Checkpoint
from node.train import evaluate, metric_name, train_local

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
    model: str = "mlp"
    hidden: int = 64
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    privacy: str = "off"
    clip: float = 1.0
    sigma: float | None = 1.0
    epsilon: float | None = None  # total budget per member; sigma is then calibrated
    delta: float = 1e-5
    weight: str = "auto"  # record mode: "auto", "noised" or "uniform" (privacy.weight)
    recipe: str = "fixed"  # record mode's privacy.recipe: "fixed" or "auto" (node/recipe.py)
    network_config: Path | None = None
    round_deadline_s: float = 120.0
    transport: str = "memory"
    seal: str = "auto"  # gossip.seal for every node: auto (on for mqtt), on, off
    keep_releases: bool = False  # keep every released envelope in outbox/ (audits, tests)
    # Rehearsed faults (node.cli.add_fault_flags; gossip/transports/faults.py)
    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    net_partitions: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()  # listed members that never start
    stragglers: tuple[tuple[str, float], ...] = ()
    # The consortium's [rules] (node/rules.py); None: the documented default
    aggregation: str = DEFAULT_RULE
    f: int | None = None
    max_weight_fraction: float | None = None
    aggregation_params: Mapping[str, Any] = field(default_factory=dict)
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

    def present(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.absent]


# --- one spec from a scenario file and the command line ------------------------------

# argparse dest -> SimulationSpec field, where the flag is the field under another name
# (the fault, rules and attack flags are parsed by node.cli's *_fields helpers).
_RENAMED = {"network_config": "network_config", "data_dir": "data_dir", "schema": "schema_path",
            "test": "test_path", "round_deadline": "round_deadline_s"}
_PATHS = ("network_config", "data_dir", "schema_path", "test_path", "out")
_PARSED = {"loss": ("loss",), "delay": ("delay_ms", "jitter_ms"),
           "net_partition": ("net_partitions",), "absent": ("absent",),
           "straggler": ("stragglers",), "aggregation": ("aggregation",), "f": ("f",),
           "max_weight_fraction": ("max_weight_fraction",),
           "aggregation_param": ("aggregation_params",), "attack": ("attacks",)}
_DATA_FIELDS = ("data_dir", "label", "schema_path", "test_path")


def flag_fields(args: Any, defaults: Mapping[str, Any],
                given_flags: list[str] | None = None) -> dict[str, Any]:
    """SimulationSpec fields from the flags given on the command line only
    (args.given_flags, recorded by node.cli.track_given; or `given_flags`);
    `defaults` are every flag's default, by dest."""
    import argparse

    from node.cli import attack_fields, fault_fields, rules_fields

    spec_fields = set(SimulationSpec.__dataclass_fields__)
    names = given_flags if given_flags is not None else getattr(args, "given_flags", ())
    given = {k: getattr(args, k) for k in names if k in defaults}
    full = argparse.Namespace(**{**defaults, **given})
    parsed = {**fault_fields(full), **rules_fields(full), **attack_fields(full)}
    out: dict[str, Any] = {}
    for dest, value in given.items():
        if dest in _PARSED:
            out.update({f: parsed[f] for f in _PARSED[dest]})
            continue
        name = _RENAMED.get(dest, dest)
        if name in spec_fields:
            out[name] = Path(value) if name in _PATHS and value is not None else value
    return out


def _scenario_model():
    """The scenario file's pydantic model (built on first use: pydantic only then)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Data(Strict):
        dir: str = Field(min_length=1)
        label: str | None = None
        schema_: str | None = Field(default=None, alias="schema")
        test: str | None = None

    class Model(Strict):
        kind: Literal["logreg", "mlp"] | None = None
        hidden: int | None = Field(default=None, ge=1, le=65536)
        epochs: int | None = Field(default=None, ge=1)
        batch_size: int | None = Field(default=None, ge=1)
        lr: float | None = Field(default=None, gt=0)
        prox_mu: float | None = Field(default=None, ge=0, le=1e6)  # FedProx
        lr_decay: float | None = Field(default=None, gt=0, le=1)  # round r: lr * lr_decay**r
        control_variates: bool | None = None  # SCAFFOLD-style (node/control.py)

    class Privacy(Strict):
        mode: Literal["off", "update", "record"] | None = None
        clip: float | None = Field(default=None, gt=0)
        epsilon: float | None = Field(default=None, gt=0)
        sigma: float | None = Field(default=None, gt=0)
        delta: float | None = Field(default=None, gt=0, lt=1)
        weight: Literal["auto", "noised", "uniform"] | None = None
        recipe: Literal["fixed", "auto"] | None = None  # record mode (node/recipe.py)

        @model_validator(mode="after")
        def _one_budget(self):
            if self.epsilon is not None and self.sigma is not None:
                raise ValueError("give epsilon (a total budget) or sigma (a fixed noise "
                                 "multiplier), not both")
            return self

    class Aggregation(Strict):
        rule: str | None = None
        f: int | None = Field(default=None, ge=0)
        max_weight_fraction: float | None = Field(default=None, gt=0)
        params: dict[str, int | float | str] | None = None

    class Faults(Strict):
        loss: float | None = Field(default=None, ge=0, lt=1)
        delay_ms: float | None = Field(default=None, ge=0)
        jitter_ms: float | None = Field(default=None, ge=0)
        partitions: list[str] | None = None
        absent: list[str] | None = None
        stragglers: dict[str, float] | None = None

    class Scenario(Strict):
        description: str | None = None
        dataset: Literal["default", "churn", "digits"] | None = None
        data: Data | None = None
        members: int | None = Field(default=None, ge=2)
        partition: str | None = None
        network_config: str | None = None
        transport: Literal["libp2p", "mqtt"] | None = None
        seal: Literal["auto", "on", "off"] | None = None
        round_deadline_s: float | None = Field(default=None, gt=0)
        rounds: int | None = Field(default=None, ge=1)
        seed: int | None = None
        out: str | None = None
        model: Model | None = None
        privacy: Privacy | None = None
        aggregation: Aggregation | None = None
        faults: Faults | None = None
        attacks: list[str] | None = None

        @model_validator(mode="after")
        def _one_source(self):
            if self.dataset is not None and self.data is not None:
                raise ValueError("give dataset (a built-in table) or [data] (the members' "
                                 "own files), not both")
            if self.data is not None:
                for key in ("members", "partition"):
                    if getattr(self, key) is not None:
                        raise ValueError(f"{key}: does not apply with [data] (the members "
                                         "are its files, one per member)")
            return self

    return Scenario


def read_scenario(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A scenario file -> (SimulationSpec fields it sets, network-only fields it sets).
    Relative paths in it are relative to the file; an unknown key is an error naming it."""
    from pydantic import ValidationError

    doc = read_toml(path, "scenario file")
    try:
        sc = _scenario_model().model_validate(doc)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                parts.append(f"unknown key {loc!r}")
            else:
                parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}" if loc
                             else err["msg"].removeprefix("Value error, "))
        raise LocalError(f"scenario file {path}: " + "; ".join(parts)) from None
    base = path.resolve().parent

    def rel(text: str) -> Path:
        return (base / Path(text).expanduser()).resolve()

    f: dict[str, Any] = {}
    net: dict[str, Any] = {}
    simple = {"dataset": sc.dataset, "nodes": sc.members, "partition": sc.partition,
              "seal": sc.seal, "round_deadline_s": sc.round_deadline_s, "rounds": sc.rounds,
              "seed": sc.seed}
    f.update({k: v for k, v in simple.items() if v is not None})
    if sc.transport is not None:
        net["transport"] = sc.transport
    for key, text in (("out", sc.out), ("network_config", sc.network_config)):
        if text is not None:
            f[key] = rel(text)
    if sc.data is not None:
        f["data_dir"] = rel(sc.data.dir)
        if sc.data.label is not None:
            f["label"] = sc.data.label
        if sc.data.schema_ is not None:
            f["schema_path"] = rel(sc.data.schema_)
        if sc.data.test is not None:
            f["test_path"] = rel(sc.data.test)
    if sc.model is not None:
        m = {"model": sc.model.kind, "hidden": sc.model.hidden, "epochs": sc.model.epochs,
             "batch_size": sc.model.batch_size, "lr": sc.model.lr, "prox_mu": sc.model.prox_mu,
             "lr_decay": sc.model.lr_decay, "control_variates": sc.model.control_variates}
        f.update({k: v for k, v in m.items() if v is not None})
    if sc.privacy is not None:
        p = {"privacy": sc.privacy.mode, "clip": sc.privacy.clip, "delta": sc.privacy.delta,
             "weight": sc.privacy.weight, "recipe": sc.privacy.recipe,
             "epsilon": sc.privacy.epsilon,
             "sigma": sc.privacy.sigma}
        f.update({k: v for k, v in p.items() if v is not None})
    if sc.aggregation is not None:
        a = sc.aggregation
        g = {"aggregation": a.rule, "f": a.f, "max_weight_fraction": a.max_weight_fraction,
             "aggregation_params": a.params}
        f.update({k: v for k, v in g.items() if v is not None})
    if sc.faults is not None:
        x = sc.faults
        g = {"loss": x.loss, "delay_ms": x.delay_ms, "jitter_ms": x.jitter_ms,
             "net_partitions": tuple(x.partitions) if x.partitions is not None else None,
             "absent": tuple(x.absent) if x.absent is not None else None,
             "stragglers": tuple(x.stragglers.items()) if x.stragglers is not None else None}
        f.update({k: v for k, v in g.items() if v is not None})
    if sc.attacks is not None:
        f["attacks"] = tuple(sc.attacks)
    return f, net


def build_spec(scenario: Path | None, flags: Mapping[str, Any], *, network: bool = False,
               defaults: Mapping[str, Any] | None = None, notes: list[str] | None = None
               ) -> SimulationSpec:
    """The one place a run's settings come together: the simulator's defaults, then the
    scenario file (if any), then the flags given on the command line (flag_fields), which
    override the file. `network`: scripts/simulate_network.py (the file's transport
    applies); in process the transport is always the memory hub."""
    fields: dict[str, Any] = dict(defaults or {})
    if scenario is not None:
        from_file, net = read_scenario(scenario)
        if network:
            from_file.update(net)
        elif net and notes is not None:
            notes.append(f"scenario {scenario.name}: transport = {net['transport']!r} applies "
                         "to scripts/simulate_network.py; in process the members share a "
                         "memory hub")
        fields.update(from_file)
    flags = dict(flags)
    # A data source, a privacy budget, a delay: the command line's replaces the file's whole.
    if "dataset" in flags:
        for k in (*_DATA_FIELDS,):
            fields.pop(k, None)
    if "data_dir" in flags:
        for k in ("dataset", "nodes", "partition", "label", "schema_path", "test_path"):
            fields.pop(k, None)
    if "epsilon" in flags or "sigma" in flags:
        fields.pop("epsilon", None)
        fields.pop("sigma", None)
    if "data_dir" in flags and "dataset" in flags:
        raise LocalError("--dataset and --data-dir: give one (a built-in table, or the "
                         "members' own files)")
    fields.update(flags)
    if fields.get("data_dir") is not None:
        for key, flag in (("nodes", "--nodes"), ("partition", "--partition")):
            if key in flags:
                raise LocalError(f"{flag} does not apply with --data-dir: the members are "
                                 "its files, one per member")
        fields.setdefault("dataset", "default")
    else:
        for key, flag in (("label", "--label"), ("schema_path", "--schema"),
                          ("test_path", "--test")):
            if fields.get(key) is not None:
                raise LocalError(f"{flag} applies only with --data-dir (the members' own files)")
    if fields.get("out") is None:
        raise LocalError("no run directory: give --out DIR (or out = \"DIR\" in the "
                         "scenario file)")
    if fields.get("recipe", "fixed") != "fixed" and fields.get("privacy", "off") != "record":
        raise LocalError(f"recipe {fields['recipe']!r} (--recipe) chooses DP-SGD's batch, lr "
                         "and epochs: it applies to record-level privacy (--privacy record) only")
    if fields.get("epsilon") is not None:
        fields["sigma"] = None
    elif fields.get("sigma") is None:
        fields["sigma"] = 1.0
    fields.setdefault("dataset", "default")
    fields.setdefault("nodes", 4)
    fields.setdefault("partition", "dirichlet:0.5")
    fields.setdefault("rounds", 30)
    fields.setdefault("seed", 0)
    return SimulationSpec(**fields)


def spec_from_args(args: Any, *, network: bool = False,
                   notes: list[str] | None = None) -> SimulationSpec:
    """build_spec for a parsed command line (a parser set up with node.cli.track_given):
    the parser's defaults, then args.scenario, then the flags typed."""
    import argparse

    defaults = args.flag_defaults
    return build_spec(args.scenario, flag_fields(args, defaults), network=network,
                      defaults=flag_fields(argparse.Namespace(**defaults), defaults,
                                           list(defaults)), notes=notes)


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


@dataclass(frozen=True)
class NetworkTemplate:
    """A consortium template: its name, and member names with their address slots."""

    name: str
    members: dict[str, dict[str, str]]  # in file order


def network_template(spec: SimulationSpec) -> NetworkTemplate:
    """Read (once) and check --network-config, or make the default template. With
    --data-dir the members are the data files' stems (in sorted order)."""
    if spec.data_dir is not None:
        return _data_dir_template(spec, list(data_dir_files(spec)[0]))
    if spec.network_config is None:
        names = [f"{MEMBER_PREFIX.get(spec.dataset, 'member')}-{i}" for i in range(spec.nodes)]
        return NetworkTemplate(f"sim-{spec.dataset}-{spec.nodes}", {n: {"memory": n} for n in names})
    src = f"--network-config {spec.network_config}"
    doc = read_toml(spec.network_config, "--network-config")
    head = doc.get("consortium")
    if not isinstance(head, dict) or not isinstance(head.get("name"), str):
        raise LocalError(f"{src}: consortium.name: expected a string")
    entries = doc.get("members")
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        raise LocalError(f"{src}: members: expected [[members]] tables")
    members: dict[str, dict[str, str]] = {}
    for i, m in enumerate(entries):
        name = check_member_name(m.get("name"), f"{src}: members[{i}].name")
        addresses = m.get("addresses", {"memory": name})
        if not isinstance(addresses, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in addresses.items()):
            raise LocalError(f"{src}: members[{i}].addresses: expected a table of strings")
        if name in members:
            raise LocalError(f"{src}: members[{i}].name: {name!r} is listed twice")
        members[name] = dict(addresses)
    if spec.data_dir is not None:
        return NetworkTemplate(head["name"], members)
    if len(members) != spec.nodes:
        raise LocalError(f"{src} lists {len(members)} members but --nodes is {spec.nodes}")
    return NetworkTemplate(head["name"], members)


def _data_dir_template(spec: SimulationSpec, names: list[str]) -> NetworkTemplate:
    """The members are the data files' stems; a --network-config must list exactly them."""
    if spec.network_config is None:
        return NetworkTemplate(f"sim-{spec.source}-{len(names)}", {n: {"memory": n} for n in names})
    template = network_template(SimulationSpec(**{**spec.__dict__, "data_dir": None,
                                                  "nodes": len(names)}))
    missing = sorted(set(names) - set(template.members))
    extra = sorted(set(template.members) - set(names))
    if missing or extra:
        raise LocalError(f"--network-config {spec.network_config}: its members must be the "
                         f"member files in --data-dir {spec.data_dir} (file stems {names}); "
                         + "; ".join(x for x in (
                             f"not listed: {missing}" if missing else "",
                             f"no file for: {extra}" if extra else "") if x))
    return NetworkTemplate(template.name, {n: template.members[n] for n in names})


# --- the members' own files (--data-dir) -------------------------------------------

DATA_SUFFIXES = (".csv", ".parquet")
TEST_STEM = "test"  # DIR/test.csv or DIR/test.parquet: the common test set, not a member
# A member without data.eval_path holds this share of its rows out of training
# (node.runtime.config.DataConfig.eval_fraction's default), split as node/runtime/node.py does.
EVAL_FRACTION = 0.2


def data_dir_files(spec: SimulationSpec) -> tuple[dict[str, Path], Path | None]:
    """--data-dir's member files (stem -> path, sorted) and the common test set, if any.
    Only lists and checks names: nothing is read yet."""
    d = spec.data_dir
    assert d is not None
    if not d.is_dir():
        raise LocalError(f"--data-dir {d}: not a directory")
    found: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix not in DATA_SUFFIXES:
            continue
        if p.stem in found:
            raise LocalError(f"--data-dir {d}: {found[p.stem].name} and {p.name} both name "
                             f"member {p.stem!r} (one file per member): remove one")
        found[p.stem] = p
    test = found.pop(TEST_STEM, None)
    if spec.test_path is not None:
        given = spec.test_path
        if test is not None and test.resolve() != given.resolve():
            raise LocalError(f"--test {given}: {d} also holds {test.name}, which is the common "
                             "test set by convention: remove one of them")
        if not given.is_file():
            raise LocalError(f"--test {given}: no such file")
        if given.suffix not in DATA_SUFFIXES:
            raise LocalError(f"--test {given}: expected a .csv or .parquet file")
        found = {n: p for n, p in found.items() if p.resolve() != given.resolve()}
        test = given
    if not found:
        raise LocalError(f"--data-dir {d}: no member files (one NAME.csv or NAME.parquet per "
                         "member; the member's name is the file's stem)")
    for stem, p in found.items():
        check_member_name(stem, f"--data-dir: {p}: the member name (the file's stem)")
    if len(found) < 2:
        raise LocalError(f"--data-dir {d}: a consortium needs at least 2 members, found one "
                         f"member file ({next(iter(found.values())).name})")
    return found, test


def held_out_split(n_rows: int, seed: int, fraction: float = EVAL_FRACTION
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of a member without data.eval_path: the split its
    node makes (node.data.held_out_split; tests/test_data_dir.py checks)."""
    from node.data import held_out_split as split

    return split(n_rows, seed, fraction)


def member_seed(spec: SimulationSpec, index: int) -> int:
    """training.seed of the index-th member's config."""
    return spec.seed * 1000 + index


def baseline_schema(schema: FeatureSchema, train_rows: dict[str, Any],
                    max_fraction: float | None, privacy: str = "off",
                    delta: float = 1e-5) -> tuple[FeatureSchema, str | None]:
    """What the simulator encodes its baselines (centralized, local-only) and the common
    test set with, and a note saying what that is. normalize = "federated": what the
    members would agree (node/normalize.py): each member's check at start first (with
    its own rows, as its node does: a refusal raises here, before anything runs; a
    fallback gives range scaling), then the combined statistics, exact with privacy
    off, and under record-level DP each member's sums noised by the same mechanism at the
    same noise (from the OS, as the nodes': a draw like theirs, not the same draw). So the
    baselines' columns carry what normalization costs; only the model differs."""
    if schema.mode != "federated":
        return schema, None
    from node.normalize import DEFAULT_NORMALIZE_NOISE, combine, member_stats, noised, resolve

    names = list(train_rows)
    resolved = [resolve(schema, len(names), len(train_rows[n]), privacy, delta, n)
                for n in names]
    fell = [(n, r) for n, r in zip(names, resolved, strict=True) if r[0].mode == "range"]
    if fell:
        check = fell[0][1][1]
        assert check is not None
        return fell[0][1][0], (
            f"normalize = \"federated\": the check at start finds the agreed statistics would "
            f"be too noisy at {', '.join(n for n, _ in fell)} ({check.describe()}); "
            "normalize_fallback = \"range\": the members and the baselines scale by the "
            "declared ranges instead")
    sigma = (schema.normalize_noise or DEFAULT_NORMALIZE_NOISE) if privacy == "record" else None
    msgs = {}
    for n in names:
        exact = member_stats(train_rows[n], schema, n)
        # the members' own rows (--data-dir): noise from the OS, as noise_for's
        msgs[n] = exact if sigma is None else noised(exact, sigma, OsNoise())
    how = ("exact pooled statistics (privacy off)" if sigma is None else
           f"statistics from sums noised as the members' are (σₙ {sigma:g})")
    return (schema.with_stats(combine(msgs, schema, max_fraction).stats),
            f"normalize = \"federated\": the members agree mean and std before round 1 "
            f"(node/normalize.py); the baselines use {how}")


def _check_columns(frames: dict[str, Any], files: dict[str, Path]) -> None:
    names = list(frames)
    first = names[0]
    cols = list(frames[first].columns)
    for n in names:
        df = frames[n]
        odd = [c for c in df.columns if not isinstance(c, str)]
        if odd:
            raise LocalError(f"{files[n]}: column names must be text, got {odd[:5]}")
        if len(df) == 0:
            raise LocalError(f"{files[n]}: no rows (only a header?)")
        if list(df.columns) == cols:
            continue
        missing = [c for c in cols if c not in df.columns]
        extra = [c for c in df.columns if c not in cols]
        why = "; ".join(x for x in (f"missing {missing}" if missing else "",
                                    f"extra {extra}" if extra else "") if x) or \
            "same columns in another order"
        raise LocalError(f"{files[n]}: its columns differ from {files[first].name}'s ({why}): "
                         "every member file must have the same columns")


def _draft_schema(frames: dict[str, Any], train_idx: dict[str, np.ndarray], test_df: Any,
                  label: str) -> FeatureSchema:
    """What a simulator may do and a consortium may not: fit the schema on the pooled
    member rows (scaling from the training rows; categories and classes from all rows)."""
    import pandas as pd
    from pydantic import ValidationError

    everything = [*frames.values(), *([test_df] if test_df is not None else [])]
    categorical = [c for c in everything[0].columns if c != label and not all(
        pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
        for df in everything if c in df.columns)]
    pooled = pd.concat([df.iloc[train_idx[n]] for n, df in frames.items()], ignore_index=True)
    full = pd.concat(everything, ignore_index=True)
    try:
        schema = fit_schema(pooled, label, categorical)
        vocab = fit_schema(full, label, categorical)
    except ValidationError as exc:
        from node.data import _pydantic_message

        raise LocalError(f"--data-dir: drafting the schema from the pooled files: "
                         f"{_pydantic_message(exc)}") from None
    return schema.model_copy(update={"classes": vocab.classes, "columns": [
        c if c.kind == "numeric" else vocab.columns[i] for i, c in enumerate(schema.columns)]})


def member_names(spec: SimulationSpec) -> list[str]:
    return list(network_template(spec).members)


def privacy_section(spec: SimulationSpec) -> dict[str, Any]:
    section: dict[str, Any] = {"mode": spec.privacy}
    if spec.privacy == "off":
        return section
    section.update(clip=spec.clip, delta=spec.delta)
    if spec.epsilon is not None:
        section["epsilon"] = spec.epsilon
    else:
        section["sigma"] = spec.sigma
    if spec.privacy == "record":
        section["weight"] = spec.weight
        if spec.recipe != "fixed":  # "fixed" (the default) is left out: configs as before
            section["recipe"] = spec.recipe
    return section


XY = tuple[np.ndarray, np.ndarray]


@dataclass
class Prepared:
    names: list[str]
    schema: FeatureSchema
    config_paths: list[Path]
    train_parts: list[XY]  # the rows each member trains on
    train_all: XY
    test: XY  # the common test set (or, without one, every member's held-out rows pooled)
    consortium: Consortium
    own_parts: list[XY] = field(default_factory=list)  # each member's own held-out rows
    test_source: str = "consortium test set"  # what `test` is, for people
    own_source: str = ""  # what `own_parts` are, for people
    common_test: bool = True  # False: `test` is only the members' held-out rows pooled
    notes: list[str] = field(default_factory=list)  # said once at the start of a run
    # normalize = "federated": the raw rows `test` and `own_parts` were encoded from, so
    # the final models are scored on rows encoded with the statistics their nodes agreed
    # (evaluation_rows); None otherwise.
    raw_eval: tuple[Any, dict[str, Any]] | None = None


def evaluation_rows(prep: Prepared, state: Path) -> tuple[XY, list[XY]]:
    """The common test set and the members' own held-out rows, encoded as the node whose
    state dir this is encodes (its agreed statistics under federated normalization)."""
    agreed_file = state / "normalization.json"
    if prep.raw_eval is None or not agreed_file.exists():
        return prep.test, prep.own_parts
    from node.normalize import Agreed

    agreed = Agreed.from_json(json.loads(agreed_file.read_text()), prep.schema)
    enc = prep.schema.with_stats(agreed.stats)
    test_df, own_dfs = prep.raw_eval
    own = [encode(own_dfs[n], enc, n) for n in prep.names]
    test = encode(test_df, enc, "test") if test_df is not None else (
        np.concatenate([o[0] for o in own]), np.concatenate([o[1] for o in own]))
    return test, own


@dataclass
class _Rows:
    """What a data source gives prepare(): the schema, per member its training and own
    held-out rows and its config's [data] section, and the files to write into out/data."""

    schema: FeatureSchema
    train: dict[str, XY]
    own: dict[str, XY]
    data_sections: dict[str, dict[str, str]]
    test: XY
    test_source: str
    own_source: str
    common_test: bool
    write: dict[str, Any] = field(default_factory=dict)  # file name -> DataFrame
    notes: list[str] = field(default_factory=list)
    train_all: XY | None = None  # the pooled training rows (else the parts concatenated)
    raw_eval: tuple[Any, dict[str, Any]] | None = None  # see Prepared.raw_eval


def _builtin_rows(spec: SimulationSpec, names: list[str]) -> _Rows:
    """A built-in table: a stratified common test set, the rest partitioned."""
    df, label, categorical = load_demo(spec.dataset)
    from sklearn.model_selection import train_test_split  # ~1 s of import: only here

    train_df, test_df = train_test_split(df, test_size=TEST_FRACTION, random_state=spec.seed,
                                         stratify=df[label])
    train_df, test_df = train_df.reset_index(drop=True), test_df.reset_index(drop=True)
    # Scaling constants and vocabularies from the pooled training rows (and the
    # vocabularies from all rows, so no test row holds an unknown category).
    schema = fit_schema(train_df, label, categorical)
    full_vocab = fit_schema(df, label, categorical)
    schema = schema.model_copy(update={"columns": [
        c if c.kind == "numeric" else full_vocab.columns[i]
        for i, c in enumerate(schema.columns)]})
    parts = partition(train_df, label, len(names), spec.partition,
                      np.random.default_rng(spec.seed))
    owners = attribute_rows(test_df, train_df, parts, label, spec)
    X_test, y_test = encode(test_df, schema, "test")
    rows = _Rows(schema, {}, {}, {}, (X_test, y_test),
                 f"consortium test set ({len(y_test)} rows, stratified {int(100 * TEST_FRACTION)} %)",
                 "the member's share of the consortium test set, drawn like its partition "
                 f"({spec.partition})", True, {"test.parquet": test_df},
                 train_all=encode(train_df, schema, "train"))
    for i, name in enumerate(names):
        part = train_df.iloc[parts[i]]
        rows.write[f"{name}.parquet"] = part
        rows.train[name] = encode(part, schema, name)
        rows.own[name] = (X_test[owners == i], y_test[owners == i])
        rows.data_sections[name] = {"path": f"../data/{name}.parquet",
                                    "eval_path": "../data/test.parquet"}
    return rows


def attribute_rows(test_df: Any, train_df: Any, parts: list[np.ndarray], label: str,
                   spec: SimulationSpec) -> np.ndarray:
    """Built-in tables: which member "owns" each test row (its own held-out rows), drawn
    as its partition was: column:NAME by the column's value, iid evenly at random,
    dirichlet per class in proportion to the member's rows of that class. -1: nobody
    (a column value no member trains on)."""
    from node.data import parse_partition

    n = len(parts)
    rng = np.random.default_rng([spec.seed, 2])
    kind, arg = parse_partition(spec.partition)
    owners = np.full(len(test_df), -1, dtype=np.int64)
    if kind == "column":
        values = sorted(train_df[arg].astype(str).unique())
        owner = {v: rank % n for rank, v in enumerate(values)}
        owners[:] = test_df[arg].astype(str).map(owner).fillna(-1).to_numpy(dtype=np.int64)
    elif kind == "iid":
        for i, chunk in enumerate(np.array_split(rng.permutation(len(test_df)), n)):
            owners[chunk] = i
    else:
        member_of = np.empty(len(train_df), dtype=np.int64)
        for i, p in enumerate(parts):
            member_of[p] = i
        train_labels = train_df[label].astype(str).to_numpy()
        test_labels = test_df[label].astype(str).to_numpy()
        for c in np.unique(test_labels):
            counts = np.bincount(member_of[train_labels == c], minlength=n).astype(float)
            rows = np.flatnonzero(test_labels == c)
            if counts.sum() > 0:
                owners[rows] = rng.choice(n, size=len(rows), p=counts / counts.sum())
    return owners


def _data_dir_rows(spec: SimulationSpec, names: list[str]) -> _Rows:
    """The members' own files: each member holds out its rows as a node without
    data.eval_path does, and trains on the rest; its node reads its file in place."""
    from node.data import read_frame

    files, test_path = data_dir_files(spec)
    frames = {n: read_frame(files[n]) for n in names}
    _check_columns(frames, files)
    cols = list(frames[names[0]].columns)
    notes = []
    test_df = None
    if test_path is not None:
        test_df = read_frame(test_path)
        missing = [c for c in cols if c not in test_df.columns]
        if missing:
            raise LocalError(f"{test_path}: the common test set lacks column(s) {missing} "
                             f"that the member files ({files[names[0]].name}, ...) have")
        if len(test_df) == 0:
            raise LocalError(f"{test_path}: no rows (only a header?)")
        test_df = test_df[cols]
    def split(given: FeatureSchema | None) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        # as a node splits (node.data.member_split): missing = "drop_row" on the whole
        # file, then the rows left split by the member's training.seed
        return {n: member_split(frames[n], given, member_seed(spec, i), EVAL_FRACTION)
                for i, n in enumerate(names)}

    if spec.schema_path is not None:
        where = f"--schema {spec.schema_path}"
        schema = FeatureSchema.from_dict(read_toml(spec.schema_path, "--schema"), where)
        if spec.label is not None and spec.label != schema.label:
            raise LocalError(f"--label {spec.label!r}: {where} says the label is "
                             f"{schema.label!r}")
        splits = split(schema)
    else:
        label = spec.label or "label"
        if label not in cols:
            raise LocalError(f"--label {label!r}: no such column in {files[names[0]]} (columns: "
                             f"{', '.join(map(repr, cols))})" if spec.label is not None else
                             f"--data-dir: {files[names[0]]} has no column 'label': name the "
                             "label column with --label COL")
        splits = split(None)  # a drafted schema has no missing policy: nothing dropped
        schema = _draft_schema(frames, {n: splits[n][0] for n in names}, test_df, label)
        notes.append("schema drafted from the pooled member files (scaling from their "
                     "training rows): only a simulator can pool rows; a real consortium writes "
                     "its schema with `flnode schema infer` on each member's files and "
                     "`flnode schema merge` (then rehearse with --schema)")
    from node.rules import default_cap

    enc, how = baseline_schema(schema, {n: frames[n].iloc[splits[n][0]] for n in names},
                               spec.max_weight_fraction or default_cap(len(names)),
                               spec.privacy, spec.delta)
    if how is not None:
        notes.append(how)
    enc = enc.for_encoding()
    train, own, sections = {}, {}, {}
    for n in names:
        tr, held, dropped = splits[n]
        if len(tr) == 0 or len(held) == 0:
            left = f" ({dropped} dropped by missing = \"drop_row\")" if dropped else ""
            raise LocalError(f"{files[n]}: {len(frames[n])} row(s){left} are too few to hold "
                             f"out {int(100 * EVAL_FRACTION)} % and train on the rest")
        train[n] = encode(frames[n].iloc[tr], enc, str(files[n]))
        own[n] = encode(frames[n].iloc[held], enc, str(files[n]))
        sections[n] = {"path": str(files[n].resolve())}
    own_source = (f"the member's own held-out rows ({int(100 * EVAL_FRACTION)} % of its file, "
                  "as a node without data.eval_path holds them out)")
    if test_df is not None:
        test = encode(test_df, enc, str(test_path))
        source = f"common test set {test_path.name} ({len(test[1])} rows)"
    else:
        test = (np.concatenate([own[n][0] for n in names]),
                np.concatenate([own[n][1] for n in names]))
        source = f"no common test set: the members' held-out rows pooled ({len(test[1])} rows)"
    raw_eval = None if enc is schema else (
        test_df, {n: frames[n].iloc[splits[n][1]] for n in names})
    return _Rows(schema, train, own, sections, test, source, own_source,
                 test_df is not None, notes=notes, raw_eval=raw_eval)


def check_faults(spec: SimulationSpec, names: list[str]) -> None:
    from gossip.transports.faults import parse_partition

    for flag, listed in (("--absent", spec.absent),
                         ("--straggler", [n for n, _ in spec.stragglers])):
        for n in listed:
            if n not in names:
                raise LocalError(f"{flag} {n}: no such member; the members are {names}")
    if len(spec.present(names)) < 2:
        raise LocalError("--absent: at least 2 members must start")
    for n, factor in spec.stragglers:
        if not 1 <= factor <= 1000:
            raise LocalError(f"--straggler {n}:{factor:g}: FACTOR must be in [1, 1000]")
    for p in spec.net_partitions:
        try:
            part = parse_partition(p)
        except ValueError as exc:
            raise LocalError(f"--net-partition {exc}") from None
        unknown = sorted(part.side - set(names))
        if unknown:
            raise LocalError(f"--net-partition {p}: no such member(s) {unknown}")


def prepare(spec: SimulationSpec,
            addresses: dict[str, dict[str, str]] | None = None) -> Prepared:
    """Write keys, consortium file, data files and node configs into spec.out.

    `addresses` (member -> transport -> address) overrides the template's.
    """
    if spec.data_dir is None and spec.nodes < 2:
        raise LocalError("--nodes: a consortium needs at least 2 members")
    template = network_template(spec)
    names = list(template.members)
    check_faults(spec, names)
    attackers = spec.attackers(names)
    for name, section in attackers.items():
        if name in spec.absent:
            raise LocalError(f"--attack: {name} is --absent: an attacker must start")
        if section["kind"] == "zero-prekey" and not seals(spec.seal, spec.transport):
            raise LocalError(f"--attack zero-prekey:{name}: needs sealed shares (--seal on; "
                             "only sealing nodes use prekeys)")
    rows = (_data_dir_rows(spec, names) if spec.data_dir is not None
            else _builtin_rows(spec, names))
    schema = rows.schema

    out = spec.out
    for sub in ("keys", "data", "nodes", "state"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if any((out / "state").iterdir()) or any((out / "keys").iterdir()):
        raise LocalError(f"--out {out}: already holds a run (keys/ or state/ not empty); "
                         "choose a new directory")
    members = []
    for name in names:
        ident = Identity.generate(name)
        save_identity(ident, out / "keys")
        addr = {**template.members[name], **(addresses or {}).get(name, {})}
        members.append(Member(name, ident.public_key, addr))
    # Update-level DP with a fixed sigma: the consortium agrees it as the noise bound, so
    # every member clips a share that lies further than honest noise could take it.
    sigma = spec.sigma if spec.privacy == "update" and spec.epsilon is None else None
    rules = pin_rules(rules_table(len(members), spec.aggregation, spec.f,
                                  spec.max_weight_fraction, spec.privacy,
                                  spec.clip if spec.privacy != "off" else None, sigma,
                                  **spec.aggregation_params), len(members))
    consortium = Consortium(template.name, schema.to_dict(), tuple(members), rules)
    build_strategy(consortium, None, spec.privacy, spec.clip, "--aggregation")
    save_consortium(consortium, out / "consortium.toml")
    for file_name, frame in rows.write.items():
        frame.to_parquet(out / "data" / file_name)
    config_paths = []
    for i, name in enumerate(names):
        cfg = {
            "state_dir": f"../state/{name}",
            "identity": {"key": f"../keys/{name}.key"},
            "consortium": {"path": "../consortium.toml"},
            "data": rows.data_sections[name],
            "model": {"kind": spec.model, "hidden": spec.hidden},
            "training": {"rounds": spec.rounds, "epochs": spec.epochs,
                         "batch_size": spec.batch_size, "lr": spec.lr,
                         "seed": member_seed(spec, i),
                         **({"prox_mu": spec.prox_mu} if spec.prox_mu else {}),
                         **({"lr_decay": spec.lr_decay} if spec.lr_decay != 1 else {}),
                         **({"control_variates": True} if spec.control_variates else {})},
            "privacy": privacy_section(spec),
            # min_members 0: the simulators start every member together, and rehearse
            # absent ones (--absent), which a quorum would wait for without limit
            "gossip": {"transport": spec.transport, "round_deadline_s": spec.round_deadline_s,
                       "seal": spec.seal, "min_members": 0},
        }
        if spec.keep_releases:
            cfg["keep_releases"] = True
        faults = spec.faults_for(name)
        if faults is not None:
            cfg["faults"] = faults
        if name in attackers:  # only the attackers' configs get the section
            cfg["attack"] = attackers[name]
        path = out / "nodes" / f"{name}.toml"
        path.write_text(tomli_w.dumps(cfg))
        config_paths.append(path)
    train_parts = [rows.train[n] for n in names]
    train_all = rows.train_all or (np.concatenate([p[0] for p in train_parts]),
                                   np.concatenate([p[1] for p in train_parts]))
    return Prepared(names, schema, config_paths, train_parts, train_all, rows.test, consortium,
                    [rows.own[n] for n in names], rows.test_source, rows.own_source,
                    rows.common_test, rows.notes, rows.raw_eval)


def train_baseline(spec: SimulationSpec, prep: Prepared, X: np.ndarray, y: np.ndarray,
                   seed: int, own: XY | None = None) -> dict[str, float]:
    """Same model, same initial weights, same recipe, R epochs on X alone; its metrics
    on the test set (and, given `own` rows, under "own" its metrics on them)."""
    model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes, spec.hidden,
                        seed=init_seed_from(prep.consortium))
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
    `node.state.Checkpoint`), or None without one."""
    from node.models import set_flat

    if cp is None:
        return None
    model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes, spec.hidden,
                        seed=init_seed_from(prep.consortium))
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
    return NOISE_OS if spec.data_dir is not None else NOISE_SEEDED


def noise_for(spec: SimulationSpec, index: int) -> NoiseSource:
    """Member `index`'s noise source in the in-process simulator (see noise_kind)."""
    if noise_kind(spec) == NOISE_OS:
        return OsNoise()
    return SeededNoise(spec.seed * 7919 + index)


def noise_line(summary: dict) -> str | None:
    """The terminal's line on where the privacy noise came from (privacy on only)."""
    if summary["epsilon"]["mode"] == "off":
        return None
    if summary.get("noise") == NOISE_OS:
        return ("  noise: drawn from os.urandom (a fresh draw every run: the same seed does "
                "not give the same released values)")
    return ("  noise: seeded from --seed (demo data: the run is reproducible, and so is "
            "the noise: not a privacy guarantee; a real node and --data-dir use os.urandom)")


async def run_consortium(spec: SimulationSpec, prep: Prepared,
                         on_round: Any = None) -> list[Node]:
    hub = MemoryHub()
    nodes = []
    for i, (name, path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        if name in spec.absent:  # listed, never started
            continue
        cfg = load_rehearsal_config(path)
        transport = hub.attach(name, prep.names,
                               max_message_bytes=cfg.gossip.max_envelope_bytes)
        # Reproducible noise on the built-in demo tables only; the members' own files
        # (--data-dir) get os.urandom, as a real node (`flnode run`) always does.
        nodes.append(build_rehearsal_node(cfg, transport, noise_for(spec, i)))
    async with asyncio.TaskGroup() as tg:
        for node in nodes:
            tg.create_task(node.run(on_round), name=f"node-{node.name}")
    return nodes


@dataclass
class MemberResult:
    """What one member reports at the end of a run, however it ran."""

    name: str
    final: dict[str, float]  # metrics of its final model on the consortium test set
    epsilon: float | None
    bytes_sent: int
    bytes_received: int
    rejected: dict[str, int]
    rounds_done: int
    stopped: str | None = None  # why the member stopped sharing early, if it did
    noise_multiplier: float | None = None
    own: dict[str, float] | None = None  # its final model on its own held-out rows
    weight: str | None = None  # its privacy plan's share weight: exact, noised or uniform


def result_of(node: Node, test: tuple[np.ndarray, np.ndarray],
              own: XY | None = None) -> MemberResult:
    return MemberResult(node.name, evaluate(node.model, *test), node.epsilon(),
                        node.transport.stats.bytes_sent, node.transport.stats.bytes_received,
                        node.rejected(), node.book.current, node.stopped,
                        node.budget.plan.noise_multiplier if node.budget.plan else None,
                        evaluate_rows(node.model, own) if own is not None else None,
                        node.budget.plan.weight if node.budget.plan else None)


WEIGHT_TEXT = {"exact": "exact row count",
               "noised": "row count + N(0, count_sigma²), charged once",
               "uniform": "uniform (1 per member): no row count released"}


def weight_text(spec: SimulationSpec, results: list[MemberResult]) -> str:
    """What a share's weight was, as the members' privacy plans say (privacy.weight =
    "auto" is resolved per node at its first start)."""
    if spec.privacy in ("off", "update"):
        return WEIGHT_TEXT["exact"]
    kinds = sorted({r.weight for r in results if r.weight is not None})
    if len(kinds) == 1:
        return WEIGHT_TEXT[kinds[0]]
    return "; ".join(f"{k}: {WEIGHT_TEXT[k]}" for k in kinds) or "unknown (no privacy plan)"


def summarize(spec: SimulationSpec, prep: Prepared, results: list[MemberResult],
              history: dict[int, dict[str, dict[str, float]]],
              centralized: dict[str, float], local_only: dict[str, dict[str, float]],
              noise: str | None = None) -> dict:
    """summary.json. `local_only[name]["own"]` and `MemberResult.own` (when given) are the
    local-only and consortium models' metrics on the member's own held-out rows; `noise`
    where the members' privacy noise came from (NOISE_OS or NOISE_SEEDED; by default the
    in-process simulator's, noise_kind)."""
    metric = metric_name(prep.schema.n_classes)
    final = {r.name: r.final for r in results}

    def block(key: str, per_node: dict[str, dict[str, float]]) -> dict[str, Any]:
        vals = {name: per_node[name][key] for name in prep.names if name in per_node}
        return {"mean": float(np.mean(list(vals.values()))), "per_node": vals}

    rejected: dict[str, int] = {}
    for r in results:
        for reason, count in r.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + count
    summary: dict[str, Any] = {
        "dataset": spec.source,
        "data_dir": str(spec.data_dir) if spec.data_dir is not None else None,
        "metric": metric,
        "nodes": len(prep.names),
        "rounds": spec.rounds,
        "partition": spec.partition if spec.data_dir is None else "the members' own files",
        "seed": spec.seed,
        "noise": noise if noise is not None else noise_kind(spec),
        "model": spec.model,
        # local training: what every member ran (prox_mu: FedProx's proximal term, 0 = off;
        # round r's rate lr * lr_decay**r; control_variates: SCAFFOLD-style, node/control.py)
        "training": {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
                     "prox_mu": spec.prox_mu, "lr_decay": spec.lr_decay,
                     "control_variates": spec.control_variates},
        "transport": spec.transport,
        "seal": spec.seal,
        "rules": dict(prep.consortium.rules),
        # The rule, f and caps every member applied (the [rules] with defaults filled in).
        "aggregation": build_strategy(prep.consortium, None, spec.privacy, spec.clip).params,
        "consortium_id": prep.consortium.id.hex(),
        "rows": {name: int(len(prep.train_parts[i][1])) for i, name in enumerate(prep.names)},
        "test_rows": int(len(prep.test[1])),
        "test_set": prep.test_source,
        "common_test": prep.common_test,
        "own_rows": own_rows(prep, results, local_only, metric),
        "own_rows_source": prep.own_source,
        "centralized": centralized[metric],
        "local_only": block(metric, local_only),
        "consortium": block(metric, final),
        "history": {str(r): {m: v[metric] for m, v in per.items()}
                    for r, per in sorted(history.items())},
        "epsilon": {
            "delta": spec.delta, "accountant": ACCOUNTANT, "mode": spec.privacy,
            "clip": spec.clip if spec.privacy != "off" else None,
            "budget": spec.epsilon if spec.privacy != "off" else None,
            "sigma": spec.sigma if spec.privacy != "off" and spec.epsilon is None else None,
            "noise_multiplier_per_node": {r.name: r.noise_multiplier for r in results},
            "per_node": {r.name: r.epsilon for r in results},
            "recipe": spec.recipe if spec.privacy == "record" else None,
            "weight": weight_text(spec, results),
            "weight_per_node": {r.name: r.weight for r in results},
        },
        "stopped": {r.name: r.stopped for r in results if r.stopped},
        "bytes": {r.name: {"sent": r.bytes_sent, "received": r.bytes_received}
                  for r in results},
        "rejected": rejected,
        "rejected_per_node": {r.name: dict(r.rejected) for r in results},
        "rounds_done": {r.name: r.rounds_done for r in results},
        "faults": {"loss": spec.loss, "delay_ms": spec.delay_ms, "jitter_ms": spec.jitter_ms,
                   "net_partitions": list(spec.net_partitions), "absent": list(spec.absent),
                   "stragglers": dict(spec.stragglers)},
    }
    attackers = spec.attackers(prep.names)
    honest = {name: v for name, v in final.items() if name not in attackers}
    summary["honest"] = block(metric, honest) if honest else {"mean": float("nan"),
                                                               "per_node": {}}
    summary["attack"] = {
        "attackers": {name: AttackConfig.model_validate(a).describe()
                      for name, a in attackers.items()},
        "sections": attackers,
        "seen_by": {name: seen_by(spec.out / "state" / name, list(attackers))
                    for name in honest} if attackers else {},
    }
    if metric == "roc_auc":
        summary["centralized_pr_auc"] = centralized["pr_auc"]
        summary["pr_auc"] = {"local_only": block("pr_auc", local_only),
                             "consortium": block("pr_auc", final)}
    return summary


def own_rows(prep: Prepared, results: list[MemberResult],
             local_only: dict[str, dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """Per member: its local-only model and the consortium's (its final model) on its OWN
    held-out rows, and the gain; NaN where the metric is undefined there (one class)."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        local = local_only.get(r.name, {}).get("own")
        if r.own is None or local is None:
            continue
        rows = prep.own_parts[prep.names.index(r.name)][1]
        out[r.name] = {"local_only": local[metric], "consortium": r.own[metric],
                       "gain": r.own[metric] - local[metric], "rows": int(len(rows))}
    return out


AGGREGATION_ACTIONS = ("excluded", "clipped", "weight_capped", "down_weighted")


def seen_by(state: Path, attackers: list[str]) -> dict[str, dict[str, Any]]:
    """What one honest member did about each attacker, from its audit log: the rounds
    it aggregated, in how many the attacker's share was used (and its mean fraction of
    the result), how often the strategy excluded / clipped / capped / down-weighted it
    (by reason), which of its messages were rejected (by reason; `flood`: messages dropped
    unparsed, from metrics.jsonl), the equivocations
    proven against it (`evidence`: two envelopes it signed), the seen reports it made that
    disagreed with our copy (`digest_mismatch`, its claims) and those of others that
    disputed its share (`accused`: claims against it, not proof)."""
    from node.state import read_jsonl

    rounds: dict[int, dict] = {}
    out: dict[str, dict[str, Any]] = {
        a: {"rounds": 0, "used": 0, "mean_weight": 0.0, "rejected": {}, "evidence": 0,
            "digest_mismatch": 0, "accused": 0,
            **{what: {} for what in AGGREGATION_ACTIONS}} for a in attackers}
    for line in read_jsonl(state / "audit.jsonl"):
        member, outcome = line.get("member"), line.get("outcome")
        if line.get("kind") == "aggregate":
            rounds[line["round"]] = line  # a round re-run after a restart: the last wins
        elif line.get("kind") == "claim":  # a seen report disagreed with our copy
            if member in out:
                out[member]["digest_mismatch"] += 1
            if line.get("accused") in out:
                out[line["accused"]]["accused"] += 1
        elif line.get("kind") == "evidence" and member in out:
            out[member]["evidence"] += 1
        elif member in out and outcome not in (None, "accepted"):
            rej = out[member]["rejected"]
            rej[outcome] = rej.get(outcome, 0) + 1
    for line in rounds.values():
        for a, entry in out.items():
            entry["rounds"] += 1
            if a in line.get("used", ()):
                entry["used"] += 1
                w = line.get("weights", {}).get(a, 0.0)
                entry["mean_weight"] += w if isinstance(w, int | float) else 0.0
            for what in AGGREGATION_ACTIONS:
                note = line.get(what, {}).get(a)
                if note is not None:
                    entry[what][note["reason"]] = entry[what].get(note["reason"], 0) + 1
    for entry in out.values():
        entry["mean_weight"] = entry["mean_weight"] / entry["rounds"] if entry["rounds"] else 0.0
    # The audit log has one flood line per round; say the messages dropped instead.
    from node.status import flood_by_member

    for a, f in flood_by_member(read_jsonl(state / "metrics.jsonl")).items():
        if a in out:
            out[a]["rejected"]["flood"] = f["dropped"]
    return out


def baselines(spec: SimulationSpec, prep: Prepared) -> tuple[dict[str, float],
                                                              dict[str, dict[str, float]]]:
    """Centralized (pooled training rows) and each member's local-only model; the latter's
    metrics on the member's own held-out rows under "own"."""
    centralized = train_baseline(spec, prep, *prep.train_all, seed=spec.seed)
    local_only = {name: train_baseline(spec, prep, *prep.train_parts[i], seed=spec.seed + i,
                                       own=prep.own_parts[i] if prep.own_parts else None)
                  for i, name in enumerate(prep.names)}
    return centralized, local_only


def write_outputs(spec: SimulationSpec, summary: dict) -> None:
    (spec.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    from node.report import plot_history

    plot_history(summary, spec.out / "accuracy.png")


def simulate(spec: SimulationSpec, console: Any = None, notes: list[str] | None = None) -> dict:
    from node.report import RoundPrinter, print_summary

    torch.set_num_threads(1)  # measured 3-15x faster for small models on 2 cores
    prep = prepare(spec)
    prep.notes[:0] = notes or []
    printer = RoundPrinter(spec, spec.present(prep.names), metric_name(prep.schema.n_classes),
                           console)
    printer.header(prep)
    nodes = asyncio.run(run_consortium(spec, prep, printer.on_round))
    printer.done()
    centralized, local_only = baselines(spec, prep)
    results = []
    for n in nodes:
        test, own_parts = evaluation_rows(prep, n.state.path)
        own = dict(zip(prep.names, own_parts, strict=True)) if own_parts else {}
        results.append(result_of(n, test, own.get(n.name)))
    summary = summarize(spec, prep, results, printer.history, centralized, local_only)
    write_outputs(spec, summary)
    print_summary(summary, spec.out, console)
    print_noise(summary, console)
    print_attack(summary, console)
    return summary


def print_noise(summary: dict, console: Any = None) -> None:
    line = noise_line(summary)
    if line is not None:
        from node.report import make_console

        (console or make_console()).print(line, markup=False, highlight=False)


def print_attack(summary: dict, console: Any = None) -> None:
    """A line per attacker: who attacked how, and the honest members' mean metric."""
    attack = summary.get("attack") or {}
    if not attack.get("attackers"):
        return
    from node.report import make_console

    console = console or make_console()
    console.print("  [red]attackers[/]: " + ", ".join(
        f"{n} ({d})" for n, d in attack["attackers"].items())
        + f"; honest members' mean {summary['metric']} {summary['honest']['mean']:.4f}")
    for name, seen in attack["seen_by"].items():
        parts = []
        for a, e in seen.items():
            acts = {f"{what}:{r}": n for what in AGGREGATION_ACTIONS
                    for r, n in e[what].items()}
            acts.update({f"rejected:{r}": n for r, n in e["rejected"].items()})
            for key in ("digest_mismatch", "accused", "evidence"):
                if e.get(key):
                    acts[key] = e[key]
            parts.append(f"{a}: used {e['used']}/{e['rounds']} rounds"
                         + "".join(f", {k} {v}" for k, v in sorted(acts.items())))
        console.print(f"    {name} saw " + "; ".join(parts))


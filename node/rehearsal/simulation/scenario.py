"""One spec from a scenario file and the command line (`build_spec`): the simulator's
defaults, then the scenario file (network_configs/scenarios/, checked by a pydantic
model), then the flags typed, which override the file."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gossip.compress import parse_codec
from gossip.errors import LocalError
from gossip.membership import (
    read_toml,
)
from gossip.topology import parse_topology
from node.learn.kinds import EXTRA_OPTIONS, is_plugin, resolve
from node.ops import flags
from node.rehearsal.simulation.spec import SimulationSpec

# --- one spec from a scenario file and the command line ------------------------------

# argparse dest -> SimulationSpec field, where the flag is the field under another name
# (the fault, rules and attack flags are parsed by node.ops.flags' *_fields helpers).
_RENAMED = {"network_config": "network_config", "data_dir": "data_dir", "schema": "schema_path",
            "test": "test_path", "round_deadline": "round_deadline_s"}
_PATHS = ("network_config", "data_dir", "schema_path", "test_path", "out")
_PARSED = {"loss": ("loss",), "delay": ("delay_ms", "jitter_ms"),
           "net_partition": ("net_partitions",), "absent": ("absent",),
           "straggler": ("stragglers",), "aggregation": ("aggregation",), "f": ("f",),
           "max_weight_fraction": ("max_weight_fraction",),
           "aggregation_param": ("aggregation_params",), "attack": ("attacks",),
           "echo": ("echo",)}
_DATA_FIELDS = ("data_dir", "label", "schema_path", "test_path")


def flag_fields(args: Any, defaults: Mapping[str, Any],
                given_flags: list[str] | None = None) -> dict[str, Any]:
    """SimulationSpec fields from the flags given on the command line only (those present
    in `args`, whose parser node.ops.flags.track_given set up; or `given_flags`);
    `defaults` are every flag's default, by dest."""
    spec_fields = set(SimulationSpec.__dataclass_fields__)
    names = given_flags if given_flags is not None else flags.given_flags(args, defaults)
    given = {k: getattr(args, k) for k in names if k in defaults}
    full = argparse.Namespace(**{**defaults, **given})
    parsed = {**flags.fault_fields(full), **flags.rules_fields(full),
              **flags.attack_fields(full)}
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
    """The scenario file's pydantic model (built on first use)."""
    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Data(Strict):
        dir: str = Field(min_length=1)
        label: str | None = None
        schema_: str | None = Field(default=None, alias="schema")
        test: str | None = None

    class Model(Strict):
        kind: str | None = None  # node/learn/kinds.py: a built-in kind or a plug-in
        hidden: int | None = Field(default=None, ge=1, le=65536)
        depth: int | None = None  # deep_mlp
        blocks: int | None = None  # res_mlp
        norm: str | None = None  # deep_mlp, res_mlp: layer | group | none
        groups: int | None = None  # norm = "group"
        dropout: float | None = None  # deep_mlp, res_mlp
        options: dict[str, Any] | None = None  # a plug-in's [model.options]
        epochs: int | None = Field(default=None, ge=1)
        batch_size: int | None = Field(default=None, ge=1)
        lr: float | None = Field(default=None, gt=0)
        prox_mu: float | None = Field(default=None, ge=0, le=1e6)  # FedProx
        lr_decay: float | None = Field(default=None, gt=0, le=1)  # round r: lr * lr_decay**r
        control_variates: bool | None = None  # SCAFFOLD-style (node/learn/control.py)

    class Privacy(Strict):
        mode: Literal["off", "update", "record"] | None = None
        clip: float | None = Field(default=None, gt=0)
        epsilon: float | None = Field(default=None, gt=0)
        sigma: float | None = Field(default=None, gt=0)
        delta: float | None = Field(default=None, gt=0, lt=1)
        weight: Literal["auto", "noised", "uniform"] | None = None
        recipe: Literal["fixed", "auto"] | None = None  # record mode (node/privacy/recipe.py)

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
        compression: str | None = None  # rules.compression (gossip/compress.py)
        # [rules] secure (issue 22): secure aggregation, its t and selection
        secure: bool | None = None
        secure_threshold: int | None = Field(default=None, ge=1)
        secure_select: Literal["multi-krum", "norm", "sum", "range"] | None = None
        topology: str | None = None  # rules.topology (gossip/topology.py)

        @field_validator("compression")
        @classmethod
        def _codec(cls, value: str | None) -> str | None:
            if value is not None:
                try:
                    parse_codec(value)
                except LocalError as exc:
                    raise ValueError(str(exc)) from None
            return value

        @field_validator("topology")
        @classmethod
        def _topology(cls, value: str | None) -> str | None:
            if value is not None:
                try:
                    parse_topology(value)
                except LocalError as exc:
                    raise ValueError(str(exc)) from None
            return value

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
              "seed": sc.seed, "compression": sc.compression, "secure": sc.secure,
              "secure_threshold": sc.secure_threshold, "secure_select": sc.secure_select,
              "topology": sc.topology}
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
        f.update(_model_options(sc.model, path))
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


def _model_options(model: Any, path: Path) -> dict[str, Any]:
    """The scenario's [model] kind options (spec.model_options), checked as a node config's
    [model] is (node/learn/kinds.py); {} when it sets none."""
    kind = model.kind or "mlp"
    if is_plugin(kind):
        extra = dict(model.options or {})
    else:
        if model.options:
            raise LocalError(f"scenario file {path}: model.options: a plug-in's; {kind} takes "
                             "depth, blocks, norm, groups and dropout as keys of [model]")
        extra = {k: getattr(model, k) for k in EXTRA_OPTIONS if getattr(model, k) is not None}
    try:
        resolve(kind, None if is_plugin(kind) else model.hidden, extra)
    except ValueError as exc:
        raise LocalError(f"scenario file {path}: model: {exc}") from None
    return {"model_options": extra} if extra else {}


def _options_for_flag(kind: str, file_kind: str, options: Mapping[str, Any],
                      scenario: Path | None, notes: list[str] | None) -> dict[str, Any]:
    """The scenario file's [model] options that apply to --model KIND: all of them for the
    file's own kind; for another built-in kind those it takes (deep_mlp's dropout and norm
    for res_mlp, not its depth); none between a plug-in and another kind (a plug-in's
    [model.options] are its factory's own names). What is left out is said in a note."""
    if kind == file_kind or not options:
        return dict(options)
    if is_plugin(kind) or is_plugin(file_kind):
        kept = {}
    else:
        kept = {k: v for k, v in options.items() if kind in EXTRA_OPTIONS.get(k, ())}
    dropped = sorted(set(options) - set(kept))
    if dropped and notes is not None:
        notes.append(f"--model {kind}: the scenario file {scenario.name if scenario else ''} "
                     f"[model] option(s) {', '.join(dropped)} are {file_kind}'s, not "
                     f"{kind}'s: left out")
    return kept


def build_spec(scenario: Path | None, flags: Mapping[str, Any], *, network: bool = False,
               defaults: Mapping[str, Any] | None = None, notes: list[str] | None = None
               ) -> SimulationSpec:
    """The one place a run's settings come together: the simulator's defaults, then the
    scenario file (if any), then the flags given on the command line (flag_fields), which
    override the file. `network`: scripts/simulate_network.py (the file's transport
    applies); in process the transport is always the memory hub."""
    fields: dict[str, Any] = dict(defaults or {})
    rounds_given = "rounds" in flags
    if scenario is not None:
        from_file, net = read_scenario(scenario)
        rounds_given = rounds_given or "rounds" in from_file
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
    if "model" in flags:  # --model names a kind: of the file's options, those it takes
        fields["model_options"] = _options_for_flag(
            flags["model"], fields.get("model", "mlp"), fields.pop("model_options", {}),
            scenario, notes)
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
    if fields.get("secure") and fields.get("seal") == "off":
        raise LocalError("seal = off (--seal or the scenario file) with secure: a secure round "
                         "seals each member's pieces to their recipient; drop seal off")
    if not fields.get("secure"):
        for key in ("secure_threshold", "secure_select"):
            if fields.get(key) is not None:
                raise LocalError(f"{key} (--{key.replace('_', '-')} or the scenario file) is "
                                 "set but secure is not: it would not apply (add --secure, or "
                                 "secure = true)")
    if fields.get("epsilon") is not None:
        fields["sigma"] = None
    elif fields.get("sigma") is None:
        fields["sigma"] = 1.0
    fields.setdefault("dataset", "default")
    fields.setdefault("nodes", 4)
    fields.setdefault("partition", "dirichlet:0.5")
    fields.setdefault("rounds", 30)
    fields.setdefault("seed", 0)
    fields["rounds_given"] = rounds_given
    return SimulationSpec(**fields)


def spec_from_args(args: Any, *, network: bool = False,
                   notes: list[str] | None = None) -> SimulationSpec:
    """build_spec for a parsed command line (a parser set up with
    node.ops.flags.track_given): the parser's defaults, then args.scenario, then the
    flags typed."""
    defaults = args.flag_defaults
    return build_spec(args.scenario, flag_fields(args, defaults), network=network,
                      defaults=flag_fields(argparse.Namespace(**defaults), defaults,
                                           list(defaults)), notes=notes)

"""`flnode simulate`: a whole consortium in one process on the memory transport.

Everything a real member does happens here too — key files, a consortium
file, node configs on disk, parquet data files, signed envelopes verified on
arrival — only the network is an in-process hub. Same seed, same run: the
split, the partitions, shuffling and (simulation only) the privacy noise all
derive from `--seed`.
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
from sklearn.model_selection import train_test_split

from gossip.errors import LocalError
from gossip.membership import (
    Consortium,
    Member,
    check_member_name,
    read_toml,
    save_consortium,
)
from gossip.transports.memory import MemoryHub
from node.config import ATTACK_PARAMS, AttackConfig, load_config, seals
from node.data import FeatureSchema, encode, fit_schema, load_demo, partition
from node.identity import Identity, save_identity
from node.models import build_model, init_seed_from
from node.privacy import ACCOUNTANT, SeededNoise
from node.rules import DEFAULT_RULE, build_strategy, rules_table
from node.runner import Node
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
    weight: str = "noised"  # record mode: "noised" or "uniform"
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
    # Rehearsed attacks: "KIND[=PARAM]:MEMBER[,MEMBER...]" (node.cli.add_attack_flag);
    # the members named get an [attack] section (node.config.AttackConfig)
    attacks: tuple[str, ...] = ()

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
    """Read (once) and check --network-config, or make the default template."""
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
    if len(members) != spec.nodes:
        raise LocalError(f"{src} lists {len(members)} members but --nodes is {spec.nodes}")
    return NetworkTemplate(head["name"], members)


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
    return section


@dataclass
class Prepared:
    names: list[str]
    schema: FeatureSchema
    config_paths: list[Path]
    train_parts: list[tuple[np.ndarray, np.ndarray]]
    train_all: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    consortium: Consortium


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
    if spec.nodes < 2:
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
    df, label, categorical = load_demo(spec.dataset)
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
    parts = partition(train_df, label, spec.nodes, spec.partition,
                      np.random.default_rng(spec.seed))

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
    rules = rules_table(len(members), spec.aggregation, spec.f, spec.max_weight_fraction, spec.privacy,
                        spec.clip if spec.privacy != "off" else None, **spec.aggregation_params)
    consortium = Consortium(template.name, schema.to_dict(), tuple(members), rules)
    build_strategy(consortium, None, spec.privacy, spec.clip, "--aggregation")
    save_consortium(consortium, out / "consortium.toml")
    test_df.to_parquet(out / "data" / "test.parquet")
    config_paths, train_parts = [], []
    for i, name in enumerate(names):
        part = train_df.iloc[parts[i]]
        part.to_parquet(out / "data" / f"{name}.parquet")
        train_parts.append(encode(part, schema, name))
        cfg = {
            "state_dir": f"../state/{name}",
            "identity": {"key": f"../keys/{name}.key"},
            "consortium": {"path": "../consortium.toml"},
            "data": {"path": f"../data/{name}.parquet", "eval_path": "../data/test.parquet"},
            "model": {"kind": spec.model, "hidden": spec.hidden},
            "training": {"rounds": spec.rounds, "epochs": spec.epochs,
                         "batch_size": spec.batch_size, "lr": spec.lr,
                         "seed": spec.seed * 1000 + i},
            "privacy": privacy_section(spec),
            "gossip": {"transport": spec.transport, "round_deadline_s": spec.round_deadline_s,
                       "seal": spec.seal},
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
    return Prepared(names, schema, config_paths, train_parts, encode(train_df, schema, "train"),
                    encode(test_df, schema, "test"), consortium)


def train_baseline(spec: SimulationSpec, prep: Prepared, X: np.ndarray, y: np.ndarray,
                   seed: int) -> dict[str, float]:
    """Same model, same initial weights, same recipe, R epochs on X alone."""
    model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes, spec.hidden,
                        seed=init_seed_from(prep.consortium))
    train_local(model, X, y, epochs=spec.rounds, batch_size=spec.batch_size, lr=spec.lr,
                generator=torch.Generator().manual_seed(seed))
    return evaluate(model, *prep.test)


async def run_consortium(spec: SimulationSpec, prep: Prepared,
                         on_round: Any = None) -> list[Node]:
    hub = MemoryHub()
    nodes = []
    for i, (name, path) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        if name in spec.absent:  # listed, never started
            continue
        cfg = load_config(path)
        transport = hub.attach(name, prep.names)
        # Simulation on demo data only: reproducible noise. A real node (`flnode
        # run`) always draws its noise from os.urandom.
        nodes.append(Node.from_config(cfg, transport, SeededNoise(spec.seed * 7919 + i)))
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


def result_of(node: Node, test: tuple[np.ndarray, np.ndarray]) -> MemberResult:
    return MemberResult(node.name, evaluate(node.model, *test), node.epsilon(),
                        node.transport.stats.bytes_sent, node.transport.stats.bytes_received,
                        node.rejected(), node.book.current, node.stopped,
                        node.budget.plan.noise_multiplier if node.budget.plan else None)


def summarize(spec: SimulationSpec, prep: Prepared, results: list[MemberResult],
              history: dict[int, dict[str, dict[str, float]]],
              centralized: dict[str, float], local_only: dict[str, dict[str, float]]) -> dict:
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
        "dataset": spec.dataset,
        "metric": metric,
        "nodes": spec.nodes,
        "rounds": spec.rounds,
        "partition": spec.partition,
        "seed": spec.seed,
        "model": spec.model,
        "transport": spec.transport,
        "seal": spec.seal,
        "rules": dict(prep.consortium.rules),
        # The rule, f and caps every member applied (the [rules] with defaults filled in).
        "aggregation": build_strategy(prep.consortium, None, spec.privacy, spec.clip).params,
        "consortium_id": prep.consortium.id.hex(),
        "rows": {name: int(len(prep.train_parts[i][1])) for i, name in enumerate(prep.names)},
        "test_rows": int(len(prep.test[1])),
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
            "weight": ("exact row count" if spec.privacy in ("off", "update") else
                       "row count + N(0, count_sigma²), charged once" if spec.weight == "noised"
                       else "uniform (1 per member)"),
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


AGGREGATION_ACTIONS = ("excluded", "clipped", "weight_capped", "down_weighted")


def seen_by(state: Path, attackers: list[str]) -> dict[str, dict[str, Any]]:
    """What one honest member did about each attacker, from its audit log: the rounds
    it aggregated, in how many the attacker's share was used (and its mean fraction of
    the result), how often the strategy excluded / clipped / capped / down-weighted it
    (by reason), which of its messages were rejected (by reason), and the equivocation
    evidence kept."""
    from node.state import read_jsonl

    rounds: dict[int, dict] = {}
    out: dict[str, dict[str, Any]] = {
        a: {"rounds": 0, "used": 0, "mean_weight": 0.0, "rejected": {}, "evidence": 0,
            **{what: {} for what in AGGREGATION_ACTIONS}} for a in attackers}
    for line in read_jsonl(state / "audit.jsonl"):
        member, outcome = line.get("member"), line.get("outcome")
        if line.get("kind") == "aggregate":
            rounds[line["round"]] = line  # a round re-run after a restart: the last wins
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
    return out


def baselines(spec: SimulationSpec, prep: Prepared) -> tuple[dict[str, float],
                                                              dict[str, dict[str, float]]]:
    centralized = train_baseline(spec, prep, *prep.train_all, seed=spec.seed)
    local_only = {name: train_baseline(spec, prep, *prep.train_parts[i], seed=spec.seed + i)
                  for i, name in enumerate(prep.names)}
    return centralized, local_only


def write_outputs(spec: SimulationSpec, summary: dict) -> None:
    (spec.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    from node.report import plot_history

    plot_history(summary, spec.out / "accuracy.png")


def simulate(spec: SimulationSpec, console: Any = None) -> dict:
    from node.report import RoundPrinter, print_summary

    torch.set_num_threads(1)  # measured 3-15x faster for small models on 2 cores
    prep = prepare(spec)
    printer = RoundPrinter(spec, spec.present(prep.names), metric_name(prep.schema.n_classes),
                           console)
    printer.header(prep)
    nodes = asyncio.run(run_consortium(spec, prep, printer.on_round))
    printer.done()
    centralized, local_only = baselines(spec, prep)
    summary = summarize(spec, prep, [result_of(n, prep.test) for n in nodes], printer.history,
                        centralized, local_only)
    write_outputs(spec, summary)
    print_summary(summary, spec.out, console)
    print_attack(summary, console)
    return summary


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
            parts.append(f"{a}: used {e['used']}/{e['rounds']} rounds"
                         + "".join(f", {k} {v}" for k, v in sorted(acts.items())))
        console.print(f"    {name} saw " + "; ".join(parts))


"""What a run produced: each member's result and summary.json's dict (summarize), the
members' own-row figures and what the honest members did about each attacker (seen_by)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.learn.train import evaluate, metric_name
from node.ops.status import flood_by_member
from node.privacy.accountant import ACCOUNTANT
from node.rehearsal.config import AttackConfig
from node.rehearsal.simulation.prepare import XY, Prepared
from node.rehearsal.simulation.run import evaluate_rows, noise_kind
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.node import Node
from node.runtime.state import read_jsonl
from node.strategy.consortium_rules import build_strategy


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
        **({"model_options": dict(spec.model_options)} if spec.model_options else {}),
        # local training: what every member ran (prox_mu: FedProx's proximal term, 0 = off;
        # round r's rate lr * lr_decay**r; control_variates: SCAFFOLD-style, node/learn/control.py)
        "training": {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
                     "prox_mu": spec.prox_mu, "lr_decay": spec.lr_decay,
                     "control_variates": spec.control_variates},
        "transport": spec.transport,
        "seal": spec.node_seal,  # what the nodes ran: "on" under --secure
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
    for a, f in flood_by_member(read_jsonl(state / "metrics.jsonl")).items():
        if a in out:
            out[a]["rejected"]["flood"] = f["dropped"]
    return out

"""What a person sees of a simulated run: per-round progress, the summary table, the
plot, summary.json on disk; and `simulate`, the whole in-process run end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from gossip.topology import parse_topology
from node.learn.train import metric_name
from node.ops.report_html import negative_gain_note
from node.rehearsal.simulation.consensus import ConsensusTracker, plot_consensus
from node.rehearsal.simulation.prepare import evaluation_rows, prepare
from node.rehearsal.simulation.results import AGGREGATION_ACTIONS, result_of, summarize
from node.rehearsal.simulation.run import NOISE_OS, baselines, simulate_members
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.round_report import RoundReport, secure_text


def _eps(value: float | None) -> str:
    if value is None:
        return "∞ (no DP)"
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# A member's 95 % interval half-width from which the round line says so (a metric on
# the 2,000-row common test set stays well below; 16 own rows are about ±0.25).
WIDE_INTERVAL = 0.05


class RoundPrinter:
    """Collects per-round reports from all nodes; prints a line when a round is complete."""

    def __init__(self, spec: Any, names: list[str], metric: str, console: Console | None) -> None:
        self.spec = spec
        self.names = names
        self.metric = metric
        self.console = console or make_console()
        self.history: dict[int, dict[str, dict[str, float]]] = {}
        self.eps: dict[str, float | None] = {}
        self.stopped: set[str] = set()
        self.widths: dict[int, list[float]] = {}  # per round: each member's interval half-width
        self.secure: dict[int, dict[str, str]] = {}  # per round: each member's secure outcome

    def header(self, prep: Any) -> None:
        s = self.spec
        rows = ", ".join(f"{n} {len(p[1])}"
                         for n, p in zip(prep.names, prep.train_parts, strict=True))
        priv = ("privacy off" if s.privacy == "off"
                else f"privacy {s.privacy}: clip {s.clip}, "
                     + (f"ε {s.epsilon:g} per member" if s.epsilon is not None else f"σ {s.sigma}")
                     + f", δ {s.delta:g}")
        where = (f"{s.dataset}, {len(prep.names)} members ({s.partition})" if s.data_dir is None
                 else f"data dir {s.data_dir}, {len(prep.names)} members (one file each)")
        evals = ("each round's metric on it" if s.data_dir is None
                 else "each round's metric on the member's own held-out rows")
        self.console.print(
            f"[bold]flnode simulate[/]: {where}, "
            f"{s.rounds} rounds, {s.model}, seed {s.seed}, {priv}\n"
            f"  consortium {prep.consortium.name} id {prep.consortium.id.hex()[:16]}… "
            f"run dir {s.out}\n  training rows: {rows}; {prep.test_source}; {evals}")
        for note in getattr(prep, "notes", ()):
            self.console.print(f"  [yellow]note[/]: {note}")

    def on_round(self, rep: RoundReport) -> None:
        if rep.stopped:
            self.stopped.add(rep.member)
            self.console.print(f"  [yellow]{rep.member}[/]: {rep.stopped}")
            return
        self.history.setdefault(rep.round, {})[rep.member] = rep.metrics
        iv = (rep.intervals or {}).get(self.metric)
        if iv:
            self.widths.setdefault(rep.round, []).append((iv[1] - iv[0]) / 2)
        self.eps[rep.member] = rep.epsilon
        if rep.secure is not None:  # the daemon's wording (round_report.secure_text)
            self.secure.setdefault(rep.round, {})[rep.member] = secure_text(rep.secure)
        done = self.history[rep.round]
        if len(done) == len(set(self.names) - self.stopped):
            vals = {n: done[n][self.metric] for n in self.names if n in done}
            eps = max((e for e in self.eps.values() if e is not None), default=None)
            per = " ".join(f"{v:.3f}" for v in vals.values())
            widest = max(self.widths.pop(rep.round, []), default=0.0)
            # Each member's figure is on its own held-out rows: say how far few rows carry.
            noise = (f"  [dim]95 % up to ±{widest:.2f} (few held-out rows)[/]"
                     if widest >= WIDE_INTERVAL else "")
            self.console.print(
                f"  round {rep.round + 1:>3}/{self.spec.rounds}  mean {self.metric} "
                f"{mean_text(vals)}  [dim]({per})[/]  ε {_eps(eps)}{noise}"
                + secure_round_text(self.secure.pop(rep.round, {})))

    def done(self) -> None:
        self.console.print("  consortium finished; training the centralized and local-only "
                           "baselines …")


SECURE_INDENT = " " * 15  # under the round line's "mean …", past "  round   1/3"


def secure_round_text(by_member: dict[str, str]) -> str:
    """A secure round on the simulator's round line: what the members' own round lines
    say (who dealt, entered, was selected; failed and why), once when they agree, else each
    outcome with the members who saw it; on lines of their own under the round's (the round
    line is near the console's 120 columns already). "" for a plain round."""
    if not by_member:
        return ""
    seen: dict[str, list[str]] = {}
    for name, text in by_member.items():
        seen.setdefault(text, []).append(name)
    if len(seen) == 1:
        return f"\n{SECURE_INDENT}{next(iter(seen))}"
    return "".join(f"\n{SECURE_INDENT}{text} ({', '.join(names)})"
                   for text, names in seen.items())


def mean_text(values: dict[str, float]) -> str:
    """A round's mean metric over the members where it is defined, naming those where it
    is not (ROC-AUC on held-out rows of one class): "0.9315 (n/a: bank-2)", never "nan"."""
    defined = [v for v in values.values() if not math.isnan(v)]
    undefined = [n for n, v in values.items() if math.isnan(v)]
    text = f"{sum(defined) / len(defined):.4f}" if defined else "n/a"
    return text + (f" (n/a: {', '.join(undefined)})" if undefined and defined else "")


def make_console() -> Console:
    """A console that does not squeeze the summary table when output is piped."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _gain(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.4f}"


def print_own_rows(summary: dict, console: Console) -> None:
    """Per member: its local-only model vs the consortium's on its OWN held-out rows."""
    own = summary.get("own_rows") or {}
    if not own:
        return
    metric = summary["metric"]
    t = Table(title=f"{summary['dataset']}: {metric} on each member's own held-out rows "
                    "(local-only model vs consortium model)",
              caption=summary.get("own_rows_source") or None)
    for col in ("member", "own rows", "local-only", "consortium", "gain"):
        t.add_column(col, justify="left" if col == "member" else "right")
    for name, r in own.items():
        t.add_row(name, str(r["rows"]), _fmt(r["local_only"]), _fmt(r["consortium"]),
                  _gain(r["gain"]))
    gains = [r["gain"] for r in own.values() if not math.isnan(r["gain"])]
    if gains:
        t.add_row("[bold]mean gain[/]", "", "", "", f"{sum(gains) / len(gains):+.4f}",
                  end_section=True)
    console.print(t)
    for name, r in own.items():
        if math.isnan(r["gain"]):
            why = ("it has no held-out rows" if not r["rows"] else
                   f"its {r['rows']} held-out rows hold one class only" if metric != "accuracy"
                   else "no score")
            console.print(f"  n/a: {metric} is undefined on {name}'s own rows: {why}")
    small = [f"{n} ({r['rows']})" for n, r in own.items() if 0 < r["rows"] < 30]
    if small:
        console.print(f"  few own rows: {', '.join(small)}: its gain moves a lot with one row")
    why = negative_gain_note(summary)
    if why:
        console.print(f"  {why}", highlight=False)


def print_summary(summary: dict, out: Path, console: Console | None = None) -> None:
    console = console or make_console()
    print_own_rows(summary, console)
    if summary.get("common_test") is False:  # only own rows: the table above, the rest here
        _print_run_facts(summary, out, console, pooled=True)
        return
    metric = summary["metric"]
    test_set = summary.get("test_set") or f"the consortium test set ({summary['test_rows']} rows)"
    t = Table(title=f"{summary['dataset']}: {metric} on {test_set}; "
                    f"ε at δ={summary['epsilon']['delta']:g}")
    for col in ("member", "rows", "local-only", "consortium", "gain", "ε", "sent", "received",
                "rejected"):
        t.add_column(col, justify="left" if col in ("member", "rejected") else "right")
    for name, cons in summary["consortium"]["per_node"].items():
        local = summary["local_only"]["per_node"][name]
        rej = summary["rejected_per_node"].get(name, {})
        t.add_row(name, str(summary["rows"][name]), f"{local:.4f}", f"{cons:.4f}",
                  f"{cons - local:+.4f}", _eps(summary["epsilon"]["per_node"][name]),
                  _bytes(summary["bytes"][name]["sent"]),
                  _bytes(summary["bytes"][name]["received"]),
                  ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) or "none")
    lo, co = summary["local_only"]["mean"], summary["consortium"]["mean"]
    t.add_row("[bold]mean[/]", str(sum(summary["rows"].values())), f"{lo:.4f}", f"{co:.4f}",
              f"{co - lo:+.4f}", "", "", "", "", end_section=True)
    t.add_row("[bold]centralized[/]", str(sum(summary["rows"].values())), "",
              f"{summary['centralized']:.4f}", "", "∞ (no DP)", "", "", "")
    console.print(t)
    _print_run_facts(summary, out, console, pooled=False)


def _print_run_facts(summary: dict, out: Path, console: Console, pooled: bool) -> None:
    co = summary["consortium"]["mean"]
    if pooled:  # no common test set: the members' held-out rows pooled stand in for one
        t = Table(title=f"{summary['metric']} on {summary.get('test_set', 'pooled rows')}; "
                        f"ε at δ={summary['epsilon']['delta']:g}")
        for col in ("member", "train rows", "ε", "sent", "received", "rejected"):
            t.add_column(col, justify="left" if col in ("member", "rejected") else "right")
        for name in summary["consortium"]["per_node"]:
            rej = summary["rejected_per_node"].get(name, {})
            t.add_row(name, str(summary["rows"][name]),
                      _eps(summary["epsilon"]["per_node"][name]),
                      _bytes(summary["bytes"][name]["sent"]),
                      _bytes(summary["bytes"][name]["received"]),
                      ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) or "none")
        console.print(t)
        console.print(f"  on the pooled held-out rows: consortium mean {co:.4f}, local-only "
                      f"mean {summary['local_only']['mean']:.4f}, centralized "
                      f"{summary['centralized']:.4f}")
    for name, why in summary.get("stopped", {}).items():
        console.print(f"  [yellow]{name} stopped sharing[/]: {why}")
    eps = summary["epsilon"]
    plan = secure_dp_plan(summary, out)
    if plan is not None:  # issue 22: one consortium DP-SGD step per secure round
        console.print(f"  privacy: record-level on the secure sum, accountant {eps['accountant']}, "
                      f"δ {plan['delta']:g}, budget ε {plan['epsilon']:g} per member; the "
                      f"consortium's plan: {plan['steps']} rounds, q {plan['sample_rate']:.3g}, "
                      f"σ {plan['noise_multiplier']:.3g} on the sum of {plan['min_contributors']}"
                      f"+ members (t = {plan['coalition']} colluding), lr {plan['lr']:g}")
    elif eps["mode"] != "off":
        console.print(f"  privacy: {eps['mode']}-level, accountant {eps['accountant']}, "
                      f"δ {eps['delta']:g}"
                      + (f", budget ε {eps['budget']:g} per member" if eps.get("budget") else "")
                      + "; σ per member: " + ", ".join(
                          f"{n} {s:.3f}" for n, s in eps["noise_multiplier_per_node"].items()
                          if s is not None)
                      + f"; share weight: {eps['weight']}")
    agg = summary.get("aggregation")  # what the consortium's [rules] resolve to
    if agg:
        cap = agg.get("max_weight_fraction")
        opt = agg.get("server_opt") or "none"
        server = "" if opt == "none" else (
            f", then a {SERVER_OPT_NAMES.get(opt, opt)} step (server_lr {agg.get('server_lr')}"
            + (f", decay {agg['server_lr_decay']:g} a round"
               if agg.get("server_lr_decay", 1) != 1 else "") + ")")
        rules = summary.get("rules") or {}
        if rules.get("secure"):  # issue 22: the selection runs on the pieces, not the rule
            console.print("  aggregation (the consortium's \\[rules]): secure, t = "
                          f"{rules.get('secure_threshold')}, selection "
                          f"{rules.get('secure_select')}, " + (
                              "the plan's SGD step on the noised sum" if plan is not None
                              else "the selected members' mean" + server))
        else:
            console.print("  aggregation (the consortium's \\[rules]): "
                          f"{agg['rule']}, f = {agg['f']}"
                          + (f", no member above {cap:.3g} of the weight" if cap else "") + server)
    # Two lines: the result, then where it is (one line used to glue them together).
    console.print(f"  consortium − centralized: {co - summary['centralized']:+.4f}")
    console.print(f"  wrote {out / 'summary.json'} and {out / 'accuracy.png'}")


def secure_dp_plan(summary: dict, out: Path) -> dict | None:
    """--secure with DP: the consortium's plan as the first member pinned it (None: none)."""
    if not (summary.get("rules") or {}).get("secure_epsilon"):
        return None
    for name in summary["epsilon"].get("per_node", {}):
        path = out / "state" / name / "secure_plan.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


SERVER_OPT_NAMES = {"momentum": "FedAvgM", "adam": "FedAdam", "yogi": "FedYogi"}


def plot_history(summary: dict, path: Path) -> None:
    # lean start: matplotlib (~0.5 s) only when a plot is drawn, not for the tables
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lean start: the same, after the backend is chosen

    metric = summary["metric"]
    rounds = sorted(int(r) for r in summary["history"])
    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(summary["consortium"]["per_node"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = {name: [summary["history"][str(r)].get(name, float("nan")) for r in rounds]
              for name in names}
    xs = [r + 1 for r in rounds]
    same = len({tuple(c) for c in curves.values()}) == 1
    if same:  # every member averaged the same shares: one curve, not four on top of each other
        ax.plot(xs, curves[names[0]], color="black", lw=2,
                label="consortium (every member holds the same model)")
    for i, name in enumerate(names):
        c = colors[i % len(colors)]
        if not same:
            ax.plot(xs, curves[name], color=c, label=f"{name} (consortium)")
        # With --data-dir each round's metric is on the member's own held-out rows: its
        # local-only level there too.
        own = (summary.get("own_rows") or {}).get(name) if summary.get("data_dir") else None
        local = own["local_only"] if own else summary["local_only"]["per_node"][name]
        ax.axhline(local, color=c, ls=":", lw=1.2, label=f"{name} local-only")
    ax.axhline(summary["centralized"], color="black", ls="--", lw=1.5, label="centralized")
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", "-").upper() if metric != "accuracy" else "accuracy")
    eps = summary["epsilon"]
    priv = "privacy off" if eps["mode"] == "off" else \
        f"{eps['mode']}-level DP, σ={eps['sigma']}, C={eps['clip']}"
    ax.set_title(f"{summary['dataset']}: {summary['nodes']} members, {summary['partition']}, "
                 f"{priv}")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def noise_line(summary: dict) -> str | None:
    """The terminal's line on where the privacy noise came from (privacy on only)."""
    if summary["epsilon"]["mode"] == "off":
        return None
    if summary.get("noise") == NOISE_OS:
        return ("  noise: drawn from os.urandom (a fresh draw every run: the same seed does "
                "not give the same released values)")
    return ("  noise: seeded from --seed (demo data: the run is reproducible, and so is "
            "the noise: not a privacy guarantee; a real node and --data-dir use os.urandom)")


def write_outputs(spec: SimulationSpec, summary: dict) -> None:
    (spec.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    plot_history(summary, spec.out / "accuracy.png")


def simulate(spec: SimulationSpec, console: Any = None, notes: list[str] | None = None,
             backend: str = "process", address: str | None = None,
             members_per_actor: int = 1) -> dict:
    """The whole run. backend "ray": the members' training on Ray actors (ray_backend.py),
    `members_per_actor` to an actor, on the cluster at `address` (HOST:PORT) or a local
    one; everything else as "process"."""
    if backend == "ray":
        # lean start: ray and its cluster only for --backend ray
        from node.rehearsal.simulation.ray_backend import ray_cluster

        with ray_cluster(address) as ray:  # an unreachable --address is refused before prepare
            return _simulate(spec, console, notes, ray, members_per_actor)
    return _simulate(spec, console, notes, None)


def _simulate(spec: SimulationSpec, console: Any, notes: list[str] | None, ray: Any,
              members_per_actor: int = 1) -> dict:
    torch.set_num_threads(1)  # measured 3-15x faster for small models on 2 cores
    prep = prepare(spec)
    if prep.rounds is not None:  # --secure with DP: the consortium plan's rounds
        spec = dataclasses.replace(spec, rounds=prep.rounds)
    prep.notes[:0] = notes or []
    printer = RoundPrinter(spec, spec.present(prep.names), metric_name(prep.schema.n_classes),
                           console)
    executor = None
    if ray is not None:
        from node.rehearsal.simulation.ray_backend import RayTraining  # lean start: as above

        executor = RayTraining(ray, spec.present(prep.names), members_per_actor)
        where = Counter(executor.hosts.values())
        actors = (f"{len(executor.actors)} member actors" if members_per_actor == 1 else
                  f"{len(executor.actors)} members on {len(executor.pool)} actors "
                  f"(up to {members_per_actor} each)")
        prep.notes.append(f"--backend ray: {actors} on "
                          f"{len(where)} Ray node(s) ("
                          + ", ".join(f"{w} ×{n}" for w, n in sorted(where.items()))
                          + "); messages and aggregation on this driver"
                          + ("; record-level DP and secure rounds train here too (their noise "
                             "is drawn inside the training, from this machine's OS)"
                             if spec.privacy == "record" or spec.secure else ""))
    printer.header(prep)
    # A sparse topology: how far the members' models are apart, round by round.
    tracker = None if parse_topology(spec.topology).full else ConsensusTracker(
        len(spec.present(prep.names)))
    try:
        nodes = simulate_members(spec, prep, printer.on_round, tracker, executor)
    finally:
        if executor is not None:
            executor.shutdown()  # done already when the loop closed; its actors' memory:
    rss = executor.last_rss if executor is not None else []
    if rss:  # what the members cost the cluster: one process per actor
        printer.console.print(f"  --backend ray: {len(rss)} actor processes held "
                              f"{sum(rss) / 2**20:.0f} MiB resident (largest "
                              f"{max(rss) / 2**20:.0f} MiB) after the last round")
    printer.done()
    centralized, local_only = baselines(spec, prep)
    results = []
    for n in nodes:
        test, own_parts = evaluation_rows(prep, n.state.path)
        own = dict(zip(prep.names, own_parts, strict=True)) if own_parts else {}
        results.append(result_of(n, test, own.get(n.name)))
    summary = summarize(spec, prep, results, printer.history, centralized, local_only)
    if tracker is not None:
        summary.update(tracker.close())
    write_outputs(spec, summary)
    if tracker is not None:
        cd = summary["consensus_relative"]
        plot_consensus(cd, f"{spec.topology}: {summary['nodes']} members",
                       spec.out / "consensus.png")
        (console or make_console()).print(
            f"  consensus distance ({spec.topology}; RMS of each model's distance to the "
            f"members' mean, over its norm): round 1 {cd.get('0', float('nan')):.3g}, "
            f"round {len(cd)} {cd.get(str(len(cd) - 1), float('nan')):.3g}; "
            f"{spec.out / 'consensus.png'}")
    print_summary(summary, spec.out, console)
    print_noise(summary, console)
    print_attack(summary, console)
    return summary


def print_noise(summary: dict, console: Any = None) -> None:
    line = noise_line(summary)
    if line is not None:
        (console or make_console()).print(line, markup=False, highlight=False)


def print_attack(summary: dict, console: Any = None) -> None:
    """A line per attacker: who attacked how, and the honest members' mean metric."""
    attack = summary.get("attack") or {}
    if not attack.get("attackers"):
        return
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

"""`flnode keygen | consortium | run | status | simulate`.

Errors the operator can fix (`LocalError`) print one clear message and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gossip.errors import LocalError


def _keygen(args: argparse.Namespace) -> int:
    from node.identity import Identity, save_identity

    ident = Identity.generate(args.name)
    secret, public = save_identity(ident, args.out)
    print(f"wrote {secret} (private, mode 0600) and {public}")
    print(f"member {ident.name}: public key {ident.public_key.hex()}  {ident.fingerprint}")
    return 0


def _consortium_build(args: argparse.Namespace) -> int:
    import tomllib

    from gossip.membership import Consortium, Member, save_consortium
    from node.data import FeatureSchema
    from node.identity import load_public_key

    schema_path = Path(args.schema)
    try:
        schema_doc = tomllib.loads(schema_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LocalError(f"--schema {schema_path}: {exc}") from None
    schema = FeatureSchema.from_dict(schema_doc, str(schema_path))  # validate before agreeing
    members = []
    for spec in args.member:
        pub, _, addr = spec.partition("@")
        name, key = load_public_key(pub)
        addresses = dict(a.split("=", 1) for a in addr.split(",") if "=" in a) if addr else {}
        members.append(Member(name, key, addresses))
    from node.rules import build_strategy, rules_table

    f = rules_fields(args)
    rules = rules_table(len(members), f["aggregation"], f["f"], f["max_weight_fraction"], args.privacy_mode,
                        args.clip, **f["aggregation_params"])
    consortium = Consortium(args.name, schema.to_dict(), tuple(members), rules)
    build_strategy(consortium, None, args.privacy_mode or "off", args.clip or 1.0,
                   "--aggregation")  # refuse a rule this consortium cannot run
    out = Path(args.out)
    if out.exists() and not args.force:
        raise LocalError(f"--out {out} exists; pass --force to replace it")
    save_consortium(consortium, out)
    print(f"wrote {out}: consortium {args.name!r}, {len(members)} members, "
          f"id {consortium.id.hex()}")
    return 0


def _consortium_show(args: argparse.Namespace) -> int:
    from gossip.membership import load_consortium
    from node.identity import fingerprint

    c = load_consortium(args.file)
    print(f"consortium {c.name!r}\n  id       {c.id.hex()}")
    for part, digest in c.digests().items():
        print(f"  {part:<8} {digest}")
    for m in c.members:
        addrs = ", ".join(f"{k}={v}" for k, v in m.addresses.items()) or "-"
        print(f"  member {m.name:<20} {fingerprint(m.public_key)}  {addrs}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from node.simulation import SimulationSpec, simulate

    spec = SimulationSpec(
        dataset=args.dataset, nodes=args.nodes, partition=args.partition, rounds=args.rounds,
        seed=args.seed, out=Path(args.out), model=args.model, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, privacy=args.privacy, clip=args.clip,
        sigma=None if args.epsilon is not None else (args.sigma or 1.0), epsilon=args.epsilon,
        delta=args.delta, weight=args.weight,
        network_config=Path(args.network_config) if args.network_config else None,
        seal=args.seal, **fault_fields(args), **rules_fields(args), **attack_fields(args),
    )
    simulate(spec)
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from node.status import collect, render

    s = collect(args.state_dir)
    print(json.dumps(s, indent=2, sort_keys=True) if args.json else render(s))
    return 0


def _run(args: argparse.Namespace) -> int:
    from node.daemon import main as run_main

    return run_main(args.config)


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_seal_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seal", choices=["auto", "on", "off"], default="auto",
                   help="gossip.seal for every node: seal shares to the members' prekeys "
                        "(auto: on for mqtt only)")


def add_privacy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--privacy", choices=["off", "update", "record"], default="off",
                   help="update: clip + noise each round's update (protects a member's "
                        "contribution); record: DP-SGD (protects each record)")
    p.add_argument("--clip", type=_positive(float), default=1.0,
                   help="clip norm C (of the update, or of each example's gradient)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epsilon", type=_positive(float), default=None,
                        help="total ε per member over the run; σ is calibrated up front")
    budget.add_argument("--sigma", type=_positive(float), default=None,
                        help="noise multiplier σ (default 1.0 when no --epsilon)")
    p.add_argument("--delta", type=_positive(float), default=1e-5)
    p.add_argument("--weight", choices=["noised", "uniform"], default="noised",
                   help="record mode: share weight = noised row count (charged) or 1")


def add_rules_flags(p: argparse.ArgumentParser) -> None:
    """The consortium's [rules] (node/rules.py): how every member combines shares."""
    from node.rules import DEFAULT_RULE

    p.add_argument("--aggregation", default=DEFAULT_RULE, metavar="RULE",
                   help=f"aggregation rule every member applies (default {DEFAULT_RULE}: "
                        "multi_krum from 5 members, trimmed_mean for 3-4, mean for 2; "
                        "mean, median, trimmed_mean, norm_bounded_mean, krum, multi_krum, "
                        "centered_clipping)")
    p.add_argument("--f", type=int, default=None, metavar="F",
                   help="hostile members the rule must survive (default 1; 0 below 3 members)")
    p.add_argument("--max-weight-fraction", type=_positive(float), default=None, metavar="X",
                   help="no member above this fraction of the total weight "
                        "(default max(2/n, 0.25))")
    p.add_argument("--aggregation-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a rule parameter (e.g. m=5, tau=1.0, distance=clip)")


def rules_fields(args: argparse.Namespace) -> dict:
    params = {}
    for item in args.aggregation_param:
        key, sep, value = item.partition("=")
        if not sep:
            raise LocalError(f"--aggregation-param {item!r}: expected KEY=VALUE")
        try:
            params[key] = int(value)
        except ValueError:
            try:
                params[key] = float(value)
            except ValueError:
                params[key] = value
    return dict(aggregation=args.aggregation, f=args.f,
                max_weight_fraction=args.max_weight_fraction, aggregation_params=params)


def add_fault_flags(p: argparse.ArgumentParser) -> None:
    """Rehearse a bad network (both simulators): written into each node's [faults]."""
    g = p.add_argument_group("faults (rehearsal)")
    g.add_argument("--loss", type=float, default=0.0, metavar="P",
                   help="each member drops each message it receives with probability P")
    g.add_argument("--delay", default="0", metavar="MS[:JITTER]",
                   help="each message arrives MS ms late, ± JITTER ms (reorders them too)")
    g.add_argument("--net-partition", action="append", default=[], metavar="A,B@ROUND:ROUNDS",
                   help="cut members A,B off from the rest for ROUNDS rounds from ROUND "
                        "(1-based); heals afterwards")
    g.add_argument("--absent", action="append", default=[], metavar="NAME",
                   help="a listed member that never starts")
    g.add_argument("--straggler", action="append", default=[], metavar="NAME:FACTOR",
                   help="that member trains FACTOR times slower")


def fault_fields(args: argparse.Namespace) -> dict:
    """SimulationSpec fields from add_fault_flags' flags; LocalError names the flag."""
    delay, _, jitter = args.delay.partition(":")
    try:
        delay_ms, jitter_ms = float(delay), float(jitter or 0)
    except ValueError:
        raise LocalError(f"--delay {args.delay!r}: expected MS or MS:JITTER") from None
    if not (0 <= args.loss < 1):
        raise LocalError(f"--loss {args.loss}: a probability in [0, 1)")
    stragglers = []
    for s in args.straggler:
        name, _, factor = s.partition(":")
        try:
            stragglers.append((name, float(factor)))
        except ValueError:
            raise LocalError(f"--straggler {s!r}: expected NAME:FACTOR, e.g. bank-2:3") from None
    return dict(loss=args.loss, delay_ms=delay_ms, jitter_ms=jitter_ms,
                net_partitions=tuple(args.net_partition), absent=tuple(args.absent),
                stragglers=tuple(stragglers))


def add_attack_flags(p: argparse.ArgumentParser) -> None:
    """Rehearse hostile members (both simulators): written into the attackers' [attack]."""
    g = p.add_argument_group("attacks (rehearsal: hostile members with valid keys)")
    g.add_argument("--attack", action="append", default=[], metavar="KIND[=PARAM]:MEMBERS",
                   help="MEMBERS (comma-separated names) attack: sign-flip[=K] (start - K x "
                        "update, K 1), scale[=K] (K x model, K -1000), noise[=SIGMA] (+ "
                        "N(0, SIGMA²), 1), huge (1e30), weight[=W] (declares W, 1e12; "
                        "combines with another kind for the same member), nan, label-flip, "
                        "zero-prekey (needs sealing), equivocate, replay. Repeatable; "
                        "KIND:PARAM:MEMBERS also works, e.g. scale:10:bank-1")


def attack_fields(args: argparse.Namespace) -> dict:
    """SimulationSpec fields from add_attack_flags' flag (checked in prepare())."""
    return dict(attacks=tuple(args.attack))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flnode", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("keygen", help="generate a member's Ed25519 key pair")
    k.add_argument("--out", required=True, help="directory for NAME.key (0600) and NAME.pub")
    k.add_argument("--name", required=True, help="member name, e.g. bank-0")
    k.set_defaults(func=_keygen)

    c = sub.add_parser("consortium", help="build or inspect a consortium peer list")
    csub = c.add_subparsers(dest="action", required=True)
    cb = csub.add_parser("build", help="build a consortium file from public key files")
    cb.add_argument("--name", required=True, help="consortium name")
    cb.add_argument("--schema", required=True, help="feature schema (TOML)")
    cb.add_argument("--member", action="append", required=True, metavar="PUB[@k=v,...]",
                    help="a member's NAME.pub, optionally with addresses, e.g. "
                         "keys/bank-0.pub@memory=bank-0 (repeat per member)")
    add_rules_flags(cb)
    cb.add_argument("--privacy-mode", choices=["off", "update", "record"], default=None,
                    help="[rules]: every member's privacy.mode must be this")
    cb.add_argument("--clip", type=_positive(float), default=None,
                    help="[rules]: every member's privacy.clip must be this")
    cb.add_argument("--out", required=True)
    cb.add_argument("--force", action="store_true")
    cb.set_defaults(func=_consortium_build)
    cs = csub.add_parser("show", help="print a consortium's id, part digests and members")
    cs.add_argument("file")
    cs.set_defaults(func=_consortium_show)

    r = sub.add_parser("run", help="run one member as a daemon on a network transport")
    r.add_argument("--config", required=True, help="the node's TOML config")
    r.set_defaults(func=_run)

    st = sub.add_parser("status", help="a node's round, ε spent, metrics, peers, rejections")
    st.add_argument("--state-dir", required=True)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    s = sub.add_parser("simulate", help="simulate a consortium in one process")
    s.add_argument("--dataset", choices=["default", "churn", "digits"], default="default")
    s.add_argument("--nodes", type=_positive(int), default=4)
    s.add_argument("--partition", default="dirichlet:0.5",
                   help="iid | dirichlet:ALPHA | column:NAME")
    s.add_argument("--rounds", type=_positive(int), default=30)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--model", choices=["logreg", "mlp"], default="mlp")
    s.add_argument("--epochs", type=_positive(int), default=1, help="local epochs per round")
    s.add_argument("--batch-size", type=_positive(int), default=32)
    s.add_argument("--lr", type=_positive(float), default=0.05)
    add_privacy_flags(s)
    s.add_argument("--network-config", help="template with member names and addresses")
    add_seal_flag(s)
    add_rules_flags(s)
    add_fault_flags(s)
    add_attack_flags(s)
    s.add_argument("--out", required=True, help="run directory (created; must be new)")
    s.set_defaults(func=_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LocalError as exc:
        print(f"flnode: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

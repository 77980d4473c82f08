"""The argparse pieces `flnode` and both simulators share (`flnode simulate`,
scripts/simulate_network.py, `flnode consortium build`): flag groups, their parsers into
SimulationSpec fields, and which flags the command line typed.

A leaf: it imports neither node.cli nor the simulation (both import it), nor anything
heavy, since every command, `flnode status` included, builds the parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from gossip.errors import LocalError


def track_given(p: argparse.ArgumentParser, keep: tuple[str, ...] = ()) -> dict:
    """Let a scenario file's value stand unless its flag is typed: every option of `p`
    (but --help and those in `keep`) gets argparse.SUPPRESS as its default, so a flag
    the command line does not name is absent from the parsed namespace (given_flags
    lists those present). Returns the real defaults by dest; --help is unchanged (no help
    text here shows a default)."""
    defaults = {}
    for action in p._actions:  # noqa: SLF001 - argparse has no public walk of its options
        if not action.option_strings or action.dest in ("help", *keep):
            continue
        defaults[action.dest] = action.default
        action.default = argparse.SUPPRESS
    return defaults


def given_flags(args: argparse.Namespace, defaults: Mapping[str, Any]) -> list[str]:
    """The dests of the flags (tracked by track_given) the command line typed."""
    return [dest for dest in defaults if dest in vars(args)]


SIMULATE_EPILOG = (
    "A scenario file (e.g. network_configs/scenarios/banks-4-default.toml) holds these "
    "settings in one TOML; flags given on the command line override the file's values. "
    "--data-dir DIR: one NAME.csv or NAME.parquet per member (the member's name is the "
    "stem); DIR/test.csv (or --test FILE) is the consortium's common test set, else each "
    "member evaluates on its own held-out 20 % of rows, as `flnode run` does without "
    "data.eval_path. The privacy noise on the members' own files comes from os.urandom, as "
    "in every `flnode run` (the same seed twice: other noise); only `flnode simulate` on a "
    "built-in table seeds it from --seed (summary.json's \"noise\" says which).")


def add_data_dir_flags(p: argparse.ArgumentParser) -> None:
    """Both simulators: rehearse on the members' own files instead of a built-in table."""
    g = p.add_argument_group("your own files (instead of --dataset, --nodes, --partition)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="one CSV or Parquet file per member (member name = file stem)")
    g.add_argument("--label", metavar="COL",
                   help="the label column (default: the schema's, else 'label')")
    g.add_argument("--schema", metavar="FILE",
                   help="the consortium's filled schema (normalize = \"declared\"); without "
                        "it one is drafted from the pooled files, which only a simulator can do")
    g.add_argument("--test", metavar="FILE",
                   help="a common test set (default DIR/test.csv or DIR/test.parquet, if any)")


def positive(kind: type):
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
    p.add_argument("--clip", type=positive(float), default=1.0,
                   help="clip norm C (of the update, or of each example's gradient)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epsilon", type=positive(float), default=None,
                        help="total ε per member over the run; σ is calibrated up front")
    budget.add_argument("--sigma", type=positive(float), default=None,
                        help="noise multiplier σ (default 1.0 when no --epsilon)")
    p.add_argument("--delta", type=positive(float), default=1e-5)
    p.add_argument("--weight", choices=["auto", "noised", "uniform"], default="auto",
                   help="record mode: share weight = noised row count (charged) or 1; auto: "
                        "noised only if the rule weighs shares by declared weight")
    p.add_argument("--recipe", choices=["fixed", "auto"], default="fixed",
                   help="record mode: DP-SGD batch, lr and epochs as configured (fixed) or "
                        "chosen per member from its rows and budget (auto; privacy.recipe)")


def add_rules_flags(p: argparse.ArgumentParser) -> None:
    """The consortium's [rules] (node/strategy/consortium_rules.py): how every member combines shares."""
    # node.strategy.consortium_rules.DEFAULT_RULE (tests/test_lean.py checks), not imported:
    # that module imports the strategies and torch, and every command, `flnode status`
    # included, builds this parser.
    DEFAULT_RULE = "auto"  # noqa: N806
    p.add_argument("--aggregation", default=DEFAULT_RULE, metavar="RULE",
                   help=f"aggregation rule every member applies (default {DEFAULT_RULE}: "
                        "multi_krum_staged with a FedAdam server step (server_lr 0.03) from 5 "
                        "members, trimmed_mean for 3-4, mean for 2; "
                        "mean, median, trimmed_mean, norm_bounded_mean, krum, multi_krum, "
                        "centered_clipping)")
    p.add_argument("--f", type=int, default=None, metavar="F",
                   help="hostile members the rule must survive (default max(1, n // 4): 1 "
                        "up to 7 members, 2 from 8; 0 below 3 members or for the mean)")
    p.add_argument("--max-weight-fraction", type=positive(float), default=None, metavar="X",
                   help="no member above this fraction of the total weight "
                        "(default max(2/n, 0.25))")
    p.add_argument("--aggregation-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a rule parameter (e.g. m=5, tau=1.0, distance=clip)")
    p.add_argument("--compression", default="none", metavar="MODE",
                   help="how every member's shares are compressed on the wire: none "
                        "(default), fp16, int8 or topk:FRACTION (e.g. topk:0.1); "
                        "docs/reference/compression.md")
    p.add_argument("--topology", default="full", metavar="NAME",
                   help="whom each member sends its share to and waits for: full (default), "
                        "ring, k-regular:K, random-out:S or exponential; "
                        "docs/reference/topology.md")
    # The digest echo ([rules] echo, gossip/protocol/echo.py), on in every file written
    # from now on. Not in --help (the frozen help texts of tests/golden stay as they are):
    # docs/reference/echo.md documents it; "off" writes no key: a consortium as built
    # before the key (no echo).
    p.add_argument("--echo", choices=("on", "off"), default="on", help=argparse.SUPPRESS)


def parse_params(items: list[str], flag: str = "--aggregation-param") -> dict[str, Any]:
    """KEY=VALUE strings -> {KEY: VALUE}, each value an int, else a float, else the text;
    an item without "=" is a LocalError naming the flag and the item."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LocalError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            params[key] = int(value)
        except ValueError:
            try:
                params[key] = float(value)
            except ValueError:
                params[key] = value
    return params


def rules_fields(args: argparse.Namespace) -> dict:
    return dict(aggregation=args.aggregation, f=args.f,
                max_weight_fraction=args.max_weight_fraction,
                aggregation_params=parse_params(args.aggregation_param),
                # off: no key, as in a file written before the key (rules without the echo)
                echo=True if getattr(args, "echo", "on") == "on" else None)


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
                        "zero-prekey (needs sealing), equivocate (two versions to each), "
                        "equivocate-split (one version to each), replay, flood[=RATE] (its round-0 "
                        "share re-signed RATE times a second, 2000). Repeatable; "
                        "KIND:PARAM:MEMBERS also works, e.g. scale:10:bank-1")


def attack_fields(args: argparse.Namespace) -> dict:
    """SimulationSpec fields from add_attack_flags' flag (checked in prepare())."""
    return dict(attacks=tuple(args.attack))

"""`flnode keygen | consortium | schema | run | status | simulate | report`.

Errors the operator can fix (`LocalError`) print one clear message and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gossip.errors import LocalError
from node.ops.flags import (
    SIMULATE_EPILOG,
    add_attack_flags,
    add_data_dir_flags,
    add_fault_flags,
    add_privacy_flags,
    add_rules_flags,
    add_seal_flag,
    positive,
    rules_fields,
    track_given,
)


def _keygen(args: argparse.Namespace) -> int:
    # lean start: each command imports what it runs (identity loads PyNaCl)
    from node.runtime.identity import Identity, save_identity

    ident = Identity.generate(args.name)
    secret, public = save_identity(ident, args.out)
    print(f"wrote {secret} (private, mode 0600) and {public}")
    print(f"member {ident.name}: public key {ident.public_key.hex()}  {ident.fingerprint}")
    return 0


def secure_dp_keys(args: argparse.Namespace) -> dict[str, float] | None:
    """[rules] secure_rows / secure_epsilon / secure_delta from consortium build's flags
    (None: no DP on the secure sum; a partial set is refused by the rules' check)."""
    keys = {k: getattr(args, k) for k in ("secure_rows", "secure_epsilon", "secure_delta")}
    out = {k: v for k, v in keys.items() if v is not None} or None
    if out and getattr(args, "clip", None) is None:  # the plan's clip is agreed, not local
        raise LocalError("--secure-rows / --secure-epsilon / --secure-delta need --clip: every "
                         "member plans the sum's noise and decodes it with the agreed clip")
    return out


def _consortium_build(args: argparse.Namespace) -> int:
    # lean start: each command imports what it runs (schema loads pydantic, identity PyNaCl)
    import tomllib

    from gossip.membership import Consortium, Member, save_consortium
    from node.data.schema import FeatureSchema
    from node.runtime.identity import load_public_key

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
    # lean start: the strategies load torch, only once the members' keys have been read
    from node.strategy.consortium_rules import build_strategy, pin_rules, rules_table

    secure_dp = secure_dp_keys(args)
    if args.secure and secure_dp and schema.mode == "federated":
        # every node of this consortium would refuse to start (node/runtime/secure_node.py):
        # refused here, before the file is agreed
        raise LocalError(f"--schema {schema_path} says normalize = \"federated\" and --secure "
                         "with --secure-rows/--secure-epsilon/--secure-delta asks for DP on the "
                         "secure sum: the statistics exchange is not part of the secure plan's "
                         "budget (its charge would be missing), so every member's node would "
                         "refuse to start. Set normalize = \"range\" (the schema's declared "
                         "ranges) or \"declared\" (means and stds from a public source) in the "
                         "schema, e.g. `flnode schema infer ... --normalize range`")
    f = rules_fields(args)
    rules = pin_rules(rules_table(len(members), f["aggregation"], f["f"], f["max_weight_fraction"],
                                  args.privacy_mode, args.clip, args.noise_multiplier,
                                  compression=args.compression, echo=f["echo"],
                                  secure=args.secure, secure_threshold=args.secure_threshold,
                                  secure_select=args.secure_select,
                                  topology=args.topology,
                                  secure_dp=secure_dp,
                                  **f["aggregation_params"]), len(members), "the [rules] these flags give")
    consortium = Consortium(args.name, schema.to_dict(), tuple(members), rules)
    build_strategy(consortium, None, args.privacy_mode or "off", args.clip or 1.0,
                   "--aggregation")  # refuse a rule this consortium cannot run
    out = Path(args.out)
    if out.exists() and not args.force:
        raise LocalError(f"--out {out} exists; pass --force to replace it")
    save_consortium(consortium, out)
    print(f"wrote {out}: consortium {args.name!r}, {len(members)} members, "
          f"id {consortium.id.hex()}")
    # a secure round is the secure sum whatever the aggregation says: no warning about a rule
    # that is not used
    weak = None if rules.get("secure") else small_consortium_warning(
        len(members), rules["aggregation"], args.privacy_mode)
    if weak:
        print(f"warning: {weak}", file=sys.stderr)
    return 0


def small_consortium_warning(members: int, rule: str, privacy_mode: str | None) -> str | None:
    """What one hostile member can still do to a consortium too small for
    multi_krum_staged (measured: docs/results/robustness.md, "Smaller consortia")."""
    if members >= 5 or rule not in ("trimmed_mean", "mean"):
        return None
    if rule == "mean":
        return (f"{members} members and the plain mean: one member with a valid key owns the "
                "model; use it only among members that trust each other")
    return (f"{members} members and trimmed_mean: one hostile member is held back, not stopped "
            "(a sign-flipping member cost up to 0.15 accuracy on the digits bench)"
            + ("; under record-level DP it owned the model (ROC-AUC 0.05 on the default "
               "bench)" if privacy_mode == "record" else "")
            + ". From five members the default is multi_krum_staged, which held every "
            "model-level attack on the bench "
            "(docs/results/robustness.md, \"Smaller consortia\")")


def _consortium_show(args: argparse.Namespace) -> int:
    # lean start: each command imports what it runs (identity loads PyNaCl)
    from gossip.membership import load_consortium
    from node.runtime.identity import fingerprint

    c = load_consortium(args.file)
    print(f"consortium {c.name!r}\n  id       {c.id.hex()}")
    for part, digest in c.digests().items():
        print(f"  {part:<8} {digest}")
    for m in c.members:
        addrs = ", ".join(f"{k}={v}" for k, v in m.addresses.items()) or "-"
        print(f"  member {m.name:<20} {fingerprint(m.public_key)}  {addrs}")
    return 0


def _schema_infer(args: argparse.Namespace) -> int:
    from node.data.drafting import infer, refuse_existing, render  # lean start: numpy, pandas

    refuse_existing(args.out, args.force)
    draft = infer(args.files, args.label, args.categorical, args.drop, args.normalize)
    return _schema_emit(draft, render(draft), args)


def _schema_merge(args: argparse.Namespace) -> int:
    from node.data.drafting import merge, refuse_existing, render  # lean start: numpy, pandas

    refuse_existing(args.out, args.force)
    draft = merge(args.files, ranges_from=args.ranges_from)
    return _schema_emit(draft, render(draft), args)


def _schema_emit(draft, text: str, args: argparse.Namespace) -> int:
    """stdout: exactly the file's text; stderr: the notes (and where it was written)."""
    from node.data.drafting import write_out  # lean start: numpy, pandas

    sys.stdout.write(text)
    sys.stdout.flush()
    if args.out is not None:
        write_out(text, args.out, args.force)
    for note in draft.notes:
        print(note, file=sys.stderr)
    if args.out is not None:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    # lean start: the simulator loads torch; every other command builds this parser too
    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.scenario import spec_from_args

    notes: list[str] = []
    spec = spec_from_args(args, notes=notes)
    # track_given (node/ops/flags.py) leaves a flag not typed out of args
    backend, address = getattr(args, "backend", "process"), getattr(args, "address", None)
    if address is not None and backend != "ray":
        raise LocalError("--address: only with --backend ray (the Ray head's HOST:PORT)")
    per_actor = getattr(args, "members_per_actor", None)
    if per_actor is not None and backend != "ray":
        raise LocalError("--members-per-actor: only with --backend ray")
    if per_actor is not None and per_actor < 1:
        raise LocalError(f"--members-per-actor {per_actor}: must be at least 1")
    simulate(spec, notes=notes, backend=backend, address=address,
             members_per_actor=1 if per_actor is None else per_actor)
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from node.ops.status import collect, render  # lean start: config + ledger, status only

    s = collect(args.state_dir, args.config)
    print(json.dumps(s, indent=2, sort_keys=True) if args.json else render(s))
    return 0


def _report(args: argparse.Namespace) -> int:
    if (args.run_dir is None) == (args.state_dir is None):
        args._parser.error("give a RUN_DIR (a simulator's run) or --state-dir DIR (a member's "
                           "own state dir), one of them")
    if args.state_dir is not None:
        from node.ops.report_member import write_member_report  # lean start: report only

        path, doc = write_member_report(args.state_dir, args.out, args.config)
        print(f"wrote {path} and {doc}")
    else:
        from node.ops.report_html import write_report  # lean start: report only

        path = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
        print(f"wrote {path}")
    # The hint on its own line: the first line stays the path alone, for scripts and eyes.
    print(f"open {path.resolve().as_uri()} in a browser")
    return 0


def _run(args: argparse.Namespace) -> int:
    # lean start: the node loads torch and the transports; only `flnode run` needs them
    from node.runtime.daemon import exit_now
    from node.runtime.daemon import main as run_main

    # The process ends here, once the node has closed its files: no slow interpreter
    # teardown after "finished" (node/runtime/daemon.py exit_now; measured by scripts/bench_node.py).
    exit_now(run_main(args.config, args.metrics_port, args.metrics_addr, args.log_format))


def _export(args: argparse.Namespace) -> int:
    from node.ops.export import export  # lean start: the export loads torch and onnx

    m = export(args.state_dir, args.out, args.format, args.config, args.round, args.force)
    print(f"wrote {args.out}: {m['format']} model of {m['member']} after round {m['round']} of "
          f"{m['planned_rounds']}" + ("" if m["finished"] else " (the run is NOT finished)")
          + f", consortium {m['consortium']['name']!r}")
    print(f"  checked on {m['checked']['on']}: max |difference| "
          f"{m['checked']['max_abs_difference']:.2g} from the node's own model")
    for f in m["files"]:
        print(f"  {f['path']}  {f['bytes']} bytes  sha256 {f['sha256']}")
    print(f"  model_card.json signed with {m['member']}'s key: check it with `flnode verify "
          f"{args.out} --consortium FILE`")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from node.ops.predict import score_table  # lean start: predict loads onnxruntime or torch

    s = score_table(args.model, args.data, args.out, chunk_rows=args.chunk_rows)
    print(f"wrote {s.out}: {s.rows} rows scored in {s.seconds:.1f} s")
    if s.empty:
        print(f"warning: {s.empty} row(s) scored empty: an empty cell the schema has no fill "
              "for, or a value the node would refuse (docs/operate/export.md)", file=sys.stderr)
    for col, n in sorted(s.unseen.items()):
        print(f"warning: column {col!r}: {n} row(s) hold a category outside the vocabulary "
              "(encoded as none of them)", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    # lean start: nacl and the export's files only (onnx or torch for the weights' check)
    from node.ops.model_verify import VerifyError, verify

    try:
        v = verify(args.model_dir, args.consortium)
    except VerifyError as exc:
        print(f"flnode: {exc}", file=sys.stderr)
        return 1
    for w in v.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"verified {args.model_dir}: model card of {v.member!r} (consortium {v.consortium!r}),"
          f" signed by {v.fingerprint} (key from {v.key_from})")
    print(f"  manifest and {len(v.files)} file(s) match their SHA-256: {', '.join(v.files)}")
    print(f"  parameter digest {v.parameter_digest} matches the weights")
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text}")
    return port


def model_kind(text: str) -> str:
    """--model KIND (simulate, scripts/simulate_network.py): a built-in kind or a plug-in
    "package.module:factory", checked by name here; its options when the run is built."""
    from node.learn.kinds import check_kind  # lean start: only a --model flag checks a kind

    try:
        return check_kind(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    # [rules] secure (issue 22). Not in --help yet (the frozen help texts of tests/golden
    # stay as they are): docs/reference/files.md documents them.
    cb.add_argument("--secure", action="store_true", help=argparse.SUPPRESS)
    cb.add_argument("--secure-threshold", type=positive(int), default=None,
                    help=argparse.SUPPRESS)
    cb.add_argument("--secure-select", choices=("multi-krum", "norm", "sum", "range"),
                    default=None,
                    help=argparse.SUPPRESS)
    # DP on the secure sum: the plan's inputs every member shares (docs/privacy-secure.md)
    cb.add_argument("--secure-rows", type=positive(int), default=None, help=argparse.SUPPRESS)
    cb.add_argument("--secure-epsilon", type=positive(float), default=None,
                    help=argparse.SUPPRESS)
    cb.add_argument("--secure-delta", type=positive(float), default=None,
                    help=argparse.SUPPRESS)
    cb.add_argument("--privacy-mode", choices=["off", "update", "record"], default=None,
                    help="[rules]: every member's privacy.mode must be this")
    cb.add_argument("--clip", type=positive(float), default=None,
                    help="[rules]: every member's privacy.clip must be this")
    cb.add_argument("--noise-multiplier", type=positive(float), default=None,
                    help="[rules], update-level DP: no member's sigma above this; with "
                         "--clip it sets the distance bound every member applies")
    cb.add_argument("--out", required=True)
    cb.add_argument("--force", action="store_true")
    cb.set_defaults(func=_consortium_build)
    cs = csub.add_parser("show", help="print a consortium's id, part digests and members")
    cs.add_argument("file")
    cs.set_defaults(func=_consortium_show)

    sc = sub.add_parser("schema", help="draft a feature schema from your own files; merge drafts")
    scsub = sc.add_subparsers(dest="action", required=True)
    si = scsub.add_parser("infer", help="draft column kinds, categories and classes from your own "
                          "CSV/Parquet files (no statistic of the rows; ranges marked to fill)")
    si.add_argument("files", nargs="+", metavar="FILE", help="this member's .csv / .parquet files")
    si.add_argument("--label", required=True, metavar="COL", help="the label column")
    si.add_argument("--categorical", action="append", default=[], metavar="COL",
                    help="treat COL as categorical even if it holds numbers (repeat)")
    si.add_argument("--drop", action="append", default=[], metavar="COL",
                    help="leave COL out of the schema, e.g. an identifier (repeat)")
    si.add_argument("--normalize", choices=["federated", "declared", "range"],
                    default="federated",
                    help="federated: members agree mean/std at start from noised sums clipped to "
                         "each column's declared range; declared: mean and std in the schema; "
                         "range: scale by each column's declared range (releases nothing)")
    si.add_argument("--out", default=None, help="also write the draft here")
    si.add_argument("--force", action="store_true", help="replace --out if it exists")
    si.set_defaults(func=_schema_infer)
    sm = scsub.add_parser("merge", help="combine members' drafts into the consortium's schema")
    sm.add_argument("files", nargs="+", metavar="DRAFT", help="the members' draft .toml files")
    sm.add_argument("--out", required=True)
    sm.add_argument("--force", action="store_true", help="replace --out if it exists")
    sm.add_argument("--ranges-from", default=None, metavar="PUBLIC_FILE",
                    help="fill each range still to fill from this PUBLIC table's min and max, "
                         "rounded outward (a published reference, never a member's rows)")
    sm.set_defaults(func=_schema_merge)

    r = sub.add_parser("run", help="run one member as a daemon on a network transport")
    r.add_argument("--config", required=True, help="the node's TOML config")
    r.add_argument("--metrics-port", type=_port, default=None, metavar="P",
                   help="serve Prometheus metrics on this port (0: a free one, printed); off "
                        "by default")
    r.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address for --metrics-port (default 127.0.0.1: the metrics include "
                        "one computed on this member's private rows)")
    r.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per line on stdout (events) and stderr (logs)")
    r.set_defaults(func=_run)

    st = sub.add_parser("status", help="a node's round, ε spent, metrics, peers, rejections")
    st.add_argument("--state-dir", required=True)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--config", help="the node's config: for the planned number of rounds "
                                     "when the node keeps no privacy plan (privacy off)")
    st.set_defaults(func=_status)

    s = sub.add_parser("simulate", help="simulate a consortium in one process",
                       epilog=SIMULATE_EPILOG)
    s.add_argument("scenario", nargs="?", type=Path, metavar="SCENARIO.toml",
                   help="a scenario file (network_configs/scenarios/); flags override it")
    s.add_argument("--dataset", choices=["default", "churn", "digits"], default="default")
    s.add_argument("--nodes", type=positive(int), default=4)
    s.add_argument("--partition", default="dirichlet:0.5",
                   help="iid | dirichlet:ALPHA | column:NAME")
    s.add_argument("--rounds", type=positive(int), default=30)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--model", type=model_kind, default="mlp", metavar="KIND",
                   help="logreg, mlp, deep_mlp, res_mlp or a plug-in package.module:factory "
                        "(docs/operate/models.md); its options (hidden, depth, blocks, norm, "
                        "groups, dropout; a plug-in's [model.options]) from the scenario "
                        "file's [model]")
    s.add_argument("--epochs", type=positive(int), default=1, help="local epochs per round")
    s.add_argument("--batch-size", type=positive(int), default=32)
    s.add_argument("--lr", type=positive(float), default=0.05)
    s.add_argument("--prox-mu", type=float, default=0.0, metavar="MU",
                   help="FedProx: proximal term MU/2 ||w - w_start||^2 in local training "
                        "(training.prox_mu; 0: off)")
    s.add_argument("--lr-decay", type=float, default=1.0, metavar="D",
                   help="round r trains at lr * D**r (training.lr_decay; 1: constant)")
    s.add_argument("--control-variates", action="store_true",
                   help="SCAFFOLD-style control variates (training.control_variates)")
    add_privacy_flags(s)
    s.add_argument("--network-config", help="template with member names and addresses")
    add_seal_flag(s)
    add_rules_flags(s)
    s.add_argument("--secure", action="store_true",
                   help="secure aggregation ([rules] secure = true): no member sees another's "
                        "update; members open only the selected members' sum "
                        "(docs/privacy-secure.md)")
    s.add_argument("--secure-select", choices=("multi-krum", "norm", "sum", "range"),
                   default=None,
                   help="with --secure: what members open before the sum ([rules] "
                        "secure_select): multi-krum, norm, sum (nothing), or range (one bit "
                        "per member: the default with DP; with DP only sum or range)")
    add_fault_flags(s)
    add_attack_flags(s)
    add_data_dir_flags(s)
    s.add_argument("--out", help="run directory (created; must be new); required unless the "
                                 "scenario file gives out")
    s.add_argument("--backend", choices=["process", "ray"], default="process",
                   help="process: every member in this process; ray: each member's training "
                        "on a Ray actor, messages and aggregation here (docs/operate/ray.md)")
    s.add_argument("--address", metavar="HOST:PORT",
                   help="with --backend ray: the Ray head to join (default: start a local "
                        "one on loopback)")
    s.add_argument("--members-per-actor", type=int, metavar="K",
                   help="with --backend ray: K members' training on each actor (one "
                        "process, ~200 MB); default 1")
    s.set_defaults(func=_simulate, flag_defaults=track_given(s))

    rp = sub.add_parser("report", help="write one self-contained report.html for a run "
                        "directory, or for one member from its own state dir")
    rp.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                    help="a run directory from `flnode simulate --out` or simulate_network.py")
    rp.add_argument("--state-dir", metavar="DIR",
                    help="instead: a member's own state dir (from `flnode run`): its rounds, "
                         "ε, peers, traffic, rejections and metrics; also writes report.json")
    rp.add_argument("--config", metavar="FILE",
                    help="with --state-dir: the node's config (planned rounds when privacy "
                         "is off)")
    rp.add_argument("--out", metavar="FILE",
                    help="where to write (default RUN_DIR/report.html or DIR/report.html)")
    rp.set_defaults(func=_report)

    ex = sub.add_parser("export", help="export a member's trained model with its preprocessing "
                        "(ONNX, TorchScript or state_dict)")
    ex.add_argument("state_dir", metavar="STATE_DIR", help="the member's state dir")
    ex.add_argument("--out", required=True, metavar="DIR", help="a new directory for the export")
    ex.add_argument("--format", choices=["onnx", "torchscript", "state_dict"], default="onnx",
                    help="onnx (default) and torchscript take raw columns; state_dict: the "
                         "weights and preprocessing.json")
    ex.add_argument("--round", type=positive(int), default=None, metavar="N",
                    help="the model after round N; a state dir keeps only its latest round's")
    ex.add_argument("--config", metavar="FILE", help="the node's config (default: a simulator's "
                    "RUN/nodes/NAME.toml beside RUN/state/NAME)")
    ex.add_argument("--force", action="store_true", help="replace --out if it is an export")
    ex.set_defaults(func=_export)

    pr = sub.add_parser("predict", help="score a CSV or Parquet table with an exported model")
    pr.add_argument("--model", required=True, metavar="DIR", help="a directory `flnode export` "
                    "wrote")
    pr.add_argument("--data", required=True, metavar="FILE", help="a .csv or .parquet file with "
                    "the schema's columns (other columns are copied to the output)")
    pr.add_argument("--out", required=True, metavar="FILE", help="scores.csv or scores.parquet")
    pr.add_argument("--chunk-rows", type=positive(int), default=65536, metavar="N",
                    help="rows scored at a time (memory is bounded by it)")
    pr.set_defaults(func=_predict)

    ve = sub.add_parser("verify", help="check an export's signed model card, its files' "
                        "SHA-256 and its weights' digest")
    ve.add_argument("model_dir", metavar="MODEL_DIR", help="a directory `flnode export` wrote")
    ve.add_argument("--consortium", metavar="FILE", help="the consortium file: the signer's "
                    "public key comes from it (without it, from the card: integrity only, "
                    "not origin)")
    ve.set_defaults(func=_verify)
    return p


def _own_parsers(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's namespace names its own parser (`_parser`), so an unknown flag
    is reported with that command's usage, not flnode's top-level one."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for child in action.choices.values():
                _own_parsers(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _own_parsers(parser)
    args, extra = parser.parse_known_args(argv)
    if extra:
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LocalError as exc:
        print(f"flnode: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`flnode status | head`): no traceback. Python's own
        # advice: point stdout at devnull so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

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

This module prepares a run: the consortium's keys, consortium file, node configs and
data files on disk, from a built-in table (split, partitioned) or the members' own files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from nacl.signing import SigningKey
from pydantic import ValidationError

from gossip.errors import LocalError
from gossip.membership import (
    Consortium,
    Member,
    check_member_name,
    read_toml,
    save_consortium,
)
from gossip.testing.faults import parse_network_partition
from node.data.encode import encode, member_split
from node.data.encode import held_out_positions as data_held_out_split
from node.data.schema import FeatureSchema, _pydantic_message, fit_schema
from node.data.table import read_frame
from node.learn.kinds import LEGACY_KINDS, is_plugin
from node.learn.kinds import resolve as resolve_options
from node.learn.models import pin_for
from node.learn.normalize import DEFAULT_NORMALIZE_NOISE, Agreed, combine, member_stats, noised, resolve
from node.privacy.mechanisms import OsNoise
from node.rehearsal.simulation.datasets import load_demo, parse_row_partition, partition
from node.rehearsal.simulation.spec import MEMBER_PREFIX, TEST_FRACTION, SimulationSpec
from node.runtime.config import seals
from node.runtime.identity import Identity, save_identity
from node.strategy.consortium_rules import build_strategy, default_cap, pin_rules, rules_table


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
    node makes (node.data.encode.held_out_positions; tests/test_data_dir.py checks)."""
    return data_held_out_split(n_rows, seed, fraction)


def keys_seeded(spec: SimulationSpec) -> bool:
    """Whether the run's member keys (and its privacy noise: run.py noise_kind) derive
    from --seed: on a built-in demo table, so a seeded run is the same run every time.
    Not on the members' own rows (--data-dir) nor under --secure with DP (whose masks and
    noise protect the rows): fresh keys from the OS there, as a real node's."""
    return spec.data_dir is None and not (spec.secure and spec.privacy != "off")


# Domain tag of a seeded simulated key: blake2b(tag, seed, name) is its Ed25519 seed.
SIM_KEY_TAG = b"flnode-simulated-member-key-v1"


def member_identity(spec: SimulationSpec, name: str) -> Identity:
    """A member's simulated identity. Seeded (keys_seeded): the consortium id is then the
    same run to run, and so is everything drawn from it (a sparse topology's peers,
    gossip/topology.py) and the member-key order a ring follows: with fresh keys two seeded
    runs ended with different models. Such a key protects nothing: never reuse a simulated
    run's keys/ for a real node (`flnode keygen`)."""
    if not keys_seeded(spec):
        return Identity.generate(name)
    check_member_name(name, "identity name")
    seed = hashlib.blake2b(f"{spec.seed}\0{name}".encode(), digest_size=32, key=SIM_KEY_TAG)
    return Identity(name, SigningKey(seed.digest()))


def member_seed(spec: SimulationSpec, index: int) -> int:
    """training.seed of the index-th member's config."""
    return spec.seed * 1000 + index


def baseline_schema(schema: FeatureSchema, train_rows: dict[str, Any],
                    max_fraction: float | None, privacy: str = "off",
                    delta: float = 1e-5) -> tuple[FeatureSchema, str | None]:
    """What the simulator encodes its baselines (centralized, local-only) and the common
    test set with, and a note saying what that is. normalize = "federated": what the
    members would agree (node/learn/normalize.py): each member's check at start first (with
    its own rows, as its node does: a refusal raises here, before anything runs; a
    fallback gives range scaling), then the combined statistics, exact with privacy
    off, and under record-level DP each member's sums noised by the same mechanism at the
    same noise (from the OS, as the nodes': a draw like theirs, not the same draw). So the
    baselines' columns carry what normalization costs; only the model differs."""
    if schema.mode != "federated":
        return schema, None
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
            f"(node/learn/normalize.py); the baselines use {how}")


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
    import pandas as pd  # lean start: pandas (~0.4 s) only when drafting a schema from files

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
    # --secure with DP on the sum: the rounds the consortium's plan chose (secure_plan's
    # steps), which the nodes run instead of --rounds; None otherwise.
    rounds: int | None = None


# --- --secure --privacy record (issue 22: DP on the secure sum) ----------------------------
def secure_dp_rules(spec: SimulationSpec, rows_total: int, dim: int,
                    members: int) -> tuple[dict[str, Any], int]:
    """The [rules] keys pinning the consortium's distributed DP-SGD plan (every member
    derives the same plan from them: node/runtime/secure_node.py plan_for) and the plan's
    number of rounds, computed as the nodes will."""
    from node.privacy.secure import secure_plan  # lean start: only --secure with DP
    from node.strategy.consortium_rules import default_secure_threshold  # lean start: idem

    if spec.privacy != "record" or spec.epsilon is None:
        raise LocalError(f"--secure with --privacy {spec.privacy}"
                         f"{'' if spec.epsilon is not None else ' without --epsilon'}: secure "
                         "rounds carry DP per record on the sum, planned from a budget "
                         "(--privacy record --epsilon E), or no DP (--privacy off)")
    t = spec.secure_threshold or default_secure_threshold(members)
    plan = secure_plan(rows_total=rows_total, members=members, coalition=t,
                       epsilon=float(spec.epsilon), delta=spec.delta, dim=dim,
                       clip_norm=spec.clip)
    return ({"secure_rows": rows_total, "secure_epsilon": float(spec.epsilon),
             "secure_delta": spec.delta}, plan.steps)


def evaluation_rows(prep: Prepared, state: Path) -> tuple[XY, list[XY]]:
    """The common test set and the members' own held-out rows, encoded as the node whose
    state dir this is encodes (its agreed statistics under federated normalization)."""
    agreed_file = state / "normalization.json"
    if prep.raw_eval is None or not agreed_file.exists():
        return prep.test, prep.own_parts
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
    from sklearn.model_selection import train_test_split  # lean start: sklearn, ~1 s: only here

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
    n = len(parts)
    rng = np.random.default_rng([spec.seed, 2])
    kind, arg = parse_row_partition(spec.partition)
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
        # as a node splits (node.data.encode.member_split): missing = "drop_row" on the whole
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
            part = parse_network_partition(p)
        except ValueError as exc:
            raise LocalError(f"--net-partition {exc}") from None
        unknown = sorted(part.side - set(names))
        if unknown:
            raise LocalError(f"--net-partition {p}: no such member(s) {unknown}")


def model_section(spec: SimulationSpec) -> dict[str, Any]:
    """The members' [model]: kind and hidden (a built-in kind) with its other options as
    keys, or a plug-in's kind with [model.options]."""
    if is_plugin(spec.model):
        return {"kind": spec.model, **({"options": dict(spec.model_options)}
                                       if spec.model_options else {})}
    return {"kind": spec.model, "hidden": spec.hidden, **spec.model_options}


def model_pin(spec: SimulationSpec, schema: FeatureSchema) -> dict[str, Any]:
    """The consortium file's [model] table: every kind but logreg and mlp is pinned (kind,
    options, parameter shapes: node/learn/kinds.py); those two are not, so their runs keep
    the consortium ids they had before the table existed."""
    if spec.model in LEGACY_KINDS:
        return {}
    try:
        options = resolve_options(spec.model, None if is_plugin(spec.model) else spec.hidden,
                                  spec.model_options)
    except ValueError as exc:
        raise LocalError(f"model {spec.model!r}: {exc}") from None
    return pin_for(spec.model, options, schema.n_features, schema.n_classes)


def planned_rounds_note(spec: SimulationSpec, planned: int) -> str:
    """--secure with DP: the consortium's plan fixes the rounds (its DP-SGD steps for the
    budget), not --rounds. A count the user gave (--rounds, the scenario's rounds) that the
    plan overrides is refused, rather than run for far longer than asked; otherwise the
    note that prepare puts first among the header's notes says how many rounds will run."""
    why = (f"--secure --privacy record --epsilon {spec.epsilon:g}: the consortium's DP plan "
           f"runs {planned} rounds (its DP-SGD steps for this budget on these rows)")
    if spec.rounds_given and spec.rounds != planned:
        raise LocalError(f"--rounds {spec.rounds} (or the scenario file's rounds): {why}, not "
                         f"{spec.rounds}; leave out --rounds (and rounds) to run them, or give "
                         f"--rounds {planned}")
    return (f"[bold]{why}[/bold], not --rounds' default {spec.rounds}"
            if not spec.rounds_given else why)


def prepare(spec: SimulationSpec,
            addresses: dict[str, dict[str, str]] | None = None) -> Prepared:
    """Write keys, consortium file, data files and node configs into spec.out.

    `addresses` (member -> transport -> address) overrides the template's.
    """
    if spec.data_dir is None and spec.nodes < 2:
        raise LocalError("--nodes: a consortium needs at least 2 members")
    if spec.secure and spec.privacy != "off" and (spec.privacy != "record" or spec.epsilon
                                                  is None):  # secure_dp_rules says why
        secure_dp_rules(spec, 1, 1, 2)
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

    secure_dp, secure_rounds = None, None
    if spec.secure and spec.privacy != "off":  # DP on the secure sum: the plan's inputs
        from node.learn.models import build_model  # lean start: the model's size for the plan
        dim = sum(p.numel() for p in build_model(spec.model, schema.n_features,
                                                 schema.n_classes, spec.hidden,
                                                 options=spec.model_options).parameters())
        secure_dp, secure_rounds = secure_dp_rules(
            spec, int(sum(len(rows.train[n][1]) for n in names)), dim, len(names))
        # Before anything is written: a refused run leaves --out reusable.
        rows.notes.insert(0, planned_rounds_note(spec, secure_rounds))
    out = spec.out
    for sub in ("keys", "data", "nodes", "state"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if any((out / "state").iterdir()) or any((out / "keys").iterdir()):
        raise LocalError(f"--out {out}: already holds a run (keys/ or state/ not empty); "
                         "choose a new directory")
    members = []
    for name in names:
        ident = member_identity(spec, name)
        save_identity(ident, out / "keys")
        addr = {**template.members[name], **(addresses or {}).get(name, {})}
        members.append(Member(name, ident.public_key, addr))
    # Update-level DP with a fixed sigma: the consortium agrees it as the noise bound, so
    # every member clips a share that lies further than honest noise could take it.
    sigma = spec.sigma if spec.privacy == "update" and spec.epsilon is None else None
    rules = pin_rules(rules_table(len(members), spec.aggregation, spec.f,
                                  spec.max_weight_fraction, spec.privacy,
                                  spec.clip if spec.privacy != "off" or spec.secure else None,
                                  sigma, compression=spec.compression, echo=spec.echo,
                                  secure=spec.secure, secure_threshold=spec.secure_threshold,
                                  secure_select=spec.secure_select, secure_dp=secure_dp,
                                  topology=spec.topology,
                                  **spec.aggregation_params), len(members))
    consortium = Consortium(template.name, schema.to_dict(), tuple(members), rules,
                            model_pin(spec, schema))
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
            "model": model_section(spec),
            "training": {"rounds": secure_rounds or spec.rounds, "epochs": spec.epochs,
                         "batch_size": spec.batch_size, "lr": spec.lr,
                         "seed": member_seed(spec, i),
                         **({"prox_mu": spec.prox_mu} if spec.prox_mu else {}),
                         **({"lr_decay": spec.lr_decay} if spec.lr_decay != 1 else {}),
                         **({"control_variates": True} if spec.control_variates else {})},
            "privacy": privacy_section(spec),
            # min_members 0: the simulators start every member together, and rehearse
            # absent ones (--absent), which a quorum would wait for without limit
            "gossip": {"transport": spec.transport, "round_deadline_s": spec.round_deadline_s,
                       "seal": spec.node_seal, "min_members": 0},
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
                    rows.common_test, rows.notes, rows.raw_eval, secure_rounds)

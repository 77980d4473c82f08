"""`flnode export STATE_DIR --out DIR`: a member's trained model with its preprocessing.

What goes in: the node's config (the consortium file and its schema, model.kind and
hidden), its state dir's checkpoint (the model after its latest round, read with the
checkpoint codec, node/runtime/state.py: never pickle) and, for normalize = "federated",
the statistics the members agreed (normalization.json). Every one of them is treated as
hostile: sizes are bounded before anything is decoded, the weights must fit the network
the config builds, shape for shape, and be finite; errors name the file and what is wrong.

What comes out (DIR): the model that takes raw rows, one input per schema column with
the schema's names, and gives one probability per class, encoding as the node does
(node/data/encode.py): the missing-value policy, range clipping, the agreed
standardization, one-hot categories. Where the node would refuse or drop a row (an
empty cell without a fill policy, a non-finite number, a value 1e6 standard deviations
out), the row scores NaN; a category outside the vocabulary encodes as all zeros (the
node refuses such a row in training; docs/operate/export.md). Formats: "onnx"
(node/ops/export_onnx.py), "torchscript" and "state_dict" (node/ops/export_torch.py).
Before DIR is written, the export scores the node's own held-out rows (and rows made from
the schema) and compares with the torch model on the node's own encoding: an export that
disagrees by more than CHECK_TOLERANCE is refused. manifest.json lists the files with
their SHA-256, the schema, the consortium and round; model_card.json (node/ops/model_card.py)
is the member's signed account of the model, checked with `flnode verify` before DIR is
written.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from gossip.errors import LocalError, shorten
from gossip.membership import Consortium, load_consortium, read_toml
from node.data.encode import dropped_rows, encode
from node.data.schema import FeatureSchema, Missing
from node.data.table import Table, read_table
from node.learn.kinds import read_pin
from node.learn.models import agreed_model, get_flat, init_seed_from, set_flat
from node.learn.normalize import Agreed
from node.ops.predict import FORMATS, MANIFEST, onnx_session, sha256
from node.runtime.config import REHEARSAL_SECTIONS, NodeConfig, validate_config
from node.runtime.state import CHECKPOINT_KEYS, CHECKPOINT_VERSION, decode_checkpoint

PREPROCESSING = "preprocessing.json"
MANIFEST_VERSION = 1
# Export and node must agree on every probability to this (float32 arithmetic in a
# different order: measured differences are ~1e-7).
CHECK_TOLERANCE = 1e-5
# How many of the node's own held-out rows the export scores at export time, from a file
# of at most this size (the node's reader holds a file whole; beyond it, the rows made
# from the schema check the export alone, and the manifest says so).
CHECK_ROWS = 256
MAX_CHECK_FILE_BYTES = 256 * 1024 * 1024
# A checkpoint holds the model plus small bookkeeping (replay table, prekeys, strategy and
# control-variate state, which can be a few model-sized vectors): anything past this
# many bytes beyond the model is not a checkpoint flnode wrote.
MAX_CHECKPOINT_EXTRA_BYTES = 64 * 1024 * 1024
# The checkpoint map's keys (a dozen today) and one key's length: more is not ours.
MAX_CHECKPOINT_FIELDS = 64
MAX_KEY_BYTES = 64
# normalization.json and final.json are a few KB.
MAX_SMALL_JSON_BYTES = 1 << 20
# Scores NaN in rows the node would refuse: a standardized value beyond this
# (node/data/encode.py MAX_STANDARDIZED).
FAR = 1e6
OUTPUTS = ("probabilities",)


@dataclass
class Member:
    """What an export needs from one member: its network with the checkpoint's weights,
    the encoding, and where both came from."""

    cfg: NodeConfig
    config_path: Path
    state_dir: Path
    consortium: Consortium
    schema: FeatureSchema  # the encoding schema: agreed statistics filled in
    normalization: dict[str, Any]
    network: torch.nn.Module
    round: int  # rounds completed (the model after round `round`, 1-based)
    planned_rounds: int
    final: dict[str, Any]  # what final.json says of this model, if anything
    kind: str = ""  # the kind the node trained: the consortium's [model] pin, else its config's
    options: dict[str, Any] | None = None  # that kind's complete options


def flnode_version() -> str:
    from importlib import metadata  # lean start: only an export reads the version

    try:
        return metadata.version("flnode")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


# --- the node's config and files -----------------------------------------------------------

def find_config(state_dir: Path) -> Path:
    """A simulator's run keeps each member's config at RUN/nodes/NAME.toml beside
    RUN/state/NAME: that one, if its state_dir is this directory."""
    guess = state_dir.parent.parent / "nodes" / f"{state_dir.name}.toml"
    if guess.is_file():
        doc = read_toml(guess, "node config")
        sd = doc.get("state_dir")
        if isinstance(sd, str) and (guess.parent / sd).resolve() == state_dir.resolve():
            return guess
    raise LocalError(f"{state_dir}: give the node's config with --config FILE (the TOML "
                     "`flnode run --config` read): the state dir alone does not say which "
                     "consortium, schema and model it trained")


def read_config(path: Path) -> NodeConfig:
    """The node's config, relative paths resolved as `flnode run` resolves them; a
    rehearsal member's [attack] / [faults] are set aside (export runs nothing)."""
    doc = read_toml(path, "node config")
    cfg = validate_config({k: v for k, v in doc.items() if k not in REHEARSAL_SECTIONS},
                          str(path))

    def rel(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else path.parent / p)

    return cfg.model_copy(update={
        "state_dir": rel(cfg.state_dir),
        "consortium": cfg.consortium.model_copy(update={"path": rel(cfg.consortium.path)}),
        "data": cfg.data.model_copy(update={"path": rel(cfg.data.path),
                                            "eval_path": rel(cfg.data.eval_path)})})


def small_json(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SMALL_JSON_BYTES + 1)
    except OSError as exc:
        raise LocalError(f"cannot read {what} {path}: {exc}") from None
    if len(raw) > MAX_SMALL_JSON_BYTES:
        raise LocalError(f"{what} {path}: over {MAX_SMALL_JSON_BYTES} bytes: not a file "
                         "flnode wrote")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise LocalError(f"{what} {path}: not valid JSON ({exc})") from None


def encoding_schema(schema: FeatureSchema, state_dir: Path) -> tuple[FeatureSchema, dict]:
    """The schema the node encoded with: declared statistics, the ranges (normalize =
    "range"), or the statistics agreed with the members (normalization.json)."""
    if schema.mode != "federated":
        return schema.for_encoding(), {"mode": schema.mode}
    path = state_dir / "normalization.json"
    if not path.exists():
        raise LocalError(f"{state_dir}: the schema says normalize = \"federated\" but "
                         "normalization.json is missing: this node never agreed the "
                         "statistics with the others (it stopped before round 1?), or the "
                         "file was removed")
    doc = small_json(path, "agreed normalization")
    if not isinstance(doc, dict):
        raise LocalError(f"agreed normalization {path}: not a JSON object")
    try:
        agreed = Agreed.from_json(doc, schema)
    except LocalError as exc:
        raise LocalError(f"{path}: {exc}") from None
    return schema.with_stats(agreed.stats), {"mode": f"federated ({agreed.mode})",
                                             "digest": agreed.digest.hex(),
                                             "members": list(agreed.members)}


def trained_kind(cfg: NodeConfig, consortium: Consortium) -> tuple[str, dict[str, Any]]:
    """The kind and complete options the node trained: the consortium's [model] pin if it
    has one, else the node config's [model] (node/learn/models.py agreed_model)."""
    if consortium.model:
        kind, options, _ = read_pin(consortium.model, str(cfg.consortium.path))
        return kind, dict(options)
    return cfg.model.kind, dict(cfg.model.resolved())


def build_network(cfg: NodeConfig, consortium: Consortium,
                  schema: FeatureSchema) -> torch.nn.Module:
    """The network the node builds at start (node/runtime/build.py own_model: the pinned
    network, checked, or the config's), weights to be set from the checkpoint."""
    return agreed_model(cfg.model.kind, cfg.model.resolved(), bool(cfg.model.model_fields_set),
                        consortium.model, schema.n_features, schema.n_classes,
                        init_seed_from(consortium), str(cfg.consortium.path))


def read_checkpoint(path: Path, model_bytes: int) -> tuple[int, bytes, int | None]:
    """(rounds completed, model bytes, planned rounds) of a checkpoint that may be hostile:
    its size bounded, its map walked field by field with every field but the few read
    here skipped unbuilt (msgpack builds a nested value whole; a small hostile file can
    expand ~70x), then decoded by the checkpoint codec (version, keys, required fields)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LocalError(f"cannot read checkpoint {path}: {exc}") from None
    limit = model_bytes + MAX_CHECKPOINT_EXTRA_BYTES
    if size > limit:
        raise LocalError(f"checkpoint {path}: {size} bytes, more than this model ({model_bytes}"
                         f" bytes) and its bookkeeping can take ({limit}): not a checkpoint "
                         "of this node's config")
    keep = {"version", "next_round", "model", "seq", "planned_rounds"}
    doc: dict[str, Any] = {}
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    unpacker = msgpack.Unpacker(io.BytesIO(raw), raw=False, max_buffer_size=len(raw) + 1,
                                max_bin_len=model_bytes, max_str_len=MAX_KEY_BYTES,
                                max_array_len=0, max_map_len=0, max_ext_len=0)
    why = "unreadable"
    try:
        n = unpacker.read_map_header()
        if n > MAX_CHECKPOINT_FIELDS:
            raise ValueError(f"{n} fields, more than {MAX_CHECKPOINT_FIELDS}")
        for _ in range(n):
            key = unpacker.unpack()
            if not isinstance(key, str):
                raise ValueError(f"a field named {shorten(key)}, not a string")
            if key != "version" and key not in CHECKPOINT_KEYS:
                raise ValueError(f"unknown keys [{key!r}] (written by a newer flnode?)")
            if key in keep:
                why = f"field {key!r}"
                doc[key] = unpacker.unpack()
            else:
                unpacker.skip()
            why = "unreadable"
        if unpacker.tell() != len(raw):
            raise ValueError(f"{len(raw) - unpacker.tell()} bytes after the checkpoint's map")
        cp = decode_checkpoint(msgpack.packb(doc, use_bin_type=True))
    except msgpack.exceptions.OutOfData:
        raise LocalError(f"checkpoint {path} is truncated ({size} bytes): restore it from a "
                         "backup; a node writes it atomically, so a cut file was cut after") \
            from None
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        raise LocalError(f"checkpoint {path}: {why}: {exc}") from None
    if doc.get("version") != CHECKPOINT_VERSION:
        raise LocalError(f"checkpoint {path}: version {shorten(doc.get('version'))}, this "
                         f"flnode reads {CHECKPOINT_VERSION}")
    if not (isinstance(cp.next_round, int) and 0 <= cp.next_round < 2 ** 31):
        raise LocalError(f"checkpoint {path}: next_round {shorten(cp.next_round)} is not a "
                         "round number")
    if not isinstance(cp.model, bytes):
        raise LocalError(f"checkpoint {path}: model is {type(cp.model).__name__}, not bytes")
    planned = cp.planned_rounds if isinstance(cp.planned_rounds, int) else None
    return cp.next_round, cp.model, planned


def load_member(state_dir: str | Path, config: str | Path | None = None,
                round_: int | None = None) -> Member:
    """The member of STATE_DIR, its model after its latest round (`round_`: that round,
    which must be the latest: a node keeps only its latest checkpoint)."""
    state_dir = Path(state_dir)
    cp_path = state_dir / "checkpoint.msgpack"
    if not cp_path.is_file():
        raise LocalError(f"{state_dir}: no checkpoint.msgpack here; is this a node's state_dir?")
    config_path = Path(config) if config is not None else find_config(state_dir)
    cfg = read_config(config_path)
    if cfg.state_dir is not None and Path(cfg.state_dir).resolve() != state_dir.resolve():
        raise LocalError(f"{config_path}: its state_dir is {cfg.state_dir}, not {state_dir}: "
                         "the wrong config for this state dir?")
    consortium = load_consortium(cfg.consortium.path)
    schema = FeatureSchema.from_dict(consortium.schema, str(cfg.consortium.path))
    for c in schema.columns:
        if c.name in OUTPUTS:
            raise LocalError(f"schema column {c.name!r}: the export's outputs are named "
                             f"{list(OUTPUTS)}; a column cannot share that name")
    enc, normalization = encoding_schema(schema, state_dir)
    network = build_network(cfg, consortium, enc)
    kind, options = trained_kind(cfg, consortium)
    n_params = sum(t.numel() for t in network.state_dict().values())
    done, model, planned = read_checkpoint(cp_path, n_params * 4)
    if len(model) != n_params * 4:
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in network.state_dict().items())
        raise LocalError(
            f"checkpoint {cp_path}: its model holds {len(model) // 4} float32 values "
            f"({len(model)} bytes), but model.kind = {kind!r} ({options}) on the schema's "
            f"{enc.n_features} features and "
            f"{enc.n_classes} classes has {n_params} ({shapes}): wrong config, or not this "
            "node's checkpoint")
    flat = np.frombuffer(model, dtype="<f4").astype(np.float32)
    if not np.isfinite(flat).all():
        raise LocalError(f"checkpoint {cp_path}: {int((~np.isfinite(flat)).sum())} of the "
                         "model's parameters are not finite: nothing to score with")
    set_flat(network, torch.from_numpy(flat.copy()))
    network.eval()
    if done == 0:
        raise LocalError(f"checkpoint {cp_path}: no round completed yet: the model is the "
                         "initial weights, nothing trained to export")
    if round_ is not None and round_ != done:
        raise LocalError(f"--round {round_}: {state_dir} keeps only the model after its latest "
                         f"round, {done} (a node overwrites checkpoint.msgpack every round; no "
                         "earlier model is kept)")
    final: dict[str, Any] = {}
    if (state_dir / "final.json").exists():
        doc = small_json(state_dir / "final.json", "final model comparison")
        if isinstance(doc, dict) and doc.get("round") == done:
            digest = model_digest(network)
            final = {"digest_matches_final_json": doc.get("digest") == digest,
                     "same_as": doc.get("same") if isinstance(doc.get("same"), list) else []}
            if doc.get("digest") != digest:
                raise LocalError(f"{state_dir}: final.json says the final model's digest is "
                                 f"{shorten(doc.get('digest'))}, checkpoint.msgpack holds "
                                 f"{digest}: the state dir was altered after the run")
    return Member(cfg, config_path, state_dir, consortium, enc, normalization, network, done,
                  planned or cfg.training.rounds, final, kind, options)


def model_digest(network: torch.nn.Module) -> str:
    """BLAKE2b-256 of the parameters as float32 little-endian: the digest a final message
    carries (node/runtime/finals.py)."""
    return hashlib.blake2b(get_flat(network).numpy().astype("<f4").tobytes(),
                           digest_size=32).hexdigest()


# --- the preprocessing, as data ----------------------------------------------------------

def preprocessing(schema: FeatureSchema) -> dict[str, Any]:
    """The encoding of an (encoding) schema as plain JSON: what every backend implements."""
    cols: list[dict[str, Any]] = []
    for c in schema.columns:
        policy = schema.policy(c)
        fill = policy.fill if isinstance(policy, Missing) else None
        if c.kind == "numeric":
            assert c.mean is not None and c.std is not None
            cols.append({"name": c.name, "kind": "numeric", "mean": c.mean, "std": c.std,
                         "range": list(c.range) if c.range is not None else None,
                         "fill": fill, "indicator": isinstance(policy, Missing)
                         and policy.indicator})
        else:
            cols.append({"name": c.name, "kind": "categorical",
                         "vocabulary": list(c.vocabulary or ()), "fill": fill})
    return {"label": schema.label, "classes": list(schema.classes), "columns": cols,
            "n_features": schema.n_features, "far": FAR,
            "empty_without_fill": "NaN scores (the node refuses or drops such a row)",
            "unseen_category": "all-zero one-hot (the node refuses such a row)"}


def raw_from_table(rows: Table, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """A Table's schema columns as the export's raw inputs: numbers float64 (NaN empty),
    categories as text ("" empty)."""
    out: dict[str, np.ndarray] = {}
    for c in spec["columns"]:
        if c["kind"] == "numeric":
            out[c["name"]] = rows.numbers(c["name"])
        else:
            out[c["name"]] = np.array(["" if t is None else t for t in rows.texts(c["name"])],
                                      dtype=object)
    return out


# --- checking an export against the node's own encoding ---------------------------------------

def check_rows(member: Member, spec: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                str]:
    """Raw rows and the node's probabilities for them (its encode, its torch model): up to
    CHECK_ROWS of its own held-out rows, plus rows made from the schema that touch every
    category and both ends of every range."""
    sources = []
    raws, refs = [], []
    held = _held_out(member)
    if held is not None:
        try:
            X, _ = encode(held, member.schema, "held-out rows")
            raws.append(raw_from_table(held, spec))
            refs.append(reference(member.network, X))
            sources.append(f"{len(held)} of the node's own rows "
                           f"({(member.cfg.data.eval_path or member.cfg.data.path).name})")
        except LocalError:
            pass  # a held-out file the node itself would refuse: the schema rows only
    made = _schema_rows(member.schema)
    X, _ = encode(made, member.schema, "rows made from the schema")
    raws.append(raw_from_table(made, spec))
    refs.append(reference(member.network, X))
    sources.append(f"{len(made)} rows made from the schema")
    raw = {k: np.concatenate([r[k] for r in raws]) for k in raws[0]}
    return raw, np.concatenate(refs), " and ".join(sources)


def _held_out(member: Member) -> Table | None:
    cfg = member.cfg
    path = cfg.data.eval_path or cfg.data.path
    try:
        if path.stat().st_size > MAX_CHECK_FILE_BYTES:
            return None  # a big file: the node's reader holds it whole; the schema's rows
        rows = read_table(path)
    except (OSError, LocalError):
        return None  # moved or gone: the schema's rows still check the export
    keep = np.flatnonzero(~dropped_rows(rows, member.schema))
    if len(keep) == 0:
        return None
    pick = keep[np.linspace(0, len(keep) - 1, min(CHECK_ROWS, len(keep))).astype(np.int64)]
    return rows.iloc[np.unique(pick)]


def _schema_rows(schema: FeatureSchema) -> Table:
    """Rows every encoder must accept: each category, each range's ends and middle."""
    import pandas as pd  # lean start: only the export check builds a frame

    n = max([len(c.vocabulary or ()) for c in schema.columns] + [5])
    data: dict[str, list[Any]] = {}
    for c in schema.columns:
        if c.kind == "categorical":
            v = c.vocabulary or []
            data[c.name] = [v[i % len(v)] for i in range(n)]
        else:
            lo, hi = c.range if c.range is not None else (
                (c.mean or 0.0) - 3 * (c.std or 1.0), (c.mean or 0.0) + 3 * (c.std or 1.0))
            data[c.name] = [lo + (hi - lo) * ((i * 0.37) % 1.0) if i > 1 else (lo, hi)[i]
                            for i in range(n)]
    data[schema.label] = [schema.classes[0]] * n
    return Table.from_frame(pd.DataFrame(data))


@torch.no_grad()
def reference(network: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    """The node's own probabilities (node/learn/train.py evaluate)."""
    network.eval()
    return torch.softmax(network(torch.from_numpy(X)), dim=1).numpy()


def compare(got: np.ndarray, want: np.ndarray, backend: str, source: str) -> float:
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    if not (got.shape == want.shape and math.isfinite(diff) and diff <= CHECK_TOLERANCE):
        raise LocalError(f"export check: {backend} disagrees with the node's own model on "
                         f"{source} (max |difference| {diff:g} > {CHECK_TOLERANCE:g}); nothing "
                         "written. This is a bug in flnode's export: report it")
    return diff


# --- the export ----------------------------------------------------------------------------

def export(state_dir: str | Path, out: str | Path, fmt: str = "onnx",
           config: str | Path | None = None, round_: int | None = None,
           force: bool = False) -> dict[str, Any]:
    """Write the export of STATE_DIR's model into `out` (a new directory, or an old export
    with `force`); return its manifest. Nothing is written unless the check passes."""
    if fmt not in FORMATS:
        raise LocalError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not (force and (out / MANIFEST).is_file()):
        raise LocalError(f"--out {out} exists" + (
            "; pass --force to replace it" if (out / MANIFEST).is_file() else
            " and is not an export (no manifest.json): choose a new directory"))
    torch.set_num_threads(1)  # a small model: one thread is faster and steadier here
    member = load_member(state_dir, config, round_)
    # lean start: the card loads nacl and the accountant; read first, a bad log stops early
    from node.ops import model_card

    signer = model_card.load_signer(member)
    logs = model_card.from_logs(member)
    spec = preprocessing(member.schema)
    raw, want, source = check_rows(member, spec)
    # lean start: each format loads only its own libraries (onnx or torch.jit)
    from node.ops import export_onnx, export_torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "onnx":
            files = export_onnx.write(member.network, spec, tmp)
            got = onnx_session(tmp / files[0]).run(["probabilities"], raw)[0]
        elif fmt == "torchscript":
            files = export_torch.write_script(member.network, spec, tmp)
            got = export_torch.score_script(tmp / files[0], raw)
        else:
            files = export_torch.write_state_dict(member.network, member.kind,
                                                  member.options or {}, spec, tmp)
            got = export_torch.score_state_dict(tmp, raw)
        diff = compare(got, want, fmt, source)
        manifest = _manifest(member, spec, fmt, files, tmp, source, len(want), diff)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _sign(member, tmp, fmt, files, manifest, signer, logs)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _record_export(member.state_dir, out)
    return manifest


def _record_export(state_dir: Path, out: Path) -> None:
    """last_export.json in the state dir: where the latest export and its card are, for
    `flnode report --state-dir` (node/ops/report_html/card.py). A state dir this process
    may not write (a reviewer's read-only copy) keeps none; the export stands."""
    from node.ops.model_card import CARD_FILE  # lean start: the card module (nacl)
    from node.runtime.state import atomic_write

    try:
        atomic_write(state_dir / "last_export.json", (json.dumps({
            "dir": str(out.resolve()), "card_sha256": sha256(out / CARD_FILE),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n").encode())
    except OSError as exc:
        import logging  # lean start: only this warning logs

        logging.getLogger("flnode.export").warning(
            "%s: cannot record the export in the state dir (%s): `flnode report` will show "
            "the card's data from the state dir, unsigned", state_dir, exc)


def _sign(member: Member, where: Path, fmt: str, files: list[str], manifest: dict[str, Any],
          signer: Any, logs: dict[str, Any]) -> None:
    """The signed model card (node/ops/model_card.py), then `flnode verify` on the result."""
    # lean start: the card and its check load nacl and, for ONNX, the onnx package
    from node.ops import model_card, model_verify

    params: dict[str, Any] = {
        "digest": manifest["model"]["digest"], "count": manifest["model"]["parameters"],
        "algorithm": "BLAKE2b-256 of the parameters as float32 little-endian, in the "
                     "network's state_dict order (`order`; shapes: manifest.json's "
                     "model.shapes): final.json's",
        "order": list(member.network.state_dict())}
    if fmt == "onnx":
        state = {k: v.detach().numpy() for k, v in member.network.state_dict().items()}
        params["onnx_initializers"] = model_verify.onnx_initializers(where / files[0], state)
    model_card.write(member, signer, where, params, logs)
    model_verify.verify(where, member.cfg.consortium.path)


def _manifest(member: Member, spec: dict[str, Any], fmt: str, files: list[str], where: Path,
              source: str, rows: int, diff: float) -> dict[str, Any]:
    inputs = [{"name": c["name"], "type": "float64" if c["kind"] == "numeric" else "string"}
              for c in spec["columns"]]
    return {
        "version": MANIFEST_VERSION, "format": fmt, "flnode_version": flnode_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "consortium": {"name": member.consortium.name, "id": member.consortium.id.hex()},
        "member": member.cfg.identity.key.stem if member.cfg.identity.key else None,
        "round": member.round, "planned_rounds": member.planned_rounds,
        "finished": member.round >= member.planned_rounds,
        "final": member.final,
        "model": {"kind": member.kind, "options": member.options,
                  "parameters": sum(t.numel() for t in member.network.state_dict().values()),
                  "digest": model_digest(member.network),
                  "shapes": {k: list(t.shape) for k, t in member.network.state_dict().items()}},
        "normalization": member.normalization,
        "schema": spec, "inputs": inputs,
        "outputs": [{"name": "probabilities", "type": "float32",
                     "shape": ["N", len(spec["classes"])], "columns": spec["classes"]}],
        "checked": {"rows": rows, "on": source, "max_abs_difference": diff,
                    "tolerance": CHECK_TOLERANCE},
        "files": [{"path": f, "sha256": sha256(where / f), "bytes": (where / f).stat().st_size}
                  for f in files],
    }

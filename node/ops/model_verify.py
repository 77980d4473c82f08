"""`flnode verify MODEL_DIR [--consortium FILE]`: is this export what its member signed?

In this order, the first failure ends it with a named reason (VerifyError.reason):

1. model_card.json is there, small, and a card (card_missing, card_unreadable);
2. the signer's public key: the consortium file's entry for the card's signer when
   --consortium is given (signer_unknown, consortium_mismatch: the card names another
   consortium id), else the key the card itself declares (self_declared: proves the
   files were not changed since someone signed them, not who signed);
3. the Ed25519 signature over the card's signed bytes (bad_signature);
4. manifest.json's SHA-256 against the card's (manifest_digest);
5. every file the manifest lists against its SHA-256, names plain (file_digest,
   file_missing, manifest_unreadable) -- before any model file is parsed;
6. the parameter digest of the weights in the model file against the card's and the
   manifest's (parameter_digest, weights_unreadable).

Every file is hostile: sizes bounded before reading, JSON types checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gossip.errors import LocalError, shorten
from gossip.membership import load_consortium
from node.ops.model_card import CARD_FILE, CARD_VERSION, signed_bytes
from node.ops.predict import MANIFEST, sha256

# A card is a few KB (a big consortium's member list and rounds table: well under 8 MiB).
MAX_CARD_BYTES = 8 * 1024 * 1024
# manifest.json carries the schema (vocabularies): a few hundred KB at most.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
NET_PREFIX = "net/"  # the network's names in the ONNX graph (node/ops/export_onnx.py)


class VerifyError(LocalError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"verify failed ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Verified:
    member: str
    consortium: str
    fingerprint: str
    key_from: str  # "consortium file PATH" or "the card itself (self-declared)"
    files: list[str] = field(default_factory=list)
    parameter_digest: str = ""
    warnings: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path, limit: int, missing: str, bad: str, what: str) -> tuple[Any, bytes]:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise VerifyError(missing, f"{path}: no {what} here (not an export flnode wrote, or "
                          "one written before model cards)") from None
    except OSError as exc:
        raise VerifyError(bad, f"{path}: cannot read ({exc})") from None
    if len(raw) > limit:
        raise VerifyError(bad, f"{path}: over {limit} bytes: not a {what} flnode wrote")
    try:
        return json.loads(raw), raw
    except ValueError as exc:
        raise VerifyError(bad, f"{path}: not JSON ({exc})") from None


def _hex(value: Any, n: int, where: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != n:
        raise VerifyError("card_unreadable", f"{where} is {shorten(value)}, not {n} bytes in hex")
    return raw


def read_card(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    doc, _ = _read_json(model_dir / CARD_FILE, MAX_CARD_BYTES, "card_missing",
                        "card_unreadable", "model card")
    if not (isinstance(doc, dict) and isinstance(doc.get("card"), dict)
            and isinstance(doc.get("signature"), dict)):
        raise VerifyError("card_unreadable", f"{model_dir / CARD_FILE}: not a model card "
                          "(an object with 'card' and 'signature')")
    card, sig = doc["card"], doc["signature"]
    if card.get("card_version") != CARD_VERSION:
        raise VerifyError("card_unreadable", f"card_version {shorten(card.get('card_version'))}"
                          f"; this flnode reads {CARD_VERSION}")
    if sig.get("algorithm") != "ed25519":
        raise VerifyError("card_unreadable", f"signature algorithm "
                          f"{shorten(sig.get('algorithm'))}, not ed25519")
    for key in ("member", "consortium", "manifest", "parameters"):
        if key not in card:
            raise VerifyError("card_unreadable", f"the card has no {key!r}")
    return card, sig


def verify_signature(card: dict[str, Any], sig: dict[str, Any],
                     consortium: str | Path | None) -> tuple[str, str, list[str]]:
    """The card's signature checked: (signer's key fingerprint, where the key came from,
    warnings)."""
    from node.runtime.identity import fingerprint  # lean start: nacl only, cheap

    member = card.get("member")
    if not isinstance(member, str) or sig.get("signer") != member:
        raise VerifyError("card_unreadable", f"the card names member {shorten(member)}, its "
                          f"signature signer {shorten(sig.get('signer'))}")
    declared = _hex(sig.get("public_key"), 32, "signature public_key")
    cons = card["consortium"] if isinstance(card["consortium"], dict) else {}
    warnings = []
    if consortium is not None:
        c = load_consortium(consortium)
        if cons.get("id") != c.id.hex():
            raise VerifyError("consortium_mismatch", f"the card is of consortium "
                              f"{shorten(cons.get('name'))} id {shorten(cons.get('id'))}; "
                              f"{consortium} is {c.name!r} id {c.id.hex()}")
        entry = next((m for m in c.members if m.name == member), None)
        if entry is None:
            raise VerifyError("signer_unknown", f"the card is signed as {member!r}, not a "
                              f"member of {consortium}")
        key, key_from = entry.public_key, f"consortium file {consortium}"
    else:
        key, key_from = declared, "the card itself (self-declared)"
        warnings.append("no --consortium: the key is the one the card declares; the check "
                        "proves the files are unchanged since that key signed them, not that "
                        f"{member!r} signed them. Give --consortium FILE to check origin")
    value = _hex(sig.get("value"), 64, "signature value")
    try:
        VerifyKey(key).verify(signed_bytes(card), value)
    except (BadSignatureError, ValueError, TypeError):
        raise VerifyError("bad_signature", f"the card's signature does not verify with "
                          f"{member!r}'s key from {key_from}: the card was changed after "
                          "signing, or another key signed it") from None
    return fingerprint(key), key_from, warnings


def verify(model_dir: str | Path, consortium: str | Path | None = None) -> Verified:
    model_dir = Path(model_dir)
    card, sig = read_card(model_dir)
    fp, key_from, warnings = verify_signature(card, sig, consortium)
    manifest_sum = card["manifest"].get("sha256") if isinstance(card["manifest"], dict) else None
    manifest, raw = _read_json(model_dir / MANIFEST, MAX_MANIFEST_BYTES, "manifest_missing",
                               "manifest_unreadable", "manifest")
    got = hashlib.sha256(raw).hexdigest()
    if got != manifest_sum:
        raise VerifyError("manifest_digest", f"{model_dir / MANIFEST}: SHA-256 {got}, the card "
                          f"signed {shorten(manifest_sum)}: the manifest was changed")
    files = check_files(model_dir, manifest)
    params = card["parameters"] if isinstance(card["parameters"], dict) else {}
    digest = weights_digest(model_dir, manifest, params)
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if digest != params.get("digest") or not isinstance(model, dict) \
            or digest != model.get("digest"):
        raise VerifyError("parameter_digest", f"the weights in {model_dir} have digest {digest}; "
                          f"the card signed {shorten(params.get('digest'))}")
    cons = card["consortium"] if isinstance(card["consortium"], dict) else {}
    return Verified(card["member"], str(cons.get("name")), fp, key_from, files, digest,
                    warnings, card)


def check_files(model_dir: Path, manifest: Any) -> list[str]:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, list) and files and all(
            isinstance(f, dict) and isinstance(f.get("path"), str) for f in files)):
        raise VerifyError("manifest_unreadable", "manifest.json has no list of files")
    names = []
    for f in files:
        name = f["path"]
        if name != Path(name).name or name in ("", ".", "..", CARD_FILE, MANIFEST):
            raise VerifyError("manifest_unreadable", f"manifest.json lists {shorten(name)}: "
                              "not a plain file name of the export")
        try:
            got = sha256(model_dir / name)
        except OSError as exc:
            raise VerifyError("file_missing", f"{model_dir / name}: {exc}") from None
        if got != f.get("sha256"):
            raise VerifyError("file_digest", f"{model_dir / name}: SHA-256 {got}, the signed "
                              f"manifest says {shorten(f.get('sha256'))}: the file was changed")
        names.append(name)
    return names


def weights_digest(model_dir: Path, manifest: dict[str, Any], params: dict[str, Any]) -> str:
    """BLAKE2b-256 of the model file's parameters as float32 little-endian in the network's
    state_dict order (the card's `order`; shapes: the manifest's; its JSON keys are
    sorted, not in that order), as the node's final digest."""
    model = manifest.get("model") if isinstance(manifest, dict) else None
    shapes = model.get("shapes") if isinstance(model, dict) else None
    if not (isinstance(shapes, dict) and shapes):
        raise VerifyError("manifest_unreadable", "manifest.json has no model shapes")
    fmt = manifest.get("format")
    try:
        if fmt == "onnx":
            arrays = _onnx_arrays(model_dir, manifest, params)
        elif fmt in ("torchscript", "state_dict"):
            arrays = _torch_arrays(model_dir, manifest, fmt)
        else:
            raise VerifyError("manifest_unreadable", f"format {shorten(fmt)}")
    except VerifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx and torch raise many kinds; one reason
        raise VerifyError("weights_unreadable", f"{model_dir}: {type(exc).__name__}: "
                          f"{str(exc)[:200]}") from None
    order = params.get("order")
    if not (isinstance(order, list) and sorted(map(str, order)) == sorted(shapes)):
        raise VerifyError("card_unreadable", f"the card's parameter order {shorten(order)} is "
                          "not the manifest's parameter names")
    h = hashlib.blake2b(digest_size=32)
    for name in order:
        a, shape = arrays.get(name), shapes[name]
        if a is None or list(a.shape) != list(shape):
            raise VerifyError("parameter_digest", f"parameter {name!r}: the model file holds "
                              f"{None if a is None else list(a.shape)}, the manifest {shape}")
        h.update(a.astype("<f4").tobytes())
    return h.hexdigest()


def _onnx_arrays(model_dir: Path, manifest: dict[str, Any], params: dict[str, Any]):
    import onnx  # lean start: only an ONNX export's check parses the graph
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / manifest["files"][0]["path"]), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    where = params.get("onnx_initializers")
    if not isinstance(where, dict):
        raise VerifyError("card_unreadable", "the card's parameters name no ONNX initializers")
    return {k: numpy_helper.to_array(inits[v]) for k, v in where.items()
            if isinstance(v, str) and v in inits}


def _torch_arrays(model_dir: Path, manifest: dict[str, Any], fmt: str):
    import torch  # lean start: only a TorchScript or state_dict export's check loads torch

    path = model_dir / manifest["files"][0]["path"]
    if fmt == "torchscript":
        state = torch.jit.load(str(path), map_location="cpu").network.state_dict()
        return {k: v.detach().float().numpy() for k, v in state.items()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()
            if isinstance(k, str) and isinstance(v, torch.Tensor)}


def onnx_initializers(path: Path, state: dict[str, Any]) -> dict[str, str]:
    """For each parameter (name -> array), the initializer of the ONNX file holding its
    values: its own name under NET_PREFIX, else the one torch's optimizer merged it into
    (identical values, e.g. two LayerNorms' untrained weights)."""
    import numpy as np  # lean start: only an ONNX export maps its initializers
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name.startswith(NET_PREFIX)}
    out = {}
    for name, value in state.items():
        own = arrays.get(NET_PREFIX + name)
        if own is not None and own.shape == value.shape and np.array_equal(own, value):
            out[name] = NET_PREFIX + name
            continue
        same = next((k for k, a in arrays.items()
                     if a.shape == value.shape and np.array_equal(a, value)), None)
        if same is None:
            raise LocalError(f"ONNX export: parameter {name!r} is in no initializer of the "
                             "graph; the card could not name the weights. This is a bug in "
                             "flnode's export: report it")
        out[name] = same
    return out

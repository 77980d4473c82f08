"""The TorchScript and state_dict exports (node/ops/export.py says what they hold).

TorchScript: `RawScorer`, scripted, wraps the network (traced: any module the node
builds) with the preprocessing of the export's spec, the same steps as the ONNX graph
(node/ops/export_onnx.py). Called as

    scorer = torch.jit.load("model.pt")
    probs = scorer({"balance": torch.tensor([...], dtype=torch.float64), ...},
                   {"student": ["No", "Yes", ...]})      # "" for an empty cell

and gives float32 probabilities [N, classes], NaN in the rows the node would refuse.

state_dict: the network's weights (`weights.pt`, a plain tensor dict: load it with
torch.load(..., weights_only=True)), `network.json` (model kind, its options, inputs,
classes: build_resolved rebuilds it; a plug-in kind is imported to do so) and
`preprocessing.json`; `encode_raw` here is the numpy implementation of that preprocessing.
"""

import json
from pathlib import Path
from typing import Any, Dict, List  # noqa: UP035 - TorchScript

import numpy as np
import torch
from torch import nn

from gossip.errors import LocalError
from node.learn.models import build_resolved

SCRIPT_FILE = "model.pt"
WEIGHTS_FILE = "weights.pt"
NETWORK_FILE = "network.json"
PREPROCESSING_FILE = "preprocessing.json"
# network.json and preprocessing.json: a schema of thousands of columns is well below.
MAX_JSON_BYTES = 64 * 1024 * 1024


class RawScorer(nn.Module):
    """Raw columns -> probabilities (module docstring)."""

    # TorchScript reads these class-level annotations (typing's names, and no `from
    # __future__ import annotations` in this module: it cannot read string annotations)
    names: List[str]  # noqa: UP006
    numeric: List[bool]  # noqa: UP006
    mean: List[float]  # noqa: UP006
    std: List[float]  # noqa: UP006
    lo: List[float]  # noqa: UP006
    hi: List[float]  # noqa: UP006
    fill: List[float]  # noqa: UP006
    has_fill: List[bool]  # noqa: UP006
    indicator: List[bool]  # noqa: UP006
    vocab: List[Dict[str, int]]  # noqa: UP006
    width: List[int]  # noqa: UP006
    cat_fill: List[int]  # noqa: UP006

    def __init__(self, network: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.names = [c["name"] for c in spec["columns"]]
        self.numeric = [c["kind"] == "numeric" for c in spec["columns"]]
        nums = [c for c in spec["columns"] if c["kind"] == "numeric"]
        cats = [c for c in spec["columns"] if c["kind"] != "numeric"]
        self.mean = [float(c["mean"]) for c in nums]
        self.std = [float(c["std"]) for c in nums]
        self.lo = [float(c["range"][0]) if c["range"] else float("-inf") for c in nums]
        self.hi = [float(c["range"][1]) if c["range"] else float("inf") for c in nums]
        self.fill = [float(c["fill"]) if c["fill"] is not None else 0.0 for c in nums]
        self.has_fill = [c["fill"] is not None for c in nums]
        self.indicator = [bool(c["indicator"]) for c in nums]
        self.vocab = [{v: i for i, v in enumerate(c["vocabulary"])} for c in cats]
        self.width = [len(c["vocabulary"]) for c in cats]
        self.cat_fill = [c["vocabulary"].index(c["fill"]) if c["fill"] is not None else -2
                         for c in cats]

    def forward(self, numeric: Dict[str, torch.Tensor],  # noqa: UP006
                categorical: Dict[str, List[str]]) -> torch.Tensor:  # noqa: UP006
        blocks: list[torch.Tensor] = []
        invalid = torch.zeros(0, dtype=torch.bool)
        n = -1
        i_num = 0
        i_cat = 0
        for j in range(len(self.names)):
            name = self.names[j]
            if self.numeric[j]:
                x = numeric[name].to(torch.float64)
                if n < 0:
                    n = x.shape[0]
                    invalid = torch.zeros(n, dtype=torch.bool)
                empty = torch.isnan(x)
                if self.has_fill[i_num]:
                    x = torch.where(empty, torch.full_like(x, self.fill[i_num]), x)
                bad = ~torch.isfinite(x)
                x = torch.where(bad, torch.zeros_like(x), x)
                x = torch.clamp(x, self.lo[i_num], self.hi[i_num])
                if self.std[i_num] == 0.0:
                    z = x * 0.0
                else:
                    z = (x - self.mean[i_num]) / self.std[i_num]
                    bad = bad | (torch.abs(z) > 1e6)
                invalid = invalid | bad
                blocks.append(z.unsqueeze(1))
                if self.indicator[i_num]:
                    blocks.append(empty.to(torch.float64).unsqueeze(1))
                i_num += 1
            else:
                cells = categorical[name]
                if n < 0:
                    n = len(cells)
                    invalid = torch.zeros(n, dtype=torch.bool)
                lookup = self.vocab[i_cat]
                codes: list[int] = []
                for s in cells:
                    if s == "":
                        codes.append(self.cat_fill[i_cat])
                    else:
                        codes.append(lookup.get(s, -1))
                code = torch.tensor(codes, dtype=torch.int64)
                hot = code.unsqueeze(1) == torch.arange(self.width[i_cat]).unsqueeze(0)
                invalid = invalid | (code == -2)
                blocks.append(hot.to(torch.float64))
                i_cat += 1
        x = torch.cat(blocks, dim=1).to(torch.float32)
        probs = torch.softmax(self.network(x), dim=1)
        return torch.where(invalid.unsqueeze(1), torch.full_like(probs, float("nan")), probs)


def write_script(network: nn.Module, spec: dict[str, Any], out: Path) -> list[str]:
    network.eval()
    traced = torch.jit.trace(network, torch.zeros(2, spec["n_features"]), check_trace=False)
    scripted = torch.jit.script(RawScorer(traced, spec))
    scripted.save(str(out / SCRIPT_FILE))
    return [SCRIPT_FILE]


def split(raw: dict[str, np.ndarray], spec: dict[str, Any]
          ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    numeric = {c["name"]: torch.from_numpy(np.array(raw[c["name"]], dtype=np.float64))
               for c in spec["columns"] if c["kind"] == "numeric"}
    categorical = {c["name"]: [str(v) for v in raw[c["name"]].tolist()]
                   for c in spec["columns"] if c["kind"] != "numeric"}
    return numeric, categorical


def load_script(path: Path) -> Any:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError and others
        raise LocalError(f"{path}: not a TorchScript model torch can load ({str(exc)[:200]})") \
            from None


@torch.no_grad()
def score_script(path: Path, raw: dict[str, np.ndarray], scorer: Any = None,
                 spec: dict[str, Any] | None = None) -> np.ndarray:
    scorer = scorer or load_script(path)
    if spec is None:
        spec = {"columns": [{"name": n, "kind": "numeric" if k else "categorical"}
                            for n, k in zip(scorer.names, scorer.numeric, strict=True)]}
    numeric, categorical = split(raw, spec)
    return scorer(numeric, categorical).numpy()


# --- state_dict --------------------------------------------------------------------------------

def write_state_dict(network: nn.Module, kind: str, options: dict[str, Any], spec: dict[str, Any],
                     out: Path) -> list[str]:
    torch.save({k: v.detach().clone() for k, v in network.state_dict().items()},
               out / WEIGHTS_FILE)
    (out / NETWORK_FILE).write_text(json.dumps({
        "kind": kind, "options": options, "inputs": spec["n_features"],
        "classes": len(spec["classes"]), "input": "features float32 [N, inputs] from "
        "preprocessing.json", "output": "logits [N, classes]; softmax for probabilities"},
        indent=1) + "\n")
    (out / PREPROCESSING_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return [WEIGHTS_FILE, NETWORK_FILE, PREPROCESSING_FILE]


def _json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise LocalError(f"{path}: over {MAX_JSON_BYTES} bytes")
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LocalError(f"{path}: unreadable ({exc})") from None


def load_state_dict(where: Path) -> tuple[nn.Module, dict[str, Any]]:
    net = _json(where / NETWORK_FILE)
    spec = _json(where / PREPROCESSING_FILE)
    try:
        options = net["options"]
        if not isinstance(options, dict):
            raise TypeError(f"options: {type(options).__name__}, not a table")
        network = build_resolved(str(net["kind"]), options, int(net["inputs"]),
                                 int(net["classes"]))
        weights = torch.load(where / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        network.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise LocalError(f"{where}: the state_dict export does not load ({str(exc)[:300]})") \
            from None
    network.eval()
    return network, spec


def encode_raw(raw: dict[str, np.ndarray], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Raw columns -> (features float32 [N, n_features], invalid rows bool [N]): the
    export's preprocessing in numpy."""
    blocks, invalid = [], None
    for c in spec["columns"]:
        x = raw[c["name"]]
        if c["kind"] == "numeric":
            x = np.asarray(x, dtype=np.float64)
            empty = np.isnan(x)
            if c["fill"] is not None:
                x = np.where(empty, float(c["fill"]), x)
            bad = ~np.isfinite(x)
            x = np.where(bad, 0.0, x)
            if c["range"] is not None:
                x = np.clip(x, c["range"][0], c["range"][1])
            if c["std"] == 0:
                z = np.zeros_like(x)
            else:
                z = (x - c["mean"]) / c["std"]
                bad |= np.abs(z) > spec.get("far", 1e6)
            blocks.append(z[:, None])
            if c["indicator"]:
                blocks.append(empty.astype(np.float64)[:, None])
        else:
            vocab = {v: i for i, v in enumerate(c["vocabulary"])}
            fill = vocab[c["fill"]] if c["fill"] is not None else -2
            codes = np.fromiter((fill if s == "" else vocab.get(s, -1) for s in x.tolist()),
                                dtype=np.int64, count=len(x))
            blocks.append((codes[:, None] == np.arange(len(vocab))[None, :]).astype(np.float64))
            bad = codes == -2
        invalid = bad if invalid is None else invalid | bad
    assert invalid is not None
    return np.concatenate(blocks, axis=1).astype(np.float32), invalid


@torch.no_grad()
def score_state_dict(where: Path, raw: dict[str, np.ndarray],
                     loaded: tuple[nn.Module, dict[str, Any]] | None = None) -> np.ndarray:
    network, spec = loaded or load_state_dict(where)
    X, invalid = encode_raw(raw, spec)
    probs = torch.softmax(network(torch.from_numpy(X)), dim=1).numpy()
    probs[invalid] = np.nan
    return probs

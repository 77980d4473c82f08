"""Model registry and the model <-> wire-tensor conversion.

Every member of a consortium must build the same architecture and start from
the same initial weights, or averaging makes no sense. The architecture comes
from config (a mismatch shows up as `shape` rejections); the initial weights
come from a seed every member derives from the consortium's name and schema
(not its member keys, so a simulation with fresh keys and the same --seed
starts from the same weights).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from gossip.bodies import TensorSpec
from gossip.errors import LocalError
from gossip.membership import Consortium

MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "logreg": lambda n_in, n_out, hidden: nn.Linear(n_in, n_out),
    "mlp": lambda n_in, n_out, hidden: nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    ),
}


def build_model(kind: str, n_in: int, n_out: int, hidden: int = 64, seed: int = 0) -> nn.Module:
    if kind not in MODELS:
        raise LocalError(f"model.kind {kind!r}: choose one of {', '.join(MODELS)}")
    # A private generator: building a model never touches torch's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[kind](n_in, n_out, hidden)


def init_seed_from(consortium: Consortium) -> int:
    digests = consortium.digests()
    raw = hashlib.blake2b(f"init:{digests['name']}:{digests['schema']}".encode(),
                          digest_size=8).digest()
    return int.from_bytes(raw, "little") & (2**63 - 1)


def tensor_spec(model: nn.Module) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(t.shape), "<f4") for name, t in model.state_dict().items()]


def get_flat(model: nn.Module) -> torch.Tensor:
    """All parameters as one float32 vector, in state_dict order."""
    return torch.cat([t.detach().reshape(-1).float() for t in model.state_dict().values()])


def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    state = model.state_dict()
    offset = 0
    new = {}
    for name, t in state.items():
        n = t.numel()
        new[name] = flat[offset:offset + n].reshape(t.shape).to(t.dtype).clone()
        offset += n
    if offset != flat.numel():
        raise LocalError(f"flat vector has {flat.numel()} values, model has {offset}")
    model.load_state_dict(new)


def flat_to_named(model: nn.Module, flat: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    out, offset = [], 0
    for name, t in model.state_dict().items():
        n = t.numel()
        out.append((name, flat[offset:offset + n].reshape(t.shape).numpy().astype("<f4")))
        offset += n
    return out


def named_to_flat(model: nn.Module, tensors: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.cat([
        torch.from_numpy(np.array(tensors[name], dtype=np.float32)).reshape(-1)
        for name in model.state_dict()
    ])

"""The deeper built-in networks (deep_mlp, res_mlp) and loading a plug-in's factory.

Options are checked by node/learn/kinds.py (`resolve`) before anything here runs.
Normalization is LayerNorm or GroupNorm (kinds.py says why never BatchNorm); both
normalize each example on its own, so per-example gradients stay defined and Opacus
computes them (hooks mode). Dropout (`Dropout`) draws its masks from torch's global
generator, or from a generator of its own once `seed_dropout` gave it one: the in-process
simulator does, per member from its training.seed, so a seeded run with dropout repeats
bit for bit (members train in threads: a shared global generator gives each member's
masks in whatever order the threads draw). Dropout is not a privacy mechanism: nothing
of the DP guarantee rests on its masks, and a seeded mask protects nothing less.

A plug-in (`build_plugin`) is imported by name from the member's own config or
consortium file, never from anything a peer sends: importing it runs its code with the
node's rights (docs/operate/models.md).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gossip.errors import LocalError


class Dropout(nn.Dropout):
    """nn.Dropout whose masks come from `generator` when set (seed_dropout), else from
    torch's global generator as nn.Dropout's do. The same layer otherwise: no parameters,
    the identity in eval mode (so the exports and Opacus see an nn.Dropout)."""

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.generator is None or not self.training or self.p == 0:
            return super().forward(x)
        if self.p == 1:
            return torch.zeros_like(x)
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep / (1 - self.p)

    def __deepcopy__(self, memo: dict[int, Any]) -> Dropout:
        # A round trains a deep copy of the member's model (node/runtime/release.py): the
        # copy draws from the member's one generator, so round r+1 continues its stream
        # instead of repeating round r's masks.
        if self.generator is not None:
            memo[id(self.generator)] = self.generator
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new


def seed_dropout(model: nn.Module, seed: int) -> int:
    """Give every dropout layer of `model` one generator seeded from `seed` (a simulated
    member's training.seed; never privacy noise, which comes from its NoiseSource): a
    plain nn.Dropout (a plug-in's) becomes a `Dropout`, the same layer. Returns how many
    layers draw from it. A plug-in calling torch.nn.functional.dropout in its forward
    still draws from the global generator."""
    generator = torch.Generator().manual_seed(seed)
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = Dropout  # a subclass adding no state: the same layer
        if isinstance(module, Dropout):
            module.generator = generator
            n += 1
    return n


def _norm(kind: str, width: int, groups: int | None) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(width)
    if kind == "group":
        return nn.GroupNorm(groups or 1, width)
    return nn.Identity()


def deep_mlp(n_in: int, n_out: int, *, hidden: int, depth: int, norm: str, dropout: float,
             groups: int | None = None) -> nn.Module:
    """`depth` blocks of Linear -> norm -> ReLU -> Dropout, then a Linear head. With
    norm = "none" and dropout = 0 a plain Sequential of Linear and ReLU (the DP-SGD fast
    path takes it: node/learn/dpsgd.py)."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if norm != "none":
            layers.append(_norm(norm, hidden, groups))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """x + Linear(Dropout(ReLU(Linear(norm(x))))): pre-norm, so the skip path is the
    identity and a deep stack starts close to its stem's output."""

    def __init__(self, width: int, norm: str, dropout: float, groups: int | None) -> None:
        super().__init__()
        self.norm = _norm(norm, width, groups)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.drop = Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):  # noqa: ANN001, ANN201 (torch's signature)
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class ResMLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, *, hidden: int, blocks: int, norm: str,
                 dropout: float, groups: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Linear(n_in, hidden)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden, norm, dropout, groups)
                                      for _ in range(blocks)])
        self.norm = _norm(norm, hidden, groups)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):  # noqa: ANN001, ANN201 (torch's signature)
        return self.head(self.act(self.norm(self.blocks(self.stem(x)))))


def res_mlp(n_in: int, n_out: int, **options: Any) -> nn.Module:
    return ResMLP(n_in, n_out, **options)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"deep_mlp": deep_mlp, "res_mlp": res_mlp}


def load_factory(kind: str) -> Callable[..., Any]:
    """The factory a plug-in kind "package.module:factory" names, imported (its code runs)."""
    module_name, _, attr = kind.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LocalError(f"model.kind {kind!r}: cannot import {module_name!r} ({exc}): the "
                         "plug-in must be importable by this member (installed, or its "
                         "directory on PYTHONPATH)") from None
    except Exception as exc:  # the plug-in's own code failed at import
        raise LocalError(f"model.kind {kind!r}: importing {module_name!r} raised "
                         f"{type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise LocalError(f"model.kind {kind!r}: {module_name!r} has no callable {attr!r}")
    return factory


def build_plugin(kind: str, n_in: int, n_out: int, options: Mapping[str, Any]) -> nn.Module:
    """factory(n_in, n_out, **options) -> an nn.Module, or a LocalError naming the plug-in."""
    factory = load_factory(kind)
    try:
        model = factory(n_in, n_out, **options)
    except TypeError as exc:
        raise LocalError(f"model.kind {kind!r}: the factory refused its arguments (n_in "
                         f"{n_in}, n_out {n_out}, options {dict(options)}): {exc}") from None
    except Exception as exc:  # the plug-in's own code: say whose it is
        raise LocalError(f"model.kind {kind!r}: the factory raised {type(exc).__name__}: "
                         f"{exc}") from None
    if not isinstance(model, nn.Module):
        raise LocalError(f"model.kind {kind!r}: the factory returned a "
                         f"{type(model).__name__}, not a torch.nn.Module")
    return model

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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from gossip.bodies import MAX_NDIM, MAX_TENSOR_NAME, MAX_TENSORS, TensorSpec
from gossip.errors import LocalError
from gossip.membership import Consortium
from node.learn import nets
from node.learn.kinds import Shapes, compare, is_plugin, pin_table, read_pin, resolve

MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "logreg": lambda n_in, n_out, hidden: nn.Linear(n_in, n_out),
    "mlp": lambda n_in, n_out, hidden: nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    ),
}


def build_model(kind: str, n_in: int, n_out: int, hidden: int = 64, seed: int = 0,
                options: Mapping[str, Any] | None = None) -> nn.Module:
    """The network of `kind` (node/learn/kinds.py) from `hidden` and the kind's other
    options (a plug-in's [model.options]), its initial weights drawn from `seed`."""
    try:
        resolved = resolve(kind, None if is_plugin(kind) else hidden, options or {})
    except ValueError as exc:
        raise LocalError(f"model.kind {kind!r}: {exc}") from None
    return build_resolved(kind, resolved, n_in, n_out, seed)


def build_resolved(kind: str, options: Mapping[str, Any], n_in: int, n_out: int,
                   seed: int = 0) -> nn.Module:
    """The network of `kind` with its complete options (kinds.resolve, or a consortium's
    pin), checked (check_network)."""
    # A private generator: building a model never touches torch's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in MODELS:
            model = MODELS[kind](n_in, n_out, options.get("hidden", 64))
        elif kind in nets.BUILDERS:
            model = nets.BUILDERS[kind](n_in, n_out, **options)
        else:
            model = nets.build_plugin(kind, n_in, n_out, options)
    check_network(model, kind, n_in, n_out)
    return model


def check_network(model: nn.Module, kind: str, n_in: int, n_out: int) -> None:
    """What flnode needs of any network (a plug-in's above all), or a LocalError naming
    what is wrong: no BatchNorm, every state_dict entry a float32 parameter of its own
    (members send and average the state_dict: a buffer is not trained by DP-SGD and may
    be computed from records), and (batch, n_in) rows mapped to (batch, n_out) logits."""
    where = f"model.kind {kind!r}"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or getattr(
                module, "track_running_stats", False):
            raise LocalError(f"{where}: {name or 'the network'} is a "
                             f"{type(module).__name__}: running statistics and batch "
                             "normalization mix records and break DP-SGD's per-example "
                             "clipping; use LayerNorm or GroupNorm")
    params = dict(model.named_parameters())
    state = model.state_dict()
    if not params:
        raise LocalError(f"{where}: the network has no parameters")
    extra = [k for k in state if k not in params]
    if extra or len(state) != len(params):
        raise LocalError(f"{where}: state_dict entries that are not parameters of their own "
                         f"({', '.join(extra) or 'a shared (tied) parameter'}): flnode sends "
                         "and averages the whole state_dict; register buffers with "
                         "persistent=False")
    if len(params) > MAX_TENSORS:
        raise LocalError(f"{where}: {len(params)} parameter tensors; a share carries at most "
                         f"{MAX_TENSORS} (gossip/bodies.py)")
    for name, t in params.items():
        if len(name) > MAX_TENSOR_NAME or t.dim() > MAX_NDIM:
            raise LocalError(f"{where}: parameter {name[:80]!r} ({t.dim()} dimensions): a "
                             f"share carries names of at most {MAX_TENSOR_NAME} characters "
                             f"and at most {MAX_NDIM} dimensions (gossip/bodies.py)")
        if t.dtype != torch.float32:
            raise LocalError(f"{where}: parameter {name} is {t.dtype}: flnode trains and "
                             "sends float32")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        was = model.training
        model.eval()
        try:
            out = model(torch.zeros(2, n_in))
        except Exception as exc:  # the member's own code: say whose it is
            raise LocalError(f"{where}: the network fails on a (2, {n_in}) batch: "
                             f"{type(exc).__name__}: {exc}") from None
        finally:
            model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_out):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LocalError(f"{where}: a (2, {n_in}) batch gives {got}, expected logits of "
                         f"shape (2, {n_out}) (one per class)")


def parameter_shapes(model: nn.Module) -> Shapes:
    """The network's parameter names and shapes in state_dict order (what is pinned)."""
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


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


def pin_for(kind: str, options: Mapping[str, Any], n_in: int, n_out: int,
            seed: int = 0) -> dict[str, Any]:
    """The consortium file's [model] table for `kind` with its complete `options`, on a
    schema of n_in features and n_out classes (node/learn/kinds.py pin_table)."""
    model = build_resolved(kind, options, n_in, n_out, seed)
    return pin_table(kind, options, parameter_shapes(model))


def agreed_model(kind: str, options: Mapping[str, Any], given: bool, pin: Mapping[str, Any],
                 n_in: int, n_out: int, seed: int, source: str) -> nn.Module:
    """The network this member trains: its own config's (`kind`, complete `options`)
    when the consortium file has no [model] table (`pin` empty: what each member's
    config says, as before the table existed); else the pinned kind and options, which
    a node config that states its own [model] (`given`) must equal, built and refused
    unless its parameter names and shapes are the agreed ones (kinds.compare)."""
    if not pin:
        return build_resolved(kind, options, n_in, n_out, seed)
    p_kind, p_options, agreed = read_pin(pin, source)
    plugin = is_plugin(p_kind)
    try:
        resolved = resolve(p_kind, None if plugin else p_options.get("hidden"),
                           {k: v for k, v in p_options.items() if plugin or k != "hidden"})
    except ValueError as exc:
        raise LocalError(f"{source}: [model].options: {exc}") from None
    if resolved != p_options:
        raise LocalError(f"{source}: [model].options {p_options} are not the complete options "
                         f"of {p_kind} ({resolved}): write the table with `python -m "
                         "node.ops.model_pin`")
    if given and (kind, dict(options)) != (p_kind, resolved):
        raise LocalError(f"model: this node's config says kind {kind!r} with {dict(options)} "
                         f"but the consortium agreed {p_kind!r} with {resolved} in {source} "
                         "[model]: remove [model] from the node config (the consortium's is "
                         "then used) or make it the same")
    model = build_resolved(p_kind, resolved, n_in, n_out, seed)
    compare(agreed, parameter_shapes(model), p_kind, source)
    return model

"""A member's part of one consortium DP-SGD step (distributed DP, node/privacy/distributed.py):
Poisson-sample its rows at the consortium's rate q, compute each sampled example's
gradient, and hand them to `member_contribution` (clip, scale, round, sum, Skellam share).

The per-example gradients of a Linear/ReLU stack come from the same single forward and
backward pass as node/learn/dpsgd.py (grad_W_i = delta_i a_i^T, grad_b_i = delta_i), but
materialized (examples x parameters, float64): the rounding is per example, so that
removing one record removes one independent integer vector. The Poisson sampling draws
from the node's NoiseSource (os.urandom on a real node), the rounding and the noise from
`os_generator` (os.urandom-keyed).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from node.learn.dpsgd import _layer_deltas
from node.privacy.distributed import DistributedDPError, SumMechanism, member_contribution
from node.privacy.mechanisms import NoiseSource


def per_example_gradients(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> np.ndarray:
    """Each example's gradient of the cross-entropy loss, flattened in model.parameters()
    order (weight, bias per Linear layer), float64, shape (examples, parameters)."""
    inputs, deltas = _layer_deltas(model, xb, yb)
    parts = []
    for a, d in zip(inputs, deltas, strict=True):
        a64, d64 = a.detach().double(), d.double()
        parts += [torch.einsum("bo,bi->boi", d64, a64).reshape(len(xb), -1), d64]
    return torch.cat(parts, dim=1).numpy()


def consortium_step(model: nn.Module, X: np.ndarray, y: np.ndarray, *, sample_rate: float,
                    mech: SumMechanism, sigma: float, noise: NoiseSource,
                    rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """This member's integer vector for one secure round and its batch size (which stays
    local). `sample_rate` is the consortium's q, the same for every member."""
    params = list(model.parameters())
    if sum(p.numel() for p in params) != mech.dim:
        raise DistributedDPError(f"consortium step: the model has {sum(p.numel() for p in params)} "
                         f"parameters, the consortium's mechanism {mech.dim}")
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    chosen = noise.uniform(len(Xt)) < sample_rate
    xb, yb = Xt[chosen], yt[chosen]
    if len(xb):
        grads = per_example_gradients(model, xb, yb)
    else:
        grads = np.zeros((0, mech.dim))
    return member_contribution(grads, mech, sigma, rng), int(len(xb))

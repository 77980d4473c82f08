"""DP-SGD for stacks of Linear (+ ReLU) layers, with exact per-example norms in closed form.

Why not only Opacus: for the small tabular models a consortium trains here,
Opacus' per-step machinery (hooks, per-parameter grad_sample tensors, the
DPOptimizer) costs 5-6x a plain SGD step (measured by scripts/bench_privacy.py);
its "ghost" and "functorch" modes were slower still. For a Linear layer the
per-example gradient is an outer product, grad_W_i = delta_i a_i^T, so its
squared norm is ||delta_i||^2 ||a_i||^2 (plus ||delta_i||^2 for the bias):
one forward pass and one backward pass to the layer outputs give every
example's exact gradient norm, and the clipped sum is sum_i c_i delta_i a_i^T,
two matmuls (Goodfellow 2015; "ghost clipping", Li et al. 2021).

The mechanism is Opacus' exactly, so Opacus' RDP accountant charges it:
Poisson sampling with rate q = 1/steps_per_epoch (each row independently),
clip factor min(1, C / (||g_i|| + 1e-6)), noise
N(0, sigma^2 C^2) added to the clipped sum, divided by the expected batch
size q*n, steps_per_epoch steps per epoch, an empty sample still a step.
Both the sampling and the noise come from the node's NoiseSource: os.urandom
(Box-Muller) on a real node, so neither is predictable from anything in a
config (Opacus' modes use torch's Mersenne Twister seeded from os.urandom).
tests/test_dpsgd.py checks norms and clipped sums against torch.func
per-example gradients.

FedProx (`prox_mu` > 0): each step adds mu (w - w_start) to the noised, clipped
mean gradient, w_start the model the round started from. That term is not
computed from any record (w and w_start are the previous DP step's output and
the previous aggregate), so the step is post-processing of the DP gradient plus a
data-independent term: the per-example clipping, the noise and the accountant's
charge are unchanged. Adding it before clipping would instead put it inside each
example's norm, spending clip budget on a term the records do not determine.

Control variates (`correction` = c - c_i, node/learn/control.py): fixed before the round's
first step from released values only, so after each noised step the further step
w - lr (c - c_i) is post-processing, like the FedProx term: clipping, noise and the
accountant's charge are those of plain DP-SGD.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gossip.errors import LocalError
from node.learn.train import check_correction, proximal_start
from node.privacy.accountant import steps_per_epoch
from node.privacy.mechanisms import NoiseSource

CLIP_EPS = 1e-6  # as Opacus: C / (norm + 1e-6)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = list(model) if isinstance(model, nn.Sequential) else [model]
    for layer in layers:
        if not isinstance(layer, nn.Linear | nn.ReLU):
            raise LocalError(f"the fast DP-SGD path supports Linear and ReLU layers, not "
                             f"{type(layer).__name__}: set privacy.grad_sample_mode = \"hooks\"")
    return layers


def dp_engine(model: nn.Module, grad_sample_mode: str) -> str:
    """The DP-SGD engine a model trains with: "fast" (this module) where privacy.grad_sample_mode
    is "fast" and the model is a stack of Linear (with biases) and ReLU, else Opacus in
    the mode asked, "hooks" where "fast" was asked of a model it cannot take (LayerNorm,
    GroupNorm, Dropout, residual blocks, most plug-ins). Both run the same mechanism
    (module docstring), so the accountant charges them alike."""
    if grad_sample_mode != "fast":
        return grad_sample_mode
    try:
        layers = _layers(model)
    except LocalError:
        return "hooks"
    if len(list(model.parameters())) != 2 * sum(isinstance(m, nn.Linear) for m in layers):
        return "hooks"
    return "fast"


def _layer_deltas(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor
                  ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """One forward and one backward pass of a Linear/ReLU stack: each Linear layer's input
    a and the gradient delta of the summed cross-entropy with respect to its output (summed,
    so row i of delta is example i's own). Example i's gradient of that layer is
    (delta_i a_i^T, delta_i). Shared by the clipped sum here and node/learn/dstep.py."""
    layers = _layers(model)
    inputs, outputs = [], []
    h = xb
    for layer in layers:
        if isinstance(layer, nn.Linear):
            inputs.append(h)
            h = layer(h)
            outputs.append(h)
        else:
            h = layer(h)
    loss = nn.functional.cross_entropy(h, yb, reduction="sum")  # sum: per-example grads
    return inputs, torch.autograd.grad(loss, outputs)


def clipped_gradient_sum(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, clip_norm: float
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over the batch of per-example gradients, each clipped to clip_norm.

    Returns (one tensor per parameter in model.parameters() order, per-example norms).
    """
    inputs, deltas = _layer_deltas(model, xb, yb)
    sq = torch.zeros(len(xb), dtype=torch.float64)
    for a, d in zip(inputs, deltas, strict=True):
        d2 = (d.double() ** 2).sum(1)
        sq += d2 * (a.double() ** 2).sum(1) + d2  # weight + bias
    norms = sq.sqrt()
    factor = (clip_norm / (norms + CLIP_EPS)).clamp(max=1.0).float()
    grads: list[torch.Tensor] = []
    for a, d in zip(inputs, deltas, strict=True):
        dc = d * factor[:, None]
        grads += [dc.T @ a, dc.sum(0)]  # nn.Linear's parameter order: weight, bias
    return grads, norms.float()


def train_local_dp_fast(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int,
                        batch_size: int, lr: float, clip_norm: float, noise_multiplier: float,
                        noise: NoiseSource, prox_mu: float = 0.0,
                        correction: list[torch.Tensor] | None = None
                        ) -> list[tuple[float, float, int]]:
    """DP-SGD with Poisson sampling; returns the (sigma, q, steps) history to charge.
    `prox_mu` > 0 adds the FedProx term after clipping and noise (module docstring);
    at 0 it is not computed: the same steps, bit for bit. `correction` (c - c_i per
    parameter) is a further step - lr (c - c_i) after each noised one; None computes
    nothing, all zeros gives the same steps bit for bit."""
    params = list(model.parameters())
    if len(params) != 2 * sum(isinstance(m, nn.Linear) for m in _layers(model)):
        raise LocalError("the fast DP-SGD path needs Linear layers with biases")
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    n = len(Xt)
    per_epoch = steps_per_epoch(n, batch_size)
    q = 1.0 / per_epoch
    expected_batch = q * n
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    start = proximal_start(model, prox_mu)
    corr = check_correction(params, correction)
    model.train()
    steps = 0
    for _ in range(epochs):
        for _ in range(per_epoch):
            chosen = noise.uniform(n) < q
            xb, yb = Xt[chosen], yt[chosen]
            if len(xb):
                grads, _ = clipped_gradient_sum(model, xb, yb, clip_norm)
            else:
                grads = [torch.zeros_like(p) for p in params]
            # One draw for every parameter of the step (os.urandom is called once).
            zs = noise.gaussian(total, noise_multiplier * clip_norm).split(sizes)
            with torch.no_grad():
                if start is None:
                    for p, g, z in zip(params, grads, zs, strict=True):
                        p -= lr * (g + z.reshape(p.shape)) / expected_batch
                else:
                    for p, g, z, w0 in zip(params, grads, zs, start, strict=True):
                        p -= lr * ((g + z.reshape(p.shape)) / expected_batch
                                   + prox_mu * (p - w0))
                if corr is not None:
                    for p, c in zip(params, corr, strict=True):
                        p.add_(c, alpha=-lr)
            steps += 1
    return [(float(noise_multiplier), q, steps)]

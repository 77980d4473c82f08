"""The fast DP-SGD path computes exactly what per-example gradients say it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gossip.errors import LocalError
from node.learn.dpsgd import clipped_gradient_sum, train_local_dp_fast
from node.learn.models import build_model
from node.privacy.mechanisms import OsNoise, SeededNoise


def per_example_grads(model, xb, yb):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xb, yb)
    return [g[k] for k in params]


@pytest.mark.parametrize("kind", ["mlp", "logreg"])
@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])
def test_norms_and_clipped_sums_match_torch_func_per_example_gradients(kind, clip):
    torch.manual_seed(0)
    model = build_model(kind, 7, 3, 16, seed=1)
    xb, yb = torch.randn(40, 7) * 3, torch.randint(0, 3, (40,))
    ours, norms = clipped_gradient_sum(model, xb, yb, clip)
    ref = per_example_grads(model, xb, yb)
    ref_norms = torch.sqrt(sum((g.reshape(40, -1) ** 2).sum(1) for g in ref))
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    factor = (clip / (ref_norms + 1e-6)).clamp(max=1.0)
    for mine, g in zip(ours, ref, strict=True):
        expected = (g * factor.reshape(-1, *[1] * (g.dim() - 1))).sum(0)
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)
    assert (torch.sqrt(sum((g.reshape(40, -1) ** 2).sum(1) for g in ref)) * factor
            <= clip * (1 + 1e-5)).all()


def test_training_reports_the_history_opacus_would_charge_and_noise_moves_weights():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    model = build_model("mlp", 4, 2, 16)
    before = [p.detach().clone() for p in model.parameters()]
    history = train_local_dp_fast(model, X, y, epochs=2, batch_size=50, lr=0.1, clip_norm=1.0,
                                  noise_multiplier=1.3, noise=SeededNoise(0))
    assert history == [(1.3, 0.1, 20)]  # the same (sigma, q, steps) as Opacus' loader
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_it_learns_without_noise_and_refuses_layers_it_cannot_handle():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    model = build_model("logreg", 4, 2)
    train_local_dp_fast(model, X, y, epochs=5, batch_size=64, lr=0.5, clip_norm=10.0,
                        noise_multiplier=1e-6, noise=SeededNoise(0))
    acc = (model(torch.from_numpy(X)).argmax(1).numpy() == y).mean()
    assert acc > 0.95
    with pytest.raises(LocalError, match="grad_sample_mode"):
        train_local_dp_fast(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), X, y,
                            epochs=1, batch_size=64, lr=0.1, clip_norm=1.0, noise_multiplier=1.0,
                            noise=OsNoise())


def test_os_noise_sampling_and_noise_have_the_right_distribution():
    """DP-SGD's Poisson sampling and Gaussian noise now come from os.urandom on a real node:
    check the moments (a wrong scale or a stuck source would break the accountant's claim)."""
    noise = OsNoise()
    u = noise.uniform(200_000)
    assert u.dtype == torch.float64 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    z = noise.gaussian(200_001, 2.5)
    assert z.shape == (200_001,)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 2.5) < 0.02
    assert not torch.equal(noise.uniform(8), noise.uniform(8))

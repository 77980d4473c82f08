"""One local round of training, and evaluation. Plain SGD for now.

Record-level DP-SGD (Opacus) is a later mode; update-level privacy is applied
to the result of this function by `node.privacy`.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn


def train_local(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int,
                batch_size: int, lr: float, generator: torch.Generator) -> nn.Module:
    """SGD on cross-entropy, shuffling with `generator` (deterministic per seed)."""
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(Xt), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(Xt[idx]), yt[idx]).backward()
            opt.step()
    return model


def metric_name(n_classes: int) -> str:
    return "roc_auc" if n_classes == 2 else "accuracy"


@torch.no_grad()
def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Held-out metrics: ROC-AUC and PR-AUC for binary labels, accuracy always."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(X))
    probs = torch.softmax(logits, dim=1).numpy()
    if not np.isfinite(probs).all():
        # A model with non-finite parameters (or an input that overflows float32):
        # recorded as NaN metrics, never raised; the caller says why.
        nan = float("nan")
        return {"accuracy": nan, **({"roc_auc": nan, "pr_auc": nan} if probs.shape[1] == 2 else {})}
    out = {"accuracy": float((probs.argmax(1) == y).mean())}
    if probs.shape[1] == 2:
        if len(np.unique(y)) == 2:
            out["roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
            out["pr_auc"] = float(average_precision_score(y, probs[:, 1]))
        else:  # undefined on a one-class evaluation set; say so rather than invent
            out["roc_auc"] = out["pr_auc"] = float("nan")
    return out


def train_local_dp(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int,
                   batch_size: int, lr: float, clip_norm: float, noise_multiplier: float,
                   generator: torch.Generator, grad_sample_mode: str = "hooks"
                   ) -> list[tuple[float, float, int]]:
    """DP-SGD through Opacus; returns Opacus' own accountant history for this round.

    `generator` drives both the Poisson sampling and the noise; a real node
    passes one seeded from os.urandom (see node.privacy.OsNoise).
    """
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)),
                        batch_size=batch_size, generator=generator)
    engine = PrivacyEngine(accountant="rdp")
    model.train()  # Opacus refuses a module in eval mode
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode and empty batches
        private, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, criterion=loss_fn,
            noise_multiplier=noise_multiplier, max_grad_norm=clip_norm, poisson_sampling=True,
            noise_generator=generator, grad_sample_mode=grad_sample_mode)
        private.train()
        for _ in range(epochs):
            for xb, yb in dp_loader:
                dp_opt.zero_grad(set_to_none=True)
                if len(xb):
                    loss_fn(private(xb), yb).backward()
                dp_opt.step()  # an empty Poisson batch is still a (noise-only) step
    if hasattr(private, "_close"):
        private._close()  # remove Opacus' hooks from the module
    return [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]

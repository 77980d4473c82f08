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
    logits = model(torch.from_numpy(X))
    probs = torch.softmax(logits, dim=1).numpy()
    out = {"accuracy": float((probs.argmax(1) == y).mean())}
    if probs.shape[1] == 2:
        if len(np.unique(y)) == 2:
            out["roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
            out["pr_auc"] = float(average_precision_score(y, probs[:, 1]))
        else:  # undefined on a one-class evaluation set; say so rather than invent
            out["roc_auc"] = out["pr_auc"] = float("nan")
    return out

"""One local round of training, and evaluation. Plain SGD for now.

Record-level DP-SGD (Opacus) is a later mode; update-level privacy is applied
to the result of this function by `node.privacy`.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from node.learn.auc import average_precision, roc_auc

log = logging.getLogger("flnode.train")


def check_prox_mu(prox_mu: float) -> float:
    """`prox_mu` as a float, or a ValueError naming it (not a finite number >= 0)."""
    ok = isinstance(prox_mu, int | float) and not isinstance(prox_mu, bool)
    if not (ok and math.isfinite(prox_mu) and prox_mu >= 0):
        raise ValueError(f"training.prox_mu must be a finite number >= 0, got {prox_mu!r}")
    return float(prox_mu)


def check_lr_decay(lr_decay: float) -> float:
    """`lr_decay` as a float, or a ValueError naming it (not a number in (0, 1])."""
    ok = isinstance(lr_decay, int | float) and not isinstance(lr_decay, bool)
    if not (ok and math.isfinite(lr_decay) and 0 < lr_decay <= 1):
        raise ValueError(f"training.lr_decay must be a number in (0, 1], got {lr_decay!r}")
    return float(lr_decay)


def round_lr(lr: float, lr_decay: float, round_: int) -> float:
    """The learning rate of round `round_` (0-based): lr * lr_decay ** round_.

    One rule, exponential decay across rounds (within a round the rate is constant).
    At lr_decay = 1 (the default) it is `lr` exactly, every round. The round index is
    public and the rate is not a privacy parameter: the DP accountant charges steps
    (epochs x steps per epoch, pinned in the privacy plan), whatever the rate."""
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"round {round_!r} is not a round number")
    return float(lr) * check_lr_decay(lr_decay) ** round_


def check_correction(params: list[torch.Tensor], correction: list[torch.Tensor] | None
                     ) -> list[torch.Tensor] | None:
    """The control-variate correction c - c_i (node/learn/control.py), one tensor per
    parameter, checked against the parameters' shapes; None: no correction."""
    if correction is None:
        return None
    correction = list(correction)
    if len(correction) != len(params) or any(
            c.shape != p.shape for c, p in zip(correction, params, strict=False)):
        raise ValueError(f"control-variate correction: {len(correction)} tensor(s) of shapes "
                         f"{[tuple(c.shape) for c in correction]} for parameters of shapes "
                         f"{[tuple(p.shape) for p in params]}")
    if not all(bool(torch.isfinite(c).all()) for c in correction):
        raise ValueError("control-variate correction has non-finite values")
    return [c.detach().to(p.dtype) for c, p in zip(correction, params, strict=True)]


def proximal_start(model: nn.Module, prox_mu: float) -> list[torch.Tensor] | None:
    """A copy of the parameters local training starts from (w_start of the FedProx
    term), or None when the term is off (prox_mu = 0)."""
    if check_prox_mu(prox_mu) == 0:
        return None
    return [p.detach().clone() for p in model.parameters()]


def train_local(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int,
                batch_size: int, lr: float, generator: torch.Generator,
                prox_mu: float = 0.0, correction: list[torch.Tensor] | None = None
                ) -> nn.Module:
    """SGD on cross-entropy, shuffling with `generator` (deterministic per seed).

    Plain SGD written out (p -= lr * grad, what torch.optim.SGD does with its defaults,
    bit for bit; tests/test_lean.py compares): constructing torch.optim.SGD imports
    torch._dynamo, ~70 MB and ~800 modules a node never uses.

    `prox_mu` > 0 adds FedProx's proximal term mu/2 ||w - w_start||^2 to the loss
    (Li et al. 2020), w_start the model training started from: its gradient
    mu (w - w_start) is added to each step's. At 0 (the default) the term is not
    computed at all: the same steps, bit for bit.

    `correction` (control variates, node/learn/control.py): c - c_i per parameter
    (model.parameters() order), fixed for the round; each step is then
    w - lr (g + c - c_i), taken as the plain step followed by w - lr (c - c_i). None
    (the default) computes nothing; all zeros gives the plain steps bit for bit.
    """
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    every = list(model.parameters())
    corr = check_correction(every, correction)
    params = [p for p in every if p.requires_grad]
    fixes = None if corr is None else [c for p, c in zip(every, corr, strict=True)
                                       if p.requires_grad]
    start = proximal_start(model, prox_mu)
    anchors = None if start is None else [
        w0 for p, w0 in zip(model.parameters(), start, strict=True) if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(Xt), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for p in params:
                p.grad = None
            loss_fn(model(Xt[idx]), yt[idx]).backward()
            with torch.no_grad():
                if anchors is not None:
                    for p, w0 in zip(params, anchors, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p - w0, alpha=prox_mu)
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
                if fixes is not None:
                    for p, c in zip(params, fixes, strict=True):
                        p.add_(c, alpha=-lr)
    return model


def distinct(y: np.ndarray) -> np.ndarray:
    """np.unique(y). Asked without counts, np.unique calls np.ma.is_masked, which imports
    numpy.ma into a node that has no other use for it (~0.4 MB, ~60 modules)."""
    return np.unique(y, return_counts=True)[0]


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
        if len(distinct(y)) == 2:
            out["roc_auc"] = roc_auc(y, probs[:, 1])
            out["pr_auc"] = average_precision(y, probs[:, 1])
        else:  # undefined on a one-class evaluation set; say so rather than invent
            out["roc_auc"] = out["pr_auc"] = float("nan")
    return out


def warn_about_held_out(name: str, held_y: np.ndarray, classes: list[str], *,
                        eval_path: object, eval_fraction: float, total_rows: int,
                        dropped: int = 0) -> None:
    """Say at start what the member evaluates on, when that is not what it may expect:
    a share of its own rows held back from training (no data.eval_path), or held-out
    rows of one class only, on which ROC-AUC and PR-AUC are undefined (NaN). `total_rows`
    and `dropped`: the rows split, and those missing = "drop_row" dropped before."""
    if eval_path is None:
        left = f" left after missing = \"drop_row\" dropped {dropped}" if dropped else ""
        log.warning("%s: no data.eval_path: %d of its %d rows%s (data.eval_fraction %g) are "
                    "held out of training to evaluate on; give data.eval_path to train on all "
                    "of them", name, len(held_y), total_rows, left, eval_fraction)
    present = distinct(held_y)
    if len(classes) == 2 and len(present) < 2:
        log.warning("%s: its %d held-out rows (%s) all have label %r: ROC-AUC and PR-AUC are "
                    "undefined on one class and are recorded as NaN every round; give "
                    "data.eval_path with rows of both classes", name, len(held_y),
                    eval_path if eval_path is not None else "held out of data.path",
                    classes[int(present[0])] if len(present) else "(none)")


def train_local_dp(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int,
                   batch_size: int, lr: float, clip_norm: float, noise_multiplier: float,
                   generator: torch.Generator, grad_sample_mode: str = "hooks",
                   prox_mu: float = 0.0, correction: list[torch.Tensor] | None = None
                   ) -> list[tuple[float, float, int]]:
    """DP-SGD through Opacus; returns Opacus' own accountant history for this round.

    `generator` drives both the Poisson sampling and the noise; a real node
    passes one seeded from os.urandom (see node.privacy.mechanisms.OsNoise).
    `prox_mu` > 0: after each noised step w' = w - lr g~, the FedProx step
    - lr mu (w - w_start) on the parameters before it, so the step is
    w - lr (g~ + mu (w - w_start)): post-processing of the DP gradient g~ plus a
    term that does not depend on the data (see node.learn.dpsgd); no extra privacy cost.
    `correction` (control variates): after each step, w - lr (c - c_i), fixed for the
    round and data-independent: post-processing as well (node/learn/control.py).
    """
    from opacus import PrivacyEngine  # lean start: opacus' package (~115 MB) only in record mode

    start = proximal_start(model, prox_mu)
    corr = check_correction(list(model.parameters()), correction)
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
                before = None if start is None else [p.detach().clone()
                                                     for p in model.parameters()]
                dp_opt.step()  # an empty Poisson batch is still a (noise-only) step
                if start is not None and before is not None:
                    with torch.no_grad():
                        for p, w, w0 in zip(model.parameters(), before, start, strict=True):
                            p.add_(w - w0, alpha=-lr * prox_mu)
                if corr is not None:
                    with torch.no_grad():
                        for p, c in zip(model.parameters(), corr, strict=True):
                            p.add_(c, alpha=-lr)
    if hasattr(private, "_close"):
        private._close()  # remove Opacus' hooks from the module
    return [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]

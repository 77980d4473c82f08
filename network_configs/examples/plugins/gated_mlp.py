"""An example model plug-in for flnode: a gated MLP for tabular rows.

Use it as `kind = "gated_mlp:build"` with this directory on PYTHONPATH (see
model-plugin.toml next to it and docs/operate/models.md). The contract:

    build(n_in, n_out, **options) -> torch.nn.Module

mapping a (batch, n_in) float32 tensor of encoded rows to (batch, n_out) logits. The
options are the node config's [model.options], pinned in the consortium file with the
parameter names and shapes. No BatchNorm, no persistent buffers, float32 parameters
(flnode checks at start). Importing this module runs it: review it as code you run.

Each hidden block is h * sigmoid(g) (a gated linear unit, Dauphin et al. 2017) after a
LayerNorm; LayerNorm and the gate act on one example at a time, so DP-SGD's per-example
gradients stay defined (Opacus, hooks mode, computes them).
"""

from __future__ import annotations

import torch
from torch import nn


class GatedBlock(nn.Module):
    def __init__(self, n_in: int, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n_in)
        self.value = nn.Linear(n_in, width)
        self.gate = nn.Linear(n_in, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.drop(self.value(x) * torch.sigmoid(self.gate(x)))


class GatedMLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, width: int, layers: int, dropout: float) -> None:
        super().__init__()
        dims = [n_in] + [width] * layers
        self.blocks = nn.Sequential(*[GatedBlock(a, b, dropout)
                                      for a, b in zip(dims, dims[1:], strict=False)])
        self.head = nn.Linear(dims[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def build(n_in: int, n_out: int, *, width: int = 32, layers: int = 2,
          dropout: float = 0.0) -> nn.Module:
    """The factory flnode calls. Check the options here: a wrong one is the operator's
    mistake and should say which."""
    if not isinstance(width, int) or not 1 <= width <= 4096:
        raise ValueError(f"width = {width!r}: a whole number from 1 to 4096")
    if not isinstance(layers, int) or not 1 <= layers <= 8:
        raise ValueError(f"layers = {layers!r}: a whole number from 1 to 8")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout = {dropout!r}: a probability in [0, 1)")
    return GatedMLP(n_in, n_out, width, layers, float(dropout))

"""Every model kind the conformance suite runs, importable by any test that should hold
for every kind (tests/test_model_kinds.py; a predict-parity test can parametrize over
MODEL_KINDS the same way):

    from tests.model_kind_cases import MODEL_KINDS

    @pytest.mark.parametrize("case", MODEL_KINDS, ids=lambda c: c.id)
    def test_something(case):
        model = case.build(n_in=6, n_out=2)          # the network, as a node builds it
        section = case.model_section()               # the node config's [model] table

`case.engine` is the DP-SGD engine the node runs for it at the default
privacy.grad_sample_mode = "fast" (node/learn/dpsgd.py dp_engine): "fast" (closed-form
per-example norms) or "hooks" (Opacus). The plug-in case imports
network_configs/examples/plugins/gated_mlp.py (`plugin_importable` puts its directory on
sys.path, as a member's PYTHONPATH would).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "network_configs" / "examples" / "plugins"
PLUGIN_KIND = "gated_mlp:build"


def plugin_importable() -> None:
    """The example plug-in's directory on sys.path (a member sets PYTHONPATH)."""
    if str(PLUGIN_DIR) not in sys.path:
        sys.path.insert(0, str(PLUGIN_DIR))


@dataclass(frozen=True)
class KindCase:
    id: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)  # [model] keys (plug-in: options)
    hidden: int | None = 16  # None: not given (logreg ignores it; a plug-in never takes it)
    engine: str = "fast"  # DP-SGD engine at grad_sample_mode = "fast"

    @property
    def plugin(self) -> bool:
        return ":" in self.kind

    def model_section(self) -> dict[str, Any]:
        """The node config's [model] table for this case."""
        if self.plugin:
            return {"kind": self.kind, "options": dict(self.options)}
        return {"kind": self.kind, **({"hidden": self.hidden} if self.hidden else {}),
                **self.options}

    def build(self, n_in: int, n_out: int, seed: int = 0) -> Any:
        """The network, as node/learn/models.py builds it for a node."""
        from node.learn.models import build_model  # lean start: torch only when built

        if self.plugin:
            plugin_importable()
        return build_model(self.kind, n_in, n_out, self.hidden or 64, seed=seed,
                           options=self.options)


MODEL_KINDS: list[KindCase] = [
    KindCase("logreg", "logreg", hidden=None, engine="fast"),
    KindCase("mlp", "mlp", engine="fast"),
    KindCase("deep_mlp", "deep_mlp", engine="hooks"),  # LayerNorm: Opacus
    KindCase("deep_mlp-plain", "deep_mlp", {"norm": "none", "depth": 2}, engine="fast"),
    KindCase("deep_mlp-group-dropout", "deep_mlp",
             {"norm": "group", "groups": 4, "dropout": 0.2}, engine="hooks"),
    KindCase("res_mlp", "res_mlp", {"blocks": 2, "dropout": 0.1}, engine="hooks"),
    KindCase("plugin-gated_mlp", PLUGIN_KIND, {"width": 16, "layers": 2, "dropout": 0.1},
             hidden=None, engine="hooks"),
]

"""Model kinds by name: the built-in ones and their options, plug-ins, and the pin.

Torch-free (a node config is checked before torch is imported: tests/test_lean.py);
node/learn/models.py builds the networks.

Kinds:

- `logreg`: one Linear layer (today's; `hidden` is accepted and ignored).
- `mlp`: Linear, ReLU, Linear (today's; `hidden`).
- `deep_mlp`: `depth` blocks of Linear -> norm -> ReLU -> dropout, then a Linear head.
- `res_mlp`: a Linear stem, `blocks` pre-norm residual blocks
  x + Linear(dropout(ReLU(Linear(norm(x))))), a final norm, a Linear head.
- `"package.module:factory"`: a plug-in. `factory(n_in, n_out, **options)` returns a
  torch.nn.Module mapping (batch, n_in) float32 rows to (batch, n_out) logits; the
  options are the node config's [model.options]. Importing it runs its code.

Normalization is LayerNorm or GroupNorm, never BatchNorm: BatchNorm mixes the examples
of a batch, so an example's gradient depends on the others and DP-SGD's per-example
clipping bounds nothing; its running statistics are computed from records and would be
sent without noise.

The pin (the consortium file's [model] table, `pin_table`): the kind, its complete
options and the network's parameter names and shapes, in state_dict order, with their
digest (`parameter_digest`). A member whose built network differs is refused at start,
naming each parameter that differs with both shapes (`compare`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gossip.errors import LocalError
from gossip.membership import canonical_json

BUILTIN_KINDS = ("logreg", "mlp", "deep_mlp", "res_mlp")
# The built-in kinds as flnode had them before plug-ins: a consortium file without a
# [model] table trains one of these as each member's config says (nothing pinned).
LEGACY_KINDS = ("logreg", "mlp")
NORMS = ("none", "layer", "group")
# Deeper than this is not a tabular model anyone trains with DP-SGD on a few thousand
# rows per member; the bound keeps a typo (depth = 1000) from building a giant network.
MAX_DEPTH = 32
MAX_HIDDEN = 65536  # as model.hidden has always been bounded (node/runtime/config.py)
# A plug-in's options go into the consortium file and its id: plain TOML values, bounded.
MAX_OPTIONS = 64
MAX_OPTION_TEXT = 1024
# package.module:factory, Python identifiers only (nothing a shell or a path could hide in)
PLUGIN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
MAX_KIND = 256
DIGEST_TAG = b"flnode/1 model-parameters\x00"
# How many differing parameters a refusal lists before "... and N more".
MAX_LISTED = 6

# Each built-in kind's options and their defaults (`hidden` is model.hidden).
DEFAULTS: dict[str, dict[str, Any]] = {
    "logreg": {},
    "mlp": {"hidden": 64},
    "deep_mlp": {"hidden": 64, "depth": 3, "norm": "layer", "dropout": 0.0},
    "res_mlp": {"hidden": 64, "blocks": 2, "norm": "layer", "dropout": 0.0},
}
GROUPS_DEFAULT = 8  # GroupNorm's groups when norm = "group" (must divide hidden)
# Options a node config may set besides kind and hidden, and the kinds that take them.
EXTRA_OPTIONS = {"depth": ("deep_mlp",), "blocks": ("res_mlp",),
                 "norm": ("deep_mlp", "res_mlp"), "groups": ("deep_mlp", "res_mlp"),
                 "dropout": ("deep_mlp", "res_mlp")}


def is_plugin(kind: str) -> bool:
    return ":" in kind


def check_kind(kind: object) -> str:
    """`kind` if it names a built-in kind or a plug-in, else a ValueError saying which."""
    if not isinstance(kind, str):
        raise ValueError(f"expected a string, got {type(kind).__name__}")
    if kind in BUILTIN_KINDS:
        return kind
    if len(kind) <= MAX_KIND and PLUGIN_RE.match(kind):
        return kind
    raise ValueError(f"{kind[:80]!r}: choose one of {', '.join(BUILTIN_KINDS)}, or "
                     "\"package.module:factory\" (a plug-in, docs/operate/models.md)")


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} = {value!r}: expected a whole number from {lo} to {hi}")
    return value


def _check_plugin_value(name: str, value: object) -> None:
    """A plug-in option: what TOML and the consortium id's canonical JSON both hold."""
    if isinstance(value, bool | int | str):
        if isinstance(value, str) and len(value) > MAX_OPTION_TEXT:
            raise ValueError(f"options.{name}: longer than {MAX_OPTION_TEXT} characters")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"options.{name} = {value!r}: not a finite number")
        return
    if isinstance(value, list) and len(value) <= MAX_OPTIONS:
        for i, v in enumerate(value):
            if isinstance(v, list | dict):
                raise ValueError(f"options.{name}[{i}]: nested lists and tables are not "
                                 "supported")
            _check_plugin_value(f"{name}[{i}]", v)
        return
    raise ValueError(f"options.{name}: expected a number, string, boolean or a list of them, "
                     f"got {type(value).__name__}")


def resolve(kind: str, hidden: int | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The complete options of `kind` (what is pinned and what the network is built
    from): the kind's defaults, `hidden` (None: the default) and `extra` (a built-in
    kind's depth, blocks, norm, groups, dropout; a plug-in's [model.options]). A
    ValueError names the option that is wrong."""
    check_kind(kind)
    if is_plugin(kind):
        if hidden is not None:
            raise ValueError("hidden: a plug-in takes its options from [model.options] "
                             "(put hidden there if its factory takes one)")
        if len(extra) > MAX_OPTIONS:
            raise ValueError(f"options: more than {MAX_OPTIONS}")
        for name, value in extra.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"options.{name}: an option name is a Python identifier "
                                 "(the factory's keyword argument)")
            _check_plugin_value(name, value)
        return dict(extra)
    for name in extra:
        takes = EXTRA_OPTIONS.get(name)
        if takes is None:
            raise ValueError(f"{name}: not an option of any built-in kind (options: hidden, "
                             f"{', '.join(EXTRA_OPTIONS)})")
        if kind not in takes:
            raise ValueError(f"{name}: an option of {' and '.join(takes)}, not of {kind}")
    out = dict(DEFAULTS[kind])
    if "hidden" in out and hidden is not None:
        out["hidden"] = _int("hidden", hidden, 1, MAX_HIDDEN)
    for name in ("depth", "blocks"):
        if name in extra:
            out[name] = _int(name, extra[name], 1, MAX_DEPTH)
    if "norm" in extra:
        norm = extra["norm"]
        if isinstance(norm, str) and norm.lower() in ("batch", "batchnorm", "batch_norm"):
            raise ValueError(f"norm = {norm!r}: BatchNorm mixes the examples of a batch, so "
                             "DP-SGD's per-example gradients are not defined and its running "
                             "statistics, computed from records, would be sent without noise; "
                             "use \"layer\" or \"group\"")
        if norm not in NORMS:
            raise ValueError(f"norm = {norm!r}: choose one of {', '.join(NORMS)}")
        out["norm"] = norm
    if "dropout" in extra:
        p = extra["dropout"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
            raise ValueError(f"dropout = {p!r}: expected a probability in [0, 1)")
        out["dropout"] = float(p)
    if out.get("norm") == "group":
        groups = _int("groups", extra.get("groups", GROUPS_DEFAULT), 1, MAX_HIDDEN)
        if out["hidden"] % groups:
            raise ValueError(f"groups = {groups} does not divide hidden = {out['hidden']} "
                             "(GroupNorm splits the hidden units into equal groups)")
        out["groups"] = groups
    elif "groups" in extra:
        raise ValueError(f"groups: only with norm = \"group\" (norm is {out.get('norm')!r})")
    return out


# --- the pin: parameter names and shapes ----------------------------------------------

Shapes = list[tuple[str, tuple[int, ...]]]


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def parameter_digest(params: Shapes) -> str:
    """BLAKE2b-256 over the parameter names and shapes in state_dict order (the order of
    the flat vector members average: the same shapes in another order are another
    network)."""
    doc = [[name, list(shape)] for name, shape in params]
    return hashlib.blake2b(DIGEST_TAG + canonical_json(doc), digest_size=32).hexdigest()


def pin_table(kind: str, options: Mapping[str, Any], params: Shapes) -> dict[str, Any]:
    """The consortium file's [model] table for a network of `kind` with `params`."""
    return {"kind": kind, "digest": parameter_digest(params),
            "parameters": [f"{name} {format_shape(shape)}" for name, shape in params],
            **({"options": dict(options)} if options else {})}


def _parse_parameter(entry: object, where: str) -> tuple[str, tuple[int, ...]]:
    if not isinstance(entry, str) or " " not in entry:
        raise LocalError(f"{where}: expected \"NAME SHAPE\" (e.g. \"0.weight 64x10\"), got "
                         f"{str(entry)[:80]!r}")
    name, shape = entry.rsplit(" ", 1)
    if shape == "scalar":
        return name, ()
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        raise LocalError(f"{where}: shape {shape[:40]!r} is not like 64x10") from None
    if any(d < 0 for d in dims):
        raise LocalError(f"{where}: negative dimension in {shape!r}")
    return name, dims


def read_pin(table: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any], Shapes]:
    """The consortium file's [model] table -> (kind, options, parameters), checked: the
    digest must be that of the parameters listed (an error names the key)."""
    where = f"{source}: [model]"
    unknown = set(table) - {"kind", "digest", "parameters", "options"}
    if unknown:
        raise LocalError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("kind", "digest", "parameters"):
        if key not in table:
            raise LocalError(f"{where}: missing {key} (write the table with `python -m "
                             "node.ops.model_pin`)")
    try:
        kind = check_kind(table["kind"])
    except ValueError as exc:
        raise LocalError(f"{where}.kind: {exc}") from None
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise LocalError(f"{where}.options: expected a table")
    raw = table["parameters"]
    if not isinstance(raw, list) or not raw:
        raise LocalError(f"{where}.parameters: expected a non-empty list")
    params = [_parse_parameter(e, f"{where}.parameters[{i}]") for i, e in enumerate(raw)]
    if table["digest"] != parameter_digest(params):
        raise LocalError(f"{where}.digest is {str(table['digest'])[:64]} but its parameters "
                         f"hash to {parameter_digest(params)}: the table was edited; get the "
                         "agreed consortium file again")
    return kind, dict(options), params


def compare(agreed: Shapes, built: Shapes, kind: str, source: str) -> None:
    """Refuse a built network whose parameters differ from the agreed ones, naming each
    difference (parameter, agreed shape, built shape)."""
    if agreed == built:
        return
    want, have = dict(agreed), dict(built)
    lines = []
    for name, shape in agreed:
        if name not in have:
            lines.append(f"{name}: agreed {format_shape(shape)}, not built")
        elif have[name] != shape:
            lines.append(f"{name}: agreed shape {format_shape(shape)}, built "
                         f"{format_shape(have[name])}")
    lines += [f"{name}: built {format_shape(shape)}, not agreed"
              for name, shape in built if name not in want]
    if not lines:
        lines.append("the same parameters in another order: agreed "
                     f"{', '.join(n for n, _ in agreed[:MAX_LISTED])}, built "
                     f"{', '.join(n for n, _ in built[:MAX_LISTED])}")
    more = f"; and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    raise LocalError(
        f"model {kind}: this member built another network than the consortium agreed in "
        f"{source} [model] (digest {parameter_digest(agreed)[:16]}, this member's "
        f"{parameter_digest(built)[:16]}): {'; '.join(lines[:MAX_LISTED])}{more}. Its shares "
        "could not be averaged with the others': install the plug-in version the consortium "
        "agreed on, or agree a new [model] table")

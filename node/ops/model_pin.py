"""`python -m node.ops.model_pin CONSORTIUM.toml --model FILE [--write]`: pin the network.

Builds the network a [model] table describes (a node config's, or a snippet holding
only [model]) on the consortium's schema and prints the consortium file's [model]
table: the kind, its complete options, every parameter's name and shape in state_dict
order and their digest (node/learn/kinds.py). `--write` puts it into the consortium file
and rewrites its id line: the id changes, so every member must get the new file and
compare its id out of band, as for any change to the file. A consortium file without
[model] keeps its id and today's behaviour (each member builds what its config says).

A plug-in kind is imported here: its code runs (docs/operate/models.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict

from gossip.errors import LocalError
from gossip.membership import load_consortium, read_toml, save_consortium
from node.data.schema import FeatureSchema
from node.learn.models import init_seed_from, pin_for
from node.runtime.config import ModelConfig, validate_config


class ModelOnly(BaseModel):
    """A file's [model] table alone (a node config's other sections are not read)."""

    model_config = ConfigDict(extra="ignore")
    model: ModelConfig


def model_section(path: Path) -> ModelConfig:
    """The [model] table of a node config or snippet, checked as a node checks it (errors
    name the key: model.depth: ...)."""
    doc = read_toml(path, "model file")
    if not isinstance(doc.get("model"), dict):
        raise LocalError(f"{path}: no [model] table")
    only = validate_config({"model": doc["model"]}, str(path), ModelOnly)  # type: ignore[arg-type]
    return only.model  # type: ignore[attr-defined]


def pin(consortium_path: Path, model_path: Path, write: bool = False) -> dict:
    """The [model] table for the consortium file (written into it with `write`)."""
    consortium = load_consortium(consortium_path)
    schema = FeatureSchema.from_dict(consortium.schema, str(consortium_path))
    section = model_section(model_path)
    table = pin_for(section.kind, section.resolved(), schema.n_features, schema.n_classes,
                    init_seed_from(consortium))
    if write:
        pinned = replace(consortium, model=table)
        save_consortium(pinned, consortium_path)
        print(f"wrote [model] ({table['kind']}, digest {table['digest'][:16]}) into "
              f"{consortium_path}: consortium id {consortium.id.hex()} -> {pinned.id.hex()}; "
              "send the file to every member and compare the new id out of band")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.ops.model_pin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("consortium", type=Path, metavar="CONSORTIUM.toml")
    p.add_argument("--model", type=Path, required=True, metavar="FILE",
                   help="a node config, or a TOML file with only a [model] table")
    p.add_argument("--write", action="store_true",
                   help="write the table into the consortium file (its id changes)")
    args = p.parse_args(argv)
    try:
        table = pin(args.consortium, args.model, args.write)
    except LocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.write:
        print(tomli_w.dumps({"model": table}), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""After the last round: the members' final models compared by digest.

Each member sends the BLAKE2b-256 of its final model's parameters (a final message);
a node says which members ended with a different model (they did not combine the same
shares) and keeps the comparison in STATE_DIR/final.json for `flnode status`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import torch

from node.learn.models import get_flat
from node.runtime.state import StateDir, atomic_write

log = logging.getLogger("flnode.node")

FINAL_FILE = "final.json"  # the members' final model digests compared (node/ops/status.py)


def model_digest(model: torch.nn.Module) -> bytes:
    """BLAKE2b-256 of the model's parameters as float32 little-endian (the checkpoint's
    bytes): what a final message carries."""
    return hashlib.blake2b(get_flat(model).numpy().astype("<f4").tobytes(),
                           digest_size=32).digest()


def compare_finals(ours: bytes, finals: dict[str, bytes], expected: set[str]) -> dict[str, Any]:
    """{"digest": ours, "same": [members], "different": {member: digest}, "not_heard":
    [expected members without a final message]} (hex digests, sorted names)."""
    return {"digest": ours.hex(),
            "same": sorted(m for m, d in finals.items() if d == ours),
            "different": {m: d.hex() for m, d in sorted(finals.items()) if d != ours},
            "not_heard": sorted(set(expected) - set(finals))}


def record(state: StateDir, name: str, r: int, ours: bytes, finals: dict[str, bytes],
           expected: set[str]) -> dict[str, Any]:
    """Compare, write final.json (round r + 1, 1-based), and say what differs."""
    result = compare_finals(ours, finals, expected)
    atomic_write(state.path / FINAL_FILE, json.dumps(
        {"round": r + 1, "time": time.time(), **result}, sort_keys=True).encode())
    if result["different"]:
        log.warning("%s: final models differ: %s ended round %d with a different model "
                    "than ours (digest %s… here); the members did not combine the same "
                    "shares (a member restarted after a kill, a share arrived late or was "
                    "lost). Compare `flnode status` on each member", name,
                    ", ".join(f"{m} ({d[:12]}…)" for m, d in
                              sorted(result["different"].items())),
                    r + 1, result["digest"][:12])
    elif result["same"]:
        log.info("%s: final model identical to %s's (digest %s…)", name,
                 ", ".join(result["same"]), result["digest"][:12])
    if result["not_heard"]:
        log.info("%s: no final model digest from %s", name, ", ".join(result["not_heard"]))
    return result

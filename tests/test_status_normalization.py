"""`flnode status` on a hand-edited or hostile normalization.json: shown as unreadable,
naming the file and the reason, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from node.ops.status import collect, render

GOOD = {"mode": "federated", "stats": {"age": [40.0, 12.5]}, "members": ["a", "b"],
        "capped": {"a": 0.5}, "digest": "ab" * 32}
HOSTILE = {
    "not json": b"{not json",
    "a list": b"[1, 2]",
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "deep stats": json.dumps({**GOOD, "stats": {"age": [[[[1]]], 2]}}).encode(),
    "huge int": b'{"mode": "federated", "members": [' + b"9" * 5000 + b"]}",
    "int beyond float": json.dumps({**GOOD, "stats": {"age": [10**400, 1]}}).encode(),
    "members a string": json.dumps({**GOOD, "members": "abc"}).encode(),
    "members numbers": json.dumps({**GOOD, "members": [1, 2]}).encode(),
    "capped a list": json.dumps({**GOOD, "capped": ["a"]}).encode(),
    "digest a number": json.dumps({**GOOD, "digest": 7}).encode(),
    "mode a dict": json.dumps({**GOOD, "mode": {}}).encode(),
    "fallback_by numbers": json.dumps({**GOOD, "mode": "range", "fallback_by": [1]}).encode(),
    "not utf-8": b"\xff\xfe{}",
    "too large": b'{"why": "' + b"x" * (2 << 20) + b'"}',
}


@pytest.fixture
def state(tmp_path):
    st = tmp_path / "telco-0"
    shutil.copytree(Path(__file__).parent / "golden" / "run" / "state" / "telco-0", st)
    return st


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_a_hostile_normalization_file_is_shown_unreadable(state, what):
    (state / "normalization.json").write_bytes(HOSTILE[what])
    s = collect(state)
    assert s["normalization"]["mode"] == "unreadable"
    assert "normalization.json" in s["normalization"]["error"]
    assert "normalize   UNREADABLE" in render(s)
    json.dumps(s, indent=2, sort_keys=True)  # --json too


def test_a_good_normalization_file_is_shown(state):
    (state / "normalization.json").write_text(json.dumps(GOOD))
    s = collect(state)
    assert s["normalization"]["members"] == ["a", "b"]
    assert "agreed with 2 members" in render(s) and "capped: a" in render(s)

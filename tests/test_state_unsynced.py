"""node/runtime/state.py `unsynced()`: the simulator's run directory keeps its append-only
files open (no open, stat and close per audit line); the bytes, their order and the
rotation stay those of a real node's, and every file is closed when the run ends."""

from __future__ import annotations

import os

from node.runtime.state import StateDir, jsonl_files, read_jsonl, unsynced


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_unsynced_appends_the_same_lines_rotates_and_closes(tmp_path):
    records = [{"i": i, "pad": "x" * 40} for i in range(60)]
    real = StateDir(tmp_path / "real", rotate_bytes=600, rotate_keep=3)
    for r in records:
        real.append_jsonl("audit.jsonl", r)
        real.append_jsonl("metrics.jsonl", r)
    before = _open_fds()
    sim = StateDir(tmp_path / "sim", rotate_bytes=600, rotate_keep=3)
    with unsynced():
        for r in records:
            sim.append_jsonl("audit.jsonl", r)
            sim.append_jsonl("metrics.jsonl", r)
        assert _open_fds() == before + 2  # one per file, not one per line
        # written through at once: a reader during the run sees every line
        assert read_jsonl(sim.path / "metrics.jsonl") == records
    assert _open_fds() == before
    for name in ("audit.jsonl", "metrics.jsonl"):
        assert read_jsonl(sim.path / name) == read_jsonl(real.path / name)
        assert [p.name for p in jsonl_files(sim.path / name)] == \
            [p.name for p in jsonl_files(real.path / name)]
        for a, b in zip(jsonl_files(sim.path / name), jsonl_files(real.path / name), strict=True):
            assert a.read_bytes() == b.read_bytes()
            assert a.stat().st_mode & 0o777 == 0o600
    assert len(jsonl_files(sim.path / "audit.jsonl")) == 4  # rotated, 3 kept

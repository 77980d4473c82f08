"""A bounded run of scripts/fuzz.py: hostile inputs, raw and signed by members, through
the verifier and the round book. The full run (1,000,000 inputs) is in
docs/reference/checks.md; this one checks the same properties loosely enough for a loaded machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_bounded_fuzz_run_has_no_crash_and_bounded_cost(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--inputs", "20000",
                          "--seed", "11", "--out", str(tmp_path / "fuzz")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.splitlines()[0])
    assert result["crashes"] == 0, (out.stderr, sorted((tmp_path / "fuzz").glob("*.json")))
    assert out.returncode == 0, out.stderr
    assert result["inputs"] == 20000
    assert result["largest_input_bytes"] > 1_000_000  # it did reach the 1 MiB inputs
    # Members' signatures were passed: the body parsers were reached, and some accepted.
    reached = result["outcomes"]
    for reason in ("bad_body", "shape", "non_finite", "bad_prekey", "bad_seal", "equivocation"):
        assert reached.get(reason, 0) > 0, reason
    assert any(k.startswith("accepted:") for k in reached)
    # Goals of the full run: no input over 100 ms, peak RSS under 256 MB.
    assert result["slowest_ms"] < 2000, result
    assert result["peak_rss_mb"] < 400, result
    assert not list((tmp_path / "fuzz").glob("crash-*"))


def test_a_crash_is_saved_as_a_reproducer_and_replays(tmp_path, monkeypatch):
    """What the fuzzer does with an exception other than RemoteError (simulated here)."""
    sys.path.insert(0, str(ROOT))
    from scripts import fuzz

    def boom(self, data):
        raise ValueError("simulated parser bug")

    monkeypatch.setattr(fuzz.Target, "feed", boom)
    result = fuzz.run(5, seed=3, out=tmp_path)
    assert result["crashes"] == 5
    crash = tmp_path / "crash-1.bin"
    meta = json.loads((tmp_path / "crash-1.json").read_text())
    assert crash.exists() and "simulated parser bug" in meta["problem"]
    monkeypatch.undo()
    assert fuzz.replay(crash) == 0

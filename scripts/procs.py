"""Child processes of the scripts (brokers, nodes): stopped by their PID, whatever happens."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM a still-running process, wait up to grace_s, then SIGKILL it; reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

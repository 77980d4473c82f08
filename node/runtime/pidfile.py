"""STATE_DIR/node.pid: which process runs a node, so `flnode status` can say honestly
whether it is running, ended cleanly, or was killed.

`flnode run` writes {"pid", "proc_start", "boot_id", "started"} when it starts and adds
{"exited", "code"} when it ends by itself (finished, an error, SIGTERM/SIGINT). A
SIGKILL, an OOM kill or a power cut leave no "exited": the pid file then names a
process that is gone, or, after pid reuse, another process. `proc_start` (the
process's start time in clock ticks since boot, field 22 of /proc/PID/stat) and the
kernel's boot id tell a reused pid from ours. Without /proc (not Linux) a live pid
is reported as "running (unverified)".

A node refuses to start on a state dir whose pid file names a live node: two
processes on one state dir would both sign with one sequence counter.

Only small JSON is read and written here: `flnode status` imports it without torch.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from node.runtime.state import atomic_write

PID_FILE = "node.pid"
# Our own small file; more than this is not one we wrote.
MAX_PID_FILE_BYTES = 4096


def proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), or None if there is no such
    process or no /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "PID (COMM) STATE ..." where COMM may hold spaces and parentheses: split after the
    # last ")"; starttime is field 22, the 20th after COMM.
    fields = raw[raw.rfind(")") + 2:].split()
    if fields[:1] == ["Z"]:  # a zombie: it has ended, its parent has not reaped it yet
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def read_pid_file(state_dir: Path) -> dict[str, Any] | None:
    """The pid file's record, None if there is none; a file we cannot have written is
    reported as {"unreadable": why}."""
    path = Path(state_dir) / PID_FILE
    try:
        raw = path.read_bytes()[:MAX_PID_FILE_BYTES + 1]
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"unreadable": exc.strerror or str(exc)}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"unreadable": "not JSON (a torn write?)"}
    if (not isinstance(doc, dict) or not isinstance(doc.get("pid"), int)
            or isinstance(doc.get("pid"), bool) or doc["pid"] <= 0):
        return {"unreadable": "no positive integer pid"}
    return doc


def process_state(state_dir: Path) -> dict[str, Any]:
    """{"state": "running" | "exited" | "killed" | "stale_pid" | "rebooted" | "unknown" |
    "no_pid_file", "pid", "started", "exited", "code", "detail"}."""
    doc = read_pid_file(state_dir)
    if doc is None:
        return {"state": "no_pid_file", "detail": f"no {PID_FILE}: not started by `flnode run` "
                "(or by an flnode older than the pid file), so not known to be running"}
    if "unreadable" in doc:
        return {"state": "unknown", "detail": f"{PID_FILE} unreadable: {doc['unreadable']}"}
    out: dict[str, Any] = {"pid": doc["pid"], "started": doc.get("started")}
    if "exited" in doc:
        return {**out, "state": "exited", "exited": doc.get("exited"), "code": doc.get("code"),
                "detail": f"exited by itself with code {doc.get('code')}"}
    now_start = proc_start(doc["pid"])
    ours = doc.get("proc_start")
    if doc.get("boot_id") and boot_id() and doc["boot_id"] != boot_id():
        return {**out, "state": "rebooted", "detail": "the machine restarted since the node "
                "started, and the node recorded no exit: it was stopped by the reboot"}
    if now_start is None:
        if Path("/proc/self/stat").exists() or not _alive(doc["pid"]):
            return {**out, "state": "killed", "detail": f"pid {doc['pid']} is gone and the node "
                    "recorded no exit: killed (SIGKILL, out of memory) or crashed"}
        return {**out, "state": "running", "detail": "pid alive (unverified: no /proc)"}
    if ours is not None and now_start != ours:
        return {**out, "state": "stale_pid", "detail": f"pid {doc['pid']} is now another "
                "process (pid reused); the node recorded no exit: killed or crashed"}
    return {**out, "state": "running", "detail": f"pid {doc['pid']} alive, started as recorded"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(state_dir: Path) -> Path:
    """Write our pid file; refuse if it names a node that is still running."""
    state_dir = Path(state_dir)
    st = process_state(state_dir)
    if st["state"] == "running" and st.get("pid") != os.getpid():
        raise LocalError(f"{state_dir} is in use by a running node (pid {st['pid']}, "
                         f"{PID_FILE}): stop it first; two processes on one state dir would "
                         "sign with one sequence counter")
    pid = os.getpid()
    doc = {"pid": pid, "proc_start": proc_start(pid), "boot_id": boot_id(),
           "started": round(time.time(), 3)}
    path = state_dir / PID_FILE
    atomic_write(path, json.dumps(doc, sort_keys=True).encode())
    return path


def record_exit(state_dir: Path, code: int | None) -> None:
    """Add our exit to our pid file (if it is still ours). Never raises: the node is ending."""
    path = Path(state_dir) / PID_FILE
    doc = read_pid_file(Path(state_dir))
    if doc is None or doc.get("pid") != os.getpid() or "unreadable" in doc:
        return
    try:
        atomic_write(path, json.dumps({**doc, "exited": round(time.time(), 3), "code": code},
                                      sort_keys=True).encode())
    except OSError:
        pass

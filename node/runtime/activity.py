"""activity.json and the "waiting N s for ..." log line: what a long wait reports.

The round machine (gossip/protocol/machine.py) decides when a wait is reported
(WAIT_REPORT_FIRST_S, then every WAIT_REPORT_EVERY_S); this writes what it says where
`flnode status` (node/ops/status.py) and an operator read it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from node.runtime.state import atomic_write

log = logging.getLogger("flnode.node")

ACTIVITY_FILE = "activity.json"  # node/ops/status.py reads it


def report_wait(state_dir: Path, name: str, what: str, who: Iterable[str], waited: float,
                remaining: float | None, heard_any: bool) -> None:
    """One log line and activity.json: who we wait for, since when, until when
    (remaining None: a wait without a time limit, the min_members barrier)."""
    who = list(who)
    alone = ("; no other member heard from since this node started (started alone? "
             "check that the others are running and can reach us)" if not heard_any else "")
    until = "no time limit" if remaining is None else f"gives up in {remaining:.0f} s"
    # The file first: whoever reads the log line (an operator, a test) then finds
    # activity.json already saying the same.
    write(state_dir, name, {"what": what, "waiting_for": who, "since": time.time() - waited,
                            "gives_up": None if remaining is None else time.time() + remaining,
                            "heard_any": heard_any})
    log.warning("%s: waiting %.0f s for %s from %s (%s)%s", name,
                waited, what, ", ".join(who) or "nobody", until, alone)


def write(state_dir: Path, name: str, waiting: dict[str, Any] | None) -> None:
    """activity.json: the current wait, or none (`waiting` None)."""
    doc = {"time": time.time(), **(waiting or {"waiting_for": []})}
    try:
        atomic_write(state_dir / ACTIVITY_FILE, json.dumps(doc).encode())
    except OSError as exc:  # a status aid: never stop a round for it
        log.debug("%s: %s: %s", name, ACTIVITY_FILE, exc)

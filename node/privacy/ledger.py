"""The privacy ledger: append-only JSONL, one record per release, fsync'd before the
share leaves the process. epsilon is always recomputed from it, so a crash can at
worst over-count (a record whose share never left), never under-count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from gossip.errors import LocalError, shorten
from node.privacy import secure_record
from node.privacy.accountant import LedgerRecord, RunningRdp, epsilon_of
from node.privacy.skellam import finite_number
from node.runtime.state import append_durable, atomic_write, loads_json


class Ledger:
    """Append-only, fsync'd record of every release. The source of truth for epsilon.

    A charge is one line written whole (the write loops) and fsync'd before its share
    exists outside memory. A crash mid-append leaves a torn last line: its fsync never
    returned, so its share never left, and dropping it under-counts nothing. The node
    (`repair=True`) cuts such a tail off on load, fsync'd, and says so; otherwise the
    next charge would be appended onto the fragment and the ledger would refuse to load
    one restart later. A ledger an older flnode already left that way (a fragment with
    a whole record glued on) is recovered: the record after the fragment is kept and
    counted, the fragment dropped; a fragment that still parses as a record is kept
    too (over-counting is safe). Readers (`flnode status`, scripts) never write.
    """

    def __init__(self, path: str | Path, repair: bool = False) -> None:
        self.path = Path(path)
        self.repair = repair
        self.recovered: list[str] = []  # what loading had to fix, for the operator
        self.records: list[LedgerRecord] = self._read()
        # epsilon's running sum over self.records (accountant.RunningRdp), the last epsilon
        # asked for ((records, last record, delta) -> epsilon), and the running digest of
        # the records (ledger_digest's, for the checkpoint): each charge adds to them
        # instead of the whole ledger being gone over again, several times a round.
        self._running = RunningRdp()
        self._last_epsilon: tuple[tuple[Any, ...], float, float] | None = None
        self._digest: tuple[list[LedgerRecord], int, Any, LedgerRecord | None] | None = None
        # Those three change on every call; the metrics endpoint asks for epsilon from its
        # own thread (node/runtime/metrics.py) while the event loop charges: one at a time.
        self._lock = threading.Lock()

    def _read(self) -> list[LedgerRecord]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        records: list[LedgerRecord] = []
        glued = unterminated = False
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            rec = _check_line(line)
            if isinstance(rec, LedgerRecord):
                records.append(rec)
                # Only a file that does not end in a newline has a non-empty last part.
                unterminated = i == len(lines) - 1
                continue
            # A whole JSON line is never a torn write (a cut object does not parse): an edit
            # of the last charge is refused like any other, never dropped (under-counting).
            if i == len(lines) - 1 and rec.startswith(NOT_JSON):
                # A torn last line (no newline after it): never fsync'd, never released.
                self.recovered.append(f"dropped a torn last line of {len(line)} bytes (a charge "
                                      "whose write never completed; its share never left)")
                if self.repair:
                    self._truncate(len(data) - len(line))
                break
            found = _split_glued(line)
            if found is None:
                raise LocalError(
                    f"privacy ledger {self.path}: line {i + 1} is corrupt ({_check_line(line)}; "
                    "not a ledger record, nor a torn record followed by a whole one); refusing "
                    "to start, since epsilon cannot be recomputed. Restore the file from backup.")
            fragment, kept = found
            records.extend(kept)
            glued = True
            self.recovered.append(
                f"line {i + 1}: a torn record ({len(fragment)} bytes, never released) with "
                f"{len(kept)} whole record(s) appended onto it; kept and counted those")
        if glued and self.repair:
            self._rewrite(data, records)
        elif self.repair and unterminated:
            append_durable(self.path, b"\n")  # a whole last record: the next one goes below
        return records

    def _truncate(self, size: int) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rewrite(self, original: bytes, records: list[LedgerRecord]) -> None:
        """Keep the damaged file beside the repaired one, for the auditor."""
        atomic_write(self.path.with_name(self.path.name + ".damaged"), original)
        atomic_write(self.path, b"".join(_line(r) for r in records))

    def charge(self, record: LedgerRecord) -> None:
        """Append and fsync. Must return before the release leaves the process."""
        append_durable(self.path, _line(record))
        self.records.append(record)

    def epsilon(self, delta: float) -> float:
        """epsilon_of(self.records, delta), each record's RDP summed once (RunningRdp)."""
        with self._lock:
            now = (self.records, len(self.records), self.records[-1] if self.records else None)
            memo = self._last_epsilon
            if memo is not None and memo[0][0] is now[0] and memo[0][1] == now[1] and \
                    memo[0][2] is now[2] and memo[1] == delta:
                return memo[2]
            eps = epsilon_of(self.records, delta, running=self._running)
            self._last_epsilon = (now, delta, eps)
            return eps

    def epsilon_with(self, record: LedgerRecord, delta: float) -> float:
        """epsilon_of([*self.records, record], delta): what charging `record` would bring."""
        with self._lock:
            return epsilon_of(self.records, delta, running=self._running, extra=[record])

    def digest(self) -> str:
        """ledger_digest(self.records), hashing only the records charged since the last call
        while self.records only grew (the checkpoint asks at every round)."""
        with self._lock:
            kept = self._digest
            n = len(self.records)
            if kept is None or kept[0] is not self.records or kept[1] > n or \
                    (kept[1] and self.records[kept[1] - 1] is not kept[3]):
                kept = (self.records, 0, hashlib.blake2b(digest_size=16), None)
            h = kept[2]
            for r in self.records[kept[1]:n]:
                h.update(_line(r))
            self._digest = (self.records, n, h, self.records[n - 1] if n else None)
            return h.copy().hexdigest()

    def check_covers(self, count: int, digest: str, where: str) -> None:
        """Refuse a ledger that no longer starts with the `count` records (of `digest`)
        that `where` (the checkpoint) saw: records removed or changed under-count epsilon."""
        if len(self.records) >= count and ledger_digest(self.records[:count]) == digest:
            return
        now = (f"holds {len(self.records)} record(s) but {where} was written when it held "
               f"{count}" if len(self.records) < count else
               f"holds {len(self.records)} record(s) but its first {count} are not the ones "
               f"{where} was written with")
        raise LocalError(
            f"privacy ledger {self.path} {now}: records were removed or changed since (an "
            "older backup restored, or an edit), so "
            "epsilon would be under-counted. Put back the ledger that goes with that "
            "checkpoint (a repaired one leaves the original beside it as *.damaged); the node "
            "does not start without it.")


def _line(record: LedgerRecord) -> bytes:
    doc = asdict(record)
    if doc["secure"] is None:
        del doc["secure"]  # every kind but "secure": the line as it always was
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def _parse_record(line: bytes) -> LedgerRecord | None:
    rec = _check_line(line)
    return rec if isinstance(rec, LedgerRecord) else None


NOT_JSON = "not JSON"  # how _check_line's reason starts for a line that does not parse


def _check_line(line: bytes) -> LedgerRecord | str:
    """The record on a ledger line, or what is wrong with it: the field and why (a line
    that is not JSON at all starts with NOT_JSON: a torn write may be one)."""
    try:
        doc = loads_json(line)
    except ValueError as exc:
        return f"{NOT_JSON} ({str(exc)[:80]})"
    if not isinstance(doc, dict) or set(doc) - _FIELDS or _REQUIRED - set(doc):
        return (f"not an object with the ledger's fields {sorted(_FIELDS)} "
                f"({shorten(doc, 80)})")
    rec = LedgerRecord(**doc)
    try:
        problem = _record_problem(rec)
    except ArithmeticError as exc:  # a check's arithmetic on a value no charge holds
        problem = f"a value out of range ({exc})"
    return rec if problem is None else problem


def _record_problem(rec: LedgerRecord) -> str | None:
    """What keeps the accountant from taking `rec` (None: a charge flnode wrote). A value
    outside these ranges is an edit, not a charge."""
    if type(rec.round) is not int:
        return f"round {shorten(rec.round, 40)} is not an integer"
    if not (isinstance(rec.mode, str) and rec.mode in LEDGER_MODES):
        return f"mode {shorten(rec.mode, 40)} is not one of {sorted(LEDGER_MODES)}"
    if not isinstance(rec.share_digest, str):
        return f"share_digest {shorten(rec.share_digest, 40)} is not text"
    ranges = {"noise_multiplier": (0, MAX_LEDGER_SIGMA, "in [0, 1e6]"),
              "sample_rate": (0, 1, "in (0, 1]"), "clip_norm": (0, math.inf, "> 0")}
    for key, (low, high, says) in ranges.items():
        v = getattr(rec, key)
        if not (finite_number(v) and low <= v <= high and (v > 0 or key == "noise_multiplier")):
            return f"{key} {shorten(v, 40)} is not a finite number {says}"
    if not (type(rec.steps) is int and 0 <= rec.steps <= MAX_LEDGER_STEPS):
        return f"steps {shorten(rec.steps, 40)} is not an integer in 0..{MAX_LEDGER_STEPS}"
    # a secure round's parameters, and only on its charge
    if rec.mode != secure_record.MODE:
        return None if rec.secure is None else f"secure parameters on a {rec.mode!r} charge"
    return secure_record.problem(rec.secure, rec.clip_norm)


_FIELDS = frozenset(f.name for f in fields(LedgerRecord))
_REQUIRED = frozenset(f.name for f in fields(LedgerRecord)
                      if f.default is MISSING and f.default_factory is MISSING)
LEDGER_MODES = frozenset({"update", "record", "count", "normalize", secure_record.MODE})
MAX_LEDGER_SIGMA = 1e6  # Opacus' RDP overflows far above this
MAX_LEDGER_STEPS = 10**9


def ledger_digest(records: list[LedgerRecord]) -> str:
    """A digest of these records as the ledger writes them: the checkpoint keeps the one of
    the ledger it was written with, so a ledger rolled back (an older backup), cut short or
    edited is refused instead of under-counting epsilon."""
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(_line(r))
    return h.hexdigest()


def weight_digest(weight: float) -> str:
    """What the ledger's "count" charge records of the weight it released."""
    return "weight:" + hashlib.blake2b(json.dumps(float(weight)).encode(),
                                       digest_size=16).hexdigest()


def _split_glued(line: bytes) -> tuple[bytes, list[LedgerRecord]] | None:
    """A torn record with whole records appended onto it: (fragment, records), else None.

    Records are written with sorted keys, so each starts with the same prefix; the
    fragment is kept too if it happens to parse (over-counting is safe)."""
    marker = b'{"clip_norm":'
    starts = [i for i in range(1, len(line)) if line.startswith(marker, i)]
    for cut in starts:
        fragment, rest = line[:cut], line[cut:]
        pieces, pos, ok = [], 0, True
        nxt = [s - cut for s in starts if s >= cut] + [len(rest)]
        for a, b in zip(nxt, nxt[1:], strict=False):
            rec = _parse_record(rest[a:b])
            if rec is None:
                ok = False
                break
            pieces.append(rec)
            pos = b
        if ok and pieces and pos == len(rest) and fragment.startswith(b"{"):
            head = _parse_record(fragment)
            return fragment, ([head] if head is not None else []) + pieces
    return None

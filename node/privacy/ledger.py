"""The privacy ledger: append-only JSONL, one record per release, fsync'd before the
share leaves the process. epsilon is always recomputed from it, so a crash can at
worst over-count (a record whose share never left), never under-count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from gossip.errors import LocalError
from node.privacy import secure_record
from node.privacy.accountant import LedgerRecord, epsilon_of
from node.runtime.state import append_durable, atomic_write


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
            rec = _parse_record(line)
            if rec is not None:
                records.append(rec)
                # Only a file that does not end in a newline has a non-empty last part.
                unterminated = i == len(lines) - 1
                continue
            if i == len(lines) - 1:
                # A torn last line (no newline after it): never fsync'd, never released.
                self.recovered.append(f"dropped a torn last line of {len(line)} bytes (a charge "
                                      "whose write never completed; its share never left)")
                if self.repair:
                    self._truncate(len(data) - len(line))
                break
            found = _split_glued(line)
            if found is None:
                raise LocalError(
                    f"privacy ledger {self.path}: line {i + 1} is corrupt (not a ledger record, "
                    "nor a torn record followed by a whole one); refusing to start, since "
                    "epsilon cannot be recomputed. Restore the file from backup.")
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
        return epsilon_of(self.records, delta)

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
    try:
        doc = json.loads(line)
        rec = LedgerRecord(**doc)
    except (ValueError, TypeError):
        return None
    ok = (type(rec.round) is int and rec.mode in LEDGER_MODES
          and isinstance(rec.share_digest, str)
          and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (rec.noise_multiplier, rec.sample_rate, rec.clip_norm))
          # what the accountant can take: a value outside these is an edit, not a charge
          and 0 <= rec.noise_multiplier <= MAX_LEDGER_SIGMA and 0 < rec.sample_rate <= 1
          and rec.clip_norm > 0
          and type(rec.steps) is int and 0 <= rec.steps <= MAX_LEDGER_STEPS
          # a secure round's parameters, and only on its charge
          and ((rec.secure is None) if rec.mode != secure_record.MODE
               else secure_record.problem(rec.secure, rec.clip_norm) is None))
    return rec if ok else None


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

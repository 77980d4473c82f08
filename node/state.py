"""A node's state dir: atomic checkpoints, the outbox of released bytes, the audit log.

Layout::

    STATE_DIR/checkpoint.msgpack   model, next round, seq, replay table, counters
    STATE_DIR/ledger.jsonl         privacy ledger (node.privacy.Ledger)
    STATE_DIR/outbox/round-N.env   the exact bytes released for round N
    STATE_DIR/outbox/round-N.body  its plain share body, when the release is sealed;
                                   unlinked once round N is closed
    STATE_DIR/prekeys/epoch-N.x25519  our private prekey for epoch N (sealing; 0600),
                                   unlinked once epoch N's rounds are closed
    STATE_DIR/audit.jsonl          one line per received message: accepted or why not
    STATE_DIR/metrics.jsonl        one line per round: metrics, epsilon, counters

Every whole-file write is tmp + fsync + rename + fsync(dir): after a crash the
file is the old one or the new one, never a mix. Nothing here is pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from gossip.errors import LocalError

CHECKPOINT_VERSION = 1
# Our own file, but a corrupted one must not make msgpack allocate wildly.
MAX_CHECKPOINT_BYTES = 2**31


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class Checkpoint:
    next_round: int
    model: bytes  # flat float32 little-endian parameters
    seq: int  # next sequence number to use
    replay: dict[str, Any] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    retired: list[str] = field(default_factory=list)  # members that stopped sharing for good
    # The members' announced prekeys (public, signed) as [seq, encoded] per member, so a
    # restart can seal at once without waiting for their answers to its hello.
    peer_prekeys: dict[str, list[Any]] = field(default_factory=dict)


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.msgpack"

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.jsonl"

    def save_checkpoint(self, cp: Checkpoint) -> None:
        doc = {"version": CHECKPOINT_VERSION, **cp.__dict__}
        atomic_write(self.checkpoint_path, msgpack.packb(doc, use_bin_type=True))

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.exists():
            return None
        raw = self.checkpoint_path.read_bytes()
        try:
            doc = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_CHECKPOINT_BYTES)
            if doc.pop("version") != CHECKPOINT_VERSION:
                raise ValueError("unknown version")
            return Checkpoint(**doc)
        except Exception as exc:  # noqa: BLE001 - any decode failure means the same thing
            raise LocalError(f"checkpoint {self.checkpoint_path} is unreadable ({exc}); "
                             "move it away to start from scratch") from None

    def outbox_path(self, round_: int) -> Path:
        return self.path / "outbox" / f"round-{round_:08d}.env"

    def store_release(self, round_: int, data: bytes, plain_body: bytes | None = None) -> None:
        """The plain body first: a sealed release is never on disk without it (we cannot
        open our own sealed share)."""
        if plain_body is not None:
            atomic_write(self.outbox_path(round_).with_suffix(".body"), plain_body)
        atomic_write(self.outbox_path(round_), data)

    def stored_release(self, round_: int) -> bytes | None:
        p = self.outbox_path(round_)
        return p.read_bytes() if p.exists() else None

    def prune_plain_bodies(self, before_round: int) -> None:
        """Our own plaintext shares are kept only while a restart may re-send them (the
        current round): a closed round's `.body` is unlinked."""
        for p in (self.path / "outbox").glob("round-*.body"):
            if int(p.stem.removeprefix("round-")) < before_round:
                p.unlink()

    def stored_plain_body(self, round_: int) -> bytes:
        p = self.outbox_path(round_).with_suffix(".body")
        if not p.exists():
            raise LocalError(f"{self.outbox_path(round_)} is sealed but {p.name} is missing: "
                             "move the outbox file away to release that round afresh")
        return p.read_bytes()

    # --- sealing prekeys (private X25519 keys) ---------------------------------
    def _prekey_path(self, epoch: int) -> Path:
        return self.path / "prekeys" / f"epoch-{epoch:08d}.x25519"

    def save_prekey(self, epoch: int, private: bytes) -> None:
        atomic_write(self._prekey_path(epoch), private)  # 0600 like every state file

    def delete_prekey(self, epoch: int) -> None:
        """Unlink and fsync the directory. What the file system or the disk keeps of
        the old blocks is beyond us; the node keeps no copy."""
        p = self._prekey_path(epoch)
        if p.exists():
            p.unlink()
            dir_fd = os.open(p.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def load_prekeys(self) -> dict[int, bytes]:
        """Our prekeys; a half-written one left by a crash (never announced) is deleted."""
        for tmp in (self.path / "prekeys").glob(".epoch-*.x25519.tmp"):
            tmp.unlink()
        out = {}
        for p in sorted((self.path / "prekeys").glob("epoch-*.x25519")):
            raw = p.read_bytes()
            if len(raw) != 32:
                raise LocalError(f"{p}: a prekey is 32 bytes, this file has {len(raw)}")
            out[int(p.stem.removeprefix("epoch-"))] = raw
        return out

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of an append-only JSONL file; a torn line (a crash, or a writer
    mid-line right now) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out

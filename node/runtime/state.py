"""A node's state dir: atomic checkpoints, the outbox of released bytes, the audit log.

Layout::

    STATE_DIR/checkpoint.msgpack   model, next round, seq, replay table, counters
    STATE_DIR/ledger.jsonl         privacy ledger (node.privacy.ledger.Ledger)
    STATE_DIR/seq                  the next free sequence number, fsync'd before any
                                   message signed with an earlier one leaves
    STATE_DIR/outbox/round-N.env   the exact bytes released for round N (re-sent by
                                   a restart in round N); unlinked once N is closed
    STATE_DIR/outbox/round-N.body  its plain share body, when the release is sealed;
                                   unlinked once round N is closed
    STATE_DIR/outbox/round-N.residual  top-k's error-feedback residual that release left
                                   (node/runtime/compression.py); unlinked once N is closed
    STATE_DIR/prekeys/epoch-N.x25519  our private prekey for epoch N (sealing; 0600),
                                   unlinked once epoch N's rounds are closed
    STATE_DIR/audit.jsonl          one line per received message: accepted or why not;
                                   rotates into audit.jsonl.1..4 (read_jsonl follows)
    STATE_DIR/metrics.jsonl        one line per round: metrics, epsilon, counters

Every whole-file write is tmp + fsync + rename + fsync(dir): after a crash the
file is the old one or the new one, never a mix. Every write loops until all
bytes are written; every directory created is fsync'd into its parent; every
file is 0600. Nothing here is pickled.

`unsynced()` turns the fsyncs and the tmp + rename off (whole-file writes then rewrite
the file in place; every byte and the order of writes stay) for the in-process
simulator's throwaway run directories only (node/rehearsal/simulation/run.py): many
members signing in one process spent most of their time in fsync and rename
(docs/results/scale.md). Nothing a real node runs calls it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from gossip.errors import LocalError, shorten

CHECKPOINT_VERSION = 1
# Our own file, but a corrupted one must not make msgpack allocate wildly.
MAX_CHECKPOINT_BYTES = 2**31
# audit.jsonl (one line per received message) rotates at this size into
# audit.jsonl.1 .. .ROTATE_KEEP (oldest dropped): at most ~80 MiB of it on disk.
ROTATE_BYTES = 16 * 1024 * 1024
ROTATE_KEEP = 4
ROTATED = ("audit.jsonl",)


# fsync on every durable write; False only inside `unsynced()` (module docstring).
_SYNC = [True]


# Inside `unsynced()` only: append-only files kept open, path -> [fd, size]. Opening,
# stat'ing and closing audit.jsonl for each line was a tenth of a simulated member's
# round (docs/results/scale.md); every line is still one os.write, in order.
_APPENDING: dict[Path, list[int]] = {}


@contextlib.contextmanager
def unsynced() -> Iterator[None]:
    """Durable writes without fsync for the duration (the simulator's run only)."""
    before = _SYNC[0]
    _SYNC[0] = False
    try:
        yield
    finally:
        _SYNC[0] = before
        if before:
            _close_appending()


def _close_appending() -> None:
    while _APPENDING:
        os.close(_APPENDING.popitem()[1][0])


def _fsync(fd: int) -> None:
    if _SYNC[0]:
        os.fsync(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written: one write() may be short (Linux caps a
    single call near 2 GiB, and a full disk or a signal can stop it early)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(f"write() wrote {n} bytes")
        view = view[n:]


def fsync_dir(path: Path) -> None:
    if not _SYNC[0]:
        return
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_dirs(path: Path, mode: int = 0o700) -> None:
    """mkdir -p, fsyncing the parent of every directory created, so a crash right after
    cannot lose the new directory entry (and a file fsync'd inside it)."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """`path` holds exactly `data`, whole or (after a kill mid-write) as before. `durable`:
    also fsync'd, file and directory, so a power cut cannot lose it; False for files a
    power cut may lose (a restart refuses a torn one and waits for the message again)."""
    make_dirs(path.parent)
    if not durable:  # whole or absent after a kill (the rename), nothing fsync'd
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return
    if not _SYNC[0]:  # unsynced(): in place, no rename (module docstring)
        # Overwritten from offset 0 and cut to its new length, never opened with O_TRUNC:
        # ext4 (auto_da_alloc) starts a writeback of a file truncated to 0 and rewritten
        # when it is closed, ~3 ms of waiting per write on this machine (the seq file is
        # rewritten for every message signed: a third of a simulated secure round's wall,
        # docs/results/secure.md). The file ends holding exactly `data`, as before.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            write_all(fd, data)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        _fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_durable(path: Path, data: bytes) -> None:
    """Append and fsync; a file created here is 0600 and its directory entry fsync'd."""
    make_dirs(path.parent)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        write_all(fd, data)
        _fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


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
    strategy: dict[str, Any] = field(default_factory=dict)  # the aggregation strategy's state
    # training.control_variates: c_i, c and the pending round (node/learn/control.py state_dict)
    control: dict[str, Any] = field(default_factory=dict)
    planned_rounds: int | None = None  # training.rounds (for `flnode status`)
    # The privacy ledger this checkpoint was written with: its record count and digest
    # (node.privacy.ledger.ledger_digest). A restart refuses a ledger that no longer starts with
    # them (rolled back, cut short, edited): epsilon would be under-counted. None: a
    # checkpoint from before this was kept (nothing to compare).
    ledger_records: int | None = None
    ledger_digest: str = ""
    # Compression with error feedback (top-k): {"codec": name, "values": float32 LE bytes},
    # what the shares so far left out (node/runtime/compression.py). None: no residual.
    residual: dict[str, Any] | None = None


# The checkpoint's format: its map keys on disk (after "version"), in the order written,
# and the Checkpoint attribute each holds. The keys are the contract, not the attribute
# names: an attribute may be renamed here without making deployed checkpoints unreadable;
# a new attribute needs a new key (tests/test_golden.py checks every attribute has one,
# and that tests/golden's checkpoint still loads and saves back byte for byte).
CHECKPOINT_KEYS: dict[str, str] = {
    "next_round": "next_round", "model": "model", "seq": "seq", "replay": "replay",
    "rejected": "rejected", "bytes_sent": "bytes_sent", "bytes_received": "bytes_received",
    "retired": "retired", "peer_prekeys": "peer_prekeys", "strategy": "strategy",
    "control": "control", "planned_rounds": "planned_rounds",
    "ledger_records": "ledger_records", "ledger_digest": "ledger_digest",
}
# Keys every checkpoint has; the others were added later and default when absent.
CHECKPOINT_REQUIRED = ("next_round", "model", "seq")
# Keys written only when their attribute is not None (after CHECKPOINT_KEYS' keys): a node
# that never holds one writes the same bytes as before the key existed.
CHECKPOINT_OPTIONAL_KEYS: dict[str, str] = {"residual": "residual"}
RESIDUAL_SUFFIX = ".residual"  # outbox/round-N.residual (node/runtime/compression.py)


def encode_checkpoint(cp: Checkpoint) -> bytes:
    doc = {"version": CHECKPOINT_VERSION,
           **{key: getattr(cp, attr) for key, attr in CHECKPOINT_KEYS.items()},
           **{key: getattr(cp, attr) for key, attr in CHECKPOINT_OPTIONAL_KEYS.items()
              if getattr(cp, attr) is not None}}
    return msgpack.packb(doc, use_bin_type=True)


def decode_checkpoint(raw: bytes) -> Checkpoint:
    """A checkpoint from its bytes; ValueError names what is wrong."""
    doc = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_CHECKPOINT_BYTES)
    if not isinstance(doc, dict):
        raise ValueError("not a msgpack map")
    if doc.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"unknown version {shorten(doc.get('version'))}")
    known = CHECKPOINT_KEYS | CHECKPOINT_OPTIONAL_KEYS
    unknown = [k for k in doc if k != "version" and k not in known]
    if unknown:
        raise ValueError(f"unknown keys {shorten(unknown)} (written by a newer flnode?)")
    missing = [k for k in CHECKPOINT_REQUIRED if k not in doc]
    if missing:
        raise ValueError(f"missing keys {missing}")
    return Checkpoint(**{attr: doc[key] for key, attr in known.items() if key in doc})


class StateDir:
    def __init__(self, path: str | Path, rotate_bytes: int = ROTATE_BYTES,
                 rotate_keep: int = ROTATE_KEEP) -> None:
        self.path = Path(path)
        make_dirs(self.path)
        os.chmod(self.path, 0o700)
        self.rotate_bytes = rotate_bytes
        self.rotate_keep = rotate_keep
        # Files an older flnode created 0644: nobody else reads a node's state.
        for f in self.path.glob("*.jsonl*"):
            if f.stat().st_mode & 0o077:
                os.chmod(f, 0o600)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.msgpack"

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.jsonl"

    def save_checkpoint(self, cp: Checkpoint) -> None:
        atomic_write(self.checkpoint_path, encode_checkpoint(cp))

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.exists():
            return None
        raw = self.checkpoint_path.read_bytes()
        try:
            return decode_checkpoint(raw)
        except Exception as exc:  # noqa: BLE001 - any decode failure means the same thing
            raise LocalError(f"checkpoint {self.checkpoint_path} is unreadable ({exc}); "
                             "move it away to start from scratch") from None

    @property
    def seq_path(self) -> Path:
        return self.path / "seq"

    def reserve_seq(self, next_free: int) -> None:
        """Persist the next free sequence number (fsync'd) before a message signed with
        the one below it can leave: a kill at any point never re-uses a number."""
        atomic_write(self.seq_path, f"{next_free}\n".encode())

    def reserved_seq(self) -> int:
        if not self.seq_path.exists():
            return 0
        text = self.seq_path.read_text().strip()
        if not text.isdigit():
            raise LocalError(f"{self.seq_path} holds {text[:40]!r}, not a sequence number; "
                             "it must never go back: set it above the highest seq this member "
                             "ever sent (see the members' audit logs)")
        return int(text)

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

    def prune_outbox(self, before_round: int, keep_releases: bool = False) -> None:
        """What a restart needs is the release of the round it resumes at (re-sent byte
        for byte); the ledger already holds every release's digest for an audit. So a
        closed round's `.env`, `.body` (our own plaintext share) and `.residual` are unlinked;
        with `keep_releases` the `.env` files stay."""
        gone = False
        for p in (self.path / "outbox").glob("round-*.*"):
            if keep_releases and p.suffix == ".env":
                continue
            try:
                r = int(p.name.split(".")[0].removeprefix("round-"))
            except ValueError:
                continue
            if r < before_round:
                p.unlink()
                gone = True
        if gone:
            fsync_dir(self.path / "outbox")

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
            fsync_dir(p.parent)

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
        """One line, 0600. Not fsync'd (nothing here is needed for safety: the ledger and
        the checkpoint are); audit.jsonl rotates at `rotate_bytes`."""
        path = self.path / name
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        if not _SYNC[0]:  # the simulator's run: the file stays open (_APPENDING)
            held = _APPENDING.get(path)
            if held is not None and name in ROTATED and held[1] + len(line) > self.rotate_bytes:
                os.close(_APPENDING.pop(path)[0])  # rotated below, then opened anew
                held = None
            if held is None:
                if name in ROTATED:
                    self._rotate_if_full(path, len(line))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                held = _APPENDING[path] = [fd, os.fstat(fd).st_size]
            write_all(held[0], line)
            held[1] += len(line)
            return
        if name in ROTATED:
            self._rotate_if_full(path, len(line))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            write_all(fd, line)
        finally:
            os.close(fd)

    def _rotate_if_full(self, path: Path, adding: int) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size + adding <= self.rotate_bytes or size == 0:
            return
        for k in range(self.rotate_keep, 0, -1):
            older = path.with_name(f"{path.name}.{k}")
            if not older.exists():
                continue
            if k == self.rotate_keep:
                older.unlink()
            else:
                os.replace(older, path.with_name(f"{path.name}.{k + 1}"))
        if self.rotate_keep > 0:
            os.replace(path, path.with_name(f"{path.name}.1"))
        else:
            path.unlink()


def jsonl_files(path: Path) -> list[Path]:
    """An append-only JSONL file and its rotated predecessors, oldest first
    (audit.jsonl.4 .. audit.jsonl.1, audit.jsonl)."""
    rotated = []
    for p in path.parent.glob(f"{path.name}.*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def loads_json(data: bytes | str) -> Any:
    """json.loads of a file or line flnode wrote, where a value nested deeper than the
    parser's recursion (one "[" per level: a few hundred thousand bytes do it) is a
    ValueError like any other text that is not JSON. json.loads raises RecursionError, a
    RuntimeError, there: it escaped every reader that caught only ValueError. flnode never
    writes more than a few levels."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested deeper than the parser can take (not a record flnode "
                         "wrote)") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of an append-only JSONL file, its rotated parts first; a torn line (a
    crash, or a writer mid-line right now) is skipped."""
    out = []
    for part in jsonl_files(path):
        try:
            text = part.read_text()
        except FileNotFoundError:  # rotated away while we read
            continue
        for line in text.splitlines():
            try:
                out.append(loads_json(line))
            except ValueError:
                continue
    return out

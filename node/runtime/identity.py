"""Ed25519 identities (PyNaCl): generate, save, load, fingerprint.

The private key file holds the 32-byte seed. Whoever reads it can sign shares
as this institution: it is written 0600 and a looser file is refused, as ssh
refuses a private key that others can read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from gossip.errors import LocalError
from gossip.membership import check_member_name, parse_public_key

SECRET_HEADER = "flnode-ed25519-secret-v1"
PUBLIC_HEADER = "flnode-ed25519-public-v1"


def fingerprint(public_key: bytes) -> str:
    """Short, human-comparable form of a public key (like ssh's SHA256:...)."""
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    name: str
    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @classmethod
    def generate(cls, name: str) -> Identity:
        check_member_name(name, "identity name")
        return cls(name, SigningKey.generate())

    def __repr__(self) -> str:  # never print the secret
        return f"Identity(name={self.name!r}, {self.fingerprint})"


def save_identity(identity: Identity, out_dir: str | Path) -> tuple[Path, Path]:
    """Write NAME.key (0600) and NAME.pub into out_dir; refuse to overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_path = out / f"{identity.name}.key"
    public_path = out / f"{identity.name}.pub"
    for p in (secret_path, public_path):
        if p.exists():
            raise LocalError(f"{p} already exists; refusing to overwrite a key")
    seed = bytes(identity.signing_key)
    # O_EXCL + mode 0600 at creation: the secret is never briefly world-readable.
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{SECRET_HEADER}\nname = {identity.name}\nseed = {seed.hex()}\n")
        f.flush()
        os.fsync(f.fileno())
    public_path.write_text(
        f"{PUBLIC_HEADER}\nname = {identity.name}\npublic_key = {identity.public_key.hex()}\n"
    )
    return secret_path, public_path


def _read_fields(path: Path, header: str) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise LocalError(f"cannot read {path}: {exc}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != header:
        raise LocalError(f"{path}: not a flnode key file (first line must be {header!r})")
    fields = {}
    for ln in lines[1:]:
        key, sep, value = ln.partition("=")
        if not sep:
            raise LocalError(f"{path}: line {ln[:40]!r} is not 'key = value'")
        fields[key.strip()] = value.strip()
    return fields


# Enough of a key file to read its header line (both headers are shorter).
HEADER_PEEK_BYTES = 64


def _first_line(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_PEEK_BYTES)
    except OSError:
        return None  # _read_fields says why
    return head.split(b"\n", 1)[0].strip().decode("utf-8", "replace")


def load_identity(path: str | Path) -> Identity:
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise LocalError(f"cannot read private key {path}: {exc}") from None
    if _first_line(path) == PUBLIC_HEADER:  # before the mode check: chmod is not the fix
        raise LocalError(f"{path} is a public key file (NAME.pub, made to be shared); "
                         "identity.key must name the private key file beside it, NAME.key "
                         "(written by `flnode keygen`, mode 0600)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LocalError(
            f"permissions {stat.S_IMODE(mode):04o} for private key {path} are too open: "
            f"others could sign shares as this member. Fix with: chmod 600 {path}"
        )
    fields = _read_fields(path, SECRET_HEADER)
    name = check_member_name(fields.get("name"), f"{path}: name")
    try:
        seed = bytes.fromhex(fields.get("seed", ""))
    except ValueError:
        raise LocalError(f"{path}: seed is not hex") from None
    if len(seed) != 32:
        raise LocalError(f"{path}: seed must be 32 bytes (64 hex characters)")
    return Identity(name, SigningKey(seed))


def load_public_key(path: str | Path) -> tuple[str, bytes]:
    """Read NAME.pub -> (name, raw public key)."""
    path = Path(path)
    fields = _read_fields(path, PUBLIC_HEADER)
    name = check_member_name(fields.get("name"), f"{path}: name")
    key = parse_public_key(fields.get("public_key"), f"{path}: public_key")
    VerifyKey(key)  # raises on a malformed key
    return name, key

"""The consortium peer list and its id.

A consortium file (TOML) names the consortium, its feature schema and its
members. The id is BLAKE2b-256 over a domain tag and the canonical JSON of
(name, schema, members' (name, public key, addresses), rules, model). Anything that
would make two members' models not averageable (a schema that differs, even
only in column order), their trust differ (another member list) or their
traffic go elsewhere (another libp2p address, another MQTT broker URL, another
pinned broker certificate `addresses.mqtt_cert_sha256`) gives another id, and
shares carrying another id are refused. Addresses are in the id because a file
whose addresses were redirected would otherwise load under the agreed id and
send the member's traffic, and its broker password, to whoever it names; a
member that moves to another host therefore needs a new consortium file, as a
new member does. A file without its `id` line is refused: the id is what the
operators compare out of band, and a file that does not state it cannot be
checked against it.

The schema is opaque here: `gossip` hashes it but does not interpret it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from gossip.errors import LocalError

CONSORTIUM_ID_TAG = b"flnode/1 consortium-id\x00"
PUBLIC_KEY_BYTES = 32
# Member names end up in file names, topics and logs: keep them boring.
MEMBER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_MEMBER_NAME = 64


def canonical_json(value: Any) -> bytes:
    """One byte string per value: sorted keys, no whitespace, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _digest(tag: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(tag + payload, digest_size=32).digest()


@dataclass(frozen=True)
class Member:
    name: str
    public_key: bytes  # raw Ed25519 verify key, 32 bytes
    addresses: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_member_name(self.name, where="member name")
        if len(self.public_key) != PUBLIC_KEY_BYTES:
            raise LocalError(
                f"member {self.name!r}: public key must be exactly {PUBLIC_KEY_BYTES} bytes, "
                f"got {len(self.public_key)}"
            )


def check_member_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise LocalError(f"{where}: expected a non-empty string, got {name!r}")
    if len(name) > MAX_MEMBER_NAME or not set(name) <= MEMBER_NAME_CHARS:
        raise LocalError(
            f"{where}: {name!r} must be at most {MAX_MEMBER_NAME} characters from "
            "letters, digits, '-', '_' and '.'"
        )
    return name


@dataclass(frozen=True)
class Consortium:
    name: str
    schema: Mapping[str, Any]
    members: tuple[Member, ...]
    # What every member applies to judge the others' shares (aggregation rule and its
    # f, weight caps, privacy mode and clip): opaque here like the schema, interpreted
    # by node.rules, and part of the id when present, so members that judge
    # differently are different consortia.
    rules: Mapping[str, Any] = field(default_factory=dict)
    # The network every member builds (node/learn/kinds.py: kind, options, parameter names
    # and shapes, their digest): opaque here too, and part of the id only when present,
    # so a file without a [model] table keeps the id it had before the table existed.
    model: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members:
            raise LocalError(f"consortium {self.name!r}: no members")
        names = [m.name for m in self.members]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise LocalError(f"consortium {self.name!r}: member names repeated: {sorted(dup)}")
        keys = [m.public_key for m in self.members]
        if len(set(keys)) != len(keys):
            raise LocalError(f"consortium {self.name!r}: two members share a public key")

    # --- identity of the consortium -------------------------------------
    # The id and the per-part digests are computed once per Consortium and kept (a
    # Consortium is never changed after it is built: a new file is a new Consortium).
    # Each is O(members) to compute, and every node of an in-process simulation asked
    # for them at build (node/learn/models.py init_seed_from): n^2 at n members
    # (2.1 s at 300, docs/results/scale.md).
    def _memo(self, key: str, compute: Any) -> Any:
        memo = self.__dict__.get("_identity_memo")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_identity_memo", memo)  # frozen: not a field
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def digests(self) -> dict[str, str]:
        """Per-part digests, so two operators can see *which* part differs."""
        return dict(self._memo("digests", self._digests))

    def _digests(self) -> dict[str, str]:
        parts = {
            "name": _digest(b"name\x00", canonical_json(self.name)).hex(),
            "schema": _digest(b"schema\x00", canonical_json(self.schema)).hex(),
            "members": _digest(b"members\x00", canonical_json(self._member_list())).hex(),
            "addresses": _digest(b"addresses\x00", canonical_json(self._addresses())).hex(),
        }
        if self.rules:
            parts["rules"] = _digest(b"rules\x00", canonical_json(self.rules)).hex()
        if self.model:
            parts["model"] = _digest(b"model\x00", canonical_json(self.model)).hex()
        return parts

    def _member_list(self) -> list[list[str]]:
        return sorted([m.name, m.public_key.hex()] for m in self.members)

    def _addresses(self) -> dict[str, dict[str, str]]:
        return {m.name: dict(m.addresses) for m in self.members}

    @property
    def id(self) -> bytes:
        return self._memo("id", self._id)

    def _id(self) -> bytes:
        doc: dict[str, Any] = {"name": self.name, "schema": self.schema,
                               "members": self._member_list(), "addresses": self._addresses()}
        if self.rules:  # (a file without [rules] keeps the id it had before they existed)
            doc["rules"] = self.rules
        if self.model:  # likewise [model]
            doc["model"] = self.model
        canonical = canonical_json(doc)
        return _digest(CONSORTIUM_ID_TAG, canonical)

    # --- lookups ----------------------------------------------------------
    def by_key(self, public_key: bytes) -> Member | None:
        for m in self.members:
            if m.public_key == public_key:
                return m
        return None

    def by_name(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise LocalError(
            f"no member named {name!r} in consortium {self.name!r} "
            f"(members: {', '.join(m.name for m in self.members)})"
        )

    # --- files ------------------------------------------------------------
    def to_toml_dict(self) -> dict[str, Any]:
        return {
            "consortium": {"name": self.name, "id": self.id.hex()},
            "schema": dict(self.schema),
            **({"rules": dict(self.rules)} if self.rules else {}),
            **({"model": dict(self.model)} if self.model else {}),
            "members": [
                {"name": m.name, "public_key": m.public_key.hex(), "addresses": dict(m.addresses)}
                for m in self.members
            ],
        }


def _require(table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise LocalError(f"{where}: missing key {key!r}")
    value = table[key]
    if not isinstance(value, kind):
        raise LocalError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def parse_public_key(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise LocalError(f"{where}: expected a hex string, got {type(text).__name__}")
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise LocalError(f"{where}: not hex: {text[:80]!r}") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise LocalError(
            f"{where}: an Ed25519 public key is {2 * PUBLIC_KEY_BYTES} hex characters, "
            f"got {len(text.strip())}"
        )
    return raw


def consortium_from_dict(doc: Mapping[str, Any], source: str, base_dir: Path) -> Consortium:
    """Build a Consortium from a parsed TOML document; errors name the key."""
    head = _require(doc, "consortium", dict, source)
    name = _require(head, "name", str, f"{source}: consortium")
    if "schema" in doc and "schema_path" in head:
        raise LocalError(f"{source}: give either [schema] or consortium.schema_path, not both")
    if "schema_path" in head:
        schema = _load_schema_file(head, source, base_dir)
    else:
        schema = _require(doc, "schema", dict, source)
    raw_members = _require(doc, "members", list, source)
    members = []
    for i, entry in enumerate(raw_members):
        where = f"{source}: members[{i}]"
        if not isinstance(entry, dict):
            raise LocalError(f"{where}: expected a table")
        mname = check_member_name(_require(entry, "name", str, where), f"{where}.name")
        key = parse_public_key(_require(entry, "public_key", str, where), f"{where}.public_key")
        addresses = entry.get("addresses", {})
        if not isinstance(addresses, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in addresses.items()
        ):
            raise LocalError(f"{where}.addresses: expected a table of strings")
        members.append(Member(mname, key, addresses))
    rules = doc.get("rules", {})
    if not isinstance(rules, dict):
        raise LocalError(f"{source}: [rules] must be a table")
    model = doc.get("model", {})
    if not isinstance(model, dict):
        raise LocalError(f"{source}: [model] must be a table")
    consortium = Consortium(name, schema, tuple(members), rules, model)
    try:
        consortium.id  # noqa: B018 (canonical JSON refuses nan and inf: say where)
    except ValueError:
        raise LocalError(f"{source}: a value that is not a finite number (nan or inf): the "
                         "consortium id cannot hash it") from None
    stated = head.get("id")
    if stated is None:
        raise LocalError(
            f"{source}: no consortium.id line: a file that does not state the id the members "
            f"agreed on cannot be checked against it (its contents hash to "
            f"{consortium.id.hex()}). Compare that with the id the other members have, out of "
            "band, and only then add it as `id = \"...\"` under [consortium], or rebuild the "
            "file with `flnode consortium build`"
        )
    if stated != consortium.id.hex():
        raise LocalError(
            f"{source}: consortium.id says {stated} but the name, schema, members, addresses and "
            f"rules{' (and model)' if model else ''} hash to {consortium.id.hex()}: the file was "
            "edited after it was built "
            f"(parts: {', '.join(f'{k} {v[:12]}' for k, v in consortium.digests().items())}); "
            "get the agreed file again or rebuild it with `flnode consortium build`"
        )
    return consortium


def _load_schema_file(head: Mapping[str, Any], source: str, base_dir: Path) -> dict[str, Any]:
    rel = _require(head, "schema_path", str, f"{source}: consortium")
    expected = _require(head, "schema_sha256", str, f"{source}: consortium")
    path = (base_dir / rel).resolve()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"{source}: consortium.schema_path: cannot read {path}: {exc}") from None
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected.lower():
        raise LocalError(
            f"{source}: consortium.schema_sha256 is {expected} but {path} hashes to {actual}: "
            "the schema file is not the one the consortium agreed on"
        )
    try:
        return tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LocalError(f"{path}: not valid TOML: {exc}") from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file the operator gave us; errors name the file and say what it is."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise LocalError(f"cannot read {what} {path}: {exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LocalError(f"{what} {path}: not valid TOML: {exc}") from None


# Inside `shared_loads()` only: consortium files parsed, by path and text. The in-process
# simulator builds every member's node from one file; parsing it per node made the build
# grow as n^2 (46 ms a parse at 1,000 members, two per node: docs/results/scale.md).
_shared: dict[tuple[str, str], Consortium] | None = None


@contextlib.contextmanager
def shared_loads() -> Iterator[None]:
    """For the duration, a consortium file whose text was loaded before is not parsed
    again: the same Consortium is returned (node/rehearsal/simulation/run.py only; a real
    node loads its file once)."""
    global _shared
    before, _shared = _shared, {}
    try:
        yield
    finally:
        _shared = before


def load_consortium(path: str | Path) -> Consortium:
    path = Path(path)
    if _shared is None:
        return consortium_from_dict(read_toml(path, "consortium file"), str(path), path.parent)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):  # read_toml names the error
        return consortium_from_dict(read_toml(path, "consortium file"), str(path), path.parent)
    key = (str(path.resolve()), text)
    got = _shared.get(key)
    if got is None:
        got = _shared[key] = consortium_from_dict(read_toml(path, "consortium file"),
                                                  str(path), path.parent)
    return got


def save_consortium(consortium: Consortium, path: str | Path) -> None:

    Path(path).write_text(tomli_w.dumps(consortium.to_toml_dict()))

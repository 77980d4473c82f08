"""Pieces of a secure round as data, and their bytes (hostile input: checked before use).

A `Piece` is one vector of field elements, keyed by round, kind, owner and holder:

- private kinds (sent sealed to one holder): `VECTOR` (owner's degree-t sharing of its
  encoded vector plus one blinding coordinate, length d + 1), `SEED` (4 values from which
  the holder expands that VECTOR piece itself, for the t holders a seeded dealing draws
  pseudorandomly) and `MASK` (owner's degree 2t - 1 sharing of mask generators plus one
  blinding coordinate, length P + 1);
- opened kinds (a holder's own computed piece, broadcast; owner 0): `CHECK` (the blinded
  dealing checks, length 2n), `DEGREE2` (masked pieces of the squared distances and
  norms, length P) and `SUM` (the piece of the selected members' sum, length d).

Bytes (little-endian), 24-byte header then the values packed at 61 bits:

    b"FLSA" | version u8 (2) | kind u8 | owner u16 | holder u16 | reserved u16 (0) |
    round u64 | count u32 | ceil(61 count / 8) bytes

The values are one little-endian bit string: value k (each < 2^61 - 1) at bits 61k to
61k + 60, the last byte's unused high bits 0 (`field.pack`). Version 1 sent each value in
8 bytes (3 of them always 0 bits): 5% of a secure round's bytes; version 2 is refused by
a version-1 node and version 1 by this one, by name.

`from_bytes` checks, in order, before allocating anything: the header's length, magic,
version, kind, owner and holder ranges (private kinds have an owner, opened kinds owner
0), the count against `expected_count` and MAX_PIECE_VALUES, the exact total length,
then that the padding bits are 0 (one byte string per piece) and that every value is
below p (a 61-bit value can be 2^61 - 1 = p). Each failure is a `PieceError` naming the
sender (if the caller says who it is) and the reason. Signing and sealing are the
transport's job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from node.secagg.errors import PieceError
from node.secagg.field import FIELD_BITS, P64, P, pack, packed_bytes, unpack
from node.secagg.shamir import MAX_MEMBERS

VECTOR, MASK, CHECK, DEGREE2, SUM, SEED = 1, 2, 3, 4, 5, 6
KIND_NAMES = {VECTOR: "vector", MASK: "mask", CHECK: "check", DEGREE2: "degree2", SUM: "sum",
              SEED: "seed"}
PRIVATE = (VECTOR, MASK, SEED)
SEED_VALUES = 4  # a SEED piece: 4 uniform field elements (244 bits) that expand to a VECTOR piece

MAGIC = b"FLSA"
VERSION = 2  # 2: values packed at 61 bits (1: 8 bytes each)
_HEADER = struct.Struct("<4sBBHHHQI")
HEADER_BYTES = _HEADER.size  # 24
# The most values one piece may declare: 2^25 (a 33.5M-parameter model; 256 MiB of
# field elements). The caller should also pass the count it expects (d + 1, P + 1, ...):
# a peer's declared size alone never decides how much we allocate.
MAX_PIECE_VALUES = 1 << 25
MAX_ROUND = (1 << 63) - 1


@dataclass(frozen=True)
class Piece:
    round: int
    kind: int
    owner: int  # the dealer (1..n) for private kinds, 0 for opened kinds
    holder: int  # the member holding (private) or computing and opening (opened) it, 1..n
    values: np.ndarray  # uint64 field elements

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.round, self.kind, self.owner, self.holder)

    def __post_init__(self) -> None:
        _check_header(self.kind, self.owner, self.holder, self.round, sender=None)


def _check_header(kind: int, owner: int, holder: int, rnd: int, sender: int | None) -> None:
    if kind not in KIND_NAMES:
        raise PieceError(f"unknown piece kind {kind}", sender)
    if not 1 <= holder <= MAX_MEMBERS:
        raise PieceError(f"holder {holder} outside 1..{MAX_MEMBERS}", sender)
    if kind in PRIVATE and not 1 <= owner <= MAX_MEMBERS:
        raise PieceError(f"{KIND_NAMES[kind]} piece with owner {owner} outside 1..{MAX_MEMBERS}",
                         sender)
    if kind not in PRIVATE and owner != 0:
        raise PieceError(f"opened {KIND_NAMES[kind]} piece with owner {owner} (must be 0)", sender)
    if not 0 <= rnd <= MAX_ROUND:
        raise PieceError(f"round {rnd} outside 0..2^63 - 1", sender)


def to_bytes(piece: Piece) -> bytes:
    values = np.ascontiguousarray(piece.values, dtype=np.uint64).reshape(-1)
    if values.size > MAX_PIECE_VALUES:
        raise PieceError(f"{values.size} values > MAX_PIECE_VALUES {MAX_PIECE_VALUES}")
    if values.size and int(values.max()) >= P:
        raise PieceError("a value is not a field element (>= 2^61 - 1)")
    head = _HEADER.pack(MAGIC, VERSION, piece.kind, piece.owner, piece.holder, 0, piece.round,
                        values.size)
    return head + pack(values)


def from_bytes(data: bytes, *, expected_count: int | None = None, expected_kind: int | None = None,
               sender: int | None = None) -> Piece:
    """Parse a piece from a peer's bytes; PieceError (naming `sender`) on anything off."""
    if len(data) < HEADER_BYTES:
        raise PieceError(f"{len(data)} bytes: shorter than the {HEADER_BYTES}-byte header", sender)
    magic, version, kind, owner, holder, reserved, rnd, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PieceError(f"magic {magic!r}, expected {MAGIC!r}: not a secure-aggregation piece",
                         sender)
    if version != VERSION:
        raise PieceError(f"piece version {version}, this node reads version {VERSION} (values "
                         "packed at 61 bits; version 1 sent 8 bytes a value): the sender runs "
                         "another flnode release", sender)
    if reserved != 0:
        raise PieceError(f"reserved header field is {reserved}, must be 0", sender)
    _check_header(kind, owner, holder, rnd, sender)
    if expected_kind is not None and kind != expected_kind:
        raise PieceError(f"a {KIND_NAMES[kind]} piece where a {KIND_NAMES.get(expected_kind)} "
                         "piece was expected", sender)
    if count > MAX_PIECE_VALUES:
        raise PieceError(f"declares {count} values > MAX_PIECE_VALUES {MAX_PIECE_VALUES}", sender)
    if expected_count is not None and count != expected_count:
        raise PieceError(f"declares {count} values, this round's {KIND_NAMES[kind]} pieces have "
                         f"{expected_count}", sender)
    size = HEADER_BYTES + packed_bytes(count)
    if len(data) != size:
        raise PieceError(f"{len(data)} bytes for {count} declared values (expected {size}: "
                         "61 bits a value)", sender)
    spare = 8 * packed_bytes(count) - FIELD_BITS * count  # unused high bits of the last byte
    if spare and data[-1] >> (8 - spare):
        raise PieceError(f"the last byte's {spare} padding bits are not 0", sender)
    raw = unpack(memoryview(data)[HEADER_BYTES:], count)
    if count and int(raw.max()) >= P:
        bad = int(np.argmax(raw >= P64))
        raise PieceError(f"value {bad} is {int(raw[bad])} = 2^61 - 1, not a field element "
                         "(>= p = 2^61 - 1)", sender)
    return Piece(rnd, kind, owner, holder, raw)

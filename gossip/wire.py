"""A msgpack reader for peer bytes that looks at a field's type and size before it
allocates anything for it.

`msgpack.unpackb` builds the whole object tree before the caller sees any of it,
and a tree of empty arrays obeys every length limit it takes: a 19 MB 8-ary tree
cost +1.3 GB and seconds of CPU with the GIL held. Here the caller says what it
expects at each position (an array of 8, a bin of exactly 32 bytes, a short str,
a uint); the reader checks the type byte and the declared length against what is
expected and against the bytes that are actually left, and only then takes the
value. Byte strings come back as read-only memoryview slices of the input (no
copy); nothing is ever nested or recursed into, so cost is linear in the bytes
read and memory is constant besides what the caller keeps.

Every failure is a `WireError` with a short, fixed text (never a peer value);
each parser of peer bytes turns it into a `RemoteError` with its own reason.
Only the msgpack forms that `msgpack.packb` writes for the wire format's types
(and their wider equivalents) are understood; ext types never are.
"""

from __future__ import annotations

import struct
from typing import Any

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")

_INTS = {0xCC: _U8, 0xCD: _U16, 0xCE: _U32, 0xCF: _U64,
         0xD0: _I8, 0xD1: _I16, 0xD2: _I32, 0xD3: _I64}

# Type names for messages (by first byte), without reading the value.
_NAMES = {0xC0: "nil", 0xC2: "bool", 0xC3: "bool", 0xC4: "bin", 0xC5: "bin", 0xC6: "bin",
          0xCA: "float", 0xCB: "float", 0xD9: "str", 0xDA: "str", 0xDB: "str",
          0xDC: "array", 0xDD: "array", 0xDE: "map", 0xDF: "map"}


class WireError(Exception):
    """The bytes are not what the caller expected here. The text names no peer value."""


def type_name(first: int) -> str:
    """msgpack type of the item that starts with byte `first` (for error messages)."""
    if first <= 0x7F or first >= 0xE0 or 0xCC <= first <= 0xD3:
        return "int"
    if 0x80 <= first <= 0x8F:
        return "map"
    if 0x90 <= first <= 0x9F:
        return "array"
    if 0xA0 <= first <= 0xBF:
        return "str"
    return _NAMES.get(first, "ext")


class Reader:
    """Reads msgpack items one at a time from a bytes-like object, checking each."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        try:
            view = memoryview(data)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
        except (TypeError, ValueError):
            raise WireError("not a contiguous byte string") from None
        self.buf = view.toreadonly()
        self.pos = 0
        self.end = len(self.buf)

    # --- low level --------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def peek(self) -> int:
        """The next item's first byte, not consumed."""
        if self.pos >= self.end:
            raise WireError("truncated")
        return self.buf[self.pos]

    def peek_type(self) -> str:
        return type_name(self.peek())

    def _take(self, n: int) -> memoryview:
        if n > self.end - self.pos:
            raise WireError("truncated")
        start = self.pos
        self.pos = start + n
        return self.buf[start:self.pos]

    def _unpack(self, s: struct.Struct) -> Any:
        if s.size > self.end - self.pos:
            raise WireError("truncated")
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def done(self) -> None:
        """Nothing may follow the expected structure."""
        if self.pos != self.end:
            raise WireError("trailing bytes after the expected structure")

    # --- containers -------------------------------------------------------------
    def array_header(self) -> int:
        b = self.peek()
        if 0x90 <= b <= 0x9F:
            self.pos += 1
            return b & 0x0F
        if b == 0xDC:
            self.pos += 1
            return self._unpack(_U16)
        if b == 0xDD:
            self.pos += 1
            return self._unpack(_U32)
        raise WireError(f"expected an array, found {type_name(b)}")

    def map_header(self) -> int:
        b = self.peek()
        if 0x80 <= b <= 0x8F:
            self.pos += 1
            return b & 0x0F
        if b == 0xDE:
            self.pos += 1
            return self._unpack(_U16)
        if b == 0xDF:
            self.pos += 1
            return self._unpack(_U32)
        raise WireError(f"expected a map, found {type_name(b)}")

    # --- byte strings -----------------------------------------------------------
    def _str_len(self) -> int:
        b = self.peek()
        if 0xA0 <= b <= 0xBF:
            self.pos += 1
            return b & 0x1F
        if b == 0xD9:
            self.pos += 1
            return self._unpack(_U8)
        if b == 0xDA:
            self.pos += 1
            return self._unpack(_U16)
        if b == 0xDB:
            self.pos += 1
            return self._unpack(_U32)
        raise WireError(f"expected a str, found {type_name(b)}")

    def str_bytes(self, max_len: int | None = None) -> memoryview:
        """A str item's raw UTF-8 bytes (not decoded), at most `max_len` of them."""
        n = self._str_len()
        if max_len is not None and n > max_len:
            raise WireError(f"str longer than {max_len} bytes")
        return self._take(n)

    def str(self, max_len: int) -> str:
        raw = self.str_bytes(max_len)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise WireError("str is not UTF-8") from None

    def bin(self, max_len: int | None = None, exact: int | None = None) -> memoryview:
        """A bin item as a read-only view of the input; its declared length is checked
        against `exact`/`max_len` and against the bytes left before anything is taken."""
        b = self.peek()
        if b == 0xC4:
            self.pos += 1
            n = self._unpack(_U8)
        elif b == 0xC5:
            self.pos += 1
            n = self._unpack(_U16)
        elif b == 0xC6:
            self.pos += 1
            n = self._unpack(_U32)
        else:
            raise WireError(f"expected a bin, found {type_name(b)}")
        if exact is not None and n != exact:
            raise WireError(f"bin of {n} bytes, expected {exact}")
        if max_len is not None and n > max_len:
            raise WireError(f"bin longer than {max_len} bytes")
        return self._take(n)

    # --- scalars ----------------------------------------------------------------
    def int(self) -> int:
        """Any msgpack integer (positive or negative fixint, uint 8-64, int 8-64)."""
        b = self.peek()
        if b <= 0x7F:
            self.pos += 1
            return b
        if b >= 0xE0:
            self.pos += 1
            return b - 0x100
        s = _INTS.get(b)
        if s is None:
            raise WireError(f"expected an integer, found {type_name(b)}")
        self.pos += 1
        return self._unpack(s)

    def uint(self, limit: int) -> int:
        """An integer in [0, limit)."""
        value = self.int()
        if not 0 <= value < limit:
            raise WireError("integer out of range")
        return value

    def number(self) -> int | float:
        """An integer or a float 32/64 (never a bool)."""
        b = self.peek()
        if b == 0xCA:
            self.pos += 1
            return self._unpack(_F32)
        if b == 0xCB:
            self.pos += 1
            return self._unpack(_F64)
        return self.int()

    def bool(self) -> bool:
        b = self.peek()
        if b not in (0xC2, 0xC3):
            raise WireError(f"expected a bool, found {type_name(b)}")
        self.pos += 1
        return b == 0xC3

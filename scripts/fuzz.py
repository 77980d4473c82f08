#!/usr/bin/env python3
"""Fuzz the only parser of peer bytes, also past the signature.

Every input goes through `gossip.envelope.Verifier.verify` (a plain node's, a
sealing node's, or one whose model is ~1 MB) and, when accepted, through
`gossip.protocol.book.RoundBook.add`. Inputs, up to 1 MiB:

- raw: random bytes; mutations (bit flips, interesting bytes and lengths,
  insertions, deletions, splices) of valid envelopes, not re-signed;
- structured and re-signed with a *member's* key (`envelope.pack`), so they pass
  the signature and reach the body parsers: share bodies (valid, hostile values,
  every field replaced by a wrong type, a bomb or a huge declared length, odd
  encodings, trailing bytes), sealed bodies (valid seals of hostile plaintexts,
  garbled headers and ciphertexts), prekey announcements (low-order and
  non-canonical keys properly signed, other members' prekeys, bombs), retire
  messages with a body, and valid shares (equivocations for the round book);
- structure bombs: 8-ary trees of arrays or maps, deep nesting, bin/str/array/map
  headers declaring 4 GiB, as the whole input, in any outer field, or as a signed
  body of every kind.

A `RemoteError` is the expected outcome (or acceptance). Anything else raised is a
crash, as is a rejection whose message is longer than 1,000 characters (a peer
must not be able to make log lines long): the input is saved under --out as
`crash-N.bin` with `crash-N.json` (which verifier, round, generator, traceback)
and counted. `--replay FILE.bin` runs one saved input again (keys and prekeys
are derived from fixed seeds, so a reproducer replays exactly).

Prints one JSON object, then one line for humans: inputs, inputs/s, crashes,
the slowest input (ms, and its generator) and the process's peak RSS.

    .venv/bin/python scripts/fuzz.py --inputs 1000000 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gossip import bodies, envelope  # noqa: E402
from gossip.bodies import TensorSpec  # noqa: E402
from gossip.envelope import (  # noqa: E402
    KIND_PREKEY,
    KIND_RETIRE,
    KIND_SEALED,
    KIND_SEEN,
    KIND_SHARE,
    KIND_STATS,
    KINDS,
    Verifier,
)
from gossip.errors import RemoteError  # noqa: E402
from gossip.protocol.book import RoundBook  # noqa: E402
from gossip.seal import Sealing, sign_prekey  # noqa: E402

MAX_INPUT = 1 << 20
STATS_COLUMNS = 2
MAX_MESSAGE_CHARS = 1000
CID = hashlib.blake2b(b"flnode fuzz consortium", digest_size=32).digest()
US = SigningKey(b"\x01" * 32)
M1 = SigningKey(b"\x02" * 32)
M2 = SigningKey(b"\x03" * 32)
OUTSIDER = SigningKey(b"\x09" * 32)
MEMBERS = {bytes(US.verify_key): "us", bytes(M1.verify_key): "m1", bytes(M2.verify_key): "m2"}
SIGNERS = [M1] * 5 + [M2] * 4 + [US, OUTSIDER]  # mostly members: past the signature
SMALL_SPEC = (TensorSpec("layer.weight", (16, 8)), TensorSpec("layer.bias", (8,)),
              TensorSpec("h", (2, 3, 2), "<f2"))
BIG_SPEC = (TensorSpec("big", (512, 511)), TensorSpec("b", (3,)))  # 1,046,540 B of tensors
ROTATE, LOOKAHEAD = 2, 3
P = 2**255 - 19
LOW_ORDER = [0, 1, P - 1,
             int.from_bytes(bytes.fromhex(
                 "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), "little"),
             int.from_bytes(bytes.fromhex(
                 "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"), "little")]
BAD_X25519 = [u.to_bytes(32, "little") for c in LOW_ORDER
              for u in (c, c + P, c + 2 * P, c | 1 << 255) if u < 2**256]
BAD_X25519 += [(P + 9).to_bytes(32, "little"), b"\xff" * 32]
INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2,
                     0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4,
                     0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]
HUGE_HEADERS = [b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                b"\xdf\xff\xff\xff\xff", b"\xc5\xff\xff", b"\xda\xff\xff", b"\xdc\xff\xff",
                b"\xde\xff\xff", b"\xc4\xff", b"\xd9\xff", b"\xc9\xff\xff\xff\xff\x01",
                b"\xc6\x7f\xff\xff\xff", b"\xdd\x00\x10\x00\x00"]


def prekey_private(owner: str, epoch: int) -> PrivateKey:
    """Deterministic prekeys, so a saved reproducer of a sealed input replays exactly."""
    return PrivateKey(hashlib.blake2b(f"fuzz prekey {owner} {epoch}".encode(),
                                      digest_size=32).digest())


def make_sealing(key: SigningKey, owner: str) -> Sealing:
    s = Sealing(CID, key, MEMBERS, ROTATE, LOOKAHEAD)
    s.own.keys = {e: prekey_private(owner, e) for e in range(0, 8)}
    return s


class Target:
    """One receiving node: a verifier and its round book."""

    def __init__(self, name: str, spec: tuple[TensorSpec, ...], sealed: bool) -> None:
        self.name = name
        self.spec = spec
        self.sealing = make_sealing(US, "us") if sealed else None
        # The plain target also normalizes federatedly (2 numeric columns): stats
        # messages reach their parser there, and are refused by shape elsewhere.
        self.verifier = Verifier(CID, MEMBERS, bytes(US.verify_key), spec, MAX_INPUT + 4096,
                                 sealing=self.sealing,
                                 stats_columns=STATS_COLUMNS if name == "plain" else None)
        self.book = RoundBook(["m1", "m2"], LOOKAHEAD)

    def feed(self, data: bytes) -> str:
        acc = self.verifier.verify(data, self.book.current, "fuzz-peer")
        return "accepted:" + self.book.add(acc)


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = self.rng.randbytes(2 * MAX_INPUT)
        self.targets = self._targets()
        # Members' sealing state, knowing our prekeys, so they can seal to us.
        self.member_sealing = {}
        ours = [sign_prekey(US, CID, e, prekey_private("us", e).public_key) for e in range(8)]
        for key, name in ((M1, "m1"), (M2, "m2"), (OUTSIDER, "outsider")):
            s = make_sealing(key, name)
            s.learn("us", ours, 0, 0)
            self.member_sealing[name] = s
        self.valid_small = [self.share_body(SMALL_SPEC) for _ in range(8)]
        self.valid_envelopes = [self.sign(M1, KIND_SHARE, 0, 1, self.valid_small[0]),
                                self.sign(M2, KIND_RETIRE, 3, 2, b""),
                                self.sign(M1, KIND_PREKEY, 0, 3, self.announcement_body(M1)),
                                self.sign(M1, KIND_SEALED, 1, 4,
                                          self.sealed_body(self.valid_small[1], 1, "m1"))]
        self.seq = 10
        self.base_round = 0
        self.generators: list[tuple[str, float, Callable[[], tuple[bytes, str]]]] = [
            ("random", 6, self.g_random),
            ("mutated_envelope", 14, self.g_mutated_envelope),
            ("share_valid", 6, self.g_share_valid),
            ("share_mutated_resigned", 14, self.g_share_mutated),
            ("share_structured", 16, self.g_share_structured),
            ("sealed", 10, self.g_sealed),
            ("prekey", 12, self.g_prekey),
            ("bomb", 8, self.g_bomb),
            ("outer_structured", 8, self.g_outer_structured),
            ("retire", 2, self.g_retire),
            ("seen", 4, self.g_seen),
            ("stats", 4, self.g_stats),
            ("big_share", 0.4, self.g_big_share),
        ]
        self.gen_weights = [w for _, w, _ in self.generators]

    @staticmethod
    def _targets() -> dict[str, Target]:
        return {"plain": Target("plain", SMALL_SPEC, False),
                "sealed": Target("sealed", SMALL_SPEC, True),
                "big": Target("big", BIG_SPEC, False)}

    def reset_targets(self) -> None:
        self.targets = self._targets()

    # --- helpers --------------------------------------------------------------------
    def size(self) -> int:
        x = self.rng.random()
        if x < 0.70:
            return self.rng.randint(0, 256)
        if x < 0.95:
            return self.rng.randint(257, 16 * 1024)
        if x < 0.995:
            return self.rng.randint(16 * 1024, 256 * 1024)
        return self.rng.randint(256 * 1024, MAX_INPUT)

    def randbytes(self, n: int) -> bytes:
        if n <= 64:
            return self.rng.randbytes(n)
        start = self.rng.randrange(0, len(self.pool) - n + 1)
        return self.pool[start:start + n]

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def round_(self) -> int:
        """Mostly the receivers' round or a few ahead (or behind: stale)."""
        x = self.rng.random()
        if x < 0.8:
            return max(0, self.base_round + self.rng.randint(-1, LOOKAHEAD + 2))
        if x < 0.95:
            return self.rng.randint(0, 200)
        return self.rng.choice([2**53 - 1, 2**32, 2**31 - 1, 0])

    def sign(self, key: SigningKey, kind: str, round_: int, seq: int,
             body: bytes | list[bytes]) -> bytes:
        return envelope.pack(key, CID, kind, round_, seq, body)

    def signer(self) -> SigningKey:
        return self.rng.choice(SIGNERS)

    def share_body(self, spec: tuple[TensorSpec, ...], weight: float | None = None,
                   fill: Callable[[tuple[int, ...], str], np.ndarray] | None = None) -> bytes:
        items = []
        for t in spec:
            a = fill(t.shape, t.dtype) if fill else \
                np.full(t.shape, self.rng.uniform(-2, 2), dtype=t.dtype)
            items.append((t.name, a))
        return bodies.encode_share(items, weight if weight is not None
                                   else self.rng.uniform(0.5, 1000))

    def announcement_body(self, key: SigningKey, epochs: tuple[int, ...] = (0, 1, 2)) -> bytes:
        owner = MEMBERS.get(bytes(key.verify_key), "outsider")
        return msgpack.packb({"hello": False, "prekeys": [
            sign_prekey(key, CID, e, prekey_private(owner, e).public_key).encode()
            for e in epochs]}, use_bin_type=True)

    def sealed_body(self, plaintext: bytes, round_: int, sender: str) -> list[bytes]:
        s = self.member_sealing[sender]
        recipients, _ = s.recipients(round_, ["us"])
        if not recipients:  # a round far ahead: any of our epochs
            recipients = {"us": s.peers["us"][self.rng.randrange(8)]}
        return list(s.seal(plaintext, round_, recipients))

    def mutate(self, data: bytes, max_ops: int = 4) -> bytes:
        b = bytearray(data)
        for _ in range(self.rng.randint(1, max_ops)):
            op = self.rng.randrange(10)
            n = len(b)
            if n == 0 or op == 9:
                b += self.randbytes(self.rng.randint(1, 16))
                continue
            i = self.rng.randrange(n)
            if op == 0:
                b[i] ^= 1 << self.rng.randrange(8)
            elif op == 1:
                b[i] = self.rng.randrange(256)
            elif op == 2:
                b[i] = self.rng.choice(INTERESTING_BYTES)
            elif op == 3:
                b[i:i] = self.randbytes(self.rng.randint(1, 32))
            elif op == 4:
                del b[i:i + self.rng.randint(1, 64)]
            elif op == 5:
                del b[i:]
            elif op == 6:  # an interesting length in a (possible) header
                b[i:i + 4] = self.rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                              b"\x00\x00\x00\x00", b"\x00\x00\x01\x00",
                                              (n + 1).to_bytes(4, "big"),
                                              (n - 1).to_bytes(4, "big", signed=True)])
            elif op == 7:  # duplicate a slice
                j = self.rng.randrange(n)
                b[i:i] = b[j:j + self.rng.randint(1, 256)]
            else:
                b[i:i] = self.rng.choice(HUGE_HEADERS)
        return bytes(b[:MAX_INPUT])

    # --- hostile items ----------------------------------------------------------------
    def bomb(self) -> bytes:
        kind = self.rng.randrange(7)
        budget = self.rng.choice([64, 4096, 65536, 300_000, MAX_INPUT - 2048])
        if kind == 0:  # 8-ary tree of empty arrays (or maps of arrays), cut to the budget
            node, depth = b"\x90", 0
            head = self.rng.choice([b"\x98", b"\xdc\x00\x08", b"\xdd\x00\x00\x00\x08"])
            while len(node) * 8 + len(head) <= budget and depth < 8:
                node, depth = head + node * 8, depth + 1
            return node
        if kind == 1:  # deep nesting
            n = min(budget, 200_000)
            return self.rng.choice([b"\x91", b"\x81\xa1a", b"\x81\xc0", b"\xdc\x00\x01"]) * n \
                + b"\x90"
        if kind == 2:  # a declared length far beyond the input
            return self.rng.choice(HUGE_HEADERS) + self.randbytes(self.rng.randint(0, 64))
        if kind == 3:  # a wide array of nils / fixints / empty maps
            n = min(budget, 0xFFFF)
            return b"\xdc" + n.to_bytes(2, "big") + self.rng.choice([b"\xc0", b"\x01", b"\x80"]) * n
        if kind == 4:  # a map of 2^16-1 small pairs
            n = min(budget // 2, 0xFFFF)
            return b"\xde" + n.to_bytes(2, "big") + b"\x01\xc0" * n
        if kind == 5:  # ext types
            return self.rng.choice([b"\xd4\x01\x00", b"\xc7\x05\x01" + b"x" * 5,
                                    b"\xd6\xff\x00\x00\x00\x00", b"\xc9\x00\x01\x00\x00\x05"])
        return self.random_item()

    def random_item(self, depth: int = 0) -> bytes:
        """A random msgpack item of any type (or a byte that is not one)."""
        x = self.rng.randrange(14)
        if x == 0:
            return msgpack.packb(self.rng.choice([None, True, False]))
        if x == 1:
            return msgpack.packb(self.rng.choice([0, 1, -1, 127, 128, 255, 256, 2**31, 2**32,
                                                  2**53, 2**63, 2**64 - 1, -2**63, -33]))
        if x == 2:
            return msgpack.packb(self.rng.choice([0.0, -0.0, 1e30, -1e30, float("nan"),
                                                  float("inf"), 1e-300, 5e-324, 1e12, 1e13]))
        if x == 3:
            return msgpack.packb(self.rng.choice(["", "weight", "tensors", "<f4", "<f2",
                                                  "layer.weight", "é" * 40, "x" * 300]))
        if x == 4:
            return msgpack.packb(self.randbytes(self.rng.choice([0, 1, 12, 31, 32, 33, 64, 80,
                                                                 300])), use_bin_type=True)
        if x == 5 and depth < 3:
            return msgpack.packb([]) if self.rng.random() < 0.3 else \
                b"\x93" + b"".join(self.random_item(depth + 1) for _ in range(3))
        if x == 6 and depth < 3:
            return b"\x81" + self.random_item(depth + 1) + self.random_item(depth + 1)
        if x == 7:
            return self.rng.choice(HUGE_HEADERS)
        if x == 8:
            return bytes([self.rng.choice([0xC1, 0xC7, 0xD4, 0xD8])]) + self.randbytes(4)
        if x == 9:
            return msgpack.packb(self.rng.choice([[16, 8], [8], [2, 3, 2], [-1, 8],
                                                  [2**64 - 1], [0], list(range(9)), [1.5]]))
        return self.rng.choice([b"\x90", b"\x80", b"\xa0", b"\xc4\x00", b"\xc0", b"\xc2"])

    # --- generators: each returns (input bytes, target name) ----------------------------
    def g_random(self) -> tuple[bytes, str]:
        data = self.randbytes(self.size())
        if data and self.rng.random() < 0.5:  # look like the start of an envelope
            data = b"\x98" + data[1:]
        return data, self.rng.choice(["plain", "sealed"])

    def g_mutated_envelope(self) -> tuple[bytes, str]:
        i = self.rng.randrange(len(self.valid_envelopes))
        return self.mutate(self.valid_envelopes[i], 6), "sealed" if i >= 2 else "plain"

    def g_share_valid(self) -> tuple[bytes, str]:
        """Valid shares, sometimes two for one round (equivocation), any round."""
        body = self.rng.choice(self.valid_small) if self.rng.random() < 0.5 \
            else self.share_body(SMALL_SPEC)
        r = self.round_()
        kind = KIND_SHARE
        target = "plain"
        if self.rng.random() < 0.3:
            sender = self.rng.choice(["m1", "m2"])
            key = M1 if sender == "m1" else M2
            return self.sign(key, KIND_SEALED, r, self.next_seq(),
                             self.sealed_body(body, r, sender)), "sealed"
        return self.sign(self.signer(), kind, r, self.next_seq(), body), target

    def g_share_mutated(self) -> tuple[bytes, str]:
        body = self.mutate(self.rng.choice(self.valid_small), 5)
        return self.sign(self.signer(), KIND_SHARE, self.round_(), self.next_seq(),
                         body), "plain"

    def g_share_structured(self) -> tuple[bytes, str]:
        body = self.hostile_share_body()
        if self.rng.random() < 0.25:  # and as the plaintext of a valid seal
            r = self.round_()
            return self.sign(M1, KIND_SEALED, r, self.next_seq(),
                             self.sealed_body(body, r, "m1")), "sealed"
        return self.sign(self.signer(), KIND_SHARE, self.round_(), self.next_seq(),
                         body), "plain"

    def hostile_share_body(self) -> bytes:
        rng = self.rng
        x = rng.randrange(6)
        if x == 0:  # hostile values in a well-formed body
            def fill(shape: tuple[int, ...], dtype: str) -> np.ndarray:
                a = np.full(shape, rng.choice([1e30, -1e30, 65504.0, 0.0, 1e-45]), dtype=dtype)
                if rng.random() < 0.5:
                    a.reshape(-1)[rng.randrange(a.size)] = rng.choice(
                        [np.nan, np.inf, -np.inf])
                return a
            return self.share_body(SMALL_SPEC, rng.choice([1e12, 1e-300, 5e-324, 1.0]), fill)
        # Every field as msgpack pieces; one (or a few) replaced by something hostile.
        fields: dict[str, bytes] = {"weight": msgpack.packb(rng.uniform(1, 10))}
        entries = []
        for t in SMALL_SPEC:
            size = np.dtype(t.dtype).itemsize * int(np.prod(t.shape))
            entries.append([msgpack.packb(t.name), msgpack.packb(t.dtype),
                            msgpack.packb(list(t.shape)),
                            msgpack.packb(b"\x00" * size, use_bin_type=True)])
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(8)
            hostile = self.bomb() if rng.random() < 0.3 else self.random_item()
            if where == 0:
                fields["weight"] = hostile
            elif where == 1:
                fields["tensors"] = hostile
            elif where == 2:
                entries[rng.randrange(len(entries))] = [hostile]
            else:
                e = entries[rng.randrange(len(entries))]
                e[rng.randrange(len(e))] = hostile
        if "tensors" not in fields:
            n = len(entries) + rng.choice([0, 0, 0, 0, -1, 1])
            parts = [b"\x94" + b"".join(e) if len(e) == 4 else e[0] for e in entries]
            if n > len(parts):
                parts.append(parts[-1])
            fields["tensors"] = _array_header(max(n, 0)) + b"".join(parts[:max(n, 0)])
        keys = [b"\xa6weight", b"\xa7tensors"]
        values = [fields["weight"], fields["tensors"]]
        if rng.random() < 0.2:
            keys.reverse()
            values.reverse()
        pairs = [k + v for k, v in zip(keys, values, strict=True)]
        n = 2
        if rng.random() < 0.1:  # an extra, duplicate or missing key
            pairs.append(rng.choice([b"\xa6weight" + fields["weight"], b"\xa1x\xc0",
                                     self.random_item() + self.random_item()]))
            n = 3
        if rng.random() < 0.05:
            pairs.pop()
            n -= 1
        head = rng.choice([_map_header(n), b"\xde" + n.to_bytes(2, "big"),
                           b"\xdf" + n.to_bytes(4, "big")])
        body = head + b"".join(pairs)
        if rng.random() < 0.05:
            body += self.random_item()
        return body[:MAX_INPUT]

    def g_sealed(self) -> tuple[bytes, str]:
        rng = self.rng
        r = self.round_()
        x = rng.randrange(4)
        plaintext = rng.choice(self.valid_small) if rng.random() < 0.5 else \
            self.hostile_share_body()
        sender, key = rng.choice([("m1", M1), ("m2", M2), ("outsider", OUTSIDER)])
        if x == 0:  # a valid seal, garbled after sealing, re-signed
            head, ct = self.sealed_body(plaintext, r, sender)
            body = self.mutate(head + ct, 4)
        elif x == 1:  # a forged header around random ciphertext
            body = self.forged_sealed_header() + self.randbytes(rng.randint(0, 2000))
        elif x == 2:  # a valid seal addressed to an epoch we do not hold / another round
            head, ct = self.sealed_body(plaintext, r, sender)
            r = min(r + rng.choice([1, -1, 100]), 2**53 - 1) if r > 0 else r + 1
            body = head + ct
        else:  # a header length prefix that lies
            head, ct = self.sealed_body(plaintext, r, sender)
            n = rng.choice([0, 1, len(head) - 4 + 1, 256 * 1024 + 1, 2**32 - 1, len(head) - 5])
            body = max(n, 0).to_bytes(4, "big") + head[4:] + ct
        return self.sign(key, KIND_SEALED, r, self.next_seq(), body[:MAX_INPUT]), "sealed"

    def forged_sealed_header(self) -> bytes:
        rng = self.rng
        pub = bytes(prekey_private("us", rng.randrange(8)).public_key)
        fields = {"v": msgpack.packb(1), "nonce": msgpack.packb(self.randbytes(12)),
                  "kc": msgpack.packb(self.randbytes(32)),
                  "keys": b"\x91\x93\x00" + msgpack.packb(pub) + msgpack.packb(self.randbytes(80))}
        for _ in range(rng.randint(1, 2)):
            k = rng.choice(list(fields))
            fields[k] = self.bomb() if rng.random() < 0.3 else self.random_item()
        if rng.random() < 0.2:  # many wraps
            n = rng.choice([1024, 1025, 3000])
            wrap = b"\x93\x00" + msgpack.packb(self.randbytes(32)) + \
                msgpack.packb(self.randbytes(80))
            fields["keys"] = _array_header(n) + wrap * n
        header = _map_header(len(fields)) + b"".join(msgpack.packb(k) + v
                                                     for k, v in fields.items())
        return len(header).to_bytes(4, "big") + header

    def g_prekey(self) -> tuple[bytes, str]:
        rng = self.rng
        key = self.signer()
        owner = MEMBERS.get(bytes(key.verify_key), "outsider")
        x = rng.randrange(7)
        if x == 0:  # valid (learned) announcement, any epochs
            epochs = tuple(sorted(rng.sample(range(0, 40), rng.randint(1, 8))))
            body = self.announcement_body(key, epochs)
        elif x == 1:  # a properly signed low-order / non-canonical key among good ones
            items = [sign_prekey(key, CID, e, prekey_private(owner, e).public_key).encode()
                     for e in range(rng.randint(0, 3))]
            bad = sign_prekey(key, CID, 7, PublicKey(rng.choice(BAD_X25519)))
            items.insert(rng.randint(0, len(items)), bad.encode())
            body = msgpack.packb({"hello": rng.random() < 0.5, "prekeys": items},
                                 use_bin_type=True)
        elif x == 2:  # another member's prekeys, duplicate epochs, too many, none
            other = rng.choice([M1, M2, US, OUTSIDER])
            items = [sign_prekey(rng.choice([key, other]), CID, rng.randint(0, 3),
                                 prekey_private(owner, 0).public_key).encode()
                     for _ in range(rng.choice([0, 1, 2, 8, 9, 20]))]
            body = msgpack.packb({"hello": True, "prekeys": items}, use_bin_type=True)
        elif x == 3:  # mutated, re-signed
            body = self.mutate(self.announcement_body(key), 4)
        elif x == 4:  # hostile item in a field
            good = sign_prekey(key, CID, 0, prekey_private(owner, 0).public_key).encode()
            hostile = self.bomb() if rng.random() < 0.4 else self.random_item()
            body = rng.choice([
                b"\x82\xa5hello" + hostile + b"\xa7prekeys\x91" + msgpack.packb(good),
                b"\x82\xa5hello\xc2\xa7prekeys" + hostile,
                b"\x82\xa5hello\xc2\xa7prekeys\x91" + hostile,
                b"\x82\xa5hello\xc2\xa7prekeys\x91" + msgpack.packb(
                    b"\x94" + hostile + good[35:], use_bin_type=True),
                hostile])
        elif x == 5:  # a signed prekey with a hostile field
            fields = [msgpack.packb(bytes(key.verify_key)), msgpack.packb(1),
                      msgpack.packb(bytes(prekey_private(owner, 1).public_key)),
                      msgpack.packb(b"s" * 64)]
            fields[rng.randrange(4)] = self.random_item()
            item = _array_header(rng.choice([4, 4, 3, 5])) + b"".join(fields)
            body = b"\x82\xa5hello\xc2\xa7prekeys\x91" + msgpack.packb(item, use_bin_type=True)
        else:
            body = self.bomb()
        return self.sign(key, KIND_PREKEY, self.round_(), self.next_seq(),
                         body[:MAX_INPUT]), rng.choice(["sealed", "sealed", "plain"])

    def g_bomb(self) -> tuple[bytes, str]:
        rng = self.rng
        b = self.bomb()
        x = rng.randrange(3)
        if x == 0:
            data = b
        elif x == 1:  # in one outer field
            data = self.outer_fields(replace={rng.randrange(8): b})
        else:  # a signed body of any kind
            data = self.sign(self.signer(), rng.choice(sorted(KINDS)), self.round_(),
                             self.next_seq(), b)
        return data[:MAX_INPUT + 2048], rng.choice(["plain", "sealed"])

    def outer_fields(self, replace: dict[int, bytes]) -> bytes:
        env = envelope.decode_outer(self.rng.choice(self.valid_envelopes))
        fields = [msgpack.packb(x, use_bin_type=True) for x in
                  ("flnode/1", env.consortium_id, env.sender, env.kind, env.round, env.seq,
                   env.body, env.sig)]
        for i, v in replace.items():
            fields[i] = v
        return _array_header(self.rng.choice([8] * 8 + [7, 9, 0])) + b"".join(fields)

    def g_outer_structured(self) -> tuple[bytes, str]:
        rng = self.rng
        x = rng.randrange(3)
        if x == 0:  # a random item in one or two fields
            replace = {rng.randrange(8): self.random_item() for _ in range(rng.randint(1, 2))}
            data = self.outer_fields(replace)
        elif x == 1:  # valid types, wrong values: other consortium, kinds, counters
            body = rng.choice(self.valid_small)
            cid = rng.choice([CID, b"\x00" * 32])
            seq = self.next_seq() if rng.random() < 0.95 else rng.randrange(2**53)
            data = envelope.pack(self.signer(), cid, rng.choice(sorted(KINDS)),
                                 rng.choice([0, 1, 2**53 - 1]), seq, body)
        else:  # a protocol tag or kind that is long, or not a str
            tag = rng.choice([msgpack.packb("x" * rng.choice([9, 64, 65, 70_000])),
                              msgpack.packb(self.randbytes(rng.choice([8, 100_000])),
                                            use_bin_type=True),
                              msgpack.packb("flnode/0")])
            data = self.outer_fields({rng.choice([0, 3]): tag})
        return data, rng.choice(["plain", "sealed"])

    def g_retire(self) -> tuple[bytes, str]:
        body = b"" if self.rng.random() < 0.3 else self.randbytes(self.rng.randint(1, 100))
        return self.sign(self.signer(), KIND_RETIRE, self.round_(), self.next_seq(),
                         body), self.rng.choice(["plain", "sealed"])

    def g_seen(self) -> tuple[bytes, str]:
        """Seen reports signed by a member: valid, mutated, or structured wrongly (an
        outsider's key, a digest of the wrong size, too many entries, a bomb)."""
        rng = self.rng
        keys = list(MEMBERS) + [self.randbytes(32)]
        count = rng.choice([0, 1, 2, 3, 4, 40])
        entries = [[rng.choice(keys), self.randbytes(rng.choice([32, 32, 32, 31, 33, 0]))]
                   for _ in range(count)]
        choice = rng.random()
        if choice < 0.15:
            body = self.bomb()
        elif choice < 0.3:
            body = msgpack.packb([[*e, self.randbytes(4)] for e in entries], use_bin_type=True)
        else:
            body = msgpack.packb(entries, use_bin_type=True)
            if rng.random() < 0.3:
                body = self.mutate(body, 3)
        return self.sign(self.signer(), KIND_SEEN, self.round_(), self.next_seq(),
                         body[:MAX_INPUT]), rng.choice(["plain", "sealed"])

    def g_stats(self) -> tuple[bytes, str]:
        """Stats messages signed by a member: right shape with extreme or non-finite
        values, wrong widths and keys, mutated, or a bomb."""
        rng = self.rng
        k = rng.choice([STATS_COLUMNS] * 4 + [0, 1, 3, 1000])
        vals = [0.0, 1.0, -1.0, 1e308, float("nan"), float("inf"), 1e13]

        def arr() -> bytes:
            return np.array([rng.choice(vals) for _ in range(k)], dtype="<f8").tobytes()
        choice = rng.random()
        if choice < 0.1:
            body = self.bomb()
        else:
            doc: dict[object, object] = {"rows": rng.choice(vals + ["x", None]), "sum": arr(),
                                         "sumsq": arr()}
            if choice < 0.3:
                doc[rng.choice(["extra", "sum", 7])] = self.randbytes(rng.randint(0, 64))
            body = msgpack.packb(doc, use_bin_type=True)
            if rng.random() < 0.3:
                body = self.mutate(body, 3)
        return self.sign(self.signer(), KIND_STATS, self.round_(), self.next_seq(),
                         body[:MAX_INPUT]), rng.choice(["plain", "plain", "sealed"])

    def g_big_share(self) -> tuple[bytes, str]:
        """~1 MiB shares for a node with a ~1 MB model: valid, or one bad value."""
        rng = self.rng

        def fill(shape: tuple[int, ...], dtype: str) -> np.ndarray:
            a = np.full(shape, rng.uniform(-1, 1), dtype=dtype)
            if rng.random() < 0.5:
                a.reshape(-1)[rng.randrange(a.size)] = rng.choice([np.nan, np.inf])
            return a
        body = self.share_body(BIG_SPEC, None, fill)
        if rng.random() < 0.3:
            body = self.mutate(body, 2)
        return self.sign(self.signer(), KIND_SHARE, self.round_(), self.next_seq(),
                         body), "big"

    def next_input(self) -> tuple[str, bytes, str]:
        name, _, gen = self.rng.choices(self.generators, self.gen_weights)[0]
        data, target = gen()
        return name, data, target


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 2**16
                                             else b"\xdd" + n.to_bytes(4, "big"))


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM where there is /proc (ru_maxrss carries over the
    parent's peak across fork and exec on Linux, so a fuzz run started from a big
    process would report that process's), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_crash(out: Path, n: int, data: bytes, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"crash-{n}.bin"
    path.write_bytes(data)
    (out / f"crash-{n}.json").write_text(json.dumps(meta, indent=1))
    return path


def run(inputs: int, seed: int, out: Path, seconds: float | None = None,
        reset_every: int = 20_000, progress: bool = False) -> dict:
    fz = Fuzzer(seed)
    stats: Counter[str] = Counter()
    by_gen: Counter[str] = Counter()
    crashes = 0
    slowest = (0.0, "", 0)
    largest = 0
    t_start = time.perf_counter()
    n = 0
    for n in range(1, inputs + 1):
        if n % reset_every == 0:
            fz.reset_targets()
        gen, data, target_name = fz.next_input()
        target = fz.targets[target_name]
        largest = max(largest, len(data))
        by_gen[gen] += 1
        current = target.book.current
        t = time.perf_counter()
        problem = None
        try:
            outcome = target.feed(data)
        except RemoteError as exc:
            outcome = exc.reason
            if len(str(exc)) > MAX_MESSAGE_CHARS:
                problem = f"a rejection message of {len(str(exc))} characters"
        except Exception as exc:  # noqa: BLE001 - that is what we are looking for
            outcome = f"CRASH:{type(exc).__name__}"
            problem = traceback.format_exc()
        dt = time.perf_counter() - t
        if dt > slowest[0]:
            slowest = (dt, gen, len(data))
        stats[outcome] += 1
        if problem is not None:
            crashes += 1
            save_crash(out, crashes, data, {"generator": gen, "target": target_name,
                                            "current_round": current, "seed": seed,
                                            "input_number": n, "problem": problem})
        if n % 499 == 0:  # rounds go by; a member that lied its way far ahead resets us
            for t in fz.targets.values():
                t.book.advance()
            if max(t.book.current for t in fz.targets.values()) > 100:
                fz.reset_targets()
            fz.base_round = min(t.book.current for t in fz.targets.values())
        if progress and n % 100_000 == 0:
            el = time.perf_counter() - t_start
            print(f"  {n:,} inputs, {n / el:,.0f}/s, {crashes} crashes, "
                  f"slowest {slowest[0] * 1e3:.1f} ms, peak RSS {peak_rss_mb():.0f} MB",
                  file=sys.stderr, flush=True)
        if seconds is not None and time.perf_counter() - t_start > seconds:
            break
    elapsed = time.perf_counter() - t_start
    return {"inputs": n, "seconds": round(elapsed, 2), "inputs_per_s": round(n / elapsed, 1),
            "crashes": crashes, "slowest_ms": round(slowest[0] * 1e3, 2),
            "slowest_generator": slowest[1], "slowest_input_bytes": slowest[2],
            "largest_input_bytes": largest, "peak_rss_mb": round(peak_rss_mb(), 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seed": seed, "out": str(out), "outcomes": dict(stats.most_common()),
            "generators": dict(by_gen.most_common())}


def replay(path: Path) -> int:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    target = Fuzzer._targets()[meta.get("target", "plain")]
    target.book.current = meta.get("current_round", 0)
    try:
        print(target.feed(path.read_bytes()))
    except RemoteError as exc:
        print(f"RemoteError {exc.reason}: {str(exc)[:300]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/fuzz"),
                    help="where reproducers of crashes go")
    ap.add_argument("--progress", action="store_true", help="a line every 100,000 inputs")
    ap.add_argument("--replay", type=Path, help="run one saved crash-N.bin again")
    args = ap.parse_args(argv)
    np.seterr(all="ignore")  # hostile values overflow float16 on purpose
    if args.replay:
        return replay(args.replay)
    result = run(args.inputs, args.seed, args.out, args.seconds, progress=args.progress)
    print(json.dumps(result))
    print(f"fuzz: {result['inputs']:,} inputs in {result['seconds']:.0f} s "
          f"({result['inputs_per_s']:,.0f}/s), {result['crashes']} crashes, slowest "
          f"{result['slowest_ms']:.1f} ms ({result['slowest_generator']}, "
          f"{result['slowest_input_bytes']:,} B), peak RSS {result['peak_rss_mb']:.0f} MB",
          file=sys.stderr)
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Wire format version 1: pack, sign, verify, unpack. The only parser of peer bytes.

Sans-IO (in the manner of h11): bytes in, an `Accepted` share or a
`RemoteError` out; no sockets, no clocks, no files. Every transport and the
in-memory simulation run the same code, and a property test can throw
arbitrary byte strings at it.

Outer envelope, a msgpack array of 8 items::

    ["flnode/1", consortium_id (bin 32), sender_pk (bin 32), kind (str),
     round (uint), seq (uint), body (bin), sig (bin 64)]

`sig` is Ed25519 over BLAKE2b-256(SIG_TAG || msgpack(header) || body), where
header is the first six fields plus len(body). Hashing first makes the costly
pass over a large body one BLAKE2b pass instead of Ed25519's two SHA-512
passes (measured: signing a 10 MB body directly is ~80 % of pack+verify).

Kinds (`KINDS`; each constant below says what its body holds): "share" (a
plain share body), "sealed" (a sealed share body, see gossip/seal.py),
"prekey" (signed X25519 prekeys, see gossip/seal.py), "retire" (empty body:
the sender stops sharing), "hello" (one byte: ask or reply), "seen" (the
digests of the shares the sender combined in a round), "echo" (the digests of the
shares it holds for a round, before combining: gossip/protocol/echo.py), "stats" (a member's
statistics for federated normalization), "norm" (its normalization vote, one
byte), "final" (the 32-byte digest of its final model), and in a secure round
(issue 22) "deal" (the sender's pieces of its contribution for one recipient, sealed
to that recipient) and "secagg" (one opened piece of a later step: check, degree2,
sum). The share, seen, echo, stats, norm and secure-aggregation bodies are encoded and
decoded in `gossip.bodies`, whose docstring gives their layout.

Verification runs in this order and stops at the first failure, each with
its own counted reason: size cap (`too_large`) -> outer decode with limits
(`malformed`, `protocol`, `kind`) -> consortium id (`consortium`) -> member
(`non_member`, `from_self`) -> signature (`bad_signature`) -> freshness:
an identical copy of an accepted message (`duplicate`, benign), a sequence
number reused for other content (`seq_reuse`), a sequence number too old to
judge (`replay`), a round already closed (`stale`) -> body decode
(`bad_body`; a compression other than the agreed one, gossip/compress.py: `codec`)
-> shapes and dtypes (`shape`, `dtype`) -> finite values
(`non_finite`). A sealed share is opened (`gossip.seal`: `bad_seal`,
`no_prekey`) after the freshness checks and before the body decode; a
prekey announcement is checked prekey by prekey (`bad_prekey`). Nothing a
peer sends is unpickled, eval'd or used as a path.

Parsing has bounded cost (gossip.wire): the envelope, share bodies, sealed
headers and announcements are read field by field, each field's msgpack type
and declared length checked against what the format expects (and against the
bytes actually left) before anything is built for it, so a structure bomb is
refused at its first byte. Nothing is recursed into; trailing bytes are
malformed. The verifier reads the body in place and copies it once, after
every check (a plain share's tensors are read-only views of that copy):
rejecting any input allocates at most about its size again (a sealed body's
plaintext), in time linear in it. Peer values in a rejection's detail are cut
(`gossip.errors.shorten`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import msgpack
import numpy as np
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gossip.bodies import (
    DIGEST_BYTES,
    SecAgg,
    Share,
    Stats,
    TensorSpec,
    decode_echo,
    decode_norm,
    decode_secagg,
    decode_seen,
    decode_share,
    decode_stats,
)
from gossip.compress import NO_COMPRESSION, Codec
from gossip.errors import SHORT, LocalError, RemoteError, shorten
from gossip.seal import Sealing, SignedPrekey, decode_announcement
from gossip.wire import Reader, WireError

PROTO = "flnode/1"
SIG_TAG = b"flnode/1 envelope-sig\x00"
KIND_SHARE = "share"
# A share body sealed to the members' prekeys (gossip.seal); round = the share's round.
KIND_SEALED = "sealed"
# The sender's signed X25519 prekeys (gossip.seal); round = the sender's round
# when it announced them, which also tells receivers it has left earlier rounds.
KIND_PREKEY = "prekey"
# "I stop sharing" (e.g. its privacy budget is spent): empty body; receivers
# stop waiting for the sender's shares.
KIND_RETIRE = "retire"
# "I am up, at this round": sent by a node when it starts (body HELLO_ASK: answer me)
# and as the answer (body HELLO_REPLY); round = the sender's current round. It lets
# a restarted node join the round the others are in, and a consortium wait for a
# quorum before round 1, with or without sealing.
KIND_HELLO = "hello"
HELLO_ASK = b"\x00"
HELLO_REPLY = b"\x01"
# "These are the shares I combined in round r": sent by a node once it has closed
# round r; body = msgpack array of [member public key (bin 32), envelope digest
# (bin 32)], one per member whose share it accepted for r (not its own). Receivers
# compare each digest with the one they accepted from that member: a member that
# signs a different share for each peer (split equivocation) is seen at once.
KIND_SEEN = "seen"
# "These are the shares I hold for round r" (the echo phase, gossip/protocol/echo.py):
# sent once the share phase of r has closed, before combining; body = as "seen", one
# [member key, envelope digest] per share held, the sender's own included. The members
# combine only the shares their echoes agree on.
KIND_ECHO = "echo"
# A member's statistics for federated normalization (node/normalize.py), sent once
# before round 1 (round 0) and re-sent unchanged on a hello: body = msgpack map
# {"rows": float, "sum": bin (8 k), "sumsq": bin (8 k)}, float64 little-endian, one
# value per numeric column of the schema (k columns). Shape only is checked here;
# the values' plausibility is the runner's (it knows the agreed noise).
KIND_STATS = "stats"
# A member's vote on federated normalization (node/normalize.py), sent once before its
# statistics (round 0) and re-sent unchanged on a hello: body = one byte (gossip.bodies),
# NORM_USABLE ("my check at start passes: I will send statistics") or NORM_RANGE ("it
# fails and the schema says normalize_fallback = \"range\""). Any member's NORM_RANGE makes every
# member scale by the declared ranges; nobody computes, charges or sends statistics
# until every member's vote is in. It costs no ε (see node/normalize.py for what it tells).
KIND_NORM = "norm"
# "My model after the last round has this digest": sent once by a node that has closed
# its last round; round = that round; body = the 32-byte BLAKE2b-256 digest of its
# model's parameters (float32 little-endian). Receivers compare it with their own:
# members that ended with different models (e.g. one restarted after a kill and combined
# other shares) are told so. It tells nothing about the rows: every member holding the
# same shares can compute it.
KIND_FINAL = "final"
# Secure aggregation (issue 22, node/runtime/secure_round.py; gossip.bodies `SecAgg`):
# "deal" carries the sender's pieces of its contribution for ONE recipient, sealed to that
# recipient's prekey (gossip.seal; round = the secure round): in a secure round it takes
# the place of the share (the round book files it as the sender's share for the round, so
# the share phase's closing rule, equivocation and staleness apply to it unchanged);
# "secagg" carries one opened piece of a later step (check, degree2, sum), broadcast.
KIND_DEAL = "deal"
KIND_SECAGG = "secagg"
SHARE_KINDS = frozenset({KIND_SHARE, KIND_SEALED})
# A secure consortium's contribution kinds (refused in a plain one, as SHARE_KINDS are in a
# secure one: Verifier(secure=...)).
SECURE_KINDS = frozenset({KIND_DEAL, KIND_SECAGG})
KINDS = frozenset({KIND_SHARE, KIND_SEALED, KIND_PREKEY, KIND_RETIRE, KIND_HELLO, KIND_SEEN,
                   KIND_STATS, KIND_NORM, KIND_FINAL, KIND_ECHO, KIND_DEAL, KIND_SECAGG})
_KINDS_BY_BYTES = {k.encode(): k for k in KINDS}
_PROTO_BYTES = PROTO.encode()

# A 10 M-parameter fp32 model is 40 MB; 64 MiB leaves room for that plus
# framing. Transports apply their own (smaller or equal) caps before this.
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
# The outer array has exactly 8 items; strings in it are the protocol tag and
# the kind, both short. It is read field by field (gossip.wire), each field's
# type and length checked before anything is taken for it.
OUTER_ITEMS = 8
MAX_OUTER_STR = 64
CONSORTIUM_ID_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# Rounds and sequence numbers are uints; 2**53 keeps them exact in JSON logs.
MAX_COUNTER = 2**53
# How many of a sender's sequence numbers we remember (as IPsec's anti-replay
# window does): reordering within it is accepted, an identical copy inside it
# is a benign duplicate, and anything older than it is a replay.
REPLAY_WINDOW = 1024

# "late_echo": an echo for a round we have closed (gossip/protocol/machine.py): an
# honest member slower than our echo deadline, or one that restarted and re-sent it.
BENIGN_REASONS = frozenset({"duplicate", "late_echo"})


@dataclass(frozen=True)
class Envelope:
    consortium_id: bytes
    sender: bytes
    kind: str
    round: int
    seq: int
    body: bytes
    sig: bytes

    @cached_property  # a hash of the whole body: the round book compares it per share
    def digest(self) -> bytes:
        """What the signature covers; identifies the message."""
        return signing_digest(self.consortium_id, self.sender, self.kind, self.round, self.seq,
                              self.body)


@dataclass(frozen=True)
class Accepted:
    sender: str  # member name
    envelope: Envelope
    share: Share | None  # None for a retire or prekey message
    prekeys: tuple[SignedPrekey, ...] = ()  # a prekey message's verified prekeys
    hello: bool = False  # a prekey message that asks for ours (its sender just started)
    seen: tuple[tuple[str, bytes], ...] = ()  # a seen or echo message: (member, digest)
    stats: Stats | None = None  # a stats message's values
    norm_range: bool | None = None  # a norm message's vote: True = fall back to range scaling
    secagg: SecAgg | None = None  # a deal (opened) or secagg message (gossip.bodies)

    @property
    def round(self) -> int:
        return self.envelope.round


def signing_digest(consortium_id: bytes, sender: bytes, kind: str, round_: int, seq: int,
                   body: bytes | Sequence[bytes]) -> bytes:
    parts = _parts(body)
    # A small Packer: packb's default 256 KiB buffer would be most of what rejecting a
    # small message costs.
    header = msgpack.Packer(buf_size=256).pack([PROTO, consortium_id, sender, kind, round_,
                                                seq, sum(len(p) for p in parts)])
    h = hashlib.blake2b(SIG_TAG, digest_size=32)
    h.update(header)
    for part in parts:
        h.update(part)
    return h.digest()


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header, as packb writes it."""
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 2**32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise LocalError(f"body of {n} bytes is beyond msgpack's bin 32")


def _parts(body: bytes | Sequence[bytes]) -> Sequence[bytes]:
    return [body] if isinstance(body, bytes | bytearray | memoryview) else body


def pack(signing_key: SigningKey, consortium_id: bytes, kind: str, round_: int, seq: int,
         body: bytes | Sequence[bytes]) -> bytes:
    """Sign and frame a message. Raises LocalError on our own misuse.

    `body` may come in parts (a sealed body: header, ciphertext): they are hashed
    and written out in order, exactly as if joined, without a copy of the joined
    body. The bytes are the same msgpack that `msgpack.packb` gives for the array."""
    if kind not in KINDS:
        raise LocalError(f"unknown message kind {kind!r}")
    if len(consortium_id) != CONSORTIUM_ID_BYTES:
        raise LocalError("consortium id must be 32 bytes")
    for label, value in (("round", round_), ("seq", seq)):
        if not 0 <= value < MAX_COUNTER:
            raise LocalError(f"{label} {value} out of range [0, 2**53)")
    sender = bytes(signing_key.verify_key)
    parts = _parts(body)
    digest = signing_digest(consortium_id, sender, kind, round_, seq, parts)
    sig = signing_key.sign(digest).signature
    packer = msgpack.Packer(use_bin_type=True, buf_size=256)
    head = [packer.pack_array_header(OUTER_ITEMS)]
    head += [packer.pack(x) for x in (PROTO, consortium_id, sender, kind, round_, seq)]
    head.append(_bin_header(sum(len(p) for p in parts)))
    return b"".join([*head, *parts, packer.pack(sig)])


class _Outer:
    """A parsed envelope whose body is still a read-only view of the received bytes.

    The verifier works on this one, so nothing of the body is copied before the
    signature and the body's own checks have passed; `envelope()` copies it once."""

    __slots__ = ("consortium_id", "sender", "kind", "round", "seq", "body", "sig")

    def __init__(self, consortium_id: bytes, sender: bytes, kind: str, round_: int, seq: int,
                 body: memoryview, sig: bytes) -> None:
        self.consortium_id = consortium_id
        self.sender = sender
        self.kind = kind
        self.round = round_
        self.seq = seq
        self.body = body
        self.sig = sig

    @property
    def digest(self) -> bytes:
        return signing_digest(self.consortium_id, self.sender, self.kind, self.round, self.seq,
                              self.body)

    def envelope(self, body: bytes | None = None, digest: bytes | None = None) -> Envelope:
        """The public Envelope; `body` if the caller already holds the body's bytes,
        `digest` if it has hashed them already."""
        env = Envelope(self.consortium_id, self.sender, self.kind, self.round, self.seq,
                       bytes(self.body) if body is None else body, self.sig)
        if digest is not None:
            env.__dict__["digest"] = digest  # the cached_property's slot
        return env


def decode_outer(data: bytes, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse the outer array with limits. Checks form only, not trust."""
    return _parse_outer(data, max_bytes).envelope()


def _parse_outer(data: bytes | bytearray | memoryview, max_bytes: int) -> _Outer:
    """Read the outer array field by field: each field's type and declared size are
    checked before anything is taken for it, so a hostile input costs time linear in
    the bytes read and no memory beyond a few small fields (the body stays a view)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteError("malformed", f"expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise RemoteError("too_large", f"{size} bytes exceeds the cap of {max_bytes}")
    try:
        r = Reader(data)
        if r.array_header() != OUTER_ITEMS:
            raise RemoteError("malformed", f"expected an array of {OUTER_ITEMS} items")
        t = r.peek_type()
        if t == "str":
            proto = r.str_bytes()
        elif t == "bin":  # not ours; its first bytes may still say whose it is
            proto = r.bin()
        else:
            raise RemoteError("protocol", f"protocol tag is a {t}, we speak {PROTO!r}")
        if proto != _PROTO_BYTES:
            raise RemoteError("protocol", f"protocol tag {shorten(bytes(proto[:SHORT]))}"
                              f"{' (cut)' if len(proto) > SHORT else ''}, we speak {PROTO!r}")
        cid = _bin_field(r, CONSORTIUM_ID_BYTES, "consortium id")
        sender = _bin_field(r, PUBLIC_KEY_BYTES, "sender key")
        t = r.peek_type()
        if t != "str":
            raise RemoteError("kind", f"message kind is a {t}, not a str")
        raw_kind = r.str_bytes()
        kind = _KINDS_BY_BYTES.get(bytes(raw_kind)) if len(raw_kind) <= MAX_OUTER_STR else None
        if kind is None:
            raise RemoteError("kind", f"unknown message kind {shorten(bytes(raw_kind[:SHORT]))}")
        counters = []
        for label in ("round", "seq"):
            try:
                counters.append(r.uint(MAX_COUNTER))
            except WireError:
                raise RemoteError("malformed",
                                  f"{label} is not an integer in [0, 2**53)") from None
        try:
            body = r.bin()
        except WireError as exc:
            raise RemoteError("malformed", f"body: {exc}") from None
        sig = _bin_field(r, SIGNATURE_BYTES, "signature")
        r.done()
    except WireError as exc:
        raise RemoteError("malformed", f"outer decode failed: {exc}") from None
    return _Outer(cid, sender, kind, counters[0], counters[1], body, sig)


def _bin_field(r: Reader, size: int, label: str) -> bytes:
    try:
        return bytes(r.bin(exact=size))
    except WireError:
        raise RemoteError("malformed", f"{label} is not {size} bytes") from None


@dataclass
class _SenderWindow:
    highest: int = -1
    seen: dict[int, bytes] = field(default_factory=dict)  # seq -> digest

    def remember(self, seq: int, digest: bytes) -> None:
        self.seen[seq] = digest
        if seq > self.highest:
            self.highest = seq
            floor = self.highest - REPLAY_WINDOW
            for old in [s for s in self.seen if s <= floor]:
                del self.seen[old]


class Verifier:
    """Checks incoming envelopes for one node. Pure state, no I/O.

    `members` maps each member's public key to its name. The replay table can
    be exported into a checkpoint and restored, so a restart does not reopen
    the window to replays.
    """

    def __init__(self, consortium_id: bytes, members: Mapping[bytes, str], own_key: bytes,
                 spec: Sequence[TensorSpec], max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
                 sealing: Sealing | None = None, stats_columns: int | None = None,
                 codec: Codec = NO_COMPRESSION,
                 base: Callable[[str], np.ndarray] | None = None, secure: bool = False
                 ) -> None:
        self.consortium_id = consortium_id
        # The consortium's round kind ([rules] secure, node/strategy/consortium_rules.py):
        # a secure consortium's contributions come only as "deal"/"secagg" messages, a
        # plain one's only as "share"/"sealed"; the other kinds are refused (`wrong_kind`),
        # so that no member's correctly signed message of the other mode reaches a round
        # that has no place for it (a deal filed as a plain share has no tensors).
        self.secure = secure
        # The consortium's agreed compression (gossip/compress.py): a share declaring
        # another is refused (`codec`); a compressed share is read on top of `base(name)`,
        # this node's model tensor as it is when the share is combined.
        self.codec = codec
        self.base = base
        # Numeric columns of a federated-normalization schema (None: stats are refused).
        self.stats_columns = stats_columns
        # With sealing on, shares must come sealed and are opened here, after
        # the signature and freshness checks; without it a sealed share is refused.
        self.sealing = sealing
        self.members = dict(members)
        self.own_key = own_key
        self.spec = tuple(spec)
        # The model's values (d of a secure round's pieces: bodies.secagg_piece_limits);
        # None without a spec (a verifier for control messages only).
        self._dim = sum(math.prod(t.shape) for t in self.spec) if self.spec else None
        self.max_bytes = max_bytes
        self._windows: dict[bytes, _SenderWindow] = {}

    def verify(self, data: bytes, current_round: int, peer_hint: str | None = None) -> Accepted:
        """Accept a message or raise RemoteError naming the reason; nothing else escapes.

        The body is read from `data` in place and copied once, into the accepted
        Envelope, after every check has passed: rejecting any input costs at most
        about twice its size (a sealed body's plaintext) and time linear in it."""
        env = _parse_outer(data, self.max_bytes)
        if env.consortium_id != self.consortium_id:
            raise RemoteError(
                "consortium",
                f"its consortium id {env.consortium_id.hex()[:16]}… differs from ours "
                f"{self.consortium_id.hex()[:16]}…: the member lists or the feature schemas "
                "differ (compare `flnode consortium show FILE` on both sides)",
                peer_hint,
            )
        if env.sender == self.own_key:
            raise RemoteError("from_self", "a message signed with our own key came back", peer_hint)
        name = self.members.get(env.sender)
        if name is None:
            raise RemoteError("non_member", f"sender key {env.sender.hex()[:16]}… is not on the "
                              "consortium's peer list", peer_hint)
        digest = env.digest
        try:
            VerifyKey(env.sender).verify(digest, env.sig)
        except BadSignatureError:
            raise RemoteError("bad_signature", "signature does not verify", name) from None
        self._check_kind(env.kind, name)
        try:
            self._check_fresh(env, name, digest, current_round)
        except RemoteError as exc:
            if (exc.reason in ("duplicate", "replay") and env.kind == KIND_PREKEY
                    and self.sealing is not None):
                # Signed by the member: learning from it again is harmless (learn() never
                # lets an older message override a newer one), and a restarted node,
                # which keeps its replay table but not the members' prekeys, needs
                # exactly this copy, which may be old: a reply re-sends the announcement
                # made at the member's last rotation.
                self._learn_prekeys(env, name, current_round)
            raise
        share, prekeys, hello, body, seen, stats = None, (), False, None, (), None
        norm_range, secagg = None, None
        if env.kind == KIND_SEEN:
            seen = decode_seen(env.body, self.members, name)
        elif env.kind == KIND_ECHO:
            seen = decode_echo(env.body, self.members, name)
        elif env.kind == KIND_STATS:
            stats = decode_stats(env.body, self.stats_columns, name)
        elif env.kind == KIND_NORM:
            norm_range = decode_norm(env.body, self.stats_columns is not None, name)
        elif env.kind == KIND_FINAL:
            if len(env.body) != DIGEST_BYTES:
                raise RemoteError("bad_body", f"a final message's body is a {DIGEST_BYTES}-byte "
                                  f"model digest, not {len(env.body)} bytes", name)
        elif env.kind == KIND_RETIRE:
            if len(env.body):
                raise RemoteError("bad_body", "a retire message has an empty body", name)
        elif env.kind == KIND_HELLO:
            if bytes(env.body[:2]) not in (HELLO_ASK, HELLO_REPLY):
                raise RemoteError("bad_body", "a hello's body is one byte, 0 (ask) or 1 "
                                  "(reply)", name)
            hello = bytes(env.body) == HELLO_ASK
        elif env.kind == KIND_PREKEY:
            prekeys, hello = self._learn_prekeys(env, name, current_round)
        elif env.kind == KIND_SECAGG:
            secagg = decode_secagg(env.body, len(self.members), name, dim=self._dim)
        elif env.kind == KIND_DEAL:
            secagg = self._open_deal(env, name)
        else:
            share, body = self._decode(env, name)
        self._windows.setdefault(env.sender, _SenderWindow()).remember(env.seq, digest)
        return Accepted(name, env.envelope(body, digest), share, prekeys, hello, seen, stats,
                        norm_range, secagg)

    def _check_kind(self, kind: str, name: str) -> None:
        """Refuse a contribution kind of the other round mode (`wrong_kind`): the sender
        signed it, so the sender is at fault (or runs with other [rules])."""
        if kind in SECURE_KINDS and not self.secure:
            raise RemoteError("wrong_kind", f"a secure-aggregation {kind!r} message, but this "
                              "consortium's [rules] have no secure = true: its rounds take "
                              "only shares", name)
        if kind in SHARE_KINDS and self.secure:
            raise RemoteError("wrong_kind", f"a plain {kind!r} message, but this consortium's "
                              "[rules] say secure = true: its rounds take only deals and "
                              "secagg pieces", name)

    def _open_deal(self, env: _Outer, name: str) -> SecAgg:
        """A deal: sealed to us (never readable on the wire), then its frame checked."""
        if self.sealing is None:
            raise RemoteError("seal_off", "a secure-aggregation deal, but this node does not "
                              "seal (gossip.seal = \"off\"): secure rounds need sealing", name)
        try:
            plain = self.sealing.open_deal(env.body, env.sender, env.round, name)  # one wrap
        except RemoteError as exc:
            raise RemoteError(exc.reason, exc.detail, name, env.round if exc.reason ==
                              "no_prekey" else None) from None
        return decode_secagg(plain, len(self.members), name, deal=True, dim=self._dim)

    def _learn_prekeys(self, env: _Outer, name: str, current_round: int
                       ) -> tuple[tuple[SignedPrekey, ...], bool]:
        """Check a prekey message's prekeys and, when sealing, file them."""
        announced, hello = decode_announcement(env.body, self.consortium_id, env.sender,
                                               self.members)
        if self.sealing is not None:
            self.sealing.learn(name, announced, current_round, env.seq)
        return tuple(announced), hello

    def _decode(self, env: _Outer, name: str) -> tuple[Share, bytes | None]:
        """The share, and the body's bytes when the tensors are views of them (a plain
        share: copied once from the input, then decoded in place)."""
        body: bytes | memoryview = env.body
        kept = None
        if env.kind == KIND_SEALED:
            if self.sealing is None:
                raise RemoteError("seal_off", "a sealed share, but this node does not seal "
                                  "(gossip.seal = \"off\"): the members' configs differ", name)
            try:
                body = self.sealing.open(body, env.sender, env.round, name)
            except RemoteError as exc:
                if exc.reason == "no_prekey":  # authentic, just not for us: say whose round
                    raise RemoteError(exc.reason, exc.detail, name, env.round) from None
                raise
        elif self.sealing is not None:
            raise RemoteError("unsealed", "a plain share, but this node requires sealed shares "
                              "(gossip.seal): the sender's config differs, and its share crossed "
                              "the wire readable", name)
        else:
            body = kept = bytes(env.body)
        try:
            return decode_share(body, self.spec, self.codec, self.base), kept
        except RemoteError as exc:
            raise RemoteError(exc.reason, exc.detail, name) from None

    def _check_fresh(self, env: _Outer, name: str, digest: bytes, current_round: int) -> None:
        window = self._windows.get(env.sender)
        if window is not None:
            known = window.seen.get(env.seq)
            if known == digest:
                raise RemoteError("duplicate", f"seq {env.seq} already accepted", name)
            if known is not None:
                raise RemoteError("seq_reuse", f"seq {env.seq} was already used for other "
                                  "content (the sender equivocates or its state was reset)", name)
            if env.seq <= window.highest - REPLAY_WINDOW:
                raise RemoteError("replay", f"seq {env.seq} is older than the replay window "
                                  f"(newest {window.highest})", name)
        if env.round < current_round and (env.kind in SHARE_KINDS or env.kind == KIND_DEAL):
            raise RemoteError("stale", f"share for round {env.round}, we are at round "
                              f"{current_round}", name)

    # --- checkpointing of the replay table ---------------------------------
    def export_state(self) -> dict[str, dict[str, object]]:
        return {
            key.hex(): {"highest": w.highest, "seen": {str(s): d.hex() for s, d in w.seen.items()}}
            for key, w in self._windows.items()
        }

    def load_state(self, state: Mapping[str, Mapping[str, object]]) -> None:
        self._windows = {}
        for key_hex, w in state.items():
            window = _SenderWindow(highest=int(w["highest"]))  # type: ignore[arg-type]
            seen = w["seen"]
            assert isinstance(seen, Mapping)
            window.seen = {int(s): bytes.fromhex(d) for s, d in seen.items()}
            self._windows[bytes.fromhex(key_hex)] = window

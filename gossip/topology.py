"""Who a member sends its share to, and waits for, in each round: the consortium's
agreed topology (its [rules] `topology`, pinned with the id). Pure: no I/O, no clock.

    topology = "full"           # everyone to everyone (the default; a file without the key)
    topology = "ring"           # to, and from, the two members beside it on the ring of
                                # the sorted member keys (one with two members)
    topology = "k-regular:4"    # a fixed random k-regular graph: the same k neighbours
                                # every round, drawn once from the consortium id
    topology = "random-out:8"   # to s peers drawn anew each round (Epidemic Learning,
                                # de Vos et al. 2023); waits for whoever drew it
    topology = "exponential"    # one-peer exponential graph: in round r, to the member
                                # 2^(r mod ceil(log2 n)) places on, from the one as far back

Members are the sorted member keys (any strings that sort the same at every member: the
public keys' hex); the seed is the consortium id. Every draw comes from SHA-256 over
(domain tag, seed, what is drawn), never from Python's `random` (whose algorithms may
change between versions): every member computes everyone's peers, identically, so a
member knows whose share to wait for in a round (`in_peers`) without being told.

k-regular is a circulant graph on a permutation of the members drawn from the seed:
member at position i of the permutation is joined to positions i +- 1 .. i +- k//2 and,
for odd k, to i + n/2. It is k-regular and connected (it contains the ring of the
permutation); not uniformly drawn among all k-regular graphs, which no member needs.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gossip.errors import LocalError

FULL, RING, K_REGULAR, RANDOM_OUT, EXPONENTIAL = (
    "full", "ring", "k-regular", "random-out", "exponential")
KINDS = (FULL, RING, K_REGULAR, RANDOM_OUT, EXPONENTIAL)
# A degree above this is refused when the spec is parsed: beyond it a sparse topology
# saves nothing a consortium would notice, and the bound keeps a hostile file's number
# from sizing any loop (it also bounds the members a consortium file can list).
MAX_DEGREE = 10_000
# The longest spec string accepted (k-regular:10000 is 15 characters).
MAX_SPEC_CHARS = 32
DRAW_TAG = b"flnode/1 topology\x00"  # domain tag of every draw (module docstring)
_SPEC = re.compile(r"(full|ring|exponential)|(k-regular|random-out):([1-9][0-9]{0,4})")
# Rounds of random-out in-peers kept (each: n members' draws); a driver asks for the
# current round and maybe the next.
RANDOM_OUT_CACHE_ROUNDS = 4


@dataclass(frozen=True)
class TopologySpec:
    """A parsed spec string: its kind and degree (None for full, ring, exponential)."""

    kind: str
    degree: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.degree is None else f"{self.kind}:{self.degree}"

    @property
    def full(self) -> bool:
        return self.kind == FULL


def parse_topology(text: object, where: str = "topology") -> TopologySpec:
    """`text` checked: one of the module docstring's forms, exactly; else a LocalError
    naming `where` and what is accepted."""
    if not isinstance(text, str) or len(text) > MAX_SPEC_CHARS:
        raise LocalError(f"{where}: {str(text)[:MAX_SPEC_CHARS]!r} is not a topology: say full, "
                         "ring, exponential, k-regular:K or random-out:S")
    m = _SPEC.fullmatch(text)
    if m is None:
        raise LocalError(f"{where}: {text!r} is not a topology: say full, ring, exponential, "
                         "k-regular:K or random-out:S (K, S a whole number from 1)")
    if m.group(1):
        return TopologySpec(m.group(1))
    degree = int(m.group(3))
    if degree > MAX_DEGREE:
        raise LocalError(f"{where}: {text!r}: the degree is at most {MAX_DEGREE}")
    return TopologySpec(m.group(2), degree)


def _stream(seed: bytes, *label: object) -> Iterable[int]:
    """64-bit words from SHA-256 in counter mode over (tag, seed, label)."""
    head = DRAW_TAG + seed + b"\x00" + "\x00".join(str(x) for x in label).encode() + b"\x00"
    counter = 0
    while True:
        block = hashlib.sha256(head + counter.to_bytes(8, "big")).digest()
        for i in range(0, 32, 8):
            yield int.from_bytes(block[i:i + 8], "big")
        counter += 1


def _below(words: Iterable[int], bound: int) -> int:
    """A uniform integer in [0, bound) from the stream (rejection: no modulo bias)."""
    limit = (1 << 64) - (1 << 64) % bound
    for w in words:
        if w < limit:
            return w % bound
    raise AssertionError("unreachable: the stream is endless")


def _shuffled(n: int, words: Iterable[int]) -> list[int]:
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = _below(words, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def _sample(n: int, s: int, skip: int, words: Iterable[int]) -> list[int]:
    """s distinct indices of range(n) other than `skip` (partial Fisher-Yates)."""
    pool = [i for i in range(n) if i != skip]
    for i in range(s):
        j = i + _below(words, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:s])


@dataclass
class Topology:
    """The agreed topology over `members` (sorted here), seeded by the consortium id.
    `out_peers(m, r)`: whom m sends its round-r share to; `in_peers(m, r)`: whose round-r
    shares m waits for. Both exclude m; with `full` both are every other member."""

    spec: TopologySpec
    members: tuple[str, ...]
    seed: bytes
    _index: dict[str, int] = field(init=False, repr=False)
    _static: list[tuple[int, ...]] | None = field(init=False, repr=False, default=None)
    _drawn: dict[int, tuple[list[list[int]], list[list[int]]]] = field(
        init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.members = tuple(sorted(set(self.members)))
        self._index = {m: i for i, m in enumerate(self.members)}
        n, d = len(self.members), self.spec.degree
        if d is not None and d > n - 1:
            raise LocalError(f"topology {self.spec.name}: {n} members give each at most "
                             f"{n - 1} peers; say at most {self.spec.kind}:{max(n - 1, 1)}, "
                             "or full")
        if self.spec.kind == K_REGULAR:
            assert d is not None
            if d % 2 and n % 2:
                raise LocalError(f"topology {self.spec.name}: an odd k needs an even number "
                                 f"of members ({n}): take k = {d - 1} or {d + 1}")
            if d == 1 and n > 2:
                raise LocalError(f"topology {self.spec.name}: one neighbour each splits {n} "
                                 "members into pairs that never hear each other: take k >= 2")
            self._static = self._k_regular(n, d)
        elif self.spec.kind == RING:
            self._static = [tuple(sorted({(i - 1) % n, (i + 1) % n} - {i})) for i in range(n)]

    @property
    def size(self) -> int:
        return len(self.members)

    def out_peers(self, member: str, round_: int) -> tuple[str, ...]:
        return tuple(self.members[j] for j in self._out(self._at(member), round_))

    def in_peers(self, member: str, round_: int) -> tuple[str, ...]:
        return tuple(self.members[j] for j in self._in(self._at(member), round_))

    def _at(self, member: str) -> int:
        try:
            return self._index[member]
        except KeyError:
            raise LocalError(f"{member!r} is not a member of the topology's consortium") from None

    def _out(self, i: int, r: int) -> tuple[int, ...] | list[int]:
        n, kind = self.size, self.spec.kind
        if kind == FULL:
            return tuple(j for j in range(n) if j != i)
        if self._static is not None:
            return self._static[i]
        if kind == EXPONENTIAL:
            hop = self._hop(r)
            return () if hop == 0 else ((i + hop) % n,)
        return self._draw(r)[0][i]

    def _in(self, i: int, r: int) -> tuple[int, ...] | list[int]:
        n, kind = self.size, self.spec.kind
        if kind == FULL or self._static is not None:  # symmetric graphs
            return self._out(i, r)
        if kind == EXPONENTIAL:
            hop = self._hop(r)
            return () if hop == 0 else ((i - hop) % n,)
        return self._draw(r)[1][i]

    def _hop(self, r: int) -> int:
        n = self.size
        if n < 2:
            return 0
        period = max(1, math.ceil(math.log2(n)))
        return (1 << (r % period)) % n

    def _draw(self, r: int) -> tuple[list[list[int]], list[list[int]]]:
        got = self._drawn.get(r)
        if got is None:
            n, s = self.size, self.spec.degree
            assert s is not None
            outs = [_sample(n, s, i, _stream(self.seed, RANDOM_OUT, r, self.members[i]))
                    for i in range(n)]
            ins: list[list[int]] = [[] for _ in range(n)]
            for i, out in enumerate(outs):  # i ascending: every in-list comes out sorted
                for j in out:
                    ins[j].append(i)
            if len(self._drawn) >= RANDOM_OUT_CACHE_ROUNDS:
                self._drawn.pop(min(self._drawn))
            got = self._drawn[r] = (outs, ins)
        return got

    def _k_regular(self, n: int, k: int) -> list[tuple[int, ...]]:
        order = _shuffled(n, _stream(self.seed, K_REGULAR, k))
        peers: list[set[int]] = [set() for _ in range(n)]
        hops = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
        for pos in range(n):
            for hop in hops:
                a, b = order[pos], order[(pos + hop) % n]
                peers[a].add(b)
                peers[b].add(a)
        return [tuple(sorted(p)) for p in peers]


# Topologies built lately, kept by (spec, members, seed) and shared: every node of an
# in-process simulation builds the same one, and each drawing every member's random-out
# peers for itself made a round cost n^2 draws (docs/results/scale.md). A topology is a
# pure function of its key (its draw cache included), so sharing it changes no answer.
BUILT_KEEP = 4
_built: dict[tuple[TopologySpec, tuple[str, ...], bytes], Topology] = {}


def build_topology(spec: TopologySpec | str, members: Iterable[str], seed: bytes) -> Topology:
    """The topology `spec` over `members`, drawn from `seed` (the consortium id)."""
    parsed = spec if isinstance(spec, TopologySpec) else parse_topology(spec)
    key = (parsed, tuple(sorted(set(members))), bytes(seed))
    got = _built.get(key)
    if got is None:
        got = Topology(parsed, key[1], key[2])
        if len(_built) >= BUILT_KEEP:
            _built.pop(next(iter(_built)))
        _built[key] = got
    return got


def neighbourhood(spec: TopologySpec | str, members: int) -> int:
    """How many shares a member combines in a round, its own included (on average, for
    random-out): what the rule's defaults (f, the weight cap) are sized for. Full: all."""
    parsed = spec if isinstance(spec, TopologySpec) else parse_topology(spec)
    if parsed.full:
        return members
    per_round = {RING: 2, EXPONENTIAL: 1}.get(parsed.kind, parsed.degree or 0)
    return min(members, 1 + per_round)

"""A fake driver for the round machine (gossip/protocol): no transport, disk, torch or
clock. Messages are `Accepted` values built directly (the machine trusts the verifier,
which has its own tests); time is whatever the test says."""

from __future__ import annotations

import numpy as np

from gossip.bodies import Share, Stats
from gossip.envelope import (
    HELLO_ASK,
    HELLO_REPLY,
    KIND_FINAL,
    KIND_HELLO,
    KIND_PREKEY,
    KIND_RETIRE,
    KIND_SEEN,
    KIND_SHARE,
    KIND_STATS,
    Accepted,
    Envelope,
)
from gossip.protocol import (
    Close,
    PhaseSpec,
    Released,
    RoundBook,
    RoundMachine,
    RoundParams,
    SendShare,
    Signed,
    Train,
)

CID = b"c" * 32
SIG = b"s" * 64


def names(n: int) -> list[str]:
    return [f"bank-{i}" for i in range(n)]


def key(member: str) -> bytes:
    return member.encode().ljust(32, b"\0")


def own_digest(r: int) -> bytes:
    """The digest of the Driver's own share for round r (32 bytes, as a real one)."""
    return (b"own-%d" % r).ljust(32, b"\0")


def accepted(sender: str, kind: str, r: int, body: bytes = b"", seq: int = 0, **kw) -> Accepted:
    env = Envelope(CID, key(sender), kind, r, seq, body, SIG)
    share = Share(1.0, {}) if kind == KIND_SHARE else None
    return Accepted(sender, env, share, **kw)


def share(sender: str, r: int, body: bytes = b"v1", seq: int = 0) -> Accepted:
    return accepted(sender, KIND_SHARE, r, body, seq)


def hello(sender: str, r: int, ask: bool = False, seq: int = 0) -> Accepted:
    return accepted(sender, KIND_HELLO, r, HELLO_ASK if ask else HELLO_REPLY, seq, hello=ask)


def prekey(sender: str, r: int, ask: bool = False) -> Accepted:
    return accepted(sender, KIND_PREKEY, r, b"prekeys", hello=ask)


def retire(sender: str, r: int) -> Accepted:
    return accepted(sender, KIND_RETIRE, r)


def seen(reporter: str, r: int, pairs: list[tuple[str, bytes]], seq: int = 0) -> Accepted:
    return accepted(reporter, KIND_SEEN, r, b"report", seq, seen=tuple(pairs))


def final(sender: str, r: int, digest: bytes) -> Accepted:
    return accepted(sender, KIND_FINAL, r, digest)


def stats(sender: str, rows: float, seq: int = 0) -> Accepted:
    values = Stats(rows, np.zeros(1), np.zeros(1))
    return accepted(sender, KIND_STATS, 0, str(rows).encode(), seq, stats=values)


class Driver:
    """Carries out the machine's actions the way Node would, minus the I/O: a Train is
    answered by a release, a SendShare by a signature, a Close by the used shares. Every
    action is kept (`actions`), closes apart (`closes`)."""

    def __init__(self, n: int = 3, *, me: str = "bank-0", current: int = 0, rounds: int = 3,
                 deadline: float = 10.0, absent_after: int = 1, min_members="majority",
                 restarted: bool = False, lookahead: int = 3, phases=None, auto: bool = True,
                 outcome: str = "new", share_of=None, **kw) -> None:
        members = names(n)
        self.book = RoundBook([m for m in members if m != me], lookahead, current)
        params = RoundParams(rounds, deadline, absent_after, min_members)
        self.m = RoundMachine(me, members, self.book, params, keys={m: key(m) for m in members},
                              restarted=restarted, phases=phases or (PhaseSpec("share"),), **kw)
        self.auto = auto
        self.share_of = share_of  # round -> our share's Accepted (its digest is what we sign)
        self.outcome = outcome
        self.actions: list = []
        self.closes: list[Close] = []
        self.now = 0.0
        self.seq = 1000
        # a secure round's driver: round -> who took part (closed with no share used)
        self.took_part: dict[int, set[str]] = {}

    def at(self, now: float) -> Driver:
        assert now >= self.now, "time goes forward"
        self.now = now
        return self

    def run(self, actions: list) -> list:
        queue, seen_ = list(actions), []
        while queue:
            a = queue.pop(0)
            self.actions.append(a)
            seen_.append(a)
            if not self.auto:
                continue
            if isinstance(a, Train):
                own = (0, own_digest(a.round), SIG) if self.outcome == "stored" else None
                queue += self.m.released(Released(a.round, self.outcome, own=own), self.now)
            elif isinstance(a, SendShare) and not a.stored:
                self.seq += 1
                own = (self.seq, own_digest(a.round), SIG)
                if self.share_of is not None:
                    env = self.share_of(a.round).envelope
                    own = (env.seq, env.digest, env.sig)
                queue += self.m.signed(Signed(a.round, own), self.now)
            elif isinstance(a, Close):
                self.closes.append(a)
                took = self.took_part.get(a.round)
                used = dict(a.shares) if took is None else {}
                queue += self.m.closed(a.round, used, self.now, took)
        return seen_

    def start(self) -> list:
        return self.run(self.m.start(self.now))

    def recv(self, acc: Accepted, token=None, data: bytes = b"") -> list:
        return self.due(self.run(self.m.receive(acc, self.now, data=data, token=token)))

    def due(self, seen_: list) -> list:
        """As Node's loop: a tick once the machine's next deadline is now (the start
        barrier is decided on a tick, after the messages that came together)."""
        nd = self.m.next_deadline
        return seen_ + (self.tick() if nd is not None and nd <= self.now else [])

    def tick(self, now: float | None = None) -> list:
        if now is not None:
            self.at(now)
        return self.run(self.m.tick(self.now))

    def of(self, cls, actions=None) -> list:
        return [a for a in (self.actions if actions is None else actions) if isinstance(a, cls)]

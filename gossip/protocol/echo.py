"""The digest echo: members agree on which shares they aggregate (issue 19 item 2). Pure.

A round with phases (SHARE, ECHO) runs like this. The share phase closes by today's rule
(all / moved on / absent / deadline); the shares the book then holds for round r, and our
own release, are what we *hold*: sender -> the envelope digest of its share. Each member
sends one signed echo (kind "echo", round r, gossip/bodies.py `encode_echo`) naming every
(sender, digest) it holds, its own share included, and omitting a sender whose share it
lacks or of whom it holds two different signed shares (the book's proven equivocation).
The machine collects its phase peers' echoes (the first per member and round; a second,
different one is an echo equivocation: refused, both signed echoes kept as its proof)
until all came or the phase deadline passed (counted from our share deadline, since a
peer may collect shares until about then); then `agree` decides, from the echoes alone
(ours included), which shares enter. `Close.shares` is that set; `Close.echo` says who was
excluded and why, whose echo was disregarded and whose never came.

The rule, for a view V = our echo and every peer echo that came, and f = `faulty` (the
number of members whose echoes may lie; the wiring passes the consortium's f):

1. For each sender X named in V, X's *majority value* is the value (a digest, or
   "omitted") that more than half of V's echoes give for X, if one does.
2. An echo *disputes* X when a majority value exists and the echo gives another. An echo
   disputing more than f senders is *disregarded* ("disputes"): one lying echo can cost
   at most f shares. Ours is judged the same way (the others judge it so).
3. Over the echoes left (regarded), X's share is excluded when they name two or more
   digests for X ("conflict": split equivocation, or a lie), or name a digest while some
   omit X ("unconfirmed": someone missed it, or says so). Otherwise, if they all name one
   digest d, X's share enters iff we hold d; if we do not ("not_held": our echo was
   disregarded, we missed it), we cannot combine it, and our set differs from the
   others' by that share (fetching it is out of scope).

What is proof and what is a claim. A share envelope is signed by its sender: proof of
what the sender signed. An echo is signed by the echoer: proof of what the echoer *said*,
a claim about the others. Two different signed shares of X for one round held by one
member are a proof (the book's `Equivocation`, kept as today). A split equivocation
(one share to some members, another to the rest) is seen here as a conflict between
echoes: each member holds one of X's envelopes and the others' signed claims; `Exclusion`
carries our envelope of X (`held`) and the signed echoes that disagree with it
(`claims`): the driver keeps them as the seen mismatch's evidence is kept (a claim
counted under the echoer, never as proof against X). One exception is a proof: X's own
echo naming for X a digest other than the one of X's share envelope we hold (`proof`:
both signed by X for round r). Two different echoes by one member for one round are a
proof of echo equivocation (same kind and round: node/evidence.py can keep and verify
them as it does shares).

What is guaranteed. Assume n > 2f, at most f members faulty, (a) every honest member's
share and echo reach every honest member before the share and echo deadlines, and (b)
each faulty member sends the same echo to every honest member (in time), or to none. Then every
honest member has the same view V; no honest echo is disregarded (an honest echo can
differ from a majority only on faulty senders, at most f; an honest sender's one digest
is held by all honest members, a majority); so every honest member computes the same
decision and holds every share that enters (its regarded echo names it): **all honest
members aggregate the same set**. **No equivocator's share enters** when two of its
digests reach honest members (both honest echoes are regarded: a conflict). **An honest
member's share is excluded only by a faulty echo disputing it, and each faulty echo
disputes at most f shares** (else it is disregarded everywhere); a faulty echo can never
make a share enter (entering needs every regarded echo, honest ones included).

What is not. Without (a) (asynchrony: a share or an echo lost or late past the deadline)
nothing is promised: the members decide on different views; `Close.echo.unheard` names
the echoes that never came, and the seen reports and final digests after the round show
the difference as today. The absence rule applies to echoes too: a phase peer whose echo
has not come by `absent_after` echo deadlines in a row is no longer waited for (the
phase closes without waiting for it; an echo of it that comes in time is still used)
until an echo of it is filed again; so a member that shares but never echoes costs one
echo deadline, not one per round. A member absent from the share phase (liveness.py) is
not waited for in the echo phase either. A peer that has moved past round r (a message
of a later round came) is still waited for if it was heard in r since its last start
(its share or prekeys of r): it echoed r before it left, and its later message can
overtake that echo on every transport; deciding without it would break (a) at one
member only. One never heard in r (it closed r before we were up, or restarted and
joined ahead) is not waited for (echo_due.py). A member whose echo is only sometimes in time is then
in the views of some members and not others: the same as (b) failing for it. Without (b)
(a faulty member sends different echoes, or its echo to some members only): the members
its echo reaches exclude up to f shares the others keep, per version of its echo; two
versions that meet at one member are its proof. An honest member that missed more than f
shares (loss) has its echo disregarded: it keeps fewer shares than the others
(`not_held`) rather than cutting their set down. With more than f faulty members,
colluders can push an honest echo past f disputes and hide a split from the rest: the
bound is f, as for the robust aggregation rules.

Cost: one more exchange per round, n x (n - 1) messages (one broadcast per member over
MQTT), each one Ed25519 signature (the sender) and n - 1 verifications (each receiver);
an echo of n entries is 69 n + about 162 bytes (each entry msgpack [bin 32, bin 32];
the envelope ~162 with 5-byte round and seq). n = 4: 439 B, 12 messages, 5.3 KB a round
for the consortium; n = 8: 715 B, 56 messages, 40 KB; n = 32: 2,373 B, 992 messages,
2.35 MB (73 KB sent by each member). And one more network delay before each close (at
most the echo deadline). Measured on the real node when the phase is wired.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gossip.bodies import encode_echo
from gossip.envelope import Accepted
from gossip.errors import LocalError
from gossip.protocol.echo_due import EchoDue

OMITTED = None  # the value of a sender an echo does not name
WHY = ("conflict", "unconfirmed", "not_held")


@dataclass(frozen=True)
class Exclusion:
    """Why sender `member`'s share stays out of the round: `why` (one of WHY), which
    regarded echoers named which digest and which omitted it; with the machine's
    envelopes: our `held` share envelope of the member (signed by it, if any), the signed
    echoes that disagree with it (`claims`) and `proof`: the member's own echo, when it
    names a digest other than `held`'s (both signed by the member)."""

    member: str
    why: str
    named: Mapping[bytes, tuple[str, ...]]
    omitted_by: tuple[str, ...]
    held: Accepted | None = None
    claims: tuple[Accepted, ...] = ()
    proof: Accepted | None = None


@dataclass(frozen=True)
class Agreement:
    """`agree`'s decision: sender -> digest that enters, the exclusions, the echoes
    disregarded (echoer -> the senders it disputed) and the phase peers whose echo never
    came (`unheard`)."""

    enter: Mapping[str, bytes]
    excluded: Mapping[str, Exclusion] = field(default_factory=dict)
    disregarded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unheard: tuple[str, ...] = ()


def agree(me: str, mine: Mapping[str, bytes], echoes: Mapping[str, Mapping[str, bytes]],
          faulty: int, expected: Iterable[str] = ()) -> Agreement:
    """The rule of the module docstring. `mine`: our echo (sender -> digest, our own share
    included); `echoes`: each peer's echo that came (the first); `faulty`: f; `expected`:
    the phase peers (for `unheard`). Deterministic: the same view gives the same result
    on every member, whatever the order the echoes came in."""
    if faulty < 0:
        raise LocalError(f"echo: faulty = {faulty}: must be >= 0")
    view: dict[str, Mapping[str, bytes]] = {**{e: dict(v) for e, v in echoes.items()},
                                            me: dict(mine)}
    senders = sorted({x for v in view.values() for x in v})
    majority: dict[str, bytes | None] = {}
    for x in senders:
        value, count = Counter(v.get(x) for v in view.values()).most_common(1)[0]
        if 2 * count > len(view):
            majority[x] = value
    disputed = {e: tuple(x for x in senders if x in majority and v.get(x) != majority[x])
                for e, v in view.items()}
    disregarded = {e: d for e, d in sorted(disputed.items()) if len(d) > faulty}
    regarded = {e: v for e, v in view.items() if e not in disregarded}
    enter: dict[str, bytes] = {}
    excluded: dict[str, Exclusion] = {}
    for x in senders:
        named: dict[bytes, list[str]] = {}
        omitted = []
        for e in sorted(regarded):
            d = regarded[e].get(x)
            if d is OMITTED:
                omitted.append(e)
            else:
                named.setdefault(d, []).append(e)
        if not named:  # only disregarded echoes name it
            if x in mine:
                excluded[x] = Exclusion(x, "unconfirmed", {}, tuple(omitted))
            continue
        why = ("conflict" if len(named) > 1 else "unconfirmed" if omitted
               else None if mine.get(x) == next(iter(named)) else "not_held")
        if why is None:
            enter[x] = next(iter(named))
        else:
            excluded[x] = Exclusion(x, why, {d: tuple(es) for d, es in named.items()},
                                    tuple(omitted))
    unheard = tuple(sorted(set(expected) - set(echoes)))
    return Agreement(enter, excluded, disregarded, unheard)


def with_evidence(a: Agreement, held: Mapping[str, Accepted],
                  echoes: Mapping[str, Accepted]) -> Agreement:
    """Attach the signed envelopes to each exclusion: our share envelope of the member,
    the echoes that name another digest for it (claims), and the member's own echo
    if it contradicts the envelope we hold (proof)."""
    out = {}
    for x, ex in a.excluded.items():
        mine = held.get(x)
        digest = None if mine is None else mine.envelope.digest
        claims = () if digest is None else tuple(
            echoes[e] for e in sorted(echoes)
            if dict(echoes[e].seen).get(x) not in (OMITTED, digest))
        own = echoes.get(x)
        said = None if own is None else dict(own.seen).get(x)
        proof = own if digest is not None and said is not None and said != digest else None
        out[x] = Exclusion(ex.member, ex.why, ex.named, ex.omitted_by, mine, claims, proof)
    return Agreement(a.enter, out, a.disregarded, a.unheard)


class EchoState:
    """The machine's echo bookkeeping: the peers' echoes for the rounds in its window
    (the first per member and round), the members whose two different shares it holds,
    and, for the current round, what our echo named."""

    def __init__(self, me: str, members: Iterable[str], keys: Mapping[str, bytes],
                 faulty: int) -> None:
        if faulty < 0 or not set(members) <= set(keys):
            raise LocalError(f"the echo phase needs every member's key and faulty >= 0 "
                             f"(got {faulty})")
        self.me, self.keys, self.faulty = me, keys, faulty
        self.echoes: dict[tuple[int, str], Accepted] = {}  # (round, echoer) -> its echo
        self.proven: set[tuple[int, str]] = set()  # (round, member): two shares held
        self.held: dict[str, Accepted] = {}  # the shares our echo named (this round)
        self.mine: dict[str, bytes] = {}  # our echo: sender -> digest, our own included
        self.peers: tuple[str, ...] = ()
        self.missed: dict[str, int] = {}  # phase peer -> echo deadlines missed in a row
        self.silent: set[str] = set()  # not waited for until an echo of it is filed again
        self.due = EchoDue()  # whose echo is owed though it moved past the round

    def file(self, r: int, sender: str, acc: Accepted) -> None:
        """The first echo of `sender` for round r: kept; it is waited for again."""
        self.echoes[(r, sender)] = acc
        self.missed.pop(sender, None)
        self.silent.discard(sender)

    def ours(self, r: int, shares: Mapping[str, Accepted], own: bytes | None,
             peers: Iterable[str]) -> bytes:
        """Our echo's body for round r: every share held (not a proven equivocator's) and
        our own release's digest (`own`, None if we released nothing)."""
        self.peers = tuple(peers)
        self.held = {m: a for m, a in shares.items() if (r, m) not in self.proven}
        self.mine = {m: a.envelope.digest for m, a in self.held.items()}
        if own is not None:
            self.mine[self.me] = own
        return encode_echo([(self.keys[m], d) for m, d in sorted(self.mine.items())])

    def decide(self, r: int, absent_after: int = 1) -> tuple[dict[str, Accepted], Agreement]:
        """The shares that enter round r (our own aside) and the agreement; a phase peer
        whose echo did not come is counted (silent after `absent_after` in a row)."""
        got = {e: a for (x, e), a in self.echoes.items() if x == r}
        for p in set(self.peers) - set(got):
            self.missed[p] = self.missed.get(p, 0) + 1
            if self.missed[p] >= absent_after:
                self.silent.add(p)
        agreed = with_evidence(agree(self.me, self.mine, {e: dict(a.seen) for e, a in got.items()},
                                     self.faulty, self.peers), self.held, got)
        return {m: a for m, a in self.held.items() if m in agreed.enter}, agreed

    def forget_before(self, r: int) -> None:
        self.echoes = {k: v for k, v in self.echoes.items() if k[0] >= r}
        self.proven = {k for k in self.proven if k[0] >= r}
        self.due.forget_before(r)

"""What goes into the round machine and what comes out of it (frozen dataclasses).

Inputs are what the driver saw: a message the verifier accepted (`Accepted`, from
gossip.envelope, given to `RoundMachine.receive`), one it refused (`Rejected`), the
outcome of training (`Released`), our share signed (`Signed`), a message of a later
phase (`PhaseMessage`) and the time (every method takes `now`; `Tick` names the bare
passage of time for drivers that queue events).

Actions are what the driver must do, in the order returned. They are coarse: one
`Close` per round, one `Train` per round. Messages to sign are described (`Sign`:
kind, round, body; the driver's signer spends the sequence number), messages the driver
already holds are named (`Stored`). Nothing here holds a callable, a socket or a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gossip.bodies import Stats
from gossip.envelope import Accepted
from gossip.protocol.echo import Agreement

# (seq, digest, signature) of a signed envelope: what a seen report compares.
Signature = tuple[int, bytes, bytes]


# --- inputs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Rejected:
    """The verifier refused a message (a RemoteError): its reason, the member it names
    (`RemoteError.peer`), the round its valid signature proves (a share not sealed for
    us), the transport's unauthenticated label (`hint`, for the audit line only), the
    refused bytes' BLAKE2b-256 (hex) and the transport's ack token, if any."""

    reason: str
    detail: str
    peer: str | None
    signed_round: int | None = None
    hint: str | None = None
    digest: str = ""
    token: Any = None


@dataclass(frozen=True)
class Released:
    """The outcome of `Train(round)`: "stored" (the release kept from before a restart:
    re-sent as it is, `own` is its signature), "new" (a body ready to be packed),
    "non_finite" (nothing released; the round goes on with the others' shares) or
    "stopped" (the privacy budget is spent; `why` says so)."""

    round: int
    outcome: str
    own: Signature | None = None
    why: str = ""

    OUTCOMES = frozenset({"stored", "new", "non_finite", "stopped"})

    def __post_init__(self) -> None:
        if self.outcome not in self.OUTCOMES:
            raise ValueError(f"Released.outcome {self.outcome!r}: one of {sorted(self.OUTCOMES)}")


@dataclass(frozen=True)
class Signed:
    """Our share for `round` is packed, charged and stored (after `SendShare`): its
    signature, or None when nobody could be sealed for (nothing was sent). `dealt`: a
    secure round's deals went out (no signature to record: each member gets its own)."""

    round: int
    own: Signature | None
    dealt: bool = False


@dataclass(frozen=True)
class PhaseMessage:
    """A member's message for a later phase of a round (digest echo, masked shares...):
    verified by the driver, filed by the machine."""

    sender: str
    round: int
    phase: str
    body: bytes


@dataclass(frozen=True)
class Tick:
    now: float


# --- actions: messages -------------------------------------------------------------------
@dataclass(frozen=True)
class Sign:
    """A new message: the driver signs it with the next sequence number (fsync'd first)."""

    kind: str
    round: int
    body: bytes


@dataclass(frozen=True)
class Stored:
    """Bytes the driver already holds, sent exactly as first signed, if it has them:
    "announcement" (our current prekey message), "norm" (our vote), "stats"."""

    name: str


Message = Sign | Stored


@dataclass(frozen=True)
class Broadcast:
    message: Message
    what: str  # a label for the send task and the log


@dataclass(frozen=True)
class SendTo:
    peers: tuple[str, ...]
    message: Message
    what: str


@dataclass(frozen=True)
class RotatePrekeys:
    """Hold the prekeys round `round` may need; announce when they changed, and always
    with `hello` (at start: an announcement that asks for the members' own)."""

    round: int
    hello: bool = False


@dataclass(frozen=True)
class ForgetPrekeys:
    """No round left to read a share in: delete our prekeys."""


# --- actions: the round ------------------------------------------------------------------
@dataclass(frozen=True)
class Train:
    """Release our share for `round` (the stored one after a restart, else train -> DP ->
    budget check -> body), then feed `Released`."""

    round: int


@dataclass(frozen=True)
class SendShare:
    """Pack our share for `round` (sealed to the prekeys of `seal_for` if sealing), charge,
    store and send it: to everyone (`to` None) or to `to`; then feed `Signed`. With
    `stored`, send the stored release as it is and feed nothing."""

    round: int
    seal_for: tuple[str, ...]
    to: tuple[str, ...] | None = None
    stored: bool = False


@dataclass(frozen=True)
class SendPhase:
    """A later phase begins: build its body from what the round holds and send it to
    `peers` (the body is the phase's business: digests for an echo, masks...). `got`:
    what each earlier later phase of the round collected, member -> body (a secure
    round's next step is computed from the previous step's opened pieces)."""

    round: int
    phase: str
    peers: tuple[str, ...]
    got: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class Close:
    """Round `round` is over: combine `shares` (with our own release), evaluate, then feed
    `RoundMachine.closed` with the shares used. `why`: "all" came, the missing had
    "moved_on", were "absent" (not waited for), or the "deadline" passed (the share
    phase's closing rule). `phases`: what each later phase collected, member -> body.
    With the echo phase, `echo` is the agreement (gossip/protocol/echo.py): `shares` is
    only the agreed set, and our own release is combined only if we are in `echo.enter`;
    `echo.excluded` says who was left out and why, with the signed envelopes."""

    round: int
    shares: Mapping[str, Accepted]
    missing: tuple[str, ...]
    why: str
    phases: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    echo: Agreement | None = None

    def own_enters(self, me: str) -> bool:
        """Whether our own release is combined (always, without the echo phase)."""
        return self.echo is None or me in self.echo.enter

    WHY = ("all", "moved_on", "absent", "deadline")


@dataclass(frozen=True)
class Advanced:
    """The book left `round` for `next` (more than one ahead: rounds skipped, behind)."""

    round: int
    next: int


@dataclass(frozen=True)
class Joined:
    """At start, the newest round a majority has reached is ahead of ours: joined there."""

    round: int
    next: int


@dataclass(frozen=True)
class Checkpoint:
    """Save the checkpoint now (the book is at `next_round`)."""

    next_round: int


@dataclass(frozen=True)
class Ack:
    """Acknowledge these transport tokens (the messages are used, or checkpointed)."""

    tokens: tuple[Any, ...]


@dataclass(frozen=True)
class Retire:
    """We stop sharing (`why`): say so, tell the members (a retire message), checkpoint."""

    round: int
    why: str


@dataclass(frozen=True)
class SendFinal:
    """After the last round: broadcast our final model's digest for `round`."""

    round: int


@dataclass(frozen=True)
class Finals:
    """The members' final model digests that came (member -> digest), and who we expected."""

    round: int
    finals: Mapping[str, bytes]
    expected: tuple[str, ...]


@dataclass(frozen=True)
class FinalSeenMissing:
    """After the last round, members whose seen report for it never came."""

    round: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Abort:
    """The run cannot go on (an operator's problem): raise LocalError(why)."""

    why: str


# --- actions: normalization before round 1 ---------------------------------------------
@dataclass(frozen=True)
class SendVote:
    """Send our normalization vote (the stored one, or made now) to every member."""


@dataclass(frozen=True)
class SendStats:
    """Send our statistics (the stored ones, or computed, noised and charged now)."""


@dataclass(frozen=True)
class AdoptRange:
    """Some member voted for range scaling (`fallback`): every member scales by the
    declared ranges; nothing computed or charged."""

    members: tuple[str, ...]
    fallback: tuple[str, ...]


@dataclass(frozen=True)
class Combine:
    """Every member's statistics came (but refused ones): combine them with ours."""

    messages: Mapping[str, Stats]


# --- actions: what the audit log, counters and log say -------------------------------
@dataclass(frozen=True)
class Filed:
    """An accepted message and where the book put it (audit "accepted" line, counter)."""

    accepted: Accepted
    where: str


@dataclass(frozen=True)
class Refused:
    """A message refused (by the verifier, the book, or on what it says): count the
    reason, write the audit line, log once per (member, reason). `accepted` is set when
    the message had passed the verifier (its kind and digest are known)."""

    round: int
    member: str
    reason: str
    detail: str
    digest: str = ""
    accepted: Accepted | None = None


@dataclass(frozen=True)
class Equivocation:
    """A member signed two different messages for one round: keep both as the proof
    (`first` None: we no longer hold the first)."""

    first: Accepted | None
    second: Accepted


@dataclass(frozen=True)
class SeenMismatch:
    """A seen report says `reporter` accepted `reported` from `accused` for `round`, and
    we accepted another (`ours`): split equivocation by the accused, or a false report.
    A claim, not a proof: count it under the reporter."""

    round: int
    reporter: str
    accused: str
    reported: bytes
    ours: Signature
    report: Accepted
    data: bytes


@dataclass(frozen=True)
class Presence:
    """A change in whom rounds wait for: "absent" (no share by `missed` deadlines in a
    row), "back" (a share came again), "heard" (talk without a share: waited for one more
    deadline)."""

    member: str
    what: str
    missed: int = 0


@dataclass(frozen=True)
class Waiting:
    """A long wait: who is still awaited, since when, when it gives up (None: no limit).
    For the log and STATE_DIR/activity.json."""

    what: str
    who: tuple[str, ...]
    since: float
    gives_up: float | None


@dataclass(frozen=True)
class WaitOver:
    """The wait reported by `Waiting` is over (clear activity.json)."""


Action = (Broadcast | SendTo | RotatePrekeys | ForgetPrekeys | Train | SendShare | SendPhase
          | Close | Advanced | Joined | Checkpoint | Ack | Retire | SendFinal | Finals
          | FinalSeenMissing | Abort | SendVote | SendStats | AdoptRange | Combine | Filed
          | Refused | Equivocation | SeenMismatch | Presence | Waiting | WaitOver)

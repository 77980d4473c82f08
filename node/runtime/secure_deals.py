"""What this member RECEIVED in a secure round, kept durably (issue 22; review 2 F10):
"a SIGKILL loses nothing". Before, a member restarted mid-round held its peers' deals in
memory only: its stored check said it held them, its degree-2 and sum pieces abstained
(`lost_pieces`) and the others decoded without it; and the steps' messages (checks,
agreements, sum pieces, confirms) were acked on arrival and lost: a member killed after
its "ok" confirm could not rebuild the sum its ring had sent it, and the others send
nothing twice.

- `keep_received`: when a deal is filed (secure_node.receive), its signed, sealed envelope
  as it arrived (the evidence for disputes too) goes to
  state/received/round-<N>.<member>.deal, atomically, before the message is acknowledged;
  its size checked against a deal's bound first; rounds before the previous one pruned.
- `restored_deals`: at a restart, the current round's stored deals, each checked as the
  wire checks it (our consortium, kind deal, this round, the dealer the file names, its
  signature, sealed to one of our prekeys, its frame); one that fails is refused by name
  (log and `stored_deal` counter) and left out: that dealer's pieces take today's abstain
  path (`lost_pieces`); nothing else stored is touched. A refused file is renamed
  `<name>.refused` (kept for the operator, pruned with its round), so the dealer's genuine
  message, if it comes again, is stored in its place.
- `keep_step`: a secure step's message the machine filed (the first of its sender for the
  round and step) is stored as it arrived, state/received/round-<N>.<member>.<step>.step,
  atomically (tmp + rename), before it is acked; its size checked against the step's
  bound. Not fsync'd: a killed process loses nothing (the kernel holds what it wrote); a
  power loss may lose or tear the last ones (a torn file is refused by name at the restart
  and that step is waited for anew). fsync'd, they cost 7-12 ms each on this machine
  (measured 2026-12-07, load 8), one per member and step: ~0.4 s of event-loop time per
  8-member round.
- `refeed` (at the first Train of a round in this process: a restart resumes there): the
  round's stored deals and steps, each checked as the wire checks it (our consortium, the
  kind, this round, the member and step the file names, its signature, its body's frame),
  given back to the round machine through the node's own receive path, so the share phase
  closes with every deal (not at its deadline) and each step is recomputed from what came
  before the restart; a file that fails is refused by name (`stored_step`, renamed
  `.refused`), the rest used.
- Pruning: a round's files stay until the next round closes (a kill between a close and
  its checkpoint re-runs the round with them; the run's last round: pruned at its close);
  a restart first prunes the rounds its checkpoint has closed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gossip.bodies import decode_secagg, secagg_piece_limits
from gossip.envelope import KIND_DEAL, KIND_SECAGG, Accepted, Envelope, decode_outer
from gossip.errors import RemoteError
from node.learn.models import get_flat
from node.runtime.evidence import envelope_bytes
from node.runtime.secure_bounds import SECURE_FRAME_BYTES
from node.runtime.state import atomic_write

if TYPE_CHECKING:
    from node.runtime.node import Node

log = logging.getLogger("flnode.secure")

# The folder under the state dir; a file per (round, dealer): round-<N>.<member>.deal, and
# per (round, sender, step): round-<N>.<member>.<step>.step.
RECEIVED_DIR = "received"
DEAL_SUFFIX = ".deal"
STEP_SUFFIX = ".step"
REFUSED_SUFFIX = ".refused"  # a stored file refused at a restart, kept beside for the operator


def folder(node: Node) -> Path:
    return node.state.path / RECEIVED_DIR


def _safe(label: str) -> str:
    """A member's or step's name in a file name whose fields '.' separates: one to one over
    the names gossip/membership.py allows (letters, digits, '-', '_', '.'), its '.' written
    '+' (as '_' it made "site.a" and "site_a" one file: the second member's messages lost)."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else "+" for ch in label)


def deal_path(node: Node, r: int, member: str) -> Path:
    return folder(node) / f"round-{r:08d}.{_safe(member)}{DEAL_SUFFIX}"


def deal_bound(node: Node) -> int:
    """The most bytes an honest deal to us takes: the receivers' piece limits for a deal
    (gossip/bodies.py) plus the envelope's frame, and never over gossip.max_envelope_bytes
    (the transport refused anything larger)."""
    members, dim = len(node.consortium.members), int(get_flat(node.model).numel())
    deal = sum(secagg_piece_limits("deal", members, dim)) + SECURE_FRAME_BYTES  # type: ignore[arg-type]
    return min(deal, node.cfg.gossip.max_envelope_bytes)


def step_file(node: Node, r: int, member: str, step: str) -> Path:
    return folder(node) / f"round-{r:08d}.{_safe(member)}.{_safe(step)}{STEP_SUFFIX}"


def step_bound(node: Node, step: str) -> int:
    """The most bytes an honest `step` message takes: its pieces' limits (gossip/bodies.py;
    a piece without one: the envelope's) plus the envelope's frame, at most
    gossip.max_envelope_bytes."""
    members, dim = len(node.consortium.members), int(get_flat(node.model).numel())
    most = node.cfg.gossip.max_envelope_bytes
    pieces = sum(most if limit is None else limit
                 for limit in secagg_piece_limits(step, members, dim))
    return min(pieces + SECURE_FRAME_BYTES, most)


def _round_of(path: Path) -> int | None:
    head = path.name.removeprefix(".").split(".", 1)[0]
    try:
        return int(head.removeprefix("round-")) if head.startswith("round-") else None
    except ValueError:
        return None


def prune(node: Node, before_round: int) -> None:
    """Unlink the stored deals of rounds before `before_round` (bounded: only the rounds the
    machine still takes deals for stay)."""
    d = folder(node)
    if not d.is_dir():
        return
    for p in [*d.glob("round-*"), *d.glob(".round-*.tmp")]:  # a write a kill cut short too
        r = _round_of(p)
        if r is not None and r < before_round:
            p.unlink(missing_ok=True)


def keep_received(node: Node, acc: Accepted) -> None:
    """Store a filed deal's envelope (once per round and dealer: the first filed one, which
    is the one the round book holds). Blocking, on the event loop, before the message's
    ack: at most one deal per member and round (the machine refuses second ones)."""
    r, member = acc.round, acc.sender
    path = deal_path(node, r, member)
    if path.exists():
        return
    data = envelope_bytes(acc.envelope)
    bound = deal_bound(node)
    if len(data) > bound:  # cannot be honest (the verifier's limits hold it below): not stored
        log.warning("%s: round %d: %s's deal is %d bytes, over a deal's bound of %d: not "
                    "stored (a restart would lose it)", node.name, r + 1, member, len(data), bound)
        node.counters.rejected["stored_deal_size"] += 1
        return
    prune(node, node.book.current - 1)  # the round before stays until its checkpoint is sure
    atomic_write(path, data)  # makes the folder too


def _read_bounded(path: Path, bound: int, what: str) -> bytes:
    """A stored file's bytes, refused (ValueError) from its size when over `bound`, before
    it is read: a file in the state dir is hostile input (another process's, a power cut's)
    and may be of any size, or a link to a device that never ends. A symlink is refused
    (ELOOP, an OSError), so is anything but a regular file; at most bound + 1 bytes read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > bound:
            raise ValueError(f"{st.st_size} bytes, over {what} bound of {bound}")
        chunks, left = [], bound + 1  # the file may grow after the fstat
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > bound:
        raise ValueError(f"over {what} bound of {bound} bytes (it grew while read)")
    return data


def _signed_file(node: Node, path: Path, r: int, member: str, kind: str, bound: int,
                 what: str, expected: str, theirs: str) -> tuple[bytes, Envelope, int]:
    """The stored file at `path` read within `bound`, its envelope checked as the wire checks
    it (our consortium, `kind`, round r, signed by `member`'s key), and the member count;
    ValueError says why not. `what`, `expected`, `theirs` name the message in the reasons."""
    data = _read_bounded(path, bound, what)
    try:
        env = decode_outer(data, bound)
    except RemoteError as exc:
        raise ValueError(f"not an envelope ({exc.detail})") from None
    keys = {m.name: m.public_key for m in node.consortium.members}
    if env.consortium_id != node.consortium.id:
        raise ValueError("another consortium's message")
    if (env.kind, env.round) != (kind, r):
        raise ValueError(f"a {env.kind!r} of round {env.round + 1}, not {expected} of round "
                         f"{r + 1}")
    if env.sender != keys.get(member):
        raise ValueError(f"not signed by {member}'s key (another member's {theirs})")
    try:
        VerifyKey(env.sender).verify(env.digest, env.sig)
    except BadSignatureError:
        raise ValueError(f"{member}'s signature does not verify") from None
    return data, env, len(keys)


def _check(node: Node, path: Path, r: int, member: str) -> Accepted:
    """The stored deal at `path`, checked as the wire checks it; ValueError says why not."""
    data, env, members = _signed_file(node, path, r, member, KIND_DEAL, deal_bound(node),
                                      "a deal's", "a deal", "deal")
    if node.sealing is None:
        raise ValueError("this node does not seal")
    try:
        plain = node.sealing.open_deal(env.body, env.sender, r, member)
        secagg = decode_secagg(plain, members, member, deal=True,
                               dim=int(get_flat(node.model).numel()))
    except RemoteError as exc:
        raise ValueError(f"{exc.reason}: {exc.detail}") from None
    _replay_known(node, data, member)
    return Accepted(member, env, None, secagg=secagg)


def restored_deals(node: Node, r: int, have: set[str]) -> dict[str, Accepted]:
    """Round r's stored deals of the dealers not in `have` (the round book's), each checked;
    a file that fails is refused by name and left out (its dealer's pieces abstain)."""
    out: dict[str, Accepted] = {}
    d = folder(node)
    if not d.is_dir():
        return out
    for m in sorted(m.name for m in node.consortium.members):
        path = deal_path(node, r, m)
        if m == node.name or m in have or not path.exists():
            continue
        try:
            out[m] = _check(node, path, r, m)
        except (OSError, ValueError) as exc:
            log.warning("%s: round %d: refusing the stored deal %s (from %s): %s; our pieces "
                        "of %s's dealing abstain this round (lost_pieces)", node.name, r + 1,
                        path, m, exc, m)
            node.counters.rejected["stored_deal"] += 1
            _set_aside(path)
    if out:
        log.info("%s: round %d: restored %d received deal(s) from the state dir (%s)",
                 node.name, r + 1, len(out), ", ".join(sorted(out)))
    return out


def _set_aside(path: Path) -> None:
    """A refused stored file, renamed <name>.refused: kept for the operator, its name free
    for the genuine message if it comes again (pruned with its round)."""
    try:
        path.replace(path.with_name(path.name + REFUSED_SUFFIX))
    except OSError as exc:
        log.warning("could not set aside the refused %s: %s", path, exc)


def keep_step(node: Node, acc: Accepted, data: bytes) -> None:
    """Store a secure step's message the machine filed, as it arrived (`data`), once per
    round, sender and step (the first: the one the machine holds). On the event loop,
    before the message's ack: one message per member and step, within the step's bound."""
    step = acc.secagg.step  # type: ignore[union-attr]
    path = step_file(node, acc.round, acc.sender, step)
    if path.exists():
        return
    bound = step_bound(node, step)
    if len(data) > bound:  # the verifier's limits hold an honest one below
        log.warning("%s: round %d: %s's %s message is %d bytes, over the step's bound of %d: "
                    "not stored (a restart would lose it)", node.name, acc.round + 1,
                    acc.sender, step, len(data), bound)
        node.counters.rejected["stored_step_size"] += 1
        return
    atomic_write(path, data, durable=False)  # not fsync'd: 7-12 ms each here (module docs)


def _check_step(node: Node, path: Path, r: int, member: str, step: str
                ) -> tuple[Accepted, bytes]:
    """The stored `step` message of `member` at `path`, checked as the wire checks it, and
    the bytes checked (read once: the file could change under a second read); ValueError
    says why not."""
    data, env, members = _signed_file(node, path, r, member, KIND_SECAGG, step_bound(node, step),
                                      f"a {step} message's", "a secure step", "message")
    try:
        msg = decode_secagg(env.body, members, member, dim=int(get_flat(node.model).numel()))
    except RemoteError as exc:
        raise ValueError(f"{exc.reason}: {exc.detail}") from None
    if msg.step != step:
        raise ValueError(f"a {msg.step} message, not a {step} one")
    _replay_known(node, data, member)
    return Accepted(member, env, None, secagg=msg), data


def _replay_known(node: Node, data: bytes, member: str) -> None:
    """The verifier's replay table takes the stored message as accepted (a copy the
    transport redelivers after the restart is then a benign `duplicate`, not a second
    filing); one the table holds already (a checkpoint after it came) is fine."""
    try:
        node.verifier.verify(data, node.book.current, member)
    except RemoteError as exc:
        if exc.reason != "duplicate":
            raise ValueError(f"the wire check refuses it ({exc.reason}: {exc.detail})") from None


def restored_steps(node: Node, r: int, steps: list[str]) -> list[tuple[Accepted, bytes]]:
    """Round r's stored step messages (in the steps' order), each checked; a file that
    fails is refused by name (`stored_step`) and set aside, the rest returned."""
    out: list[tuple[Accepted, bytes]] = []
    if not folder(node).is_dir():
        return out
    for step in steps:
        for m in sorted(m.name for m in node.consortium.members):
            path = step_file(node, r, m, step)
            if m == node.name or not path.exists():
                continue
            try:
                out.append(_check_step(node, path, r, m, step))
            except (OSError, ValueError) as exc:
                log.warning("%s: round %d: refusing the stored %s message %s (from %s): %s; "
                            "set aside as %s%s, the round goes on without it", node.name,
                            r + 1, step, path, m, exc, path.name, REFUSED_SUFFIX)
                node.counters.rejected["stored_step"] += 1
                _set_aside(path)
    return out


def refeed(node: Node, r: int, now: float, receive: Callable[..., list[Any]]) -> int:
    """At a round's first Train in this process: its stored deals the round book lacks,
    then its stored steps, given to `receive` (secure_node.receive: the machine files them
    as if they arrived now; storing them again is skipped). Returns how many."""
    prune(node, node.book.current)  # closed and checkpointed rounds' files
    deals = restored_deals(node, r, set(node.book.shares(r)))
    steps = restored_steps(node, r, [p.name for p in node.machine.phases[1:]])
    for acc in deals.values():
        node._feed(receive(node, acc, now, envelope_bytes(acc.envelope), None))
    filed = node.secure.audited.get(r, set())  # came again since this process started
    steps = [(acc, data) for acc, data in steps if (acc.sender, acc.secagg.step) not in filed]
    for acc, data in steps:
        node._feed(receive(node, acc, now, data, None))
    if steps:
        log.info("%s: round %d: restored %d received step message(s) from the state dir",
                 node.name, r + 1, len(steps))
    return len(deals) + len(steps)


__all__ = ["RECEIVED_DIR", "deal_bound", "deal_path", "keep_received", "keep_step", "prune",
           "refeed", "restored_deals", "restored_steps", "step_bound", "step_file"]

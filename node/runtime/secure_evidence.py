"""The secure round's evidence (issue 22): the signed step messages we keep until a round
closes, and what we write under state/evidence/secure/ when the round names a member (its
signed deal; the agreements that disagreed, once per round and sender, in round<N>/).
Bounded on disk (MAX_SECURE_EVIDENCE_BYTES in all, MAX_DEALS_PER_MEMBER deals per member)
and written off the event loop (`keep_evidence`, from secure_node.open_sum's worker thread)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from gossip.envelope import Accepted
from node.runtime.evidence import envelope_bytes
from node.runtime.secure_round import AGREE_PHASE, AGREE_STEPS, ENTER_PHASE, SecureOutcome
from node.runtime.state import atomic_write

if TYPE_CHECKING:
    from node.runtime.node import Node

log = logging.getLogger("flnode.secure")

# Bytes of the secure rounds' evidence we keep in all (deals and signed step messages, up to
# one envelope each): members named every round of a long run, or a member whose
# agreements name others, cannot fill our disk (review 2 F6); the earliest kept, the rest
# counted in the log. 16 default envelopes.
MAX_SECURE_EVIDENCE_BYTES = 1 << 30


def step_path(node: Node, r: int, phase: str) -> Path:
    """outbox/round-N.<step>: our signed message of a secure step (check, degree2, sum),
    stored before it leaves and pruned with the round's other outbox files."""
    return node.state.outbox_path(r).with_suffix(f".{phase}")


def _folder(node: Node) -> Path:
    return node.state.path / "evidence" / "secure"


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in label)


def _room(node: Node, size: int) -> bool:
    """Whether `size` more bytes fit the evidence bound (logged once when it is reached)."""
    folder = _folder(node)
    used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    if used + size <= MAX_SECURE_EVIDENCE_BYTES:
        return True
    log.warning("%s: secure evidence: %s holds %d bytes, %d more exceed the bound of %d: not "
                "kept", node.name, folder, used, size, MAX_SECURE_EVIDENCE_BYTES)
    return False


def keep_evidence(node: Node, r: int, out: SecureOutcome, shares: Mapping[str, Accepted]
                  ) -> dict[str, str | list[str]]:
    """Named member -> the evidence kept for it (a deal's path, or the paths of the signed
    step messages that show it); blocking file writes: call it off the event loop."""
    evidence: dict[str, str | list[str]] = {}
    for member, why in sorted(out.named.items()):
        if member in shares and why.startswith(("inconsistent_pieces", "bad_piece")):
            kept = keep_deal(node, r, member, shares[member])
            if kept is not None:
                evidence[member] = kept
        elif why.startswith(("split_view", "split_claim", "bad_agreement", "bad_dealing",
                             "false_dispute", "bad_reveal")):
            split = keep_split_evidence(node, r, member, out)
            if split:
                evidence[member] = split
    return evidence


# Rounds whose signed step messages we keep for evidence (ours, the next ones a peer may
# already be in, within the machine's lookahead), so a member sending for far rounds cannot
# fill our memory; per round at most one message per member and step (the first).
MAX_SIGNED_ROUNDS = 8


def keep_signed_step(node: Node, acc: Accepted, data: bytes) -> None:
    """Keep a member's signed check, degree2 or agree message (the first per round and
    step) until the round closes: if an agreement shows it split the members' views, these
    bytes are the evidence (`aggregate`)."""
    sec = node.secure
    assert sec is not None and acc.secagg is not None
    step, r = acc.secagg.step, acc.round
    if step not in (*AGREE_STEPS, ENTER_PHASE, AGREE_PHASE):
        return
    if r not in sec.signed and len(sec.signed) >= MAX_SIGNED_ROUNDS:
        return
    sec.signed.setdefault(r, {}).setdefault((acc.sender, step), bytes(data))


def keep_split_evidence(node: Node, r: int, member: str, out: SecureOutcome) -> list[str]:
    """A member named by an agreement step: in state/evidence/secure/round<N>/, our signed
    agreements (entry and sum), each disagreeing member's, and the named member's signed
    check and degree2 messages as they reached us (the two sides of the split; for a
    `split_claim`, also those of the members it claims about); their
    paths. Each signed message is stored once per round, however many members it concerns
    (review 2 F6: one copy per framed member filled the disk), within the folder's byte
    bound."""
    sec = node.secure
    assert sec is not None
    held = sec.signed.get(r, {})
    parts = [(f"{k}-{node.name}", _read_or_none(step_path(node, r, k)))
             for k in (ENTER_PHASE, AGREE_PHASE)]
    parts += [(f"{k}-{s}", held.get((s, k))) for s in out.disagreed.get(member, ())
              for k in (ENTER_PHASE, AGREE_PHASE)]
    parts += [(f"{step}-{m}", held.get((m, step))) for m in (member, *out.claims.get(member, ()))
              for step in AGREE_STEPS]  # a split_claim: the bodies it concerns, as we got them
    base = _folder(node) / f"round{r}"
    kept = []
    for label, data in parts:
        if data is None:
            continue
        path = base / _safe(label)
        if path.exists() or _room(node, len(data)):
            if not path.exists():
                base.mkdir(parents=True, exist_ok=True)
                atomic_write(path, data)
            kept.append(str(path.relative_to(node.state.path)))
    return kept


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


# Deal evidence files kept per named member (one per round it was named in), so a member
# named every round of a long run cannot fill our disk: the earliest kept.
MAX_DEALS_PER_MEMBER = 64


def keep_deal(node: Node, r: int, member: str, acc: Accepted) -> str | None:
    """The named dealer's deal as it signed it (sealed to us: our prekey for the round opens
    it while we keep it), in state/evidence/secure/, never overwritten, bounded per member;
    its path under the state dir (None: the bound reached)."""
    folder = _folder(node)
    safe = _safe(member)
    path = folder / f"{safe}-round{r}.deal"
    if not path.exists():
        data = envelope_bytes(acc.envelope)
        if folder.is_dir() and len(list(folder.glob(f"{safe}-round*.deal"))) >= MAX_DEALS_PER_MEMBER:
            return None
        if not _room(node, len(data)):
            return None
        atomic_write(path, data)
    return str(path.relative_to(node.state.path))


__all__ = ["MAX_DEALS_PER_MEMBER", "MAX_SECURE_EVIDENCE_BYTES", "MAX_SIGNED_ROUNDS", "keep_deal",
           "keep_evidence", "keep_signed_step", "keep_split_evidence", "step_path"]

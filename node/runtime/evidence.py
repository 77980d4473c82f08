"""Proofs of equivocation, kept apart from the rotating audit log.

A member equivocates when it signs two different messages for the same round and kind
(two different shares for one round). The two signed envelopes, as the member signed
them, are the proof: anyone holding the member's public key (the consortium file) can
check them with `verify_equivocation`, without trusting the node that kept them.

The audit log (audit.jsonl) rotates at a size (node/runtime/state.py), so a member that floods
us could push an earlier proof out of it. Proofs therefore live in their own directory,
state/evidence/proofs/, one file per offender and round, never rotated and never
overwritten. The store is bounded per offender (MAX_PROOFS_PER_MEMBER files, counted
from the directory at start, so a restart does not reset the bound): once full, the
earliest proofs are kept and later ones are only counted, so a member that equivocates
without end cannot fill the disk nor replace what is already kept.

What is *not* a proof: a seen report saying a member's share had another digest. The
report carries the digest only, not the member's signature over it, so it is the
reporter's claim (it may lie); the runner keeps and counts it under the reporter.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gossip import envelope
from gossip.envelope import SHARE_KINDS, Envelope
from gossip.errors import RemoteError
from node.runtime.state import atomic_write

# Proofs kept per offender (one per round it equivocated in). 64 rounds of proof is more
# than any audit needs; the bound keeps an endless equivocator to 64 x two envelopes
# (each at most gossip.max_envelope_bytes) on our disk.
MAX_PROOFS_PER_MEMBER = 64
PROOF_VERSION = 1
PROOF_SUFFIX = ".equivocation"
# A proof file holds two envelopes and a few small fields: refuse to read one larger
# than two of the largest envelopes the wire allows.
MAX_PROOF_BYTES = 2 * envelope.DEFAULT_MAX_ENVELOPE_BYTES + 4096
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def envelope_bytes(env: Envelope) -> bytes:
    """The signed envelope as it went over the wire (the same msgpack `envelope.pack`
    writes), from its parsed form: `decode_outer` of it gives `env` back."""
    return msgpack.packb([envelope.PROTO, env.consortium_id, env.sender, env.kind, env.round,
                          env.seq, env.body, env.sig], use_bin_type=True)


def same_slot(a: Envelope, b: Envelope) -> bool:
    """Two messages for the same (round, kind): both shares (plain or sealed) count as the
    one share of the round, as in the round book."""
    kinds = (a.kind in SHARE_KINDS and b.kind in SHARE_KINDS) or a.kind == b.kind
    return a.round == b.round and kinds


def verify_equivocation(data: bytes, public_key: bytes, consortium_id: bytes,
                        max_envelope_bytes: int = envelope.DEFAULT_MAX_ENVELOPE_BYTES
                        ) -> tuple[int, str]:
    """Check a proof file's bytes against the accused member's public key: (round, kind)
    it equivocated in, or ValueError saying why this is no proof."""
    if len(data) > MAX_PROOF_BYTES:
        raise ValueError(f"a proof of {len(data)} bytes is larger than any proof can be")
    try:
        doc = msgpack.unpackb(data, raw=False, max_bin_len=max_envelope_bytes + 4096,
                              max_str_len=256, max_array_len=8, max_map_len=8)
    except Exception as exc:  # msgpack raises several types on hostile input
        raise ValueError(f"not a proof file ({type(exc).__name__})") from None
    if not (isinstance(doc, dict) and doc.get("version") == PROOF_VERSION
            and isinstance(doc.get("first"), bytes) and isinstance(doc.get("second"), bytes)):
        raise ValueError(f"not a version-{PROOF_VERSION} proof (two envelopes)")
    envs = []
    for which in ("first", "second"):
        try:
            env = envelope.decode_outer(doc[which], max_envelope_bytes)
        except RemoteError as exc:
            raise ValueError(f"the {which} envelope does not parse: {exc.detail}") from None
        if env.sender != public_key:
            raise ValueError(f"the {which} envelope is not the accused member's")
        if env.consortium_id != consortium_id:
            raise ValueError(f"the {which} envelope is for another consortium")
        try:
            VerifyKey(public_key).verify(env.digest, env.sig)
        except BadSignatureError:
            raise ValueError(f"the {which} envelope's signature does not verify") from None
        envs.append(env)
    first, second = envs
    if not same_slot(first, second):
        raise ValueError(f"the envelopes are for different rounds or kinds ({first.round} "
                         f"{first.kind}, {second.round} {second.kind}): no equivocation")
    if first.digest == second.digest:
        raise ValueError("the envelopes are the same message: no equivocation")
    return first.round, first.kind


class EvidenceStore:
    """state/evidence/proofs/: one proof file per offender and round, bounded per offender."""

    def __init__(self, state_path: Path, max_per_member: int = MAX_PROOFS_PER_MEMBER) -> None:
        self.path = Path(state_path) / "evidence" / "proofs"
        self.max_per_member = max_per_member
        self._count: dict[str, int] = {}
        if self.path.is_dir():
            for p in self.path.glob(f"*{PROOF_SUFFIX}"):
                member = p.name.rsplit("-round", 1)[0]
                self._count[member] = self._count.get(member, 0) + 1
        self.full: dict[str, int] = {}  # offender -> proofs not kept (its store was full)

    def file_for(self, member: str, round_: int) -> Path:
        return self.path / f"{_SAFE_NAME.sub('_', member)}-round{round_}{PROOF_SUFFIX}"

    def keep_equivocation(self, member: str, first: Envelope, second: Envelope) -> Path | None:
        """Keep the proof that `member` signed both; the file (new or already kept for this
        round), or None when the member's store is full. Raises ValueError (a local bug)
        if the two are not a proof: different senders, rounds or kinds, or the same."""
        if first.sender != second.sender or not same_slot(first, second) \
                or first.digest == second.digest:
            raise ValueError(f"not an equivocation by {member}: envelopes of other senders, "
                             "rounds or kinds, or the same message")
        path = self.file_for(member, first.round)
        if path.exists():
            return path  # one proof per offender and round is enough
        key = _SAFE_NAME.sub("_", member)
        if self._count.get(key, 0) >= self.max_per_member:
            self.full[member] = self.full.get(member, 0) + 1
            return None
        doc = {"version": PROOF_VERSION, "member": member, "round": first.round,
               "kind": first.kind, "first": envelope_bytes(first),
               "second": envelope_bytes(second)}
        atomic_write(path, msgpack.packb(doc, use_bin_type=True))
        self._count[key] = self._count.get(key, 0) + 1
        return path

    def proofs(self) -> list[Path]:
        return sorted(self.path.glob(f"*{PROOF_SUFFIX}")) if self.path.is_dir() else []

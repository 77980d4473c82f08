"""Where a secure round's bytes go (issue 22's bytes goal): `bench_secure.py --grid cost
--by-kind` runs each row's `flnode simulate` with this tally installed in the subprocess.

Every message a member's memory transport delivers is counted by what it is: the envelope
kind, for a `secagg` message its step (and whether it abstained), for a `deal` whether it
carries a VECTOR piece or a SEED; per kind the bytes of the signed envelope's frame
(header, signature), of the body's pieces, of the pieces' 24-byte headers, and the rest
(msgpack framing; for a deal, sealing: its body is sealed, so its plaintext pieces are
taken from the dealing as the member made it, `SecureRounds.deal`, and the sealing is
what the sealed body adds). Bench-only: nothing here is imported by the node.
"""

from __future__ import annotations

import atexit
import json
from pathlib import Path
from typing import Any

PIECE_HEADER = 24  # node/secagg/pieces.py HEADER_BYTES


def install(path: Path, members: int) -> None:
    """Count every delivered message by kind; write the tally to `path` at exit."""
    from gossip import envelope as E
    from gossip.bodies import decode_secagg
    from gossip.transports.memory import MemoryTransport
    from node.runtime.secure_round import SecureRounds

    tally: dict[str, dict[str, int]] = {}
    # a deal's plaintext size -> (pieces' bytes): the sealed body is its plaintext plus the
    # sealing's fixed overhead, so a sealed deal is matched to the largest plaintext below it
    plain_deals: dict[int, int] = {}

    def add(key: str, **parts: int) -> None:
        t = tally.setdefault(key, {})
        for k, v in parts.items():
            t[k] = t.get(k, 0) + v

    send = MemoryTransport.send

    async def counted(self: Any, peer: str, data: bytes) -> None:
        before = self.stats.bytes_sent
        await send(self, peer, data)
        if self.stats.bytes_sent == before:
            return
        env = E.decode_outer(data, max(len(data), 1 << 20))
        body = bytes(env.body)
        frame = len(data) - len(body)
        if env.kind == E.KIND_SECAGG:
            msg = decode_secagg(body, members)
            pieces = sum(len(p) for p in msg.pieces)
            heads = PIECE_HEADER if msg.step in ("check", "degree2", "sum", "fallback") and msg.pieces else 0
            add(f"secagg {msg.step}" + ("" if msg.pieces else " (abstain)"), messages=1,
                bytes=len(data), frame=frame, pieces=pieces - heads, piece_headers=heads,
                other=len(body) - pieces)
        elif env.kind == E.KIND_DEAL:
            plain = max((s for s in plain_deals if s <= len(body)), default=None)
            parts = {"messages": 1, "bytes": len(data), "frame": frame}
            if plain is not None:  # vector or seed, mask, commitment (no header)
                parts.update(pieces=plain_deals[plain] - 2 * PIECE_HEADER,
                             piece_headers=2 * PIECE_HEADER, other=plain - plain_deals[plain],
                             sealing=len(body) - plain)
            add("deal (seed)" if len(body) < 4096 else "deal (vector)", **parts)
        else:
            add(env.kind, messages=1, bytes=len(data), frame=frame, other=len(body))

    MemoryTransport.send = counted  # type: ignore[method-assign]
    deal = SecureRounds.deal

    def dealt(self: Any, r: int, encoded: Any) -> dict[str, bytes]:
        out = deal(self, r, encoded)
        for body in out.values():
            msg = decode_secagg(body, members, deal=True)
            plain_deals[len(body)] = sum(len(p) for p in msg.pieces)
        return out

    SecureRounds.deal = dealt  # type: ignore[method-assign]
    atexit.register(lambda: path.write_text(json.dumps(tally, indent=1, sort_keys=True) + "\n"))


def per_member_round(tally: dict[str, dict[str, int]], member_rounds: int) -> dict[str, dict[str, float]]:
    """The tally divided by the member-rounds of the run (bytes per member per round)."""
    return {k: {f: round(v / max(1, member_rounds), 1) for f, v in parts.items()}
            for k, parts in sorted(tally.items())}

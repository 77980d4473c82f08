"""Small builders shared by the tests: members, a consortium, valid envelopes; libp2p
members on loopback ports and a wait for a state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from nacl.signing import SigningKey

from gossip import bodies, envelope
from gossip.bodies import TensorSpec
from gossip.envelope import KIND_SHARE, Verifier
from gossip.membership import Consortium, Member
from scripts.ports import free_ports

SCHEMA = {
    "label": "default",
    "classes": ["No", "Yes"],
    "columns": [
        {"name": "student", "kind": "categorical", "vocabulary": ["No", "Yes"]},
        {"name": "balance", "kind": "numeric", "mean": 835.0, "std": 483.0},
        {"name": "income", "kind": "numeric", "mean": 33517.0, "std": 13336.0},
    ],
}
SPEC = [TensorSpec("w", (2, 4)), TensorSpec("b", (2,))]


def keys(n: int) -> list[SigningKey]:
    return [SigningKey(bytes([i + 1]) * 32) for i in range(n)]


def consortium(signing_keys: list[SigningKey], schema: dict | None = None,
               name: str = "test-consortium") -> Consortium:
    return Consortium(name, schema or SCHEMA, tuple(
        Member(f"bank-{i}", bytes(k.verify_key), {"memory": f"bank-{i}"})
        for i, k in enumerate(signing_keys)))


def tensors(fill: float = 0.5) -> list[tuple[str, np.ndarray]]:
    return [("w", np.full((2, 4), fill, dtype="<f4")), ("b", np.full((2,), fill, dtype="<f4"))]


def share_bytes(key: SigningKey, cons: Consortium, round_: int = 0, seq: int = 0,
                body: bytes | None = None, cid: bytes | None = None) -> bytes:
    body = body if body is not None else bodies.encode_share(tensors(), 100.0)
    return envelope.pack(key, cid or cons.id, KIND_SHARE, round_, seq, body)


def verifier_for(cons: Consortium, own: SigningKey, secure: bool = False) -> Verifier:
    return Verifier(cons.id, {m.public_key: m.name for m in cons.members}, bytes(own.verify_key),
                    SPEC, secure=secure)


def libp2p_members(signing_keys: list[SigningKey], names: list[str] | None = None
                   ) -> tuple[Member, ...]:
    """Members m0, m1, ... (or `names`) with a libp2p address each on a free loopback port."""
    names = names or [f"m{i}" for i in range(len(signing_keys))]
    return tuple(Member(n, bytes(k.verify_key), {"libp2p": f"/ip4/127.0.0.1/tcp/{port}"})
                 for n, k, port in zip(names, signing_keys, free_ports(len(signing_keys)),
                                       strict=True))


async def until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for a state (generous timeout: a loaded 2-core machine); not reached in time:
    an AssertionError naming `what`."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not reached within {timeout:g} s: {what}") from None

"""Who may hold a connection to a libp2p node: members only, within the handshake
limits, and not while quenched (trio side).

Trust: the host's key is the member's Ed25519 identity, so its peer id is
derived from the public key in the consortium file. Security is Noise only
(py-libp2p's default list also offers plaintext and secio: not here), the
muxer yamux. Identify and ping are served as by any libp2p host. Once Noise
has authenticated a remote peer id, a peer that is not a member is closed
before muxing (counted as `non_member_peer`): py-libp2p 0.8.1's connection
gater filters only IP addresses, so `gate_members` wraps the upgrader's
`upgrade_security`. The limits it applies are in `admission.py`.

A member over its message rate is quenched (`quench`): our connections with it are
closed, and the gate refuses new ones after Noise [`quenched`] until its quench ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.transport.exceptions import SecurityUpgradeFailure

from gossip.errors import describe
from gossip.transports.libp2p.admission import Admission

log = logging.getLogger("flnode.libp2p")


def gate_members(upgrader: Any, admission: Admission, names_by_id: dict[Any, str],
                 refuse: Callable[[str, str, str], None]) -> None:
    """Bound inbound handshakes, and close connections to peer ids outside the
    consortium (or of a quenched member) right after Noise. `refuse(reason, peer,
    detail)` counts and logs each refusal."""
    original = upgrader.upgrade_security
    allowed = set(names_by_id)
    a = admission

    async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: ID | None = None
                               ) -> Any:
        ip: str | None = None
        if not is_initiator:
            try:
                address = raw_conn.get_remote_address()
            except Exception:  # noqa: BLE001 - a socket already gone
                address = None
            ip = str(address[0]) if address else "unknown"
            if a.handshake_over_limit(ip):
                refuse("handshake_limit", ip,
                       f"{a.handshakes} inbound handshakes in progress "
                       f"({a.handshakes_by_ip[ip]} from this address; limits "
                       f"{a.max_pending_handshakes}, {a.max_handshakes_per_ip})")
                try:
                    await raw_conn.close()
                except Exception:  # noqa: BLE001 - already closed
                    pass
                raise SecurityUpgradeFailure("too many inbound handshakes")
            a.handshake_started(ip)
        try:
            if is_initiator:
                secure = await original(raw_conn, is_initiator, peer_id)
            else:
                with trio.fail_after(a.handshake_timeout_s):
                    secure = await original(raw_conn, is_initiator, peer_id)
        except trio.TooSlowError:
            refuse("handshake_timeout", ip or "?",
                   f"no Noise handshake within {a.handshake_timeout_s:g} s")
            raise SecurityUpgradeFailure("handshake timed out") from None
        finally:
            if ip is not None:
                a.handshake_ended(ip)
        remote = secure.get_remote_peer()
        if remote not in allowed:
            await secure.close()
            refuse("non_member_peer", str(remote), "not a consortium member")
            raise SecurityUpgradeFailure(f"peer {remote} is not a consortium member")
        name = names_by_id[remote]
        if a.quenched(name, trio.current_time()):
            await secure.close()
            refuse("quenched", name, "it flooded us: no connection with it until "
                   "its quench ends")
            raise SecurityUpgradeFailure(f"member {name} is quenched (it flooded)")
        return secure

    upgrader.upgrade_security = upgrade_security


async def quench(network: Any, admission: Admission, peer: str, remote: Any, *, who: str,
                 rate: float) -> None:
    """Close our connections with a member over its rate and refuse new ones (after
    Noise, in the gate) for QUENCH_S, doubling each time it floods again: resetting
    each of its streams still costs us a stream setup per message, a closed
    connection costs it a Noise handshake per attempt, bounded by the handshake
    limits. Its shares are lost to us meanwhile, and ours to it; nobody else's.
    `who` is our own name (for the log), `rate` the member's budget in messages/s."""
    seconds = admission.quench(peer, trio.current_time())
    if seconds is None:
        return
    log.warning("%s: %s sends more than its share (%g messages/s): connections with it "
                "closed and refused for %.0f s (counted in flood_by_sender)", who,
                peer, rate, seconds)
    try:
        await network.close_peer(remote)
    except Exception as exc:  # noqa: BLE001 - already gone
        log.debug("%s: closing %s: %s", who, peer, describe(exc))

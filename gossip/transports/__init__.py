"""Transports move opaque byte strings between members; they never parse them.

Every byte string a transport delivers goes to `gossip.envelope` first.
"""

from gossip.transports.base import Incoming, Transport, TransportStats

__all__ = ["Incoming", "Transport", "TransportStats"]

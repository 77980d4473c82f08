"""A connection the broker has stopped answering is dropped, so the transport makes a new one.

Measured (mosquitto 2.0.11, `tests/test_flood.py` beside two busy loops): once a member's
QoS 0 flood has overflowed the broker's queue for us ("Outgoing messages are being
dropped"), our connection can stall altogether: nothing queued in either socket, yet
our PUBLISH and UNSUBSCRIBE unanswered and the honest members' shares not delivered,
until the next keepalive ping, up to KEEPALIVE_S (60 s) later. A new connection (the
persistent session resumes: subscriptions, and the un-acknowledged shares redelivered)
works at once. The quench's UNSUBSCRIBE timeout caught the stall only when it began
before the UNSUBACK; when the UNSUBACK got through first, the honest exchange stopped
for a minute (the flood test's one failure under two pytest workers).

So while the connection is up, `StallWatch` checks every CHECK_S: if the broker owes us
an answer (a PUBACK, SUBACK, UNSUBACK or PINGRESP) and nothing has moved on the
connection for STALL_S (no byte read from the broker, nothing more of ours written), the
connection is dropped (`MqttTransport._drop_connection`), and the connection loop makes a
new one. While a member is quenched (a flood is on), silence itself is suspect: after
PROBE_S without a byte from the broker we send a PINGREQ, which the broker then owes
an answer to. Progress, not age, is what counts: a 64 MB share being read or written
slowly keeps the connection alive however long it takes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("flnode.mqtt")

# How often the connection is looked at.
CHECK_S = 0.5
# The broker owes us an answer and nothing has moved for this long: the connection is
# dropped. On the loaded 2-core test machine the broker answered an UNSUBSCRIBE behind a
# 4 MB flood backlog within 1-3 s when it answered at all; a false alarm costs one
# reconnect (the session and every un-acknowledged share survive it).
STALL_S = 5.0
# While a member is quenched, this long without a byte from the broker: send a PINGREQ.
PROBE_S = 1.0


class StallWatch:
    """`async with client, StallWatch(client, transport)`: watches that connection while
    it is up. `client` is aiomqtt's; the transport's `_quenched` are the members we are
    not listening to now, its `_drop_connection` ends the connection from our side, its
    `stalls` counts the drops. aiomqtt and paho keep what we need as private fields
    (their pending calls, paho's ping time, its read and write positions)."""

    def __init__(self, client: Any, transport: Any) -> None:
        self._client, self._transport = client, transport
        self._quenched, self._name = transport._quenched, transport.name  # noqa: SLF001
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StallWatch:
        self._task = asyncio.get_running_loop().create_task(self._watch(),
                                                            name=f"mqtt-watch-{self._name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    def owed(self) -> bool:
        """Does the broker owe us an answer on this connection?"""
        client = self._client
        paho = client._client  # noqa: SLF001 - paho under aiomqtt
        return bool(paho._ping_t) or any(True for _ in client._pending_calls)  # noqa: SLF001

    def progress(self) -> tuple[Any, ...]:
        """Changes whenever a byte is read from the broker or more of ours is written."""
        paho = self._client._client  # noqa: SLF001
        head = paho._out_packet[0] if paho._out_packet else None  # noqa: SLF001
        return (paho._last_bytes_received, id(head),  # noqa: SLF001
                head["to_process"] if head else 0)

    async def _watch(self) -> None:
        paho = self._client._client  # noqa: SLF001
        owed_since: float | None = None
        last, moved = self.progress(), time.monotonic()
        while True:
            await asyncio.sleep(CHECK_S)
            if not paho.is_connected():
                owed_since, moved = None, time.monotonic()
                continue
            now = time.monotonic()
            token = self.progress()
            if token != last:
                last, moved = token, now
            if (self._quenched and not self.owed()
                    and now - paho._last_bytes_received >= PROBE_S):  # noqa: SLF001
                paho._send_pingreq()  # noqa: SLF001 - a flood is on: is the broker there?
            if not self.owed():
                owed_since = None
                continue
            owed_since = now if owed_since is None else owed_since
            if now - max(owed_since, moved) >= STALL_S:
                self._transport.stalls += 1
                log.warning("%s: the MQTT broker has owed us an answer for %.0f s and sent "
                            "nothing: dropping the connection to make a new one (the session "
                            "and un-acknowledged shares survive it)", self._name,
                            now - max(owed_since, moved))
                self._transport._drop_connection()  # noqa: SLF001 - its own transport
                owed_since, moved = None, now

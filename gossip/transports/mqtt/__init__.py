"""MQTT transport: shares through a broker the consortium already runs (aiomqtt).

Why aiomqtt and not asyncio-mqtt: asyncio-mqtt's last release (0.16.2) fails
at construction with paho-mqtt 2.x (`'Client' object has no attribute
'message_retry_set'`); aiomqtt (2.5, on paho-mqtt 2.2) is its maintained
successor and runs on the node's own asyncio loop (no thread).

Topics, client ids, the broker's address and its pinned TLS certificate, and the
size of a PUBLISH are in `broker.py`; the rest is here.

Admission before parsing: a message whose topic does not fit the layout (broker.py)
(another consortium, a name that is not a member's, our own name, a direct
share for someone else) is refused as `bad_topic` before its payload is looked
at, and acknowledged so the broker does not redeliver it. So are oversize
(`too_large`), non-binary (`malformed`) and retained (`retained`) messages.
All are counted in `stats.refused` and logged once per (peer, reason)
(`bad_topic` once per transport: its "peer" is whatever the topic says).

Fair intake per sender (`gossip.transports.base.FairInbox`). Messages are taken
off the socket in paho's own callback, not through aiomqtt's message queue
(unbounded, and one asyncio task per message), and queued per sender topic: at
most `inbox_depth` (default SENDER_QUEUE_MESSAGES = 256) messages and two
full-size envelopes of bytes per sender, and at most `sender_rate` messages a
second (default 50, burst 256). A message over its sender's share is dropped
at once, *before* its payload is parsed or its signature checked, and
acknowledged so the broker does not redeliver it: counted in
`stats.refused["flood"]` and, per sender, in `stats.flood_by_sender` (logged
once per sender). The node takes messages round-robin across senders, so a
flooder's backlog delays another member's message by at most one of its own.
Keying this on the topic's member name before verification is safe because the
broker's ACL lets each member account publish under its own prefix only: a
member can exhaust its own share, never another's (base.py says more). A
message the node is to use is acknowledged by the node, once the round that
used it is checkpointed (so it is persisted first), never by the transport on
arrival. A connection lost with messages still queued discards them (none was
acknowledged; the broker redelivers them on the next connection).

Delivery: QoS 1 (at least once), never `retain` (the broker would re-send a
retained share to every later subscriber). Sessions are persistent: MQTT 5
with `clean_start = False` and a session expiry, and a client id that is
stable per member, so shares published while a node is down are queued by
the broker and delivered when it reconnects. Acknowledgements are manual: the
node acks a share (`Incoming.ack`) once the round that used it is checkpointed,
so a node killed mid-round gets its open rounds' shares again. At-least-once
means the node may see a share twice; `envelope.Verifier` counts an identical
copy as the benign `duplicate`. `Incoming.ack` is idempotent (a second call,
or a call after a reconnect, sends nothing: the broker reuses packet ids).

Ack bound per sender (`max_unacked_per_sender`, default
min(DEFAULT_UNACKED_PER_SENDER = 16, receive_maximum // (members - 1))): the
broker stops sending to a client that holds `receive_maximum` messages
unacknowledged, so one member sending share after share the node parks (e.g.
for rounds far ahead) could stop all delivery. The transport counts, per
sender topic, the messages it handed to the node and the node has not
acknowledged; when a sender would exceed the bound, its *oldest* one is
acknowledged at once (counted in `early_acks[sender]`, logged once per
sender). Nothing is dropped: that message is already in the node's hands,
and only its redelivery after a crash is given up. An honest member has at
most (lookahead + 1) shares un-acked at a node plus the few messages still in
the inbox, so the node should pass `lookahead + 4` or more (the default 16
covers lookahead <= 12). With the bound, senders x bound <= receive_maximum:
no one sender can exhaust it. The receive maximum we announce is raised to
fit if a caller asks for more per sender (MQTT caps it at 65535). mosquitto
2.0 sizes its in-flight window to an MQTT 5 client by the client's Receive
Maximum, not by its own `max_inflight_messages` (measured: Receive Maximum 10
held delivery at 10 un-acked messages with `max_inflight_messages 10`, and 60
let 31 through).

Size: a broker with `max_packet_size` disconnects a client that sends a
larger packet, and aiomqtt's `publish()` then hangs until its timeout instead
of failing. So every publish is checked first against the smaller of the
broker's advertised Maximum Packet Size (MQTT 5 CONNACK) and our own cap, and
refused with a `LocalError` that names the sizes. Publish timeouts grow with
the payload. A lost connection is re-made with exponential backoff; the
session (subscriptions, queued shares) survives it; so does a connection the broker
stops answering (`watchdog.py`, measured behind a member's flood).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gossip.errors import LocalError, describe
from gossip.transports.base import (
    SENDER_QUEUE_ENVELOPES,
    SENDER_QUEUE_MESSAGES,
    FairInbox,
    Incoming,
    RateBudget,
    Transport,
    TransportFailed,
    TransportStats,
)
from gossip.transports.mqtt.broker import (
    BrokerAddress,
    BrokerCertMismatch,
    client_id,
    complete_packet_reads,
    consortium_prefix,
    direct_topic,
    pin_certificate,
    publish_packet_size,
    share_topic,
)
from gossip.transports.mqtt.watchdog import StallWatch

log = logging.getLogger("flnode.mqtt")

QOS = 1
# How long the broker keeps a member's session (subscriptions and queued
# shares) while it is away: a day covers a restart, a redeploy or a night's
# outage; a member gone longer catches up by skipping rounds anyway. The
# broker's own `max_queued_bytes` bounds what it holds meanwhile.
SESSION_EXPIRY_S = 24 * 3600
# A publish may take this long plus one second per MB (loopback measured
# 35-45 MB/s to 3 subscribers; a WAN link to a bank's broker far less).
BASE_TIMEOUT_S = 10.0
SECONDS_PER_MB = 1.0
# Reconnect backoff after a lost connection.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0
START_TIMEOUT_S = 30.0
# A publish while the connection is down waits this long for it to come back
# before the share is given up (counted as dropped).
CONNECT_WAIT_S = 10.0
KEEPALIVE_S = 60
# Incoming messages one sender may have waiting for the node; past this (or its
# rate) its messages are dropped before they are parsed (module docstring).
INBOX_DEPTH = SENDER_QUEUE_MESSAGES
# How long we stop listening to a member that sent more than its share (its topics
# unsubscribed): long enough that a flooder costs us one burst per QUENCH_S, short
# enough that a member whose burst was a mistake is back within a round or two.
QUENCH_S = 30.0
QUENCH_MAX_S = 3600.0  # ...doubling each time it floods again, up to an hour
# An UNSUBSCRIBE the broker has not acknowledged by then: reconnect (`_quench_for`).
UNSUBSCRIBE_TIMEOUT_S = 3.0
CLOSE_WAIT_S = 5.0  # close(): for our DISCONNECT to go out, then for the socket to end
# Unacknowledged messages the broker may have in flight to us: the node holds the
# acks of the shares of its open rounds, (lookahead + 1) x (members - 1) of them.
RECEIVE_MAXIMUM = 1024
MQTT_MAX_RECEIVE_MAXIMUM = 65535
# Messages from one sender handed to the node and not yet acknowledged by it,
# before the transport acknowledges that sender's oldest (module docstring).
DEFAULT_UNACKED_PER_SENDER = 16


def publish_timeout(nbytes: int) -> float:
    return BASE_TIMEOUT_S + SECONDS_PER_MB * nbytes / 1e6


class MqttTransport(Transport):
    """One member's connection to the consortium's broker.

    Needs nothing from `node`: the consortium id, the member names and the
    credentials are passed in. `max_message_bytes` is the node's envelope cap;
    `max_packet_bytes`, if given, is the broker's packet limit as the operator
    knows it (the broker's own CONNACK figure wins when it is smaller).
    """

    def __init__(self, consortium_id: bytes, name: str, members: Sequence[str],
                 broker: BrokerAddress, *, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None,
                 cert_sha256: bytes | None = None,
                 max_message_bytes: int, max_packet_bytes: int | None = None,
                 allow_plaintext: bool = False, max_unacked_per_sender: int | None = None,
                 receive_maximum: int = RECEIVE_MAXIMUM, inbox_depth: int = INBOX_DEPTH,
                 sender_rate: RateBudget | None = None) -> None:
        if name not in members:
            raise LocalError(f"{name!r} is not a member of the consortium")
        if not broker.tls and not broker.loopback and not allow_plaintext:
            raise LocalError(
                f"broker {broker} is not on loopback: use mqtts:// (TLS) or, if the network "
                "path is protected otherwise, set gossip.mqtt.allow_plaintext = true")
        if ca_file is not None and not broker.tls:
            raise LocalError(f"gossip.mqtt.ca_file is set but the broker URL {broker} is not "
                             "mqtts://")
        self.consortium_id = consortium_id
        self.name = name
        self.peers = [m for m in members if m != name]
        self._peer_set = frozenset(self.peers)
        if max_unacked_per_sender is None:
            max_unacked_per_sender = max(1, min(DEFAULT_UNACKED_PER_SENDER,
                                                receive_maximum // max(1, len(self.peers))))
        if max_unacked_per_sender < 1:
            raise LocalError(f"max_unacked_per_sender must be >= 1, not {max_unacked_per_sender}")
        if inbox_depth < 1:
            raise LocalError(f"inbox_depth must be >= 1, not {inbox_depth}")
        self.max_unacked_per_sender = max_unacked_per_sender
        # What we announce in CONNECT: enough that the senders' bounds together fit.
        self.receive_maximum = min(MQTT_MAX_RECEIVE_MAXIMUM,
                                   max(receive_maximum, max_unacked_per_sender * len(self.peers)))
        # Per sender, the acks handed to the node and not yet called, oldest first.
        self._pending: dict[str, dict[_PendingAck, None]] = {}
        self.early_acks: Counter[str] = Counter()
        self.broker = broker
        self.username = username
        self._password = password
        self.ca_file = ca_file
        if cert_sha256 is not None and not broker.tls:
            raise LocalError(f"the consortium pins the broker's certificate "
                             f"(addresses.mqtt_cert_sha256) but the broker URL {broker} is not "
                             "mqtts://")
        self.cert_sha256 = cert_sha256
        self.max_message_bytes = max_message_bytes
        self.max_packet_bytes = max_packet_bytes
        self.broker_max_packet: int | None = None  # from the broker's CONNACK
        self.stats = TransportStats()
        self.prefix = consortium_prefix(consortium_id)
        # Per sender: (payload, connection generation, mid, qos), taken round-robin.
        self._fair = FairInbox(self.peers, max_messages=inbox_depth,
                               max_bytes=SENDER_QUEUE_ENVELOPES * max_message_bytes,
                               rate=sender_rate)
        self._arrived = asyncio.Event()  # set when a message is queued or we stop
        # Connections whose CONNACK paho has handled: a message's ack is valid only on
        # the connection it came on (set in paho's on_connect, before any PUBLISH).
        self._generation = 0
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Why the connection task ended without close() (a bug): incoming(), send and
        # broadcast raise TransportFailed with it.
        self._failure: str | None = None
        self._logged: set[tuple[str | None, str]] = set()
        # Members whose topics we have unsubscribed from because they flooded, until
        # when (loop time); and the tasks that unsubscribe and later resubscribe.
        self._quenched: dict[str, float] = {}
        self.quenches: Counter[str] = Counter()
        self._quench_tasks: set[asyncio.Task[None]] = set()
        self.connects = 0  # successful connections, for tests and logs
        self.stalls = 0  # connections dropped because the broker stopped answering

    # --- the interface ----------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = loop.create_task(self._connection_loop(), name=f"mqtt-{self.name}")
        self._task.add_done_callback(self._on_task_done)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.wait([self._ready, self._task], return_when=asyncio.FIRST_COMPLETED)
            if not self._ready.done():  # the connection task ended: a bug, say which
                exc = self._task.exception()
                raise LocalError(f"MQTT transport of {self.name!r} failed to start: "
                                 f"{describe(exc) if exc else 'ended'}")
            self._ready.result()
        except TimeoutError:
            await self.close()
            raise LocalError(f"MQTT broker {self.broker} not reachable in {START_TIMEOUT_S:.0f} s "
                             f"(is it running? does gossip.mqtt.broker or the member's "
                             f"addresses.mqtt point at it?)") from None
        except LocalError:
            await self.close()
            raise
        log.info("%s: connected to MQTT broker %s as %s", self.name, self.broker, self.username)

    def packet_limit(self) -> int:
        limits = [x for x in (self.max_packet_bytes, self.broker_max_packet) if x]
        return min(limits) if limits else 0

    def check_size(self, topic: str, data: bytes) -> None:
        """Refuse, before publishing, what the broker would answer by disconnecting us."""
        if len(data) > self.max_message_bytes:
            raise LocalError(f"share of {len(data)} bytes exceeds the cap of "
                             f"{self.max_message_bytes} (gossip.max_envelope_bytes); not published")
        limit = self.packet_limit()
        size = publish_packet_size(topic, len(data))
        if limit and size > limit:
            source = ("the broker's maximum packet size" if limit == self.broker_max_packet
                      else "gossip.mqtt.max_packet_bytes")
            raise LocalError(
                f"share of {len(data)} bytes makes an MQTT packet of {size} bytes, over {source} "
                f"of {limit} bytes (mosquitto: max_packet_size); not published: the broker would "
                "drop the connection. Raise the broker's limit or use a smaller model/encoding")

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """The connection task is owned by this transport (close() cancels and awaits
        it). Ending any other way is a dead transport, which the node must see."""
        if self._closed or (self._ready is not None and not self._ready.done()):
            return  # closing, or start() reports it
        exc = None if task.cancelled() else task.exception()
        cause = f"crashed: {describe(exc)}" if exc is not None else "ended"
        self._failure = (f"MQTT transport of {self.name!r} stopped: its connection task {cause}; "
                         "nothing can be sent or received any more (restart the node)")
        log.error("%s", self._failure)
        self._arrived.set()

    async def broadcast(self, data: bytes) -> None:
        """One publish on our share topic; the broker fans it out to every member."""
        await self._publish(share_topic(self.consortium_id, self.name), data)

    async def send(self, peer: str, data: bytes) -> None:
        if peer not in self.peers:
            raise LocalError(f"{peer!r} is not a neighbour of {self.name!r}")
        await self._publish(direct_topic(self.consortium_id, self.name, peer), data)

    async def incoming(self) -> AsyncIterator[Incoming]:
        """Messages as they arrive; ends at close(); raises TransportFailed if the
        connection task dies."""
        while True:
            if self._failure is not None:
                raise TransportFailed(self._failure)
            if self._closed:
                return
            nxt = self._fair.pop()
            if nxt is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            sender, (payload, generation, mid, qos) = nxt
            yield Incoming(payload, sender, self._hand_over(sender, generation, mid, qos))
            # A yield does not give the event loop a turn: without this, a sender whose
            # queue never empties would keep it from our own publishes and timers.
            await asyncio.sleep(0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._quench_tasks):
            task.cancel()
        if self._quench_tasks:
            await asyncio.wait(self._quench_tasks)
        if self._task is not None:
            self._task.cancel()
            # Awaited, not swallowed: a cancellation of close() itself still propagates.
            # A DISCONNECT that cannot go out (a stalled connection) is cut short.
            if not (await asyncio.wait([self._task], timeout=CLOSE_WAIT_S))[0]:
                self._drop_connection()
                await asyncio.wait([self._task], timeout=CLOSE_WAIT_S)
            if self._task.done() and not self._task.cancelled() and self._task.exception():
                log.error("%s: MQTT connection task had failed: %s", self.name,
                          describe(self._task.exception()))  # incoming() raised it already
        self._fair.clear()
        self._arrived.set()

    # --- publishing -------------------------------------------------------------
    async def _publish(self, topic: str, data: bytes) -> None:
        """Best effort after the size check: a share the broker did not take is counted."""
        if self._failure is not None:
            raise TransportFailed(self._failure)
        if self._closed:
            raise LocalError(f"transport of {self.name!r} is closed")
        self.check_size(topic, data)
        try:
            async with asyncio.timeout(CONNECT_WAIT_S):
                await self._connected.wait()
            assert self._client is not None
            await self._client.publish(topic, data, qos=QOS, retain=False,
                                       timeout=publish_timeout(len(data)))
        except (TimeoutError, aiomqtt.MqttError) as exc:
            self.stats.dropped += 1
            log.warning("%s: could not publish %d bytes on %s: %s", self.name, len(data), topic,
                        describe(exc) if not isinstance(exc, TimeoutError) else
                        f"broker not connected for {CONNECT_WAIT_S:.0f} s")
            return
        self.stats.bytes_sent += len(data)
        self.stats.messages_sent += 1

    # --- the connection ---------------------------------------------------------
    def _make_client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        # Tell the broker not to send us more than we would accept.
        props.MaximumPacketSize = self.max_message_bytes + 64 * 1024
        # The node acknowledges a share once the round that used it is checkpointed:
        # until then the broker holds it (and redelivers it to a restarted node).
        props.ReceiveMaximum = self.receive_maximum
        tls = None
        if self.broker.tls:
            tls = ssl.create_default_context(cafile=self.ca_file)
        client = aiomqtt.Client(
            self.broker.host, self.broker.port, username=self.username, password=self._password,
            identifier=client_id(self.consortium_id, self.name),
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
            keepalive=KEEPALIVE_S, tls_context=tls, timeout=BASE_TIMEOUT_S,
            logger=logging.getLogger("flnode.mqtt.paho"))
        # aiomqtt does not keep the CONNACK properties; the broker's Maximum
        # Packet Size is in them, so chain paho's callback to read it.
        paho = client._client  # noqa: SLF001 - see above
        complete_packet_reads(paho)
        if self.cert_sha256 is not None:
            pin_certificate(paho, self.cert_sha256, self.broker)
        paho.manual_ack_set(True)
        on_connect = paho.on_connect

        def record_connack(c: Any, userdata: Any, flags: Any, reason: Any,
                           properties: Any = None) -> None:
            limit = getattr(properties, "MaximumPacketSize", None)
            self.broker_max_packet = int(limit) if limit else None
            self._generation += 1
            on_connect(c, userdata, flags, reason, properties)

        paho.on_connect = record_connack
        # Messages go from paho's read straight to the per-sender queues (admission
        # before anything else), not through aiomqtt's unbounded queue.
        paho.on_message = self._on_message
        return client

    async def _connection_loop(self) -> None:
        assert self._ready is not None
        client = self._client = self._make_client()
        backoff = BACKOFF_MIN_S
        while not self._closed:
            try:  # (a connection the broker stops answering is dropped: watchdog.py)
                async with client, StallWatch(client, self):
                    self.connects += 1
                    # Acks from the last connection are void (the broker redelivers
                    # what they were for); nothing from it is pending any more.
                    self._pending.clear()
                    topics = [t for peer in self.peers if peer not in self._quenched
                              for t in self._topics_of(peer)]
                    # Sessions made before per-member subscriptions hold these wildcards,
                    # and a quench whose UNSUBSCRIBE got no answer left its member's
                    # topics: either would keep a quenched member's messages coming.
                    await client.unsubscribe([f"{self.prefix}/+/share",
                                              f"{self.prefix}/+/to/{self.name}",
                                              *(t for peer in self._quenched
                                                for t in self._topics_of(peer))])
                    if topics:
                        opts = SubscribeOptions(qos=QOS, noLocal=True)
                        await client.subscribe([(t, opts) for t in topics])
                    self._connected.set()
                    if not self._ready.done():
                        self._ready.set_result(None)
                    elif self.connects > 1:
                        log.info("%s: reconnected to MQTT broker %s", self.name, self.broker)
                    backoff = BACKOFF_MIN_S
                    # paho's callback does the receiving; wait for this connection's end.
                    # Shielded: cancelling a task that awaits a future cancels the future,
                    # and aiomqtt would then skip its DISCONNECT (and our last PUBACKs).
                    disconnected = client._disconnected  # noqa: SLF001 - aiomqtt's own
                    await asyncio.shield(disconnected)
                    raise aiomqtt.MqttError("disconnected by the broker")
            except MqttConnectError as exc:
                self._connected.clear()
                err = LocalError(f"MQTT broker {self.broker} refused user {self.username!r}: "
                                 f"{exc} (check gossip.mqtt.username, password_file and the "
                                 "broker's password file)")
                if not self._ready.done():
                    self._ready.set_exception(err)
                    return
                log.error("%s: %s; retrying in %.1f s", self.name, err, backoff)
            except aiomqtt.MqttError as exc:
                self._connected.clear()
                if isinstance(exc.__context__, BrokerCertMismatch):
                    err = LocalError(exc.__context__.args[0])
                    if not self._ready.done():
                        self._ready.set_exception(err)
                        return
                    log.error("%s: %s; retrying in %.1f s", self.name, err, backoff)
                elif isinstance(exc.__context__, ssl.SSLCertVerificationError):
                    err = LocalError(
                        f"TLS: the certificate of MQTT broker {self.broker} is not trusted "
                        f"({exc.__context__.verify_message}): set gossip.mqtt.ca_file to the "
                        "CA that signed it (PEM)" if self.ca_file is None else
                        f"TLS: the certificate of MQTT broker {self.broker} does not verify "
                        f"against gossip.mqtt.ca_file {self.ca_file} "
                        f"({exc.__context__.verify_message})")
                    if not self._ready.done():
                        self._ready.set_exception(err)
                        return
                    log.error("%s: %s; retrying in %.1f s", self.name, err, backoff)
                else:
                    log.warning("%s: MQTT connection to %s lost or failed (%s); retrying in %.1f s",
                                self.name, self.broker, describe(exc), backoff)
            self._connected.clear()
            self._discard_stale()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _discard_stale(self) -> None:
        """Messages received on the connection that just ended and not taken yet: none
        was acknowledged, so the broker redelivers them on the next connection, where
        their packet ids would mean other messages. Drop them."""
        stale = self._fair.clear()
        if stale:
            log.info("%s: %d messages of the lost connection discarded (the broker redelivers "
                     "them)", self.name, len(stale))

    def _send_ack(self, generation: int, mid: int, qos: int) -> None:
        """PUBACK, if the connection the message came on is still the current one
        (after a reconnect the broker redelivers it anyway)."""
        client = self._client
        if client is None or self._generation != generation:
            return
        paho = client._client  # noqa: SLF001 - aiomqtt has no manual ack
        if paho.is_connected():
            paho.ack(mid, qos)

    def _on_message(self, _paho: Any, _userdata: Any, message: Any) -> None:
        """paho's on_message, called from its socket read on our event loop: the
        admission checks, cheapest first, then the sender's queue. Must not raise
        (paho would re-raise it out of the read)."""
        generation, mid, qos = self._generation, message.mid, message.qos

        def ack_now() -> None:
            self._send_ack(generation, mid, qos)

        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = repr(message._topic)  # noqa: SLF001 - undecodable: refused below
        # The topic first, before the payload is looked at.
        sender = self._sender_of(topic)
        if sender is None:
            self._refuse("bad_topic", None, f"message on a topic that is not a member's: "
                         f"{topic[:120]!r}", ack_now)
            return
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            self._refuse("malformed", sender, f"non-binary payload on {topic[:120]!r}", ack_now)
            return
        if len(payload) > self.max_message_bytes:
            self._refuse("too_large", sender, f"{len(payload)} bytes, over the cap of "
                         f"{self.max_message_bytes}", ack_now)
            return
        if message.retain:
            # Shares are never retained; a retained one is stale by construction.
            self._refuse("retained", sender, f"retained message on {topic[:120]!r}", ack_now)
            return
        if not self._fair.admit(sender, len(payload)):
            # Over its share: dropped unparsed, and acknowledged (held un-acked it would
            # fill the broker's in-flight window to us). And we stop listening to it for
            # a while, so the broker neither sends us its flood nor queues it for us.
            self.stats.flood_by_sender[sender] += 1
            self._quench(sender)
            self._refuse("flood", sender, f"over its share of our intake ({self._fair.rate.rate:g} "
                         f"messages/s, {self._fair.max_messages} or "
                         f"{self._fair.max_bytes} bytes queued): dropped before verification",
                         ack_now)
            return
        self.stats.bytes_received += len(payload)
        self.stats.messages_received += 1
        self._fair.put(sender, (bytes(payload), generation, mid, qos), len(payload))
        self._arrived.set()

    def _topics_of(self, peer: str) -> list[str]:
        return [share_topic(self.consortium_id, peer),
                direct_topic(self.consortium_id, peer, self.name)]

    def _quench(self, sender: str) -> None:
        """Unsubscribe from a flooding member's topics for QUENCH_S, then subscribe again.

        Dropping its excess unparsed bounds our memory and verification, but we would
        still read every message it sends off the socket, and the broker would still
        queue them for us: one process publishing ~9,000 2 KB messages a second (QoS 0)
        filled the broker's queue for every member (mosquitto: "Outgoing messages are
        being dropped") and the honest members' shares with it. Unsubscribed, the broker
        sends us none of that member's messages (its honest ones neither: the flooder's
        loss, nobody else's) and everyone else's traffic flows."""
        if sender in self._quenched or self._closed:
            return
        loop = asyncio.get_running_loop()
        # Doubling for a member that keeps flooding: each time we listen again costs us
        # one burst of its flood.
        seconds = min(QUENCH_MAX_S, QUENCH_S * 2 ** self.quenches[sender])
        self._quenched[sender] = loop.time() + seconds
        self.quenches[sender] += 1
        log.warning("%s: %s sends more than its share (%g messages/s): not listening to its "
                    "topics for %.0f s (its messages meanwhile are lost to us; counted in "
                    "flood_by_sender)", self.name, sender, self._fair.rate.rate, seconds)
        task = loop.create_task(self._quench_for(sender, seconds),
                                name=f"mqtt-quench-{sender}")
        self._quench_tasks.add(task)
        task.add_done_callback(self._quench_tasks.discard)

    def _drop_connection(self) -> None:
        """End the current connection from our side; the connection loop makes a new one
        (the persistent session keeps what is queued for us)."""
        sock = None if self._client is None else self._client._client.socket()  # noqa: SLF001
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def _paho_connected(self) -> bool:
        return self._client is not None and self._client._client.is_connected()  # noqa: SLF001

    async def _quench_for(self, sender: str, seconds: float) -> None:
        topics = self._topics_of(sender)
        try:
            # (Also while the connection is still subscribing: the flood may begin then.)
            if self._paho_connected():
                assert self._client is not None
                try:
                    await self._client.unsubscribe(topics, timeout=UNSUBSCRIBE_TIMEOUT_S)
                except aiomqtt.MqttError as exc:
                    # Measured (mosquitto 2.0.11): once a QoS 0 flood has overflowed its
                    # queue for us ("Outgoing messages are being dropped"), the broker can
                    # stop answering this connection at all (no UNSUBACK, no PUBACK) until
                    # our next keepalive ping, up to a minute later. A new connection
                    # resumes the session at once; it leaves the flooder's topics out.
                    log.warning("%s: the broker did not acknowledge unsubscribing from %s "
                                "within %.0f s (%s): reconnecting", self.name, sender,
                                UNSUBSCRIBE_TIMEOUT_S, describe(exc))
                    self._drop_connection()
            await asyncio.sleep(seconds)
        finally:
            self._quenched.pop(sender, None)
        if self._paho_connected() and not self._closed:
            try:
                opts = SubscribeOptions(qos=QOS, noLocal=True)
                await self._client.subscribe([(t, opts) for t in topics],
                                             timeout=BASE_TIMEOUT_S)
            except aiomqtt.MqttError as exc:  # the reconnect subscribes it again
                log.info("%s: could not subscribe to %s again: %s", self.name, sender,
                         describe(exc))

    def _hand_over(self, sender: str, generation: int, mid: int, qos: int) -> _PendingAck:
        """The ack of a message given to the node; keeps each sender's un-acked count
        bounded by acknowledging its oldest early (module docstring)."""
        ack = _PendingAck(self, sender, generation, mid, qos)
        pending = self._pending.setdefault(sender, {})
        pending[ack] = None
        while len(pending) > self.max_unacked_per_sender:
            oldest = next(iter(pending))
            oldest()  # removes itself from `pending`
            self.early_acks[sender] += 1
            if (sender, "early_ack") not in self._logged:
                self._logged.add((sender, "early_ack"))
                log.warning("%s: %s has more than %d messages we have not acknowledged yet; "
                            "acknowledging its oldest early so it cannot fill the broker's "
                            "in-flight window (further ones are counted in early_acks, not "
                            "logged)", self.name, sender, self.max_unacked_per_sender)
        return ack

    def queued(self, sender: str | None = None) -> int:
        """Messages received and not yet taken by the node (from `sender`, or all)."""
        return self._fair.queued(sender)

    def unacked(self, sender: str) -> int:
        """Messages from `sender` handed to the node and not acknowledged yet."""
        return len(self._pending.get(sender, ()))

    def _sender_of(self, topic: str) -> str | None:
        if not topic.startswith(self.prefix + "/"):
            return None
        parts = topic[len(self.prefix) + 1:].split("/")
        if parts[0] not in self._peer_set:  # not a member, or ourselves
            return None
        if len(parts) == 2 and parts[1] == "share":
            return parts[0]
        if len(parts) == 3 and parts[1] == "to" and parts[2] == self.name:
            return parts[0]
        return None

    def _refuse(self, reason: str, sender: str | None, detail: str,
                ack: Callable[[], None]) -> None:
        """Count and acknowledge (nothing to redeliver: it would be refused again); log
        once per (sender, reason). `sender` is a member name or None (bad_topic)."""
        ack()
        self.stats.refused[reason] += 1
        if (sender, reason) not in self._logged:
            self._logged.add((sender, reason))
            log.warning("%s: refused MQTT message%s: %s: %s (further ones are counted, not "
                        "logged)", self.name, f" from {sender}" if sender else "", reason, detail)


class _PendingAck:
    """`Incoming.ack` of a message handed to the node: sends the PUBACK once, however
    often it is called (the broker reuses packet ids once a message is acknowledged),
    and leaves its sender's count of un-acked messages."""

    __slots__ = ("_transport", "_sender", "_generation", "_mid", "_qos", "done")

    def __init__(self, transport: MqttTransport, sender: str, generation: int, mid: int,
                 qos: int) -> None:
        self._transport, self._sender = transport, sender
        self._generation, self._mid, self._qos = generation, mid, qos
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        t = self._transport
        pending = t._pending.get(self._sender)  # noqa: SLF001 - its own transport's table
        if pending is not None:
            pending.pop(self, None)
        t._send_ack(self._generation, self._mid, self._qos)  # noqa: SLF001


__all__ = ["MqttTransport"]

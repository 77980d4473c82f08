"""What the MQTT transport says to the broker and checks of it: the broker's address,
its pinned TLS certificate, topic names and client ids, the size of a PUBLISH, and
a fix to paho's packet reads. No connection of its own: `MqttTransport` uses these.

Topics, under one prefix per consortium (`flnode/<consortium id hex>`)::

    flnode/<id>/<member>/share         a member's broadcast (every member reads it)
    flnode/<id>/<member>/to/<peer>     a member's share for one peer

so a broker ACL can give each member write access to its own prefix only
(one `user` block per member, see `scripts/mqtt_broker.py`; never a `pattern
write`, which would apply to every account). A publish the ACL denies *returns
normally* and is dropped by the broker: the topic proves nothing by itself. The
sender is whoever signed the envelope; the topic's member name is a
`peer_hint` for logs and the key of the transport's per-sender intake and ack bound.

Client ids: `client_id()` is stable per member and consortium, but a broker
must bind the client id to the authenticated user (mosquitto:
`use_username_as_clientid true`, which `scripts/mqtt_broker.py` sets), or any
member could log in with another member's client id and take over its
persistent session. With that setting the session is keyed by the user name,
so a user name must be used by one member of one consortium only.

TLS pinning: with `addresses.mqtt_cert_sha256` in the consortium file, the broker's
certificate must have that SHA-256 (`pin_certificate`), checked after the TLS
handshake and before CONNECT carries the password.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from paho.mqtt.enums import MQTTErrorCode

from gossip.errors import LocalError

TOPIC_ROOT = "flnode"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Fixed header (1) + remaining length (<= 4) + topic length (2) + packet id (2)
# + MQTT 5 properties length (<= 4): what a PUBLISH adds besides topic and payload.
PUBLISH_OVERHEAD = 1 + 4 + 2 + 2 + 4


@dataclass(frozen=True)
class BrokerAddress:
    """`mqtt://host[:port]` (plain TCP) or `mqtts://host[:port]` (TLS)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, where: str) -> BrokerAddress:
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise LocalError(f"{where}: {text!r} is not an MQTT URL: {exc}") from None
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise LocalError(f"{where}: {text!r}: expected mqtt://HOST[:PORT] or "
                             "mqtts://HOST[:PORT]")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise LocalError(f"{where}: {text!r}: no path, query or credentials in the URL "
                             "(credentials go in [gossip.mqtt] username and password_file)")
        return cls(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme])

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_cert_fingerprint(text: str, where: str) -> bytes:
    """SHA-256 of the broker's DER certificate, as 64 hex digits (colons allowed, as
    `openssl x509 -noout -fingerprint -sha256` prints it)."""
    try:
        raw = bytes.fromhex(text.replace(":", "").strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise LocalError(f"{where}: {text[:80]!r} is not a SHA-256 fingerprint (64 hex digits; "
                         "`openssl x509 -in server.pem -noout -fingerprint -sha256`)")
    return raw


class BrokerCertMismatch(ssl.SSLError):
    """The broker's TLS certificate is not the one the consortium pinned."""


def pin_certificate(paho: Any, expected: bytes, broker: BrokerAddress) -> None:
    """Check the broker's certificate against the pinned SHA-256 after the TLS handshake
    and before paho sends CONNECT (with the password): paho's connect calls
    `_ssl_wrap_socket`, then `_send_connect`. Raised here, aiomqtt reports it as an
    MqttError whose __context__ is this."""
    wrap = paho._ssl_wrap_socket  # noqa: SLF001 - the step to check after

    def _ssl_wrap_socket(tcp_sock: Any) -> Any:
        sock = wrap(tcp_sock)
        der = sock.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).digest()
        if not hmac.compare_digest(got, expected):
            sock.close()
            raise BrokerCertMismatch(
                f"TLS: the certificate of MQTT broker {broker} has SHA-256 {got.hex()}, not "
                f"{expected.hex()} as the consortium file pins (addresses.mqtt_cert_sha256): "
                "not logged in, the password was not sent")
        return sock

    paho._ssl_wrap_socket = _ssl_wrap_socket  # noqa: SLF001


def consortium_prefix(consortium_id: bytes) -> str:
    return f"{TOPIC_ROOT}/{consortium_id.hex()}"


def share_topic(consortium_id: bytes, member: str) -> str:
    return f"{consortium_prefix(consortium_id)}/{member}/share"


def direct_topic(consortium_id: bytes, member: str, peer: str) -> str:
    return f"{consortium_prefix(consortium_id)}/{member}/to/{peer}"


def client_id(consortium_id: bytes, member: str) -> str:
    """Stable per member and consortium, so the broker finds the member's session again."""
    return f"flnode-{consortium_id.hex()[:16]}-{member}"


def publish_packet_size(topic: str, payload_len: int) -> int:
    return PUBLISH_OVERHEAD + len(topic.encode()) + payload_len


def complete_packet_reads(paho: Any) -> None:
    """Work around paho-mqtt 2.2's `Client._packet_read` (the TLS stall of 57-60 s).

    It stops after 100 recv() calls and returns MQTT_ERR_AGAIN even when the
    100th call completed the packet. The finished packet then sits in paho's
    buffer, unhandled, until the socket next becomes readable: usually the
    PINGRESP after this client's next keepalive ping, up to KEEPALIVE_S later.
    Over TLS each recv returns one 16 KB record at most, so a 50 MB share takes
    about 3,000 reads and roughly 1 in 100 subscriber-messages ends exactly on a
    100th read; over plain TCP reads are large and it almost never happens.
    Found by tracing the stuck subscriber (whole packet read, nothing left to
    process, SSL pending 0; publisher and broker idle). This hands such a
    packet on at once. Per client instance; a no-op unless the bug's condition
    holds."""
    packet_read = paho._packet_read  # noqa: SLF001 - the function being fixed

    def _packet_read() -> MQTTErrorCode:
        rc = packet_read()
        pkt = paho._in_packet  # noqa: SLF001
        while (rc == MQTTErrorCode.MQTT_ERR_AGAIN and pkt["command"] and pkt["have_remaining"]
               and pkt["to_process"] == 0):
            rc = packet_read()  # handles the complete packet and resets _in_packet
            pkt = paho._in_packet  # noqa: SLF001
        return rc

    paho._packet_read = _packet_read  # noqa: SLF001 - loop_read() calls self._packet_read()

#!/usr/bin/env python3
"""A mosquitto broker for a consortium on loopback: credentials, ACL, start, stop by PID.

From a consortium file it generates, in a directory of its own:

- a password file (`mosquitto_passwd -b`), one user per member (user name =
  member name, a random password), and each member's password in
  `<out>/<member>.password` (0600) for that member's `gossip.mqtt.password_file`;
- an ACL with one block per member (no `pattern` line: a pattern applies to
  every account, observers and any other account on the broker included)::

      user <member>
      topic write flnode/<consortium id>/<member>/share
      topic write flnode/<consortium id>/<member>/to/+
      topic read  flnode/<consortium id>/+/share
      topic read  flnode/<consortium id>/+/to/<member>

  and for each observer `user <observer>` + `topic read #` (read only);
  any other account gets no line and so can neither read nor write;
- `use_username_as_clientid true` in the config: the broker takes the client
  id from the authenticated user name, so a member cannot log in with another
  member's client id and take over its persistent session (and the queued
  shares in it). One broker account per member per consortium: two consortia
  sharing a broker need distinct user names, since the session is keyed by
  user name (and an account holds one connection at a time);
- a config from `network_configs/mosquitto/loopback.conf.template`;

then starts `mosquitto -c CONFIG` on a free 127.0.0.1 port and stops it by
PID. Run as root, mosquitto drops to the user `mosquitto`: the broker's files
then live in a directory of their own (0700, owned by that user), since a
run directory under someone's 0700 home or pytest's tmp is not readable by it.

    python scripts/mqtt_broker.py start --consortium consortium.toml --out DIR
    python scripts/mqtt_broker.py stop --out DIR
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gossip.errors import LocalError  # noqa: E402
from gossip.membership import Consortium, load_consortium  # noqa: E402
from gossip.transports.mqtt.broker import consortium_prefix  # noqa: E402
from scripts.ports import free_ports  # noqa: E402
from scripts.procs import stop as stop_process  # noqa: E402

TEMPLATE = ROOT / "network_configs" / "mosquitto" / "loopback.conf.template"
# 64 MiB envelopes (gossip.max_envelope_bytes) plus topic and MQTT framing.
MAX_PACKET_SIZE = 64 * 1024 * 1024 + 64 * 1024
# Per persistent session while a member is away: a few rounds of full shares.
MAX_QUEUED_MESSAGES = 1000
MAX_QUEUED_BYTES = 1024 * 1024 * 1024
# Unacknowledged QoS 1 messages the broker sends an MQTT 3 client before it waits
# for acks (for MQTT 5 clients, flnode's included, mosquitto 2.0 uses the client's
# Receive Maximum; gossip.transports.mqtt bounds each sender's share of it).
MAX_INFLIGHT_MESSAGES = 1000
START_TIMEOUT_S = 10.0
INSTALL_HINT = ("mosquitto is not installed: `apt-get update && apt-get install -y mosquitto` "
                "(make test and .ci/run do this)")


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None and shutil.which("mosquitto_passwd") is not None


def acl_text(consortium: Consortium, observers: list[str] | None = None,
             extra_lines: list[str] | None = None) -> str:
    """One `user` block per member and per observer; no `pattern` lines (a pattern
    applies to every account). `extra_lines` are appended as given (tests use them to
    give an outsider a prefix the ACL would never give it)."""
    prefix = consortium_prefix(consortium.id)
    members = {m.name for m in consortium.members}
    clash = sorted(members & set(observers or []))
    if clash:
        raise LocalError(f"observer account(s) {clash} have a member's name")
    lines = [f"# flnode consortium {consortium.name} ({consortium.id.hex()})",
             "# Each member (user name = member name) publishes only under its own prefix,",
             "# reads every member's broadcast and the shares addressed to it. No `pattern`",
             "# lines: a pattern applies to every account, observers included. An account",
             "# not listed here can neither read nor write anything."]
    for m in consortium.members:
        lines += [f"user {m.name}",
                  f"topic write {prefix}/{m.name}/share",
                  f"topic write {prefix}/{m.name}/to/+",
                  f"topic read {prefix}/+/share",
                  f"topic read {prefix}/+/to/{m.name}"]
    for name in observers or []:
        lines += ["# An observer reads everything, as the broker's operator can (what it sees",
                  "# must be ciphertext: gossip.seal), and writes nothing.",
                  f"user {name}", "topic read #"]
    return "\n".join(lines + list(extra_lines or [])) + "\n"


def make_tls_files(out: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `host` (and localhost), signed by it:
    (ca.pem, server.pem, server.key). Per run; the CA key is not kept."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flnode test broker CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = out / "ca.pem", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].touch(mode=0o600)
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class Broker:
    """A running mosquitto; `stop()` ends it by PID and removes its files."""

    port: int
    conf_dir: Path
    passwords: dict[str, str]
    password_files: dict[str, Path] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ca_file: Path | None = None  # set when the listener is TLS (mqtts://)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.ca_file else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.conf_dir, ignore_errors=True)
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def reload_acl(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)


def write_broker_files(consortium: Consortium, conf_dir: Path, port: int,
                       passwords: dict[str, str], extra_users: dict[str, str] | None = None,
                       max_packet_size: int = MAX_PACKET_SIZE,
                       observers: dict[str, str] | None = None,
                       tls: bool = False, max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
                       extra_acl: list[str] | None = None) -> Path:
    """Password file, ACL, TLS files if asked, and config in conf_dir; returns the
    config path."""
    passwd, acl, conf = conf_dir / "passwd", conf_dir / "acl", conf_dir / "mosquitto.conf"
    users = dict(passwords) | (extra_users or {}) | (observers or {})
    passwd.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                       capture_output=True)
    clash = sorted({m.name for m in consortium.members} & (set(extra_users or {})
                                                           | set(observers or {})))
    if clash:
        raise LocalError(f"extra or observer account(s) {clash} have a member's name")
    acl.write_text(acl_text(consortium, list(observers or {}), extra_acl))
    tls_settings = ""
    tls_files: tuple[Path, ...] = ()
    if tls:
        tls_files = make_tls_files(conf_dir)
        ca, cert, key = tls_files
        tls_settings = (f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
                        "tls_version tlsv1.2\nrequire_certificate false\n")
    conf.write_text(Template(TEMPLATE.read_text()).substitute(
        port=port, password_file=passwd, acl_file=acl, max_packet_size=max_packet_size,
        max_queued_messages=MAX_QUEUED_MESSAGES, max_queued_bytes=MAX_QUEUED_BYTES,
        max_inflight_messages=max_inflight_messages, tls_settings=tls_settings))
    if os.geteuid() == 0:  # mosquitto drops to this user and must read its files
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            user = None
        if user is not None:
            for path in (conf_dir, passwd, acl, conf, *tls_files):
                os.chown(path, user.pw_uid, user.pw_gid)
    return conf


def start_broker(consortium: Consortium, password_dir: Path | None = None, port: int | None = None,
                 extra_users: dict[str, str] | None = None,
                 max_packet_size: int = MAX_PACKET_SIZE,
                 observers: dict[str, str] | None = None, tls: bool = False,
                 max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
                 extra_acl: list[str] | None = None) -> Broker:
    """Start mosquitto for `consortium` on a free loopback port (or `port`).

    Members' passwords go to `password_dir/<member>.password` (0600) when given.
    `extra_users` (name -> password) get accounts and no ACL line: they can neither
    read nor write (tests use one as an outsider). `observers` (name -> password)
    may read every topic, as the broker's operator can (see `WireRecorder`), and
    write none. With `tls` the listener is TLS with a CA generated for this run
    (`broker.ca_file`). `max_inflight_messages` and `extra_acl` (lines appended to
    the ACL) are for tests.
    """
    if not mosquitto_available():
        raise LocalError(INSTALL_HINT)
    passwords = {m.name: secrets.token_urlsafe(24) for m in consortium.members}
    conf_dir = Path(tempfile.mkdtemp(prefix="flnode-mosquitto-"))
    broker = Broker(port or free_ports(1)[0], conf_dir, passwords)
    try:
        if password_dir is not None:
            password_dir.mkdir(parents=True, exist_ok=True)
            for name, password in passwords.items():
                path = password_dir / f"{name}.password"
                path.touch(mode=0o600)
                path.write_text(password + "\n")
                broker.password_files[name] = path
        conf = write_broker_files(consortium, conf_dir, broker.port, passwords, extra_users,
                                  max_packet_size, observers, tls, max_inflight_messages,
                                  extra_acl)
        if tls:
            broker.ca_file = conf_dir / "ca.pem"
        broker.log_path = Path(tempfile.mkstemp(prefix="flnode-mosquitto-", suffix=".log")[1])
        with open(broker.log_path, "ab") as out:
            broker.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        _wait_listening(broker)
    except BaseException:
        broker.stop()
        raise
    return broker


class WireRecorder:
    """Subscribes to `#` with an observer account and keeps every message it is sent:
    what a curious broker operator records. A paho client on its own thread."""

    def __init__(self, broker: Broker, username: str, password: str) -> None:
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"rec-{username}",
                                   protocol=paho.MQTTv5)
        self._client.username_pw_set(username, password)
        self._client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self._client.on_subscribe = lambda *_: self._ready.set()
        self._client.on_message = lambda _c, _u, m: self.messages.append((m.topic,
                                                                           bytes(m.payload)))
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise LocalError(f"wire recorder could not subscribe on {broker.url}")

    def stop(self) -> list[tuple[str, bytes]]:
        self._client.disconnect()
        self._client.loop_stop()
        return self.messages


def _wait_listening(broker: Broker) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert broker.proc is not None
        if broker.proc.poll() is not None:
            raise LocalError(f"mosquitto exited with {broker.proc.returncode} at start:\n"
                             f"{broker.log_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", broker.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise LocalError(f"mosquitto did not listen on 127.0.0.1:{broker.port} in "
                     f"{START_TIMEOUT_S:.0f} s:\n{broker.log_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="generate credentials + ACL and start mosquitto")
    s.add_argument("--consortium", required=True)
    s.add_argument("--out", required=True, help="members' password files and broker.pid go here")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--tls", action="store_true",
                   help="TLS listener with a CA generated for this broker (printed; members "
                        "set it as gossip.mqtt.ca_file and use mqtts://)")
    t = sub.add_parser("stop", help="stop the broker started with --out DIR, by its PID")
    t.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if args.command == "start":
            broker = start_broker(load_consortium(args.consortium), out, args.port,
                                  tls=args.tls)
            (out / "broker.pid").write_text(f"{broker.pid}\n{broker.conf_dir}\n")
            if broker.ca_file is not None:
                shutil.copy(broker.ca_file, out / "ca.pem")
            print(f"mosquitto pid {broker.pid} listening on {broker.url}; "
                  f"passwords in {out}/<member>.password; log {broker.log_path}"
                  + (f"; CA {out / 'ca.pem'}" if broker.ca_file else ""))
            return 0
        pid_file = out / "broker.pid"
        pid, conf_dir = pid_file.read_text().split()
        os.kill(int(pid), signal.SIGTERM)
        shutil.rmtree(conf_dir, ignore_errors=True)
        pid_file.unlink()
        print(f"stopped mosquitto pid {pid}")
        return 0
    except (LocalError, OSError, ValueError) as exc:
        print(f"mqtt_broker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

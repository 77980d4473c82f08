#!/usr/bin/env python3
"""Throughput of flnode's transports vs raw asyncio TCP and TLS on loopback.

For each size (1, 10, 50 MB by default) it moves one share-sized byte string
from a sender to one receiver and times it from the send call until the
receiver holds every byte (as the node sees it: through flnode's transport
and, for libp2p, the asyncio<->trio bridge). Baselines in the same run, same
payload: raw asyncio TCP and asyncio TLS (self-signed, TLS 1.3), both with an
8-byte length prefix like flnode's stream protocol. Each figure is the best
of --repeat runs (the machine is shared; the best is the least disturbed).

Prints a table; with --json only JSON on stdout: a list of
{"transport": "libp2p"|"tcp"|"tls", "size_mb": N, "peers": 1, "mb_per_s": X}.

`--transports mqtt` (and `mqtts`: the same through a TLS listener, records
with "tls": true) adds one sender and 3 receivers through a real mosquitto
(started on a free loopback port by scripts/mqtt_broker.py), unsealed and
sealed, each the node's whole path: sign (and seal once for all three), publish,
and on every receiver `envelope.Verifier.verify` (open, decode, check), so the
sealed/unsealed ratio is what sealing adds to a node. The baseline is one
sender writing the same bytes straight to 3 receivers over raw asyncio TCP:
records {"transport": "mqtt", "peers": 3, "sealed": bool, ...} and
{"transport": "tcp", "peers": 3, ...}, mb_per_s per peer (size / time until
the last receiver holds every byte).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MB = 1_000_000
PREFIX = 8


async def _read_framed(reader: asyncio.StreamReader) -> bytes:
    n = int.from_bytes(await reader.readexactly(PREFIX), "big")
    return await reader.readexactly(n)


async def bench_stream(payload: bytes, ssl_pair: tuple[ssl.SSLContext, ssl.SSLContext] | None
                       ) -> float:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await _read_framed(reader))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0,
                                        ssl=ssl_pair[0] if ssl_pair else None,
                                        limit=4 * 1024 * 1024)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port,
                                              ssl=ssl_pair[1] if ssl_pair else None,
                                              server_hostname="localhost" if ssl_pair else None)
    t0 = time.perf_counter()
    writer.write(len(payload).to_bytes(PREFIX, "big"))
    writer.write(payload)
    await writer.drain()
    data = await got
    elapsed = time.perf_counter() - t0
    assert data == payload
    writer.close()
    server.close()
    await server.wait_closed()
    return elapsed


def tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client = ssl.create_default_context(cafile=str(tmp / "cert.pem"))
    return server, client


async def bench_libp2p(payloads: dict[int, bytes], repeat: int) -> dict[int, float]:
    from nacl.signing import SigningKey

    from gossip.membership import Member
    from gossip.transports.libp2p import Libp2pTransport
    from scripts.ports import free_ports

    keys = [SigningKey.generate() for _ in range(2)]
    members = tuple(Member(f"bench-{i}", bytes(k.verify_key),
                           {"libp2p": f"/ip4/127.0.0.1/tcp/{port}"})
                    for i, (k, port) in enumerate(zip(keys, free_ports(len(keys)), strict=True)))
    cap = max(len(p) for p in payloads.values()) + 1024
    sender = Libp2pTransport(bytes(keys[0]), "bench-0", members, max_message_bytes=cap)
    receiver = Libp2pTransport(bytes(keys[1]), "bench-1", members, max_message_bytes=cap)
    await receiver.start()
    await sender.start()
    await sender.wait_connected(["bench-1"], timeout=20)
    incoming = receiver.incoming()
    best: dict[int, float] = {}
    try:
        for size, payload in payloads.items():
            for _ in range(repeat):
                t0 = time.perf_counter()
                await sender.send("bench-1", payload)
                msg = await anext(incoming)
                elapsed = time.perf_counter() - t0
                assert msg.data == payload
                best[size] = min(best.get(size, float("inf")), elapsed)
    finally:
        await sender.close()
        await receiver.close()
    return best


async def bench_tcp_fanout(payload: bytes, peers: int = 3) -> float:
    """One sender, `peers` receivers, the same bytes written to each (raw asyncio TCP)."""
    loop = asyncio.get_running_loop()
    got = [loop.create_future() for _ in range(peers)]
    servers, writers = [], []
    for fut in got:
        async def handle(reader, writer, fut=fut):
            fut.set_result(await _read_framed(reader))
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=4 * 1024 * 1024)
        servers.append(server)
        writers.append((await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]))[1])
    t0 = time.perf_counter()
    for w in writers:
        w.write(len(payload).to_bytes(PREFIX, "big"))
        w.write(payload)
    await asyncio.gather(*(w.drain() for w in writers))
    datas = await asyncio.gather(*got)
    elapsed = time.perf_counter() - t0
    assert all(d == payload for d in datas)
    for w in writers:
        w.close()
    for server in servers:
        server.close()
        await server.wait_closed()
    return elapsed


async def bench_mqtt(sizes: list[int], repeat: int, tls: bool = False
                     ) -> dict[tuple[int, bool], list[float]]:
    """One sender, 3 receivers through mosquitto, the node's own path end to end: sign
    (and seal) the share, publish, and on each receiver `Verifier.verify` (open, decode,
    check). Unsealed and sealed runs alternate (and swap order every repeat), so drift on a
    shared machine hits both alike."""
    import numpy as np
    from mqtt_broker import start_broker
    from nacl.signing import SigningKey

    from gossip import bodies, envelope
    from gossip.bodies import TensorSpec
    from gossip.envelope import KIND_PREKEY, KIND_SEALED, KIND_SHARE, Verifier
    from gossip.membership import Consortium, Member
    from gossip.seal import Sealing
    from gossip.transports.mqtt import MqttTransport
    from gossip.transports.mqtt.broker import BrokerAddress

    keys = [SigningKey.generate() for _ in range(4)]
    cons = Consortium("bench", {}, tuple(Member(f"bench-{i}", bytes(k.verify_key))
                                         for i, k in enumerate(keys)))
    names = [m.name for m in cons.members]
    members = {m.public_key: m.name for m in cons.members}
    sealings = [Sealing(cons.id, k, members, 5, 3) for k in keys]
    for i, (k, s) in enumerate(zip(keys, sealings, strict=True)):
        s.rotate(0)
        ann = envelope.pack(k, cons.id, KIND_PREKEY, 0, 0, s.announcement())
        for j, other in enumerate(sealings):
            if j != i:
                Verifier(cons.id, members, bytes(keys[j].verify_key), [], sealing=other
                         ).verify(ann, 0)
    cap = 64 * 1024 * 1024
    broker = start_broker(cons, tls=tls)
    ca = str(broker.ca_file) if tls else None
    ts = [MqttTransport(cons.id, n, names, BrokerAddress.parse(broker.url, "bench"), username=n,
                        password=broker.passwords[n], max_message_bytes=cap, ca_file=ca)
          for n in names]
    times: dict[tuple[int, bool], list[float]] = {}
    seq = 1
    try:
        for t in ts:
            await t.start()
        inboxes = [t.incoming() for t in ts[1:]]
        for size in sizes:
            weights = np.frombuffer(os.urandom(size * MB // 4 * 4), dtype="<f4")
            weights = np.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
            body = bodies.encode_share([("w", weights)], 1.0)
            spec = [TensorSpec("w", weights.shape)]
            for k in range(repeat):
                for sealed in ((False, True) if k % 2 == 0 else (True, False)):
                    verifiers = [Verifier(cons.id, members, bytes(k.verify_key), spec, cap,
                                          sealing=s if sealed else None)
                                 for k, s in zip(keys[1:], sealings[1:], strict=True)]

                    def pack(sealed: bool = sealed, seq: int = seq, body: bytes = body) -> bytes:
                        if not sealed:
                            return envelope.pack(keys[0], cons.id, KIND_SHARE, 0, seq, body)
                        recipients, _ = sealings[0].recipients(0, names[1:])
                        return envelope.pack(keys[0], cons.id, KIND_SEALED, 0, seq,
                                             sealings[0].seal(body, 0, recipients))

                    async def receive(inbox, verifier) -> envelope.Accepted:
                        msg = await anext(inbox)
                        accepted = await asyncio.to_thread(verifier.verify, msg.data, 0)
                        msg.ack()  # as the node does (once its round is checkpointed)
                        return accepted

                    t0 = time.perf_counter()
                    await ts[0].broadcast(await asyncio.to_thread(pack))
                    got = await asyncio.gather(*(receive(i, v) for i, v in
                                                 zip(inboxes, verifiers, strict=True)))
                    elapsed = time.perf_counter() - t0
                    seq += 1
                    assert all(np.array_equal(g.share.tensors["w"], weights) for g in got)
                    times.setdefault((size, sealed), []).append(elapsed)
    finally:
        for t in ts:
            await t.close()
        broker.stop()
    return times


async def run(sizes: list[int], repeat: int, transports: list[str]) -> list[dict]:
    payloads = {s: os.urandom(s * MB) for s in sizes}
    records = []
    brokered = [t for t in transports if t in ("mqtt", "mqtts")]
    if brokered:
        transports = [t for t in transports if t not in brokered]
        fan = {s: min([await bench_tcp_fanout(p) for _ in range(repeat)])
               for s, p in payloads.items()}
        for name in brokered:
            got = await bench_mqtt(sizes, repeat, tls=name == "mqtts")
            # The best run is the figure, the median the steadier one for ratios on a
            # shared machine; the slowest shows a stall if there was one.
            records += [{"transport": "mqtt", "tls": name == "mqtts", "size_mb": s, "peers": 3,
                         "sealed": sealed, "mb_per_s": round(s / min(got[s, sealed]), 2),
                         "median_mb_per_s": round(s / statistics.median(got[s, sealed]), 2),
                         "runs": len(got[s, sealed]),
                         "slowest_s": round(max(got[s, sealed]), 3)}
                        for s in sizes for sealed in (False, True)]
        records += [{"transport": "tcp", "size_mb": s, "peers": 3,
                     "mb_per_s": round(s / fan[s], 2)} for s in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        pair = tls_contexts(Path(tmp))
        timings: dict[str, dict[int, float]] = {}
        for name in transports:
            if name == "libp2p":
                timings[name] = await bench_libp2p(payloads, repeat)
                continue
            timings[name] = {}
            for size, payload in payloads.items():
                timings[name][size] = min([await bench_stream(payload, pair if name == "tls"
                                                              else None) for _ in range(repeat)])
    for name in transports:
        for size in sizes:
            records.append({"transport": name, "size_mb": size, "peers": 1,
                            "mb_per_s": round(size / timings[name][size], 2)})
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,10,50", help="comma-separated share sizes in MB")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    p.add_argument("--transports", default="libp2p,tcp,tls")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--out", help="also write the JSON records to this file")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    transports = args.transports.split(",")
    unknown = set(transports) - {"libp2p", "tcp", "tls", "mqtt", "mqtts"}
    if unknown:
        p.error(f"--transports: unknown {sorted(unknown)}")
    records = asyncio.run(run(sizes, args.repeat, transports))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    if args.json:
        print(json.dumps(records))
        return 0
    for r in records:
        if r["peers"] == 3:
            name = "mqtts" if r.get("tls") else r["transport"]
            print(f"{name:>5} 1->3{' sealed' if r.get('sealed') else '       '} "
                  f"{r['size_mb']:>4} MB {r['mb_per_s']:>9.1f} MB/s per peer"
                  + (f"  (best of {r['runs']}; median {r['median_mb_per_s']:.1f}; slowest "
                     f"{r['slowest_s']:.2f} s)" if "runs" in r else ""))
    records = [r for r in records if r["peers"] == 1]
    transports = [t for t in transports if t not in ("mqtt", "mqtts")]
    if not transports:
        return 0
    by = {(r["transport"], r["size_mb"]): r["mb_per_s"] for r in records}
    print(f"{'size':>6} " + " ".join(f"{t + ' MB/s':>12}" for t in transports)
          + ("   libp2p/tls" if {"libp2p", "tls"} <= set(transports) else ""))
    for s in sizes:
        row = f"{s:>4} MB " + " ".join(f"{by[(t, s)]:>12.1f}" for t in transports)
        if {"libp2p", "tls"} <= set(transports):
            row += f"   {by[('libp2p', s)] / by[('tls', s)]:>10.2f}x"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

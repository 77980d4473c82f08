"""Free TCP ports on 127.0.0.1 for simulations, benchmarks and tests."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS hands out now (all bound at once, so no repeats).

    A tiny race with other programs between closing and reuse is accepted.
    """
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports

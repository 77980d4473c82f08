"""py-libp2p without the host features a consortium node must not use.

py-libp2p's `host/basic_host.py` imports, whether or not a host enables them:
mDNS discovery (zeroconf: announces the node on the local network), UPnP port
mapping (asks the site's router to open a port), AutoTLS (an ACME client and a
public broker, over `requests`) and the circuit-relay NAT helper. A flnode host
enables none of them (gossip/transports/libp2p/__init__.py builds it with mDNS
and UPnP off and never runs the AutoTLS procedure), yet importing them costs every node
about 15 MB of its ~300 MB (measured: `import gossip.transports.libp2p` after
torch, 272 -> 257 MB peak) and brings code that talks to the LAN, the router and
the internet into a process that should talk to its members only.

`leave_out()` registers small stand-in modules under those module names before
libp2p is first imported. Each stand-in defines the names basic_host imports;
using any of them raises `RuntimeError` naming the feature, so a py-libp2p that
started to use one would fail loudly at once, never silently. Nothing is
patched on disk, and nothing is replaced once libp2p is already imported (then
this does nothing and says so by returning False). The package's `__init__`
calls it first, so importing this module (which runs the package) registers the
stand-ins unless libp2p was imported before. tests/test_lean.py checks
that the stand-ins still name everything the installed py-libp2p imports from
those modules, and that a host works with them.

QUIC too (`LEFT_OUT_QUIC`): a node listens and dials on TCP only, yet py-libp2p
imports its QUIC transport (and with it aioquic, service_identity and pyOpenSSL)
at its first import, and dnspython imports aioquic again for DNS-over-QUIC, which
nothing in a node asks for (a `/dns4/...` member address is resolved over plain
DNS). The QUIC stand-ins are classes (py-libp2p names them in type hints), whose
construction raises; dnspython is told DNS-over-QUIC is absent (its own
`dns._features.force`). Measured: 3.5 MB less RSS and ~50 fewer modules per node
(`import gossip.transports.libp2p` after torch, 39.2 -> 35.7 MB; docs/results/memory.md).
tests/test_libp2p_memory.py checks these stand-ins as test_lean checks the others.
"""

from __future__ import annotations

import sys
import types
from typing import Any

# module -> (what it is, the names basic_host imports from it)
LEFT_OUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "libp2p.discovery.mdns.mdns": ("mDNS discovery", ("MDNSDiscovery", "create_mdns_discovery")),
    "libp2p.discovery.upnp.upnp": ("UPnP port mapping", ("UpnpManager",)),
    "libp2p.security.tls.autotls.acme": ("AutoTLS (ACME)", ("ACMEClient", "compute_b36_peer_id")),
    "libp2p.security.tls.autotls.broker": ("AutoTLS (broker)", ("BrokerClient",)),
    "libp2p.relay.circuit_v2.nat": ("circuit-relay NAT detection", ("is_private_ip",)),
}


# The same for py-libp2p's QUIC transport (module docstring). Its `config` and
# `exceptions` modules stay real: light, and used outside QUIC (isinstance, except).
LEFT_OUT_QUIC: dict[str, tuple[str, tuple[str, ...]]] = {
    "libp2p.transport.quic.utils": ("QUIC transport", ("is_quic_multiaddr",)),
    "libp2p.transport.quic.transport": ("QUIC transport", ("QUICTransport",)),
    "libp2p.transport.quic.stream": ("QUIC transport", ("QUICStream",)),
    "libp2p.transport.quic.connection": ("QUIC transport", ("QUICConnection",)),
}


def _left_out_class(feature: str, name: str) -> type:
    """A stand-in class (py-libp2p uses these names in type hints): constructing one
    raises, as calling a `_LeftOut` does."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _LeftOut(feature, name)()

    return type(name, (), {"__init__": __init__, "__flnode_left_out__": True,
                           "__doc__": f"left out of flnode: {feature}"})


class _LeftOut:
    """A stand-in class or function: calling it (or instantiating it) raises."""

    def __init__(self, feature: str, name: str) -> None:
        self.feature, self.__name__ = feature, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"py-libp2p's {self.feature} ({self.__name__}) is left out of a "
                           "flnode node (gossip/transports/libp2p/trim.py): a consortium "
                           "host must not use it")

    def __repr__(self) -> str:
        return f"<left out of flnode: {self.feature} {self.__name__}>"


def leave_out() -> bool:
    """Register the stand-ins; False (and nothing done) if libp2p is already imported."""
    if "libp2p" in sys.modules:
        return False
    for table in (LEFT_OUT, LEFT_OUT_QUIC):
        for module, (feature, names) in table.items():
            if module in sys.modules:
                continue
            stub = types.ModuleType(module, f"left out of flnode: {feature}")
            stub.__dict__.update({
                n: _left_out_class(feature, n) if n[:1].isupper() and table is LEFT_OUT_QUIC
                else _LeftOut(feature, n) for n in names})
            stub.__dict__["__flnode_left_out__"] = True
            sys.modules[module] = stub
    _no_dns_over_quic()
    return True


def _no_dns_over_quic() -> None:
    """Tell dnspython (imported by py-libp2p's TCP transport through multiaddr) that
    DNS-over-QUIC is absent, so it does not import aioquic. Only before dnspython's
    first import of `dns.quic`; a dnspython without `_features.force` is left alone."""
    if "dns.quic" in sys.modules:
        return
    try:
        import dns._features  # lean start: only to switch DNS-over-QUIC off before libp2p
    except ImportError:
        return
    force = getattr(dns._features, "force", None)
    if force is not None:
        force("doq", False)

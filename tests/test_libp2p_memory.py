"""What a libp2p node holds for its members does not grow with their number (issue 24).

Each member had its own queue for the node (two full-size envelopes) and nothing
bounded all of them together: the worst case grew as members x 2 envelopes. Now all
queues together hold at most `max_queued_bytes`; a transfer past it waits for room
like one past its member's own queue, and room made by any member's message wakes it.
The pure bookkeeping is tested on `Admission`; the wait and the wake with real
py-libp2p hosts on 127.0.0.1 (waits are on states, with generous limits).
"""

from __future__ import annotations

import asyncio

import pytest
from nacl.signing import SigningKey

from gossip.errors import LocalError
from gossip.transports.libp2p import Libp2pTransport
from gossip.transports.libp2p.admission import MIN_QUEUED_BYTES, Admission
from tests.helpers import libp2p_members, until

MiB = 1024 * 1024


def test_all_members_queues_together_are_capped():
    a = Admission(MiB, max_queued_bytes=MiB)
    a.queue("m1", 600_000)
    assert a.has_room("m1", 400_000)  # its own queue (2 MiB) and the total both fit
    assert not a.has_room("m2", 600_000)  # m2's own queue is empty, but the total is full
    a.room_taken("m1", 600_000)
    assert a.has_room("m2", 600_000)
    assert a.queued_total == 0 and not a.queued and not a.queued_bytes  # no entry kept


def test_the_total_defaults_like_the_in_flight_budget_and_fits_one_envelope():
    assert Admission(MiB).max_queued_bytes == MIN_QUEUED_BYTES
    assert Admission(200 * MiB).max_queued_bytes == 400 * MiB
    with pytest.raises(LocalError, match="max_queued_bytes"):
        Admission(MiB, max_queued_bytes=MiB - 1)


async def test_past_the_total_a_transfer_waits_until_another_members_message_is_taken():
    ks = [SigningKey.generate() for _ in range(3)]
    members = libp2p_members(ks)
    t0, t1 = (Libp2pTransport(bytes(ks[i]), f"m{i}", members, MiB) for i in (0, 1))
    t2 = Libp2pTransport(bytes(ks[2]), "m2", members, MiB, max_queued_bytes=MiB)
    ts = (t0, t1, t2)
    for t in ts:
        await t.start()
    try:
        await t0.wait_connected(["m2"], 60)
        await t1.wait_connected(["m2"], 60)
        await t0.send("m2", b"a" * 600_000)  # takes 600 kB of m2's 1 MiB in total
        second = asyncio.create_task(t1.send("m2", b"b" * 600_000))
        await until(lambda: t2.waiting_for_room == 1, "m1's transfer waits for room")
        assert not second.done() and t2.queued("m1") == 0  # m1's own queue is empty
        inbox = t2.incoming()
        assert (await asyncio.wait_for(anext(inbox), 60)).peer_hint == "m0"
        await asyncio.wait_for(second, 60)  # m0's message taken: m1's acknowledged
        assert (await asyncio.wait_for(anext(inbox), 60)).peer_hint == "m1"
        assert t1.stats.messages_sent == 1 and t1.stats.dropped == 0
        assert t2.stats.refused["inbox_full"] == 0
        await until(lambda: t2.queued_total == 0, "both taken: nothing held")
    finally:
        for t in ts:
            await t.close()


# --- py-libp2p's QUIC transport is left out of a node (trim.py) -------------------------

def _python(code: str) -> str:
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_libp2p_node_loads_no_quic_code_and_a_quic_stand_in_raises():
    import json

    out = _python(
        "import sys, json\n"
        "import gossip.transports.libp2p\n"
        "from gossip.transports.libp2p.trim import LEFT_OUT_QUIC\n"
        "from libp2p.transport.quic.transport import QUICTransport\n"
        "try:\n    QUICTransport(None)\n    raised = ''\n"
        "except RuntimeError as e:\n    raised = str(e)\n"
        "print(json.dumps({'stubs': [getattr(sys.modules[m], '__flnode_left_out__', False)"
        " for m in LEFT_OUT_QUIC], 'loaded': sorted(x for x in ('aioquic', 'service_identity',"
        " 'OpenSSL') if x in sys.modules), 'raised': raised}))\n")
    got = json.loads(out)
    assert got["stubs"] == [True] * 4 and got["loaded"] == []
    assert got["raised"].startswith("py-libp2p's QUIC transport (QUICTransport) is left out")


def test_the_quic_stand_ins_name_everything_py_libp2p_imports_from_those_modules():
    """As test_lean checks the mDNS/UPnP/AutoTLS stand-ins: every `from M import names`
    of a left-out QUIC module outside py-libp2p's QUIC package is covered, and each name
    exists in the real module (an upgrade that renames or adds one fails here)."""
    import ast
    import importlib.util
    import json
    from pathlib import Path

    from gossip.transports.libp2p.trim import LEFT_OUT_QUIC

    root = Path(importlib.util.find_spec("libp2p").origin).parent
    wanted: dict[str, set[str]] = {m: set() for m in LEFT_OUT_QUIC}
    for path in root.rglob("*.py"):
        rel = ".".join(("libp2p", *path.relative_to(root).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.ImportFrom) and node.module in LEFT_OUT_QUIC
                    and node.level == 0 and not rel.startswith("libp2p.transport.quic")):
                wanted[node.module] |= {a.name for a in node.names}
    for module, (_, names) in LEFT_OUT_QUIC.items():
        assert wanted[module] <= set(names), (module, wanted[module] - set(names))
    real = _python(
        "import importlib, json\n"
        "import libp2p  # first, so the package's leave_out() keeps the real modules\n"
        "from gossip.transports.libp2p.trim import LEFT_OUT_QUIC\n"
        "print(json.dumps({m: [n for n in names if not hasattr(importlib.import_module(m), n)]"
        " for m, (_, names) in LEFT_OUT_QUIC.items()}))\n")
    assert json.loads(real) == {m: [] for m in LEFT_OUT_QUIC}

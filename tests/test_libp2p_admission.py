"""The libp2p transport's admission bookkeeping, without trio or a host (admission.py is
pure: the trio side asks and records there; the real-host tests are test_transport_limits)."""

import pytest

from gossip.errors import LocalError
from gossip.transports.libp2p.admission import QUENCH_MAX_S, QUENCH_S, Admission

MiB = 1024 * 1024


def test_limits_are_checked_and_defaulted():
    a = Admission(4 * MiB)
    assert a.max_peer_inflight_bytes == 5 * MiB  # one full share + 1 MiB of small messages
    assert a.max_inflight_bytes == 256 * MiB
    assert a.max_queue_bytes == 8 * MiB
    with pytest.raises(LocalError, match="max_message_bytes .* <= max_peer_inflight_bytes"):
        Admission(4 * MiB, max_peer_inflight_bytes=MiB)
    with pytest.raises(LocalError, match="must be positive"):
        Admission(MiB, max_streams_per_peer=0)


def test_handshakes_are_capped_per_ip_except_on_loopback_and_in_total():
    a = Admission(MiB, max_pending_handshakes=3, max_handshakes_per_ip=2)
    for _ in range(2):
        assert not a.handshake_over_limit("10.0.0.1")
        a.handshake_started("10.0.0.1")
    assert a.handshake_over_limit("10.0.0.1")  # its own cap
    assert not a.handshake_over_limit("127.0.0.1")  # loopback: only the global cap
    a.handshake_started("127.0.0.1")
    assert a.handshake_over_limit("10.0.0.2")  # the global cap, for everyone
    for ip in ("10.0.0.1", "10.0.0.1", "127.0.0.1"):
        a.handshake_ended(ip)
    assert a.handshakes == 0 and not a.handshakes_by_ip
    strict = Admission(MiB, max_handshakes_per_ip=1, per_ip_on_loopback=True)
    strict.handshake_started("127.0.0.1")
    assert strict.handshake_over_limit("127.0.0.1")


def test_bytes_in_flight_fit_both_budgets_and_are_given_back():
    a = Admission(4 * MiB, max_peer_inflight_bytes=5 * MiB, max_inflight_bytes=6 * MiB)
    assert a.fits("m1", 4 * MiB)
    a.reserve("m1", 4 * MiB)
    assert not a.fits("m1", 2 * MiB)  # m1's own budget
    assert a.fits("m2", 2 * MiB)
    a.reserve("m2", 2 * MiB)
    assert not a.fits("m3", 1)  # the global one
    a.release("m1", 4 * MiB)
    a.release("m2", 2 * MiB)
    assert a.reserved_total == 0 and not a.reserved


def test_streams_and_queue_room_per_member():
    a = Admission(MiB, max_streams_per_peer=2, inbox_depth=2)
    a.stream_opened("m1")
    a.stream_opened("m1")
    assert a.stream_over_limit("m1") and not a.stream_over_limit("m2")
    a.stream_closed("m1")
    a.stream_closed("m1")
    assert not a.streams
    a.queue("m1", 10)
    assert a.has_room("m1", 10)
    a.queue("m1", 10)
    assert not a.has_room("m1", 10) and a.has_room("m2", 10)  # depth 2: m1 is full
    a.room_taken("m1", 10)
    assert a.has_room("m1", 10)
    assert not a.has_room("m2", a.max_queue_bytes + 1)  # bytes too


def test_a_quench_doubles_each_time_up_to_its_cap_and_ends():
    a = Admission(MiB)
    assert a.quench("m1", now=0.0) == QUENCH_S
    assert a.quench("m1", now=1.0) is None  # already quenched: not extended
    assert a.quenched("m1", QUENCH_S - 1) and not a.quenched("m1", QUENCH_S + 1)
    assert a.quench("m1", now=100.0) == 2 * QUENCH_S
    for _ in range(20):
        seconds = a.quench("m1", now=1e9 * (a.quenches["m1"] + 1))
    assert seconds == QUENCH_MAX_S
    assert not a.quenched("m2", 0.0)

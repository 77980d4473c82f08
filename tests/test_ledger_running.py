"""The ledger's per-round hot paths (issue 22, many small secure rounds): epsilon adds only
the records charged since the last call (accountant.RunningRdp), the checkpoint's ledger
digest hashes only the new ones, and the simulator's whole-file rewrite never opens with
O_TRUNC. Each gives exactly what the computation from scratch gives: the same bits."""

from __future__ import annotations

import dataclasses
import os

import pytest

from node.privacy import accountant, secure_record
from node.privacy.accountant import LedgerRecord, epsilon_of
from node.privacy.distributed import choose_granularity
from node.privacy.ledger import Ledger, ledger_digest
from node.privacy.secure import SecurePlan, charge_secure_round
from node.runtime import state
from node.runtime.state import atomic_write, unsynced

DELTA = 1e-5


def plan(**over) -> SecurePlan:
    base = SecurePlan(epsilon=None, delta=DELTA, members=8, coalition=2, min_contributors=6,
                      variant="sum_only", dim=4810, clip_norm=1.0,
                      granularity=choose_granularity(1.0, 4810), noise_multiplier=4.0,
                      sample_rate=0.25, steps=40, rows_total=1437, lr=0.8)
    return dataclasses.replace(base, **over)


def test_epsilon_digest_and_the_next_charge_equal_the_whole_ledger_recomputed(tmp_path):
    """A ledger of mixed kinds (count releases, secure rounds at two floors and two
    sigmas): after every charge, epsilon, epsilon with one more charge, and the digest
    are == (not approx) those computed from a fresh list of the records."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.charge(LedgerRecord(-1, "count", 10.0, 1.0, 1, 1.0, "weight:x"))
    plans = [plan(), plan(noise_multiplier=3.0), plan(min_contributors=7)]
    for r in range(24):
        nxt = plans[r % 3].record(r, digest=f"d{r}")
        assert ledger.epsilon_with(nxt, DELTA) == epsilon_of([*ledger.records, nxt], DELTA)
        if r % 7 == 3:
            ledger.charge(LedgerRecord(r, "count", 8.0 + r, 1.0, 1, 1.0, f"s{r}"))
        else:
            charge_secure_round(ledger, plans[r % 3], round_=r, digest=f"d{r}")
        assert ledger.epsilon(DELTA) == epsilon_of(list(ledger.records), DELTA)
        assert ledger.epsilon(DELTA) == ledger.epsilon(DELTA)  # the memo
        assert ledger.epsilon(2 * DELTA) == epsilon_of(list(ledger.records), 2 * DELTA)
        assert ledger.digest() == ledger_digest(list(ledger.records))
    again = Ledger(path)
    assert again.epsilon(DELTA) == ledger.epsilon(DELTA)
    assert again.digest() == ledger.digest()


def test_a_list_changed_behind_the_ledger_is_gone_over_afresh(tmp_path):
    """RunningRdp and the digest keep their sums only while the list grows by appends: a
    shortened, replaced or edited list is summed from scratch (never a stale epsilon)."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    p = plan()
    for r in range(6):
        charge_secure_round(ledger, p, round_=r)
    full, digest = ledger.epsilon(DELTA), ledger.digest()
    ledger.records.pop()  # the same list, shorter
    assert ledger.epsilon(DELTA) == epsilon_of(list(ledger.records), DELTA) < full
    assert ledger.digest() == ledger_digest(list(ledger.records)) != digest
    ledger.records[-1] = p.record(4, contributors=8)  # the same length, another last record
    assert ledger.epsilon(DELTA) == epsilon_of(list(ledger.records), DELTA)
    assert ledger.digest() == ledger_digest(list(ledger.records))
    ledger.records = ledger.records[:2]  # another list
    assert ledger.epsilon(DELTA) == epsilon_of(list(ledger.records), DELTA)
    assert ledger.digest() == ledger_digest(list(ledger.records))
    ledger.records = []
    assert ledger.epsilon(DELTA) == 0.0 and ledger.digest() == ledger_digest([])


def test_a_record_without_noise_is_still_infinite(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    charge_secure_round(ledger, plan(), round_=0)
    assert ledger.epsilon_with(plan(noise_multiplier=0.0).record(1), DELTA) == float("inf")
    ledger.charge(plan(noise_multiplier=0.0).record(1))
    assert ledger.epsilon(DELTA) == float("inf") == epsilon_of(list(ledger.records), DELTA)


def test_each_secure_charge_is_summed_once_not_once_per_epsilon(tmp_path, monkeypatch):
    """The cost this removes: every epsilon (several a round) recomputed every charge's
    255 x 255 subsampling bound, so a run's accounting grew with rounds squared."""
    calls = []
    real = secure_record.record_rdp
    monkeypatch.setattr(secure_record, "record_rdp", lambda *a: calls.append(1) or real(*a))
    accountant._secure_rdp_cached.cache_clear()
    ledger = Ledger(tmp_path / "ledger.jsonl")
    p = plan(steps=200)
    for r in range(200):
        charge_secure_round(ledger, p, round_=r)
        ledger.epsilon(DELTA)
    assert len(calls) <= 2, len(calls)  # one distinct charge: computed once
    assert ledger.epsilon(DELTA) == epsilon_of(list(ledger.records), DELTA)


def test_unsynced_rewrite_never_truncates_to_zero_and_holds_exactly_the_bytes(tmp_path,
                                                                              monkeypatch):
    """ext4 starts a writeback (~3 ms) when a file opened with O_TRUNC is closed: the
    simulator rewrites the seq file per message signed. In place, then cut: same bytes."""
    flags = []
    real_open = os.open
    monkeypatch.setattr(state.os, "open", lambda p, f, *a: flags.append(f) or real_open(p, f, *a))
    path = tmp_path / "seq"
    with unsynced():
        for data in (b"1234567\n", b"12\n", b"", b"99999999999\n"):
            atomic_write(path, data)
            assert path.read_bytes() == data
            assert path.stat().st_mode & 0o777 == 0o600
    assert flags and not any(f & os.O_TRUNC for f in flags)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["record", "count"])
def test_a_ledger_without_secure_charges_keeps_opacus_orders(tmp_path, kind):
    """The running sum is the secure path's: a plain ledger's epsilon is what it was."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for r in range(5):
        ledger.charge(LedgerRecord(r, kind, 1.2, 0.1 if kind == "record" else 1.0, 3, 1.0, ""))
        assert ledger.epsilon(DELTA) == epsilon_of(list(ledger.records), DELTA)


def test_sign_many_reserves_once_and_signs_what_sign_would(tmp_path, monkeypatch):
    """A secure round's deals (one per other member) take their numbers with one durable
    reservation, written before any is signed; the messages and the seq file are byte for
    byte what signing them one by one gives."""
    from collections import Counter

    from nacl.signing import SigningKey

    from gossip.envelope import KIND_DEAL, decode_outer
    from node.runtime.identity import Identity
    from node.runtime.signer import Signer
    from node.runtime.state import StateDir

    ident = Identity("site-0", SigningKey(bytes(range(32))))
    one = Signer(ident, b"c" * 32, StateDir(tmp_path / "one"), None, Counter())
    many = Signer(ident, b"c" * 32, StateDir(tmp_path / "many"), None, Counter())
    one.seq = many.seq = 5
    bodies = [bytes([i]) * 40 for i in range(7)]
    expected = [one.sign(KIND_DEAL, 3, b) for b in bodies]
    writes: list[int] = []
    real = many.state.reserve_seq

    def reserve(n: int) -> None:
        assert many.seq == 5  # on disk before any number is used
        writes.append(n)
        real(n)

    monkeypatch.setattr(many.state, "reserve_seq", reserve)
    assert many.sign_many(KIND_DEAL, 3, bodies) == expected
    assert writes == [12] and many.seq == one.seq == 12
    assert [decode_outer(d).seq for d in expected] == list(range(5, 12))
    assert (tmp_path / "many" / "seq").read_bytes() == (tmp_path / "one" / "seq").read_bytes()
    assert many.sign_many(KIND_DEAL, 3, []) == [] and writes == [12]


def test_epsilon_asked_from_another_thread_while_charging_stays_exact(tmp_path):
    """The metrics endpoint's thread asks for epsilon while the event loop charges: every
    answer is the epsilon of some prefix of the charges (never fewer than were charged
    before the call: nondecreasing), and the last one is the whole ledger's."""
    import threading

    ledger = Ledger(tmp_path / "ledger.jsonl")
    p = plan(steps=300)
    seen: list[float] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            seen.append(ledger.epsilon(DELTA))

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for r in range(150):
            charge_secure_round(ledger, p, round_=r)
    finally:
        done.set()
        t.join()
    assert seen and all(a <= b for a, b in zip(seen, seen[1:], strict=False))
    assert ledger.epsilon(DELTA) == epsilon_of(list(ledger.records), DELTA) >= seen[-1]
    assert ledger.digest() == ledger_digest(list(ledger.records))


def test_sign_all_falls_back_to_a_wrapped_signers_own_sign():
    """A rehearsal's HostileSigner has no sign_many: its deals go through its sign (the
    replay attack keeps what it signed), one by one."""
    from node.runtime.signer import sign_all

    class Wrapped:
        def __init__(self) -> None:
            self.calls: list[bytes] = []

        def sign(self, kind: str, r: int, body: bytes) -> bytes:
            self.calls.append(body)
            return b"signed:" + body

    w = Wrapped()
    assert sign_all(w, "deal", 0, [b"a", b"b"]) == [b"signed:a", b"signed:b"]
    assert w.calls == [b"a", b"b"]

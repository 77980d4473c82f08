"""Clipping, OS noise, and epsilon recomputed from the ledger exactly as Opacus does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import stats

from gossip.errors import LocalError
from node.privacy import (
    Ledger,
    LedgerRecord,
    OsNoise,
    SeededNoise,
    clip,
    epsilon_of,
    privatize_update,
)


def record(r: int, sigma: float = 1.0) -> LedgerRecord:
    return LedgerRecord(round=r, mode="update", noise_multiplier=sigma, sample_rate=1.0, steps=1,
                        clip_norm=1.0, share_digest=f"{r:064x}")


def test_clip_bounds_the_norm_and_leaves_small_updates_alone():
    big = torch.full((100,), 1.0)  # norm 10
    clipped, norm = clip(big, 2.0)
    assert norm == pytest.approx(10.0)
    assert float(torch.linalg.vector_norm(clipped)) == pytest.approx(2.0, rel=1e-6)
    small = torch.full((4,), 0.1)
    assert torch.equal(clip(small, 2.0)[0], small)


def test_os_noise_is_gaussian_with_the_requested_std_and_never_repeats():
    noise = OsNoise()
    a = noise.gaussian(200_001, 0.5).double().numpy()
    assert a.shape == (200_001,)
    assert abs(a.mean()) < 0.01 and abs(a.std() - 0.5) < 0.01
    assert stats.kstest(a / 0.5, "norm").pvalue > 1e-6
    assert not np.array_equal(noise.gaussian(16, 1.0).numpy(), noise.gaussian(16, 1.0).numpy())


def test_seeded_noise_is_reproducible_for_simulation():
    assert torch.equal(SeededNoise(3).gaussian(10, 1.0), SeededNoise(3).gaussian(10, 1.0))


def test_privatized_update_is_clipped_then_noised_with_sigma_times_c():
    update = torch.full((50_000,), 1.0)
    out, norm = privatize_update(update, 1.0, 2.0, OsNoise())
    expected_signal = update / math.sqrt(50_000)  # clipped to norm 1
    residual = (out - expected_signal).double()
    assert residual.std().item() == pytest.approx(2.0, rel=0.03)


@pytest.mark.parametrize("sigmas", [[1.0] * 30, [0.8] * 5 + [1.5] * 10 + [0.8] * 3])
def test_ledger_epsilon_equals_opacus_accountant_stepped_directly(sigmas):
    acc = RDPAccountant()
    for s in sigmas:
        acc.step(noise_multiplier=s, sample_rate=1.0)
    ours = epsilon_of([record(i, s) for i, s in enumerate(sigmas)], 1e-5)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), abs=1e-6)


def test_ledger_persists_and_recomputes_epsilon(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for r in range(5):
        ledger.charge(record(r))
    again = Ledger(tmp_path / "ledger.jsonl")
    assert again.records == ledger.records
    assert again.epsilon(1e-5) == ledger.epsilon(1e-5) > 0
    assert Ledger(tmp_path / "empty.jsonl").epsilon(1e-5) == 0.0


def test_torn_last_line_is_dropped_but_corrupt_middle_refuses(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.charge(record(0))
    ledger.charge(record(1))
    with open(path, "ab") as f:
        f.write(json.dumps(record(2).__dict__).encode()[:20])  # crash mid-append
    assert [r.round for r in Ledger(path).records] == [0, 1]
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"{garbage"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LocalError, match="line 1 is corrupt"):
        Ledger(path)

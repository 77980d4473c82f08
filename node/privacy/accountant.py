"""The accountant: ledger records and epsilon by Opacus' RDP arithmetic.

`record` mode is charged per round as (sigma, q, steps) of DP-SGD; `update` mode at
sample rate 1 and one step per release. epsilon is always recomputed from the
ledger's records (node/privacy/ledger.py), so a crash can at worst over-count.
Opacus' RDP analysis is loaded from its file without torch or scipy (`flnode status`
stays lean).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from gossip.errors import LocalError
from node.privacy import secure_record, special

ACCOUNTANT = "rdp"
log = logging.getLogger("flnode.privacy")


@dataclass(frozen=True)
class LedgerRecord:
    round: int
    # "update" (whole-update Gaussian mechanism), "record" (DP-SGD steps) or
    # "count" (the noised row count, released once as the share weight) or
    # "normalize" (federated normalization's stats, once before round 1; node/learn/normalize.py)
    # or "secure" (a secure round of distributed DP-SGD: node/privacy/secure_record.py)
    mode: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    share_digest: str
    # mode "secure" only (a secure round's charge, node/privacy/secure_record.py): n, t,
    # m, d, the granularity, what the round opens. None for every other mode, and then
    # absent from the ledger line (a ledger without secure rounds is byte for byte as before).
    secure: dict | None = None


# Opacus' RDPAccountant.DEFAULT_ALPHAS (tests/test_lean.py checks they are still equal).
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


# The one line of opacus/accountants/analysis/rdp.py that imports scipy (opacus 1.4-1.6).
_SCIPY_IMPORT = "from scipy import special\n"


@functools.cache
def _opacus_rdp() -> ModuleType:
    """Opacus' RDP analysis (`opacus/accountants/analysis/rdp.py`), loaded from its file
    without running `opacus/__init__`, which imports torch and ~115 MB more: `flnode
    status` and the budget arithmetic need the accountant's formulas only.

    Its `from scipy import special` line (scipy.special: ~16 MB, ~0.3 s) is dropped and
    `special` bound to node/privacy/special.py, which has the two functions it calls (binom,
    log_ndtr). An opacus whose file lacks that exact line is loaded as it is (scipy),
    and that is logged. tests/test_lean.py checks epsilon_of against Opacus' own
    RDPAccountant and that no scipy is imported."""
    spec = importlib.util.find_spec("opacus")
    if spec is None or spec.origin is None:
        raise LocalError("the privacy accountant needs the opacus package: pip install opacus")
    return _load_rdp(Path(spec.origin).parent / "accountants" / "analysis" / "rdp.py")


def _load_rdp(path: Path) -> ModuleType:
    """An RDP analysis file as a module, `special` bound to node/privacy/special.py (see above)."""
    rdp_spec = importlib.util.spec_from_file_location("flnode_opacus_rdp_analysis", path)
    if rdp_spec is None or rdp_spec.loader is None or not path.exists():
        raise LocalError(f"the installed opacus has no RDP analysis at {path}")
    module = importlib.util.module_from_spec(rdp_spec)
    source = path.read_text(encoding="utf-8")
    used = set(re.findall(r"\bspecial\.(\w+)", source))
    if source.count(f"\n{_SCIPY_IMPORT}") == 1 and used <= {"binom", "log_ndtr"}:
        module.special = special  # type: ignore[attr-defined]
        # Same line count (the import becomes a blank line): tracebacks keep their lines.
        code = compile(source.replace(f"\n{_SCIPY_IMPORT}", "\n\n"), str(path), "exec")
        exec(code, module.__dict__)
    else:
        log.info("opacus' RDP analysis (%s) has no line %r, or calls scipy.special "
                 "functions other than binom and log_ndtr (%s): loaded as it is, with scipy",
                 path, _SCIPY_IMPORT.strip(), ", ".join(sorted(used)))
        rdp_spec.loader.exec_module(module)
    return module


def epsilon_of(records: list[LedgerRecord], delta: float, running: RunningRdp | None = None,
               extra: list[LedgerRecord] | None = None) -> float:
    """Total epsilon at delta for these releases, by Opacus' RDP accountant's arithmetic
    (RDPAccountant.get_epsilon: compute_rdp per (sigma, q, steps), summed over the
    history, converted at the best of the default orders). `extra`: releases after
    `records` (a charge about to be made). `running`: `records`' sum kept between calls
    (a Ledger's; RunningRdp): the same epsilon, to the last bit, as without it."""
    extra = extra or []
    if not records and not extra:
        return 0.0
    unnoised, secure = running.flags(records) if running is not None else _flags(records)
    unnoised_x, secure_x = _flags(extra)
    if unnoised or unnoised_x:
        return math.inf
    analysis = _opacus_rdp()
    if secure or secure_x:
        total = (running.total(analysis) if running is not None
                 else _rdp_sum(analysis, records, _zeros()))
        return _epsilon_from_rdp(analysis, _rdp_sum(analysis, extra, total), delta)
    records = [*records, *extra]
    history: list[tuple[float, float, int]] = []
    for r in records:  # merge runs of identical steps as Opacus' own step() does
        if history and history[-1][:2] == (r.noise_multiplier, r.sample_rate):
            history[-1] = (r.noise_multiplier, r.sample_rate, history[-1][2] + r.steps)
        else:
            history.append((r.noise_multiplier, r.sample_rate, r.steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal alpha at the edge
        rdp = sum(analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
                  for sigma, q, steps in history)
        eps, _ = analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


# A ledger with secure-round charges: every record's RDP at the integer orders 2..256 (the
# secure charge's amplification bound holds at integers only; Opacus' Gaussian RDP holds at
# every order), summed in the ledger's order, converted by Opacus' get_privacy_spent. A
# ledger without them keeps epsilon_of's own orders: its epsilon is what it always was.
_SECURE_ORDERS = list(secure_record.ORDERS)
# Distinct secure charges whose RDP vector is kept (a run charges the same parameters every
# round: a handful; each vector is 255 floats).
RDP_CACHE = 256


def _zeros() -> np.ndarray:
    return np.zeros(len(_SECURE_ORDERS))


def _rdp_sum(analysis: ModuleType, records: list[LedgerRecord], total: np.ndarray
             ) -> np.ndarray:
    """total + each record's RDP, added one by one in order (the order fixes the bits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal alpha at the edge
        for r in records:
            total = total + _record_rdp(analysis, r)
    return total


def _record_rdp(analysis: ModuleType, r: LedgerRecord) -> np.ndarray:
    if r.mode != secure_record.MODE:
        return np.asarray(analysis.compute_rdp(q=r.sample_rate, noise_multiplier=r.noise_multiplier,
                                               steps=r.steps, orders=_SECURE_ORDERS))
    assert r.secure is not None, "a secure charge without its parameters"
    s = r.secure
    try:  # what record_rdp reads, each value with its type ("delta", "epsilon_after": never)
        key = tuple((type(v), v) for v in (
            r.noise_multiplier, r.sample_rate, r.steps, r.clip_norm,
            *(s[k] for k in _SECURE_READ)))
        hash(key)
    except (KeyError, TypeError):  # not a charge flnode writes: computed as it is, uncached
        return secure_record.record_rdp(s, r.noise_multiplier, r.sample_rate, r.steps,
                                        r.clip_norm)
    return _secure_rdp_cached(key)


# The "secure" parameters record_rdp reads (secure_record.py: "delta" and "epsilon_after"
# are for the reader only).
_SECURE_READ = ("members", "coalition", "contributors", "dim", "granularity", "beta", "reveal")


@functools.lru_cache(maxsize=RDP_CACHE)
def _secure_rdp_cached(key: tuple) -> np.ndarray:
    """One secure charge's RDP (record_rdp: a 255 x 255 subsampling bound, ~1 ms; every
    round charges the same), computed once per distinct `key`. Read-only: it is shared."""
    sigma, q, steps, clip, *rest = (v for _, v in key)
    out = secure_record.record_rdp(dict(zip(_SECURE_READ, rest, strict=True)), sigma, q, steps,
                                   clip)
    out.setflags(write=False)
    return out


def _epsilon_from_rdp(analysis: ModuleType, total: np.ndarray, delta: float) -> float:
    if not np.any(np.isfinite(total)):
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = analysis.get_privacy_spent(orders=_SECURE_ORDERS, rdp=total, delta=delta)
    return float(eps)


def _flags(records: list[LedgerRecord]) -> tuple[bool, bool]:
    """(a record without noise: epsilon is infinite, a secure charge: the integer orders)."""
    return (any(r.noise_multiplier <= 0 for r in records),
            any(r.mode == secure_record.MODE for r in records))


class RunningRdp:
    """What epsilon_of needs of a ledger's records, kept between calls so that each call
    looks only at the records charged since: a secure run asks for epsilon several times
    a round, and going over the whole ledger each time grew with the square of the rounds
    (20 of a 43-round digits run's 38 CPU seconds; docs/results/secure.md). The RDP is
    summed with the additions of a sum from scratch, in the same order: the same bits.
    Kept only while it is handed the same list object grown by appends (Ledger.charge);
    anything else (a shorter list, another record at the kept end) is gone over afresh."""

    def __init__(self) -> None:
        self._of: list[LedgerRecord] | None = None
        self._seen = 0  # records[:_seen] are in the flags
        self._last: LedgerRecord | None = None
        self._unnoised = self._secure = False
        self._summed = 0  # records[:_summed] are in _total
        self._total = _zeros()

    def flags(self, records: list[LedgerRecord]) -> tuple[bool, bool]:
        """_flags(records), from the kept ones when `records` only grew since."""
        n, upto = self._seen, len(records)  # one length throughout (the list may grow)
        if not (records is self._of and n <= upto
                and (n == 0 or records[n - 1] is self._last)):
            self._of, n, self._summed, self._total = records, 0, 0, _zeros()
            self._unnoised = self._secure = False
        unnoised, secure = _flags(records[n:upto])
        self._unnoised, self._secure = self._unnoised or unnoised, self._secure or secure
        self._seen, self._last = upto, records[upto - 1] if upto else None
        return self._unnoised, self._secure

    def total(self, analysis: ModuleType) -> np.ndarray:
        """The RDP sum (secure orders) of the records the last flags() call was given."""
        assert self._of is not None
        self._total = _rdp_sum(analysis, self._of[self._summed:self._seen], self._total)
        self._summed = self._seen
        return self._total


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Opacus' Poisson loader: as many steps per epoch as the plain loader has batches."""
    return max(1, math.ceil(rows / batch_size))

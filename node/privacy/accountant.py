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


def epsilon_of(records: list[LedgerRecord], delta: float) -> float:
    """Total epsilon at delta for these releases, by Opacus' RDP accountant's arithmetic
    (RDPAccountant.get_epsilon: compute_rdp per (sigma, q, steps), summed over the
    history, converted at the best of the default orders)."""
    if not records:
        return 0.0
    if any(r.noise_multiplier <= 0 for r in records):
        return math.inf
    analysis = _opacus_rdp()
    if any(r.mode == secure_record.MODE for r in records):
        return _epsilon_with_secure(analysis, records, delta)
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


def _epsilon_with_secure(analysis: ModuleType, records: list[LedgerRecord], delta: float
                         ) -> float:
    """A ledger with secure-round charges: every record's RDP at the integer orders 2..256
    (the secure charge's amplification bound holds at integers only; Opacus' Gaussian RDP
    holds at every order), summed, converted by Opacus' get_privacy_spent. A ledger
    without them keeps epsilon_of's own orders: its epsilon is what it always was."""
    orders = list(secure_record.ORDERS)
    total = np.zeros(len(orders))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal alpha at the edge
        for r in records:
            if r.mode == secure_record.MODE:
                assert r.secure is not None, "a secure charge without its parameters"
                total = total + secure_record.record_rdp(r.secure, r.noise_multiplier,
                                                         r.sample_rate, r.steps, r.clip_norm)
            else:
                total = total + np.asarray(analysis.compute_rdp(
                    q=r.sample_rate, noise_multiplier=r.noise_multiplier, steps=r.steps,
                    orders=orders))
        if not np.any(np.isfinite(total)):
            return math.inf
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Opacus' Poisson loader: as many steps per epoch as the plain loader has batches."""
    return max(1, math.ceil(rows / batch_size))

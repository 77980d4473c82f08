"""The ledger's "secure" record kind: one charge per secure round (issue 22, distributed
DP-SGD), and its RDP. What the record holds, beside the common fields (round, mode =
"secure", noise_multiplier sigma, sample_rate q, steps, clip_norm C, share_digest):

    secure = {"members": n, "coalition": t, "contributors": m, "dim": d,
              "granularity": gamma, "beta": beta, "reveal": "sum" | "per_member",
              "delta": delta, "epsilon_after": epsilon at delta with this charge or null}

The accountant recomputes the charge's RDP from these parameters (never from a stored
curve, which an edit could lower): the sum's Skellam mechanism of node/privacy/distributed.py
at the integer orders 2..256, Poisson-subsampled at q, times steps, with per coordinate

- reveal "sum" (the round opens only the sum of the contributions): the noise of the
  m - t honest contributors, variance (m - t) * 2 mu, mu = (sigma C/gamma)^2 / (2 (n - t));
  m <= t leaves nothing: infinite.
- reveal "per_member" (the round opens a function of each contribution, as the robust
  selection's squared norms and distances do): one member's own noise, variance 2 mu. The
  whole round (sum, distances, norms, selection) is a function of the members' noised
  contributions, so releasing every contribution in full bounds it (post-processing);
  the record of member a is in a's contribution only. docs/privacy-secure.md.

The sensitivities are those of the conditional rounding: Delta2^2 = floor(rounded bound)
at c = C / gamma in d coordinates, Delta1 = min(Delta2^2, sqrt(d) Delta2). "delta" and
"epsilon_after" are for the reader (what the node saw when it charged); the accountant
uses neither.
"""

from __future__ import annotations

import numpy as np

from node.privacy.skellam import (
    ORDERS,
    finite_number,
    honest_variance,
    rounded_l2_bound_sq,
    sum_rdp,
)

MODE = "secure"
REVEALS = ("sum", "per_member")
SECURE_KEYS = frozenset({"members", "coalition", "contributors", "dim", "granularity", "beta",
                         "reveal", "delta", "epsilon_after"})
# A consortium of more members than this is not one flnode plans for (the secure round's
# pieces grow with n^2); a record saying so is an edit.
MAX_MEMBERS = 100_000
MAX_DIM = 2 ** 31  # parameters of a model (a record above this is an edit)
# c = C / gamma at most 2^MAX_SCALE_BITS (node/privacy/distributed.py), at least 1.
MAX_SCALED_CLIP = 2.0 ** 24


def _int(doc: dict, key: str, low: int, high: int) -> bool:
    v = doc.get(key)
    return type(v) is int and low <= v <= high


def _real(v: object) -> bool:
    return finite_number(v)


def problem(secure: object, clip_norm: float) -> str | None:
    """What is wrong with a record's "secure" field (None: a charge the accountant can take).
    Anything outside these ranges is an edit, not a charge flnode wrote."""
    if not isinstance(secure, dict) or set(secure) != SECURE_KEYS:
        return f"secure must be an object with exactly the keys {sorted(SECURE_KEYS)}"
    if not _int(secure, "members", 2, MAX_MEMBERS):
        return f"members {secure['members']!r} is not an integer in 2..{MAX_MEMBERS}"
    n = secure["members"]
    if not _int(secure, "coalition", 1, n - 1):
        return f"coalition {secure['coalition']!r} is not an integer in 1..{n - 1}"
    if not _int(secure, "contributors", 0, n):
        return f"contributors {secure['contributors']!r} is not an integer in 0..{n}"
    if not _int(secure, "dim", 1, MAX_DIM):
        return f"dim {secure['dim']!r} is not an integer in 1..{MAX_DIM}"
    gamma = secure["granularity"]
    if not (_real(gamma) and gamma > 0 and 1 <= clip_norm / gamma <= MAX_SCALED_CLIP):
        return f"granularity {gamma!r} is not in [clip / 2^24, clip]"
    if not (_real(secure["beta"]) and 0 < secure["beta"] < 1):
        return f"beta {secure['beta']!r} is not in (0, 1)"
    if secure["reveal"] not in REVEALS:
        return f"reveal {secure['reveal']!r} is not one of {REVEALS}"
    if not (_real(secure["delta"]) and 0 < secure["delta"] < 1):
        return f"delta {secure['delta']!r} is not in (0, 1)"
    eps = secure["epsilon_after"]
    if eps is not None and not (_real(eps) and eps >= 0):
        return f"epsilon_after {eps!r} is not a number >= 0 or null"
    return None


def noise_variance(secure: dict, sigma: float, clip_norm: float) -> float:
    """The honest noise variance per coordinate (integer units) the charge counts on."""
    n, t, m = secure["members"], secure["coalition"], secure["contributors"]
    honest = 1 if secure["reveal"] == "per_member" else m - t
    return honest_variance(sigma, clip_norm, secure["granularity"], n, t, honest)


def record_rdp(secure: dict, sigma: float, sample_rate: float, steps: int,
               clip_norm: float) -> np.ndarray:
    """RDP at ORDERS (2..256) of one secure charge (module docstring)."""
    if steps == 0:
        return np.zeros(len(ORDERS))
    l2_sq = rounded_l2_bound_sq(clip_norm / secure["granularity"], secure["dim"], secure["beta"])
    return sum_rdp(l2_sq, secure["dim"], noise_variance(secure, sigma, clip_norm), sample_rate,
                   steps)


def summary(records: list) -> dict | None:
    """What `flnode status` and `flnode report` show of a ledger's secure charges (None: no
    secure round was charged): how many, and the last one's parameters. The epsilon they
    show is the accountant's over the whole ledger, as for every other kind."""
    secure = [r for r in records if r.mode == MODE]
    if not secure:
        return None
    last = secure[-1]
    s = last.secure
    return {"rounds_charged": len(secure), "last_round": last.round, "reveal": s["reveal"],
            "members": s["members"], "coalition": s["coalition"],
            "contributors_charged": s["contributors"], "dim": s["dim"],
            "noise_multiplier": last.noise_multiplier, "sample_rate": last.sample_rate,
            "clip_norm": last.clip_norm, "delta": s["delta"],
            "epsilon_after_last": s["epsilon_after"]}

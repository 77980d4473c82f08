"""The public per-member bound of the range check (issue 22, variant "range": node/secagg/
range_check.py) under DP on the sum: the L2 norm an honest member's contribution stays
under, from the pinned plan alone, failing at most 2 x 2^-42 per member and round (the
check's own two tails take the other 2 x 2^-42: 2^-40 in all).

A member's contribution is the sum of its Poisson-sampled rows' rounded clipped examples
(each of L2 norm <= Delta2, enforced by the rounding) plus its Skellam noise share:

- signal: its sampled rows are Binomial(N_i, q) with N_i <= rows_total (a member's own
  rows are not in the plan: the bound is the whole consortium's, the same at every
  member), so <= qN + x, x = l/3 + sqrt(l^2/9 + 2 qN l), l = ln(2^42) (Bernstein); the
  signal's norm is at most that times Delta2.
- noise: d independent centered Skellam coordinates of variance V = 2 mu (one member's
  share); each within b (Bernstein, union over d at 2^-43), and given that, Hoeffding on the
  truncated squares: ||Z||^2 <= d V + b^2 sqrt(d l' / 2), l' = ln(2^43).

B = signal + noise (triangle inequality). What it does not stop: a member adding up to B
minus its honest norm (in particular the allowance for rows it does not have: a small
member can add about (B_rows - q N_i) Delta2), and, for sparse adversarial vectors, up to
the check's soundness factor beyond B (range_check.soundness_factor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from hashlib import blake2b
from typing import TYPE_CHECKING

import numpy as np

from node.privacy.secure import RANGE_FAILURE, SecurePlan
from node.runtime.secure_disputes import COMMIT_BYTES, challenge
from node.secagg import field as F
from node.secagg import range_check, robust
from node.secagg.pieces import DEGREE2, Piece
from node.secagg.range_check import RangeParams

if TYPE_CHECKING:
    from node.runtime.secure_round import SecureRound

# The two tails of an honest member's norm (rows sampled; its noise: split in two halves).
FAILURE_ROWS = 2.0 ** -42
FAILURE_NOISE = 2.0 ** -42
# the four tails are what the privacy plan leaves delta for (SecurePlan.range_delta)
assert FAILURE_ROWS + FAILURE_NOISE + range_check.FAILURE_PROJECTION + range_check.FAILURE_SLACK \
    <= RANGE_FAILURE


def member_norm_bound(plan: SecurePlan) -> float:
    """B in integer units (module docstring): an honest member's contribution has
    ||q|| <= B except with probability FAILURE_ROWS + FAILURE_NOISE."""
    mech = plan.mechanism()
    n_rows, q, dim = plan.rows_total, plan.sample_rate, mech.dim
    log_r = math.log(1 / FAILURE_ROWS)
    mean = q * n_rows
    rows = min(mean + log_r / 3 + math.sqrt(log_r ** 2 / 9 + 2 * mean * log_r), float(n_rows))
    var = 2 * mech.member_mu(plan.noise_multiplier)
    log_c = math.log(2 * dim / (FAILURE_NOISE / 2))  # per coordinate, union over d
    b = log_c / 3 + math.sqrt(log_c ** 2 / 9 + 2 * log_c * var)
    log_h = math.log(1 / (FAILURE_NOISE / 2))
    noise = math.sqrt(dim * var + b * b * math.sqrt(dim * log_h / 2))
    return rows * mech.l2_sensitivity + noise


def range_params_of(plan: SecurePlan) -> RangeParams:
    """The range check every member of a DP consortium runs: from the plan's d and B."""
    return RangeParams.build(plan.dim, member_norm_bound(plan))


# --- the round's side (node/runtime/secure_round.py calls these for variant "range") -------
#
# Deal: the VECTOR piece holds x (d), the witness (W) and the blinding value (robust
# deal_encoded(witness=...)); the commitment is the n piece digests as for every variant,
# then n digests of the holders' d-coordinate parts (`x_digest`). The projections come from
# the hash of those x digests (fixed before the witness exists), the check's coefficients
# and the dealing check's challenge from the hash of the whole commitment (fixed after).
# Both are Fiat-Shamir on the dealer's own commitment: a dealer may redraw its dealing to
# retry (range_check.SOUNDNESS_BITS per try; docs/privacy-secure.md "The range check").

def commit_bytes(params: robust.RoundParams) -> int:
    """A deal's commitment: n piece digests, and for variant range n x-part digests."""
    return COMMIT_BYTES * params.members * (2 if params.variant == "range" else 1)


def x_digest(values: np.ndarray) -> bytes:
    """One holder's d-coordinate part of a dealer's VECTOR piece, as committed."""
    return blake2b(np.ascontiguousarray(values, dtype="<u8").tobytes(), digest_size=COMMIT_BYTES,
                   person=b"flnode-sa-xpart").digest()


def _x_challenge(sr: SecureRound, dealer: int) -> bytes:
    n = sr.params.members
    return challenge(sr.consortium_id, sr.r, dealer, b"range" + sr.commitments[dealer][COMMIT_BYTES * n:])


def dealer_witness(sr: SecureRound, encoded: np.ndarray) -> Callable[[dict[int, np.ndarray]], np.ndarray]:
    """robust.deal_encoded's `witness` for our dealing of `encoded`: commits to the x parts
    (kept in `sr.x_commitment`), draws the projections from them and returns our witness;
    range_check.OutOfRange if our own vector fails its range (then we do not deal)."""
    def witness(parts: dict[int, np.ndarray]) -> np.ndarray:
        sr.x_commitment = b"".join(x_digest(parts[j]) for j in sorted(parts))
        sr.commitments[sr.i] = bytes(COMMIT_BYTES * sr.params.members) + sr.x_commitment
        u = range_check.projections(sr.rp, _x_challenge(sr, sr.i))
        return range_check.witness(sr.rp, u, encoded)
    return witness


def deal_fault(sr: SecureRound, vec: Piece, commitment: bytes) -> str | None:
    """The dealer's fault in our deal's x-part digest, or None."""
    n, j = sr.params.members, sr.i
    entry = commitment[COMMIT_BYTES * (n + j - 1):COMMIT_BYTES * (n + j)]
    if x_digest(vec.values[:sr.params.codec.dim]) != entry:
        return "its x-part digest for us does not match our piece"
    return None


def degree2_piece(sr: SecureRound) -> Piece:
    """Our masked range-check values of the entered dealers (range_check.check_piece)."""
    p, rp = sr.params, sr.rp
    d, n = p.codec.dim, p.members
    dealers = p.members_in(sr.entered, "dealers")
    u = {i: range_check.projections(rp, _x_challenge(sr, i)) for i in dealers}
    co = {i: range_check.coefficients(rp, challenge(sr.consortium_id, sr.r, i, sr.commitments[i]))
          for i in dealers}
    mask = F.sum_mod(np.stack([sr.masks[i].values[:n] for i in dealers]), axis=0)
    vals = range_check.check_piece(rp, sr.i, dealers, u, co,
                                   {i: sr.vectors[i].values[:d] for i in dealers},
                                   {i: sr.vectors[i].values[d:d + rp.width] for i in dealers},
                                   mask, n)
    return Piece(sr.r, DEGREE2, 0, sr.i, vals)


def select(sr: SecureRound, opened: Mapping[int, Piece]) -> tuple[robust.Selection, tuple[int, ...]]:
    """Decode the range checks (TooFewPieces / TooManyWrong as robust.open_degree2) and
    select the entered dealers in range; the wrong openers."""
    verdict = range_check.judge({j: pc.values for j, pc in opened.items()}, sr.entered,
                                sr.params.members, sr.params.threshold)
    return robust.select_in_range(sr.params, sr.entered, verdict.out_of_range), verdict.wrong

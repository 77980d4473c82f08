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

from node.privacy.secure import RANGE_FAILURE, SecurePlan
from node.secagg import range_check
from node.secagg.range_check import RangeParams

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

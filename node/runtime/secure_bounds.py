"""The L2 bound of an honest DP-on-the-sum aggregate (issue 22, variant sum_only with
`privacy.mode = "record"`): what the opened sum of the selected members may weigh before
the round is failed (`aggregate_too_large`, node/runtime/secure_round.py `finish`).

The coordinate bound the encoding checks (node/privacy/distributed.py coordinate_bound)
lets a hostile member fill every coordinate up to it: sqrt(d) times an honest sum's norm.
This bound is on the norm, from the plan's public numbers, and holds for an honest sum
except with probability at most 3 FAILURE:

- signal: the rows sampled this round, B ~ Binomial(rows_total, q) (Poisson sampling keeps
  each row with probability q), each a rounded clipped example of L2 norm at most Delta2
  (enforced by the rounding); Bernstein: B <= qN + x with x = L/3 + sqrt(L^2/9 + 2 qN L),
  L = ln(1 / FAILURE); the signal's norm is at most B Delta2.
- noise: n members' Skellam shares, per coordinate independent, centered, variance
  V = 2 n mu (n: every member, an upper bound for any m selected). On the event that every
  coordinate is within b (Bernstein per coordinate, union over d: failure FAILURE, the
  bound coordinate_bound uses), the truncated squares lie in [0, b^2] with mean <= V, and
  Hoeffding gives ||Z||^2 <= d V + b^2 sqrt(d L / 2) except with probability FAILURE.

So ||sum|| <= B_max Delta2 + sqrt(d V + b^2 sqrt(d L / 2)). What it does not stop: a hostile
member adding up to that bound minus an honest sum's actual norm (in particular the
unsampled rows' allowance, about (B_max - qN) Delta2, and the noise's slack)."""

from __future__ import annotations

import math

from gossip.bodies import (
    SECAGG_COMMIT_BYTES,
    SECAGG_VALUE_BYTES,
    SECAGG_WITNESS_MAX,
    secagg_piece_limits,
)
from node.privacy.secure import SecurePlan

# Each of the three tails (rows sampled, a coordinate of the noise, the noise's squared
# norm) fails an honest round with at most this probability: 3 x 2^-40 in all.
FAILURE = 2.0 ** -40


def sum_l2_bound(plan: SecurePlan, failure: float = FAILURE) -> float:
    """The L2 norm (integer units) an honest aggregate of any selected members stays under,
    except with probability 3 `failure` (module docstring)."""
    mech = plan.mechanism()
    n_rows, q, dim = plan.rows_total, plan.sample_rate, mech.dim
    log_f = math.log(1 / failure)
    mean = q * n_rows
    rows = mean + log_f / 3 + math.sqrt(log_f ** 2 / 9 + 2 * mean * log_f)
    var = 2 * mech.members * mech.member_mu(plan.noise_multiplier)
    log_c = math.log(2 * dim / failure)  # per coordinate, union over d
    b = log_c / 3 + math.sqrt(log_c ** 2 / 9 + 2 * log_c * var)
    noise = math.sqrt(dim * var + b * b * math.sqrt(dim * log_f / 2))
    return min(rows, float(n_rows)) * mech.l2_sensitivity + noise


# An envelope's frame and a msgpack body's own framing beyond its pieces' bytes (a real
# one is under 600 bytes), with room.
SECURE_FRAME_BYTES = 4096


def largest_secure_message(members: int, threshold: int, dim: int, witness: int = 0
                           ) -> tuple[str, int]:
    """The largest message a secure round makes an honest member send or receive, and its
    bytes at most: a deal, or an agreement carrying t reveals (an honest holder reveals one
    deal per dealer that cheated it: up to t). Review 2 F9: where it outgrows
    gossip.max_envelope_bytes, every round fails at run time (no deal fits), or t colluding
    dealers get an honest holder's agreement refused everywhere. `witness`: variant range's
    W (the receivers' limits allow up to SECAGG_WITNESS_MAX and a range commitment)."""
    unused = SECAGG_VALUE_BYTES * (SECAGG_WITNESS_MAX - witness) + \
        (0 if witness else SECAGG_COMMIT_BYTES * members)
    deal = sum(secagg_piece_limits("deal", members, dim)) - unused  # type: ignore[arg-type]
    agree = secagg_piece_limits("agree", members, dim)
    reveals = sum(agree[1:1 + threshold]) - threshold * unused  # type: ignore[arg-type]
    return max(("a deal", deal + SECURE_FRAME_BYTES),
               (f"an agreement with {threshold} reveal(s)", agree[0] + reveals + SECURE_FRAME_BYTES),
               key=lambda x: x[1])

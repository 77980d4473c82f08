"""Federated normalization: members agree each numeric column's mean and std before
round 1, without pooling rows and without a server.

With `normalize = "federated"` the schema declares each numeric column's `range`
[lo, hi] (domain knowledge, never read from rows) and no mean or std. Each member
computes, over its training rows, with every value clipped to its range and scaled
and centred to v = (x - lo) / (hi - lo) - 1/2 in [-1/2, 1/2]:

    rows = n,   sum_j = sum_i v_ij,   sumsq_j = sum_i v_ij^2          (k numeric columns)

One record changes the vector (rows, sum_1..k, sumsq_1..k) by at most
sqrt(1 + k (1/4 + 1/16)) = sqrt(1 + 5k/16) in L2 norm: that is the sensitivity
Delta (centring: 2.4x less noise than the uncentred sqrt(1 + 2k) at k = 30). With
record-level DP the member adds N(0, (sigma_n Delta)^2) to every value, sigma_n = the schema's
`normalize_noise` (default 10), and charges it to its ledger once, as one Gaussian
mechanism (noise multiplier sigma_n, sample rate 1, one step), before the message
leaves. The charge is part of the privacy plan (calibration leaves the rest of the
budget to training) and is never repeated: the signed message is stored and a
restart re-sends it. With privacy off the sums are exact (nothing is claimed).
Update-level DP protects a member's whole contribution per round, which one
record's sensitivity does not bound: federated normalization is refused there.

Every member waits for every member's stats message (signed, kind `stats`) and
combines them identically (`combine`: in member-name order, float64):

1. plausibility: a message whose noised counts and sums lie outside what an honest
   member could send (rows in (-t s, MAX_ROWS]; each sum in [-rows/2 - t s,
   rows/2 + t s] and sum of squares in [-t s, rows/4 + t s], s = sigma_n Delta the
   noise std, t for a 1e-9 tail) is refused (`bad_stats`) before anything is combined;
2. bounded contribution: the pooled moments are the members' own moments
   (sum / rows, sumsq / rows) weighed by their rows; the weights are capped by
   water-filling at the consortium's `max_weight_fraction` of the total
   (node/strategy/weights.py), so a member claiming 1e9 rows moves a mean by at
   most that fraction of the range (unchanged when nobody is over the cap);
3. m = sum_i p_i sum_i / rows_i, mean_u = 1/2 + m, var_u = sum_i p_i sumsq_i /
   rows_i - m^2, each clamped into what [0, 1] values allow; mean = lo + (hi - lo)
   mean_u, std = (hi - lo) sqrt(var_u), with
   std floored at STD_FLOOR x (hi - lo) (noise can drive a near-constant column's
   variance to 0), and std = 0 exactly when lo = hi (a constant column: encoded as 0).

Before any of that, at start and before anything is charged (`usability`, `resolve`):
the expected error of each agreed mean and std follows from public quantities alone,
the noise (sigma_n Delta per value), the members M, and the rows N (the schema's
`normalize_rows` where the consortium declared it, else estimated as M x this member's
training rows: each member checks with its own count). One noise
standard deviation moves an agreed mean by e = sigma_n Delta sqrt(M) / N of the range
and its variance by at most sqrt(2) e (sqrt(1 + (2m)^2) e, |m| <= 1/2); for a column
whose std is ASSUMED_SPREAD of its range, the check requires that to move the mean
by at most MAX_MEAN_ERROR std and the std by at most MAX_STD_ERROR of itself. Where it
does not hold, the schema's `normalize_fallback` decides: "refuse" (the default: stop, naming the columns, the
expected errors and the fixes) or "range" (scale by the declared ranges instead,
nothing released or charged: the whole schema, not column by column, so that every
member encodes alike).

The decision is the consortium's, not each member's (members whose own row counts
straddle the threshold would otherwise decide differently): before any statistics,
every member sends a signed vote (kind `norm`, one byte): "usable" or "range" (its
check fails and normalize_fallback = "range"). Every member waits for every member's
vote; if any says "range", all scale by the declared ranges (`range_agreed`: recorded
in normalization.json with mode "range", the members that voted for it and why) and
nobody computes, charges or sends statistics; else all go on to the statistics. The
rule is deterministic: the same votes give the same decision, and its digest goes into
every share like the statistics' (a member that decided otherwise is refused,
`norm_mismatch`). What a vote tells: without `normalize_rows`, whether this member's
training rows reach rows_needed / M (one bit of its row count, exact, not covered by
the ε: declare `normalize_rows` where that bit is sensitive, then every vote is the
same function of public values). What a hostile member can do with its vote: force
range scaling (it costs no privacy, maybe accuracy: the same as any member that is
truly small), or withhold it (every member stops after gossip.normalize_wait_s naming
it, nothing charged), or send different votes to different members (those that saw
"range" scale by ranges, the others charge and send statistics, wait for the first
group's and stop after gossip.normalize_wait_s naming them: loud, never a silent mix).
With normalize_fallback = "refuse" a member whose check fails stops at start; the
others wait for its vote and stop after gossip.normalize_wait_s naming it.

The agreed statistics' digest (`stats_digest`) goes into every share the member
signs; a receiver refuses a share whose digest differs from its own
(`norm_mismatch`), so members that combined different messages find out at once.
What that cannot do: tell who caused it. A member that sends different stats to
different members splits the consortium into groups that refuse each other's
shares; the audit log of each names the digests, so the split is visible, not
silent.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gossip.bodies import Stats
from gossip.errors import LocalError
from node.data.encode import apply_missing, column_values
from node.data.table import Table
from node.privacy.accountant import LedgerRecord, epsilon_of
from node.privacy.mechanisms import snap, stat_grid

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_NORMALIZE_NOISE = 10.0
# No member has more rows than this (a plausibility bound, not a privacy one).
MAX_ROWS = 1e12
# The noise tail a plausibility check allows: P(an honest value beyond t s) <= 1e-9.
TAIL_T = math.sqrt(2 * math.log(1 / 1e-9))
STD_FLOOR = 1e-3
# The check at start (`usability`): a column is assumed to have a std of at least this
# fraction of its declared range (a range much wider than the column's spread wastes
# the resolution of range scaling too, see `range_report`) ...
ASSUMED_SPREAD = 0.1
# ... and one noise standard deviation may move its agreed mean by at most this many of
# its stds, and its agreed std by at most this fraction of itself.
MAX_MEAN_ERROR = 0.25
MAX_STD_ERROR = 0.25
# A member's rows beyond its declared range: warn when more than this fraction of a
# column is clipped (`range_report`, a local check that releases nothing).
CLIP_WARN = 0.01


def provisional_schema(schema):
    """Encodable stand-in before the statistics are agreed: mean = lo, std = hi - lo.
    Rows encoded with it are never trained on (the node re-encodes first)."""
    return schema.with_stats({c.name: (c.range[0], c.range[1] - c.range[0])
                              for c in numeric_columns(schema)})


def numeric_columns(schema) -> list:
    return [c for c in schema.columns if c.kind == "numeric"]


def sensitivity(k: int) -> float:
    """L2 sensitivity of (rows, sum_1..k, sumsq_1..k) to one record: |v| <= 1/2."""
    return math.sqrt(1 + k * (0.25 + 0.0625))


def member_stats(df: Table | pd.DataFrame, schema, source: str) -> Stats:
    """Exact (un-noised) sums of one member's training rows: never sent as they are
    under record-level DP (see `noised`). `df`: what read_table read, or a DataFrame."""
    rows = df if isinstance(df, Table) else Table.from_frame(df)
    # the same rows and values as encode: the missing-value policies first ("drop_row"
    # makes `rows` below the count after dropping)
    rows, masks = apply_missing(rows, schema)
    cols = numeric_columns(schema)
    sums, sumsqs = np.zeros(len(cols)), np.zeros(len(cols))
    for j, c in enumerate(cols):
        if c.name not in rows.columns:
            raise LocalError(f"{source}: missing column {c.name!r} the schema requires")
        values = column_values(rows, schema, c, masks, source)
        lo, hi = c.range
        # centred in [-1/2, 1/2] (a constant range: 0)
        v = np.zeros_like(values) if hi == lo else (np.clip(values, lo, hi) - lo) / (hi - lo) - 0.5
        sums[j], sumsqs[j] = float(v.sum()), float((v * v).sum())
    return Stats(float(len(rows)), sums, sumsqs)


def noised(exact: Stats, noise_multiplier: float, noise) -> Stats:
    """Gaussian mechanism: N(0, (sigma_n Delta)^2) on every value, from `noise` (the
    OS's random source in a real node)."""
    import torch  # lean start: keeps torch out of the daemon's provisional_schema path

    k = len(exact.sum)
    std = noise_multiplier * sensitivity(k)
    draw = np.asarray(noise.gaussian(1 + 2 * k, std, torch.float64), dtype=np.float64)
    # float64 draws, snapped (node.privacy.mechanisms.snap): the row count to an integer, the sums
    # to a grid far coarser than a double's low bits, which would otherwise tell an
    # observer which exact values the noise was added to
    grid = stat_grid(std)
    return Stats(snap(exact.rows + float(draw[0]), 1.0),
                 np.array([snap(float(v), grid) for v in exact.sum + draw[1:1 + k]]),
                 np.array([snap(float(v), grid) for v in exact.sumsq + draw[1 + k:]]))


def implausible(stats: Stats, noise_multiplier: float | None, k: int) -> str | None:
    """Why an honest member could not have sent these values (None if it could)."""
    slack = TAIL_T * (noise_multiplier or 0.0) * sensitivity(k)
    if not -slack < stats.rows <= MAX_ROWS:
        return f"rows {stats.rows:.6g} outside (-{slack:.3g}, {MAX_ROWS:g}]"
    rows = max(stats.rows, 0.0)
    for label, values, low, top in (("sum", stats.sum, -rows / 2 - slack, rows / 2 + slack),
                                    ("sumsq", stats.sumsq, -slack, rows / 4 + slack)):
        bad = np.flatnonzero((values < low) | (values > top))
        if bad.size:
            j = int(bad[0])
            return (f"{label}[{j}] = {values[j]:.6g} outside [{low:.6g}, {top:.6g}] (values "
                    "are clipped to their range and centred in [-1/2, 1/2] before summing)")
    if noise_multiplier is None and stats.rows < 1:
        return "rows < 1 with exact sums"
    return None


@dataclass(frozen=True)
class Agreed:
    stats: dict[str, tuple[float, float]]  # column -> (mean, std)
    members: tuple[str, ...]
    capped: dict[str, float]  # member -> its weight after the cap (below its row share)
    digest: bytes
    # "federated": agreed statistics; "range": the consortium fell back (stats = the
    # range scaling, `range_agreed`), `fallback` the members that voted for it, `why` ours.
    mode: str = "federated"
    fallback: tuple[str, ...] = ()
    why: str = ""

    def to_json(self) -> dict:
        doc = {"mode": self.mode, "stats": {c: list(v) for c, v in self.stats.items()},
               "members": list(self.members), "capped": self.capped,
               "digest": self.digest.hex()}
        if self.mode == "range":
            doc.update(fallback_by=list(self.fallback), why=self.why)
        return doc

    @staticmethod
    def from_json(doc: Mapping, schema) -> Agreed:
        try:
            mode = str(doc.get("mode", "federated"))
            stats = {str(c): (float(v[0]), float(v[1])) for c, v in doc["stats"].items()}
            agreed = Agreed(stats, tuple(doc["members"]), dict(doc.get("capped", {})),
                            bytes.fromhex(doc["digest"]), mode,
                            tuple(map(str, doc.get("fallback_by", ()))), str(doc.get("why", "")))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise LocalError(f"agreed normalization is unreadable: {exc}") from None
        if mode not in ("federated", "range"):
            raise LocalError(f"agreed normalization: unknown mode {mode!r}")
        if stats_digest(agreed.stats, agreed.members, mode) != agreed.digest:
            raise LocalError("agreed normalization: its digest does not match its statistics")
        if mode == "range" and stats != schema.range_stats():
            raise LocalError("agreed normalization: mode \"range\" but not the schema's ranges")
        schema.with_stats(stats)  # same columns, finite, std >= 0
        return agreed


def range_agreed(schema, members: tuple[str, ...], fallback: tuple[str, ...],
                 why: str) -> Agreed:
    """The consortium's fallback (a member voted "range"): scale by the declared ranges,
    as normalize = "range" does; its digest differs from any statistics' digest."""
    stats = schema.range_stats()
    members = tuple(sorted(members))
    return Agreed(stats, members, {}, stats_digest(stats, members, "range"), "range",
                  tuple(sorted(fallback)), why)


def stats_digest(stats: Mapping[str, tuple[float, float]], members: tuple[str, ...],
                 mode: str = "federated") -> bytes:
    doc: dict = {"members": list(members), "stats": [[c, repr(float(m)), repr(float(s))]
                                                      for c, (m, s) in sorted(stats.items())]}
    if mode != "federated":  # (agreed statistics keep the digest they always had)
        doc["mode"] = mode
    return hashlib.blake2b(b"flnode/1 normalization\x00" + json.dumps(doc, sort_keys=True)
                           .encode(), digest_size=32).digest()


def combine(messages: Mapping[str, Stats], schema, max_fraction: float | None) -> Agreed:
    """The agreed (mean, std) per numeric column from every member's stats (module
    docstring); the same messages give the same bytes at every member."""
    from node.strategy.weights import cap_weights  # lean start: node.strategy imports torch

    names = sorted(messages)
    cols = numeric_columns(schema)
    rows = [max(messages[m].rows, 1.0) for m in names]
    fractions, _, _ = cap_weights(rows, max_fraction, None)
    total = sum(rows)
    # The pooled moments are the row-weighted mean of the members' own; with the caps
    # each member's own moments are weighed by its capped fraction instead.
    s = np.zeros(len(cols))
    q = np.zeros(len(cols))
    for m, p, r in zip(names, fractions, rows, strict=True):
        s += p * (messages[m].sum / r)
        q += p * (messages[m].sumsq / r)
    stats: dict[str, tuple[float, float]] = {}
    for j, c in enumerate(cols):
        lo, hi = c.range
        if hi == lo:
            stats[c.name] = (float(lo), 0.0)
            continue
        mean_u = min(1.0, max(0.0, 0.5 + float(s[j])))
        m = mean_u - 0.5
        var_u = min(mean_u * (1 - mean_u), max(0.0, float(q[j]) - m * m))
        std_u = max(math.sqrt(var_u), STD_FLOOR)
        stats[c.name] = (lo + (hi - lo) * mean_u, (hi - lo) * std_u)
    members = tuple(names)
    capped = {m: p for m, p, r in zip(names, fractions, rows, strict=True)
              if p < r / total * (1.0 - 1e-12)}
    return Agreed(stats, members, capped, stats_digest(stats, members))


# --- the check at start, and the fallback (module docstring) ----------------------------

@dataclass(frozen=True)
class Usability:
    """What the check at start found: the expected errors (one noise standard deviation)
    of every agreed mean (in stds) and std (relative), for a column whose std is
    ASSUMED_SPREAD of its range, and which columns fail."""

    rows: float  # the total training rows assumed
    members: int
    noise_multiplier: float | None  # None: privacy off, exact sums
    mean_error: float  # in stds of such a column
    std_error: float  # relative
    failing: tuple[str, ...]  # numeric columns (all non-constant ones fail together)
    rows_needed: float  # total rows at which this noise would pass
    sigma_needed: float | None  # the normalize_noise at which these rows would pass

    @property
    def ok(self) -> bool:
        return not self.failing

    def describe(self) -> str:
        return (f"with {self.members} members and about {self.rows:.0f} training rows in all, "
                f"one noise std moves each agreed mean by {self.mean_error:.2g} std and each "
                f"agreed std by {100 * self.std_error:.0f} % (for a column whose std is "
                f"{ASSUMED_SPREAD:g} of its range; the check allows {MAX_MEAN_ERROR:g} std and "
                f"{100 * MAX_STD_ERROR:.0f} %)")


def usability(schema, members: int, rows: float, noise_multiplier: float | None) -> Usability:
    """The check at start (module docstring): public quantities only, nothing released."""
    cols = [c for c in numeric_columns(schema) if c.range is not None and c.range[1] > c.range[0]]
    k = len(numeric_columns(schema))
    if noise_multiplier is None or not cols:
        return Usability(rows, members, noise_multiplier, 0.0, 0.0, (), 0.0, None)
    s = noise_multiplier * sensitivity(k)
    scale = math.sqrt(members) / max(rows, 1.0)  # e = s * scale
    e = s * scale
    mean_error = e / ASSUMED_SPREAD
    std_error = math.sqrt(2) * e / (2 * ASSUMED_SPREAD ** 2)
    # the largest e both limits allow
    e_max = min(MAX_MEAN_ERROR * ASSUMED_SPREAD,
                MAX_STD_ERROR * 2 * ASSUMED_SPREAD ** 2 / math.sqrt(2))
    failing = () if e <= e_max else tuple(c.name for c in cols)
    return Usability(rows, members, noise_multiplier, mean_error, std_error, failing,
                     rows_needed=math.ceil(s * math.sqrt(members) / e_max),
                     sigma_needed=e_max / (sensitivity(k) * scale))


def resolve(schema, members: int, own_rows: int, privacy_mode: str, delta: float,
            who: str) -> tuple[object, Usability | None, str | None]:
    """normalize = "federated" at a member's start, before anything is released or
    charged: (the schema to run with, the check, a note for the log). The schema is
    unchanged when the check passes; with normalize_fallback = "range" and a failing
    check, it is the same schema in normalize = "range" (nothing released); with
    "refuse" (or no key) a failing check raises, naming the columns and the fixes."""
    if schema.mode != "federated":
        return schema, None, None
    sigma = (schema.normalize_noise or DEFAULT_NORMALIZE_NOISE) if privacy_mode == "record" \
        else None
    declared = schema.normalize_rows
    check = usability(schema, members, declared if declared is not None else members * own_rows,
                      sigma)
    if check.ok:
        return schema, check, None
    names = list(check.failing)
    shown = ", ".join(map(repr, names[:6])) + (f" and {len(names) - 6} more" if len(names) > 6
                                              else "")
    why = (f"federated normalization would agree statistics too noisy to use for the numeric "
           f"column(s) {shown}: {check.describe()}")
    if schema.normalize_fallback == "range":
        note = (f"{who}: {why}. The schema's normalize_fallback = \"range\": this member votes "
                "for range scaling, and any member's such vote makes every member scale each "
                "numeric column by its declared range instead (nothing released or charged "
                "for it); each range that clips more than 1 % of our rows is warned about")
        return range_schema(schema), check, note

    assert check.sigma_needed is not None
    cost = epsilon_of([LedgerRecord(-1, "normalize", check.sigma_needed, 1.0, 1, 1.0, "")],
                      delta)
    raise LocalError(
        f"{who}: {why}. Nothing was released or charged. Fix, in the consortium's schema "
        f"(every member must agree): normalize = \"range\" (or normalize_fallback = "
        f"\"range\"): scale by the declared ranges, which releases nothing, with ranges "
        f"that fit the rows; or normalize = \"declared\" with means and stds from a "
        f"public source; or normalize_noise = {check.sigma_needed:.3g} (its statistics "
        f"alone would cost ε = {cost:.3g} at δ = {delta:g}); or at least "
        f"{check.rows_needed:.0f} training rows in all"
        + ("" if declared is not None else
           f" (estimated here as {members} members x this member's {own_rows} rows; "
           "normalize_rows = N in the schema declares the total, so that every member "
           "decides alike)"))


def range_schema(schema):
    """The schema as normalize = "range" (scaled by its declared ranges): the fallback."""
    return schema.model_copy(update={"normalize": "range", "normalize_noise": None,
                                     "normalize_fallback": None})


def range_report(rows: Table | pd.DataFrame, schema, source: str) -> list[str]:
    """A member's local check of the declared ranges against its own rows (releases
    nothing: the lines go to its own log): per numeric column, the share of its rows
    clipped (above CLIP_WARN) and, under range scaling, where its rows use less than
    ASSUMED_SPREAD x 2 of the range (the range is far wider than the data)."""
    rows = rows if isinstance(rows, Table) else Table.from_frame(rows)
    rows, masks = apply_missing(rows, schema)
    out = []
    for c in numeric_columns(schema):
        if c.range is None or c.name not in rows.columns or len(rows) == 0:
            continue
        values = rows.numbers(c.name)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        lo, hi = c.range
        below, above = float((values < lo).mean()), float((values > hi).mean())
        if below + above > CLIP_WARN:
            out.append(f"{source}: column {c.name!r}: {100 * (below + above):.1f} % of the rows "
                       f"lie outside the declared range [{lo:g}, {hi:g}] ({100 * below:.1f} % "
                       f"below, {100 * above:.1f} % above) and are clipped to it: widen the "
                       "range in the consortium's schema if these values are real")
        if hi > lo and schema.mode == "range":
            spread = float(np.std(np.clip(values, lo, hi))) / (hi - lo)
            if spread < ASSUMED_SPREAD / 2:
                out.append(f"{source}: column {c.name!r}: its rows spread over about "
                           f"{100 * spread:.1f} % of the declared range [{lo:g}, {hi:g}] (std "
                           "/ width): range scaling leaves it nearly constant; a tighter range "
                           "would let the model use it")
    return out

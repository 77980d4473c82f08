"""Federated normalization's files and the member's rows before encoding.

- LocalData: encoded rows (X, y); LocalTables: the rows as read, encoded once the
  members have agreed the statistics (node/learn/normalize.py).
- The state dir's files: normalization.json (the agreed statistics), norm.envelope (our
  signed vote, re-sent unchanged on restart), stats.envelope (our signed statistics).

Privacy: our statistics are computed once, noised (record mode), signed (the sequence
number on disk first: Signer.sign) and charged to the ledger before the message is
stored or sent; a restart re-sends the stored message, never recomputes or re-charges it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gossip import bodies, envelope
from gossip.bodies import NORM_RANGE, NORM_USABLE, Stats
from gossip.envelope import KIND_NORM, KIND_STATS
from gossip.errors import LocalError, RemoteError
from gossip.protocol.stats import Normalization
from node.data.encode import dropped_rows, encode, member_split
from node.data.schema import FeatureSchema
from node.data.table import read_table, read_tables
from node.learn.normalize import (
    Agreed,
    combine,
    implausible,
    member_stats,
    noised,
    numeric_columns,
    range_agreed,
)
from node.privacy.accountant import LedgerRecord
from node.privacy.budget import PrivacyBudget
from node.privacy.ledger import Ledger
from node.privacy.mechanisms import NoiseSource
from node.runtime.config import NodeConfig
from node.runtime.state import StateDir, atomic_write, loads_json

log = logging.getLogger("flnode.node")

NORMALIZATION_FILE = "normalization.json"
STATS_FILE = "stats.envelope"
VOTE_FILE = "norm.envelope"

# Signs one message (kind, round, body) with the next sequence number, on disk first.
Sign = Callable[[str, int, "bytes | Sequence[bytes]"], bytes]


@dataclass
class LocalData:
    X: np.ndarray
    y: np.ndarray


@dataclass
class LocalTables:
    """A member's rows as read (training and held-out), before encoding: federated
    normalization encodes them only once the members have agreed the statistics."""

    train: Any  # node.data.Table (read_table; no pandas in a node)
    held: Any
    train_source: str
    held_source: str
    read_rows: int = 0  # rows in data.path as read
    dropped: int = 0  # of them, dropped by the schema's missing = "drop_row"
    dropped_eval: int = 0  # rows of data.eval_path dropped by it

    @staticmethod
    def read(cfg: NodeConfig, schema: FeatureSchema) -> LocalTables:
        """The member's rows with the schema's missing = "drop_row" applied to each whole
        file, then (without data.eval_path) split as the simulators split (member_split):
        every count the node logs, checks or releases is after dropping."""
        if cfg.data.eval_path is not None:  # both files by one Parquet reader (read_tables)
            df, ev = read_tables([cfg.data.path, cfg.data.eval_path])
            keep, keep_ev = (np.flatnonzero(~dropped_rows(t, schema)) for t in (df, ev))
            return LocalTables(df.iloc[keep], ev.iloc[keep_ev], str(cfg.data.path),
                               str(cfg.data.eval_path), len(df), len(df) - len(keep),
                               len(ev) - len(keep_ev))
        df = read_table(cfg.data.path)
        train, held, dropped = member_split(df, schema, cfg.training.seed,
                                            cfg.data.eval_fraction)
        return LocalTables(df.iloc[train], df.iloc[held], str(cfg.data.path),
                           str(cfg.data.path), len(df), dropped)

    def encode(self, schema: FeatureSchema) -> tuple[LocalData, LocalData]:
        X, y = encode(self.train, schema, self.train_source)
        Xe, ye = encode(self.held, schema, self.held_source)
        return LocalData(X, y), LocalData(Xe, ye)


def load_agreed(state: StateDir, schema: FeatureSchema) -> Agreed | None:
    """The statistics this node agreed with the others before a restart, if any."""
    path = state.path / NORMALIZATION_FILE
    if not path.exists():
        return None
    try:
        doc = loads_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise LocalError(f"{path}: unreadable ({exc}); it holds the statistics this node "
                         "agreed with the others: restore it, or start a new state dir") from None
    return Agreed.from_json(doc, schema)


def save_agreed(state: StateDir, agreed: Agreed) -> None:
    atomic_write(state.path / NORMALIZATION_FILE,
                 json.dumps(agreed.to_json(), indent=1, sort_keys=True).encode())


def machine_settings(state: StateDir, schema: FeatureSchema, budget: PrivacyBudget,
                     federated: bool, agreed: bool, vote_range: bool) -> Normalization | None:
    """What the round machine knows of federated normalization (None: not federated):
    how to check a member's statistics (node/learn/normalize.py `implausible`, with the
    plan's sigma), whether we agreed already or stored our statistics, our vote."""
    if not federated:
        return None
    k = len(numeric_columns(schema))
    return Normalization(
        lambda st: implausible(st, None if budget.plan is None
                               else budget.plan.normalize_sigma, k),
        agreed=agreed, stats_stored=(state.path / STATS_FILE).exists(), vote_range=vote_range)


def by_range(schema: FeatureSchema, members: Sequence[str], fallback: Sequence[str]
             ) -> tuple[Agreed, str]:
    """The round machine's AdoptRange: a member voted for range scaling. What every
    member adopts, and why (for the log)."""
    why = (f"{', '.join(fallback)} voted for range scaling (its check at start found the "
           "agreed statistics would be too noisy; normalize_fallback = \"range\"): every "
           "member scales by the declared ranges, nothing released or charged for "
           "normalization")
    return range_agreed(schema, tuple(members), tuple(fallback), why), why


def combined(name: str, schema: FeatureSchema, got: dict[str, Stats],
             max_weight_fraction: float | None) -> tuple[Agreed, str]:
    """The round machine's Combine: every member's statistics (ours included) combined,
    and what to log."""
    agreed = combine(got, schema, max_weight_fraction)
    for who, f in sorted(agreed.capped.items()):
        log.warning("%s: federated normalization: %s's row count is above the weight cap "
                    "(max_weight_fraction): its statistics weigh %.3g of the result, less "
                    "than its share of the rows", name, who, f)
    return agreed, (f"federated normalization agreed with {len(agreed.members)} members "
                    f"(digest {agreed.digest.hex()[:16]})")


def own_stats(state: StateDir, cfg: NodeConfig, schema: FeatureSchema,
              tables: LocalTables | None, budget: PrivacyBudget, ledger: Ledger,
              noise: NoiseSource, sign: Sign) -> tuple[Stats, bytes]:
    """Our stats message: the stored one (a restart never recomputes or re-charges
    it), or computed now, noised (record mode) and charged before it exists anywhere
    but in memory."""
    path = state.path / STATS_FILE
    k = len(numeric_columns(schema))
    if path.exists():
        data = path.read_bytes()
        env = envelope.decode_outer(data, cfg.gossip.max_envelope_bytes)
        return bodies.decode_stats(env.body, k), data
    assert tables is not None
    exact = member_stats(tables.train, schema, tables.train_source)
    plan = budget.plan
    sigma = plan.normalize_sigma if plan is not None else None
    if sigma is None and plan is not None:  # never exact sums under DP
        raise LocalError("federated normalization: the privacy plan reserves no noise for "
                         "our statistics (this member voted for range scaling)")
    values = exact if sigma is None else noised(exact, sigma, noise)
    data = sign(KIND_STATS, 0, bodies.encode_stats(values))
    if sigma is not None:
        over = budget.would_exceed([LedgerRecord(-1, "normalize", sigma, 1.0, 1, 1.0, "")])
        if over is not None:
            raise LocalError(f"federated normalization would bring ε to {over:.3f}, over "
                             f"the budget: raise privacy.epsilon or the schema's "
                             "normalize_noise")
        digest = envelope.decode_outer(data, cfg.gossip.max_envelope_bytes).digest.hex()
        ledger.charge(LedgerRecord(-1, "normalize", sigma, 1.0, 1, 1.0, digest))
    atomic_write(path, data)
    return values, data


def own_vote(state: StateDir, max_bytes: int, vote: bool, sign: Sign) -> tuple[bool, bytes]:
    """Our signed vote (True: range scaling): the stored one (a restart re-sends it
    unchanged, never a different one), or made now from our check at start (`vote`)."""
    path = state.path / VOTE_FILE
    if path.exists():
        data = path.read_bytes()
        try:
            env = envelope.decode_outer(data, max_bytes)
            stored = bodies.decode_norm(env.body, True)
        except (RemoteError, LocalError) as exc:
            raise LocalError(f"{path}: unreadable ({exc}); it holds the vote this node "
                             "sent: restore it, or start a new state dir") from None
        if stored != vote:
            # (a "usable" vote would have us send statistics our plan has no noise for)
            raise LocalError(
                f"{path}: this node voted {'range scaling' if stored else 'usable'} "
                f"before, but its check at start now says "
                f"{'range scaling' if vote else 'usable'} (its training rows or the "
                "privacy settings changed since): restore them, or start a new state dir")
        return stored, data
    data = sign(KIND_NORM, 0, NORM_RANGE if vote else NORM_USABLE)
    atomic_write(path, data)
    return vote, data

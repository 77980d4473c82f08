"""A member's rows -> tensors, by the consortium's schema: missing-value policy,
standardization, category codes; and the held-out split of a member without an
evaluation file (one order for a node and the simulators)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from gossip.errors import LocalError
from node.data.schema import DROP_ROW, Column, FeatureSchema, Missing
from node.data.table import Table

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("node.data")  # the name before node/data.py was split


# A standardized value beyond this is a unit or schema error, not data (and past
# ~3e38 it is infinite in float32, the model's dtype).
MAX_STANDARDIZED = 1e6


def dropped_rows(rows: Table, schema: FeatureSchema) -> np.ndarray:
    """The mask of the rows the schema's missing = "drop_row" drops: an empty cell in a
    column with that policy."""
    drop = np.zeros(len(rows), dtype=bool)
    for col in schema.columns:
        if schema.policy(col) == DROP_ROW and col.name in rows.columns:
            drop |= rows.empty(col.name)
    return drop


def apply_missing(rows: Table, schema: FeatureSchema) -> tuple[Table, dict[str, np.ndarray]]:
    """The schema's missing-value policies, as every member applies
    them (pure: the same rows and schema give the same result anywhere): rows with an
    empty cell in a "drop_row" column are dropped; for each column with a fill, the mask
    of its empty cells (in the kept rows) is returned, for `column_values` to fill. Empty
    cells in a column without a policy are left for encode to refuse, naming them."""
    drop = dropped_rows(rows, schema)
    if drop.any():
        rows = rows.iloc[np.flatnonzero(~drop)]
    masks = {c.name: rows.empty(c.name) for c in schema.columns
             if isinstance(schema.policy(c), Missing) and c.name in rows.columns}
    return rows, masks


def column_values(rows: Table, schema: FeatureSchema, col: Column, masks: dict[str, np.ndarray],
                  source: str) -> np.ndarray:
    """A numeric column's values (float64) with its missing-value fill applied; an empty
    or non-number cell the policy does not cover is an error naming the first one."""
    values = rows.numbers(col.name)
    if col.name in masks:
        policy = schema.policy(col)
        assert isinstance(policy, Missing) and not isinstance(policy.fill, str)
        values = values.copy()  # numbers() may be a read-only view of the rows
        values[masks[col.name]] = policy.fill
    bad = ~np.isfinite(values)
    if bad.any():
        empty = rows.empty(col.name) & bad
        hint = (" (empty cells: declare the consortium's `missing` policy for this column "
                "in the schema: \"drop_row\", {fill = VALUE} or {fill = VALUE, indicator = "
                "true})" if empty.any() else "")
        raise LocalError(f"{source}: column {col.name!r}: {int(bad.sum())} row(s) are empty "
                         f"or not finite numbers ({rows.where(col.name, bad)}){hint}")
    return values


def encode(df: Table | pd.DataFrame, schema: FeatureSchema,
           source: str = "table") -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (features float32 [n, n_features], labels int64 [n]). Errors name the column
    (and, for a `Table` read from a file, the line of the first bad cell).

    Takes a `Table` (what a node reads: read_table) or a pandas DataFrame (the simulators'
    and the tests' rows); both encode the same rows to the same bytes. The schema's
    missing-value policies are applied first (apply_missing: "drop_row" drops rows, so
    fewer rows may come out than went in). Numeric values are clipped to the column's
    declared range (if any), then standardized with its mean and std (normalize =
    "range": schema.for_encoding()); std 0 (constant) encodes as 0; an indicator column
    follows its column."""
    rows = df if isinstance(df, Table) else Table.from_frame(df)
    schema = schema.for_encoding()
    missing = [c.name for c in schema.columns if c.name not in rows.columns]
    if schema.label not in rows.columns:
        missing.append(schema.label)
    if missing:
        raise LocalError(f"{source}: missing column(s) the schema requires: {missing}")
    if len(rows) == 0:
        raise LocalError(f"{source}: no rows (only a header?)")
    rows, masks = apply_missing(rows, schema)
    if len(rows) == 0:
        raise LocalError(f"{source}: no rows left after the schema's missing = \"drop_row\" "
                         "(every row has an empty cell in such a column)")
    n = len(rows)
    blocks = []
    for col in schema.columns:
        if col.kind == "numeric":
            values = column_values(rows, schema, col, masks, source)
            if col.range is not None:
                lo, hi = col.range
                outside = int(((values < lo) | (values > hi)).sum())
                if outside:
                    log.warning("%s: column %r: %d row(s) outside the declared range [%g, %g] "
                                "clipped to it", source, col.name, outside, lo, hi)
                values = np.clip(values, lo, hi)
            if col.mean is None or col.std is None:  # normalize = "federated", not agreed yet
                raise LocalError(
                    f"{source}: column {col.name!r}: the schema says normalize = \"federated\" "
                    "and the members' agreed mean and std are not known yet (a node agrees "
                    "them before round 1: node/learn/normalize.py)")
            if col.std == 0:  # constant everywhere: carries no signal, standardizes to 0
                blocks.append(np.zeros((n, 1)))
            else:
                z = (values - col.mean) / col.std
                far = ~(np.abs(z) <= MAX_STANDARDIZED)
                if far.any():
                    raise LocalError(
                        f"{source}: column {col.name!r}: {int(far.sum())} row(s) lie more than "
                        f"{MAX_STANDARDIZED:g} standard deviations from the schema's mean "
                        f"({col.mean:g} ± {col.std:g}), e.g. {values[far][0]:g}: a unit or "
                        "schema error (such values also overflow float32 and wreck training)")
                blocks.append(z[:, None])
            if schema.width(col) == 2:  # the missing-value indicator
                blocks.append(masks[col.name].astype(np.float64)[:, None])
        else:
            policy = schema.policy(col)
            fill = policy.fill if isinstance(policy, Missing) else None
            codes = _codes(rows, col.name, col.vocabulary or [], source,
                           f"column {col.name!r}", "not in the schema's vocabulary",
                           fill=fill if isinstance(fill, str) else None)
            onehot = np.zeros((n, len(col.vocabulary or ())))
            onehot[np.arange(n), codes] = 1.0
            blocks.append(onehot)
    y = _codes(rows, schema.label, schema.classes, source, f"label column {schema.label!r}",
               f"not among the schema's classes {schema.classes}")
    X = np.concatenate(blocks, axis=1).astype(np.float32)
    return X, y  # y: a fresh, writable int64 array, for torch


def _codes(rows: Table, name: str, values: list[str], source: str, what: str,
           among: str, fill: str | None = None) -> np.ndarray:
    """Each row's cell in `name` as its position in `values` (int64); an empty cell (unless
    `fill` names the category it becomes) or a value not in `values` is an error naming it."""
    index = {v: i for i, v in enumerate(values)}
    text = rows.texts(name)
    if fill is not None:
        text = [fill if t is None else t for t in text]
    empty = np.array([t is None for t in text], dtype=bool)
    if empty.any():
        raise LocalError(f"{source}: {what}: {int(empty.sum())} row(s) are empty "
                         f"({rows.where(name, empty)})")
    unknown = sorted(set(text) - set(index))
    if unknown:
        first = np.array([t not in index for t in text], dtype=bool)
        raise LocalError(f"{source}: {what}: value(s) {among}: {unknown[:10]} "
                         f"({rows.where(name, first)})")
    return np.fromiter((index[t] for t in text), dtype=np.int64, count=len(text))


def held_out_positions(n_rows: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of a member without data.eval_path: a permutation
    seeded by training.seed, the last `fraction` held out. The node and the simulators
    both split with this."""
    order = np.random.default_rng(seed).permutation(n_rows)
    cut = int(n_rows * (1 - fraction))
    return order[:cut], order[cut:]


def member_split(rows: Table | pd.DataFrame, schema: FeatureSchema | None, seed: int,
                 fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(training rows, held-out rows, rows dropped) of a member without data.eval_path:
    positions in `rows`. One order for a node and the simulators, so both hold out the
    same rows: the schema's missing = "drop_row" applies to the whole table first, then
    the rows left are split (held_out_positions), so `fraction` is of the usable rows and the
    held-out share does not depend on where the empty cells fell. `schema` None: nothing
    is dropped (a simulator's drafted schema has no missing policy)."""
    if schema is None:
        keep = np.arange(len(rows))
    else:
        table = rows if isinstance(rows, Table) else Table.from_frame(rows)
        keep = np.flatnonzero(~dropped_rows(table, schema))
    train, held = held_out_positions(len(keep), seed, fraction)
    return keep[train], keep[held], len(rows) - len(keep)


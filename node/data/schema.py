"""The consortium-wide feature schema.

A model is only averageable if every member encodes its features the same
way: same columns in the same order, same category vocabularies, same scaling
constants. Those live in the `FeatureSchema`, which is part of the consortium
file (and of its id). In simulation the constants are fitted on the pooled
training rows (`fit_schema`); a real member reads them from the consortium file
and never rescales per member. Drafting and merging schema files (`flnode schema
infer`, `merge`) is node/data/drafting.py; encoding rows is node/data/encode.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from gossip.errors import LocalError

if TYPE_CHECKING:
    import pandas as pd



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
# (node/learn/normalize.py, `usability`) finds the agreed statistics would be too noisy to
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
    # (node/learn/normalize.py; None: its default). Agreed, so every member can check others'.
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


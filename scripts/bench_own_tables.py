"""Small consortia on their own tables, by the documented path (issue 20).

Each member's CSV holds raw values and a few empty cells; every step is what the
walkthrough in docs/operate/own-data.md documents, through the functions the CLI calls:

1. `flnode schema infer` on each member's file (node.data.drafting.infer, render),
2. `flnode schema merge ... --ranges-from PUBLIC.csv` (node.data.drafting.merge): the ranges
   from a public reference table, rounded outward (here: the published table the rows
   come from; see --reference),
3. `flnode simulate --data-dir DIR --schema schema.toml` (node.rehearsal.simulation.output.simulate): the
   consortium file, the nodes' real code in process, record-level DP at ε per member,
4. next to centralized DP-SGD on the pooled training rows at the same ε, encoded with the
   same statistics the members use (the simulator's baseline schema), the same model,
   initial weights, recipe and number of epochs as the consortium's rounds.

Tables: `breast_cancer` (scikit-learn's load_breast_cancer: 569 rows, 30 raw numeric
columns, the "public medical table" of the issue; 3 members with 65, 130 and 260 rows,
i.e. 52, 104 and 208 training rows, plus a categorical column; 114 test rows) and
`default` (ISLR Default: 8 members). Empty cells: EMPTY_FRACTION of the cells in three
numeric columns of every member file (never in the common test set).

    PYTHONPATH=. .venv/bin/python scripts/bench_own_tables.py --table breast_cancer \
        --seeds 3 --out runs/own-tables-bc.json
    PYTHONPATH=. .venv/bin/python scripts/bench_own_tables.py --table default --members 8 \
        --seeds 3 --out runs/own-tables-default.json

JSON: per seed the consortium's test ROC-AUC (mean over members' final models), the
centralized DP-SGD one, their gap, what normalization the members ran (and the check's
message), the ε each member spent (from its ledger). `--normalize federated-refuse`
shows the refusal instead (the schema's normalize_fallback = "refuse").
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The share of cells emptied in each of EMPTY_COLUMNS numeric columns of a member file.
EMPTY_FRACTION = 0.02
EMPTY_COLUMNS = 3
DELTA = 1e-5
# breast_cancer: each member's file size (80 % train: 52, 104, 208 rows) and the test rows
BC_SIZES = (65, 130, 260)
TARGET_GAP = 0.02  # the bar: within 0.02 of centralized DP-SGD


def tables(table: str, members: int, seed: int) -> tuple[list[Any], Any, Any, str]:
    """(member frames, common test frame, public reference frame, label)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    if table == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer(as_frame=True)
        df = data.frame.rename(columns={"target": "malignant"})
        # the label as the banks had it: 1 = malignant
        df["malignant"] = 1 - df["malignant"]
        df["clinic"] = rng.choice(["north", "south", "east"], size=len(df))
        label = "malignant"
        sizes = BC_SIZES if members == 3 else None
        if sizes is None:
            raise SystemExit("--table breast_cancer: --members 3 (the issue's consortium)")
    else:
        from node.rehearsal.simulation.datasets import load_demo

        df, label, _ = load_demo(table)
        n = len(df)
        per = int(n * 0.8) // members
        sizes = tuple([per] * members)
    order = rng.permutation(len(df))
    test_n = len(df) - sum(sizes)
    test = df.iloc[order[:test_n]].reset_index(drop=True)
    parts, at = [], test_n
    numeric = [c for c in df.columns if c != label and pd.api.types.is_numeric_dtype(df[c])
               and not pd.api.types.is_bool_dtype(df[c])]
    holed = list(rng.choice(numeric, size=min(EMPTY_COLUMNS, len(numeric)), replace=False))
    for size in sizes:
        part = df.iloc[order[at:at + size]].reset_index(drop=True).copy()
        at += size
        for col in holed:
            k = max(1, int(round(EMPTY_FRACTION * size)))
            part.loc[rng.choice(size, size=k, replace=False), col] = np.nan
        parts.append(part)
    return parts, test, df.drop(columns=[label]), label


def documented_path(table: str, members: int, seed: int, rounds: int, epsilon: float,
                    normalize: str, work: Path) -> dict[str, Any]:
    """Steps 1 to 4 of the module docstring for one seed."""
    import tomllib

    from gossip.errors import LocalError
    from node.data.drafting import infer, merge, render
    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.prepare import baseline_schema, prepare
    from node.rehearsal.simulation.spec import SimulationSpec

    parts, test, reference, label = tables(table, members, seed)
    data = work / "data"
    data.mkdir(parents=True)
    names = [f"member-{chr(ord('a') + i)}" for i in range(len(parts))]
    drafts = []
    for name, part in zip(names, parts, strict=True):
        part.to_csv(data / f"{name}.csv", index=False)
        draft = infer([data / f"{name}.csv"], label)
        path = work / f"{name}-schema.toml"
        path.write_text(render(draft))
        drafts.append(path)
    test.to_csv(data / "test.csv", index=False)
    reference.to_csv(work / "public.csv", index=False)
    merged = merge(drafts, ranges_from=work / "public.csv")
    text = render(merged)
    if normalize == "federated-refuse":
        text = text.replace('normalize_fallback = "range"', 'normalize_fallback = "refuse"')
    elif normalize == "range":
        text = text.replace('normalize = "federated"', 'normalize = "range"').replace(
            'normalize_fallback = "range"\n', "")
    elif normalize == "oracle":
        # what a simulator alone can do: standardize with the exact pooled statistics of
        # the members' rows ("declared"): separates what range scaling costs from what
        # DP on small members costs
        import pandas as pd
        import tomli_w

        doc = tomllib.loads(text)
        doc["normalize"] = "declared"
        doc.pop("normalize_fallback", None)
        pooled = pd.concat(parts, ignore_index=True)
        for col in doc["columns"]:
            if col["kind"] == "numeric":
                v = pooled[col["name"]].dropna().clip(*col["range"])
                col["mean"], col["std"] = float(v.mean()), float(v.std(ddof=0)) or 1.0
        text = tomli_w.dumps(doc)
    (work / "schema.toml").write_text(text)
    schema_doc = tomllib.loads(text)
    spec = SimulationSpec(dataset="own", nodes=len(names), partition="iid", rounds=rounds,
                          seed=seed, out=work / "run", privacy="record", epsilon=epsilon,
                          delta=DELTA, sigma=None, data_dir=data,
                          schema_path=work / "schema.toml", label=label)
    started = time.perf_counter()
    try:
        summary = simulate(spec, console=_Quiet())
    except LocalError as exc:
        return {"refused": str(exc), "normalize": schema_doc.get("normalize"),
                "fallback": schema_doc.get("normalize_fallback")}
    took = time.perf_counter() - started
    # centralized DP-SGD on the pooled training rows, encoded as the baselines are
    prep_dir = work / "central"
    spec_c = SimulationSpec(dataset="own", nodes=len(names), partition="iid", rounds=rounds,
                            seed=seed, out=prep_dir, privacy="record", epsilon=epsilon,
                            delta=DELTA, sigma=None, data_dir=data,
                            schema_path=work / "schema.toml", label=label)
    prep = prepare(spec_c)
    central = centralized_dp(spec_c, prep, epsilon)
    note = next((n for n in prep.notes if n.startswith("normalize")), None)
    del baseline_schema  # (what prepare used; named for the reader)
    return {
        "normalize": schema_doc.get("normalize"),
        "fallback": schema_doc.get("normalize_fallback"),
        "normalization_note": note,
        "rows": summary["rows"], "test_rows": summary["test_rows"],
        "consortium": summary["consortium"]["mean"],
        "consortium_per_member": summary["consortium"]["per_node"],
        "local_only": summary["local_only"]["mean"],
        "centralized_no_dp": summary["centralized"],
        "centralized_dp": central["roc_auc"],
        "centralized_dp_sigma": central["sigma"],
        "centralized_dp_epsilon": central["epsilon"],
        "gap": central["roc_auc"] - summary["consortium"]["mean"],
        "epsilon_per_member": summary["epsilon"]["per_node"],
        "sigma_per_member": summary["epsilon"]["noise_multiplier_per_node"],
        "own_rows": {n: {k: v.get(k) for k in ("local_only", "consortium", "rows")}
                     for n, v in summary["own_rows"].items()}
        if isinstance(summary.get("own_rows"), dict) else None,
        "seconds": took,
    }


def centralized_dp(spec: Any, prep: Any, epsilon: float) -> dict[str, float]:
    """DP-SGD on the pooled training rows at ε: the consortium's recipe (batch, lr, clip,
    1 epoch a round) for `rounds` epochs, σ calibrated by the same accountant."""
    import torch

    from node.learn.dpsgd import train_local_dp_fast
    from node.learn.models import build_model, init_seed_from
    from node.learn.train import evaluate
    from node.privacy.accountant import epsilon_of
    from node.privacy.calibrate import calibrate_sigma, plan_history
    from node.privacy.mechanisms import SeededNoise

    torch.set_num_threads(1)
    X, y = prep.train_all
    n = len(y)
    per = max(1, math.ceil(n / spec.batch_size))
    q, spr = 1.0 / per, spec.epochs * per
    sigma = calibrate_sigma(epsilon, DELTA, "record", q, spr, spec.rounds, None)
    model = build_model(spec.model, prep.schema.n_features, prep.schema.n_classes, spec.hidden,
                        seed=init_seed_from(prep.consortium))
    train_local_dp_fast(model, X, y, epochs=spec.epochs * spec.rounds,
                        batch_size=spec.batch_size, lr=spec.lr, clip_norm=spec.clip,
                        noise_multiplier=sigma, noise=SeededNoise(spec.seed * 7919 + 99))
    spent = epsilon_of(plan_history("record", sigma, q, spr, spec.rounds, None), DELTA)
    return {"roc_auc": evaluate(model, *prep.test)["roc_auc"], "sigma": sigma,
            "epsilon": spent}


class _Quiet:
    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", choices=["breast_cancer", "default", "churn"],
                    default="breast_cancer")
    ap.add_argument("--members", type=int, default=None, help="3 for breast_cancer, else 8")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--normalize", choices=["as-drafted", "federated-refuse", "range", "oracle"],
                    default="as-drafted",
                    help="as-drafted: what schema infer writes (federated, fallback range); "
                         "oracle: exact pooled mean/std declared (a simulator-only reference)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    members = args.members or (3 if args.table == "breast_cancer" else 8)
    runs = []
    for seed in range(args.seeds):
        work = Path(tempfile.mkdtemp(prefix="own-tables-"))
        try:
            res = documented_path(args.table, members, seed, args.rounds, args.epsilon,
                                  args.normalize, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        res["seed"] = seed
        runs.append(res)
        print(json.dumps({k: v for k, v in res.items() if k not in (
            "consortium_per_member", "epsilon_per_member", "own_rows")}), flush=True)
    done = [r for r in runs if "gap" in r]
    out = {"table": args.table, "members": members, "rounds": args.rounds,
           "epsilon": args.epsilon, "delta": DELTA, "normalize": args.normalize,
           "empty_fraction": EMPTY_FRACTION, "runs": runs}
    if done:
        gaps = [r["gap"] for r in done]
        out["gap_mean"] = float(np.mean(gaps))
        out["gap_max"] = float(np.max(gaps))
        out["within_target"] = bool(max(gaps) <= TARGET_GAP)
    text = json.dumps(out, indent=2, sort_keys=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({k: out[k] for k in out if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

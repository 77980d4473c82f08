#!/usr/bin/env python3
"""Membership-inference audit: does the noise stop an attacker from telling members apart?

Default setting (no arguments), chosen so that the undefended model leaks
measurably: scikit-learn's handwritten digits, a target model (MLP 64-256-10)
trained on a small member set (--members 200 rows) for many epochs (--epochs
150), then attacked with the loss-threshold attack (Yeom et al. 2018): the
lower a row's loss under the model, the likelier it was a member. Members vs
an equal number of held-out non-members; attack ROC-AUC and TPR at 1 % FPR;
utility is accuracy on a separate test set. Each setting is repeated over
--repeats random member sets and averaged.

Settings: no DP ("off") and DP-SGD (Opacus, RDP accountant, the same
`train_local_dp` a node uses) at total epsilon 1, 3 and 8, delta 1e-5,
sigma calibrated for the whole training. Noise is drawn from os.urandom
unless --seed-noise is given (reproducible figures, demo data only).

Prints a table, writes DIR/privacy_audit.json and DIR/privacy_audit.png;
--json prints only {"off"|"1"|"3"|"8": {"attack_auc", "tpr_at_1pct_fpr",
"utility"}} on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.data.encode import encode  # noqa: E402
from node.data.schema import fit_schema  # noqa: E402
from node.learn.models import build_model  # noqa: E402
from node.learn.train import train_local, train_local_dp  # noqa: E402
from node.privacy.accountant import steps_per_epoch  # noqa: E402
from node.privacy.calibrate import calibrate_sigma  # noqa: E402
from node.privacy.mechanisms import OsNoise, SeededNoise  # noqa: E402
from node.rehearsal.simulation.datasets import load_demo  # noqa: E402

DELTA = 1e-5


@torch.no_grad()
def losses(model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    model.eval()
    logits = model(torch.from_numpy(X))
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="none").numpy()


def attack(model, members, nonmembers) -> tuple[float, float, tuple[np.ndarray, np.ndarray]]:
    scores = np.concatenate([-losses(model, *members), -losses(model, *nonmembers)])
    truth = np.concatenate([np.ones(len(members[1])), np.zeros(len(nonmembers[1]))])
    fpr, tpr, _ = roc_curve(truth, scores)
    tpr_at = float(np.interp(0.01, fpr, tpr))
    return float(roc_auc_score(truth, scores)), tpr_at, (fpr, tpr)


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    torch.set_num_threads(1)
    df, label, categorical = load_demo(args.dataset)
    X, y = encode(df, fit_schema(df, label, categorical))
    settings = ["off"] + [f"{e:g}" for e in args.epsilons]
    acc: dict[str, dict[str, list[float]]] = {s: {"attack_auc": [], "tpr_at_1pct_fpr": [],
                                                  "utility": []} for s in settings}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sigmas: dict[str, float] = {}
    for rep in range(args.repeats):
        order = np.random.default_rng(args.seed + rep).permutation(len(X))
        m, n = order[:args.members], order[args.members:2 * args.members]
        test = order[2 * args.members:]
        members, nonmembers, held = (X[m], y[m]), (X[n], y[n]), (X[test], y[test])
        for s in settings:
            model = build_model("mlp", X.shape[1], int(y.max()) + 1, args.hidden, seed=rep)
            gen = torch.Generator().manual_seed(args.seed + rep)
            if s == "off":
                train_local(model, *members, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, generator=gen)
            else:
                per_epoch = steps_per_epoch(args.members, args.batch_size)
                sigma = calibrate_sigma(float(s), DELTA, "record", 1 / per_epoch,
                                        args.epochs * per_epoch, 1, None)
                sigmas[s] = sigma
                noise = SeededNoise(args.seed + rep) if args.seed_noise else OsNoise()
                train_local_dp(model, *members, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, clip_norm=args.clip, noise_multiplier=sigma,
                               generator=noise.torch_generator())
            auc, tpr, curve = attack(model, members, nonmembers)
            pred = model(torch.from_numpy(held[0])).argmax(1).numpy()
            acc[s]["attack_auc"].append(auc)
            acc[s]["tpr_at_1pct_fpr"].append(tpr)
            acc[s]["utility"].append(float((pred == held[1]).mean()))
            if rep == 0:
                curves[s] = curve
            if not args.json:
                print(f"  repeat {rep + 1}/{args.repeats} {s:>4}: attack AUC {auc:.3f}, "
                      f"TPR@1%FPR {tpr:.3f}, accuracy {acc[s]['utility'][-1]:.3f}", flush=True)
    result = {s: {k: round(float(np.mean(v)), 4) for k, v in d.items()} for s, d in acc.items()}
    meta = {"dataset": args.dataset, "members": args.members, "epochs": args.epochs,
            "repeats": args.repeats, "delta": DELTA, "clip": args.clip,
            "sigma": {s: round(v, 4) for s, v in sigmas.items()}, "attack": "loss threshold",
            "utility": "accuracy on held-out rows"}
    return result, {"meta": meta, "curves": curves}


def plot(result: dict, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for s, (fpr, tpr) in curves.items():
        label = "no DP" if s == "off" else f"ε = {s}"
        a.plot(fpr, tpr, label=f"{label} (AUC {result[s]['attack_auc']:.3f})")
    a.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    a.set_xscale("log")
    a.set_xlim(1e-3, 1)
    a.set_xlabel("false positive rate (log)")
    a.set_ylabel("true positive rate")
    a.set_title("membership inference (loss threshold), first repeat")
    a.legend(fontsize=8)
    names = list(result)
    x = np.arange(len(names))
    b.bar(x - 0.2, [result[s]["attack_auc"] for s in names], 0.4, label="attack AUC")
    b.bar(x + 0.2, [result[s]["utility"] for s in names], 0.4, label="accuracy (utility)")
    b.axhline(0.5, color="k", ls=":", lw=1)
    b.set_xticks(x, ["no DP" if s == "off" else f"ε={s}" for s in names])
    b.set_ylim(0, 1.05)
    b.set_title("what the noise buys, and what it costs")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["digits", "default", "churn"], default="digits")
    p.add_argument("--members", type=int, default=200)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--epsilons", type=lambda t: [float(x) for x in t.split(",")],
                   default=[1.0, 3.0, 8.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="member sets and shuffling")
    p.add_argument("--seed-noise", action="store_true",
                   help="draw DP noise from --seed (reproducible; demo data only)")
    p.add_argument("--out", default="runs/privacy_audit")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, extra = run(args)
    (out / "privacy_audit.json").write_text(json.dumps({**result, "meta": extra["meta"]},
                                                       indent=2) + "\n")
    plot(result, extra["curves"], out / "privacy_audit.png")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\n{args.dataset}, {args.members} members, {args.epochs} epochs, "
          f"{args.repeats} repeats, δ {DELTA:g}; loss-threshold attack")
    print(f"{'setting':>8} {'σ':>7} {'attack AUC':>11} {'TPR@1%FPR':>10} {'accuracy':>9}")
    for s, r in result.items():
        sigma = extra["meta"]["sigma"].get(s)
        print(f"{'no DP' if s == 'off' else 'ε=' + s:>8} {sigma if sigma else '-':>7} "
              f"{r['attack_auc']:>11.3f} {r['tpr_at_1pct_fpr']:>10.3f} {r['utility']:>9.3f}")
    print(f"wrote {out / 'privacy_audit.json'} and {out / 'privacy_audit.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cost of the secure-aggregation core (node/secagg) per member and round, against today's
plain round (one float32 vector sealed to each peer).

For n = 4, 8, 16, 32 members (t = (n - 1) // 3, so n >= 3t + 1) and d = 5k, 100k
parameters, one member's compute in each step, best of --repeat, on inputs of the real
shapes (held pieces are uniform field elements, as real pieces are; opened pieces are real
codewords, so the decoders run their common no-error path; `open_sum_1_wrong` adds one
wrong piece, the path that names it):

- deal: encode + Shamir-share its vector (degree t) and its masks (degree 2t - 1);
  deal_seeded: the same with t pieces from seeds (`expand_t_seeds`: a holder's side);
- check: its CHECK piece (one blinded combination per dealer) + judging every dealer;
- degree2: its masked pieces of all squared distances and norms (the limb Gram);
- open_degree2: decoding the degree-2t values; select: multi-Krum on them;
- sum: its piece of the selected sum; open_sum: decoding it (degree t) from all n
  pieces, `open_sum_optimistic` from the 2t + 1 of the optimistic opening (detect only).

Bytes a member sends per round (8 bytes per field element, 24-byte header per piece;
signatures and sealing add the same small overhead to both modes and are left out):
deal (n - 1) x (d + 1 + P + 1) (seeded: t of the d + 1 become 4), check (n - 1) x 2n,
degree2 (n - 1) x P, sum (n - 1) x d (optimistic: 2t x d), against the plain round's
(n - 1) x 4d.
P = n(n - 1)/2 + n (distances) or n (norm_only).
One full round (n = 8, d = 5k) is run end to end first and its sum checked exactly.

Times are CPU seconds of this process, best of --repeat; ratios are what they measure
(a shared 2-core machine). BLAS is limited to one thread. Prints a table, then one
JSON object (--json: only the JSON).

    PYTHONPATH=. python scripts/bench_secagg.py [--repeat 3] [--json]

--decode instead compares the decoders, before (the code of --old-commit, loaded from git:
a Python Berlekamp-Welch solve per codeword) and after (syndromes and a vectorised
Berlekamp-Massey), in the same run on the same pieces:
- `decode`: a degree-t sharing from all n pieces with 0, 1 and t wrong ones (random
  rows, at random holders), max_errors = t as open_sum decodes, n = 8, 32, 128 (t =
  (n - 1) // 3), d = 5k and 100k: the value is checked equal and the wrong named;
- `hostile check`: judging n dealers' checks when one holder opened random checks for
  all of them (robust.judge_dealings), at t = (n - 1) // 3 and at t = n // 4 (where the
  mask checks are corrected too): old, new in one call (all dealers batched) and new
  called once per dealer (what node/runtime/secure_round.py does today).

    PYTHONPATH=. python scripts/bench_secagg.py --decode [--repeat 3] [--old-commit e4efdf1]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one member = one core; before numpy loads BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.secagg import field as F  # noqa: E402
from node.secagg import robust as R  # noqa: E402
from node.secagg.encoding import FixedPoint  # noqa: E402
from node.secagg.pieces import CHECK, DEGREE2, HEADER_BYTES, MASK, SEED, SEED_VALUES, SUM, VECTOR, Piece  # noqa: E402
from node.secagg.shamir import correctable, decode, share  # noqa: E402

MEMBERS = (4, 8, 16, 32)
# The steps of one round at one member (unseeded dealing; the seeded and t + 2 variants
# are reported beside them).
ROUND_STEPS = ("deal", "check", "degree2", "open_degree2", "select", "sum", "open_sum")
DIMS = (5_000, 100_000)


def best(fn, repeat: int) -> tuple[float, object]:
    """The least CPU time (this process) of `repeat` calls: on a machine other jobs load,
    CPU time shifts less than wall time (one BLAS thread, so the two agree when idle)."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return min(times), out


def bytes_per_member(n: int, d: int, variant: str, seeded: bool = False,
                     optimistic: bool = False) -> dict[str, int]:
    t = (n - 1) // 3
    opened = n * (n - 1) // 2 + n if variant == "distances" else n
    peers = n - 1
    full = peers - t if seeded else peers  # VECTOR pieces sent; the other t are SEED pieces
    codec = FixedPoint.choose(1.0, d, n)
    sum_to = len(R.sum_recipients(R.RoundParams(1, n, t, codec), 1)) if optimistic else peers
    out = {
        "deal": (full * (HEADER_BYTES + 8 * (d + 1)) + (peers - full) * (HEADER_BYTES + 8 * SEED_VALUES)
                 + peers * (HEADER_BYTES + 8 * (opened + 1))),
        "check": peers * (HEADER_BYTES + 8 * 2 * n),
        "degree2": peers * (HEADER_BYTES + 8 * opened),
        "sum": sum_to * (HEADER_BYTES + 8 * d),
    }
    out["total"] = sum(out.values())
    out["plain"] = peers * 4 * d
    return out


def end_to_end_check(rng: np.random.Generator) -> dict:
    """One honest round of 8 members (one of them sign-flipped), d = 5k: the opened sum must
    equal the field sum of the selected encodings."""
    n, t, d = 8, 2, 5_000
    codec = FixedPoint.choose(1.0, d, n)
    p = R.RoundParams(1, n, t, codec)
    base = rng.normal(size=d)
    base /= 2 * np.linalg.norm(base)
    x = {i: base + 0.02 * rng.normal(size=d) / np.sqrt(d) for i in range(1, n + 1)}
    x[3] = -x[3]
    enc = {i: codec.encode(v) for i, v in x.items()}
    deals = {i: R.deal_encoded(p, i, e) for i, e in enc.items()}
    dealers = tuple(range(1, n + 1))
    vec = {j: {i: deals[i][j][0] for i in dealers} for j in dealers}
    msk = {j: {i: deals[i][j][1] for i in dealers} for j in dealers}
    verdict = R.judge_dealings(p, {j: R.check_piece(p, j, vec[j], msk[j], dealers, b"c")
                                   for j in dealers}, dealers)
    values = R.open_degree2(p, {j: R.degree2_piece(p, j, vec[j], msk[j], dealers)
                                for j in dealers}, dealers)
    sel = R.select(p, values)
    agg = R.open_sum(p, {j: R.sum_piece(p, j, vec[j], sel.selected) for j in dealers},
                     sel.selected)
    exact = bool((agg.field_sum == F.sum_mod(np.stack([enc[i] for i in sel.selected]),
                                              axis=0)).all())
    if not exact or 3 in sel.selected or verdict.accepted != dealers:
        raise SystemExit(f"end-to-end round wrong: exact {exact}, selected {sel.selected}")
    return {"n": n, "t": t, "d": d, "selected": list(sel.selected), "sum_exact": exact}


def measure(n: int, d: int, repeat: int, rng: np.random.Generator) -> dict:
    t = (n - 1) // 3
    codec = FixedPoint.choose(1.0, d, n)
    p = R.RoundParams(1, n, t, codec)
    j = 1  # the member measured
    dealers = tuple(range(1, n + 1))
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    times: dict[str, float] = {}
    times["deal"], _ = best(lambda: R.deal(p, j, v), repeat)
    times["deal_seeded"], dealt = best(lambda: R.deal(p, j, v, seeded=True), repeat)
    seeds = [dealt[h][0] for h in R.seeded_holders(p, j)]
    assert all(s.kind == SEED for s in seeds)
    times["expand_t_seeds"], _ = best(lambda: [R.expand_seed_piece(p, s) for s in seeds], repeat)
    vec = {i: Piece(1, VECTOR, i, j, F.uniform(d + 1)) for i in dealers}
    msk = {i: Piece(1, MASK, i, j, F.uniform(p.opened + 1)) for i in dealers}
    checks_of = {}
    for kind, width, deg in ((0, 1, t), (1, 1, 2 * t - 1)):
        checks_of[kind] = share(F.uniform(n * width), n, deg)  # every dealer's check codeword
    checks = {h: Piece(1, CHECK, 0, h, np.concatenate([checks_of[0][h - 1], checks_of[1][h - 1]]))
              for h in dealers}

    def check_step():
        R.check_piece(p, j, vec, msk, dealers, b"challenge")
        return R.judge_dealings(p, checks, dealers)

    times["check"], _ = best(check_step, repeat)
    times["degree2"], _ = best(lambda: R.degree2_piece(p, j, vec, msk, dealers), repeat)
    d2 = share(F.uniform(p.opened), n, 2 * t)
    opened2 = {h: Piece(1, DEGREE2, 0, h, d2[h - 1]) for h in dealers}
    times["open_degree2"], values = best(lambda: R.open_degree2(p, opened2, dealers), repeat)
    times["select"], sel = best(lambda: R.select(p, values), repeat)
    selected = tuple(range(1, n - t + 1))
    times["sum"], _ = best(lambda: R.sum_piece(p, j, vec, selected), repeat)
    # a real sum codeword whose value decodes within the aggregate bound
    enc = F.sum_mod(np.stack([codec.encode(v) for _ in selected]), axis=0)
    sums = share(enc, n, t)
    opened = {h: Piece(1, SUM, 0, h, sums[h - 1]) for h in dealers}
    times["open_sum"], _ = best(lambda: R.open_sum(p, opened, selected), repeat)
    wrong = dict(opened)
    bad = sums[n - 1].copy()
    bad[0] = (bad[0] + np.uint64(1)) % F.P64
    wrong[n] = Piece(1, SUM, 0, n, bad)
    times["open_sum_1_wrong"], agg = best(lambda: R.open_sum(p, wrong, selected), 1)
    assert agg.wrong == (n,)
    senders = [h for h in dealers if j in R.sum_recipients(p, h)] + [j]
    few = {h: opened[h] for h in senders}  # the optimistic opening: 2t + 1 pieces, detect only
    times["open_sum_optimistic"], _ = best(lambda: R.open_sum(p, few, selected, correct=False),
                                           repeat)
    times["round"] = sum(v for k, v in times.items() if k in ROUND_STEPS)
    b = bytes_per_member(n, d, "distances")
    seeded = bytes_per_member(n, d, "distances", seeded=True)
    both = bytes_per_member(n, d, "distances", seeded=True, optimistic=True)
    norm_only = bytes_per_member(n, d, "norm_only")
    return {"n": n, "t": t, "d": d, "scale_bits": codec.scale_bits,
            "seconds": {k: round(x, 4) for k, x in times.items()},
            "bytes": b, "ratio_to_plain": round(b["total"] / b["plain"], 3),
            "bytes_seeded": seeded["total"], "ratio_seeded": round(seeded["total"] / seeded["plain"], 3),
            "bytes_seeded_optimistic": both["total"],
            "ratio_seeded_optimistic": round(both["total"] / both["plain"], 3),
            "bytes_norm_only": norm_only["total"],
            "ratio_norm_only": round(norm_only["total"] / norm_only["plain"], 3)}


def cuts(n: int = 8, d: int = 100_000) -> dict[str, float]:
    """Ratios to the plain round at n members (vector-sized messages only): full dealing
    and opening; seeded dealing (`deal(seeded=True)`); the optimistic opening to 2t members
    (`sum_recipients`); both; and both with 61-bit packing (not built)."""
    t = (n - 1) // 3
    plain = (n - 1) * 4 * d
    deal, seeded, total_sum, optimistic = (n - 1) * d, (n - 1 - t) * d, (n - 1) * d, 2 * t * d
    return {
        "full": round((deal + total_sum) * 8 / plain, 2),
        "seeded": round((seeded + total_sum) * 8 / plain, 2),
        "optimistic": round((deal + optimistic) * 8 / plain, 2),
        "seeded+optimistic": round((seeded + optimistic) * 8 / plain, 2),
        "seeded+optimistic+packed_61_bits (not built)": round((seeded + optimistic) * 61 / 8 / plain, 2),
    }


DECODE_MEMBERS = (8, 32, 128)
OLD_COMMIT = "e4efdf1"  # main before the decoder was vectorised (issue 22, third session)


def old_modules(commit: str) -> tuple[types.ModuleType, types.ModuleType]:
    """shamir.py and robust.py as they were at `commit` (read with git show), robust bound
    to that shamir; field.py is today's (the old code only calls what it still has)."""
    out = []
    saved = sys.modules["node.secagg.shamir"]
    try:
        for name in ("shamir", "robust"):
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:node/secagg/{name}.py"],
                                 capture_output=True, text=True, check=True).stdout
            mod = types.ModuleType(f"old_{name}_{commit}")
            sys.modules[mod.__name__] = mod  # dataclasses look their module up
            exec(compile(src, f"{commit}:node/secagg/{name}.py", "exec"), mod.__dict__)
            out.append(mod)
            if name == "shamir":
                sys.modules["node.secagg.shamir"] = mod  # robust's `from node.secagg.shamir import`
    finally:
        sys.modules["node.secagg.shamir"] = saved
    return out[0], out[1]


def decode_rows(repeat: int, old_shamir: types.ModuleType, rng: np.random.Generator) -> list[dict]:
    rows = []
    for d in DIMS:
        for n in DECODE_MEMBERS:
            t = (n - 1) // 3
            secret = F.uniform(d, rng)
            right = share(secret, n, t, rng)
            for count in sorted({0, 1, t}):
                pieces = right.copy()
                wrong = tuple(sorted(rng.choice(np.arange(1, n + 1), count, replace=False).tolist()))
                for j in wrong:
                    pieces[j - 1] = F.uniform(d, rng)
                given = {j: pieces[j - 1] for j in range(1, n + 1)}
                row = {"n": n, "t": t, "d": d, "wrong": count}
                for label, fn in (("old", old_shamir.decode), ("new", decode)):
                    reps = 1 if (label == "old" and n >= 128 and count) else repeat
                    row[label], got = best(partial(fn, given, t, max_errors=t), reps)
                    if not ((got.value == secret).all() and got.wrong == wrong):
                        raise SystemExit(f"{label} decode wrong at n {n} d {d}: {got.wrong} vs {wrong}")
                row["speedup"] = round(row["old"] / max(row["new"], 1e-6), 1)
                rows.append(row)
    return rows


def per_dealer(p: R.RoundParams, checks: dict, dealers: tuple[int, ...]) -> list:
    return [R.judge_dealings(p, checks, (i,)) for i in dealers]


def hostile_rows(repeat: int, old_robust: types.ModuleType, rng: np.random.Generator) -> list[dict]:
    rows = []
    for n in DECODE_MEMBERS:
        for t in sorted({(n - 1) // 3, max(1, n // 4)}):
            p = R.RoundParams(1, n, t, FixedPoint.choose(1.0, 16, n))
            dealers = tuple(range(1, n + 1))
            vec, msk = share(F.uniform(n, rng), n, t), share(F.uniform(n, rng), n, 2 * t - 1)
            checks = {h: Piece(1, CHECK, 0, h, np.concatenate([vec[h - 1], msk[h - 1]])) for h in dealers}
            checks[n] = Piece(1, CHECK, 0, n, F.uniform(2 * n, rng))  # one holder lies about all
            row = {"n": n, "t": t}
            reps = 1 if n >= 128 else repeat
            row["old"], old = best(partial(old_robust.judge_dealings, p, checks, dealers), reps)
            row["new"], new = best(partial(R.judge_dealings, p, checks, dealers), repeat)
            row["new_per_dealer"], _ = best(partial(per_dealer, p, checks, dealers), repeat)
            # the liar is disputed and every dealer accepted wherever the mask check may
            # correct one wrong check (shamir.correctable); else every dealer unresolved
            expect = (dealers, {n}) if correctable(n - 2 * t, t) >= 1 else ((), set())
            if (new.accepted, {j for (_, j, _) in new.disputes}) != expect:
                raise SystemExit(f"hostile check at n {n}, t {t}: accepted {new.accepted}, "
                                 f"disputes {sorted(new.disputes)}")
            row["new_accepted"], row["new_unresolved"] = len(new.accepted), len(new.unresolved)
            row["old_accepted"], row["old_refused"] = len(old.accepted), len(old.refused)
            row["speedup"] = round(row["old"] / max(row["new"], 1e-6), 1)
            rows.append(row)
    return rows


def decode_bench(repeat: int, commit: str, as_json: bool) -> None:
    rng = np.random.default_rng(1)  # the bench's inputs only
    old_shamir, old_robust = old_modules(commit)
    t0 = time.perf_counter()
    result = {"old_commit": commit, "decode": decode_rows(repeat, old_shamir, rng),
              "hostile_check": hostile_rows(repeat, old_robust, rng)}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if not as_json:
        print("decode (CPU s, best of --repeat; old at 128 members with wrong pieces: once)")
        print(f"{'n':>4} {'t':>3} {'d':>7} {'wrong':>5} {'old':>9} {'new':>9} {'x':>7}")
        for r in result["decode"]:
            print(f"{r['n']:>4} {r['t']:>3} {r['d']:>7} {r['wrong']:>5} {r['old']:>9.4f} "
                  f"{r['new']:>9.4f} {r['speedup']:>7.1f}")
        print("hostile check: one holder opens random checks of every dealing (judge_dealings)")
        print(f"{'n':>4} {'t':>3} {'old':>9} {'new':>9} {'per dealer':>10} {'x':>7} "
              f"{'accepted old/new':>16} {'unresolved new':>14}")
        for r in result["hostile_check"]:
            print(f"{r['n']:>4} {r['t']:>3} {r['old']:>9.4f} {r['new']:>9.4f} "
                  f"{r['new_per_dealer']:>10.4f} {r['speedup']:>7.1f} "
                  f"{r['old_accepted']:>8}/{r['new_accepted']:<7} {r['new_unresolved']:>14}")
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--decode", action="store_true", help="compare the decoders, old and new")
    ap.add_argument("--old-commit", default=OLD_COMMIT)
    args = ap.parse_args()
    if args.decode:
        decode_bench(args.repeat, args.old_commit, args.json)
        return
    rng = np.random.default_rng(0)  # the bench's inputs only; shares use the OS's randomness
    t0 = time.perf_counter()
    result = {"end_to_end": end_to_end_check(rng), "rows": [], "cuts_at_8": cuts()}
    for d in DIMS:
        for n in MEMBERS:
            result["rows"].append(measure(n, d, args.repeat if d < 50_000 else max(1, args.repeat - 1),
                                          rng))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.json:
        steps = ("deal", "deal_seeded", "check", "degree2", "open_degree2", "sum", "open_sum",
                 "open_sum_optimistic", "round")
        print(f"{'n':>3} {'t':>2} {'d':>7} " + " ".join(f"{s:>12}" for s in steps)
              + f" {'MB sent':>8} {'plain MB':>8} {'x plain':>7} {'x seeded':>8} {'x s+opt':>7}"
              f" {'x norm':>6}")
        for r in result["rows"]:
            s = r["seconds"]
            print(f"{r['n']:>3} {r['t']:>2} {r['d']:>7} " + " ".join(f"{s[k]:>12.4f}" for k in steps)
                  + f" {r['bytes']['total'] / 1e6:>8.2f} {r['bytes']['plain'] / 1e6:>8.2f}"
                  f" {r['ratio_to_plain']:>7.2f} {r['ratio_seeded']:>8.2f}"
                  f" {r['ratio_seeded_optimistic']:>7.2f} {r['ratio_norm_only']:>6.2f}")
        print("bytes at 8 members, d = 100k, as a multiple of the plain round:",
              ", ".join(f"{k} {v}" for k, v in result["cuts_at_8"].items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

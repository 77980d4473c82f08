#!/usr/bin/env bash
# The walkthrough of docs/operate/own-data.md, run as written: three hospitals' CSV
# files (with empty cells) to three `flnode run` processes over libp2p on 127.0.0.1, record-level
# DP at epsilon 3, `flnode status` while running and after, and each member's own
# `flnode report --state-dir`. Only the addresses differ from that page (free ports on
# loopback instead of 10.0.0.x:4001).
#
#   scripts/walkthrough_own_data.sh [WORK_DIR]      # default: a new temp dir
#
# Each member works in its own directory (WORK/hosp-a, ...: its machine); hosp-a also
# coordinates. The data: scikit-learn's load_breast_cancer (the UCI WDBC table: 30
# numeric columns with raw values), shuffled, cut into 62 / 130 / 250 rows, with a
# `diagnosis` label, a derived categorical `clinic` column and a few empty cells in
# `mean texture`, `worst smoothness` and `clinic`. The public reference for the ranges
# is the whole published table (here the members' rows are drawn from it; a real
# consortium uses a published table of the same measurements).
#
# Takes about 1 minute on an idle machine here (56 s: the run 41 s, 30 rounds) and 3 on
# busy cores: not part of the test suite. tests/test_own_data.py checks that every `flnode` line below is on that page.
# Exits non-zero if any step fails or the members end with different final models.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/flnode-walkthrough.XXXXXX)}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
export PYTHONPATH=$ROOT
flnode() { "$PY" -m node.cli "$@"; }
MEMBERS=(hosp-a hosp-b hosp-c)
mkdir -p "$WORK"
cd "$WORK"
echo "walkthrough in $WORK"

# --- the members' files (what each hospital already has) ---------------------------
"$PY" - <<'EOF'
import os
import numpy as np
from sklearn.datasets import load_breast_cancer

d = load_breast_cancer(as_frame=True)
df = d.frame.rename(columns={"target": "diagnosis"})
df["diagnosis"] = df["diagnosis"].map({0: "malignant", 1: "benign"})
rng = np.random.default_rng(7)
df["clinic"] = rng.choice(["north", "south", "east"], size=len(df))
df = df.sample(frac=1.0, random_state=7).reset_index(drop=True)
d.data.to_csv("public-reference.csv", index=False)       # the published table
df.iloc[:114].to_csv("test.csv", index=False)              # rows no member holds
off = 114
for name, n in (("hosp-a", 62), ("hosp-b", 130), ("hosp-c", 250)):
    part = df.iloc[off:off + n].copy()
    off += n
    for col in ("mean texture", "worst smoothness", "clinic"):
        idx = rng.choice(n, size=max(1, n // 40), replace=False)
        part.iloc[idx, part.columns.get_loc(col)] = np.nan
    os.makedirs(f"{name}/data", exist_ok=True)
    part.to_csv(f"{name}/data/{name}.csv", index=False)
EOF
PORTS=($("$PY" -c 'from scripts.ports import free_ports; print(*free_ports(3))'))

# --- 1. every member: a key pair and a schema draft --------------------------------
for m in "${MEMBERS[@]}"; do
  (cd "$m" && flnode keygen --out keys --name "$m" \
     && flnode schema infer "data/$m.csv" --label diagnosis --out "$m-schema.toml" >/dev/null)
done
# (docs/operate/own-data.md, shown for hosp-a:)
#   flnode keygen --out keys --name hosp-a
#   flnode schema infer data/hosp-a.csv --label diagnosis --out hosp-a-schema.toml

# --- 2. the coordinator (hosp-a): merge, ranges from the public table, build --------
cp hosp-b/hosp-b-schema.toml hosp-c/hosp-c-schema.toml hosp-a/
cp hosp-b/keys/hosp-b.pub hosp-c/keys/hosp-c.pub hosp-a/keys/
cp public-reference.csv hosp-a/
(cd hosp-a \
  && flnode schema merge hosp-a-schema.toml hosp-b-schema.toml hosp-c-schema.toml --ranges-from public-reference.csv --out schema.toml >/dev/null \
  && flnode consortium build --name hospitals --schema schema.toml --privacy-mode record --clip 1.0 \
       --member "keys/hosp-a.pub@libp2p=/ip4/127.0.0.1/tcp/${PORTS[0]}" \
       --member "keys/hosp-b.pub@libp2p=/ip4/127.0.0.1/tcp/${PORTS[1]}" \
       --member "keys/hosp-c.pub@libp2p=/ip4/127.0.0.1/tcp/${PORTS[2]}" --out consortium.toml \
  && flnode consortium show consortium.toml)
cp hosp-a/consortium.toml hosp-b/
cp hosp-a/consortium.toml hosp-c/

# --- 3. every member: node.toml (the example, five keys set), run, status ------------
for m in "${MEMBERS[@]}"; do
  sed -e "s#^state_dir = .*#state_dir = \"state/$m\"#" \
      -e "s#^key = \"keys/bank-0.key\"#key = \"keys/$m.key\"#" \
      -e "s#^path = \"data/bank-0.csv\"#path = \"data/$m.csv\"#" \
      -e "s#^min_members = \"majority\"#min_members = 3#" \
      "$ROOT/network_configs/examples/node.toml" > "$m/node.toml"
  grep -q '^path = "consortium.toml"' "$m/node.toml"
  grep -q '^mode = "record"' "$m/node.toml"
  grep -q '^epsilon = 3.0' "$m/node.toml"
  grep -q '^min_members = 3' "$m/node.toml"
done
PIDS=()
for m in "${MEMBERS[@]}"; do
  (cd "$m" && exec "$PY" -m node.cli run --config node.toml >run.out 2>run.err) &
  PIDS+=($!)
done
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
# status while running: wait until hosp-a has closed a round (or a node has exited)
for _ in $(seq 300); do
  grep -q '^hosp-a round ' hosp-a/run.out 2>/dev/null && break
  kill -0 "${PIDS[0]}" 2>/dev/null || break
  sleep 1
done
(cd hosp-a && flnode status --state-dir state/hosp-a --config node.toml)
rc=0
for i in "${!PIDS[@]}"; do wait "${PIDS[$i]}" || { rc=$?; echo "${MEMBERS[$i]} exited $rc"; }; done
trap - EXIT
for m in "${MEMBERS[@]}"; do
  echo "== $m: its log (warnings)"; cat "$m/run.err"
  tail -n 2 "$m/run.out"
done
[ "$rc" = 0 ] || exit "$rc"

# --- 4. every member: status after, its own report ----------------------------------
for m in "${MEMBERS[@]}"; do
  (cd "$m" && flnode status --state-dir "state/$m" --config node.toml \
     && flnode report --state-dir "state/$m")
done
"$PY" - <<'EOF'
import json
digests = set()
for m in ("hosp-a", "hosp-b", "hosp-c"):
    r = json.load(open(f"{m}/state/{m}/report.json"))
    digests.add(r["final"]["digest"])
    last = r["rounds"][-1]
    print(f"{m}: final {r['metric']} {last[r['metric']]:.4f} on {last['eval_rows']} own held-out "
          f"rows, ε spent {r['privacy']['epsilon_spent']:.2f} of {r['privacy']['epsilon_budget']}")
if len(digests) != 1:
    raise SystemExit(f"members ended with different final models: {sorted(digests)}")
print("every member ended with the same final model")
EOF

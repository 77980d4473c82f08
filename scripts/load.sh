#!/usr/bin/env bash
# Run a command with N CPU-bound busy loops beside it, then stop them by PID.
#   scripts/load.sh 2 -- .venv/bin/pytest -q
# Prints the command's wall time; exits with the command's status.
set -uo pipefail
n="${1:?usage: load.sh N -- COMMAND...}"
shift
[ "${1:-}" = "--" ] && shift
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait "${pids[@]}" 2>/dev/null; }
trap cleanup EXIT INT TERM
for _ in $(seq "$n"); do
  ( while :; do :; done ) &
  pids+=("$!")
done
echo "load.sh: $n busy loops running (pids ${pids[*]})"
start=$(date +%s)
"$@"
rc=$?
echo "load.sh: command exited $rc after $(( $(date +%s) - start )) s with $n busy loops"
exit "$rc"

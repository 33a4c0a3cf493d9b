#!/usr/bin/env bash
# The test suite must hold on a busy machine: this runs it three times in a row while two busy
# loops keep two CPUs at 100%, and fails if any run fails.
#   ./scripts/test-under-load.sh [pytest args...]      (the arguments go to ./scripts/test.sh)
# RUNS (default 3) and HOGS (default 2) change the number of runs and of busy loops. The busy
# loops are stopped when the script ends, however it ends.
set -uo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
HOGS=${HOGS:-2}
say() { printf '[test-under-load] %s\n' "$*"; }

hogs=()
stop_hogs() {
  [ ${#hogs[@]} -eq 0 ] && return
  kill "${hogs[@]}" 2>/dev/null
  wait "${hogs[@]}" 2>/dev/null
  hogs=()
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM

for _ in $(seq "$HOGS"); do
  ( while :; do :; done ) &
  hogs+=($!)
done
say "$HOGS busy loops running (pids ${hogs[*]}); $RUNS runs of ./scripts/test.sh $*"

failed=()
for run in $(seq "$RUNS"); do
  say "run $run/$RUNS"
  if ./scripts/test.sh "$@"; then
    say "run $run/$RUNS passed"
  else
    say "run $run/$RUNS FAILED"
    failed+=("$run")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: run(s) ${failed[*]} of $RUNS"
  exit 1
fi
say "all $RUNS runs passed under $HOGS busy loops"

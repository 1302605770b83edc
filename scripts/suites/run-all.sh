#!/usr/bin/env bash
# Run every external file-system suite against DIR and print a summary.
# Usage: scripts/suites/run-all.sh DIR [--quick]
# Env: FSVA_SUITES="pjdfstest fsx ..." to choose/ordering; FSVA_SUITES_LOGDIR=<dir>
# keeps each suite's full output there (default: a temp dir, printed at the end).
# Each suite still honours FSVA_SUITE_EXPECTED only when run on its own
# (the per-suite default tests/expected-failures/<suite>.txt is used here).
# Exit status: 0 if every suite passed (failures all expected), 1 otherwise.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 DIR [--quick]" >&2; exit 2; }
SUITES="${FSVA_SUITES:-pjdfstest test_syscalls pyfakefs fsx stress-ng}"
LOGS="${FSVA_SUITES_LOGDIR:-$(mktemp -d /tmp/fsva-suites-logs.XXXXXX)}"
mkdir -p "$LOGS"
unset FSVA_SUITE_EXPECTED

summary=()
status=0
t_all=$SECONDS
for s in $SUITES; do
    echo "===== $s $* =====" >&2
    t0=$SECONDS
    "$HERE/$s.sh" "$@" > "$LOGS/$s.log" 2>&1
    rc=$?
    dt=$((SECONDS - t0))
    line="$(grep -E "^$s: [0-9]+ passed, [0-9]+ failed" "$LOGS/$s.log" | tail -n 1)"
    [ -n "$line" ] || line="$s: 0 passed, 1 failed (no result line)"
    grep -E 'UNEXPECTED FAILURE|internal error|ERROR' "$LOGS/$s.log" | head -n 20 >&2
    echo "$line  [${dt}s, exit $rc]" >&2
    if [ "$rc" = 0 ]; then verdict=PASS; else verdict=FAIL; status=1; fi
    summary+=("$(printf '%-55s # %s, %ss' "$line" "$verdict" "$dt")")
done
echo
echo "===== fsva suites summary: $* (logs: $LOGS) ====="
printf '%s\n' "${summary[@]}"
echo "total time: $((SECONDS - t_all))s; overall: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status

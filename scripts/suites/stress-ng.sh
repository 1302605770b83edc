#!/usr/bin/env bash
# stress-ng (Debian package) "filesystem" class with --verify. Each stressor
# runs as its own stress-ng invocation (1 instance, --timeout T, temp path in
# DIR), two at a time, so each gets its own pass/fail:
#   exit 0 = passed; anything else = failed (2: stressor failed/verify error,
#   3: could not run for lack of resources / unsupported syscall, 4: not
#   implemented, 5/6: crashed). A stressor that exits 0 after printing
#   "skipping stress test" (feature unsupported, e.g. verity) counts as skipped. "bind-mount" is excluded (stress-ng flags it
#   as pathological: it may hang the machine).
# Default T=3 s (~100 s total); --quick T=1 s (~30 s).
# Env: FSVA_STRESSNG_TIMEOUT=<s>, FSVA_STRESSNG_STRESSORS="a b c" override.
SUITE=stress-ng
source "$(dirname "$0")/lib.sh"
parse_args "$@"
trap cleanup_work EXIT

apt_install stress-ng stress-ng

if [ "$QUICK" = 1 ]; then T=1; else T=3; fi
T="${FSVA_STRESSNG_TIMEOUT:-$T}"
JOBS="${FSVA_STRESSNG_JOBS:-2}"
if [ -n "${FSVA_STRESSNG_STRESSORS:-}" ]; then
    STRESSORS="$FSVA_STRESSNG_STRESSORS"
else
    STRESSORS="$(stress-ng --class 'filesystem?' 2>&1 | sed -n "s/^class 'filesystem' stressors: //p")"
    STRESSORS="$(tr ' ' '\n' <<<"$STRESSORS" | grep -vx 'bind-mount' | tr '\n' ' ')"
fi
[ -n "${STRESSORS// /}" ] || die "could not list stress-ng filesystem stressors"
log "$(stress-ng --version 2>&1 | head -n1); ${T}s per stressor, $JOBS in parallel: $STRESSORS"

run_stressor() { # run in a subshell by xargs: $1 = stressor
    local s="$1" d="$WORK/$1" rc
    mkdir -p "$d"
    # hard cap: T plus generous time for setup/teardown (e.g. dirdeep cleanup)
    timeout -k 10 $((T * 4 + 60)) stress-ng --"$s" 1 --verify --timeout "${T}s" \
        --temp-path "$d" --metrics-brief > "$LOGDIR/$s.out" 2>&1
    rc=$?
    echo "$rc" > "$LOGDIR/$s.rc"
    rm -rf "$d" 2>/dev/null || true
}
export -f run_stressor
export WORK LOGDIR T
set +e
tr ' ' '\n' <<<"$STRESSORS" | grep -v '^$' | xargs -P "$JOBS" -I{} bash -c 'run_stressor "$@"' _ {}
set -e

P=0; F=0; S=0
IDS="$LOGDIR/failed"; : > "$IDS"
for s in $STRESSORS; do
    rc=$(cat "$LOGDIR/$s.rc" 2>/dev/null || echo 99)
    if [ "$rc" = 0 ] && grep -q 'skipping stress test' "$LOGDIR/$s.out"; then
        # stress-ng exits 0 when a stressor finds its feature unsupported
        S=$((S + 1))
        printf '  %-14s skipped: %s\n' "$s" "$(grep -m1 'skipping stress test' "$LOGDIR/$s.out" | sed 's/^.*\] //')"
    elif [ "$rc" = 0 ]; then
        P=$((P + 1)); printf '  %-14s pass\n' "$s"
    else
        F=$((F + 1)); echo "$s" >> "$IDS"
        why=$({ grep -E 'fail|error|not supported|skipping|aborted|No such|denied' "$LOGDIR/$s.out" \
              | grep -v 'successful run\|^stress-ng: info: .*dispatching' | head -n 3 | tr '\n' ' '; } || true)
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why="timed out after $((T * 4 + 60)) s; $why"; fi
        printf '  %-14s FAIL (exit %s) %s\n' "$s" "$rc" "$why"
        keep="$CACHE/stress-ng-failures/$(date +%Y%m%d-%H%M%S)-$s"
        mkdir -p "$keep" && cp "$LOGDIR/$s.out" "$keep/" 2>/dev/null || true
    fi
done
finish "$P" "$F" "$S" "$IDS"

#!/usr/bin/env bash
# Runs every external suite (run-all.sh) against fsva mounts of each backend, the way CI
# does: mount with the freshly built binary, run, unmount. Prints each suite's counts.
#   scripts/suites/ci.sh [--quick]
# Env: FSVA_BIN (default target/debug/fsva), FSVA_CI_BACKENDS (default "mem passthrough").
set -uo pipefail
cd "$(dirname "$0")/../.."
fsva=${FSVA_BIN:-target/debug/fsva}
backends=${FSVA_CI_BACKENDS:-mem passthrough}
status=0
for b in $backends; do
    # pjdfstest needs short paths (unix socket names).
    mp=/tmp/fsva-ci-$b
    export_dir=/var/tmp/fsva-ci-export-$b
    mkdir -p "$mp"
    spec=$b
    if [[ $b == passthrough ]]; then
        rm -rf "$export_dir"; mkdir -p "$export_dir"; chmod 0777 "$export_dir"
        spec=passthrough:$export_dir
    fi
    if grep -q " $mp fuse" /proc/self/mountinfo; then "$fsva" umount --lazy "$mp" || true; fi
    if ! "$fsva" mount --backend "$spec" "$mp"; then
        echo "suites: mounting $spec failed" >&2; status=1; continue
    fi
    chmod 0777 "$mp"
    echo "===== external suites on fsva $spec ====="
    FSVA_SUITE_BACKEND=$b FSVA_SUITES_LOGDIR=/tmp/fsva-suites-$b \
        scripts/suites/run-all.sh "$mp" "$@" || status=1
    "$fsva" status
    "$fsva" umount "$mp" || { echo "suites: unmounting $mp failed" >&2; status=1; }
    [[ $b == passthrough ]] && rm -rf "$export_dir"
done
exit $status

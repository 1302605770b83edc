# Shared helpers for scripts/suites/*.sh. Source it; do not execute it.
#
# Conventions (every suite script):
#   scripts/suites/<name>.sh DIR [--quick]
#   - installs its suite idempotently into $FSVA_SUITES_CACHE (default
#     /var/cache/fsva-suites) or ~/.cargo/bin; nothing goes into the repo
#   - runs the suite against DIR (a scratch subdirectory is created inside it)
#   - prints the failing case ids, then as the LAST line:
#       SUITE: N passed, M failed[, K skipped]
#   - exits nonzero if any failing case is not listed in the expected-failure
#     file (default tests/expected-failures/<suite>.txt, override with
#     FSVA_SUITE_EXPECTED=<file>), or if the suite could not run at all.
# Expected-failure file format: one case id per line, optional "# reason";
# blank lines and lines starting with '#' are ignored.

set -euo pipefail
trap 'echo "[${SUITE:-suite}] internal error: exit $? at line $LINENO of $0" >&2' ERR

SUITES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SUITES_DIR/../.." && pwd)"
CACHE="${FSVA_SUITES_CACHE:-/var/cache/fsva-suites}"
export PATH="$HOME/.cargo/bin:$PATH"
# Unprivileged identity used by suites that run as non-root.
NOBODY_UID="${FSVA_SUITE_UID:-65534}"
NOBODY_GID="${FSVA_SUITE_GID:-65534}"

log() { echo "[$SUITE] $*" >&2; }
die() { echo "[$SUITE] ERROR: $*" >&2; echo "$SUITE: 0 passed, 1 failed"; exit 2; }

# parse_args "$@" -> sets TARGET (absolute), QUICK (0/1), WORK (scratch dir in TARGET),
#   LOGDIR (private temp dir outside TARGET), EXPECTED
parse_args() {
    TARGET=""
    QUICK=0
    for a in "$@"; do
        case "$a" in
            --quick) QUICK=1 ;;
            -h|--help) echo "usage: $0 DIR [--quick]"; exit 0 ;;
            -*) echo "unknown option $a" >&2; exit 2 ;;
            *) [ -z "$TARGET" ] || { echo "only one DIR allowed" >&2; exit 2; }; TARGET="$a" ;;
        esac
    done
    [ -n "$TARGET" ] || { echo "usage: $0 DIR [--quick]" >&2; exit 2; }
    [ -d "$TARGET" ] || { echo "$TARGET is not a directory" >&2; exit 2; }
    TARGET="$(cd "$TARGET" && pwd)"
    [ "$(id -u)" = 0 ] || { echo "$0 must run as root" >&2; exit 2; }
    mkdir -p "$CACHE"
    WORK="$TARGET/fsva-$SUITE.$$"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    chmod 0755 "$WORK"
    LOGDIR="$(mktemp -d "/tmp/fsva-suite-$SUITE.XXXXXX")"
    EXPECTED="${FSVA_SUITE_EXPECTED:-$REPO_ROOT/tests/expected-failures/$SUITE.txt}"
}

cleanup_work() {
    [ -n "${LOGDIR:-}" ] && rm -rf "$LOGDIR"
    [ -n "${WORK:-}" ] && [ -d "$WORK" ] && { chmod -R u+rwx "$WORK" 2>/dev/null || true; rm -rf "$WORK" 2>/dev/null || true; }
}

apt_install() { # apt_install CMD-TO-CHECK PKG...
    local check="$1"; shift
    if ! command -v "$check" >/dev/null 2>&1; then
        log "installing Debian packages: $*"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 \
          || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; }
    fi
}

# Run a command as the unprivileged uid/gid (no supplementary groups).
as_nobody() {
    setpriv --reuid="$NOBODY_UID" --regid="$NOBODY_GID" --clear-groups -- "$@"
}

# finish PASSED FAILED SKIPPED FAILED_IDS_FILE
# Compares failed ids with the expected list, prints summary, exits.
finish() {
    local passed="$1" failed="$2" skipped="$3" ids="$4"
    local unexpected=0 expected_hit=0 id
    local -A exp=()
    # FSVA_SUITE_BACKEND=<name> adds tests/expected-failures/<suite>.<name>.txt: cases a
    # backend is known to fail although native ext4 passes them (a documented gap).
    local lists=("$EXPECTED")
    if [ -n "${FSVA_SUITE_BACKEND:-}" ]; then
        lists+=("$REPO_ROOT/tests/expected-failures/$SUITE.$FSVA_SUITE_BACKEND.txt")
    fi
    local list
    for list in "${lists[@]}"; do
        [ -f "$list" ] || continue
        while IFS= read -r line || [ -n "$line" ]; do
            line="${line%%#*}"
            line="$(echo "$line" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')"
            [ -n "$line" ] && exp["$line"]=1
        done < "$list"
    done
    if [ -s "$ids" ]; then
        while IFS= read -r id; do
            [ -n "$id" ] || continue
            if [ -n "${exp[$id]:-}" ]; then
                echo "  expected failure: $id"
                expected_hit=$((expected_hit + 1))
            else
                echo "  UNEXPECTED FAILURE: $id"
                unexpected=$((unexpected + 1))
            fi
        done < <(sort -u "$ids")
    fi
    if [ "$failed" -gt 0 ] && [ ! -s "$ids" ]; then
        echo "  failures without case ids (counted as unexpected)"
        unexpected=$failed
    fi
    echo "[$SUITE] expected-failure list: $EXPECTED ($expected_hit hit, $unexpected unexpected)"
    local s="$SUITE: $passed passed, $failed failed"
    [ "$skipped" -gt 0 ] && s="$s, $skipped skipped"
    echo "$s"
    if [ "$unexpected" -gt 0 ]; then exit 1; fi
    exit 0
}

#!/usr/bin/env bash
# Makes sure Debian's fuse3 source package is unpacked under the suites cache and
# prints its directory. Shared by scripts/suites/test_syscalls.sh and
# bench/fuse3-peers.sh.
#
#   scripts/fuse3-source.sh        # prints e.g. /var/cache/fsva-suites/fuse3-src/fuse3-3.14.0
#
# When apt has no source entries, they are derived from the machine's own binary
# entries (same mirrors, Types: deb-src), so no repository address is assumed here.
set -euo pipefail
SRC_ROOT="${FSVA_SUITES_CACHE:-/var/cache/fsva-suites}/fuse3-src"
log() { echo "[fuse3-source] $*" >&2; }
find_src() { ls -d "$SRC_ROOT"/fuse3-*/ 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(find_src)" ]; then
    command -v dpkg-source >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q dpkg-dev >&2
    if ! apt-get source --print-uris fuse3 >/dev/null 2>&1; then
        src=/etc/apt/sources.list.d/fsva-deb-src.sources
        log "adding deb-src entries next to the machine's deb entries ($src)"
        : > "$src"
        for f in /etc/apt/sources.list.d/*.sources; do
            [ "$f" = "$src" ] && continue
            sed -n 's/^Types: deb$/Types: deb-src/; /^Types: deb-src$/,/^$/p' "$f" >> "$src" || true
            echo >> "$src"
        done
        if [ -f /etc/apt/sources.list ]; then
            grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
                > /etc/apt/sources.list.d/fsva-deb-src.list || true
        fi
        apt-get update -q >&2
    fi
    mkdir -p "$SRC_ROOT"
    log "apt-get source fuse3 into $SRC_ROOT"
    (cd "$SRC_ROOT" && apt-get source -q fuse3 >&2)
fi
dir=$(find_src)
[ -n "$dir" ] || { log "fuse3 source not found under $SRC_ROOT"; exit 1; }
echo "${dir%/}"

#!/usr/bin/env bash
# Build libfuse's example pass-through file systems passthrough_ll (C) and
# passthrough_hp (C++) from Debian's fuse3 source package, for bench/run.sh.
#
#   bench/fuse3-peers.sh OUTDIR     # prints nothing; leaves OUTDIR/passthrough_{ll,hp}
#
# The source is shared with scripts/suites/test_syscalls.sh: same cache
# ($FSVA_SUITES_CACHE or /var/cache/fsva-suites, subdirectory fuse3-src) and
# same deb-src entry, so whichever runs first fetches it for both. Binaries are
# rebuilt only when missing or older than the source. A binary that does not
# build is simply not left in OUTDIR (run.sh then skips that target).
set -euo pipefail
OUT=$1
SRC_ROOT="${FSVA_SUITES_CACHE:-/var/cache/fsva-suites}/fuse3-src"
log() { echo "[fuse3-peers] $*" >&2; }

find_ex() { ls -d "$SRC_ROOT"/fuse3-*/example 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(find_ex)" ]; then
  command -v dpkg-source >/dev/null || apt-get install -y -q dpkg-dev >&2
  if ! apt-get source --print-uris fuse3 >/dev/null 2>&1; then
    log "adding a deb-src entry for Debian bookworm"
    cat > /etc/apt/sources.list.d/fsva-deb-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -q >&2
  fi
  mkdir -p "$SRC_ROOT"
  log "apt-get source fuse3 into $SRC_ROOT"
  (cd "$SRC_ROOT" && apt-get source -q fuse3 >&2)
fi
EX=$(find_ex)
[ -n "$EX" ] || { log "fuse3 source not found under $SRC_ROOT"; exit 1; }

need=()
pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev pkg-config)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v g++ >/dev/null || need+=(g++)
[ ${#need[@]} = 0 ] || apt-get install -y -q "${need[@]}" >&2

mkdir -p "$OUT"
# The HAVE_* macros stand in for the fuse_config.h that meson would generate
# (glibc on Debian 12 has all of these).
if [ ! -x "$OUT/passthrough_ll" ] || [ "$EX/passthrough_ll.c" -nt "$OUT/passthrough_ll" ]; then
  log "building passthrough_ll from $EX"
  gcc -O2 -Wall -DHAVE_COPY_FILE_RANGE -DHAVE_POSIX_FALLOCATE \
    -o "$OUT/passthrough_ll" "$EX/passthrough_ll.c" $(pkg-config --cflags --libs fuse3) >&2 \
    || { log "passthrough_ll did not build"; rm -f "$OUT/passthrough_ll"; }
fi
if [ ! -x "$OUT/passthrough_hp" ] || [ "$EX/passthrough_hp.cc" -nt "$OUT/passthrough_hp" ]; then
  log "building passthrough_hp from $EX (C++, ~10 s)"
  g++ -O2 -std=c++17 -DHAVE_POSIX_FALLOCATE -DHAVE_SETXATTR -DHAVE_UTIMENSAT -I"$EX" \
    -o "$OUT/passthrough_hp" "$EX/passthrough_hp.cc" $(pkg-config --cflags --libs fuse3) -lpthread >&2 \
    || { log "passthrough_hp did not build"; rm -f "$OUT/passthrough_hp"; }
fi

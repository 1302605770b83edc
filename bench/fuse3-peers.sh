#!/usr/bin/env bash
# Build libfuse's example pass-through file systems passthrough_ll (C) and
# passthrough_hp (C++) from Debian's fuse3 source package, for bench/run.sh.
#
#   bench/fuse3-peers.sh OUTDIR     # prints nothing; leaves OUTDIR/passthrough_{ll,hp}
#
# The source comes from scripts/fuse3-source.sh, shared with the test_syscalls
# suite, so whichever runs first fetches it for both. Binaries are
# rebuilt only when missing or older than the source. A binary that does not
# build is simply not left in OUTDIR (run.sh then skips that target).
set -euo pipefail
OUT=$1
log() { echo "[fuse3-peers] $*" >&2; }

EX="$("$(dirname "$0")/../scripts/fuse3-source.sh")/example" || { log "could not get Debian's fuse3 source"; exit 1; }
[ -d "$EX" ] || { log "$EX is missing from the fuse3 source"; exit 1; }

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

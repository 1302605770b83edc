#!/usr/bin/env bash
# fsx (crates.io `fsx`, Alan Somers' Rust rewrite of the File System
# eXerciser): 100,000 operations per seed over 3 seeds (run in parallel),
# with mmap reads/writes, close/reopen, msync(MS_INVALIDATE), truncate,
# fsync/fdatasync, sendfile and posix_fadvise enabled. Any data or size
# mismatch fails the seed.
# --quick: 10,000 operations, 1 seed.
# Env: FSVA_FSX_OPS, FSVA_FSX_SEEDS ("1 2 3") override the defaults.
#
# Note: fsx 0.3.2 never munmap()s the mappings made by its mapread operation,
# so its system time grows quadratically with the number of operations. The
# mapread weight is therefore 3 (not the default 10) to keep 100k ops at
# ~30 s per seed on ext4.
SUITE=fsx
source "$(dirname "$0")/lib.sh"
parse_args "$@"
trap cleanup_work EXIT

FSX_VERSION="${FSVA_FSX_VERSION:-0.3.2}"
if [ "$QUICK" = 1 ]; then OPS=10000; SEEDS="1"; else OPS=100000; SEEDS="1 2 3"; fi
OPS="${FSVA_FSX_OPS:-$OPS}"
SEEDS="${FSVA_FSX_SEEDS:-$SEEDS}"

# ---- install (idempotent) ----
if ! fsx --version 2>/dev/null | grep -qx "fsx $FSX_VERSION"; then
    log "installing fsx $FSX_VERSION with cargo"
    command -v cargo >/dev/null || die "cargo not found (need a Rust toolchain)"
    cargo install --locked --version "$FSX_VERSION" fsx >&2
fi

# ---- run ----
CONF="$LOGDIR/fsx.toml"
cp "$(dirname "$0")/fsx.toml" "$CONF"
log "running $OPS ops for seeds: $SEEDS"
pids=()
for s in $SEEDS; do
    mkdir -p "$WORK/seed$s" "$LOGDIR/seed$s"
    ( cd "$LOGDIR/seed$s" && NO_COLOR=1 timeout 900 fsx -f "$CONF" -N "$OPS" -S "$s" \
        -P "$LOGDIR/seed$s" "$WORK/seed$s/testfile" > "$LOGDIR/seed$s.out" 2>&1
      echo $? > "$LOGDIR/seed$s.rc" ) &
    pids+=($!)
done
wait "${pids[@]}" || true
P=0; F=0
IDS="$LOGDIR/failed"; : > "$IDS"
for s in $SEEDS; do
    rc=$(cat "$LOGDIR/seed$s.rc" 2>/dev/null || echo 99)
    if [ "$rc" = 0 ] && grep -q 'All operations completed A-OK' "$LOGDIR/seed$s.out"; then
        P=$((P + 1))
    else
        F=$((F + 1)); echo "seed-$s" >> "$IDS"
        log "seed $s FAILED (rc=$rc); last output:"
        tail -n 40 "$LOGDIR/seed$s.out" >&2
        keep="$CACHE/fsx-failures/$(date +%Y%m%d-%H%M%S)-seed$s"
        mkdir -p "$keep" && cp -r "$LOGDIR/seed$s" "$LOGDIR/seed$s.out" "$CONF" "$keep/" 2>/dev/null || true
        log "artifacts kept in $keep"
    fi
done
finish "$P" "$F" 0 "$IDS"

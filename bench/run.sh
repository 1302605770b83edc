#!/usr/bin/env bash
# Benchmark fsva against native ext4 and FUSE peers: bindfs and libfuse's
# passthrough_ll / passthrough_hp (built by bench/fuse3-peers.sh).
#
#   bench/run.sh [--quick]
#
# Builds fsva (release), then for each target mounts it, runs the fio
# workloads (1 MiB sequential and 4 KiB random, buffered and O_DIRECT, queue
# depth 1 and 16), fsva-meta (the metadata workload), a page-cache footprint check and a macro workload
# (extract a real source tree -- Debian's golang-1.19-src, ~11.7k files,
# 108 MiB -- then time `find | wc -l`, `du -s` and `cat` of every file, each
# after dropping caches), unmounts, and prints/writes the tables to
# bench/out/results-<date>.md. Needs root (drop_caches, FUSE mounts), fio,
# bindfs, python3; gcc/g++/libfuse3-dev for the libfuse peers (installed with
# apt-get if missing). Full run: 256 MiB files, 1 s per timed job, three
# repetitions, whole Go tree; --quick (a smoke run, ~60 s, figures indicative
# only): 32 MiB, 0.5 s per timed job, 200 files, one repetition, only the tree's
# src/net directory (358 files).
set -euo pipefail

QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$REPO/bench
FSVA=$REPO/target/release/fsva
WORK=/var/tmp/fsva-bench
STAMP=$(date -u +%Y%m%d-%H%M%S)
RAW=$BENCH/out/raw-$STAMP
OUT=$BENCH/out/results-$STAMP.md

if [ $QUICK = 1 ]; then
  SIZE=32M; RUNTIME=500ms; RANDWRITE_RUNTIME=500ms; META_N=200; META_M=50; REPS=1; SETTLE=0; FOOT_MIB=64
  MACRO_REPS=1; MACRO_PART=src/net
else
  # 1 s time-based jobs and 1 s settles keep the full run within the issue's 5 minutes
  # (5 s jobs and 2 s settles took 429-499 s, 2 s jobs 319 s); every random workload
  # but the buffered random write (below) reaches its steady rate well within 1 s, and
  # the cold reads keep three repetitions.
  SIZE=256M; RUNTIME=1s; RANDWRITE_RUNTIME=2s; META_N=2000; META_M=500; REPS=3; SETTLE=1; FOOT_MIB=1024
  MACRO_REPS=1; MACRO_PART=
fi

CACHE=/var/cache/fsva-bench
PEERS=$CACHE/fuse3-peers
MACRO_PKG=golang-1.19-src
MACRO_ROOT=./usr/share/go-1.19
MACRO_TAR=$CACHE/$MACRO_PKG.tar

TARGETS=(native fsva-passthrough fsva-no-passthrough fsva-mem bindfs passthrough_ll passthrough_hp)

log() { echo "[bench $(date +%T)] $*" >&2; }

unmount() {  # unmount MNT, whatever is mounted there
  local mnt=$1
  mountpoint -q "$mnt" || return 0
  case "$(findmnt -n -o FSTYPE "$mnt")" in
    fuse.fsva) timeout 30 "$FSVA" umount "$mnt" >/dev/null 2>&1 || timeout 30 "$FSVA" umount --lazy "$mnt" >/dev/null 2>&1 || true ;;
    *) # right after heavy use the kernel may still report EBUSY for a moment
       local i
       for i in 1 2 3 4 5; do
         fusermount3 -u "$mnt" 2>/dev/null && break
         sleep 1
       done ;;
  esac
  mountpoint -q "$mnt" && umount -l "$mnt" 2>/dev/null || true
}

cleanup() {
  local t
  for t in "${TARGETS[@]}"; do unmount "$WORK/mnt-$t"; done
  rm -rf "$WORK"/native "$WORK"/backing-* 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in fio bindfs python3; do
  command -v $tool >/dev/null || { echo "missing $tool (apt-get install -y fio bindfs)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (drop_caches, mounts)" >&2; exit 1; }

T0=$(date +%s)
log "building fsva (release)"
(cd "$REPO" && cargo build --release -p fsva && cargo build --release -p fsva-tests --bin fsva-meta)
bash "$BENCH/fuse3-peers.sh" "$PEERS"
for p in passthrough_ll passthrough_hp; do
  if [ ! -x "$PEERS/$p" ]; then
    log "$p did not build: leaving it out"
    TARGETS=($(printf '%s\n' "${TARGETS[@]}" | grep -vx "$p"))
  fi
done

# Macro workload input: the .deb's data as a plain (uncompressed) tar, so that
# timing the extraction measures the file system, not xz.
if [ ! -s "$MACRO_TAR" ]; then
  log "fetching $MACRO_PKG into $CACHE"
  mkdir -p "$CACHE"
  (cd "$CACHE" && rm -f "$MACRO_PKG"_*.deb && apt-get download -q "$MACRO_PKG" >&2)
  dpkg-deb --fsys-tarfile "$CACHE/$MACRO_PKG"_*.deb > "$MACRO_TAR.tmp"
  mv "$MACRO_TAR.tmp" "$MACRO_TAR"
fi
MACRO_MEMBER=$MACRO_ROOT${MACRO_PART:+/$MACRO_PART}
MACRO_FILES=$(tar -tf "$MACRO_TAR" "$MACRO_MEMBER" | grep -vc '/$')
MACRO_MIB=$(tar -tvf "$MACRO_TAR" "$MACRO_MEMBER" | awk '{s += $3} END {printf "%.0f", s / 1048576}')

mkdir -p "$RAW"

# mount_target TARGET -> prints the directory to benchmark in
mount_target() {
  local t=$1 mnt=$WORK/mnt-$1 back=$WORK/backing-$1
  case $t in
    native) rm -rf "$WORK/native"; mkdir -p "$WORK/native"; echo "$WORK/native"; return ;;
  esac
  unmount "$mnt"
  rm -rf "$back"; mkdir -p "$mnt" "$back"
  case $t in
    fsva-passthrough)    "$FSVA" mount --backend "passthrough:$back" "$mnt" >&2 ;;
    fsva-no-passthrough) "$FSVA" mount --backend "passthrough:$back" --no-passthrough "$mnt" >&2 ;;
    fsva-mem)            "$FSVA" mount --backend mem "$mnt" >&2 ;;
    bindfs)              bindfs "$back" "$mnt" >&2 ;;
    passthrough_ll)      "$PEERS/passthrough_ll" -o source="$back" "$mnt" >&2 ;;
    passthrough_hp)      "$PEERS/passthrough_hp" "$back" "$mnt" >&2 ;;
  esac
  mountpoint -q "$mnt" || { echo "$t: not mounted at $mnt" >&2; return 1; }
  echo "$mnt"
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cached_kib() { awk '/^Cached:/ {print $2}' /proc/meminfo; }

# The host directory a target serves (empty for native and mem): files the benchmark
# only needs to exist are made and removed there, natively, which is quicker than
# through the slowest peers and measures nothing either way.
backing_of() {  # backing_of TARGET
  case $1 in native|fsva-mem) ;; *) echo "$WORK/backing-$1" ;; esac
}

# Page-cache footprint: how much the page cache grows when a FOOT_MIB file is read
# twice (native: one copy; a FUSE file system that also caches in its server: two).
# The file is written beforehand (natively where the target has a host directory) and
# the caches dropped: only the two reads through the target are measured.
footprint() {  # footprint TARGET DIR
  local t=$1 dir=$2 before after
  local src
  src=$(backing_of "$t"); src=${src:-$dir}
  # zeros, not /dev/urandom: the content does not matter to the page cache, and
  # generating 1 GiB of random bytes cost seconds per target
  dd if=/dev/zero of="$src/foot.dat" bs=1M count="$FOOT_MIB" conv=fsync status=none
  drop_caches
  before=$(cached_kib)
  cat "$dir/foot.dat" > /dev/null
  cat "$dir/foot.dat" > /dev/null
  after=$(cached_kib)
  echo $(( (after - before) / 1024 )) > "$RAW/$t-footprint.txt"
  rm -f "$src/foot.dat"
  sync
}
# The virtual disk of this VM is cached and written back by the host; let that
# writeback settle so one job's (or target's) flush does not slow the next.
settle() { sync; sleep "$SETTLE"; }

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# Macro workload: extract the source tree (timed: tar -x, page cache as it is,
# no sync), then MACRO_REPS times: `find | wc -l`, `du -s`, and `cat` of every
# file, each after dropping caches. Writes <target>-macro-<i>.json (seconds);
# a failed extraction (e.g. ENOSPC) is recorded as an error, not a number.
macro() {  # macro TARGET DIR
  local t=$1 dir=$2/tree i t0 n err=""
  mkdir -p "$dir"
  sync; cat "$MACRO_TAR" > /dev/null   # the tarball is read from the cache by every target
  t0=$(now_ms)
  if ! tar -xf "$MACRO_TAR" -C "$dir" "$MACRO_MEMBER" 2> "$RAW/$t-macro-tar.err"; then
    err=$(grep -m1 -o 'No space left on device\|[^:]*$' "$RAW/$t-macro-tar.err" | head -n1)
    err=${err//\"/}
    log "$t: extraction failed: $err"
  fi
  local ext=$(( $(now_ms) - t0 ))
  settle
  for i in $(seq "$MACRO_REPS"); do
    local f d c
    drop_caches; t0=$(now_ms); n=$(find "$dir" | wc -l); f=$(( $(now_ms) - t0 ))
    drop_caches; t0=$(now_ms); du -s "$dir" > /dev/null; d=$(( $(now_ms) - t0 ))
    drop_caches; t0=$(now_ms); find "$dir" -type f -exec cat {} + > /dev/null; c=$(( $(now_ms) - t0 ))
    local files; files=$(find "$dir" -type f | wc -l)
    printf '{"extract": %s, "find": %s, "du": %s, "cat": %s, "entries": %s, "files": %s, "error": "%s"}\n' \
      "$(awk -v x=$ext 'BEGIN{print x/1000}')" "$(awk -v x=$f 'BEGIN{print x/1000}')" \
      "$(awk -v x=$d 'BEGIN{print x/1000}')" "$(awk -v x=$c 'BEGIN{print x/1000}')" \
      "$n" "$files" "$err" > "$RAW/$t-macro-$i.json"
  done
  # Removing 11,748 files through the slower peers took longer than extracting them;
  # targets with a host directory lose the tree with it, after the unmount.
  [ -n "$(backing_of "$t")" ] || rm -rf "$dir"
  sync
}

run_fio() {  # run_fio TARGET WORKLOAD DIR extra-args...
  local t=$1 wl=$2 dir=$3; shift 3
  # A target that cannot do a job (passthrough_ll refuses O_DIRECT) gets no figure for
  # it ("–" in the report), not a zero and not an aborted run.
  if ! timeout 120 fio --name="$wl" --directory="$dir" --filename=bench.dat --size="$SIZE" \
    --ioengine=psync --output-format=json "$@" > "$RAW/$t-$wl.json" 2> "$RAW/$t-$wl.err"; then
    log "$t: $wl failed: $(grep -m1 -o 'error.*' "$RAW/$t-$wl.err" || tail -n1 "$RAW/$t-$wl.err")"
    rm -f "$RAW/$t-$wl.json"
  fi
}

for t in "${TARGETS[@]}"; do
  dir=$(mount_target "$t")
  log "$t: $dir"
  settle
  # 1. sequential write (creates the file used by the read jobs)
  run_fio "$t" seqwrite "$dir" --rw=write --bs=1M --end_fsync=1
  settle
  # 2. sequential read, cold page cache: one untimed pass first so that every
  #    target reads from the same place (this VM's virtual disk is cached by
  #    the host; its first read after a write is much slower and erratic), then
  #    REPS timed passes, each after dropping caches; the report takes the median
  drop_caches
  run_fio "$t" seqread-warmup "$dir" --rw=read --bs=1M
  for i in $(seq "$REPS"); do
    drop_caches
    run_fio "$t" seqread-$i "$dir" --rw=read --bs=1M
  done
  # 3. random 4 KiB reads, time-based, cache as left by the sequential read (warm);
  #    random 4 KiB buffered writes
  run_fio "$t" randread "$dir" --rw=randread --bs=4k --time_based --runtime="$RUNTIME" --invalidate=0
  # (twice as long: its closing fsync of what the job dirtied is part of the figure,
  # and at 1 s it weighs more than the writes). Warm, as the read before left the file,
  # for every target: fio's default invalidate (fadvise DONTNEED at the job's start)
  # empties the native file's cache but not, under FUSE passthrough, the backing
  # file's, so natively every write would land on an uncached page and through
  # passthrough on a cached one (2.7x native, measured: not a like-for-like figure).
  run_fio "$t" randwrite "$dir" --rw=randwrite --bs=4k --time_based --runtime="$RANDWRITE_RUNTIME" --end_fsync=1 --invalidate=0
  # 4. O_DIRECT (no page cache anywhere on the user side): 1 MiB sequential, then
  #    4 KiB random at queue depth 1 (psync) and 16 (libaio)
  run_fio "$t" dseqwrite "$dir" --rw=write --bs=1M --direct=1
  run_fio "$t" dseqread "$dir" --rw=read --bs=1M --direct=1
  run_fio "$t" drandread-qd1 "$dir" --rw=randread --bs=4k --direct=1 --time_based --runtime="$RUNTIME"
  run_fio "$t" drandread-qd16 "$dir" --rw=randread --bs=4k --direct=1 --time_based --runtime="$RUNTIME" \
    --ioengine=libaio --iodepth=16
  run_fio "$t" drandwrite-qd1 "$dir" --rw=randwrite --bs=4k --direct=1 --time_based --runtime="$RUNTIME"
  run_fio "$t" drandwrite-qd16 "$dir" --rw=randwrite --bs=4k --direct=1 --time_based --runtime="$RUNTIME" \
    --ioengine=libaio --iodepth=16
  rm -f "$dir/bench.dat"
  sync
  # 5. metadata micro-workload, REPS runs (median per op in the report)
  log "$t: metadata"
  for i in $(seq "$REPS"); do
    timeout 300 "$REPO/target/release/fsva-meta" "$dir" "$META_N" "$META_M" > "$RAW/$t-meta-$i.json"
  done
  # 6. page-cache footprint of reading a large file twice
  log "$t: page-cache footprint"
  footprint "$t" "$dir"
  # 7. macro workload: a real source tree
  log "$t: source tree"
  macro "$t" "$dir"
  [ "$t" = native ] || unmount "$WORK/mnt-$t"
  back=$(backing_of "$t")
  [ -z "$back" ] || rm -rf "$back"
done

ELAPSED=$(( $(date +%s) - T0 ))
MODE=$([ $QUICK = 1 ] && echo "--quick" || echo "full")
HEADER="## fsva benchmark — $(date -u '+%Y-%m-%d %H:%M UTC') ($MODE)

$(nproc) CPUs, Linux $(uname -r), $(findmnt -n -o FSTYPE --target "$WORK") under $WORK.
fio: ${SIZE}iB file, psync (libaio for queue depth 16), one job; cold sequential read = median of $REPS passes; random jobs time-based ${RUNTIME} (buffered random write ${RANDWRITE_RUNTIME}).
Metadata: $META_N files, $META_M mkdir/rmdir pairs (fsva-meta, tests/src/bin/fsva-meta.rs), median of $REPS runs.
Macro: $MACRO_PKG ($MACRO_MEMBER: $MACRO_FILES files, $MACRO_MIB MiB), extraction once, find/du/cat median of $MACRO_REPS cold runs.
Build + run took ${ELAPSED} s.
Raw results: bench/out/raw-$STAMP/."
python3 "$BENCH/report.py" "$RAW" "$OUT" "$HEADER" "$FOOT_MIB" "$MACRO_FILES" "${TARGETS[@]}"
log "written $OUT (${ELAPSED} s)"

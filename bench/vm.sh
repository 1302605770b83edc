#!/usr/bin/env bash
# Benchmark fsva's VM appliance against libguestfs's guestmount (the established VM
# appliance behind FUSE) on the same kind of ext4 image, under the same emulation.
#
#   bench/vm.sh [--quick] [--accel tcg|kvm] [--fsva-only] [--fsva-flags "FLAGS"]
#
# --fsva-only runs fsva at its default memory alone (no ratios); --fsva-flags passes
# FLAGS to every `fsva mount` (e.g. "--workers 2"), to compare settings by hand.
#
# For each tool: a fresh ext4 image (1 GiB, 4 KiB blocks), then
#   boot      time from the mount command to a mount that answers
#   seq_write fio 1 MiB sequential write of $SIZE with a final fsync (MB/s)
#   seq_read  fio 1 MiB sequential read of that file after dropping the host's page
#             cache (the appliance's own cache is warm for both tools) (MB/s)
#   meta      fsva-meta (tests/src/bin/fsva-meta.rs): create+write 4 KiB, warm stat, readdir, rename, unlink,
#             mkdir+rmdir (µs per op)
#   extract   tar -x of /usr/include (~8k files), then find, du and a cat of every
#             file (s)
#   umount    time to unmount (and, for fsva, the VM powered off)
# and prints each figure with the ratio fsva/guestmount (>1 = fsva better). fsva runs
# twice: with its default guest memory (256 MiB: the user side caches, the appliance
# keeps little) and with guestmount's own (libguestfs's memsize, 1280 MiB on Debian
# 12), so that the two appliances' page caches can be compared like for like.
# Default accelerator: tcg for both (KVM cannot boot guests on the machines this was
# written on; pass --accel kvm where it can). Needs root; installs fio and
# libguestfs-tools with apt-get if missing.
set -euo pipefail

QUICK=0
ACCEL=tcg
FSVA_ONLY=0
FSVA_FLAGS=""
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --accel) ACCEL=${2:?--accel needs tcg or kvm}; shift ;;
    --fsva-only) FSVA_ONLY=1 ;;
    --fsva-flags) FSVA_FLAGS=${2?--fsva-flags needs a quoted list of flags}; shift ;;
    *) echo "usage: $0 [--quick] [--accel tcg|kvm] [--fsva-only] [--fsva-flags \"FLAGS\"]" >&2; exit 2 ;;
  esac
  shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
FSVA=$REPO/target/release/fsva
WORK=/var/tmp/fsva-vm-bench
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$REPO/bench/out/vm-results-$STAMP.md
if [ $QUICK = 1 ]; then SIZE=64M; META_N=200; META_M=50; else SIZE=256M; META_N=1000; META_M=200; fi

need=()
for p in fio libguestfs-tools e2fsprogs bc; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  echo "bench/vm.sh: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$REPO/scripts/setup.sh" --release >/dev/null

rm -rf "$WORK"; mkdir -p "$WORK" "$REPO/bench/out"
tar -C /usr -cf "$WORK/tree.tar" include
TREE_FILES=$(tar -tf "$WORK/tree.tar" | grep -vc '/$')

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }

# guestmount under TCG needs libguestfs told so (it asks KVM for -cpu host otherwise).
export LIBGUESTFS_BACKEND=direct
[ "$ACCEL" = tcg ] && export LIBGUESTFS_BACKEND_SETTINGS=force_tcg

mount_tool() { # tool image mnt
  case $1 in
    # shellcheck disable=SC2086 # FSVA_FLAGS is a list of flags
    fsva) "$FSVA" mount --vm --accel "$ACCEL" $FSVA_FLAGS --image "$2" "$3" >/dev/null ;;
    # shellcheck disable=SC2086
    fsva_eq) "$FSVA" mount --vm --accel "$ACCEL" $FSVA_FLAGS --vm-memory "$GM_MEMORY" --image "$2" "$3" >/dev/null ;;
    guestmount) guestmount -a "$2" -m /dev/sda --rw "$3" ;;
  esac
  stat "$3/." >/dev/null
}
umount_tool() { # tool mnt
  case $1 in
    fsva|fsva_eq) "$FSVA" umount "$2" ;;
    guestmount)
      guestunmount "$2"
      # guestunmount returns before its QEMU exits: wait for it, as fsva umount does.
      while pgrep -f "qemu.*guestfs" >/dev/null; do sleep 0.05; done ;;
  esac
}

declare -A R
run_tool() {
  local t=$1 img=$WORK/$1.img mnt=$WORK/mnt-$1
  echo "bench/vm.sh: $t" >&2
  rm -f "$img"; truncate -s 1G "$img"; mkfs.ext4 -q -F -b 4096 "$img"
  mkdir -p "$mnt"
  # A first boot builds caches (fsva's appliance, libguestfs's supermin appliance):
  # time the second.
  mount_tool "$t" "$img" "$mnt"; umount_tool "$t" "$mnt"
  local t0; t0=$(now); mount_tool "$t" "$img" "$mnt"; R[$t.boot]=$(since "$t0")
  mkdir "$mnt/fio"
  R[$t.seq_write]=$(fio --name=w --directory="$mnt/fio" --rw=write --bs=1M --size=$SIZE \
      --end_fsync=1 --output-format=json | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6)')
  sync; echo 3 > /proc/sys/vm/drop_caches
  R[$t.seq_read]=$(fio --name=w --directory="$mnt/fio" --rw=read --bs=1M --size=$SIZE \
      --invalidate=1 --output-format=json | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"]/1e6)')
  rm -rf "$mnt/fio"
  local meta; meta=$("$REPO/target/release/fsva-meta" "$mnt" "$META_N" "$META_M")
  for op in create_write stat_warm readdir rename unlink mkdir_rmdir; do
    R[$t.$op]=$(echo "$meta" | python3 -c "import json,sys; print(json.load(sys.stdin)['$op'])")
  done
  rm -rf "$mnt/meta"
  t0=$(now); tar -C "$mnt" -xf "$WORK/tree.tar"; sync -f "$mnt/include"; R[$t.extract]=$(since "$t0")
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); find "$mnt/include" | wc -l >/dev/null; R[$t.find]=$(since "$t0")
  t0=$(now); du -s "$mnt/include" >/dev/null; R[$t.du]=$(since "$t0")
  t0=$(now); find "$mnt/include" -type f -exec cat {} + >/dev/null; R[$t.cat]=$(since "$t0")
  t0=$(now); umount_tool "$t" "$mnt"; R[$t.umount]=$(since "$t0")
  if ! e2fsck -fn "$img" >/dev/null 2>&1; then echo "bench/vm.sh: $t left $img unclean" >&2; R[$t.clean]=no; else R[$t.clean]=yes; fi
}

run_tool fsva
if [ $FSVA_ONLY = 1 ]; then
  OUT=$REPO/bench/out/vm-fsva-$STAMP.md
  {
    echo "# VM appliance: fsva alone ($(date -u +%F), accel $ACCEL, $(nproc) CPUs, quick=$QUICK, flags: ${FSVA_FLAGS:-none})"
    echo
    echo "ext4 image 1 GiB; fio size $SIZE; metadata N=$META_N M=$META_M; tree: /usr/include ($TREE_FILES files)."
    echo
    echo "| workload | unit | fsva |"
    echo "|---|---|---|"
    for k in boot:s seq_write:MB/s seq_read:MB/s create_write:µs/op stat_warm:µs/op readdir:µs/op \
             rename:µs/op unlink:µs/op mkdir_rmdir:µs/op extract:s find:s du:s cat:s umount:s; do
      printf '| %s | %s | %.3g |\n' "${k%%:*}" "${k#*:}" "${R[fsva.${k%%:*}]}"
    done
    echo
    echo "fsck clean after unmount: ${R[fsva.clean]}"
  } | tee "$OUT"
  echo "bench/vm.sh: written to $OUT" >&2
  exit 0
fi
# The memory libguestfs gives its appliance (MiB), asked of libguestfs itself.
GM_MEMORY=$(guestfish get-memsize)
run_tool fsva_eq
run_tool guestmount

{
  echo "# VM appliance: fsva vs guestmount ($(date -u +%F), accel $ACCEL, $(nproc) CPUs, quick=$QUICK, fsva flags: ${FSVA_FLAGS:-none})"
  echo
  echo "ext4 image 1 GiB; fio size $SIZE; metadata N=$META_N M=$META_M; tree: /usr/include ($TREE_FILES files)."
  echo
  echo "guest memory: fsva its default (256 MiB unless the flags say otherwise), fsva_eq and guestmount $GM_MEMORY MiB (libguestfs's memsize)."
  echo
  echo "| workload | unit | fsva | fsva_eq | guestmount | fsva advantage | fsva_eq advantage |"
  echo "|---|---|---|---|---|---|---|"
  row() { # key unit higher-is-better
    local f=${R[fsva.$1]} e=${R[fsva_eq.$1]} g=${R[guestmount.$1]} ratio ratio_eq
    if [ "$3" = 1 ]; then
      ratio=$(echo "$f / $g" | bc -l); ratio_eq=$(echo "$e / $g" | bc -l)
    else
      ratio=$(echo "$g / $f" | bc -l); ratio_eq=$(echo "$g / $e" | bc -l)
    fi
    printf '| %s | %s | %.3g | %.3g | %.3g | %.2fx | %.2fx |\n' "$1" "$2" "$f" "$e" "$g" "$ratio" "$ratio_eq"
  }
  row boot s 0; row seq_write MB/s 1; row seq_read MB/s 1
  for op in create_write stat_warm readdir rename unlink mkdir_rmdir; do row $op "µs/op" 0; done
  row extract s 0; row find s 0; row du s 0; row cat s 0; row umount s 0
  echo
  echo "fsck clean after unmount: fsva ${R[fsva.clean]}, fsva_eq ${R[fsva_eq.clean]}, guestmount ${R[guestmount.clean]}"
} | tee "$OUT"
echo "bench/vm.sh: written to $OUT" >&2

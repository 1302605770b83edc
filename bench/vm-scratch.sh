# Sourced by the by-hand VM scripts (vm-seq.sh, vm-parallel.sh): a fresh ext4 image,
# mounted through a VM appliance, removed with its mount point on exit.
#
#   vm_scratch_mount NAME SIZE [fsva mount options...]   sets FSVA, IMG and MNT
vm_scratch_mount() {
  local name=$1 size=$2; shift 2
  FSVA=$(dirname "${BASH_SOURCE[0]}")/../target/release/fsva
  IMG=$(mktemp "/var/tmp/fsva-$name.XXXXXX.img")
  MNT=$(mktemp -d "/tmp/fsva-$name.XXXXXX")
  truncate -s "$size" "$IMG"; mkfs.ext4 -q -F -b 4096 "$IMG"
  "$FSVA" mount --vm "$@" --image "$IMG" "$MNT" >/dev/null
  trap '"$FSVA" umount "$MNT"; rmdir "$MNT"; rm -f "$IMG"' EXIT
}

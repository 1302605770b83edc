#!/bin/bash
# The per-file cost of reading a small tree through a VM appliance, by hand:
# mounts IMAGE (an ext4 image with room for /usr/include/linux), copies
# /usr/include/linux in, and times three `cat` passes of every file, each after the
# host dropped its caches (so every file costs a READ to the VM).
#
#   bench/vm-cat.sh IMAGE [LABEL]
set -euo pipefail
IMAGE=$1; LABEL=${2:-cat}
FSVA=$(dirname "$0")/../target/release/fsva
MNT=$(mktemp -d /tmp/fsva-vm-cat.XXXXXX)
"$FSVA" mount --vm --image "$IMAGE" "$MNT" >/dev/null
trap '"$FSVA" umount "$MNT"; rmdir "$MNT"' EXIT
rm -rf "$MNT/inc"; mkdir "$MNT/inc"
(cd /usr/include && tar cf - linux) | tar -C "$MNT/inc" -xf -
sync -f "$MNT/inc"
n=$(find "$MNT/inc" -type f | wc -l)
for pass in 1 2 3; do
  echo 3 > /proc/sys/vm/drop_caches
  find "$MNT/inc" >/dev/null
  s=$(date +%s%N)
  find "$MNT/inc" -type f -exec cat {} + >/dev/null
  e=$(date +%s%N)
  echo "$LABEL pass $pass: $n files, $(( (e - s) / 1000 / n )) us a file"
done
rm -rf "$MNT/inc"

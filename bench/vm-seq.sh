#!/bin/bash
# Sequential write and read of 256 MiB through a VM appliance, by hand: the fio jobs of
# bench/vm.sh (1 MiB blocks; the write ends with fsync; each read follows a drop of the
# host's caches), on a fresh 1 GiB ext4 image, one mount. Prints MB/s.
#
#   bench/vm-seq.sh [LABEL] [fsva mount options...]
set -euo pipefail
LABEL=${1:-seq}; shift || true
# shellcheck source=bench/vm-scratch.sh
. "$(dirname "$0")/vm-scratch.sh"
vm_scratch_mount vm-seq 1G "$@"
mkdir "$MNT/fio"
mbs() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['$1']['bw_bytes']/1e6))"; }
w=$(fio --name=w --directory="$MNT/fio" --rw=write --bs=1M --size=256M --end_fsync=1 --output-format=json | mbs write)
r=()
for _ in 1 2; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  r+=("$(fio --name=w --directory="$MNT/fio" --rw=read --bs=1M --size=256M --invalidate=1 --output-format=json | mbs read)")
done
echo "$LABEL: write $w MB/s, read ${r[0]} MB/s, read again ${r[1]} MB/s"

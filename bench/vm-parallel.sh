#!/bin/bash
# Cold 4 KiB random reads through a VM appliance from 1, 2 and 4 processes at once (fio
# numjobs, 8 s each, the host's caches dropped before each), on a fresh 2 GiB ext4
# image holding a 768 MiB file (more than the guest's default memory). Shows what the
# guest's worker count does to parallel, disk-bound work. Prints IOPS and mean latency.
#
#   bench/vm-parallel.sh [LABEL] [fsva mount options...]     e.g. vm-parallel.sh w2 --workers 2
set -euo pipefail
LABEL=${1:-parallel}; shift || true
# shellcheck source=bench/vm-scratch.sh
. "$(dirname "$0")/vm-scratch.sh"
vm_scratch_mount vm-parallel 2G "$@"
fio --name=w --filename="$MNT/f" --rw=write --bs=1M --size=768M --end_fsync=1 --output-format=terse >/dev/null
out=$LABEL
for jobs in 1 2 4; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  r=$(fio --name=r --filename="$MNT/f" --rw=randread --bs=4k --size=768M --numjobs=$jobs \
        --group_reporting --time_based --runtime=8 --output-format=json |
      python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["read"]; print("%.0f IOPS, %.0f us" % (j["iops"], j["clat_ns"]["mean"] / 1000))')
  out="$out | $jobs jobs: $r"
done
echo "$out"

#!/usr/bin/env bash
# Live-restart downtime of a mem appliance with many nodes and open files.
#
#   bench/restart.sh [NODES] [OPEN] [RESTARTS]     (defaults 10000 1000 5)
#
# Mounts mem, creates NODES files (each looked up by the kernel), holds OPEN of them
# open in another process, restarts the appliance RESTARTS times with `fsva restart`,
# and prints each restart's downtime (from the pause of the old appliance to the
# successor serving and the kernel resending what was held) as fsva reports it, with
# the median. Then checks that the held files still read back. Needs root.
set -euo pipefail
NODES=${1:-10000}
OPEN=${2:-1000}
RESTARTS=${3:-5}
REPO=$(cd "$(dirname "$0")/.." && pwd)
(cd "$REPO" && cargo build --release -q -p fsva)
FSVA=$REPO/target/release/fsva
MNT=$(mktemp -d /var/tmp/fsva-restart-bench.XXXXXX)
trap '"$FSVA" umount "$MNT" >/dev/null 2>&1 || true; rmdir "$MNT"' EXIT
"$FSVA" mount "$MNT" >/dev/null
python3 - "$MNT" "$NODES" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with open(os.path.join(d, f"n{i:06d}"), "w") as f:
        f.write(f"node {i}\n")
PY
# Holds OPEN files open until told to check them (a line on stdin).
coproc HOLDER { python3 -c '
import os, sys
d, k = sys.argv[1], int(sys.argv[2])
fs = [open(os.path.join(d, f"n{i:06d}")) for i in range(k)]
print("holding", flush=True)
sys.stdin.readline()
bad = sum(1 for i, f in enumerate(fs) if (f.seek(0) or f.read()) != f"node {i}\n")
print("checked", len(fs), "bad", bad, flush=True)
' "$MNT" "$OPEN"; }
read -r line <&"${HOLDER[0]}"; echo "bench/restart.sh: $NODES nodes, $line $OPEN open files"
times=()
for _ in $(seq "$RESTARTS"); do
  out=$("$FSVA" restart "$MNT")
  ms=$(echo "$out" | sed -n 's/.*waited \([0-9.]*\) ms.*/\1/p')
  times+=("$ms"); echo "  restart: $ms ms"
done
echo "check" >&"${HOLDER[1]}"
read -r line <&"${HOLDER[0]}"; echo "  held files after the restarts: $line"
wait "$HOLDER_PID" 2>/dev/null || true
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print "  median downtime: " a[int((NR+1)/2)] " ms"}'

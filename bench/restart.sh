#!/usr/bin/env bash
# Downtime of a mem (or, with `--passthrough`, a passthrough) appliance replaced under
# load: a live restart (`fsva restart`) or a crash (`kill -9` of the appliance;
# `--kill`), with many nodes and open files.
#
#   bench/restart.sh [--kill] [--passthrough] [NODES] [OPEN] [TIMES]  (defaults 10000 1000 5)
#
# Mounts mem (or a scratch directory in /var/tmp), creates NODES files (each looked up by the kernel), holds OPEN of them
# open in another process, and replaces the appliance TIMES times while a prober
# creates and removes files in a loop (every one of its requests reaches the
# appliance). For each replacement it prints the downtime fsva measured (from the
# moment the old appliance stopped serving to the successor serving, after the kernel
# resent what was in flight) and the longest the prober waited for one operation.
# Medians at the end; then the held files are read back. Needs root.
set -euo pipefail
MODE=restart
if [[ "${1:-}" == "--kill" ]]; then MODE=kill; shift; fi
BACKEND=mem
if [[ "${1:-}" == "--passthrough" ]]; then BACKEND=passthrough; shift; fi
NODES=${1:-10000}
OPEN=${2:-1000}
TIMES=${3:-5}
REPO=$(cd "$(dirname "$0")/.." && pwd)
(cd "$REPO" && cargo build --release -q -p fsva)
FSVA=$REPO/target/release/fsva
MNT=$(mktemp -d /var/tmp/fsva-restart-bench.XXXXXX)
SPEC=mem
if [[ $BACKEND == passthrough ]]; then
  EXPORT=$(mktemp -d /var/tmp/fsva-restart-export.XXXXXX)
  SPEC=passthrough:$EXPORT
fi
cleanup() {
  # (set -e is in force here: a process already gone must not end the clean-up.)
  [[ -n "${PROBER_PID:-}" ]] && kill "$PROBER_PID" 2>/dev/null || true
  [[ -n "${HOLDER_PID:-}" ]] && kill "$HOLDER_PID" 2>/dev/null || true
  sleep 0.2
  "$FSVA" umount "$MNT" >/dev/null 2>&1 || "$FSVA" umount --lazy "$MNT" >/dev/null 2>&1 || true
  rmdir "$MNT" 2>/dev/null || true
  [[ -n "${EXPORT:-}" ]] && rm -rf "$EXPORT" || true
}
trap cleanup EXIT
"$FSVA" mount --backend "$SPEC" "$MNT" >/dev/null
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
read -r line <&"${HOLDER[0]}"; echo "bench/restart.sh ($MODE, $BACKEND): $NODES nodes, $line $OPEN open files"
# The prober: creates and unlinks files in a loop; on a line on stdin, prints the
# longest single operation since the last line (ms) and starts over.
coproc PROBER { python3 -c '
import os, sys, threading, time
d = os.path.join(sys.argv[1], "probe"); os.mkdir(d)
worst = [0.0]; lock = threading.Lock(); stop = False
def loop():
    i = 0
    while not stop:
        p = os.path.join(d, f"p{i % 64}"); i += 1
        t = time.monotonic()
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)); os.unlink(p)
        dt = (time.monotonic() - t) * 1000
        with lock: worst[0] = max(worst[0], dt)
threading.Thread(target=loop, daemon=True).start()
for line in sys.stdin:
    with lock: w, worst[0] = worst[0], 0.0
    print(f"{w:.1f}", flush=True)
' "$MNT"; }
pids_of() { sed -n 's/^appliance_pid=//p' /run/fsva/*.mount 2>/dev/null | head -1; }
record=$(grep -l "mountpoint=$MNT\$" /run/fsva/*.mount)
times=(); waits=()
for _ in $(seq "$TIMES"); do
  sleep 0.3; echo >&"${PROBER[1]}"; read -r _ <&"${PROBER[0]}"
  if [[ $MODE == restart ]]; then
    out=$("$FSVA" restart "$MNT")
  else
    old=$(sed -n 's/^appliance_pid=//p' "$record")
    kill -9 "$old"
    for _ in $(seq 500); do
      now=$(sed -n 's/^appliance_pid=//p' "$record")
      [[ -n "$now" && "$now" != "$old" ]] && break; sleep 0.01
    done
    out=$("$FSVA" status | grep -A4 "^$MNT " | grep -o 'waited [0-9.]* ms the last time' | tail -1)
  fi
  ms=$(echo "$out" | sed -n 's/.*waited \([0-9.]*\) ms.*/\1/p')
  sleep 0.2; echo >&"${PROBER[1]}"; read -r w <&"${PROBER[0]}"
  times+=("$ms"); waits+=("$w"); echo "  $MODE: downtime $ms ms; longest probe operation $w ms"
done
echo "check" >&"${HOLDER[1]}"
read -r line <&"${HOLDER[0]}"; echo "  held files afterwards: $line"
wait "$HOLDER_PID" 2>/dev/null || true
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "  median downtime: $(med "${times[@]}") ms; median longest probe operation: $(med "${waits[@]}") ms"

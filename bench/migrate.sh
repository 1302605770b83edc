#!/usr/bin/env bash
# Cross-host migration downtime of a mem appliance with many nodes and open files.
#
#   bench/migrate.sh [NODES] [OPEN] [RUNS] [--writer]     (defaults 10000 1000 5)
#
# The other host is a network namespace on a veth pair made here, running `fsva host`.
# Each run mounts mem (--no-passthrough: mem migrates by content), creates NODES files
# (each looked up by the kernel), holds OPEN of them open in another process, migrates
# the appliance with `fsva migrate --to`, and prints the downtime fsva reports (from
# the stop of the local appliance to the remote one serving, after the kernel resent
# what was held: the longest any request waited because of the switch) and the whole
# migration's time, then checks that the held files still read back and unmounts.
# Before each migration the appliance is restarted live on this host (`fsva restart`):
# the same-host peer, measured under the same load. --writer: a process rewrites 10
# bytes in one file after another (and appends to a log) throughout each migration,
# so that the pre-copy has changes to chase; its writes are checked afterwards.
# Prints the median downtime. Needs root.
set -euo pipefail
NODES=${1:-10000}
OPEN=${2:-1000}
RUNS=${3:-5}
WRITER=${4:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
(cd "$REPO" && cargo build --release -q -p fsva)
FSVA=$REPO/target/release/fsva
NS=fsvabench$$
VETH=fb$$
HERE=10.98.$(($$ % 200)).1
THERE=10.98.$(($$ % 200)).2
WORK=$(mktemp -d /var/tmp/fsva-migrate-bench.XXXXXX)
MNT=$WORK/mnt
DAEMON=
cleanup() {
  "$FSVA" umount "$MNT" >/dev/null 2>&1 || true
  [[ -n $DAEMON ]] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$VETH" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip link add "$VETH" type veth peer name "${VETH}p"
ip link set "${VETH}p" netns "$NS"
ip addr add "$HERE/30" dev "$VETH"
ip link set "$VETH" up
ip netns exec "$NS" ip addr add "$THERE/30" dev "${VETH}p"
ip netns exec "$NS" ip link set "${VETH}p" up
ip netns exec "$NS" ip link set lo up
head -c 32 /dev/urandom | base64 > "$WORK/key"
chmod 600 "$WORK/key"
mkdir "$MNT"
# Only the network namespace (a mount namespace of its own would hold the mounts).
nsenter --net=/run/netns/"$NS" "$FSVA" host --listen "$THERE:7420" --key-file "$WORK/key" \
  2>"$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do grep -q "ready for migrations" "$WORK/daemon.log" && break; sleep 0.1; done
echo "bench/migrate.sh: $NODES nodes, $OPEN held open, $RUNS runs, to $THERE over a veth pair"
times=()
restarts=()
for run in $(seq "$RUNS"); do
  "$FSVA" mount --no-passthrough "$MNT" >/dev/null
  python3 - "$MNT" "$NODES" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with open(os.path.join(d, f"n{i:06d}"), "w") as f:
        f.write(f"node {i}\n")
PY
  coproc HOLDER { python3 -c '
import os, sys
d, k = sys.argv[1], int(sys.argv[2])
fs = [open(os.path.join(d, f"n{i:06d}")) for i in range(k)]
print("holding", flush=True)
sys.stdin.readline()
bad = sum(1 for i, f in enumerate(fs) if (f.seek(0) or f.read()) not in (f"node {i}\n", f"NODE {i}\n"))
print("checked", len(fs), "bad", bad, flush=True)
' "$MNT" "$OPEN"; }
  read -r line <&"${HOLDER[0]}"
  # The same-host peer, under the same load: a live restart of the same appliance.
  rs=$("$FSVA" restart "$MNT" | sed -n 's/.*waited \([0-9.]*\) ms.*/\1/p')
  restarts+=("$rs")
  WPID=
  if [[ $WRITER == --writer ]]; then
    python3 - "$MNT" "$NODES" "$WORK/writer.out" <<'PY' &
import os, sys, time
d, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open(os.path.join(d, "log"), "w")
i = 0
t0 = time.time()
while time.time() - t0 < 1.5:
    with open(os.path.join(d, f"n{i % n:06d}"), "r+") as f:
        f.seek(0)
        f.write("NODE")
    log.write(f"line {i}\n")
    log.flush()
    i += 1
log.close()
lines = open(os.path.join(d, "log")).read().splitlines()
bad = sum(1 for k in range(min(i, n)) if not open(os.path.join(d, f"n{k:06d}")).read().startswith("NODE"))
ok = lines == [f"line {k}" for k in range(i)]
open(out, "w").write(f"writer: {i} rewrites, {bad} lost, log {'intact' if ok else 'DAMAGED'}")
PY
    WPID=$!
    sleep 0.3
  fi
  start=$(date +%s%N)
  out=$("$FSVA" migrate "$MNT" --to "$THERE:7420" --key-file "$WORK/key")
  total=$(( ($(date +%s%N) - start) / 1000000 ))
  ms=$(echo "$out" | sed -n 's/.*waited \([0-9.]*\) ms.*/\1/p')
  echo "check" >&"${HOLDER[1]}"
  read -r line <&"${HOLDER[0]}"
  wait "$HOLDER_PID" 2>/dev/null || true
  times+=("$ms")
  wrote=
  if [[ -n $WPID ]]; then wait "$WPID"; wrote="; $(cat "$WORK/writer.out")"; fi
  echo "  run $run: downtime $ms ms (whole migration $total ms; same-host restart before it: $rs ms); held files after it: $line$wrote"
  "$FSVA" umount "$MNT"
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print "  median downtime: " a[int((NR+1)/2)] " ms"}'
printf '%s\n' "${restarts[@]}" | sort -n | awk '{a[NR]=$1} END {print "  median same-host restart downtime: " a[int((NR+1)/2)] " ms"}'
echo "  load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

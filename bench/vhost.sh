#!/usr/bin/env bash
# Benchmark fsva serve-vhost against virtiofsd: the same host directory served to the
# same stock Debian guest (QEMU, TCG here) by each, in the same run.
#
#   bench/vhost.sh [--quick] [--reps N] [--fsva-flags "FLAGS"] [--multi-queue]
#
# --fsva-flags adds serve-vhost flags to both fsva servers (e.g. --exclusive).
# --multi-queue boots a guest kernel that spreads requests over queues by CPU (Linux
# 6.12 from bookworm-backports, unpacked by `scripts/setup.sh --test-tools`), gives both
# fsva servers two request queues (virtiofsd serves one: it has no more), and runs every
# workload twice at once, one per guest vCPU (fio numjobs=2, two fsva-meta pinned to
# one vCPU each): figures are the two workers together (MB/s, IOPS) or each worker's
# time per op (µs).
#
# Servers: fsva serve-vhost --backend passthrough:DIR (the sandboxed appliance is the
# device), the same with --relay (the supervisor is the device and relays to the
# appliance), virtiofsd with its default cache policy (auto) and with --cache always. Each rep boots one guest
# per server (order rotated every rep); inside it, on the virtiofs mount:
#   seq_write    fio 1 MiB sequential write of $SIZE, end_fsync (MB/s)
#   seq_reread   reading that file back at once, guest cache warm (MB/s)
#   randwrite    fio 4 KiB random write, buffered (IOPS)
#   seq_read     fio 1 MiB sequential read, cold: new guest, host cache dropped (MB/s)
#   randread     fio 4 KiB random read, buffered, cold as above (IOPS)
#   drandread1   fio 4 KiB random read, O_DIRECT, QD1, cold as above (IOPS)
#   drandread16  fio 4 KiB random read, O_DIRECT, QD16 libaio, cold as above (IOPS)
#   meta         fsva-meta: create+write 4 KiB, warm stat, getxattr miss (one round
#                trip), readdir, rename, unlink,
#                mkdir+rmdir (µs per op)
# and prints the median of each figure with the ratio fsva/virtiofsd (>1 = fsva better).
# Needs root. Installs fio, busybox-static, libseccomp-dev, libcap-ng-dev with apt-get
# and virtiofsd with `cargo install virtiofsd` if missing.
set -euo pipefail

QUICK=0
REPS=3
FSVA_FLAGS=""
MQ=0
while (($#)); do
  case "$1" in
    --quick) QUICK=1; REPS=1 ;;
    --reps) REPS=$2; shift ;;
    --fsva-flags) FSVA_FLAGS=$2; shift ;;
    --multi-queue) MQ=1 ;;
    *) echo "usage: $0 [--quick] [--reps N] [--fsva-flags FLAGS] [--multi-queue]" >&2; exit 2 ;;
  esac
  shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=/var/tmp/fsva-vhost-bench
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$REPO/bench/out/vhost-results-$STAMP.md
RAW=$WORK/raw
if [ $QUICK = 1 ]; then SIZE=32M; RUNTIME=2; META_N=300; META_M=50; else SIZE=128M; RUNTIME=5; META_N=1000; META_M=200; fi
T0=$(date +%s)

need=()
for p in fio busybox-static libseccomp-dev libcap-ng-dev qemu-system-x86 linux-image-amd64; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  echo "bench/vhost.sh: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
VIRTIOFSD=$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")
if [ ! -x "$VIRTIOFSD" ]; then
  echo "bench/vhost.sh: installing virtiofsd (cargo install virtiofsd)" >&2
  cargo install virtiofsd --locked >/dev/null
  VIRTIOFSD=$HOME/.cargo/bin/virtiofsd
fi
echo "bench/vhost.sh: building fsva (release)" >&2
(cd "$REPO" && cargo build --release -q -p fsva && cargo build --release -q -p fsva-tests --bin fsva-guest --bin fsva-meta)
FSVA=$REPO/target/release/fsva
GUEST=$REPO/target/release/fsva-guest

rm -rf "$WORK"; mkdir -p "$WORK/export" "$RAW" "$REPO/bench/out"
SOCK=$WORK/fs.sock

# One request queue, one worker per workload; or (--multi-queue) two of each. Guest
# shell text: $ that the guest expands is written \$ inside double quotes.
GUEST_ARGS=()
FSVA_QUEUES=1
PAR=""
META="echo @@begin meta; fsva-meta /mnt $META_N $META_M; echo @@end meta"
if [ $MQ = 1 ]; then
  if [[ " $FSVA_FLAGS " == *" --queues"* ]]; then
    echo "bench/vhost.sh: --multi-queue sets --queues 2 itself; drop it from --fsva-flags" >&2
    exit 2
  fi
  GUEST_ARGS=(--kernel multi-queue)
  FSVA_QUEUES=2
  FSVA_FLAGS="$FSVA_FLAGS --queues 2"
  # One fio job pinned to each vCPU, as the two metadata workers are.
  PAR="--numjobs=2 --group_reporting --cpus_allowed=0-1 --cpus_allowed_policy=split"
  META="mkdir -p /mnt/m1 /mnt/m2
taskset 1 fsva-meta /mnt/m1 $META_N $META_M > /tmp/meta1 & m1=\$!
taskset 2 fsva-meta /mnt/m2 $META_N $META_M > /tmp/meta2 & m2=\$!
wait \$m1; a=\$?
wait \$m2; b=\$?
[ \$a = 0 ] && [ \$b = 0 ] || { echo \"fsva-meta workers exited \$a and \$b\"; exit 1; }
echo @@begin meta; cat /tmp/meta1; echo @@end meta
echo @@begin meta2; cat /tmp/meta2; echo @@end meta2
rm -rf /mnt/m1 /mnt/m2"
fi

# Two guest boots per server and rep. Phase "write" makes one file per read job and
# runs the write and metadata workloads; then the host drops its page cache, so that
# phase "read" starts cold on both sides (virtiofsd keeps a host copy of what it reads;
# fsva's appliance drops its copy: the guest's cache is the one copy). Each workload
# has a directory; its files are f.0 (and f.1 with two workers), the same names for
# every job run in it.
JOB="job() { name=\$1; dir=/mnt/bench/\$2; shift 2; mkdir -p \$dir; echo @@begin \$name; fio --name=\$name --directory=\$dir --filename_format='f.\$jobnum' --output-format=json $PAR \"\$@\"; echo @@end \$name; }"
cat > "$WORK/write" <<EOF
set -e
mkdir -p /mnt/bench
$JOB
job seq_write seq --rw=write --bs=1M --size=$SIZE --end_fsync=1
job seq_reread seq --rw=read --bs=1M --size=$SIZE
for f in rand drand1 drand16; do mkdir -p /mnt/bench/\$f; fio --name=lay --directory=/mnt/bench/\$f --filename_format='f.\$jobnum' --rw=write --bs=1M --size=$SIZE --end_fsync=1 --output-format=terse $PAR >/dev/null; done
job randwrite wrand --rw=randwrite --bs=4k --size=$SIZE --time_based --runtime=$RUNTIME
$META
EOF
cat > "$WORK/read" <<EOF
set -e
$JOB
job seq_read seq --rw=read --bs=1M --size=$SIZE
job randread rand --rw=randread --bs=4k --size=$SIZE --time_based --runtime=$RUNTIME
job drandread1 drand1 --rw=randread --bs=4k --size=$SIZE --direct=1 --time_based --runtime=$RUNTIME
job drandread16 drand16 --rw=randread --bs=4k --size=$SIZE --direct=1 --ioengine=libaio --iodepth=16 --time_based --runtime=$RUNTIME
rm -rf /mnt/bench
EOF

start_server() { # name -> pid in SERVER_PID
  rm -f "$SOCK"
  case "$1" in
    # shellcheck disable=SC2086 # FSVA_FLAGS is a list of flags
    fsva) "$FSVA" --log warn serve-vhost $FSVA_FLAGS --socket "$SOCK" --backend "passthrough:$WORK/export" >"$WORK/$1.log" 2>&1 & ;;
    # shellcheck disable=SC2086
    fsva-relay) "$FSVA" --log warn serve-vhost --relay $FSVA_FLAGS --socket "$SOCK" --backend "passthrough:$WORK/export" >"$WORK/$1.log" 2>&1 & ;;
    virtiofsd) "$VIRTIOFSD" --socket-path "$SOCK" --shared-dir "$WORK/export" --cache auto >"$WORK/$1.log" 2>&1 & ;;
    virtiofsd-always) "$VIRTIOFSD" --socket-path "$SOCK" --shared-dir "$WORK/export" --cache always >"$WORK/$1.log" 2>&1 & ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 600); do [ -S "$SOCK" ] && return 0; sleep 0.1; done
  echo "bench/vhost.sh: $1 did not create its socket; log:" >&2; cat "$WORK/$1.log" >&2; exit 1
}

SERVERS=(fsva fsva-relay virtiofsd virtiofsd-always)
for rep in $(seq "$REPS"); do
  # Rotate the order so that no server always runs first (or last).
  shift_by=$(( (rep - 1) % ${#SERVERS[@]} ))
  order=("${SERVERS[@]:$shift_by}" "${SERVERS[@]:0:$shift_by}")
  for s in "${order[@]}"; do
    echo "bench/vhost.sh: rep $rep/$REPS: $s" >&2
    for phase in write read; do
      # Nothing of the build or the last boot is still being written back.
      sync
      if [ $phase = read ]; then echo 3 > /proc/sys/vm/drop_caches; fi
      start_server "$s"
      # virtiofsd serves one request queue (QEMU fails to start its device with more).
      case $s in fsva*) queues=$FSVA_QUEUES ;; *) queues=1 ;; esac
      "$GUEST" --socket "$SOCK" --cpus 2 --memory 1024 --timeout 900 "${GUEST_ARGS[@]}" --queues $queues \
        --bin /usr/bin/fio --bin "$REPO/target/release/fsva-meta" "$WORK/$phase" >> "$RAW/$s-$rep.out"
      wait "$SERVER_PID" 2>/dev/null || true
    done
  done
done

python3 - "$RAW" "$REPS" "$MQ" "${FSVA_MQ_GUEST_KERNEL:-/var/cache/fsva/guest-kernel-mq}" > "$OUT" <<'PY'
import json, statistics, sys, re, os, platform, subprocess
raw, reps, mq, mq_root = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
servers = ["fsva", "fsva-relay", "virtiofsd", "virtiofsd-always"]
def sections(text):
    return dict(re.findall(r"@@begin (\S+)\n(.*?)@@end \1", text, re.S))
fio = [("seq_write", "write", "bw"), ("seq_reread", "read", "bw"), ("randwrite", "write", "iops"),
       ("seq_read", "read", "bw"), ("randread", "read", "iops"),
       ("drandread1", "read", "iops"), ("drandread16", "read", "iops")]
meta = ["create_write", "stat_warm", "xattr_miss", "readdir", "rename", "unlink", "mkdir_rmdir"]
vals = {s: {} for s in servers}
for s in servers:
    for r in range(1, reps + 1):
        sec = sections(open(os.path.join(raw, f"{s}-{r}.out")).read())
        for name, d, kind in fio:
            j = json.loads(sec[name][sec[name].index("{"):])["jobs"][0][d]
            v = j["bw_bytes"] / 1e6 if kind == "bw" else j["iops"]
            vals[s].setdefault(name, []).append(v)
        # Two metadata workers at once (--multi-queue): each one's time per op, averaged.
        runs = [json.loads(sec[k]) for k in ("meta", "meta2") if k in sec]
        for op in meta:
            vals[s].setdefault(op, []).append(statistics.mean(m[op] for m in runs))
med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in vals.items()}
print(f"# fsva serve-vhost vs virtiofsd, {reps} rep(s), median\n")
if mq:
    kernel = subprocess.getoutput(f"ls '{mq_root}/boot' | sed -n s/vmlinuz-//p | sort -V | tail -1")
    print(f"Guest: Debian kernel {kernel} (bookworm-backports), QEMU TCG, 2 vCPUs, 1 GiB; fsva with two request queues, virtiofsd with its one; every workload run by two workers at once (one per vCPU).")
else:
    print(f"Guest: stock Debian kernel {subprocess.getoutput('ls /boot | sed -n s/vmlinuz-//p | tail -1')}, QEMU TCG, 2 vCPUs, 1 GiB, one request queue.")
print("Host:", platform.node(), "|", os.cpu_count(), "CPUs |", platform.release(), "\n")
print("| workload | unit | fsva | fsva --relay | virtiofsd (auto) | virtiofsd (always) | fsva / best virtiofsd | relay / best virtiofsd |")
print("|---|---|---|---|---|---|---|---|")
for name, _, kind in fio:
    unit = "MB/s" if kind == "bw" else "IOPS"
    f, r, a, b = (med[s][name] for s in servers)
    print(f"| {name} | {unit} | {f:.1f} | {r:.1f} | {a:.1f} | {b:.1f} | {f / max(a, b):.2f}x | {r / max(a, b):.2f}x |")
for op in meta:
    f, r, a, b = (med[s][op] for s in servers)
    print(f"| {op} | µs/op | {f:.1f} | {r:.1f} | {a:.1f} | {b:.1f} | {min(a, b) / f:.2f}x | {min(a, b) / r:.2f}x |")
PY
echo "Run: bench/vhost.sh$([ $QUICK = 1 ] && echo " --quick") --reps $REPS$([ $MQ = 1 ] && echo " --multi-queue")${FSVA_FLAGS:+ (fsva flags: $FSVA_FLAGS)}; took $(( $(date +%s) - T0 )) s." >> "$OUT"
cat "$OUT"
echo "bench/vhost.sh: results in $OUT" >&2

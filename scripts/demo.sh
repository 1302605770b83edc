#!/usr/bin/env bash
# fsva's main job on its embedded default: mount a `mem` appliance, show it working,
# kill its appliance with -9 and show a successor carry on with a file held open, and
# leave it mounted for you to use.
#   scripts/demo.sh [MOUNTPOINT]      (default /tmp/fsva-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --release
fsva=target/release/fsva
mp=${1:-/tmp/fsva-demo}
mkdir -p "$mp"
if [ "$(findmnt -n -o FSTYPE --mountpoint "$mp" 2>/dev/null)" = fuse.fsva ]; then
  echo "demo: $mp is already an fsva mount; unmounting the old one first"
  "$fsva" umount "$mp"
fi
"$fsva" mount --backend mem "$mp"
echo
echo "== Using it: every operation below is served by the sandboxed appliance"
set -x
mkdir -p "$mp/docs"
echo "hello from an fsva appliance" > "$mp/docs/hello.txt"
ln "$mp/docs/hello.txt" "$mp/docs/hello-link.txt"
ln -s hello.txt "$mp/docs/hello-symlink.txt"
setfattr -n user.origin -v fsva "$mp/docs/hello.txt"
ls -l "$mp/docs"
cat "$mp/docs/hello-symlink.txt"
getfattr -n user.origin "$mp/docs/hello.txt"
df -h "$mp"
{ set +x; } 2>/dev/null
echo
echo "== The appliance dies (kill -9) while a file is held open; a successor takes over"
exec 9<"$mp/docs/hello.txt"
record=$(grep -l "^mountpoint=$mp\$" /run/fsva/*.mount)
old=$(sed -n 's/^appliance_pid=//p' "$record")
kill -9 "$old"
for _ in $(seq 200); do
  new=$(sed -n 's/^appliance_pid=//p' "$record")
  [ -n "$new" ] && [ "$new" != "$old" ] && break
  sleep 0.05
done
echo "appliance $old killed; appliance $new serves now"
set -x
cat "$mp/docs/hello-link.txt"
cat <&9
getfattr -n user.origin "$mp/docs/hello.txt"
{ set +x; } 2>/dev/null
exec 9<&-
echo
"$fsva" status
echo
echo "It stays mounted: use $mp like any directory."
echo "Unmount with:  fsva umount $mp"

#!/usr/bin/env bash
# Installs what fsva needs on a fresh Debian 12 machine (idempotent) and builds it.
#   scripts/setup.sh [--release] [--test-tools]
# --test-tools also installs what the test suites use (acl/attr tools, python venv, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

# VM appliances (fsva mount --vm): QEMU, a Debian kernel for the appliance, kmod to
# resolve its modules, cpio only for the initramfs unit test.
need_pkgs=(fuse3 attr acl qemu-system-x86 linux-image-amd64 kmod)
if [[ " $* " == *" --test-tools "* ]]; then
  need_pkgs+=(fio bindfs stress-ng python3-venv gcc g++ pkg-config libfuse3-dev dpkg-dev cpio)
  # Images of file systems this host's kernel cannot mount, for the VM appliance tests.
  need_pkgs+=(e2fsprogs dosfstools f2fs-tools jfsutils genisoimage)
  # The user VMs of the vhost-user-fs tests: a busybox initramfs around the stock kernel.
  need_pkgs+=(busybox-static)
  # The migration tests' second host: a network namespace on a veth pair.
  need_pkgs+=(iproute2)
fi
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "fsva setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [[ ! -e /dev/fuse ]]; then
  modprobe fuse 2>/dev/null || true
fi
[[ -e /dev/fuse ]] || { echo "fsva setup: /dev/fuse is missing and could not be loaded" >&2; exit 1; }
# Ordinary users mount through fusermount3, which opens /dev/fuse as the user: Debian's
# udev rules make it 0666; machines without udev leave it 0600.
if [[ $(id -u) -eq 0 && $(stat -c %a /dev/fuse) != 666 ]]; then
  chmod 0666 /dev/fuse
fi

# The guest migration tests (vhost-user-fs device state) need QEMU 8.2 or later;
# Debian 12's is 7.2. bookworm-backports' QEMU is unpacked beside the system one (not
# installed: VM appliances and every other test keep the system QEMU), with the
# libraries it needs from bookworm itself. Its ROMs are its own; the BIOS is the
# system's SeaBIOS (tests/src/guest.rs passes both with -L).
qemu_migration=/var/cache/fsva/qemu-migration
if [[ " $* " == *" --test-tools "* && $(id -u) -eq 0 && ! -x $qemu_migration/usr/bin/qemu-system-x86_64 ]]; then
  echo "fsva setup: unpacking bookworm-backports' QEMU into $qemu_migration (migration tests)"
  backports=/etc/apt/sources.list.d/backports.list
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$backports"
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  debs=$(mktemp -d)
  chown _apt "$debs" 2>/dev/null || true
  (cd "$debs" && apt-get download -qq -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-system-data)
  # Its shared libraries, from bookworm (none of them come from backports).
  libs=$(dpkg-deb -f "$debs"/qemu-system-x86_*.deb Depends \
    | tr ',' '\n' | sed -n 's/^ *\(lib[^ ]*\).*/\1/p' | sort -u)
  missing_libs=()
  for l in $libs; do
    dpkg-query -W -f='${Status}' "$l" 2>/dev/null | grep -q "install ok installed" || missing_libs+=("$l")
  done
  if ((${#missing_libs[@]})); then
    apt-get install -y -qq "${missing_libs[@]}" >/dev/null
  fi
  mkdir -p "$(dirname "$qemu_migration")"
  rm -rf "$qemu_migration.new"
  for d in "$debs"/*.deb; do dpkg -x "$d" "$qemu_migration.new"; done
  rm -rf "$debs" "$qemu_migration"
  mv "$qemu_migration.new" "$qemu_migration"
  if ldd "$qemu_migration/usr/bin/qemu-system-x86_64" | grep -q "not found"; then
    echo "fsva setup: the unpacked QEMU misses libraries:" >&2
    ldd "$qemu_migration/usr/bin/qemu-system-x86_64" | grep "not found" >&2
    exit 1
  fi
fi

# The multi-queue guest tests and benchmark need a guest kernel that spreads virtiofs
# requests over several queues (Linux 6.11 and later); Debian 12's is 6.1.
# bookworm-backports' 6.12 kernel is unpacked (not installed: /boot and the VM
# appliance keep the system kernel), with a modules.dep of its own made by depmod.
guest_kernel=/var/cache/fsva/guest-kernel-mq
if [[ " $* " == *" --test-tools "* && $(id -u) -eq 0 ]] && ! compgen -G "$guest_kernel/boot/vmlinuz-*" >/dev/null; then
  echo "fsva setup: unpacking bookworm-backports' Linux 6.12 into $guest_kernel (multi-queue guests)"
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/backports.list
  fi
  # Always refreshed: a package list older than the archive names a kernel it no longer
  # holds, and the download below would fail with 404.
  apt-get update -qq
  image=$(apt-cache -t bookworm-backports depends linux-image-amd64 \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
  [[ -n $image ]] || { echo "fsva setup: bookworm-backports offers no linux-image-amd64" >&2; exit 1; }
  debs=$(mktemp -d)
  chown _apt "$debs" 2>/dev/null || true
  (cd "$debs" && apt-get download -qq -t bookworm-backports "$image")
  mkdir -p "$(dirname "$guest_kernel")"
  rm -rf "$guest_kernel.new"
  dpkg -x "$debs"/*.deb "$guest_kernel.new"
  rm -rf "$debs"
  release=$(basename "$(ls -d "$guest_kernel.new"/lib/modules/*)")
  depmod -b "$guest_kernel.new" "$release"
  rm -rf "$guest_kernel"
  mv "$guest_kernel.new" "$guest_kernel"
fi

# fsx (crates.io), the File System eXerciser: the external suites and the crash
# recovery test run it.
if [[ " $* " == *" --test-tools "* ]] && ! fsx --version 2>/dev/null | grep -qx "fsx 0.3.2"; then
  echo "fsva setup: installing fsx 0.3.2 with cargo"
  cargo install --locked --quiet --version 0.3.2 fsx
fi

profile=debug
args=()
if [[ " $* " == *" --release "* ]]; then profile=release; args+=(--release); fi
echo "fsva setup: building ($profile)"
cargo build --workspace --bins --locked "${args[@]}"

# The VM appliance runtime runs as PID 1 of a guest with nothing else in it: it is
# linked statically (explicit --target keeps the flags off build scripts and macros).
echo "fsva setup: building the static VM appliance runtime (fsva-vm-init)"
RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
  cargo build --release --locked -p fsva-vm-init --target x86_64-unknown-linux-gnu

# `mount -t fuse.fsva` and /etc/fstab look for mount.fuse.fsva in /sbin (= /usr/sbin).
if [[ $(id -u) -eq 0 ]]; then
  install -m 0755 "target/$profile/fsva" /usr/local/bin/fsva
  ln -sf /usr/local/bin/fsva /usr/sbin/mount.fuse.fsva
  install -D -m 0755 target/x86_64-unknown-linux-gnu/release/fsva-vm-init /usr/local/lib/fsva/fsva-vm-init
fi

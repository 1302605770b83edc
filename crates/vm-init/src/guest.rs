//! The guest as PID 1 must run it: pseudo file systems, modules, the disk, its page
//! cache budget, and power-off. Everything here acts on the guest kernel only; nothing
//! here talks to the host.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

/// Where the disk is mounted and served from.
pub const EXPORT: &str = "/export";

pub fn mount_pseudo_filesystems() -> Result<(), String> {
    for (src, dir, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        mount(
            src,
            dir,
            fstype,
            MountFlags::NOSUID | MountFlags::NOEXEC,
            None,
        )
        .map_err(|e| format!("mounting {fstype} on {dir}: {e}"))?;
    }
    Ok(())
}

/// Lets the backend hold one descriptor per node it serves: PID 1 starts with the
/// kernel's default of 1024 open files, far fewer than a source tree has.
pub fn raise_open_file_limit() {
    let max = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let limit = rustix::process::Rlimit {
        current: Some(max),
        maximum: Some(max),
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit) {
        tracing::warn!(error = %e, max, "could not raise the open-file limit");
    }
}

/// Loads the drivers every boot needs (/etc/fsva/modules.load).
pub fn load_base_modules() {
    load_module_list(Path::new("/etc/fsva/modules.load"));
}

/// Where the modules each file system type needs are listed.
const PER_TYPE: &str = "/etc/fsva/fs";

/// The file system types this appliance ships modules for.
fn shipped_types() -> Vec<String> {
    let mut types: Vec<String> = std::fs::read_dir(PER_TYPE)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    types.sort();
    types
}

/// Loads the modules of `fstype`; false if the appliance has none for it.
fn load_type(fstype: &str) -> bool {
    let list = Path::new(PER_TYPE).join(fstype);
    if fstype.contains('/') || !list.is_file() {
        return false;
    }
    load_module_list(&list);
    true
}

/// Loads the modules listed in `list`, in order. A module that fails is logged and
/// skipped: accelerated variants the emulated CPU lacks fail with ENODEV and their
/// generic versions serve; a file system whose module failed fails to mount, clearly.
fn load_module_list(list: &Path) {
    let text = std::fs::read_to_string(list).unwrap_or_default();
    for path in text.lines().filter(|l| !l.is_empty()) {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(module = path, error = %e, "module missing");
                continue;
            }
        };
        use std::os::fd::AsRawFd;
        // SAFETY: finit_module reads the module from a descriptor we own; the empty
        // parameter string is a valid C string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            _ if rc == 0 => {}
            Some(libc::EEXIST) => {}
            Some(libc::ENODEV) => tracing::debug!(module = path, "not for this CPU"),
            _ => tracing::warn!(module = path, error = %err, "module not loaded"),
        }
    }
}

/// The disk to serve: the first virtio disk, once the kernel has probed it.
pub fn wait_for_disk() -> Result<PathBuf, String> {
    let disk = PathBuf::from("/dev/vda");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !disk.exists() {
        if Instant::now() > deadline {
            return Err("no disk (/dev/vda) appeared: the VM was started without its image".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(disk)
}

/// File system types the kernel can mount from a block device, in its order.
fn block_filesystems() -> Vec<String> {
    let mut types: Vec<String> = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(|l| l.trim().to_string())
        .filter(|t| !t.is_empty() && t != "fuseblk")
        .collect();
    // Where several drivers accept one image, the richer one goes first: ext4 serves
    // ext2/ext3 too (and keeps their noise out of the log); vfat and msdos both take FAT
    // images, and msdos would truncate names to 8.3.
    let rank = |t: &String| match t.as_str() {
        "ext4" => 0,
        "vfat" => 1,
        "msdos" => 3,
        _ => 2,
    };
    types.sort_by_key(rank);
    types
}

/// Mounts `disk` on [`EXPORT`] as `fstype`, or as the first type the kernel accepts
/// (the kernel checks each superblock's magic). Returns the type mounted.
pub fn mount_disk(disk: &Path, fstype: Option<&str>, read_only: bool) -> Result<String, String> {
    let flags = if read_only {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    let try_mount = |t: &str| mount(disk, EXPORT, t, flags, None);
    if let Some(t) = fstype {
        if !load_type(t) && !block_filesystems().iter().any(|k| k == t) {
            return Err(format!(
                "this appliance's kernel has no {t} driver (it knows {})",
                shipped_types().join(", ")
            ));
        }
        return try_mount(t).map(|()| t.to_string()).map_err(|e| {
            format!(
                "the appliance's kernel could not mount the image as {t} ({e}){}",
                if read_only {
                    ""
                } else {
                    "; if it is read-only media, pass --ro"
                }
            )
        });
    }
    // Recognised by its superblock: load only that driver.
    if let Some(t) = crate::detect::fstype(disk) {
        if load_type(t) {
            match try_mount(t) {
                Ok(()) => return Ok(t.to_string()),
                Err(e) => {
                    tracing::info!(fstype = t, error = %e, "looked like {t} but did not mount; trying every driver")
                }
            }
        }
    }
    // Otherwise every driver, each trying the image in turn (as mount(8) does).
    for t in shipped_types() {
        load_type(&t);
    }
    let candidates = block_filesystems();
    for t in &candidates {
        if try_mount(t).is_ok() {
            return Ok(t.clone());
        }
    }
    Err(format!(
        "no file system this appliance knows recognised the image (tried {})",
        candidates.join(", ")
    ))
}

/// Raises the disk's read-ahead to `kb`: the host reads ahead in requests of up to
/// 1 MiB, and the default 128 KiB would split each into eight emulated disk reads.
pub fn raise_disk_readahead(disk: &Path, kb: u32) {
    let Some(name) = disk.file_name() else {
        return;
    };
    let knob = Path::new("/sys/block")
        .join(name)
        .join("queue/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, kb.to_string()) {
        tracing::info!(knob = %knob.display(), error = %e, "disk read-ahead left as it was");
    }
}

/// Writes the disk's file system back to the disk (`fsva sync`: the host's own sync
/// never reaches this guest).
pub fn sync_disk() -> std::io::Result<()> {
    let export = std::fs::File::open(EXPORT)?;
    rustix::fs::syncfs(&export)?;
    Ok(())
}

/// Syncs and unmounts the disk so it is consistent when the machine stops.
pub fn unmount_disk() {
    rustix::fs::sync();
    if let Err(e) = unmount(EXPORT, UnmountFlags::empty()) {
        // Something still holds it: a read-only remount still writes everything back
        // and marks the file system clean.
        let ro = rustix::mount::mount_remount(EXPORT, MountFlags::RDONLY, "");
        tracing::warn!(error = %e, remounted_read_only = ro.is_ok(), "unmounting the disk failed");
        rustix::fs::sync();
    }
}

static CACHE_BUDGET: AtomicU64 = AtomicU64::new(u64::MAX);

/// Caps the guest's page cache at `bytes`: a watcher drops clean cached pages whenever
/// the cache grows past it (the user side caches the data the host reads).
pub fn set_cache_budget(bytes: u64) {
    let first = CACHE_BUDGET.swap(bytes, Ordering::Relaxed) == u64::MAX;
    if first {
        let _ = std::thread::Builder::new()
            .name("cache-budget".into())
            .spawn(|| loop {
                let budget = CACHE_BUDGET.load(Ordering::Relaxed);
                if page_cache_bytes() > budget {
                    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                }
                std::thread::sleep(Duration::from_millis(200));
            });
    }
}

fn page_cache_bytes() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("Cached:") || l.starts_with("Buffers:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// Sets the guest's wall clock (it boots from an RTC with whole seconds).
pub fn set_clock(secs: i64, nanos: u32) -> std::io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos.min(999_999_999) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass by reference; nothing is kept.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Stops the machine. QEMU (run with -no-reboot) exits.
pub fn power_off() -> ! {
    rustix::fs::sync();
    // SAFETY: reboot(2) with the power-off command does not return on success.
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Power-off refused (should not happen to PID 1): exiting panics the guest, which
    // `panic=-1` with QEMU's -no-reboot also turns into an exit.
    std::process::exit(1)
}

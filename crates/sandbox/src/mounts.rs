//! The sandbox's file-system view: a private mount namespace whose `/` is the export (or an
//! empty read-only tmpfs), plus an optional private procfs handle.
//!
//! Owns: every mount operation of the sandbox child, done once during setup.
//! Must never: run in the parent (it would change the launcher's mounts), leave the old root
//! attached, or propagate a mount back to the host (everything is made private first).

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::child::SetupFailure;
use crate::sys;

fn fail(
    step: &'static str,
    detail: impl Into<String>,
) -> impl FnOnce(rustix::io::Errno) -> SetupFailure {
    let detail = detail.into();
    move |e| SetupFailure::new(step, detail, e.raw_os_error())
}

fn fail_io(
    step: &'static str,
    detail: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> SetupFailure {
    let detail = detail.into();
    move |e| SetupFailure::new(step, detail, e.raw_os_error().unwrap_or(libc::EIO))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths from the OS contain no NUL")
}

/// Make every mount in the new namespace private so nothing propagates to or from the host.
pub(crate) fn make_all_private() -> Result<(), SetupFailure> {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(fail("make mounts private", "/"))
}

/// Mount a fresh procfs of the sandbox's own pid namespace (only pid directories:
/// `subset=pid`, so no `/proc/sys`) on the host's `/proc` mount point in the private mount
/// namespace, and open its `self/fd` with `O_PATH|O_DIRECTORY`. The mount is detached with
/// the old root later; the descriptor keeps it alive.
pub(crate) fn open_private_proc_self_fd() -> Result<OwnedFd, SetupFailure> {
    rustix::mount::mount(
        "proc",
        "/proc",
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(c"subset=pid"),
    )
    .map_err(fail("mount proc", "proc on /proc with subset=pid"))?;
    rustix::fs::open(
        "/proc/self/fd",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail(
        "open /proc/self/fd",
        "/proc/self/fd of the private procfs",
    ))
}

/// `pivot_root(".", ".")` into the current directory, detach the old root stacked below it,
/// and `chdir("/")`.
fn pivot_into_cwd(what: &str) -> Result<(), SetupFailure> {
    rustix::process::pivot_root(".", ".").map_err(fail("pivot_root", what))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(fail("detach old root", what))?;
    std::env::set_current_dir("/").map_err(fail_io("chdir /", what))?;
    Ok(())
}

/// Make `export` (an absolute, canonical directory path) the root.
pub(crate) fn enter_export(export: &Path, read_only: bool) -> Result<(), SetupFailure> {
    let shown = export.display().to_string();
    rustix::mount::mount_bind_recursive(export, export)
        .map_err(fail("bind-mount export", shown.clone()))?;
    let mut attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    if read_only {
        attrs |= sys::MOUNT_ATTR_RDONLY;
    }
    let step = if read_only {
        "make export read-only"
    } else {
        "restrict export mount flags"
    };
    sys::mount_setattr_recursive(&cpath(export), attrs).map_err(fail_io(
        step,
        format!(
            "{shown} (nosuid,nodev{})",
            if read_only { ",ro" } else { "" }
        ),
    ))?;
    std::env::set_current_dir(export).map_err(fail_io("chdir export", shown.clone()))?;
    pivot_into_cwd(&shown)
}

/// Make an empty tmpfs the root, read-only.
pub(crate) fn enter_empty() -> Result<(), SetupFailure> {
    rustix::mount::mount(
        "fsva-empty",
        "/tmp",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(c"size=16k,nr_inodes=16,mode=0555"),
    )
    .map_err(fail("mount tmpfs root", "tmpfs on /tmp"))?;
    std::env::set_current_dir("/tmp").map_err(fail_io("chdir tmpfs", "/tmp"))?;
    pivot_into_cwd("empty tmpfs")?;
    sys::mount_setattr_recursive(c"/", sys::MOUNT_ATTR_RDONLY)
        .map_err(fail_io("make root read-only", "/ (empty tmpfs)"))
}

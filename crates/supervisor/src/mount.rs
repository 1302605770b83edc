//! Making and removing the FUSE mount.
//!
//! As root the supervisor calls mount(2) itself with a fresh `/dev/fuse` descriptor;
//! otherwise it asks `fusermount3` (setuid helper of the fuse3 package), which passes the
//! descriptor back over a socket (`_FUSE_COMMFD`). Mount points are checked first, so a
//! user gets a one-line error that says what to do. This module never starts appliances.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::mount::{MountFlags, UnmountFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("mount point {0} does not exist: create it with `mkdir -p {0}`")]
    Missing(PathBuf),
    #[error("mount point {0} is not a directory: choose an empty directory")]
    NotDirectory(PathBuf),
    #[error("mount point {0} is not empty: choose an empty directory (fsva will not hide files)")]
    NotEmpty(PathBuf),
    #[error("cannot inspect mount point {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("{0} is already an fsva mount: unmount it first with `fsva umount {0}`")]
    AlreadyMounted(PathBuf),
    #[error("/dev/fuse is missing: load the fuse module (`modprobe fuse`) or, in a container, pass the device in")]
    NoDevice,
    #[error("{0}")]
    Channel(#[from] fsva_channel::ChannelError),
    #[error("mount(2) of {path} failed: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error(
        "fusermount3 could not mount {path}: {message} (install the fuse3 package, or run as root)"
    )]
    Fusermount { path: PathBuf, message: String },
    #[error("{path} is busy (files are open on it): close them, or unmount with --lazy")]
    Busy { path: PathBuf },
    #[error("unmounting {path} failed: {source}")]
    Unmount { path: PathBuf, source: io::Error },
}

/// Mount options the user chose.
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    pub read_only: bool,
    /// Honour set-id bits (`-o suid`); off by default, as for every FUSE mount.
    pub suid: bool,
    /// Honour device nodes (`-o dev`); off by default.
    pub dev: bool,
    /// Let other users than the mounting one in (always on as root).
    pub allow_other: bool,
    /// Source name shown in /proc/mounts.
    pub source: String,
}

/// Checks that `path` is an existing, empty directory that is not mounted by fsva yet,
/// and returns its canonical form.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::Missing(path.to_path_buf()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::AlreadyMounted(path.to_path_buf()))
        }
        Err(source) => {
            return Err(MountError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(MountError::NotDirectory(path.to_path_buf()));
    }
    let canonical = path.canonicalize().map_err(|source| MountError::Inspect {
        path: path.to_path_buf(),
        source,
    })?;
    if is_fsva_mount(&canonical) {
        return Err(MountError::AlreadyMounted(canonical));
    }
    let mut entries = std::fs::read_dir(&canonical).map_err(|source| MountError::Inspect {
        path: canonical.clone(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(MountError::NotEmpty(canonical));
    }
    Ok(canonical)
}

/// Whether /proc/self/mountinfo lists an fsva FUSE mount at `path`.
pub fn is_fsva_mount(path: &Path) -> bool {
    fsva_mount_device(path).is_some()
}

/// The device (`major:minor`, as mountinfo and `/sys/class/bdi` name it) of the fsva
/// FUSE mount at `path`, read from /proc/self/mountinfo: unlike a stat of the
/// mountpoint, this never sends the mount a request.
pub fn fsva_mount_device(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        let ours = fields.len() > sep + 1
            && fields.get(4).is_some_and(|m| unescape(m) == want)
            && fields[sep + 1].starts_with("fuse.fsva");
        ours.then(|| fields.get(2).map(|d| d.to_string())).flatten()
    })
}

/// The read-ahead window fsva gives its mounts: two of the largest READ requests FUSE
/// sends (256 pages), so one can be in flight while the appliance serves the other.
pub const READ_AHEAD: u32 = 2 << 20;

/// Raises the read-ahead window of the FUSE mount on `device` to at least `bytes`.
///
/// The kernel starts a FUSE mount at the block layer's default (128 KiB) and INIT can
/// only lower it, so where reads reach the appliance (a VM appliance, a stream channel,
/// a mount without FUSE passthrough), sequential reads would go in 128 KiB requests
/// however large `max_write` lets them be. Must be called after INIT's reply is in:
/// the kernel applies INIT's `max_readahead` then.
pub fn raise_readahead(device: &str, bytes: u32) -> io::Result<()> {
    let knob = Path::new("/sys/class/bdi")
        .join(device)
        .join("read_ahead_kb");
    let current: u32 = std::fs::read_to_string(&knob)?.trim().parse().unwrap_or(0);
    let wanted = bytes / 1024;
    if wanted > current {
        std::fs::write(&knob, wanted.to_string())?;
    }
    Ok(())
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Checks that the FUSE device exists.
pub fn check_device() -> Result<(), MountError> {
    if Path::new("/dev/fuse").exists() {
        Ok(())
    } else {
        Err(MountError::NoDevice)
    }
}

/// Mounts and returns the session's `/dev/fuse` descriptor.
pub fn mount(path: &Path, opts: &MountOptions) -> Result<OwnedFd, MountError> {
    check_device()?;
    if rustix::process::geteuid().is_root() {
        mount_directly(path, opts)
    } else {
        mount_with_fusermount(path, opts)
    }
}

fn mount_directly(path: &Path, opts: &MountOptions) -> Result<OwnedFd, MountError> {
    let dev = fsva_channel::fusedev::open_device()?;
    let meta = std::fs::metadata(path).map_err(|source| MountError::Inspect {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::MetadataExt;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        dev.as_raw_fd(),
        meta.mode() & libc::S_IFMT,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    if opts.allow_other || rustix::process::geteuid().is_root() {
        data.push_str(",allow_other");
    }
    let mut flags = MountFlags::empty();
    if !opts.suid {
        flags |= MountFlags::NOSUID;
    }
    if !opts.dev {
        flags |= MountFlags::NODEV;
    }
    if opts.read_only {
        flags |= MountFlags::RDONLY;
    }
    rustix::mount::mount(
        opts.source.as_str(),
        path,
        "fuse.fsva",
        flags,
        std::ffi::CString::new(data).ok().as_deref(),
    )
    .map_err(|e| MountError::Mount {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(dev)
}

fn mount_with_fusermount(path: &Path, opts: &MountOptions) -> Result<OwnedFd, MountError> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::empty(),
        None,
    )
    .map_err(|e| MountError::Fusermount {
        path: path.to_path_buf(),
        message: format!("socketpair: {e}"),
    })?;
    rustix::io::fcntl_setfd(&ours, rustix::io::FdFlags::CLOEXEC).ok();
    let mut o = vec![
        "default_permissions".to_string(),
        format!("fsname={}", opts.source),
        "subtype=fsva".to_string(),
    ];
    if opts.read_only {
        o.push("ro".into());
    }
    if opts.allow_other {
        o.push("allow_other".into());
    }
    let out = Command::new("fusermount3")
        .arg("-o")
        .arg(o.join(","))
        .arg("--")
        .arg(path)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| MountError::Fusermount {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    drop(theirs);
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', "; ");
        return Err(MountError::Fusermount {
            path: path.to_path_buf(),
            message: if said.is_empty() {
                format!("it exited with {}", out.status)
            } else {
                said
            },
        });
    }
    let link = fsva_control::Link::from_fd(ours);
    receive_fd(link).map_err(|message| MountError::Fusermount {
        path: path.to_path_buf(),
        message,
    })
}

/// fusermount3 sends one byte with the descriptor attached.
fn receive_fd(link: fsva_control::Link) -> Result<OwnedFd, String> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::io::IoSliceMut;
    use std::mem::MaybeUninit;
    let fd = link.into_fd();
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        &fd,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receiving the /dev/fuse descriptor: {e}"))?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err("no /dev/fuse descriptor was passed back".into())
}

/// Unmounts `path`. `lazy` detaches even when busy.
pub fn unmount(path: &Path, lazy: bool) -> Result<(), MountError> {
    if rustix::process::geteuid().is_root() {
        let flags = if lazy {
            UnmountFlags::DETACH
        } else {
            UnmountFlags::empty()
        };
        match rustix::mount::unmount(path, flags) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::BUSY) => Err(MountError::Busy {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(MountError::Unmount {
                path: path.to_path_buf(),
                source: e.into(),
            }),
        }
    } else {
        let mut cmd = Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let out = cmd
            .arg("--")
            .arg(path)
            .output()
            .map_err(|source| MountError::Unmount {
                path: path.to_path_buf(),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else if String::from_utf8_lossy(&out.stderr).contains("busy") {
            Err(MountError::Busy {
                path: path.to_path_buf(),
            })
        } else {
            Err(MountError::Unmount {
                path: path.to_path_buf(),
                source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            })
        }
    }
}

/// Aborts the FUSE connection of the mount at `path` through fusectl
/// (`/sys/fs/fuse/connections/<minor>/abort`), mounting fusectl first if needed: every
/// waiting and future request then fails at once (ENOTCONN) instead of hanging. The
/// last resort when nobody can answer the kernel any more.
pub fn abort_connection(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let minor = libc::minor(dev);
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(minor.to_string()).exists() {
        rustix::mount::mount("fusectl", ctl, "fusectl", MountFlags::empty(), None)
            .map_err(io::Error::from)?;
    }
    std::fs::write(ctl.join(minor.to_string()).join("abort"), b"1")
}

/// How long the disconnection watcher sleeps between checks when the mount table does
/// not change: the longest it takes to notice an aborted connection, or the end of one
/// lazily unmounted.
const DISCONNECT_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// After a change of the mount table, the watcher looks this often, this many times,
/// before it waits for the next change again: an unmount detaches the mount first and
/// ends the connection a little later.
const DISCONNECT_SOON: std::time::Duration = std::time::Duration::from_millis(2);
const DISCONNECT_SOON_CHECKS: u32 = 50;

/// Waits until the FUSE connection behind `session` is gone (unmounted, or aborted):
/// `/dev/fuse` then polls as an error. Never reads a request.
///
/// It must never sleep in poll(2) on `/dev/fuse` itself: the kernel wakes everything
/// waiting on a connection's input queue for every request it queues, so a watcher
/// there is woken, scheduled and put back to sleep once per request, which took a core
/// from the appliance's worker and doubled a request's round trip (35 against 14-20 µs,
/// measured on a 2-vCPU machine). It checks the descriptor without waiting instead,
/// each time this mount namespace's mount table changes (an unmount, seen at once) and
/// at least every [`DISCONNECT_RECHECK`].
pub fn wait_until_disconnected(session: std::os::fd::BorrowedFd<'_>) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mount_table = std::fs::File::open("/proc/self/mountinfo").ok();
    let timespec = |d: std::time::Duration| Timespec::try_from(d).unwrap_or_default();
    let mut soon = 0;
    loop {
        // A zero timeout only looks: it never joins the connection's wait queue.
        let mut fds = [PollFd::new(&session, PollFlags::empty())];
        match poll(&mut fds, Some(&Timespec::default())) {
            Ok(_) => {
                let r = fds[0].revents();
                if r.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
                    return;
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
        let wait = if soon > 0 {
            soon -= 1;
            DISCONNECT_SOON
        } else {
            DISCONNECT_RECHECK
        };
        match &mount_table {
            // mountinfo polls as PRI|ERR once for each change of the mount table.
            Some(table) => {
                let mut fds = [PollFd::new(table, PollFlags::PRI)];
                if matches!(poll(&mut fds, Some(&timespec(wait))), Ok(n) if n > 0) {
                    soon = DISCONNECT_SOON_CHECKS;
                }
            }
            None => std::thread::sleep(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountpoint_checks_give_actionable_errors() {
        let base = std::env::temp_dir().join(format!("fsva-mp-{}", std::process::id()));
        std::fs::create_dir_all(base.join("full")).unwrap();
        std::fs::write(base.join("full/x"), b"").unwrap();
        std::fs::write(base.join("file"), b"").unwrap();
        std::fs::create_dir_all(base.join("empty")).unwrap();
        assert!(matches!(
            check_mountpoint(&base.join("nope")),
            Err(MountError::Missing(_))
        ));
        assert!(matches!(
            check_mountpoint(&base.join("file")),
            Err(MountError::NotDirectory(_))
        ));
        assert!(matches!(
            check_mountpoint(&base.join("full")),
            Err(MountError::NotEmpty(_))
        ));
        assert!(check_mountpoint(&base.join("empty")).is_ok());
        let msg = check_mountpoint(&base.join("nope"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("mkdir -p"), "{msg}");
        std::fs::remove_dir_all(base).unwrap();
    }
}

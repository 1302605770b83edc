//! The privilege broker: the few operations an appliance needs that take a capability
//! in the initial user namespace, done by the supervisor on the appliance's behalf.
//!
//! An appliance lives in its own user namespace and holds no capability the host
//! honours. Two of its jobs still need one: registering FUSE passthrough backing files
//! (CAP_SYS_ADMIN) and, for a root user's passthrough export, creating character and
//! block device nodes (CAP_MKNOD). It asks over its broker link, one request at a time;
//! this module checks every request against what that appliance may touch — a file of
//! its own export or one of its memfds; a directory inside its export — and does
//! exactly that one thing. It never follows a path the appliance names beyond one
//! component, never reads file data, and never acts on anything outside the export.
//!
//! What it must trust: the broker does not see the FUSE request behind a device node,
//! so the appliance checks that its caller is root. A compromised appliance can
//! therefore make any device node *inside its export* (never outside it); host users
//! who can reach the export directly could open such a node. A root user's passthrough
//! export must not be open to untrusted host users — as for any root file server
//! (virtiofsd running as root makes such nodes itself).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fsva_control::{BrokerReply, BrokerRequest, Link, LinkError};

use crate::backing::{self, Allowed};

/// What one appliance's broker may do.
pub struct BrokerScope {
    /// The session to register backing files on, and which files may be registered.
    pub backing: Option<(OwnedFd, Allowed)>,
    /// The export directory device nodes may be created in (`O_PATH`).
    pub devices_in: Option<OwnedFd>,
    /// Backing files registered right now.
    pub live_backing: Arc<AtomicU64>,
}

/// Starts a broker thread for `scope`; returns the appliance's end of its link.
pub fn start(scope: BrokerScope) -> std::io::Result<Link> {
    let (ours, theirs) = Link::pair().map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("fsva-broker".into())
        .spawn(move || serve(ours, scope))?;
    Ok(theirs)
}

/// Serves one appliance's broker link until it closes.
///
/// Spare backing ids (`OpenSpares`) are not counted as open files until claimed. Those
/// an appliance leaves behind when it dies stay registered until the unmount: some may
/// back files whose claim never came (claims are reported late), and dropping the id
/// of a file a successor serves would break its next open. They are empty memfds, at
/// most a batch or two per appliance.
pub fn serve(link: Link, scope: BrokerScope) {
    let scope = &scope;
    let mut spares = std::collections::HashSet::new();
    let private_umask = scope.devices_in.is_some() && private_fs();
    loop {
        let (request, fds) = match link.recv::<BrokerRequest>() {
            Ok(r) => r,
            Err(LinkError::Closed) => return,
            // The appliance died with a request unread: the link is simply gone.
            Err(LinkError::Io { source, .. })
                if source.kind() == io::ErrorKind::ConnectionReset =>
            {
                return
            }
            Err(e) => {
                tracing::warn!(error = %e, "broker link failed; no more privileged requests");
                return;
            }
        };
        let attached = fds.first().map(|f| f.as_fd());
        let reply = match request {
            BrokerRequest::OpenBacking => open_backing(scope, attached),
            // Spares are memfds: only a mount that registers memfds takes them.
            BrokerRequest::OpenSpares { .. }
                if !matches!(scope.backing, Some((_, Allowed::Memfd))) =>
            {
                refused(libc::EPERM, "this mount takes no spare memfds".into())
            }
            BrokerRequest::OpenSpares { claimed } => {
                for id in claimed {
                    if spares.remove(&id) {
                        scope.live_backing.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let ids: Vec<i32> = fds
                    .iter()
                    .map(|f| match open_backing_file(scope, f.as_fd()) {
                        Ok(id) => {
                            spares.insert(id);
                            id
                        }
                        Err((errno, reason)) => {
                            tracing::debug!(reason, "a spare backing file was refused");
                            -errno
                        }
                    })
                    .collect();
                BrokerReply::SparesOpened { ids }
            }
            BrokerRequest::CloseBacking { id } => {
                let spare = spares.remove(&id);
                close_backing(scope, id, !spare);
                continue;
            }
            BrokerRequest::MakeDevice {
                name,
                mode,
                umask,
                rdev,
                gid,
            } => match (&scope.devices_in, attached, private_umask) {
                (Some(export), Some(dir), true) => {
                    match make_device(export.as_fd(), dir, &name, (mode, umask), rdev, gid) {
                        Ok(()) => BrokerReply::DeviceMade,
                        Err(refused) => refused,
                    }
                }
                (None, _, _) | (_, _, false) => refused(
                    libc::EPERM,
                    "this appliance may not create device nodes".into(),
                ),
                (_, None, _) => refused(libc::EINVAL, "no directory attached".into()),
            },
        };
        if link.send(&reply, &[]).is_err() {
            return;
        }
    }
}

fn refused(errno: i32, reason: String) -> BrokerReply {
    BrokerReply::Refused { errno, reason }
}

fn open_backing(scope: &BrokerScope, file: Option<BorrowedFd<'_>>) -> BrokerReply {
    let Some(file) = file else {
        return refused(libc::EINVAL, "no file attached".into());
    };
    match open_backing_file(scope, file) {
        Ok(id) => {
            scope.live_backing.fetch_add(1, Ordering::Relaxed);
            BrokerReply::BackingOpened { id }
        }
        Err((errno, reason)) => refused(errno, reason),
    }
}

/// Registers `file` if this appliance may register it.
fn open_backing_file(scope: &BrokerScope, file: BorrowedFd<'_>) -> Result<i32, (i32, String)> {
    let Some((session, allowed)) = &scope.backing else {
        return Err((
            libc::EPERM,
            "this mount does not offer backing files".into(),
        ));
    };
    backing::check(file, *allowed).map_err(|reason| (libc::EPERM, reason))?;
    fsva_channel::fusedev::backing_open(session.as_fd(), file).map_err(|e| {
        (
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("the kernel refused the backing file: {e}"),
        )
    })
}

/// Drops a registration (`counted`: one that backs a file); nothing is answered.
fn close_backing(scope: &BrokerScope, id: i32, counted: bool) {
    if let Some((session, _)) = &scope.backing {
        match fsva_channel::fusedev::backing_close(session.as_fd(), id) {
            Ok(()) if counted => {
                // Saturating: a successor's broker closes ids a predecessor's counted,
                // and a spare whose claim died with its appliance was never counted.
                let _ =
                    scope
                        .live_backing
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(n.saturating_sub(1))
                        });
            }
            Ok(()) => {}
            Err(e) => tracing::warn!(id, error = %e, "closing a backing id failed"),
        }
    }
}

/// Gives this thread its own umask, so that each device node is made under its
/// caller's umask without touching the rest of the supervisor.
fn private_fs() -> bool {
    // SAFETY: unshare(CLONE_FS) only detaches this thread's root/cwd/umask from the
    // other threads'; it touches no memory.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "unshare(CLONE_FS) refused: device nodes cannot be brokered");
        return false;
    }
    true
}

/// Creates one device node for a root caller whose group is `gid` and umask `umask`
/// (this thread's fs state is private: see [`private_fs`]), after checking
/// that `dir` is a directory inside `export` and `name` one plain component.
fn make_device(
    export: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &[u8],
    (mode, umask): (u32, u32),
    rdev: u64,
    gid: u32,
) -> Result<(), BrokerReply> {
    let kind = mode & libc::S_IFMT;
    if kind != libc::S_IFCHR && kind != libc::S_IFBLK {
        return Err(refused(
            libc::EINVAL,
            format!("mode {mode:#o} is not a device"),
        ));
    }
    if name.is_empty() || name.len() > 255 || name == b"." || name == b".." || name.contains(&b'/')
    {
        return Err(refused(libc::EINVAL, "not a single name component".into()));
    }
    let cname =
        CString::new(name).map_err(|_| refused(libc::EINVAL, "a name with a NUL".into()))?;
    if let Err(reason) = inside_export(export, dir) {
        return Err(refused(libc::EPERM, reason));
    }
    // The node is created as root with the caller's group, so that the kernel applies
    // set-group-id directory inheritance exactly as for the caller itself.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(umask & 0o777));
    // SAFETY: setfsgid changes only this thread's filesystem group id; it is restored
    // below before anything else runs on this thread.
    let old_gid = unsafe { libc::syscall(libc::SYS_setfsgid, gid) } as u32;
    // SAFETY: `dir` is a live descriptor and `cname` a NUL-terminated single component.
    let rc = unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            cname.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: as above, restoring the id this thread had.
    unsafe { libc::syscall(libc::SYS_setfsgid, old_gid) };
    if rc != 0 {
        return Err(refused(
            err.raw_os_error().unwrap_or(libc::EIO),
            format!("mknod: {err}"),
        ));
    }
    Ok(())
}

/// Whether `dir` is a directory at or below `export` (walking `..` upwards, on the
/// export's device).
fn inside_export(export: BorrowedFd<'_>, dir: BorrowedFd<'_>) -> Result<(), String> {
    use rustix::fs::{openat, statat, AtFlags, Mode, OFlags};
    let root = rustix::fs::fstat(export).map_err(|e| format!("stat of the export: {e}"))?;
    let st = rustix::fs::fstat(dir).map_err(|e| format!("stat of the directory: {e}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err("not a directory".into());
    }
    let mut current: Option<OwnedFd> = None;
    let mut here = st;
    for _ in 0..4096 {
        if here.st_dev != root.st_dev {
            return Err("a directory on another file system".into());
        }
        if here.st_ino == root.st_ino {
            return Ok(());
        }
        let from = current.as_ref().map(|f| f.as_fd()).unwrap_or(dir);
        let parent = openat(
            from,
            "..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("walking up: {e}"))?;
        let up = statat(&parent, "", AtFlags::EMPTY_PATH).map_err(|e| format!("stat: {e}"))?;
        if up.st_ino == here.st_ino && up.st_dev == here.st_dev {
            return Err("a directory outside the appliance's export".into());
        }
        here = up;
        current = Some(parent);
    }
    Err("a directory nested too deep".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{open, Mode, OFlags};

    fn opath(p: &std::path::Path) -> OwnedFd {
        open(
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    fn errno_of(r: Result<(), BrokerReply>) -> i32 {
        match r {
            Err(BrokerReply::Refused { errno, .. }) => errno,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fsva-broker-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("export/sub")).unwrap();
        std::fs::create_dir_all(d.join("outside")).unwrap();
        d
    }

    #[test]
    fn devices_are_made_only_inside_the_export_and_only_as_devices() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIP: creating device nodes needs root");
            return;
        }
        let d = scratch("make");
        let export = opath(&d.join("export"));
        let sub = opath(&d.join("export/sub"));
        let outside = opath(&d.join("outside"));
        std::thread::spawn(move || {
            assert!(private_fs());
            let chr = libc::S_IFCHR | 0o666;
            make_device(export.as_fd(), sub.as_fd(), b"null", (chr, 0o022), 0x103, 7).unwrap();
            assert_eq!(
                errno_of(make_device(
                    export.as_fd(),
                    outside.as_fd(),
                    b"x",
                    (chr, 0),
                    0x103,
                    0
                )),
                libc::EPERM,
                "a directory outside the export"
            );
            for bad in [&b"a/b"[..], b"..", b".", b""] {
                assert_eq!(
                    errno_of(make_device(
                        export.as_fd(),
                        sub.as_fd(),
                        bad,
                        (chr, 0),
                        0x103,
                        0
                    )),
                    libc::EINVAL,
                    "name {bad:?}"
                );
            }
            let reg = libc::S_IFREG | 0o644;
            assert_eq!(
                errno_of(make_device(
                    export.as_fd(),
                    sub.as_fd(),
                    b"f",
                    (reg, 0),
                    0,
                    0
                )),
                libc::EINVAL,
                "a regular file is not a device"
            );
            assert_eq!(
                errno_of(make_device(
                    export.as_fd(),
                    sub.as_fd(),
                    b"null",
                    (chr, 0),
                    0x103,
                    0
                )),
                libc::EEXIST
            );
            // SAFETY: an invalid id changes nothing and returns the current fsgid.
            let fsgid = unsafe { libc::syscall(libc::SYS_setfsgid, u32::MAX) };
            assert_eq!(fsgid, 0, "the thread's group is restored");
        })
        .join()
        .unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let md = std::fs::symlink_metadata(d.join("export/sub/null")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(
            (md.mode() & 0o7777, md.gid(), md.rdev()),
            (0o644, 7, 0x103),
            "umask and group applied"
        );
        assert!(!d.join("outside/x").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

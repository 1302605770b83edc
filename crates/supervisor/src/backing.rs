//! Registering FUSE passthrough backing files on an appliance's behalf.
//!
//! `FUSE_DEV_IOC_BACKING_OPEN` needs CAP_SYS_ADMIN in the initial user namespace, which
//! an appliance never holds; it sends the file it opened over its backing link instead,
//! and this module checks that the file is one the appliance may hand the kernel — a
//! regular file of its own export, or one of its memfds — before registering it. It
//! never registers anything else and never reads the file.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fsva_control::{BackingReply, BackingRequest, Link, LinkError};

/// What an appliance may register.
#[derive(Debug, Clone, Copy)]
pub enum Allowed {
    /// Regular files on this device (the export's file system).
    ExportDevice(u64),
    /// Memfds (the `mem` backend's file contents).
    Memfd,
}

/// Serves one appliance's backing link until it closes. `live` counts registrations.
pub fn serve(link: Link, session: OwnedFd, allowed: Allowed, live: Arc<AtomicU64>) {
    loop {
        let (request, fds) = match link.recv::<BackingRequest>() {
            Ok(r) => r,
            Err(LinkError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "backing link failed; no more passthrough registrations");
                return;
            }
        };
        let reply = match request {
            BackingRequest::Open => match fds.first() {
                Some(file) => match check(file.as_fd(), allowed) {
                    Err(reason) => BackingReply::Refused {
                        errno: libc::EPERM,
                        reason,
                    },
                    Ok(()) => {
                        match fsva_channel::fusedev::backing_open(session.as_fd(), file.as_fd()) {
                            Ok(id) => {
                                live.fetch_add(1, Ordering::Relaxed);
                                BackingReply::Opened { id }
                            }
                            Err(e) => BackingReply::Refused {
                                errno: e.raw_os_error().unwrap_or(libc::EIO),
                                reason: format!("the kernel refused the backing file: {e}"),
                            },
                        }
                    }
                },
                None => BackingReply::Refused {
                    errno: libc::EINVAL,
                    reason: "no file attached".into(),
                },
            },
            BackingRequest::Close { id } => {
                match fsva_channel::fusedev::backing_close(session.as_fd(), id) {
                    Ok(()) => {
                        live.fetch_sub(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(id, error = %e, "closing a backing id failed"),
                }
                BackingReply::Closed
            }
        };
        if link.send(&reply, &[]).is_err() {
            return;
        }
    }
}

fn check(file: BorrowedFd<'_>, allowed: Allowed) -> Result<(), String> {
    let st = rustix::fs::fstat(file).map_err(|e| format!("fstat: {e}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err("not a regular file".into());
    }
    // The kernel writes backing files with our credentials, which would keep set-id
    // bits a caller's write must clear: such files stay on the appliance path.
    if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
        return Err("a set-id file".into());
    }
    match allowed {
        Allowed::ExportDevice(dev) if st.st_dev == dev => Ok(()),
        Allowed::ExportDevice(_) => Err("not a file of the appliance's export".into()),
        Allowed::Memfd => {
            let target = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(|e| format!("inspecting the file: {e}"))?;
            if target.to_string_lossy().starts_with("/memfd:") {
                Ok(())
            } else {
                Err("not a memfd of the mem backend".into())
            }
        }
    }
}

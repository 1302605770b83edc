//! Which files an appliance may register as FUSE passthrough backing files.
//!
//! `FUSE_DEV_IOC_BACKING_OPEN` needs CAP_SYS_ADMIN in the initial user namespace, which
//! an appliance never holds; it sends the file it opened over its broker link instead
//! (see [`crate::broker`]), and this module decides whether the file is one the
//! appliance may hand the kernel — a regular file of its own export, or one of its
//! memfds. It never registers anything itself and never reads the file.

use std::os::fd::{AsRawFd, BorrowedFd};

/// What an appliance may register.
#[derive(Debug, Clone, Copy)]
pub enum Allowed {
    /// Regular files on this device (the export's file system).
    ExportDevice(u64),
    /// Memfds (the `mem` backend's file contents).
    Memfd,
}

/// Whether `file` may be registered for an appliance allowed `allowed`; the reason if not.
pub(crate) fn check(file: BorrowedFd<'_>, allowed: Allowed) -> Result<(), String> {
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

//! What a passthrough backend is built from, and what can go wrong building it.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Creates device nodes for the backend when its own credentials cannot: an appliance
/// in a user namespace holds CAP_MKNOD only there, and the host's file system wants it
/// in the initial namespace. The appliance's supervisor implements this.
pub trait DeviceNodes: Send + Sync {
    /// Creates `name` in `dir` as `mknodat` would for a root caller whose group is
    /// `gid` and umask `umask`.
    fn make_device(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u64,
        gid: u32,
    ) -> io::Result<()>;
}

/// Configuration of [`crate::PassthroughFs`].
pub struct PassthroughConfig {
    /// `O_PATH | O_DIRECTORY` descriptor of the export (inside the sandbox: "/").
    pub root: OwnedFd,
    /// `O_PATH` descriptor of /proc/self/fd, opened before the sandbox pivots; `None`
    /// opens "/proc/self/fd" at construction.
    pub proc_self_fd: Option<OwnedFd>,
    /// How long the kernel may trust a name → node binding.
    pub entry_ttl: Duration,
    /// How long the kernel may trust attributes.
    pub attr_ttl: Duration,
    /// Who makes device nodes when this process cannot; `None` makes them itself.
    pub device_nodes: Option<Arc<dyn DeviceNodes>>,
    /// The export is a local file system only this backend changes (a VM appliance's
    /// disk): closing a file then needs no FLUSH round trip (nothing acts on close).
    pub exclusive_local: bool,
    /// FUSE's no-open mode: OPEN and OPENDIR answer ENOSYS, so the kernel sends no
    /// OPEN, RELEASE, OPENDIR or RELEASEDIR again, keeps files' pages and directories'
    /// listings cached across opens, and sends reads, writes and listings with `fh` 0:
    /// a file's are served through one descriptor per node (see [`crate::implicit`]),
    /// a directory's through a stream opened for each request. Saves a round trip per open where one is dear (a VM
    /// appliance under emulation). Only for an export nothing but this backend changes,
    /// and never with FUSE passthrough, which needs OPEN to name a backing file.
    pub no_open: bool,
    /// After a READ, drop only the pages it brought in (see [`crate::read_trail`]):
    /// pages already cached, such as those written through the backend and perhaps not
    /// yet written back, stay. For an export whose page cache is bounded by other means
    /// (a VM appliance: its memory and the cache budget's watcher), where dropping a
    /// dirty page would write it back inside the READ.
    pub drop_only_read_in: bool,
}

impl std::fmt::Debug for PassthroughConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassthroughConfig")
            .field("root", &self.root)
            .field("proc_self_fd", &self.proc_self_fd)
            .field("entry_ttl", &self.entry_ttl)
            .field("attr_ttl", &self.attr_ttl)
            .field("device_nodes", &self.device_nodes.is_some())
            .field("exclusive_local", &self.exclusive_local)
            .field("no_open", &self.no_open)
            .field("drop_only_read_in", &self.drop_only_read_in)
            .finish()
    }
}

impl PassthroughConfig {
    /// A configuration for `root` with the default timeouts (1 s) and /proc/self/fd
    /// opened at construction.
    pub fn new(root: OwnedFd) -> Self {
        Self {
            root,
            proc_self_fd: None,
            entry_ttl: Duration::from_secs(1),
            attr_ttl: Duration::from_secs(1),
            device_nodes: None,
            exclusive_local: false,
            no_open: false,
            drop_only_read_in: false,
        }
    }

    /// Opens `dir` as the export (`O_PATH | O_DIRECTORY`).
    pub fn for_path(dir: &Path) -> Result<Self, PassthroughError> {
        let root = open_dir_path(dir).map_err(|source| PassthroughError::OpenRoot {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Self::new(root))
    }
}

/// Opens `path` with `O_PATH | O_DIRECTORY | O_CLOEXEC`.
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    crate::sys::openat(
        // SAFETY: AT_FDCWD is a valid "descriptor" for *at calls.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) },
        &c,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
}

/// Why a passthrough backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("cannot open the export directory {path}: {source}; check that it exists and is a directory the appliance can reach")]
    OpenRoot { path: String, source: io::Error },
    #[error("cannot stat the export root descriptor: {0}; pass an O_PATH|O_DIRECTORY descriptor of an existing directory")]
    StatRoot(io::Error),
    #[error("the export root is not a directory (mode {mode:#o}); pass a directory")]
    RootNotDirectory { mode: u32 },
    #[error("cannot open /proc/self/fd: {0}; mount procfs in the appliance, or open /proc/self/fd (O_PATH) before the sandbox pivots and pass it as proc_self_fd")]
    ProcSelfFd(io::Error),
    #[error("/proc/self/fd does not resolve this process's descriptors ({0}); pass a descriptor of /proc/self/fd opened in this process")]
    ProcSelfFdBroken(io::Error),
    #[error("no-open mode needs an export only this backend changes (set exclusive_local): the kernel keeps files' pages across opens without asking")]
    NoOpenShared,
}

//! The contract between the runtime and a backend: the [`Filesystem`] trait.
//!
//! Each method is one FUSE operation with decoded, typed arguments; it returns a typed
//! reply or an [`Errno`]. Methods a backend does not implement answer `ENOSYS`, which
//! the kernel remembers and stops sending. This module holds types only; it must never
//! grow policy (caching, credentials, permissions) that belongs to a backend.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use fsva_protocol::abi;
use fsva_protocol::reply::DirentPacker;

/// A positive errno value (`libc::ENOENT`, ...), as a backend's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);

    /// The errno of the calling thread's last failed system call.
    pub fn last() -> Errno {
        Errno::from(std::io::Error::last_os_error())
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

pub type Result<T> = std::result::Result<T, Errno>;

/// Who asked: the caller's credentials as the kernel reported them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    pub unique: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The caller's supplementary group that owns the parent directory, sent with
    /// creating requests when `CREATE_SUPP_GROUP` was negotiated.
    pub supp_group: Option<u32>,
}

/// A looked-up (or newly created) object: the reply to LOOKUP, MKDIR, CREATE, ...
/// Each returned `Entry` counts as one lookup the kernel will later FORGET.
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    pub ino: u64,
    pub generation: u64,
    pub attr: abi::Attr,
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
}

impl Entry {
    pub fn to_abi(&self) -> abi::EntryOut {
        abi::EntryOut {
            nodeid: self.ino,
            generation: self.generation,
            entry_valid: self.entry_ttl.as_secs(),
            attr_valid: self.attr_ttl.as_secs(),
            entry_valid_nsec: self.entry_ttl.subsec_nanos(),
            attr_valid_nsec: self.attr_ttl.subsec_nanos(),
            attr: self.attr,
        }
    }

    /// A negative entry: "no such name", cached by the kernel for `ttl`.
    pub fn negative(ttl: Duration) -> Entry {
        Entry {
            entry_ttl: ttl,
            ..Default::default()
        }
    }
}

/// An opened file or directory.
#[derive(Debug, Default)]
pub struct Opened {
    pub fh: u64,
    /// `abi::fopen` bits (KEEP_CACHE, DIRECT_IO, CACHE_DIR, ...).
    pub open_flags: u32,
    /// A file whose page cache the kernel may use directly (FUSE passthrough). The
    /// runtime registers it when passthrough was negotiated; otherwise it is dropped.
    pub backing: Option<OwnedFd>,
}

/// The reply of a request that had already taken effect when its appliance died and
/// the kernel resent it to the successor: what its first execution returned, rebuilt
/// from the recovery journal (see [`Filesystem::completed`]).
#[derive(Debug)]
pub enum Completed {
    /// LOOKUP-like replies: MKDIR, MKNOD, SYMLINK, LINK (the lookup is already counted).
    Entry(Entry),
    /// SETATTR.
    Attr(abi::Attr, Duration),
    /// OPEN, OPENDIR.
    Opened(Opened),
    /// CREATE, TMPFILE.
    Created(Entry, Opened),
    /// WRITE.
    Written(u32),
    /// COPY_FILE_RANGE.
    Copied(u64),
    /// Everything whose success has an empty reply (UNLINK, RENAME, RELEASE, ...).
    Done,
}

/// Reply of GETXATTR / LISTXATTR: the size when the caller asked with size 0, the data otherwise.
#[derive(Debug)]
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

/// The INIT capabilities a POSIX backend asks for when the kernel checks permissions
/// (`default_permissions`) and keeps locks, as fsva's backends do:
/// - READDIRPLUS (adaptive), parallel directory operations, asynchronous reads;
/// - export support (name_to_handle_at on the mount), cached symlinks, and dropping
///   cached pages when a file's mtime changes underneath;
/// - POSIX ACLs enforced by the kernel, with DONT_MASK: the backend applies the umask
///   (or a default ACL's inheritance) itself, from the umask each request carries;
/// - the caller's supplementary group with creating requests (setgid directories);
/// - HANDLE_KILLPRIV_V2: set-id bits are cleared by the backend for the caller the
///   kernel names ([`mode_after_kill_suidgid`]); without it the kernel keeps S_ISGID on
///   a file without group-exec that a non-member writes to, where ext4 clears it.
///
/// Not asked: POSIX_LOCKS/FLOCK_LOCKS (locks stay in the kernel), WRITEBACK_CACHE and
/// ATOMIC_O_TRUNC.
pub const POSIX_BACKEND_FLAGS: u64 = {
    use fsva_protocol::abi::init_flags as f;
    f::ASYNC_READ
        | f::DO_READDIRPLUS
        | f::READDIRPLUS_AUTO
        | f::PARALLEL_DIROPS
        | f::EXPORT_SUPPORT
        | f::POSIX_ACL
        | f::DONT_MASK
        | f::CREATE_SUPP_GROUP
        | f::CACHE_SYMLINKS
        | f::AUTO_INVAL_DATA
        | f::HANDLE_KILLPRIV_V2
};

/// What a backend asks for at INIT (the runtime intersects it with what the kernel offers).
#[derive(Debug, Clone, Copy)]
pub struct InitRequest {
    /// `abi::init_flags` bits the backend can serve correctly.
    pub flags: u64,
    /// Largest WRITE payload the backend accepts.
    pub max_write: u32,
}

/// Collects directory entries into a READDIR or READDIRPLUS reply.
pub struct DirSink<'b> {
    packer: DirentPacker<'b>,
    plus: bool,
}

impl<'b> DirSink<'b> {
    pub fn new(out: &'b mut Vec<u8>, limit: usize, plus: bool) -> Self {
        Self {
            packer: DirentPacker::new(out, limit),
            plus,
        }
    }

    /// Whether the kernel asked for READDIRPLUS: the backend must then call
    /// [`DirSink::add_plus`], which counts as a lookup of the entry when it returns true.
    pub fn is_plus(&self) -> bool {
        self.plus
    }

    /// Adds a plain entry (`typ` is the `DT_*` value, `next` the offset of the entry
    /// after this one). Returns false when the reply is full.
    pub fn add(&mut self, ino: u64, next: u64, typ: u32, name: &OsStr) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.packer.push(ino, next, typ, name.as_bytes())
    }

    /// Adds an entry with its attributes. `entry.ino == 0` means "no lookup done"
    /// (for `.` and `..`): the kernel then only lists the name.
    pub fn add_plus(&mut self, entry: &Entry, next: u64, typ: u32, name: &OsStr) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.packer
            .push_plus(&entry.to_abi(), next, typ, name.as_bytes())
    }

    /// Whether an entry with this name would still fit (so the backend does not take a
    /// lookup reference it cannot hand over).
    pub fn fits(&self, name: &OsStr) -> bool {
        let extra = if self.plus {
            core::mem::size_of::<abi::EntryOut>()
        } else {
            0
        };
        self.packer.room() >= fsva_protocol::reply::dirent_size(name.len()) + extra
    }

    pub fn is_empty(&self) -> bool {
        self.packer.is_empty()
    }
}

/// A file system served by an appliance. All methods may be called concurrently from
/// several worker threads.
#[allow(unused_variables)]
pub trait Filesystem: Send + Sync {
    /// Called once at INIT with what the kernel offers; returns what the backend wants.
    fn init(&self, kernel_flags: u64) -> InitRequest;

    /// The mount is going away: make everything durable.
    fn destroy(&self) {}

    /// The user side's cache budget for this appliance changed: the most file data the
    /// backend may keep in memory (for `mem`, all it may hold). Memory the backend does
    /// not account itself is bounded by the appliance's cgroup.
    fn set_cache_budget(&self, bytes: u64) {
        let _ = bytes;
    }

    /// Whether two names in directory `ino` are the same name only when their bytes
    /// are (no case folding, no Unicode normalisation), so that a relay that sees
    /// every name enter and leave it may say which names it lacks. False when unsure.
    fn names_exact(&self, ino: u64) -> bool {
        let _ = ino;
        false
    }

    /// The node id the kernel knows the host object `(dev, ino)` by, if it knows it:
    /// how the supervisor's watch of a shared export turns a change made beside the
    /// mount into an invalidation. Only a backend that serves host objects has one.
    fn node_of_host_object(&self, dev: u64, ino: u64) -> Option<u64> {
        let _ = (dev, ino);
        None
    }

    /// Memfds registered as backing files ahead, for new files' contents (see
    /// [`crate::spares`]); only a backend whose files are memfds takes them.
    fn take_memfds_from(&self, source: std::sync::Arc<dyn crate::MemfdSource>) {
        let _ = source;
    }

    /// A snapshot of everything the backend holds, for a successor appliance to
    /// restore (live restart). Called with every worker paused.
    fn checkpoint(
        &self,
    ) -> std::result::Result<crate::state::BackendState, crate::state::StateError> {
        Err(crate::state::StateError::Unsupported(
            "only mem can be restarted live so far".into(),
        ))
    }

    /// A checkpoint taken while serving, for crash recovery: the backend takes the lock
    /// that orders its journal records, snapshots, and calls `rotate` under that lock
    /// (which marks the journal boundary the snapshot covers and returns it). Returns
    /// the snapshot and the boundary. Descriptors are not part of it: they are kept by
    /// the supervisor already ([`crate::Keeper`]).
    fn journal_checkpoint(
        &self,
        rotate: &mut dyn FnMut() -> u64,
    ) -> std::result::Result<(Vec<u8>, u64), crate::state::StateError> {
        let _ = rotate;
        Err(crate::state::StateError::Unsupported(
            "this backend keeps no recovery journal".into(),
        ))
    }

    /// Asked for every request the kernel resent after the appliance before this one
    /// died (`unique` without the resend bit): `Some` if the request had already taken
    /// effect, with what it returned then; `None` to execute it now. A backend
    /// without a journal executes everything again.
    fn completed(&self, unique: u64) -> Option<Completed> {
        let _ = unique;
        None
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn forget(&self, ino: u64, nlookup: u64) {}
    /// `(attributes, ttl)`; `fh` is set when the caller has the file open (fstat).
    fn getattr(&self, ctx: &Context, ino: u64, fh: Option<u64>) -> Result<(abi::Attr, Duration)> {
        Err(Errno::ENOSYS)
    }
    fn setattr(
        &self,
        ctx: &Context,
        ino: u64,
        set: &abi::SetattrIn,
    ) -> Result<(abi::Attr, Duration)> {
        Err(Errno::ENOSYS)
    }
    fn readlink(&self, ctx: &Context, ino: u64) -> Result<Vec<u8>> {
        Err(Errno::ENOSYS)
    }
    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn symlink(&self, ctx: &Context, parent: u64, name: &OsStr, target: &[u8]) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn unlink(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn rmdir(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    /// RENAME and RENAME2; `flags` holds `RENAME_NOREPLACE` / `RENAME_EXCHANGE` / `RENAME_WHITEOUT`.
    fn rename(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn link(&self, ctx: &Context, ino: u64, newparent: u64, newname: &OsStr) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    /// `flags` are the open(2) flags (without O_CREAT/O_EXCL/O_NOCTTY);
    /// `kill_suidgid` asks to clear set-id bits (HANDLE_KILLPRIV_V2 with O_TRUNC).
    fn open(&self, ctx: &Context, ino: u64, flags: u32, kill_suidgid: bool) -> Result<Opened> {
        Err(Errno::ENOSYS)
    }
    /// Appends up to `size` bytes read at `offset` to `out`. `flags` are the reading
    /// file's open(2) flags as the kernel has them now (`fuse_read_in.flags`).
    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        flags: u32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    /// `write_flags` are `abi::flags::WRITE_*`; returns the bytes written.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
        flags: u32,
    ) -> Result<u32> {
        Err(Errno::ENOSYS)
    }
    fn flush(&self, ctx: &Context, ino: u64, fh: u64, lock_owner: u64) -> Result<()> {
        Ok(())
    }
    fn release(&self, ctx: &Context, ino: u64, fh: u64, flags: u32) -> Result<()> {
        Ok(())
    }
    fn fsync(&self, ctx: &Context, ino: u64, fh: u64, datasync: bool) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn opendir(&self, ctx: &Context, ino: u64, flags: u32) -> Result<Opened> {
        Err(Errno::ENOSYS)
    }
    /// Fills `sink` with entries that come after the position `offset` (0: the start).
    fn readdir(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirSink,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn releasedir(&self, ctx: &Context, ino: u64, fh: u64) -> Result<()> {
        Ok(())
    }
    fn fsyncdir(&self, ctx: &Context, ino: u64, fh: u64, datasync: bool) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn statfs(&self, ctx: &Context, ino: u64) -> Result<abi::Kstatfs> {
        Err(Errno::ENOSYS)
    }
    fn setxattr(
        &self,
        ctx: &Context,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: u32,
        setxattr_flags: u32,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn getxattr(&self, ctx: &Context, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        Err(Errno::ENOSYS)
    }
    fn listxattr(&self, ctx: &Context, ino: u64, size: u32) -> Result<Xattr> {
        Err(Errno::ENOSYS)
    }
    fn removexattr(&self, ctx: &Context, ino: u64, name: &OsStr) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn access(&self, ctx: &Context, ino: u64, mask: u32) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    /// CREATE: `flags` are the open(2) flags including O_CREAT (and O_EXCL).
    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        Err(Errno::ENOSYS)
    }
    /// O_TMPFILE: an unnamed file in `parent`.
    fn tmpfile(
        &self,
        ctx: &Context,
        parent: u64,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        Err(Errno::ENOSYS)
    }
    fn fallocate(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn lseek(&self, ctx: &Context, ino: u64, fh: u64, offset: u64, whence: u32) -> Result<u64> {
        Err(Errno::ENOSYS)
    }
    #[allow(clippy::too_many_arguments)]
    fn copy_file_range(
        &self,
        ctx: &Context,
        ino_in: u64,
        fh_in: u64,
        off_in: u64,
        ino_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u64,
    ) -> Result<u64> {
        Err(Errno::ENOSYS)
    }
    fn statx(
        &self,
        ctx: &Context,
        ino: u64,
        fh: Option<u64>,
        flags: u32,
        mask: u32,
    ) -> Result<(abi::Statx, Duration)> {
        Err(Errno::ENOSYS)
    }
    fn syncfs(&self, ctx: &Context) -> Result<()> {
        Ok(())
    }
}

/// The mode a file keeps when the kernel asks to clear set-id bits for the caller `ctx`
/// (`HANDLE_KILLPRIV_V2`: `WRITE_KILL_SUIDGID`, `FATTR_KILL_SUIDGID`, `OPEN_KILL_SUIDGID`),
/// following Linux's `setattr_should_drop_suidgid`: S_ISUID always goes; S_ISGID goes
/// when group-exec is set or when the caller is neither in the file's group nor root.
/// Group membership is known as far as the kernel tells: the fsgid and the
/// supplementary group sent with `CREATE_SUPP_GROUP`.
pub fn mode_after_kill_suidgid(mode: u32, file_gid: u32, ctx: &Context) -> u32 {
    let in_group = ctx.uid == 0 || ctx.gid == file_gid || ctx.supp_group == Some(file_gid);
    let mut m = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 || !in_group {
        m &= !libc::S_ISGID;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::{mode_after_kill_suidgid, Context};

    #[test]
    fn kill_suidgid_follows_the_kernel_rules() {
        let member = Context {
            uid: 1000,
            gid: 50,
            ..Default::default()
        };
        let outsider = Context {
            uid: 1000,
            gid: 60,
            ..Default::default()
        };
        let root = Context::default();
        let kill = |mode, ctx: &Context| mode_after_kill_suidgid(mode, 50, ctx);
        assert_eq!(kill(0o4755, &member), 0o755);
        assert_eq!(kill(0o6775, &member), 0o775, "group-exec: both go");
        assert_eq!(
            kill(0o2767, &member),
            0o2767,
            "no group-exec, member: sgid stays"
        );
        assert_eq!(
            kill(0o2767, &outsider),
            0o767,
            "no group-exec, outsider: sgid goes"
        );
        assert_eq!(
            kill(0o6745, &root),
            0o2745,
            "root keeps sgid without group-exec"
        );
    }
}

//! `passthrough:DIR` — a file-system-agnostic backend that serves whatever a directory
//! holds through system calls, so any file system the appliance's kernel can mount
//! works unmodified. Modelled on virtiofsd's passthrough and libfuse's passthrough_hp.
//!
//! - [`inode`]: node ids → `O_PATH` descriptors, deduplicated by host identity;
//! - [`handle`]: open file and directory handles; [`implicit`]: the one descriptor per
//!   node that serves files opened without OPEN (FUSE's no-open mode);
//! - [`snapshot`]: the tables as a versioned snapshot for a live restart, and
//!   `restore`: the tables rebuilt from one (lent descriptors taken over, objects
//!   without one found again by their path hints, the rest stale);
//! - [`journal`]: the tables' changes, intents and outcomes in the recovery journal,
//!   and replaying them; `recovery`: a journaled backend, rebuilt after a crash, and
//!   answering the requests the kernel resends exactly once;
//! - [`creds`]: per-thread caller credentials and umask for creating operations;
//! - [`dir`]: `getdents64` listing with the host's own cookies;
//! - [`xattr`]: extended attributes on `O_PATH` descriptors;
//! - [`attr`]: host attributes → FUSE structures; [`sys`]: raw system call wrappers;
//! - [`config`]: construction and its errors.
//!
//! The mount uses `default_permissions`: the kernel checks permissions from the
//! attributes returned here, and the appliance (uid 0 of its namespace, with the file
//! capabilities) may read and write anything in the export. Only creating operations
//! run as the caller, so that new objects get the right owner.

pub mod attr;
pub mod config;
pub mod creds;
pub mod dir;
pub mod handle;
pub mod implicit;
pub mod inode;
pub mod journal;
pub mod read_trail;
mod recovery;
mod restore;
pub mod snapshot;
pub mod sys;
pub mod xattr;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use fsva_appliance::filesystem::mode_after_kill_suidgid;
use fsva_appliance::filesystem::POSIX_BACKEND_FLAGS;
use fsva_appliance::{
    Context, DirSink, Entry, Errno, Filesystem, InitRequest, Opened, Result, Xattr,
};
use fsva_protocol::abi::{self, fattr, init_flags as f, ROOT_ID};

pub use config::{open_dir_path, DeviceNodes, PassthroughConfig, PassthroughError};
use creds::{Caller, CredGuard};
use handle::{Handle, HandleTable};
use implicit::{ImplicitOpens, NO_HANDLE};
use inode::{InodeKey, Node, NodeTable};
use journal::{IntentV1, OutcomeV1, ProbeV1};
pub use recovery::{Preloaded, Recovery};
use sys::{cname, cvt, fd_name, EMPTY};

/// Flags never passed on when reopening a node for I/O: creation is done, the magic
/// link must be followed, and `O_DIRECT` would demand aligned buffers we do not have.
const STRIP_OPEN_FLAGS: i32 =
    libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW | libc::O_DIRECT;

/// Drops the host's cached pages of `range` of `fd` (the client holds them).
fn drop_cached(fd: BorrowedFd<'_>, (start, end): read_trail::Range) {
    // SAFETY: posix_fadvise only takes integers and a descriptor we own.
    unsafe {
        libc::posix_fadvise(
            fd.as_raw_fd(),
            start as libc::off_t,
            (end - start) as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
}

/// Opens the object behind `fd` anew, through its magic link in `proc_self_fd`.
fn reopen_via(proc_self_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    sys::openat(
        proc_self_fd,
        &fd_name(fd.as_raw_fd()),
        flags & !STRIP_OPEN_FLAGS,
        0,
    )
}

/// Attribute mask asked of `statx` for nodes.
const STATX_MASK: u32 = libc::STATX_BASIC_STATS | libc::STATX_MNT_ID;

/// The passthrough backend.
pub struct PassthroughFs {
    nodes: NodeTable,
    handles: HandleTable,
    proc_self_fd: OwnedFd,
    entry_ttl: Duration,
    attr_ttl: Duration,
    /// Supplementary groups of the appliance, restored after a creating operation.
    base_groups: Vec<libc::gid_t>,
    /// Who makes device nodes when this process cannot.
    device_nodes: Option<std::sync::Arc<dyn DeviceNodes>>,
    /// See [`PassthroughConfig::exclusive_local`].
    exclusive_local: bool,
    /// With [`PassthroughConfig::no_open`]: the descriptors serving files opened without
    /// OPEN.
    implicit: Option<ImplicitOpens>,
    /// With a recovery journal: what records changes and answers resent requests.
    recovery: Option<recovery::Journaled>,
    /// See [`PassthroughConfig::drop_only_read_in`]; cleared when the export's file
    /// system cannot tell what is cached (no reads without waiting).
    drop_only_read_in: std::sync::atomic::AtomicBool,
}

/// A request's unique as journal records name it (without the kernel's resend bit).
fn base_unique(ctx: &Context) -> u64 {
    ctx.unique & !abi::UNIQUE_RESEND
}

/// Local file systems whose files need nothing on close(2) (no `->flush`), so a FUSE
/// FLUSH on them would only be a wasted round trip. Checked per opened file: an export
/// may hold mounts of other types (NFS, FUSE) below its root, which keep FLUSH.
fn nothing_on_close(f_type: libc::__fsword_t) -> bool {
    matches!(
        f_type,
        fs_magic::EXT4 | fs_magic::XFS | fs_magic::BTRFS | fs_magic::TMPFS
    )
}

/// Local file systems whose names are plain bytes unless a directory has the casefold
/// flag (ext4 and tmpfs can fold case per directory; XFS can for a whole file system,
/// which its statfs does not say, so it is not here).
fn names_are_bytes_unless_casefolded(f_type: libc::__fsword_t) -> bool {
    matches!(f_type, fs_magic::EXT4 | fs_magic::BTRFS | fs_magic::TMPFS)
}

/// `statfs` type numbers of the local file systems named above.
mod fs_magic {
    pub const EXT4: libc::__fsword_t = 0xEF53; // also ext2 and ext3
    pub const XFS: libc::__fsword_t = 0x5846_5342;
    pub const BTRFS: libc::__fsword_t = 0x9123_683E;
    pub const TMPFS: libc::__fsword_t = 0x0102_1994;
}

fn key_of(stx: &libc::statx) -> InodeKey {
    InodeKey {
        dev: attr::dev_of(stx),
        ino: stx.stx_ino,
        mnt_id: if stx.stx_mask & libc::STATX_MNT_ID != 0 {
            stx.stx_mnt_id
        } else {
            0
        },
    }
}

fn kind_of(stx: &libc::statx) -> u32 {
    u32::from(stx.stx_mode) & libc::S_IFMT
}

/// What the configuration says of who else changes the export, and of what bounds
/// its page cache.
#[derive(Clone, Copy)]
struct Locality {
    exclusive_local: bool,
    no_open: bool,
    drop_only_read_in: bool,
}

impl Locality {
    fn of(config: &PassthroughConfig) -> Self {
        Self {
            exclusive_local: config.exclusive_local,
            no_open: config.no_open,
            drop_only_read_in: config.drop_only_read_in,
        }
    }
}

/// What construction checks before any table exists: /proc/self/fd, the root's identity.
struct Setup {
    config: PassthroughConfig,
    locality: Locality,
    proc_self_fd: OwnedFd,
    root_key: InodeKey,
}

impl Setup {
    fn new(mut config: PassthroughConfig) -> std::result::Result<Self, PassthroughError> {
        if config.no_open && !config.exclusive_local {
            return Err(PassthroughError::NoOpenShared);
        }
        let proc_self_fd = match config.proc_self_fd.take() {
            Some(fd) => fd,
            None => open_dir_path(std::path::Path::new("/proc/self/fd"))
                .map_err(PassthroughError::ProcSelfFd)?,
        };
        let stx = sys::statx_fd(config.root.as_fd(), STATX_MASK, 0)
            .map_err(PassthroughError::StatRoot)?;
        if kind_of(&stx) != libc::S_IFDIR {
            return Err(PassthroughError::RootNotDirectory {
                mode: u32::from(stx.stx_mode),
            });
        }
        // Check that /proc/self/fd really is ours: the root must resolve through it.
        let probe = sys::openat(
            proc_self_fd.as_fd(),
            &fd_name(config.root.as_raw_fd()),
            libc::O_PATH,
            0,
        )
        .map_err(PassthroughError::ProcSelfFdBroken)?;
        let pstx = sys::statx_fd(probe.as_fd(), STATX_MASK, 0)
            .map_err(PassthroughError::ProcSelfFdBroken)?;
        if key_of(&pstx) != key_of(&stx) {
            return Err(PassthroughError::ProcSelfFdBroken(io::Error::other(
                "the export root seen through it is a different object",
            )));
        }
        Ok(Setup {
            locality: Locality::of(&config),
            config,
            proc_self_fd,
            root_key: key_of(&stx),
        })
    }
}

impl PassthroughFs {
    pub fn new(config: PassthroughConfig) -> std::result::Result<Self, PassthroughError> {
        let setup = Setup::new(config)?;
        let root_key = setup.root_key;
        let nodes = NodeTable::new(setup.config.root, root_key);
        Ok(Self::with_tables(
            setup.config.entry_ttl,
            setup.config.attr_ttl,
            setup.config.device_nodes,
            setup.locality,
            setup.proc_self_fd,
            nodes,
            HandleTable::default(),
        ))
    }

    /// A file system taking over from a predecessor's snapshot (live restart), or from
    /// a [`snapshot::portable`] one whose objects are found again by their path hints.
    /// The snapshot is checked whole before anything is opened; objects that cannot be
    /// found again become stale (ESTALE), never another object.
    pub fn restore(
        config: PassthroughConfig,
        state: fsva_appliance::state::BackendState,
    ) -> std::result::Result<Self, fsva_appliance::state::StateError> {
        use fsva_appliance::state::StateError;
        let t0 = std::time::Instant::now();
        let setup = Setup::new(config).map_err(|e| StateError::Backend(e.to_string()))?;
        let snapshot::PassthroughSnapshot::V1(s) = snapshot::decode(&state.bytes)?;
        snapshot::check(&s, state.fds.len())?;
        let proc_self_fd = setup.proc_self_fd;
        let reopen = |fd: BorrowedFd<'_>, flags: i32| reopen_via(proc_self_fd.as_fd(), fd, flags);
        let restored = restore::rebuild(
            s,
            state.fds,
            restore::Export {
                root: setup.config.root,
                root_key: setup.root_key,
                reopen: &reopen,
                verify_handles: false,
                alt_hints: &HashMap::new(),
            },
        )?;
        tracing::info!(
            nodes = restored.nodes.count(),
            handles = restored.handles.count(),
            stale_nodes = restored.stale_nodes,
            stale_handles = restored.stale_handles,
            restore_us = t0.elapsed().as_micros() as u64,
            "passthrough state restored"
        );
        Ok(Self::with_tables(
            setup.config.entry_ttl,
            setup.config.attr_ttl,
            setup.config.device_nodes,
            setup.locality,
            proc_self_fd,
            restored.nodes,
            restored.handles,
        ))
    }

    fn with_tables(
        entry_ttl: Duration,
        attr_ttl: Duration,
        device_nodes: Option<Arc<dyn DeviceNodes>>,
        locality: Locality,
        proc_self_fd: OwnedFd,
        nodes: NodeTable,
        handles: HandleTable,
    ) -> Self {
        Self {
            nodes,
            handles,
            proc_self_fd,
            entry_ttl,
            attr_ttl,
            base_groups: creds::current_groups(),
            device_nodes,
            exclusive_local: locality.exclusive_local,
            implicit: locality.no_open.then(ImplicitOpens::default),
            recovery: None,
            drop_only_read_in: locality.drop_only_read_in.into(),
        }
    }

    /// Number of nodes held (root included); for tests and diagnostics.
    pub fn node_count(&self) -> usize {
        self.nodes.count()
    }

    /// Number of open handles; for tests and diagnostics.
    pub fn handle_count(&self) -> usize {
        self.handles.count()
    }

    fn node(&self, id: u64) -> Result<Arc<Node>> {
        self.nodes.get(id)
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.get(fh)
    }

    /// The handle serving a request on file `ino` with `fh`: in no-open mode, `fh` 0
    /// is the node's own descriptor (see [`implicit`]). `write`: the request writes.
    fn file_handle(&self, ino: u64, fh: u64, write: bool) -> Result<Arc<Handle>> {
        match &self.implicit {
            Some(implicit) if fh == NO_HANDLE => {
                let node = self.node(ino)?;
                implicit.get(node.clone(), write, |flags| self.reopen(node.fd(), flags))
            }
            _ => self.handle(fh),
        }
    }

    /// The handle serving a READDIR of directory `ino` with `fh`: in no-open mode, `fh`
    /// 0 is a stream opened for this request alone (READDIR's offset is the file
    /// system's own cookie, which holds across opens; see [`dir`]).
    fn dir_handle(&self, ino: u64, fh: u64) -> Result<Arc<Handle>> {
        match &self.implicit {
            Some(_) if fh == NO_HANDLE => {
                let n = self.node(ino)?;
                let fd = self.reopen(n.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                Ok(Arc::new(Handle::dir(fd, n)))
            }
            _ => self.handle(fh),
        }
    }

    /// `fh` as a handle to use for a request that may also be served by the node alone
    /// (attributes, truncation): the no-open `fh` 0 names no handle.
    fn given_handle(&self, fh: Option<u64>) -> Option<u64> {
        fh.filter(|&fh| !(fh == NO_HANDLE && self.implicit.is_some()))
    }

    /// Number of descriptors serving files opened without OPEN; for tests.
    pub fn implicit_count(&self) -> usize {
        self.implicit.as_ref().map_or(0, ImplicitOpens::count)
    }

    /// A file handle leaves: the client no longer caches through it, so drop what its
    /// last reads left for later (see read_trail).
    fn retire(h: &Handle) {
        for range in h.read_trail().map(|t| t.pending()).unwrap_or_default() {
            drop_cached(h.fd(), range);
        }
    }

    /// Opens the object behind `fd` anew, through its /proc/self/fd magic link.
    fn reopen(&self, fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
        reopen_via(self.proc_self_fd.as_fd(), fd, flags)
    }

    fn entry(&self, node: &Node, stx: &libc::statx) -> Entry {
        node.note_mode(u32::from(stx.stx_mode));
        Entry {
            ino: node.id,
            generation: 0,
            attr: attr::to_attr(stx),
            entry_ttl: self.entry_ttl,
            attr_ttl: self.attr_ttl,
        }
    }

    /// Adds one lookup reference for the object `fd` (an `O_PATH` descriptor) refers to,
    /// found as `hint` (a name in a parent node), if it has a plain name, on behalf of
    /// request `u` (for the journal).
    fn register(&self, fd: OwnedFd, hint: Option<(u64, &OsStr)>, u: u64) -> io::Result<Entry> {
        let stx = sys::statx_fd(fd.as_fd(), STATX_MASK, 0)?;
        let hint = hint
            .filter(|(_, name)| !Self::is_dot(name))
            .map(|(parent, name)| (parent, name.as_bytes()));
        let (node, spare) = self
            .nodes
            .insert_or_ref(fd, key_of(&stx), kind_of(&stx), hint, u);
        drop(spare);
        Ok(self.entry(&node, &stx))
    }

    /// After a rename: whatever `name` in `parent` now is, that is where its node lives.
    fn rehint(&self, parent: &Node, name: &OsStr, u: u64) {
        let Ok(c) = cname(name) else { return };
        if let Ok(stx) = sys::statx_at(parent.fd(), &c, STATX_MASK) {
            self.nodes
                .rehint(&key_of(&stx), parent.id, name.as_bytes(), u);
        }
    }

    /// Looks `name` up in `parent` and takes a lookup reference on the result (for
    /// request `u`).
    fn do_lookup(&self, parent: &Node, name: &OsStr, u: u64) -> io::Result<Entry> {
        // ".." of the export root is the root itself: never walk out of the export.
        let name: &OsStr = if parent.id == ROOT_ID && name.as_bytes() == b".." {
            OsStr::new(".")
        } else {
            name
        };
        let c = cname(name)?;
        let fd = sys::openat(parent.fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.register(fd, Some((parent.id, name)), u)
    }

    /// Runs `f` as the caller (fsuid/fsgid/supplementary group/umask of `ctx`).
    fn as_caller<T>(
        &self,
        ctx: &Context,
        umask: Option<u32>,
        f: impl FnOnce(&CredGuard<'_>) -> io::Result<T>,
    ) -> Result<T> {
        let guard = CredGuard::switch(
            Caller {
                uid: ctx.uid,
                gid: ctx.gid,
                supp_group: ctx.supp_group,
                umask,
            },
            &self.base_groups,
        )?;
        let r = f(&guard);
        drop(guard);
        Ok(r?)
    }

    fn attr_of(&self, ino: u64, fh: Option<u64>) -> Result<(abi::Attr, Duration)> {
        let stx = match self.given_handle(fh) {
            Some(fh) => {
                let h = self.handle(fh)?;
                let stx = sys::statx_fd(h.fd(), STATX_MASK, 0)?;
                if let Some(n) = h.node() {
                    n.note_mode(u32::from(stx.stx_mode));
                }
                stx
            }
            None => {
                let n = self.node(ino)?;
                let stx = sys::statx_fd(n.fd(), STATX_MASK, 0)?;
                n.note_mode(u32::from(stx.stx_mode));
                stx
            }
        };
        Ok((attr::to_attr(&stx), self.attr_ttl))
    }

    /// Registers a freshly created and opened file (CREATE, TMPFILE), named `hint`,
    /// for request `u`.
    fn finish_create(
        &self,
        file: OwnedFd,
        flags: u32,
        hint: Option<(u64, &OsStr)>,
        u: u64,
    ) -> Result<(Entry, Opened)> {
        let path_fd = self.reopen(file.as_fd(), libc::O_PATH)?;
        let entry = self.register(path_fd, hint, u)?;
        let node = self.node(entry.ino)?;
        let ino = entry.ino;
        if let Some(implicit) = &self.implicit {
            // In no-open mode the kernel may send no RELEASE even for a file it created
            // (newer kernels send one with fh 0, which releases nothing): the new file
            // is served by the node's own descriptor (there is no journal here).
            implicit.adopt(node, file, flags);
            return Ok((entry, self.opened(NO_HANDLE)));
        }
        let fh = self.add_handle(u, Handle::file(file, node, flags), |fh| {
            OutcomeV1::Created { node: ino, fh }
        });
        Ok((entry, self.opened(fh)))
    }

    /// Stores a handle opened for request `u`, which returns `outcome` with its `fh`;
    /// with a journal, the open file of a regular file goes to the supervisor's keeping
    /// first (so that it outlives this appliance, unlinked or not).
    fn add_handle(&self, u: u64, h: Handle, outcome: impl FnOnce(u64) -> OutcomeV1) -> u64 {
        let fh = self.handles.reserve();
        if let (Some(j), Handle::File { fd, node, .. }) = (&self.recovery, &h) {
            if node.kind == libc::S_IFREG {
                j.keeper.keep(fh, fd.as_fd());
            }
        }
        self.handles.insert_at(fh, h, u, |_| Some(outcome(fh)));
        fh
    }

    /// Removes handle `fh` for request `u` (which then returns `outcome`), and gives
    /// its open file back from the supervisor's keeping.
    fn drop_handle(&self, u: u64, fh: u64, outcome: Option<OutcomeV1>) -> Option<Arc<Handle>> {
        let (was, h) = self.handles.remove(fh, u, outcome);
        // A directory's stream was never kept; a stale handle's file may have been.
        let kept = match h.as_deref() {
            Some(Handle::File { node, .. }) => node.kind == libc::S_IFREG,
            Some(Handle::Dir { .. }) => false,
            None => was,
        };
        if let (true, Some(j)) = (kept, &self.recovery) {
            j.keeper.release(fh);
        }
        h
    }

    /// What `name` in `dir` is now (for an intent's state before its system call).
    fn probe(&self, dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> ProbeV1 {
        match sys::statx_at(dir, name, STATX_MASK) {
            Ok(stx) => ProbeV1::Present(key_of(&stx).into()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => ProbeV1::Absent,
            Err(_) => ProbeV1::Unknown,
        }
    }

    /// Records that request `u` is about to change the export (with a journal only:
    /// `intent` is not even made without one).
    fn intend(&self, u: u64, intent: impl FnOnce() -> IntentV1) {
        if let Some(j) = &self.recovery {
            j.recorder.record(u, vec![journal::OpV1::Intent(intent())]);
        }
    }

    /// Records that request `u` is about to make `name` in `parent` (`p`, its node;
    /// `c`, the name as a C string), with what stood there before; `open` holds the
    /// flags when the request also opens what it makes.
    fn intend_make(
        &self,
        u: u64,
        parent: u64,
        p: &Node,
        name: &OsStr,
        c: &std::ffi::CStr,
        open: Option<u32>,
    ) {
        self.intend(u, || IntentV1::Make {
            parent,
            name: name.as_bytes().to_vec(),
            before: self.probe(p.fd(), c),
            open,
        });
    }

    /// Records how request `u`, which recorded an intent, ended: its outcome if `r`
    /// succeeded.
    fn settle<T>(&self, u: u64, r: Result<T>, outcome: impl FnOnce(&T) -> OutcomeV1) -> Result<T> {
        if let Some(j) = &self.recovery {
            match &r {
                Ok(v) => j
                    .recorder
                    .record(u, vec![journal::OpV1::Outcome(outcome(v))]),
                Err(_) => j.recorder.abandon(u),
            }
        }
        r
    }

    /// Runs a data change on `fd` (a descriptor of `node`) and puts back set-id bits
    /// the host kernel dropped. Inside a user namespace the appliance lacks CAP_FSETID
    /// in the initial namespace, so the host clears S_ISUID (and S_ISGID with group
    /// exec) on every write/truncate/fallocate it does; the FUSE kernel already decided
    /// for the real caller and sent an explicit SETATTR when the bits must go.
    /// With `kill` (HANDLE_KILLPRIV_V2 asked to clear them for this caller) the bits
    /// end as [`mode_after_kill_suidgid`] says instead.
    fn keep_setid<T>(
        &self,
        node: &Node,
        fd: BorrowedFd<'_>,
        kill: Option<&Context>,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        const SETID: u32 = libc::S_ISUID | libc::S_ISGID;
        if !node.maybe_setid() || node.kind != libc::S_IFREG {
            return op();
        }
        let mode_of = |fd| sys::statx_fd(fd, libc::STATX_MODE, 0).map(|s| u32::from(s.stx_mode));
        let gid = sys::statx_fd(fd, libc::STATX_GID, 0)
            .map(|s| s.stx_gid)
            .unwrap_or(u32::MAX);
        let before = mode_of(fd).ok();
        let r = op();
        if let Some(before) = before {
            node.note_mode(before);
            if before & SETID != 0 {
                let target = match kill {
                    Some(ctx) => mode_after_kill_suidgid(before, gid, ctx),
                    None => before,
                };
                if let Ok(after) = mode_of(fd) {
                    if after & SETID != target & SETID {
                        if let Err(e) = self.chmod(node, target & 0o7777) {
                            tracing::warn!(error = %e, node = node.id, "could not restore set-id bits after a data change");
                        }
                    }
                }
            }
        }
        r
    }

    /// The OPENDIR reply for `fh`.
    fn dir_opened(fh: u64) -> Opened {
        Opened {
            fh,
            // The kernel may keep the listing: it drops it when an entry changes through
            // the mount, and (AUTO_INVAL_DATA) when the directory's mtime has moved once
            // its attributes time out — so a change made beside the mount shows as
            // soon as a changed attribute would.
            open_flags: abi::fopen::CACHE_DIR | abi::fopen::KEEP_CACHE,
            backing: None,
        }
    }

    /// Whether `node` has the extended attribute `name` now (None: cannot tell).
    fn has_xattr_now(&self, node: &Node, name: &std::ffi::CStr) -> Option<bool> {
        match xattr::get(self.xattr_target(node), name, 0) {
            Ok(_) => Some(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Some(false),
            Err(_) => None,
        }
    }

    fn opened(&self, fh: u64) -> Opened {
        // FUSE passthrough: the kernel may read and write the opened file directly.
        // Not for set-id files: the kernel writes backing files with the supervisor's
        // credentials, so a write would not clear S_ISUID/S_ISGID as the caller's must;
        // their data goes through the appliance, which applies WRITE_KILL_SUIDGID.
        let backing = self.handle(fh).ok().and_then(|h| {
            h.node()?;
            let st = sys::statx_fd(h.fd(), libc::STATX_MODE, 0).ok()?;
            if u32::from(st.stx_mode) & (libc::S_ISUID | libc::S_ISGID) != 0 {
                return None;
            }
            h.fd().try_clone_to_owned().ok()
        });
        // FLUSH exists for file systems that act on close (NFS, FUSE, CIFS): where the
        // opened file's file system does nothing on close, skip the round trip.
        let noflush = self.exclusive_local
            || self
                .handle(fh)
                .ok()
                .and_then(|h| sys::fstatfs(h.fd()).ok())
                .is_some_and(|st| nothing_on_close(st.f_type));
        Opened {
            fh,
            // The user side is the one cache of file data (we drop what we read): keep it
            // across opens; AUTO_INVAL_DATA drops it when the file's mtime changes.
            open_flags: abi::fopen::KEEP_CACHE | if noflush { abi::fopen::NOFLUSH } else { 0 },
            backing,
        }
    }

    fn set_times(&self, node: &Node, set: &abi::SetattrIn) -> io::Result<()> {
        let ts = |valid_now: u32, valid: u32, sec: u64, nsec: u32| {
            if set.valid & valid_now != 0 {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                }
            } else if set.valid & valid != 0 {
                libc::timespec {
                    tv_sec: sec as libc::time_t,
                    tv_nsec: nsec as libc::c_long,
                }
            } else {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                }
            }
        };
        let times = [
            ts(fattr::ATIME_NOW, fattr::ATIME, set.atime, set.atimensec),
            ts(fattr::MTIME_NOW, fattr::MTIME, set.mtime, set.mtimensec),
        ];
        // SAFETY: `times` holds two timespecs; the path is a C string.
        cvt(unsafe {
            libc::utimensat(
                node.fd().as_raw_fd(),
                EMPTY.as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    fn chmod(&self, node: &Node, mode: u32) -> io::Result<()> {
        if node.is_symlink() {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        // SAFETY: raw fchmodat2 with a C string path.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                node.fd().as_raw_fd(),
                EMPTY.as_ptr(),
                mode & 0o7777,
                libc::AT_EMPTY_PATH,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
            return Err(e);
        }
        // Older kernels: through the magic link (it lands on the object, never a symlink here).
        let name = fd_name(node.fd().as_raw_fd());
        // SAFETY: C string path relative to our /proc/self/fd descriptor.
        cvt(unsafe {
            libc::fchmodat(
                self.proc_self_fd.as_raw_fd(),
                name.as_ptr(),
                mode & 0o7777,
                0,
            )
        })
        .map(drop)
    }

    /// Clears set-id bits as the kernel asked (HANDLE_KILLPRIV_V2 without a data change).
    fn kill_setid(&self, node: &Node, ctx: &Context) -> Result<()> {
        let st = sys::statx_fd(node.fd(), libc::STATX_MODE | libc::STATX_GID, 0)?;
        let mode = u32::from(st.stx_mode);
        let target = mode_after_kill_suidgid(mode, st.stx_gid, ctx);
        if target != mode {
            self.chmod(node, target & 0o7777)?;
        }
        Ok(())
    }

    fn truncate(
        &self,
        node: &Node,
        fh: Option<u64>,
        size: u64,
        kill: Option<&Context>,
    ) -> Result<()> {
        self.keep_setid(node, node.fd(), kill, || {
            self.truncate_inner(node, fh, size)
        })
    }

    fn truncate_inner(&self, node: &Node, fh: Option<u64>, size: u64) -> Result<()> {
        let given = match self.given_handle(fh).map(|fh| self.handles.get(fh)) {
            Some(Err(Errno(libc::ESTALE))) => return Err(Errno(libc::ESTALE)),
            Some(h) => h.ok(),
            None => None,
        };
        if let Some(h) = given {
            // SAFETY: plain ftruncate on a descriptor we own.
            if unsafe { libc::ftruncate64(h.fd().as_raw_fd(), size as i64) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::EINVAL)) {
                return Err(e.into());
            }
        }
        let fd = self.reopen(node.fd(), libc::O_WRONLY)?;
        // SAFETY: plain ftruncate on a descriptor we own.
        cvt(unsafe { libc::ftruncate64(fd.as_raw_fd(), size as i64) })?;
        Ok(())
    }

    fn xattr_target<'a>(&'a self, node: &'a Node) -> xattr::Target<'a> {
        xattr::Target {
            node: node.fd(),
            proc_self_fd: self.proc_self_fd.as_fd(),
        }
    }

    /// Writes all of `data` at `offset` (on an O_APPEND descriptor Linux ignores the
    /// offset and appends); a short count only when an error follows some progress.
    fn pwrite_all(fd: BorrowedFd<'_>, offset: u64, data: &[u8]) -> Result<u32> {
        fsva_appliance::fileio::write_all_at(fd, offset, data).map(|n| n as u32)
    }

    /// Whether a directory listing entry is "." or "..".
    fn is_dot(name: &OsStr) -> bool {
        matches!(name.as_bytes(), b"." | b"..")
    }

    /// MKNOD's system call (or the supervisor's, for a device) and the lookup after it.
    #[allow(clippy::too_many_arguments)]
    fn mknod_inner(
        &self,
        ctx: &Context,
        p: &Node,
        name: &OsStr,
        c: &std::ffi::CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> Result<Entry> {
        let u = base_unique(ctx);
        let kind = mode & libc::S_IFMT;
        // A whiteout (character device 0:0) needs no privilege; other devices do.
        let device = kind == libc::S_IFBLK || (kind == libc::S_IFCHR && rdev != 0);
        if let (true, Some(maker)) = (device, &self.device_nodes) {
            // Only a privileged caller may make devices; root stands for one, as for
            // every FUSE file system (the request carries no capabilities).
            if ctx.uid != 0 {
                return Err(Errno(libc::EPERM));
            }
            maker
                .make_device(
                    p.fd(),
                    name.as_bytes(),
                    mode,
                    umask,
                    attr::decode_dev(rdev),
                    ctx.gid,
                )
                .map_err(Errno::from)?;
            return Ok(self.do_lookup(p, name, u)?);
        }
        self.as_caller(ctx, Some(umask), |g| {
            // SAFETY: C string name relative to the parent's descriptor.
            cvt(unsafe {
                libc::mknodat(
                    p.fd().as_raw_fd(),
                    c.as_ptr(),
                    g.mode(mode),
                    attr::decode_dev(rdev),
                )
            })
        })?;
        Ok(self.do_lookup(p, name, u)?)
    }

    /// Keeps the path hints true after a rename (for a restore that must find nodes by
    /// name): the object now at `newname` lives there, an object it replaced
    /// (`dst`, if known) no longer does.
    #[allow(clippy::too_many_arguments)]
    fn renamed(
        &self,
        p: &Node,
        name: &OsStr,
        np: &Node,
        newname: &OsStr,
        flags: u32,
        dst: Option<ProbeV1>,
        u: u64,
    ) {
        if let (Some(ProbeV1::Present(d)), 0) = (dst, flags & libc::RENAME_EXCHANGE) {
            self.nodes.unhint(&d.into(), np.id, newname.as_bytes(), u);
        }
        self.rehint(np, newname, u);
        if flags & libc::RENAME_EXCHANGE != 0 {
            self.rehint(p, name, u);
        }
    }

    /// LINK's system call and the lookup of the new name.
    fn link_inner(
        &self,
        n: &Node,
        np: &Node,
        newname: &OsStr,
        nc: &std::ffi::CStr,
        u: u64,
    ) -> Result<Entry> {
        let src = fd_name(n.fd().as_raw_fd());
        // Through the magic link (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH in the
        // initial namespace).
        // SAFETY: C strings relative to valid descriptors.
        cvt(unsafe {
            libc::linkat(
                self.proc_self_fd.as_raw_fd(),
                src.as_ptr(),
                np.fd().as_raw_fd(),
                nc.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        Ok(self.do_lookup(np, newname, u)?)
    }

    /// UNLINK (`flags` 0) and RMDIR (`AT_REMOVEDIR`): the name goes, and a node whose
    /// path hint it was keeps none.
    fn remove(&self, ctx: &Context, parent: u64, name: &OsStr, flags: i32) -> Result<()> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let u = base_unique(ctx);
        let before = self.recovery.as_ref().map(|_| self.probe(p.fd(), &c));
        self.intend(u, || IntentV1::Remove {
            parent,
            name: name.as_bytes().to_vec(),
            before: before.unwrap_or(ProbeV1::Unknown),
        });
        // SAFETY: C string name relative to the parent's descriptor.
        let r = cvt(unsafe { libc::unlinkat(p.fd().as_raw_fd(), c.as_ptr(), flags) })
            .map(drop)
            .map_err(Errno::from);
        if let (Ok(()), Some(ProbeV1::Present(victim))) = (&r, before) {
            self.nodes
                .unhint(&victim.into(), parent, name.as_bytes(), u);
        }
        self.settle(u, r, |_| OutcomeV1::Done)
    }
}

impl Filesystem for PassthroughFs {
    fn init(&self, _kernel_flags: u64) -> InitRequest {
        InitRequest {
            // Our open files may also serve as FUSE passthrough backing files.
            // FUSE passthrough needs OPEN to name the backing file.
            flags: POSIX_BACKEND_FLAGS
                | if self.implicit.is_some() {
                    0
                } else {
                    f::PASSTHROUGH
                },
            max_write: 1 << 20,
        }
    }

    /// A directory on a file system known to compare names as bytes, without the
    /// casefold or encryption flag (which a new directory inherits from its parent).
    fn names_exact(&self, ino: u64) -> bool {
        let Ok(n) = self.node(ino) else {
            return false;
        };
        if !sys::fstatfs(n.fd()).is_ok_and(|st| names_are_bytes_unless_casefolded(st.f_type)) {
            return false;
        }
        let Ok(dir) = self.reopen(n.fd(), libc::O_RDONLY | libc::O_DIRECTORY) else {
            return false;
        };
        // An encrypted directory shows other names once its key is gone.
        let unlike = sys::FS_CASEFOLD_FL | sys::FS_ENCRYPT_FL;
        sys::inode_flags(dir.as_fd()).is_ok_and(|flags| flags & unlike == 0)
    }

    /// Looked up as reached through the export's own mount (the watch sees only the
    /// export's file system, and objects of mounts below it are not its concern).
    fn node_of_host_object(&self, dev: u64, ino: u64) -> Option<u64> {
        let root = self.nodes.root().key;
        self.nodes.by_key(&inode::InodeKey {
            dev,
            ino,
            mnt_id: root.mnt_id,
        })
    }

    /// The node and handle tables with every descriptor lent (see [`snapshot`]).
    /// Called with every worker paused.
    fn checkpoint(
        &self,
    ) -> std::result::Result<fsva_appliance::state::BackendState, fsva_appliance::state::StateError>
    {
        Ok(snapshot::take(self.nodes.parts(), self.handles.parts()))
    }

    /// The tables without descriptors, the intents still open and the last records,
    /// taken with both tables and the recorder held still, so that they and the
    /// journal boundary agree (see [`journal`]).
    fn journal_checkpoint(
        &self,
        rotate: &mut dyn FnMut() -> u64,
    ) -> std::result::Result<(Vec<u8>, u64), fsva_appliance::state::StateError> {
        self.recovery_checkpoint(rotate)
    }

    fn completed(&self, unique: u64) -> Option<fsva_appliance::Completed> {
        self.answer_resent(unique)
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<Entry> {
        let p = self.node(parent)?;
        Ok(self.do_lookup(&p, name, base_unique(ctx))?)
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        let gone = self.nodes.forget(ino, nlookup, 0);
        if let (Some(node), Some(implicit)) = (gone, &self.implicit) {
            if let Some(h) = implicit.forget(node.id) {
                Self::retire(&h);
            }
        }
    }

    fn getattr(&self, _ctx: &Context, ino: u64, fh: Option<u64>) -> Result<(abi::Attr, Duration)> {
        self.attr_of(ino, fh)
    }

    fn setattr(
        &self,
        ctx: &Context,
        ino: u64,
        set: &abi::SetattrIn,
    ) -> Result<(abi::Attr, Duration)> {
        let n = self.node(ino)?;
        let fh = (set.valid & fattr::FH != 0).then_some(set.fh);
        const CHANGES: u32 = fattr::MODE
            | fattr::UID
            | fattr::GID
            | fattr::SIZE
            | fattr::ATIME
            | fattr::MTIME
            | fattr::ATIME_NOW
            | fattr::MTIME_NOW;
        // chown(f, -1, -1) reaches us as a SETATTR that changes nothing; on the host it
        // still updates ctime, so do the same no-op chown.
        let touch_ctime = set.valid & CHANGES == 0;
        if set.valid & (fattr::UID | fattr::GID) != 0 || touch_ctime {
            let uid = if set.valid & fattr::UID != 0 {
                set.uid
            } else {
                u32::MAX
            };
            let gid = if set.valid & fattr::GID != 0 {
                set.gid
            } else {
                u32::MAX
            };
            // SAFETY: C string path; AT_EMPTY_PATH acts on the node itself.
            cvt(unsafe {
                libc::fchownat(
                    n.fd().as_raw_fd(),
                    EMPTY.as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        // After chown: the kernel's mode (with set-id bits cleared) is the final word.
        if set.valid & fattr::MODE != 0 {
            self.chmod(&n, set.mode)?;
        }
        if set.valid & fattr::SIZE != 0 {
            self.truncate(
                &n,
                fh,
                set.size,
                (set.valid & fattr::KILL_SUIDGID != 0).then_some(ctx),
            )?;
        } else if set.valid & fattr::KILL_SUIDGID != 0 {
            self.kill_setid(&n, ctx)?;
        }
        if set.valid & (fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW) != 0 {
            self.set_times(&n, set)?;
        }
        self.attr_of(ino, None)
    }

    fn readlink(&self, _ctx: &Context, ino: u64) -> Result<Vec<u8>> {
        let n = self.node(ino)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: `buf` is writable for its length.
        let r = unsafe {
            libc::readlinkat(
                n.fd().as_raw_fd(),
                EMPTY.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r < 0 {
            return Err(Errno::last());
        }
        buf.truncate(r as usize);
        Ok(buf)
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
        let p = self.node(parent)?;
        let c = cname(name)?;
        let u = base_unique(ctx);
        self.intend_make(u, parent, &p, name, &c, None);
        let r = self.mknod_inner(ctx, &p, name, &c, mode, rdev, umask);
        self.settle(u, r, |e| OutcomeV1::Entry { node: e.ino })
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<Entry> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let u = base_unique(ctx);
        self.intend_make(u, parent, &p, name, &c, None);
        let r = self
            .as_caller(ctx, Some(umask), |g| {
                // SAFETY: C string name relative to the parent's descriptor.
                cvt(unsafe { libc::mkdirat(p.fd().as_raw_fd(), c.as_ptr(), g.mode(mode)) })
            })
            .and_then(|_| Ok(self.do_lookup(&p, name, u)?));
        self.settle(u, r, |e| OutcomeV1::Entry { node: e.ino })
    }

    fn symlink(&self, ctx: &Context, parent: u64, name: &OsStr, target: &[u8]) -> Result<Entry> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let t = cname(OsStr::from_bytes(target))?;
        let u = base_unique(ctx);
        self.intend_make(u, parent, &p, name, &c, None);
        let r = self
            .as_caller(ctx, None, |_| {
                // SAFETY: C strings; name relative to the parent's descriptor.
                cvt(unsafe { libc::symlinkat(t.as_ptr(), p.fd().as_raw_fd(), c.as_ptr()) })
            })
            .and_then(|_| Ok(self.do_lookup(&p, name, u)?));
        self.settle(u, r, |e| OutcomeV1::Entry { node: e.ino })
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(ctx, parent, name, 0)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(ctx, parent, name, libc::AT_REMOVEDIR)
    }
    fn rename(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        let c = cname(name)?;
        let nc = cname(newname)?;
        let u = base_unique(ctx);
        let dst = self.recovery.as_ref().map(|_| self.probe(np.fd(), &nc));
        self.intend(u, || IntentV1::Rename {
            parent,
            name: name.as_bytes().to_vec(),
            newparent,
            newname: newname.as_bytes().to_vec(),
            flags,
            src: self.probe(p.fd(), &c),
            dst: dst.unwrap_or(ProbeV1::Unknown),
        });
        // SAFETY: raw renameat2 with C string names relative to the parents' descriptors.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                p.fd().as_raw_fd(),
                c.as_ptr(),
                np.fd().as_raw_fd(),
                nc.as_ptr(),
                flags,
            )
        };
        if r < 0 {
            return self.settle(u, Err(Errno::last()), |_| OutcomeV1::Done);
        }
        self.renamed(&p, name, &np, newname, flags, dst, u);
        self.settle(u, Ok(()), |_| OutcomeV1::Done)
    }

    fn link(&self, ctx: &Context, ino: u64, newparent: u64, newname: &OsStr) -> Result<Entry> {
        let n = self.node(ino)?;
        let np = self.node(newparent)?;
        let nc = cname(newname)?;
        let u = base_unique(ctx);
        self.intend(u, || IntentV1::Link {
            node: ino,
            key: n.key.into(),
            newparent,
            newname: newname.as_bytes().to_vec(),
            before: self.probe(np.fd(), &nc),
        });
        let r = self.link_inner(&n, &np, newname, &nc, u);
        self.settle(u, r, |e| OutcomeV1::Entry { node: e.ino })
    }
    fn open(&self, ctx: &Context, ino: u64, flags: u32, kill_suidgid: bool) -> Result<Opened> {
        if self.implicit.is_some() {
            // No-open mode: the kernel sends no OPEN (or RELEASE) for files again.
            return Err(Errno(libc::ENOSYS));
        }
        let n = self.node(ino)?;
        if kill_suidgid {
            self.kill_setid(&n, ctx)?;
        }
        let fd = self.reopen(n.fd(), flags as i32)?;
        let fh = self.add_handle(base_unique(ctx), Handle::file(fd, n, flags), |fh| {
            OutcomeV1::Opened { fh }
        });
        Ok(self.opened(fh))
    }

    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        flags: u32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let h = self.file_handle(ino, fh, false)?;
        let before = out.len();
        // Reads reach the appliance only when FUSE passthrough is off: the kernel client
        // then caches the data, so keeping it here too would cache it twice. Drop our
        // copy of what we returned (see read_trail). Not for an O_DIRECT reader, which
        // the client does not cache (its own handle has no trail; a no-open one's
        // flags say so here).
        let direct = flags as i32 & libc::O_DIRECT != 0;
        let trail = h.read_trail().filter(|_| !direct);
        let only_read_in = &self.drop_only_read_in;
        let drops = if trail.is_some() && only_read_in.load(Relaxed) {
            let resident = fsva_appliance::fileio::read_at_into_noting_resident(
                h.fd(),
                offset,
                size as usize,
                out,
            )?;
            if resident.is_none() {
                only_read_in.store(false, Relaxed);
            }
            let end = offset + (out.len() - before) as u64;
            let resident_until = offset + resident.unwrap_or(0) as u64;
            trail.map(|t| t.record_after_resident(offset, resident_until, end))
        } else {
            fsva_appliance::fileio::read_at_into(h.fd(), offset, size as usize, out)?;
            let end = offset + (out.len() - before) as u64;
            trail.map(|t| t.record(offset, end))
        };
        for range in drops.into_iter().flatten().flatten() {
            drop_cached(h.fd(), range);
        }
        Ok(())
    }

    fn write(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
        _flags: u32,
    ) -> Result<u32> {
        let h = self.file_handle(ino, fh, true)?;
        let Some(n) = h.node() else {
            return Err(Errno(libc::EISDIR));
        };
        let u = base_unique(ctx);
        // An append through the appliance is the one write that cannot simply run
        // again after a crash: its intent records the size before it.
        let append = self.recovery.is_some()
            && matches!(&*h, Handle::File { flags, .. } if *flags as i32 & libc::O_APPEND != 0);
        if append {
            if ctx.unique & abi::UNIQUE_RESEND != 0 {
                if let Some(n) = self.resent_append(u, &h, data)? {
                    return self.settle(u, Ok(n), |n| OutcomeV1::Written(*n));
                }
            }
            let size = sys::statx_fd(h.fd(), libc::STATX_SIZE, 0)?.stx_size;
            self.intend(u, || IntentV1::Append { fh, size });
        }
        let r = self.keep_setid(
            n,
            h.fd(),
            (write_flags & abi::flags::WRITE_KILL_SUIDGID != 0).then_some(ctx),
            || Self::pwrite_all(h.fd(), offset, data),
        );
        if append {
            self.settle(u, r, |n| OutcomeV1::Written(*n))
        } else {
            r
        }
    }

    fn flush(&self, _ctx: &Context, _ino: u64, fh: u64, _lock_owner: u64) -> Result<()> {
        if self.exclusive_local {
            // ENOSYS tells the kernel never to send FLUSH again: a local disk file
            // system does nothing on close, and locks are the kernel's.
            return Err(Errno(libc::ENOSYS));
        }
        let h = self.handle(fh)?;
        // close(dup(fd)): file systems that act on close (NFS) see one now.
        let d = sys::dup(h.fd())?;
        // SAFETY: we own `d` and close it exactly once here.
        cvt(unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(d)) })?;
        Ok(())
    }

    fn release(&self, ctx: &Context, _ino: u64, fh: u64, _flags: u32) -> Result<()> {
        if let Some(h) = self.drop_handle(base_unique(ctx), fh, Some(OutcomeV1::Done)) {
            Self::retire(&h);
        }
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, ino: u64, fh: u64, datasync: bool) -> Result<()> {
        let h = self.file_handle(ino, fh, false)?;
        let r = sys::sync(h.fd(), datasync).map_err(Errno::from);
        match (&self.implicit, fh) {
            (Some(implicit), NO_HANDLE) => implicit.synced(ino, r),
            _ => r,
        }
    }

    fn opendir(&self, ctx: &Context, ino: u64, _flags: u32) -> Result<Opened> {
        if self.implicit.is_some() {
            // No-open mode for directories too: no OPENDIR or RELEASEDIR again.
            return Err(Errno(libc::ENOSYS));
        }
        let n = self.node(ino)?;
        let fd = self.reopen(n.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let fh = self.add_handle(base_unique(ctx), Handle::dir(fd, n), |fh| {
            OutcomeV1::Opened { fh }
        });
        Ok(Self::dir_opened(fh))
    }

    fn readdir(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirSink,
    ) -> Result<()> {
        let h = self.dir_handle(ino, fh)?;
        let Handle::Dir { stream: d, .. } = &*h else {
            return Err(Errno(libc::ENOTDIR));
        };
        let plus = sink.is_plus();
        let parent = if plus { Some(self.node(ino)?) } else { None };
        let u = base_unique(ctx);
        let mut failure: Option<io::Error> = None;
        d.read_from(offset, |e| {
            if !sink.fits(e.name) {
                return false;
            }
            let typ = u32::from(e.typ);
            let Some(parent) = &parent else {
                return sink.add(e.ino, e.next, typ, e.name);
            };
            if Self::is_dot(e.name) {
                // No lookup (and no reference) for "." and "..": the kernel lists the name only.
                let entry = Entry {
                    attr: abi::Attr {
                        ino: e.ino,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                return sink.add_plus(&entry, e.next, typ, e.name);
            }
            match self.do_lookup(parent, e.name, u) {
                Ok(entry) => {
                    if sink.add_plus(&entry, e.next, typ, e.name) {
                        true
                    } else {
                        drop(self.nodes.forget(entry.ino, 1, u));
                        false
                    }
                }
                // Removed since it was listed: leave it out.
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => true,
                Err(err) => {
                    if sink.is_empty() {
                        failure = Some(err);
                    }
                    false
                }
            }
        })?;
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn releasedir(&self, ctx: &Context, _ino: u64, fh: u64) -> Result<()> {
        drop(self.drop_handle(base_unique(ctx), fh, Some(OutcomeV1::Done)));
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Context, ino: u64, fh: u64, datasync: bool) -> Result<()> {
        let h = self.dir_handle(ino, fh)?;
        Ok(sys::sync(h.fd(), datasync)?)
    }

    fn statfs(&self, _ctx: &Context, ino: u64) -> Result<abi::Kstatfs> {
        let n = self.node(ino)?;
        Ok(attr::to_kstatfs(&sys::fstatfs(n.fd())?))
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
        let n = self.node(ino)?;
        let c = cname(name)?;
        // Only a create fails when run twice (EEXIST); a plain set or a replace
        // repeats harmlessly.
        let create = flags as i32 & libc::XATTR_CREATE != 0;
        let u = base_unique(ctx);
        if create {
            self.intend(u, || IntentV1::Xattr {
                node: ino,
                name: name.as_bytes().to_vec(),
                // Unknown counts as present: then a resend runs again.
                present: self.has_xattr_now(&n, &c) != Some(false),
                remove: false,
            });
        }
        let r = xattr::set(self.xattr_target(&n), &c, value, flags).map_err(Errno::from);
        if create {
            self.settle(u, r, |_| OutcomeV1::Done)?;
        } else {
            r?;
        }
        // The kernel asks to clear SGID when setting an access ACL by a caller outside
        // the file's group; we hold CAP_FSETID, so the real file system will not.
        if setxattr_flags & abi::flags::SETXATTR_ACL_KILL_SGID != 0
            && name.as_bytes() == b"system.posix_acl_access"
        {
            let stx = sys::statx_fd(n.fd(), STATX_MASK, 0)?;
            let mode = u32::from(stx.stx_mode);
            if mode & libc::S_ISGID != 0 {
                self.chmod(&n, mode & !libc::S_ISGID)?;
            }
        }
        Ok(())
    }

    fn getxattr(&self, _ctx: &Context, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        let n = self.node(ino)?;
        let c = cname(name)?;
        Ok(xattr::get(self.xattr_target(&n), &c, size)?)
    }

    fn listxattr(&self, _ctx: &Context, ino: u64, size: u32) -> Result<Xattr> {
        let n = self.node(ino)?;
        Ok(xattr::list(self.xattr_target(&n), size)?)
    }

    fn removexattr(&self, ctx: &Context, ino: u64, name: &OsStr) -> Result<()> {
        let n = self.node(ino)?;
        let c = cname(name)?;
        let u = base_unique(ctx);
        self.intend(u, || IntentV1::Xattr {
            node: ino,
            name: name.as_bytes().to_vec(),
            // Unknown counts as absent: then a resend runs again.
            present: self.has_xattr_now(&n, &c) == Some(true),
            remove: true,
        });
        let r = xattr::remove(self.xattr_target(&n), &c).map_err(Errno::from);
        self.settle(u, r, |_| OutcomeV1::Done)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let oflags =
            (flags as i32 & !(libc::O_NOCTTY | libc::O_DIRECT)) | libc::O_CREAT | libc::O_NOFOLLOW;
        let u = base_unique(ctx);
        self.intend_make(u, parent, &p, name, &c, Some(flags));
        // The outcome is recorded with the handle; only a failure is settled here.
        let r = self
            .as_caller(ctx, Some(umask), |g| {
                sys::openat(p.fd(), &c, oflags, g.mode(mode))
            })
            .and_then(|file| self.finish_create(file, flags, Some((parent, name)), u));
        if r.is_err() {
            if let Some(j) = &self.recovery {
                j.recorder.abandon(u);
            }
        }
        r
    }

    fn tmpfile(
        &self,
        ctx: &Context,
        parent: u64,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        let p = self.node(parent)?;
        let oflags = (flags as i32
            & !(libc::O_CREAT | libc::O_NOCTTY | libc::O_DIRECT | libc::O_TMPFILE))
            | libc::O_TMPFILE;
        let file = self.as_caller(ctx, Some(umask), |g| {
            sys::openat(p.fd(), c".", oflags, g.mode(mode))
        })?;
        self.finish_create(file, flags, None, base_unique(ctx))
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> Result<()> {
        let h = self.file_handle(ino, fh, true)?;
        let n = h.node().ok_or(Errno(libc::EISDIR))?;
        self.keep_setid(n, h.fd(), None, || {
            // SAFETY: plain call on a descriptor we own.
            cvt(unsafe {
                libc::fallocate64(
                    h.fd().as_raw_fd(),
                    mode as i32,
                    offset as i64,
                    length as i64,
                )
            })?;
            Ok(())
        })
    }

    fn lseek(&self, _ctx: &Context, ino: u64, fh: u64, offset: u64, whence: u32) -> Result<u64> {
        // SEEK_DATA/SEEK_HOLE only (the kernel keeps file positions): the answer does
        // not depend on the descriptor's own offset, so a shared one serves.
        let h = self.file_handle(ino, fh, false)?;
        // SAFETY: plain call on a descriptor we own.
        let r = unsafe { libc::lseek64(h.fd().as_raw_fd(), offset as i64, whence as i32) };
        if r < 0 {
            return Err(Errno::last());
        }
        Ok(r as u64)
    }

    fn copy_file_range(
        &self,
        _ctx: &Context,
        ino_in: u64,
        fh_in: u64,
        off_in: u64,
        ino_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u64,
    ) -> Result<u64> {
        let hi = self.file_handle(ino_in, fh_in, false)?;
        let ho = self.file_handle(ino_out, fh_out, true)?;
        let mut oi = off_in as i64;
        let mut oo = off_out as i64;
        let n = ho.node().ok_or(Errno(libc::EISDIR))?;
        self.keep_setid(n, ho.fd(), None, || {
            // SAFETY: offsets are valid pointers to locals; descriptors are ours.
            let r = unsafe {
                libc::copy_file_range(
                    hi.fd().as_raw_fd(),
                    &mut oi,
                    ho.fd().as_raw_fd(),
                    &mut oo,
                    len as usize,
                    flags as u32,
                )
            };
            if r < 0 {
                return Err(Errno::last());
            }
            Ok(r as u64)
        })
    }

    fn statx(
        &self,
        _ctx: &Context,
        ino: u64,
        fh: Option<u64>,
        flags: u32,
        mask: u32,
    ) -> Result<(abi::Statx, Duration)> {
        let sync = flags as i32 & libc::AT_STATX_SYNC_TYPE;
        let mask = mask | libc::STATX_BASIC_STATS;
        let stx = match self.given_handle(fh) {
            Some(fh) => sys::statx_fd(self.handle(fh)?.fd(), mask, sync)?,
            None => sys::statx_fd(self.node(ino)?.fd(), mask, sync)?,
        };
        Ok((attr::to_statx(&stx), self.attr_ttl))
    }

    /// The mount is going away (unmount): make everything written durable, so a clean
    /// unmount never loses acknowledged data even on a file system with write-back.
    fn destroy(&self) {
        if let Err(e) = self.syncfs(&Context::default()) {
            tracing::error!(error = %e, "syncing the export at unmount failed");
        }
    }

    fn syncfs(&self, _ctx: &Context) -> Result<()> {
        let root = self.nodes.root();
        let fd = self.reopen(root.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        // SAFETY: plain call on a descriptor we own.
        cvt(unsafe { libc::syncfs(fd.as_raw_fd()) })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

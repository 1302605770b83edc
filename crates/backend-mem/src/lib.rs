//! `mem` — a complete POSIX file system in memory, the embedded default backend.
//!
//! - [`inode`]: the inode table, lookup/open/link counts and when an inode dies;
//! - [`dir`]: directory entries with stable readdir cookies;
//! - [`data`]: file contents in memfds, and space accounting (ENOSPC);
//! - [`xattr`]: extended attributes as bytes; [`acl`]: POSIX ACL format and algebra;
//! - [`attr`]: times and attribute replies; [`handle`]: open handles;
//! - this file: the [`Filesystem`] implementation gluing them together.
//!
//! The mount uses `default_permissions` (implied by `POSIX_ACL`), so the kernel checks
//! permissions, sticky bits and chown/chmod rules, and turns set-id clearing into
//! explicit SETATTR mode changes; this backend stores and derives metadata only.
//!
//! Locking: one `RwLock` over the metadata (inodes and handles). Data system calls on
//! memfds run after the lock is dropped (the handle's `Arc<FileData>` is cloned first);
//! only `fstat` of a memfd runs under the lock, to fill in attribute replies.
//!
//! Crash recovery: with a journal ([`MemFs::journaled`]), every change happens in a
//! [`Txn`] that records it in the recovery journal before the lock is released
//! ([`journal`]), memfds are given to the supervisor as they are made, and a successor
//! rebuilds the file system from the last checkpoint and the journal
//! ([`MemFs::recover`]), answering resent requests from their first execution.

pub mod acl;
pub mod attr;
pub mod data;
pub mod dir;
pub mod handle;
pub mod inode;
mod journal;
pub use journal::memfd_ids;
mod snapshot;
pub mod xattr;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use fsva_appliance::filesystem::POSIX_BACKEND_FLAGS;
use fsva_appliance::journal::Journal;
use fsva_appliance::{
    Completed, Context, DirSink, Entry, Errno, Filesystem, InitRequest, Keeper, Opened, Result,
    Xattr,
};
use fsva_protocol::abi::{self, fattr, flags as wflags, fopen};

use acl::Acl;
use attr::{dtype, Time};
use data::{FileData, Space};
use dir::Dir;
use handle::{Handle, HandleTable};
use inode::{Inode, InodeTable, Kind, ROOT};
use journal::{Outcome, Recovered};

/// Longest name in a directory.
pub const NAME_MAX: usize = 255;
/// Longest symlink target (PATH_MAX - 1).
pub const SYMLINK_MAX: usize = 4095;

const S_IFMT: u32 = libc::S_IFMT;
const S_ISGID: u32 = libc::S_ISGID;

/// Construction parameters.
#[derive(Debug, Clone)]
pub struct MemConfig {
    /// Size reported by statfs and the limit for file data (ENOSPC beyond it).
    pub capacity_bytes: u64,
    /// Largest number of inodes (ENOSPC when creating beyond it).
    pub max_inodes: u64,
    /// Permission bits, owner and group of the root directory.
    pub root_mode: u32,
    pub root_uid: u32,
    pub root_gid: u32,
    /// Entry and attribute TTL handed to the kernel. mem is the only writer of its
    /// file system, and the kernel invalidates what it changes itself, so this is long.
    pub ttl: Duration,
}

impl Default for MemConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: default_capacity(),
            max_inodes: 1 << 20,
            root_mode: 0o755,
            root_uid: 0,
            root_gid: 0,
            ttl: Duration::from_secs(60),
        }
    }
}

/// A quarter of physical memory, or 4 GiB when it cannot be determined.
fn default_capacity() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as u64 * size as u64) / 4
    } else {
        4 << 30
    }
}

/// Raises the soft descriptor limit to the hard one: every opened regular file holds a memfd.
/// Raises the soft descriptor limit to the hard one and returns it: every regular
/// file's contents are a memfd, so this bounds how many files mem can hold.
fn raise_nofile_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid rlimit buffer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return u64::MAX;
        }
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
    rl.rlim_cur
}

/// Descriptors kept free for the appliance itself (channels, sockets, directories).
const RESERVED_FDS: u64 = 256;

/// Open flags of every mem file: mem is the only writer of its files, so the page cache
/// stays valid across opens; nothing happens on close, so no FLUSH round trip either.
const FILE_OPEN_FLAGS: u32 = fopen::KEEP_CACHE | fopen::NOFLUSH;

struct State {
    inodes: InodeTable,
    handles: HandleTable,
}

/// The in-memory file system.
pub struct MemFs {
    state: RwLock<State>,
    space: Arc<Space>,
    config: MemConfig,
    /// The recovery journal every change goes to (see [`Txn`]).
    journal: Option<Arc<Journal>>,
    /// How to answer requests a dead predecessor had executed, if the kernel resends
    /// them (crash recovery); emptied as they come, and forgotten after
    /// [`ANSWERS_KEPT`] (the kernel resends at once, so older ones are never asked for).
    recovered: Mutex<Answers>,
    has_recovered: AtomicBool,
}

/// Answers for resent requests, and since when they are kept.
#[derive(Default)]
struct Answers {
    map: HashMap<u64, Recovered>,
    since: Option<std::time::Instant>,
}

/// How long a successor keeps answers for resent requests.
const ANSWERS_KEPT: Duration = Duration::from_secs(10);

/// A spare successor's head start: a checkpoint restored with the memfds kept when it
/// was taken (see [`MemFs::preload`]).
pub struct Preloaded {
    config: MemConfig,
    space: Arc<Space>,
    data: snapshot::DataSource,
    /// The checkpoint's tables (`None`: there was none; the file system starts empty).
    tables: Option<(InodeTable, HandleTable)>,
    /// Answers for resent requests the checkpoint carried.
    answers: HashMap<u64, Recovered>,
}

impl Preloaded {
    /// Memfds kept after the preload.
    pub fn add_fds(&mut self, fds: HashMap<u64, OwnedFd>) {
        self.data.add(fds);
    }

    /// Restores `checkpoint` (a newer one than preloaded, or the first).
    pub fn reload(
        &mut self,
        checkpoint: Option<&[u8]>,
    ) -> std::result::Result<(), fsva_appliance::state::StateError> {
        self.tables = None;
        self.answers.clear();
        if let Some(bytes) = checkpoint {
            let mut restored = snapshot::restore(bytes, &mut self.data, &self.space)?;
            self.space
                .ids_after(restored.next_data_id.saturating_sub(1));
            // The whole checkpoint is checked here, ahead of need; a replay later checks
            // only what it touches.
            journal::check(
                &mut restored.inodes,
                &restored.handles,
                &self.data,
                journal::Checking::Preloaded,
            )?;
            // Memfds of files removed before this checkpoint are not kept open here.
            let named: std::collections::HashSet<u64> = restored
                .inodes
                .parts()
                .1
                .filter_map(|(_, i)| i.data().map(|d| d.id()))
                .collect();
            self.data.prune(&named, restored.next_data_id);
            self.answers = restored.answers.into_iter().collect();
            self.tables = Some((restored.inodes, restored.handles));
        }
        Ok(())
    }
}

/// What a successor rebuilds a journaled mem from after its predecessor died.
pub struct Recovery {
    /// The backend's part of the last checkpoint, if one was stored.
    pub checkpoint: Option<Vec<u8>>,
    /// The backend's journal records after it, in order (without their tag byte).
    pub records: Vec<Vec<u8>>,
    /// Every memfd the supervisor kept, by id.
    pub fds: HashMap<u64, OwnedFd>,
}

thread_local! {
    /// Kernel lookup counts the request this thread serves has moved and that are not
    /// journaled yet (only with a journal).
    static LOOKUPS: RefCell<Vec<(u64, i64)>> = const { RefCell::new(Vec::new()) };
}

/// A change to mem's metadata: the write lock, and, as it ends (still under the lock),
/// one journal record of everything changed, with the request and its outcome.
struct Txn<'a> {
    fs: &'a MemFs,
    st: RwLockWriteGuard<'a, State>,
    unique: u64,
    outcome: Option<Outcome>,
}

impl Txn<'_> {
    /// What the request returns, for answering it again after a crash.
    fn done(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl std::ops::Deref for Txn<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.st
    }
}

impl std::ops::DerefMut for Txn<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.st
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if let Some(j) = &self.fs.journal {
            LOOKUPS.with(|l| {
                journal::commit(
                    &mut self.st,
                    j,
                    self.unique,
                    self.outcome.take(),
                    &mut l.borrow_mut(),
                )
            });
        }
    }
}

/// A read that counts kernel lookups (LOOKUP, READDIRPLUS): the read lock, and the
/// counts journaled before it is released.
struct ReadTxn<'a> {
    fs: &'a MemFs,
    st: RwLockReadGuard<'a, State>,
    unique: u64,
}

impl std::ops::Deref for ReadTxn<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.st
    }
}

impl Drop for ReadTxn<'_> {
    fn drop(&mut self) {
        if let Some(j) = &self.fs.journal {
            LOOKUPS.with(|l| journal::commit_lookups(j, self.unique, &mut l.borrow_mut()));
        }
    }
}

/// A request's unique as journal records name it (without the kernel's resend bit).
fn base_unique(ctx: &Context) -> u64 {
    ctx.unique & !abi::UNIQUE_RESEND
}
fn in_group(ctx: &Context, gid: u32) -> bool {
    ctx.gid == gid || ctx.supp_group == Some(gid)
}

/// Validates a name a new directory entry would get.
fn check_new_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    if b.is_empty() || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::EINVAL);
    }
    if b == b"." || b == b".." {
        return Err(Errno(libc::EEXIST));
    }
    Ok(())
}

/// Clears set-user-id, and set-group-id when group-executable (as `should_remove_suid`).
fn kill_suidgid(mode: u32, gid: u32, ctx: &Context) -> u32 {
    fsva_appliance::filesystem::mode_after_kill_suidgid(mode, gid, ctx)
}

impl MemFs {
    pub fn new(mut config: MemConfig) -> MemFs {
        // statfs reports the real file limit, so `df -i` tells before ENOSPC does.
        let nofile = raise_nofile_limit();
        config.max_inodes = config
            .max_inodes
            .min(nofile.saturating_sub(RESERVED_FDS).max(RESERVED_FDS));
        let mut root = Inode::new(
            libc::S_IFDIR | (config.root_mode & 0o7777),
            config.root_uid,
            config.root_gid,
            Kind::Dir(Dir::new(ROOT)),
        );
        root.nlink = 2;
        MemFs {
            state: RwLock::new(State {
                inodes: InodeTable::new(root),
                handles: HandleTable::default(),
            }),
            space: Space::new(config.capacity_bytes),
            config,
            journal: None,
            recovered: Mutex::default(),
            has_recovered: AtomicBool::new(false),
        }
    }

    /// A new, empty file system whose every change goes to `journal` and whose memfds
    /// go to `keeper`, so that a successor can rebuild it after a crash.
    pub fn journaled(config: MemConfig, journal: Arc<Journal>, keeper: Arc<dyn Keeper>) -> MemFs {
        let capacity = config.capacity_bytes;
        let mut fs = MemFs::new(config);
        fs.space = Space::kept(capacity, Some(keeper), 1);
        fs.attach(journal);
        fs
    }

    /// An empty file system replacing one whose state was lost (its checkpoint or
    /// journal could not be read): every node and handle the kernel still holds from
    /// before answers ESTALE, new ones are numbered from `base` on.
    pub fn after_loss(
        config: MemConfig,
        journal: Arc<Journal>,
        keeper: Arc<dyn Keeper>,
        base: u64,
    ) -> MemFs {
        let mut fs = MemFs::journaled(config, journal, keeper);
        let st = fs.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.inodes.after_loss(base);
        st.handles.after_loss(base);
        fs
    }

    /// Starts recording every change in `journal`.
    fn attach(&mut self, journal: Arc<Journal>) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.inodes.track();
        st.handles.track();
        self.journal = Some(journal);
    }

    /// The file system a dead predecessor left: its last checkpoint with the journal
    /// records after it replayed, memfds from the supervisor's keeping. Memfds the
    /// supervisor kept that nothing names any more are given back. Goes on recording
    /// in `journal`.
    pub fn recover(
        config: MemConfig,
        journal: Arc<Journal>,
        keeper: Arc<dyn Keeper>,
        recovery: Recovery,
    ) -> std::result::Result<MemFs, fsva_appliance::state::StateError> {
        let preloaded = Self::preload(config, recovery.checkpoint.as_deref(), recovery.fds)?;
        Self::finish_recovery(preloaded, journal, keeper, recovery.records)
    }

    /// The first half of a recovery, done ahead of need by a spare successor while its
    /// predecessor still serves: the checkpoint restored with the memfds kept so far.
    pub fn preload(
        mut config: MemConfig,
        checkpoint: Option<&[u8]>,
        fds: HashMap<u64, OwnedFd>,
    ) -> std::result::Result<Preloaded, fsva_appliance::state::StateError> {
        let top_id = fds.keys().copied().max().unwrap_or(0);
        let data = snapshot::DataSource::new(snapshot::Descriptors::ById(fds));
        let nofile = raise_nofile_limit();
        config.max_inodes = config
            .max_inodes
            .min(nofile.saturating_sub(RESERVED_FDS).max(RESERVED_FDS));
        // The keeper comes last: nothing dropped while rebuilding is given back.
        let space = Space::kept(config.capacity_bytes, None, top_id + 1);
        let mut p = Preloaded {
            config,
            space,
            data,
            tables: None,
            answers: HashMap::new(),
        };
        p.reload(checkpoint)?;
        Ok(p)
    }

    /// The second half: the journal records after the checkpoint replayed on the
    /// preloaded state, checked, and the memfds nothing names given back.
    pub fn finish_recovery(
        p: Preloaded,
        journal: Arc<Journal>,
        keeper: Arc<dyn Keeper>,
        records: Vec<Vec<u8>>,
    ) -> std::result::Result<MemFs, fsva_appliance::state::StateError> {
        let Preloaded {
            config,
            space,
            mut data,
            tables,
            answers: carried,
        } = p;
        let mut fs = match tables {
            Some((inodes, handles)) => MemFs {
                state: RwLock::new(State { inodes, handles }),
                space: space.clone(),
                config,
                journal: None,
                recovered: Mutex::default(),
                has_recovered: AtomicBool::new(false),
            },
            None => {
                let mut fs = MemFs::new(config);
                fs.space = space.clone();
                fs
            }
        };
        let t0 = std::time::Instant::now();
        let records = records
            .iter()
            .map(|r| journal::decode(r))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let decoded = t0.elapsed();
        let live = {
            let st = fs.state.get_mut().unwrap_or_else(|e| e.into_inner());
            let journal::Replayed { answers, touched } =
                journal::replay(st, records, &mut data, &space)?;
            let replayed = t0.elapsed();
            journal::check(
                &mut st.inodes,
                &st.handles,
                &data,
                journal::Checking::Replayed(&touched),
            )?;
            tracing::debug!(
                decoded_us = decoded.as_micros() as u64,
                replayed_us = replayed.as_micros() as u64,
                checked_us = t0.elapsed().as_micros() as u64,
                "journal replayed"
            );
            space.ids_after(data.top_id());
            // Answers a checkpoint carried, then what the replay says (newer).
            let mut all = carried;
            all.extend(answers);
            fs.has_recovered.store(!all.is_empty(), Ordering::Relaxed);
            *fs.recovered.get_mut().unwrap_or_else(|e| e.into_inner()) = Answers {
                map: all,
                since: Some(std::time::Instant::now()),
            };
            let (_, all) = st.inodes.parts();
            all.filter_map(|(_, i)| i.data().map(|d| d.id()))
                .collect::<std::collections::HashSet<u64>>()
        };
        let unused: Vec<u64> = data
            .received_ids()
            .into_iter()
            .filter(|id| !live.contains(id))
            .collect();
        drop(data);
        space.attach_keeper(keeper.clone());
        for id in unused {
            keeper.release(id);
        }
        fs.attach(journal);
        Ok(fs)
    }

    /// A file system restored from a predecessor's snapshot (live restart).
    pub fn restore(
        mut config: MemConfig,
        state: fsva_appliance::state::BackendState,
    ) -> std::result::Result<MemFs, fsva_appliance::state::StateError> {
        let nofile = raise_nofile_limit();
        config.max_inodes = config
            .max_inodes
            .min(nofile.saturating_sub(RESERVED_FDS).max(RESERVED_FDS));
        let space = Space::new(config.capacity_bytes);
        let mut data = snapshot::DataSource::new(snapshot::Descriptors::ByIndex(state.fds));
        let restored = snapshot::restore(&state.bytes, &mut data, &space)?;
        Ok(MemFs {
            state: RwLock::new(State {
                inodes: restored.inodes,
                handles: restored.handles,
            }),
            space,
            config,
            journal: None,
            recovered: Mutex::default(),
            has_recovered: AtomicBool::new(false),
        })
    }

    /// A metadata change on behalf of request `unique` (0: none).
    fn txn(&self, unique: u64) -> Txn<'_> {
        Txn {
            fs: self,
            st: self.wlock(),
            unique,
            outcome: None,
        }
    }

    /// A read that counts lookups on behalf of request `unique`.
    fn read_txn(&self, unique: u64) -> ReadTxn<'_> {
        ReadTxn {
            fs: self,
            st: self.rlock(),
            unique,
        }
    }

    /// Notes a change of `ino`'s kernel lookup count for the journal.
    fn note_lookups(&self, ino: u64, delta: i64) {
        if self.journal.is_some() {
            LOOKUPS.with(|l| l.borrow_mut().push((ino, delta)));
        }
    }

    fn rlock(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn wlock(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a file just made by CREATE or TMPFILE: its handle, the entry the kernel
    /// counts, and the open flags (the write lock is released before the backing file
    /// is registered, which may ask the supervisor).
    fn open_created(
        &self,
        mut st: Txn<'_>,
        ino: u64,
        data: Arc<FileData>,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        let fh = Self::open_handle(&mut st, ino, Some(data.clone()), flags)?;
        let entry = self.entry(ino, st.inodes.get(ino)?);
        st.done(Outcome::Created { ino, fh });
        drop(st);
        Ok((
            entry,
            Opened {
                fh,
                open_flags: FILE_OPEN_FLAGS,
                backing: self.backing_for(ino, &data),
            },
        ))
    }

    /// An `Entry` for `ino`, counting one kernel lookup reference.
    fn entry(&self, ino: u64, inode: &Inode) -> Entry {
        inode.lookups.fetch_add(1, Ordering::Relaxed);
        self.note_lookups(ino, 1);
        self.entry_uncounted(ino, inode)
    }

    /// An `Entry` for `ino` whose lookup was counted already.
    fn entry_uncounted(&self, ino: u64, inode: &Inode) -> Entry {
        Entry {
            ino,
            generation: 0,
            attr: inode.meta(ino).to_attr(),
            entry_ttl: self.config.ttl,
            attr_ttl: self.config.ttl,
        }
    }

    /// Creates a new inode named `name` in `parent`: owner, set-gid inheritance, ACL or
    /// umask, parent link count and times. `mode` includes the file type.
    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &self,
        st: &mut State,
        ctx: &Context,
        parent: u64,
        name: Option<&OsStr>,
        mode: u32,
        umask: u32,
        kind: Kind,
    ) -> Result<u64> {
        if let Some(name) = name {
            check_new_name(name)?;
        }
        let p = st.inodes.get(parent)?;
        let pdir = p.dir()?;
        if p.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        if let Some(name) = name {
            if pdir.get(name).is_some() {
                return Err(Errno(libc::EEXIST));
            }
        }
        if st.inodes.len() as u64 >= self.config.max_inodes {
            return Err(Errno(libc::ENOSPC));
        }
        let is_dir = mode & S_IFMT == libc::S_IFDIR;
        let is_link = mode & S_IFMT == libc::S_IFLNK;
        let mut mode = mode;
        let parent_sgid = p.mode & S_ISGID != 0;
        let gid = if parent_sgid { p.gid } else { ctx.gid };
        if is_dir {
            if parent_sgid {
                mode |= S_ISGID;
            }
        } else if mode & S_ISGID != 0 && ctx.uid != 0 && !in_group(ctx, gid) {
            mode &= !S_ISGID;
        }
        // POSIX_ACL is negotiated: the kernel leaves the umask to us.
        let default_acl = p
            .xattrs
            .raw(acl::DEFAULT)
            .and_then(|v| Acl::parse(v).ok())
            .filter(|a| !a.0.is_empty());
        let mut access = None;
        let mut inherit_default = None;
        if !is_link {
            match &default_acl {
                Some(d) => {
                    let (m, a) = d.create(mode);
                    mode = m;
                    access = a;
                    if is_dir {
                        inherit_default = Some(d.encode());
                    }
                }
                None => mode &= !(umask & 0o777),
            }
        }
        let mut inode = Inode::new(mode, ctx.uid, gid, kind);
        if is_dir {
            inode.nlink = 2;
        }
        if name.is_none() {
            inode.nlink = 0;
        }
        if let Some(a) = access {
            inode.xattrs.put(acl::ACCESS, a.encode());
        }
        if let Some(d) = inherit_default {
            inode.xattrs.put(acl::DEFAULT, d);
        }
        let now = inode.ctime;
        let ino = st.inodes.insert(inode);
        if let Some(name) = name {
            let p = st.inodes.get_mut(parent)?;
            p.dir_mut()?.insert(name, ino);
            if is_dir {
                p.nlink += 1;
            }
            p.touch_mc(now);
        }
        Ok(ino)
    }

    /// A new handle on `ino` (the caller has checked its type).
    fn open_handle(
        st: &mut State,
        ino: u64,
        data: Option<Arc<FileData>>,
        flags: u32,
    ) -> Result<u64> {
        st.inodes.get_mut(ino)?.opens += 1;
        Ok(st.handles.insert(Handle { ino, data, flags }))
    }

    /// The memfd of regular file `ino`, created on first use.
    fn file_data(&self, st: &mut State, ino: u64) -> Result<Arc<FileData>> {
        let inode = st.inodes.get_mut(ino)?;
        match &mut inode.kind {
            Kind::File(Some(d)) => Ok(d.clone()),
            Kind::File(slot) => {
                let d = Arc::new(FileData::new(self.space.clone())?);
                *slot = Some(d.clone());
                Ok(d)
            }
            Kind::Dir(_) => Err(Errno(libc::EISDIR)),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The memfd to offer the kernel as a FUSE passthrough backing file: the shared
    /// memory of the seed, literally. Not for set-id files, whose writes must reach us
    /// to clear the bits for the caller.
    fn backing_for(&self, ino: u64, data: &FileData) -> Option<std::os::fd::OwnedFd> {
        let mode = self.rlock().inodes.get(ino).ok()?.mode;
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            return None;
        }
        data.fd().try_clone().ok()
    }

    /// Updates m/ctime (and applies WRITE_KILL_SUIDGID) after data changed, for request
    /// `unique`, which returns `outcome`.
    fn data_changed(&self, ino: u64, kill: Option<&Context>, unique: u64, outcome: Outcome) {
        let mut st = self.txn(unique);
        st.done(outcome);
        if let Ok(i) = st.inodes.get_mut(ino) {
            i.touch_mc(Time::now());
            if let Some(ctx) = kill {
                i.mode = kill_suidgid(i.mode, i.gid, ctx);
            }
        }
    }

    /// Drops a name's link from `child`; frees it if nothing else refers to it.
    fn unlink_inode(st: &mut State, child: u64, now: Time) -> Option<Inode> {
        if let Ok(c) = st.inodes.get_mut(child) {
            c.nlink = if c.is_dir() {
                0
            } else {
                c.nlink.saturating_sub(1)
            };
            c.ctime = now;
        }
        st.inodes.release_if_unused(child)
    }

    /// Whether `ancestor` is `ino` or one of its ancestors.
    /// (A chain longer than the table — a cycle a hostile predecessor's state could
    /// hold — ends the walk instead of looping.)
    fn is_ancestor(st: &State, ancestor: u64, mut ino: u64) -> bool {
        for _ in 0..=st.inodes.len() {
            if ino == ancestor {
                return true;
            }
            match st.inodes.get(ino).and_then(|i| i.dir().map(|d| d.parent)) {
                Ok(p) if p != ino => ino = p,
                _ => return false,
            }
        }
        false
    }

    fn do_rename(
        &self,
        st: &mut State,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<Option<Inode>> {
        let src = st
            .inodes
            .get(parent)?
            .dir()?
            .get(name)
            .ok_or(Errno::ENOENT)?;
        let dst = st.inodes.get(newparent)?.dir()?.get(newname);
        let src_dir = st.inodes.get(src)?.is_dir();
        let now = Time::now();
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(Errno::ENOENT)?;
            if dst == src {
                return Ok(None);
            }
            let dst_dir = st.inodes.get(dst)?.is_dir();
            if (src_dir && Self::is_ancestor(st, src, newparent))
                || (dst_dir && Self::is_ancestor(st, dst, parent))
            {
                return Err(Errno::EINVAL);
            }
            st.inodes.get_mut(parent)?.dir_mut()?.set(name, dst);
            st.inodes.get_mut(newparent)?.dir_mut()?.set(newname, src);
            if parent != newparent && src_dir != dst_dir {
                let (moved_in, moved_out) = if src_dir {
                    (newparent, parent)
                } else {
                    (parent, newparent)
                };
                st.inodes.get_mut(moved_in)?.nlink += 1;
                st.inodes.get_mut(moved_out)?.nlink -= 1;
            }
            if src_dir {
                st.inodes.get_mut(src)?.dir_mut()?.parent = newparent;
            }
            if dst_dir {
                st.inodes.get_mut(dst)?.dir_mut()?.parent = parent;
            }
            st.inodes.get_mut(src)?.ctime = now;
            st.inodes.get_mut(dst)?.ctime = now;
            st.inodes.get_mut(parent)?.touch_mc(now);
            st.inodes.get_mut(newparent)?.touch_mc(now);
            return Ok(None);
        }
        if dst == Some(src) {
            return Ok(None);
        }
        if let Some(d) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Errno(libc::EEXIST));
            }
            let di = st.inodes.get(d)?;
            match (src_dir, di.is_dir()) {
                (false, true) => return Err(Errno(libc::EISDIR)),
                (true, false) => return Err(Errno(libc::ENOTDIR)),
                (true, true) if !di.dir()?.is_empty() => return Err(Errno(libc::ENOTEMPTY)),
                _ => {}
            }
        }
        if src_dir && Self::is_ancestor(st, src, newparent) {
            return Err(Errno::EINVAL);
        }
        st.inodes.get_mut(parent)?.dir_mut()?.remove(name);
        st.inodes.get_mut(newparent)?.dir_mut()?.set(newname, src);
        let mut freed = None;
        if let Some(d) = dst {
            if st.inodes.get(d)?.is_dir() {
                st.inodes.get_mut(newparent)?.nlink -= 1;
            }
            freed = Self::unlink_inode(st, d, now);
        }
        if src_dir && parent != newparent {
            st.inodes.get_mut(src)?.dir_mut()?.parent = newparent;
            st.inodes.get_mut(parent)?.nlink -= 1;
            st.inodes.get_mut(newparent)?.nlink += 1;
        }
        st.inodes.get_mut(src)?.ctime = now;
        st.inodes.get_mut(parent)?.touch_mc(now);
        st.inodes.get_mut(newparent)?.touch_mc(now);
        Ok(freed)
    }

    /// The reply a request that had taken effect before the crash returned.
    fn completed_outcome(&self, o: Outcome) -> Option<Completed> {
        let st = self.rlock();
        let entry = |ino: u64| -> Option<Entry> {
            Some(self.entry_uncounted(ino, st.inodes.get(ino).ok()?))
        };
        let opened = |fh: u64| -> Option<(u64, Opened, Option<Arc<FileData>>)> {
            let h = st.handles.peek(fh)?;
            let flags = if h.data.is_some() {
                FILE_OPEN_FLAGS
            } else {
                fopen::CACHE_DIR | fopen::KEEP_CACHE
            };
            Some((
                h.ino,
                Opened {
                    fh,
                    open_flags: flags,
                    backing: None,
                },
                h.data.clone(),
            ))
        };
        let done = match o {
            Outcome::Looked | Outcome::Undone => return None,
            Outcome::Entry(ino) => Completed::Entry(entry(ino)?),
            Outcome::Attr(ino) => Completed::Attr(
                st.inodes.get(ino).ok()?.meta(ino).to_attr(),
                self.config.ttl,
            ),
            Outcome::Opened(fh) => {
                let (ino, mut o, data) = opened(fh)?;
                drop(st);
                o.backing = data.and_then(|d| self.backing_for(ino, &d));
                Completed::Opened(o)
            }
            Outcome::Created { ino, fh } => {
                let e = entry(ino)?;
                let (_, mut o, data) = opened(fh)?;
                drop(st);
                o.backing = data.and_then(|d| self.backing_for(ino, &d));
                Completed::Created(e, o)
            }
            Outcome::Written(n) => Completed::Written(n),
            Outcome::Copied(n) => Completed::Copied(n),
            Outcome::Done => Completed::Done,
        };
        Some(done)
    }

    /// SETXATTR's change (ACLs keep the mode in step, as the kernel leaves that to us).
    fn set_xattr(
        st: &mut State,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
        setxattr_flags: u32,
    ) -> Result<()> {
        let inode = st.inodes.get_mut(ino)?;
        if name == acl::ACCESS || name == acl::DEFAULT {
            let exists = inode.xattrs.raw(name).is_some();
            if flags & libc::XATTR_CREATE as u32 != 0 && exists {
                return Err(Errno(libc::EEXIST));
            }
            if flags & libc::XATTR_REPLACE as u32 != 0 && !exists {
                return Err(Errno(libc::ENODATA));
            }
            let a = Acl::parse(value)?;
            if name == acl::DEFAULT {
                if !inode.is_dir() {
                    return Err(Errno(libc::EACCES));
                }
                if a.0.is_empty() {
                    inode.xattrs.take(name);
                } else {
                    inode.xattrs.put(name, a.encode());
                }
            } else {
                if a.0.is_empty() {
                    return Err(Errno::EINVAL);
                }
                // The kernel leaves the mode update to the file system (fs/fuse/acl.c).
                inode.mode = (inode.mode & !0o777) | a.mode_bits();
                // The kernel decides whether the caller may keep S_ISGID.
                if setxattr_flags & wflags::SETXATTR_ACL_KILL_SGID != 0 {
                    inode.mode &= !S_ISGID;
                }
                if a.is_minimal() {
                    inode.xattrs.take(name);
                } else {
                    inode.xattrs.put(name, a.encode());
                }
            }
        } else {
            inode.xattrs.set(name, value, flags)?;
        }
        inode.ctime = Time::now();
        Ok(())
    }

    /// The answers for resent requests still kept (for a checkpoint to carry).
    fn answers(&self) -> Vec<(u64, Recovered)> {
        if !self.has_recovered.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let a = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
        if a.since.is_some_and(|t| t.elapsed() > ANSWERS_KEPT) {
            return Vec::new();
        }
        a.map.iter().map(|(&u, r)| (u, r.clone())).collect()
    }

    /// Drops `n` kernel lookups of `ino`; the inode if that freed it (to drop outside
    /// the lock).
    fn drop_lookups(&self, st: &mut State, ino: u64, n: u64) -> Option<Inode> {
        if let Ok(i) = st.inodes.get(ino) {
            if let Ok(before) = i
                .lookups
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    Some(c.saturating_sub(n))
                })
            {
                self.note_lookups(ino, -(before.min(n) as i64));
            }
        }
        st.inodes.release_if_unused(ino)
    }

    fn attr_of(&self, ino: u64) -> Result<(abi::Attr, Duration)> {
        let st = self.rlock();
        Ok((st.inodes.get(ino)?.meta(ino).to_attr(), self.config.ttl))
    }
}

impl Filesystem for MemFs {
    fn init(&self, _kernel_flags: u64) -> InitRequest {
        InitRequest {
            // Our memfds may serve as FUSE passthrough backing files.
            flags: POSIX_BACKEND_FLAGS | fsva_protocol::abi::init_flags::PASSTHROUGH,
            max_write: 1 << 20,
        }
    }

    /// mem's directories map names as bytes.
    fn names_exact(&self, _ino: u64) -> bool {
        true
    }

    /// The cache budget is mem's capacity: what it may hold before writes get ENOSPC.
    fn set_cache_budget(&self, bytes: u64) {
        self.space.set_capacity(bytes);
    }

    fn take_memfds_from(&self, source: Arc<dyn fsva_appliance::MemfdSource>) {
        self.space.take_memfds_from(source);
    }

    fn checkpoint(
        &self,
    ) -> std::result::Result<fsva_appliance::state::BackendState, fsva_appliance::state::StateError>
    {
        // The write lock: nothing changes while the snapshot is taken (the runtime has
        // paused its workers too; this guards against anything else).
        let st = self.wlock();
        snapshot::take(&st.inodes, &st.handles, &self.space)
    }

    fn journal_checkpoint(
        &self,
        rotate: &mut dyn FnMut() -> u64,
    ) -> std::result::Result<(Vec<u8>, u64), fsva_appliance::state::StateError> {
        if self.journal.is_none() {
            return Err(fsva_appliance::state::StateError::Unsupported(
                "this mem keeps no recovery journal".into(),
            ));
        }
        // Every change and its record happen under this lock: the snapshot and the
        // boundary agree.
        let st = self.wlock();
        let bytes = snapshot::take_by_id(&st.inodes, &st.handles, &self.space, self.answers());
        let boundary = rotate();
        Ok((bytes, boundary))
    }

    fn completed(&self, unique: u64) -> Option<Completed> {
        if !self.has_recovered.load(Ordering::Relaxed) {
            return None;
        }
        let answer = {
            let mut a = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
            if a.since.is_some_and(|t| t.elapsed() > ANSWERS_KEPT) {
                a.map.clear();
                self.has_recovered.store(false, Ordering::Relaxed);
            }
            a.map.remove(&unique)?
        };
        match answer {
            Recovered::Undo(lookups) => {
                // Counted before the crash, not answered: give them back and run again.
                // Journaled under the request, so that a successor's successor knows
                // they were given back (and does not give them back twice).
                let mut st = self.txn(unique);
                let mut freed = Vec::new();
                for (ino, n) in lookups {
                    if n > 0 {
                        freed.extend(self.drop_lookups(&mut st, ino, n as u64));
                    }
                }
                st.done(Outcome::Undone);
                drop(st);
                drop(freed);
                None
            }
            Recovered::Outcome(o) => self.completed_outcome(o),
        }
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<Entry> {
        if name.len() > NAME_MAX {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        let st = self.read_txn(base_unique(_ctx));
        let p = st.inodes.get(parent)?;
        let ino = match name.as_bytes() {
            // The VFS resolves "." itself; the kernel sends it only to find a node again
            // by its id (open_by_handle_at), for any kind of node. A node that was
            // removed is stale, even while the kernel's FORGET for it is still on its
            // way (the node then lingers here with no name).
            b"." if p.nlink == 0 => return Err(Errno(libc::ESTALE)),
            b"." => parent,
            b".." => p.dir()?.parent,
            _ => p.dir()?.get(name).ok_or(Errno::ENOENT)?,
        };
        let inode = st.inodes.get(ino)?;
        Ok(self.entry(ino, inode))
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        let mut st = self.txn(0);
        let freed = self.drop_lookups(&mut st, ino, nlookup);
        drop(st);
        drop(freed);
    }

    fn getattr(&self, _ctx: &Context, ino: u64, _fh: Option<u64>) -> Result<(abi::Attr, Duration)> {
        self.attr_of(ino)
    }

    fn setattr(
        &self,
        ctx: &Context,
        ino: u64,
        set: &abi::SetattrIn,
    ) -> Result<(abi::Attr, Duration)> {
        let v = set.valid;
        let unique = base_unique(ctx);
        if v & fattr::SIZE != 0 {
            let data = {
                let mut st = self.txn(unique);
                self.file_data(&mut st, ino)?
            };
            data.truncate(set.size)?;
        }
        let mut st = self.txn(unique);
        let now = Time::now();
        let inode = st.inodes.get_mut(ino)?;
        inode.absorb_data_times();
        // A SETATTR with nothing to set is what chown(f, -1, -1) or a set-id kill the
        // kernel dropped turn into (it never sends FATTR_CTIME without writeback cache);
        // a local file system updates ctime for them, so do that here too.
        let mut changed = v & !(fattr::FH | fattr::LOCKOWNER) == 0 || v & fattr::SIZE != 0;
        if v & fattr::MODE != 0 {
            inode.mode = (inode.mode & S_IFMT) | (set.mode & 0o7777);
            if let Some(mut a) = inode
                .xattrs
                .raw(acl::ACCESS)
                .and_then(|b| Acl::parse(b).ok())
            {
                a.chmod(inode.mode);
                inode.xattrs.put(acl::ACCESS, a.encode());
            }
            changed = true;
        }
        if v & fattr::UID != 0 {
            inode.uid = set.uid;
            changed = true;
        }
        if v & fattr::GID != 0 {
            inode.gid = set.gid;
            changed = true;
        }
        if v & fattr::KILL_SUIDGID != 0 {
            inode.mode = kill_suidgid(inode.mode, inode.gid, ctx);
            changed = true;
        }
        if v & fattr::ATIME != 0 {
            inode.atime = if v & fattr::ATIME_NOW != 0 {
                now
            } else {
                Time::from_wire(set.atime, set.atimensec)
            };
            changed = true;
        }
        if v & fattr::MTIME != 0 {
            inode.mtime = if v & fattr::MTIME_NOW != 0 {
                now
            } else {
                Time::from_wire(set.mtime, set.mtimensec)
            };
            changed = true;
        } else if v & fattr::SIZE != 0 {
            inode.mtime = now;
        }
        if v & fattr::CTIME != 0 {
            inode.ctime = Time::from_wire(set.ctime, set.ctimensec);
        } else if changed {
            inode.ctime = now;
        }
        if v & (fattr::MTIME | fattr::SIZE) != 0 {
            inode.mirror_mtime();
        } else {
            inode.note_data_times();
        }
        let attr = inode.meta(ino).to_attr();
        st.done(Outcome::Attr(ino));
        Ok((attr, self.config.ttl))
    }

    fn readlink(&self, _ctx: &Context, ino: u64) -> Result<Vec<u8>> {
        match &self.rlock().inodes.get(ino)?.kind {
            Kind::Symlink(t) => Ok(t.clone()),
            _ => Err(Errno::EINVAL),
        }
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
        let mode = if mode & S_IFMT == 0 {
            mode | libc::S_IFREG
        } else {
            mode
        };
        let kind = match mode & S_IFMT {
            libc::S_IFREG => Kind::File(None),
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK => Kind::Special,
            _ => return Err(Errno::EINVAL),
        };
        let mut st = self.txn(base_unique(ctx));
        let ino = self.make_node(&mut st, ctx, parent, Some(name), mode, umask, kind)?;
        st.done(Outcome::Entry(ino));
        let inode = st.inodes.get_mut(ino)?;
        if matches!(mode & S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
            inode.rdev = rdev;
        }
        Ok(self.entry(ino, inode))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<Entry> {
        let mut st = self.txn(base_unique(ctx));
        let mode = libc::S_IFDIR | (mode & 0o7777);
        let ino = self.make_node(
            &mut st,
            ctx,
            parent,
            Some(name),
            mode,
            umask,
            Kind::Dir(Dir::new(parent)),
        )?;
        st.done(Outcome::Entry(ino));
        Ok(self.entry(ino, st.inodes.get(ino)?))
    }

    fn symlink(&self, ctx: &Context, parent: u64, name: &OsStr, target: &[u8]) -> Result<Entry> {
        if target.len() > SYMLINK_MAX {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        if target.is_empty() {
            return Err(Errno::ENOENT);
        }
        let mut st = self.txn(base_unique(ctx));
        let mode = libc::S_IFLNK | 0o777;
        let ino = self.make_node(
            &mut st,
            ctx,
            parent,
            Some(name),
            mode,
            0,
            Kind::Symlink(target.to_vec()),
        )?;
        st.done(Outcome::Entry(ino));
        Ok(self.entry(ino, st.inodes.get(ino)?))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        let mut st = self.txn(base_unique(ctx));
        let child = st
            .inodes
            .get(parent)?
            .dir()?
            .get(name)
            .ok_or(Errno::ENOENT)?;
        if st.inodes.get(child)?.is_dir() {
            return Err(Errno(libc::EISDIR));
        }
        let now = Time::now();
        let p = st.inodes.get_mut(parent)?;
        p.dir_mut()?.remove(name);
        p.touch_mc(now);
        let freed = Self::unlink_inode(&mut st, child, now);
        st.done(Outcome::Done);
        drop(st);
        drop(freed);
        Ok(())
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        match name.as_bytes() {
            b"." => return Err(Errno::EINVAL),
            b".." => return Err(Errno(libc::ENOTEMPTY)),
            n if n.len() > NAME_MAX => return Err(Errno(libc::ENAMETOOLONG)),
            _ => {}
        }
        let mut st = self.txn(base_unique(ctx));
        let child = st
            .inodes
            .get(parent)?
            .dir()?
            .get(name)
            .ok_or(Errno::ENOENT)?;
        if !st.inodes.get(child)?.dir()?.is_empty() {
            return Err(Errno(libc::ENOTEMPTY));
        }
        let now = Time::now();
        let p = st.inodes.get_mut(parent)?;
        p.dir_mut()?.remove(name);
        p.nlink -= 1;
        p.touch_mc(now);
        let freed = Self::unlink_inode(&mut st, child, now);
        st.done(Outcome::Done);
        drop(st);
        drop(freed);
        Ok(())
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
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 || flags == known {
            return Err(Errno::EINVAL);
        }
        if name.len() > NAME_MAX {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        check_new_name(newname).map_err(|e| {
            if e.0 == libc::EEXIST {
                Errno(libc::EBUSY)
            } else {
                e
            }
        })?;
        let mut st = self.txn(base_unique(ctx));
        let freed = self.do_rename(&mut st, parent, name, newparent, newname, flags)?;
        st.done(Outcome::Done);
        drop(st);
        drop(freed);
        Ok(())
    }

    fn link(&self, ctx: &Context, ino: u64, newparent: u64, newname: &OsStr) -> Result<Entry> {
        check_new_name(newname)?;
        let mut st = self.txn(base_unique(ctx));
        if st.inodes.get(ino)?.is_dir() {
            return Err(Errno(libc::EPERM));
        }
        let p = st.inodes.get_mut(newparent)?;
        if p.dir()?.get(newname).is_some() {
            return Err(Errno(libc::EEXIST));
        }
        let now = Time::now();
        p.dir_mut()?.insert(newname, ino);
        p.touch_mc(now);
        st.done(Outcome::Entry(ino));
        let inode = st.inodes.get_mut(ino)?;
        inode.nlink += 1;
        inode.ctime = now;
        Ok(self.entry(ino, inode))
    }

    fn open(&self, ctx: &Context, ino: u64, flags: u32, kill: bool) -> Result<Opened> {
        let unique = base_unique(ctx);
        let data = {
            let mut st = self.txn(unique);
            self.file_data(&mut st, ino)?
        };
        // Truncated before the handle exists, so that a journaled open is a whole one.
        let truncate = flags & libc::O_TRUNC as u32 != 0
            && flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
        if truncate {
            data.truncate(0)?;
        }
        let mut st = self.txn(unique);
        let fh = Self::open_handle(&mut st, ino, Some(data.clone()), flags)?;
        st.done(Outcome::Opened(fh));
        if kill || truncate {
            let i = st.inodes.get_mut(ino)?;
            let now = Time::now();
            if kill {
                i.mode = kill_suidgid(i.mode, i.gid, ctx);
                i.ctime = now;
            }
            if truncate {
                i.touch_mc(now);
            }
        }
        drop(st);
        Ok(Opened {
            fh,
            open_flags: FILE_OPEN_FLAGS,
            backing: self.backing_for(ino, &data),
        })
    }

    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        _flags: u32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let data = self.rlock().handles.data(fh, ino)?;
        data.read_into(offset, size, out)
    }

    fn write(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        buf: &[u8],
        write_flags: u32,
        flags: u32,
    ) -> Result<u32> {
        let data = self.rlock().handles.data(fh, ino)?;
        let append = flags & libc::O_APPEND as u32 != 0;
        let kill = (write_flags & wflags::WRITE_KILL_SUIDGID != 0).then_some(ctx);
        if append && ctx.unique & abi::UNIQUE_RESEND != 0 && data.holds_at(offset, buf) {
            // A resent append whose bytes are already at the end the kernel saw: it took
            // effect before the appliance died (the kernel serialises writes to a file,
            // so nothing else could have put them there).
            let n = buf.len() as u32;
            self.data_changed(ino, kill, base_unique(ctx), Outcome::Written(n));
            return Ok(n);
        }
        let n = data.write(offset, buf, append)?;
        if n > 0 {
            self.data_changed(ino, kill, base_unique(ctx), Outcome::Written(n));
        }
        Ok(n)
    }

    fn release(&self, ctx: &Context, ino: u64, fh: u64, _flags: u32) -> Result<()> {
        let mut st = self.txn(base_unique(ctx));
        let h = st.handles.remove(fh, ino)?;
        st.done(Outcome::Done);
        if let Ok(i) = st.inodes.get_mut(ino) {
            i.opens = i.opens.saturating_sub(1);
        }
        let freed = st.inodes.release_if_unused(ino);
        drop(st);
        drop(h);
        drop(freed);
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, ino: u64, fh: u64, _datasync: bool) -> Result<()> {
        self.rlock().handles.get(fh, ino).map(|_| ())
    }

    fn opendir(&self, ctx: &Context, ino: u64, flags: u32) -> Result<Opened> {
        let mut st = self.txn(base_unique(ctx));
        st.inodes.get(ino)?.dir()?;
        let fh = Self::open_handle(&mut st, ino, None, flags)?;
        st.done(Outcome::Opened(fh));
        Ok(Opened {
            fh,
            // Only this mount changes mem's directories, and the kernel drops its cached
            // listing whenever it changes one: a repeated listing costs no READDIR.
            open_flags: fopen::CACHE_DIR | fopen::KEEP_CACHE,
            backing: None,
        })
    }

    fn readdir(
        &self,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirSink,
    ) -> Result<()> {
        let st = self.read_txn(base_unique(ctx));
        st.handles.get(fh, ino)?;
        let me = st.inodes.get(ino)?;
        let dir = me.dir()?;
        let plus = sink.is_plus();
        let dot = |sink: &mut DirSink, ino: u64, next: u64, name: &str| -> bool {
            let name = OsStr::new(name);
            if plus {
                let attr = st
                    .inodes
                    .get(ino)
                    .map(|i| i.meta(ino).to_attr())
                    .unwrap_or(abi::Attr {
                        ino,
                        mode: libc::S_IFDIR,
                        ..Default::default()
                    });
                let e = Entry {
                    ino: 0,
                    attr,
                    ..Default::default()
                };
                sink.add_plus(&e, next, libc::DT_DIR as u32, name)
            } else {
                sink.add(ino, next, libc::DT_DIR as u32, name)
            }
        };
        if offset == dir::DOT && !dot(sink, ino, dir::DOT + 1, ".") {
            return Ok(());
        }
        if offset <= dir::DOTDOT && !dot(sink, dir.parent, dir::DOTDOT + 1, "..") {
            return Ok(());
        }
        for (cookie, name, child) in dir.iter_from(offset) {
            let Ok(ci) = st.inodes.get(child) else {
                continue;
            };
            let typ = dtype(ci.mode);
            if plus {
                if !sink.fits(name) {
                    break;
                }
                let e = self.entry(child, ci);
                if !sink.add_plus(&e, cookie + 1, typ, name) {
                    ci.lookups.fetch_sub(1, Ordering::Relaxed);
                    self.note_lookups(child, -1);
                    break;
                }
            } else if !sink.add(child, cookie + 1, typ, name) {
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&self, ctx: &Context, ino: u64, fh: u64) -> Result<()> {
        self.release(ctx, ino, fh, 0)
    }

    fn fsyncdir(&self, _ctx: &Context, ino: u64, fh: u64, _datasync: bool) -> Result<()> {
        self.rlock().handles.get(fh, ino).map(|_| ())
    }

    fn statfs(&self, _ctx: &Context, _ino: u64) -> Result<abi::Kstatfs> {
        let bs = attr::BLKSIZE as u64;
        let blocks = self.space.capacity() / bs;
        let used = self.space.used().div_ceil(bs).min(blocks);
        let files = self.rlock().inodes.len() as u64;
        Ok(abi::Kstatfs {
            blocks,
            bfree: blocks - used,
            bavail: blocks - used,
            files: self.config.max_inodes,
            ffree: self.config.max_inodes.saturating_sub(files),
            bsize: bs as u32,
            namelen: NAME_MAX as u32,
            frsize: bs as u32,
            ..Default::default()
        })
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
        let name = name.as_bytes();
        let mut st = self.txn(base_unique(ctx));
        Self::set_xattr(&mut st, ino, name, value, flags, setxattr_flags)?;
        st.done(Outcome::Done);
        Ok(())
    }

    fn getxattr(&self, _ctx: &Context, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        self.rlock()
            .inodes
            .get(ino)?
            .xattrs
            .get(name.as_bytes(), size)
    }

    fn listxattr(&self, _ctx: &Context, ino: u64, size: u32) -> Result<Xattr> {
        self.rlock().inodes.get(ino)?.xattrs.list(size)
    }

    fn removexattr(&self, ctx: &Context, ino: u64, name: &OsStr) -> Result<()> {
        let mut st = self.txn(base_unique(ctx));
        let inode = st.inodes.get_mut(ino)?;
        inode.xattrs.remove(name.as_bytes())?;
        inode.ctime = Time::now();
        st.done(Outcome::Done);
        Ok(())
    }

    fn access(&self, _ctx: &Context, ino: u64, _mask: u32) -> Result<()> {
        self.rlock().inodes.get(ino).map(|_| ())
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
        let mut st = self.txn(base_unique(ctx));
        let existing = st.inodes.get(parent)?.dir()?.get(name);
        let ino = match existing {
            Some(_) if flags & libc::O_EXCL as u32 != 0 => return Err(Errno(libc::EEXIST)),
            Some(ino) => ino,
            None => {
                let data = Arc::new(FileData::new(self.space.clone())?);
                let mode = libc::S_IFREG | (mode & 0o7777);
                self.make_node(
                    &mut st,
                    ctx,
                    parent,
                    Some(name),
                    mode,
                    umask,
                    Kind::File(Some(data)),
                )?
            }
        };
        let data = self.file_data(&mut st, ino)?;
        self.open_created(st, ino, data, flags)
    }

    fn tmpfile(
        &self,
        ctx: &Context,
        parent: u64,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        let mut st = self.txn(base_unique(ctx));
        let data = Arc::new(FileData::new(self.space.clone())?);
        let mode = libc::S_IFREG | (mode & 0o7777);
        let ino = self.make_node(
            &mut st,
            ctx,
            parent,
            None,
            mode,
            umask,
            Kind::File(Some(data.clone())),
        )?;
        self.open_created(st, ino, data, flags)
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
        let data = self.rlock().handles.data(fh, ino)?;
        let before = data.size()?;
        data.fallocate(offset, length, mode as i32)?;
        let punch = mode as i32 & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        if punch || data.size()? != before {
            self.data_changed(ino, None, base_unique(ctx), Outcome::Done);
        }
        Ok(())
    }

    fn lseek(&self, _ctx: &Context, ino: u64, fh: u64, offset: u64, whence: u32) -> Result<u64> {
        let data = self.rlock().handles.data(fh, ino)?;
        match whence as i32 {
            libc::SEEK_DATA | libc::SEEK_HOLE | libc::SEEK_SET | libc::SEEK_END => {
                data.lseek(offset, whence)
            }
            _ => Err(Errno::EINVAL),
        }
    }

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
        if flags != 0 {
            return Err(Errno::EINVAL);
        }
        let (src, dst) = {
            let st = self.rlock();
            (
                st.handles.data(fh_in, ino_in)?,
                st.handles.data(fh_out, ino_out)?,
            )
        };
        let n = src.copy_to(off_in, &dst, off_out, len)?;
        if n > 0 {
            self.data_changed(ino_out, None, base_unique(ctx), Outcome::Copied(n));
        }
        Ok(n)
    }

    fn statx(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: Option<u64>,
        _flags: u32,
        _mask: u32,
    ) -> Result<(abi::Statx, Duration)> {
        let st = self.rlock();
        Ok((st.inodes.get(ino)?.meta(ino).to_statx(), self.config.ttl))
    }
}

#[cfg(test)]
mod tests;

//! Open file and directory handles: the `fh` the kernel passes back on READ, WRITE,
//! READDIR, RELEASE, ... mapped to the host descriptor opened for it, with the node it
//! was opened on and the flags it was opened with (what a restore needs to open it
//! again). A restore may leave handles stale (their object is lost): those answer
//! ESTALE until released. With a recovery journal, every handle opened or closed is
//! recorded under the table lock as it happens. This module never opens or closes
//! anything itself.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use fsva_appliance::Errno;

use crate::dir::DirStream;
use crate::inode::Node;
use crate::journal::{OpV1, OutcomeV1, Recorder};
use crate::read_trail::ReadTrail;
use crate::snapshot::HandleKindV1;

/// What one `fh` stands for.
pub enum Handle {
    /// A regular (or special) file opened with the caller's flags.
    File {
        fd: OwnedFd,
        node: Arc<Node>,
        /// The open flags the kernel sent (O_DIRECT included).
        flags: u32,
        /// What to drop after reads the client caches; `None` for O_DIRECT opens,
        /// whose reads the client does not cache.
        trail: Option<Box<ReadTrail>>,
    },
    /// A directory stream.
    Dir { stream: DirStream, node: Arc<Node> },
}

impl AsFd for Handle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

impl Handle {
    /// A file handle for `fd`, opened with the client's `flags`.
    pub fn file(fd: OwnedFd, node: Arc<Node>, flags: u32) -> Handle {
        let direct = flags as i32 & libc::O_DIRECT != 0;
        Handle::File {
            fd,
            node,
            flags,
            trail: (!direct).then(Box::default),
        }
    }

    /// A directory handle listing `fd`, a directory opened for reading on `node`.
    pub fn dir(fd: OwnedFd, node: Arc<Node>) -> Handle {
        Handle::Dir {
            stream: DirStream::new(fd),
            node,
        }
    }

    /// The read trail of a file handle whose reads the client caches.
    pub fn read_trail(&self) -> Option<&ReadTrail> {
        match self {
            Handle::File { trail, .. } => trail.as_deref(),
            Handle::Dir { .. } => None,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Handle::File { fd, .. } => fd.as_fd(),
            Handle::Dir { stream, .. } => stream.fd(),
        }
    }

    /// The node of a file handle.
    pub fn node(&self) -> Option<&Arc<Node>> {
        match self {
            Handle::File { node, .. } => Some(node),
            Handle::Dir { .. } => None,
        }
    }

    /// The node the handle was opened on, file or directory.
    pub fn owner(&self) -> &Arc<Node> {
        match self {
            Handle::File { node, .. } | Handle::Dir { node, .. } => node,
        }
    }

    /// What a snapshot or the journal records of it.
    pub fn kind_v1(&self) -> HandleKindV1 {
        match self {
            Handle::File { flags, .. } => HandleKindV1::File { flags: *flags },
            Handle::Dir { .. } => HandleKindV1::Dir,
        }
    }
}

struct Inner {
    map: HashMap<u64, Arc<Handle>>,
    stale: HashSet<u64>,
    next: u64,
    /// Handles below this that the table does not hold belonged to a state that was
    /// lost: they answer ESTALE (0: none).
    stale_below: u64,
}

/// Everything in the table, for a snapshot (or to build a restored table from).
pub struct HandleParts {
    pub next: u64,
    pub live: Vec<(u64, Arc<Handle>)>,
    pub stale: Vec<u64>,
}

/// All handles of open files and directories.
pub struct HandleTable {
    inner: Mutex<Inner>,
    /// Where changes are recorded, with a recovery journal.
    recorder: Option<Arc<Recorder>>,
}

/// The table held still (for a checkpoint): nothing changes it until this is dropped.
pub(crate) struct Frozen<'a>(std::sync::MutexGuard<'a, Inner>);

impl Frozen<'_> {
    pub fn parts(&self) -> HandleParts {
        parts_of(&self.0)
    }
}

fn parts_of(g: &Inner) -> HandleParts {
    HandleParts {
        next: g.next,
        live: g.map.iter().map(|(&fh, h)| (fh, h.clone())).collect(),
        stale: g.stale.iter().copied().collect(),
    }
}

impl Default for HandleTable {
    fn default() -> Self {
        Self::from_parts(HandleParts {
            next: 1,
            live: Vec::new(),
            stale: Vec::new(),
        })
    }
}

impl HandleTable {
    /// A table of restored handles; the caller has checked every `fh` is below `next`
    /// and appears once.
    pub fn from_parts(parts: HandleParts) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: parts.live.into_iter().collect(),
                stale: parts.stale.into_iter().collect(),
                next: parts.next,
                stale_below: 0,
            }),
            recorder: None,
        }
    }

    /// Records every change from now on with `recorder`.
    pub(crate) fn record_to(&mut self, recorder: Arc<Recorder>) {
        self.recorder = Some(recorder);
    }

    /// The state before was lost: handles below `base` the table does not hold answer
    /// ESTALE, and new ones are numbered from `base` on.
    pub(crate) fn after_loss(&mut self, base: u64) {
        let g = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        g.next = g.next.max(base);
        g.stale_below = base;
    }

    /// Every handle and the counter.
    pub fn parts(&self) -> HandleParts {
        parts_of(&self.lock())
    }

    /// Holds the table still until the result is dropped.
    pub(crate) fn freeze(&self) -> Frozen<'_> {
        Frozen(self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `h` and returns its new `fh` (no journal: see [`HandleTable::insert_at`]).
    pub fn insert(&self, h: Handle) -> u64 {
        let fh = self.reserve();
        self.insert_at(fh, h, 0, |_| None);
        fh
    }

    /// A new `fh`, for a handle [`HandleTable::insert_at`] stores later.
    pub fn reserve(&self) -> u64 {
        let mut g = self.lock();
        let fh = g.next;
        g.next += 1;
        fh
    }

    /// Stores `h` under `fh` (from [`HandleTable::reserve`]) for request `unique`,
    /// recording it with what the request returns (`outcome`).
    pub fn insert_at(
        &self,
        fh: u64,
        h: Handle,
        unique: u64,
        outcome: impl FnOnce(&Handle) -> Option<OutcomeV1>,
    ) {
        let mut g = self.lock();
        if let Some(r) = &self.recorder {
            let mut ops = vec![OpV1::Opened {
                fh,
                node: h.owner().id,
                kind: h.kind_v1(),
            }];
            ops.extend(outcome(&h).map(OpV1::Outcome));
            r.record(unique, ops);
        }
        g.map.insert(fh, Arc::new(h));
    }

    /// The handle `fh`: EBADF when there is none, ESTALE when its object was lost
    /// across a restore.
    pub fn get(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        let g = self.lock();
        match g.map.get(&fh) {
            Some(h) => Ok(h.clone()),
            None if g.stale.contains(&fh) || fh < g.stale_below => Err(Errno(libc::ESTALE)),
            None => Err(Errno(libc::EBADF)),
        }
    }

    /// Removes `fh` for request `unique` (which then returns `outcome`); its
    /// descriptor closes when the last in-flight user drops it. Whether it was there
    /// (open or stale), and the handle if it was open.
    pub fn remove(
        &self,
        fh: u64,
        unique: u64,
        outcome: Option<OutcomeV1>,
    ) -> (bool, Option<Arc<Handle>>) {
        let mut g = self.lock();
        let stale = g.stale.remove(&fh);
        let h = g.map.remove(&fh);
        let was = stale || h.is_some();
        if let (true, Some(r)) = (was, &self.recorder) {
            let mut ops = vec![OpV1::Closed { fh }];
            ops.extend(outcome.map(OpV1::Outcome));
            r.record(unique, ops);
        }
        (was, h)
    }

    pub fn count(&self) -> usize {
        let g = self.lock();
        g.map.len() + g.stale.len()
    }
}

//! Open file and directory handles: the `fh` the kernel passes back on READ, WRITE,
//! READDIR, RELEASE, ... mapped to the host descriptor opened for it, with the node it
//! was opened on and the flags it was opened with (what a restore needs to open it
//! again). A restore may leave handles stale (their object is lost): those answer
//! ESTALE until released. This module never opens or closes anything itself.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use fsva_appliance::Errno;

use crate::dir::DirStream;
use crate::inode::Node;
use crate::read_trail::ReadTrail;

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
}

struct Inner {
    map: HashMap<u64, Arc<Handle>>,
    stale: HashSet<u64>,
    next: u64,
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
            }),
        }
    }

    /// Every handle and the counter.
    pub fn parts(&self) -> HandleParts {
        let g = self.lock();
        HandleParts {
            next: g.next,
            live: g.map.iter().map(|(&fh, h)| (fh, h.clone())).collect(),
            stale: g.stale.iter().copied().collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `h` and returns its new `fh`.
    pub fn insert(&self, h: Handle) -> u64 {
        let mut g = self.lock();
        let fh = g.next;
        g.next += 1;
        g.map.insert(fh, Arc::new(h));
        fh
    }

    /// The handle `fh`: EBADF when there is none, ESTALE when its object was lost
    /// across a restore.
    pub fn get(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        let g = self.lock();
        match g.map.get(&fh) {
            Some(h) => Ok(h.clone()),
            None if g.stale.contains(&fh) => Err(Errno(libc::ESTALE)),
            None => Err(Errno(libc::EBADF)),
        }
    }

    /// Removes `fh`; its descriptor closes when the last in-flight user drops it.
    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        let mut g = self.lock();
        g.stale.remove(&fh);
        g.map.remove(&fh)
    }

    pub fn count(&self) -> usize {
        let g = self.lock();
        g.map.len() + g.stale.len()
    }
}

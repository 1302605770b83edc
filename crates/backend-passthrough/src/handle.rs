//! Open file and directory handles: the `fh` the kernel passes back on READ, WRITE,
//! READDIR, RELEASE, ... mapped to the host descriptor opened for it.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::dir::DirStream;
use crate::inode::Node;
use crate::read_trail::ReadTrail;

/// What one `fh` stands for.
pub enum Handle {
    /// A regular (or special) file opened with the caller's flags.
    File {
        fd: OwnedFd,
        node: Arc<Node>,
        /// What to drop after reads the client caches; `None` for O_DIRECT opens,
        /// whose reads the client does not cache.
        trail: Option<Box<ReadTrail>>,
    },
    /// A directory stream.
    Dir(DirStream),
}

impl Handle {
    /// A file handle for `fd`, opened with the client's `flags`.
    pub fn file(fd: OwnedFd, node: Arc<Node>, flags: u32) -> Handle {
        let direct = flags as i32 & libc::O_DIRECT != 0;
        Handle::File {
            fd,
            node,
            trail: (!direct).then(Box::default),
        }
    }

    /// The read trail of a file handle whose reads the client caches.
    pub fn read_trail(&self) -> Option<&ReadTrail> {
        match self {
            Handle::File { trail, .. } => trail.as_deref(),
            Handle::Dir(_) => None,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Handle::File { fd, .. } => fd.as_fd(),
            Handle::Dir(d) => d.fd(),
        }
    }

    /// The node of a file handle.
    pub fn node(&self) -> Option<&Arc<Node>> {
        match self {
            Handle::File { node, .. } => Some(node),
            Handle::Dir(_) => None,
        }
    }
}

struct Inner {
    map: HashMap<u64, Arc<Handle>>,
    next: u64,
}

/// All handles of open files and directories.
pub struct HandleTable {
    inner: Mutex<Inner>,
}

impl Default for HandleTable {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                next: 1,
            }),
        }
    }
}

impl HandleTable {
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

    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.lock().map.get(&fh).cloned()
    }

    /// Removes `fh`; its descriptor closes when the last in-flight user drops it.
    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.lock().map.remove(&fh)
    }

    pub fn count(&self) -> usize {
        self.lock().map.len()
    }
}

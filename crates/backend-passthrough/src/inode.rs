//! The node table: the backend's own node ids, each bound to an `O_PATH` descriptor of
//! the host object, deduplicated by host identity (device, inode, mount) so that hard
//! links share one node, with the kernel's lookup counts and FORGET.
//!
//! The table lock is held only for map operations, never across a system call; nodes
//! are handed out as `Arc`s so an fd stays valid while a request uses it even if a
//! concurrent FORGET drops the node from the table.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fsva_protocol::abi::ROOT_ID;

/// Host identity of a file system object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub dev: u64,
    pub ino: u64,
    pub mnt_id: u64,
}

/// One object the kernel knows by node id.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// `O_PATH | O_NOFOLLOW` descriptor of the object.
    pub fd: OwnedFd,
    pub key: InodeKey,
    /// `S_IFMT` bits of the object's mode (the type never changes).
    pub kind: u32,
    /// Whether the mode last seen had a set-id bit (see [`Node::note_mode`]).
    setid: AtomicBool,
}

impl Node {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn is_symlink(&self) -> bool {
        self.kind == libc::S_IFLNK
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// Records the mode from fresh attributes (only the set-id bits matter).
    pub fn note_mode(&self, mode: u32) {
        self.setid.store(
            mode & (libc::S_ISUID | libc::S_ISGID) != 0,
            Ordering::Relaxed,
        );
    }

    /// Whether a data change may have to restore set-id bits afterwards.
    pub fn maybe_setid(&self) -> bool {
        self.setid.load(Ordering::Relaxed)
    }
}

struct Slot {
    node: Arc<Node>,
    lookups: u64,
}

struct Inner {
    nodes: HashMap<u64, Slot>,
    by_key: HashMap<InodeKey, u64>,
    next_id: u64,
}

/// All nodes the kernel holds references to.
pub struct NodeTable {
    inner: Mutex<Inner>,
}

impl NodeTable {
    /// A table holding only the root (node id 1), which is never forgotten.
    pub fn new(root_fd: OwnedFd, key: InodeKey) -> Self {
        let root = Arc::new(Node {
            id: ROOT_ID,
            fd: root_fd,
            key,
            kind: libc::S_IFDIR,
            setid: AtomicBool::new(false),
        });
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_ID,
            Slot {
                node: root,
                lookups: 1,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, ROOT_ID);
        Self {
            inner: Mutex::new(Inner {
                nodes,
                by_key,
                next_id: ROOT_ID + 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the whole file system down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node with id `id`, if the kernel still holds it.
    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.lock().nodes.get(&id).map(|s| s.node.clone())
    }

    pub fn root(&self) -> Arc<Node> {
        self.get(ROOT_ID).expect("the root node is never removed")
    }

    /// Records one more lookup of the object `key`, reusing its node when it exists
    /// (then `fd` is returned to be closed by the caller, outside the lock) or adding a
    /// new node holding `fd`.
    pub fn insert_or_ref(
        &self,
        fd: OwnedFd,
        key: InodeKey,
        kind: u32,
    ) -> (Arc<Node>, Option<OwnedFd>) {
        let mut g = self.lock();
        if let Some(&id) = g.by_key.get(&key) {
            if let Some(slot) = g.nodes.get_mut(&id) {
                slot.lookups += 1;
                return (slot.node.clone(), Some(fd));
            }
        }
        let id = g.next_id;
        g.next_id += 1;
        let node = Arc::new(Node {
            id,
            fd,
            key,
            kind,
            setid: AtomicBool::new(false),
        });
        g.nodes.insert(
            id,
            Slot {
                node: node.clone(),
                lookups: 1,
            },
        );
        g.by_key.insert(key, id);
        (node, None)
    }

    /// Drops `n` lookups of node `id`; the node goes away when none remain. Returns the
    /// removed node (whose fd closes when the last user drops it).
    pub fn forget(&self, id: u64, n: u64) -> Option<Arc<Node>> {
        if id == ROOT_ID {
            return None;
        }
        let mut g = self.lock();
        let slot = g.nodes.get_mut(&id)?;
        slot.lookups = slot.lookups.saturating_sub(n);
        if slot.lookups > 0 {
            return None;
        }
        let slot = g.nodes.remove(&id)?;
        if g.by_key.get(&slot.node.key) == Some(&id) {
            g.by_key.remove(&slot.node.key);
        }
        Some(slot.node)
    }

    /// Number of nodes in the table (root included).
    pub fn count(&self) -> usize {
        self.lock().nodes.len()
    }

    /// The lookup count of node `id` (for tests and diagnostics).
    pub fn lookups(&self, id: u64) -> Option<u64> {
        self.lock().nodes.get(&id).map(|s| s.lookups)
    }
}

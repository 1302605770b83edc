//! The node table: the backend's own node ids, each bound to an `O_PATH` descriptor of
//! the host object, deduplicated by host identity (device, inode, mount) so that hard
//! links share one node, with the kernel's lookup counts and FORGET. Each node also
//! keeps a path hint — the parent node and the name it was last looked up, created or
//! renamed under — so a restore without descriptors can find it again; and a restore
//! may leave nodes *stale* (their object could not be found): those answer ESTALE.
//!
//! The table lock is held only for map operations, never across a system call; nodes
//! are handed out as `Arc`s so an fd stays valid while a request uses it even if a
//! concurrent FORGET drops the node from the table. It must never hand out a stale
//! node's id for another object.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fsva_appliance::Errno;
use fsva_protocol::abi::ROOT_ID;

/// Host identity of a file system object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub dev: u64,
    pub ino: u64,
    pub mnt_id: u64,
}

impl InodeKey {
    /// Whether `other` is the same object, whatever mount it was reached through (a
    /// successor appliance's own mounts have other ids than its predecessor's).
    pub fn same_object(&self, other: &InodeKey) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// Where a node was last seen: a name in a parent directory node (any one of a hard
/// link's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub parent: u64,
    pub name: Box<[u8]>,
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

impl AsFd for Node {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Node {
    /// A node for `fd`; `setid` is the set-id note (see [`Node::note_mode`]).
    pub fn new(id: u64, fd: OwnedFd, key: InodeKey, kind: u32, setid: bool) -> Node {
        Node {
            id,
            fd,
            key,
            kind,
            setid: AtomicBool::new(setid),
        }
    }

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

/// A node whose object a restore could not find again: every request on it answers
/// ESTALE until the kernel forgets it.
#[derive(Debug, Clone)]
pub struct StaleNode {
    pub key: InodeKey,
    pub kind: u32,
    pub lookups: u64,
    pub hint: Option<Hint>,
}

struct Slot {
    node: Arc<Node>,
    lookups: u64,
    hint: Option<Hint>,
}

struct Inner {
    nodes: HashMap<u64, Slot>,
    stale: HashMap<u64, StaleNode>,
    by_key: HashMap<InodeKey, u64>,
    next_id: u64,
}

/// A live node as a snapshot sees it.
pub struct LiveNode {
    pub node: Arc<Node>,
    pub lookups: u64,
    pub hint: Option<Hint>,
}

/// Everything in the table, for a snapshot (or to build a restored table from).
pub struct TableParts {
    pub next_id: u64,
    pub live: Vec<LiveNode>,
    pub stale: Vec<(u64, StaleNode)>,
}

/// All nodes the kernel holds references to.
pub struct NodeTable {
    inner: Mutex<Inner>,
}

impl NodeTable {
    /// A table holding only the root (node id 1), which is never forgotten.
    pub fn new(root_fd: OwnedFd, key: InodeKey) -> Self {
        let root = Arc::new(Node::new(ROOT_ID, root_fd, key, libc::S_IFDIR, false));
        Self::from_parts(TableParts {
            next_id: ROOT_ID + 1,
            live: vec![LiveNode {
                node: root,
                lookups: 1,
                hint: None,
            }],
            stale: Vec::new(),
        })
    }

    /// A table of restored nodes. The caller has checked the parts (a root, ids below
    /// `next_id`, each id once); of two live nodes of one object, the first keeps the
    /// key's place for later lookups.
    pub fn from_parts(parts: TableParts) -> Self {
        let mut nodes = HashMap::with_capacity(parts.live.len());
        let mut by_key = HashMap::with_capacity(parts.live.len());
        for l in parts.live {
            by_key.entry(l.node.key).or_insert(l.node.id);
            nodes.insert(
                l.node.id,
                Slot {
                    node: l.node,
                    lookups: l.lookups,
                    hint: l.hint,
                },
            );
        }
        Self {
            inner: Mutex::new(Inner {
                nodes,
                stale: parts.stale.into_iter().collect(),
                by_key,
                next_id: parts.next_id,
            }),
        }
    }

    /// Every node with its lookups and hint, and the id counter.
    pub fn parts(&self) -> TableParts {
        let g = self.lock();
        TableParts {
            next_id: g.next_id,
            live: g
                .nodes
                .values()
                .map(|s| LiveNode {
                    node: s.node.clone(),
                    lookups: s.lookups,
                    hint: s.hint.clone(),
                })
                .collect(),
            stale: g.stale.iter().map(|(&id, s)| (id, s.clone())).collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the whole file system down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node with id `id`: ENOENT when the kernel no longer holds it, ESTALE when
    /// its object was lost across a restore.
    pub fn get(&self, id: u64) -> Result<Arc<Node>, Errno> {
        let g = self.lock();
        match g.nodes.get(&id) {
            Some(s) => Ok(s.node.clone()),
            None if g.stale.contains_key(&id) => Err(Errno(libc::ESTALE)),
            None => Err(Errno::ENOENT),
        }
    }

    pub fn root(&self) -> Arc<Node> {
        self.get(ROOT_ID).expect("the root node is never removed")
    }

    /// Records one more lookup of the object `key`, reusing its node when it exists
    /// (then `fd` is returned to be closed by the caller, outside the lock) or adding a
    /// new node holding `fd`. `hint` is the name it was found under, if any.
    pub fn insert_or_ref(
        &self,
        fd: OwnedFd,
        key: InodeKey,
        kind: u32,
        hint: Option<(u64, &[u8])>,
    ) -> (Arc<Node>, Option<OwnedFd>) {
        let mut g = self.lock();
        if let Some(&id) = g.by_key.get(&key) {
            if let Some(slot) = g.nodes.get_mut(&id) {
                slot.lookups += 1;
                match hint {
                    Some((parent, name)) if id != ROOT_ID && parent != id => {
                        set_hint(&mut slot.hint, parent, name)
                    }
                    _ => {}
                }
                return (slot.node.clone(), Some(fd));
            }
        }
        let id = g.next_id;
        g.next_id += 1;
        let node = Arc::new(Node::new(id, fd, key, kind, false));
        g.nodes.insert(
            id,
            Slot {
                node: node.clone(),
                lookups: 1,
                hint: hint.map(|(parent, name)| Hint {
                    parent,
                    name: name.into(),
                }),
            },
        );
        g.by_key.insert(key, id);
        (node, None)
    }

    /// Records that the object `key` (if a node holds it) is now `name` in `parent`
    /// (after a rename).
    pub fn rehint(&self, key: &InodeKey, parent: u64, name: &[u8]) {
        let mut g = self.lock();
        let Some(&id) = g.by_key.get(key) else {
            return;
        };
        if id == ROOT_ID {
            return;
        }
        if let Some(slot) = g.nodes.get_mut(&id) {
            set_hint(&mut slot.hint, parent, name);
        }
    }

    /// Drops `n` lookups of node `id`; the node goes away when none remain. Returns the
    /// removed node (whose fd closes when the last user drops it).
    pub fn forget(&self, id: u64, n: u64) -> Option<Arc<Node>> {
        if id == ROOT_ID {
            return None;
        }
        let mut g = self.lock();
        if let Some(stale) = g.stale.get_mut(&id) {
            stale.lookups = stale.lookups.saturating_sub(n);
            if stale.lookups == 0 {
                g.stale.remove(&id);
            }
            return None;
        }
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

    /// Number of nodes in the table (root and stale nodes included).
    pub fn count(&self) -> usize {
        let g = self.lock();
        g.nodes.len() + g.stale.len()
    }

    /// The lookup count of node `id` (for tests and diagnostics).
    pub fn lookups(&self, id: u64) -> Option<u64> {
        let g = self.lock();
        g.nodes
            .get(&id)
            .map(|s| s.lookups)
            .or_else(|| g.stale.get(&id).map(|s| s.lookups))
    }

    /// The path hint of node `id` (for tests and diagnostics).
    pub fn hint(&self, id: u64) -> Option<Hint> {
        self.lock().nodes.get(&id).and_then(|s| s.hint.clone())
    }
}

/// Replaces `hint` unless it already says this (a lookup must not allocate for nothing).
fn set_hint(hint: &mut Option<Hint>, parent: u64, name: &[u8]) {
    if hint
        .as_ref()
        .is_some_and(|h| h.parent == parent && &*h.name == name)
    {
        return;
    }
    *hint = Some(Hint {
        parent,
        name: name.into(),
    });
}

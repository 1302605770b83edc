//! The node table: the backend's own node ids, each bound to an `O_PATH` descriptor of
//! the host object, deduplicated by host identity (device, inode, mount) so that hard
//! links share one node, with the kernel's lookup counts and FORGET. Each node also
//! keeps a path hint — the parent node and the name it was last looked up, created or
//! renamed under — so a restore without descriptors can find it again; and a restore
//! may leave nodes *stale* (their object could not be found): those answer ESTALE.
//!
//! With a recovery journal, every change of the table (a node added or referenced, a
//! hint changed, lookups forgotten) is recorded under the table lock as it happens, so
//! that the journal's order is the order of changes (see [`crate::journal`]).
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

use crate::journal::{OpV1, Recorder};

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
    /// Ids below this that the table does not hold belonged to a state that was lost:
    /// they answer ESTALE (0: none).
    stale_below: u64,
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
    /// Where changes are recorded, with a recovery journal.
    recorder: Option<Arc<Recorder>>,
}

/// The table held still (for a checkpoint): nothing changes it until this is dropped.
pub(crate) struct Frozen<'a>(std::sync::MutexGuard<'a, Inner>);

impl Frozen<'_> {
    pub fn parts(&self) -> TableParts {
        parts_of(&self.0)
    }

    pub fn stale_below(&self) -> u64 {
        self.0.stale_below
    }
}

fn parts_of(g: &Inner) -> TableParts {
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

fn hint_v1(hint: &Option<Hint>) -> Option<(u64, Vec<u8>)> {
    hint.as_ref().map(|h| (h.parent, h.name.to_vec()))
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
                stale_below: 0,
            }),
            recorder: None,
        }
    }

    /// Records every change from now on with `recorder`.
    pub(crate) fn record_to(&mut self, recorder: Arc<Recorder>) {
        self.recorder = Some(recorder);
    }

    /// The state before was lost: ids below `base` the table does not hold answer
    /// ESTALE, and new nodes are numbered from `base` on.
    pub(crate) fn after_loss(&mut self, base: u64) {
        let g = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        g.next_id = g.next_id.max(base);
        g.stale_below = base;
    }

    fn record(&self, unique: u64, op: OpV1) {
        if let Some(r) = &self.recorder {
            r.record(unique, vec![op]);
        }
    }

    /// Every node with its lookups and hint, and the id counter.
    pub fn parts(&self) -> TableParts {
        parts_of(&self.lock())
    }

    /// Holds the table still until the result is dropped.
    pub(crate) fn freeze(&self) -> Frozen<'_> {
        Frozen(self.lock())
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
            None if g.stale.contains_key(&id) || id < g.stale_below => Err(Errno(libc::ESTALE)),
            None => Err(Errno::ENOENT),
        }
    }

    pub fn root(&self) -> Arc<Node> {
        self.get(ROOT_ID).expect("the root node is never removed")
    }

    /// Records one more lookup of the object `key`, reusing its node when it exists
    /// (then `fd` is returned to be closed by the caller, outside the lock) or adding a
    /// new node holding `fd`. `hint` is the name it was found under, if any; `unique`
    /// the request that looked it up (for the journal).
    pub fn insert_or_ref(
        &self,
        fd: OwnedFd,
        key: InodeKey,
        kind: u32,
        hint: Option<(u64, &[u8])>,
        unique: u64,
    ) -> (Arc<Node>, Option<OwnedFd>) {
        let mut g = self.lock();
        if let Some(&id) = g.by_key.get(&key) {
            if let Some(slot) = g.nodes.get_mut(&id) {
                slot.lookups += 1;
                let changed = match hint {
                    Some((parent, name)) if id != ROOT_ID && parent != id => {
                        set_hint(&mut slot.hint, parent, name)
                    }
                    _ => false,
                };
                let node = slot.node.clone();
                if self.recorder.is_some() {
                    let hint = if changed { hint_v1(&slot.hint) } else { None };
                    self.record(unique, OpV1::NodeRef { id, hint });
                }
                return (node, Some(fd));
            }
        }
        let id = g.next_id;
        g.next_id += 1;
        let node = Arc::new(Node::new(id, fd, key, kind, false));
        let hint = hint.map(|(parent, name)| Hint {
            parent,
            name: name.into(),
        });
        if self.recorder.is_some() {
            self.record(
                unique,
                OpV1::NodeNew {
                    id,
                    key: key.into(),
                    kind,
                    hint: hint_v1(&hint),
                },
            );
        }
        g.nodes.insert(
            id,
            Slot {
                node: node.clone(),
                lookups: 1,
                hint,
            },
        );
        g.by_key.insert(key, id);
        (node, None)
    }

    /// Records that the object `key` (if a node holds it) is now `name` in `parent`
    /// (after a rename).
    pub fn rehint(&self, key: &InodeKey, parent: u64, name: &[u8], unique: u64) {
        let mut g = self.lock();
        let Some(&id) = g.by_key.get(key) else {
            return;
        };
        if id == ROOT_ID || id == parent {
            return;
        }
        if let Some(slot) = g.nodes.get_mut(&id) {
            if set_hint(&mut slot.hint, parent, name) {
                let hint = hint_v1(&slot.hint);
                self.record(unique, OpV1::Rehint { id, hint });
            }
        }
    }

    /// The object `key` is no longer `name` in `parent` (it was unlinked there): its
    /// node keeps no hint to that name.
    pub fn unhint(&self, key: &InodeKey, parent: u64, name: &[u8], unique: u64) {
        let mut g = self.lock();
        let Some(&id) = g.by_key.get(key) else {
            return;
        };
        if let Some(slot) = g.nodes.get_mut(&id) {
            if slot
                .hint
                .as_ref()
                .is_some_and(|h| h.parent == parent && &*h.name == name)
            {
                slot.hint = None;
                self.record(unique, OpV1::Rehint { id, hint: None });
            }
        }
    }

    /// Drops `n` lookups of node `id` (on behalf of request `unique`); the node goes
    /// away when none remain. Returns the removed node (whose fd closes when the last
    /// user drops it).
    pub fn forget(&self, id: u64, n: u64, unique: u64) -> Option<Arc<Node>> {
        if id == ROOT_ID || n == 0 {
            return None;
        }
        let mut g = self.lock();
        if let Some(stale) = g.stale.get_mut(&id) {
            stale.lookups = stale.lookups.saturating_sub(n);
            if stale.lookups == 0 {
                g.stale.remove(&id);
            }
            self.record(unique, OpV1::Forget { id, n });
            return None;
        }
        let slot = g.nodes.get_mut(&id)?;
        slot.lookups = slot.lookups.saturating_sub(n);
        self.record(unique, OpV1::Forget { id, n });
        if slot.lookups > 0 {
            return None;
        }
        let slot = g.nodes.remove(&id)?;
        if g.by_key.get(&slot.node.key) == Some(&id) {
            g.by_key.remove(&slot.node.key);
        }
        Some(slot.node)
    }

    /// The node of the object `key`, if the table holds one.
    pub fn by_key(&self, key: &InodeKey) -> Option<u64> {
        self.lock().by_key.get(key).copied()
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

/// Replaces `hint` unless it already says this (a lookup must not allocate for
/// nothing); whether it changed.
fn set_hint(hint: &mut Option<Hint>, parent: u64, name: &[u8]) -> bool {
    if hint
        .as_ref()
        .is_some_and(|h| h.parent == parent && &*h.name == name)
    {
        return false;
    }
    *hint = Some(Hint {
        parent,
        name: name.into(),
    });
    true
}

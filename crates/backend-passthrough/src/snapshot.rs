//! The passthrough backend as a snapshot: the node table (id, host identity, type,
//! lookup count, set-id note, path hint) and the handle table (fh, node, open flags),
//! with the counters. The objects themselves travel as descriptors beside the bytes,
//! by index and lent (no duplicate): each node's `O_PATH` descriptor and each handle's
//! open file, which carries its own flags, offset and directory position.
//!
//! One enum variant per version (postcard). `check` verifies everything that can be
//! verified without a system call — ranges, each id and descriptor once, handles on
//! nodes that exist and of the right type, hints that are plain names — because the
//! predecessor may be compromised. This module never opens anything and never
//! decides what a missing object becomes; `restore` does.

use std::collections::{HashMap, HashSet};

use fsva_appliance::state::{BackendState, StateError, StateFd};
use fsva_protocol::abi::ROOT_ID;
use serde::{Deserialize, Serialize};

use crate::handle::HandleParts;
use crate::inode::{Hint, InodeKey, TableParts};

/// Every version this backend can restore from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PassthroughSnapshot {
    V1(SnapshotV1),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotV1 {
    pub next_node: u64,
    pub next_fh: u64,
    pub nodes: Vec<NodeV1>,
    pub handles: Vec<HandleV1>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyV1 {
    pub dev: u64,
    pub ino: u64,
    pub mnt_id: u64,
}

/// Where the object of a node or handle is to be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectV1 {
    /// The descriptor at this index among the snapshot's descriptors.
    Lent(u32),
    /// No descriptor came: a node is found again by its hint (the root is the export
    /// root), a handle opened again on its node.
    Absent,
    /// Lost before this snapshot was taken: answers ESTALE.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeV1 {
    pub id: u64,
    pub key: KeyV1,
    /// `S_IFMT` bits.
    pub kind: u32,
    /// The kernel's lookups; 0 for a node only an open handle still holds.
    pub lookups: u64,
    pub setid: bool,
    /// The parent node and the name this node was last seen under.
    pub hint: Option<(u64, Vec<u8>)>,
    pub object: ObjectV1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandleKindV1 {
    /// A file opened with these flags (as the kernel sent them: O_DIRECT included).
    File { flags: u32 },
    /// A directory stream; positions are the host's own `d_off` cookies, which the
    /// kernel passes back with every READDIR, so a stream opened again can seek.
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleV1 {
    pub fh: u64,
    pub node: u64,
    pub kind: HandleKindV1,
    pub object: ObjectV1,
}

/// Counters near the end of their range would wrap (and reuse the root's number).
pub(crate) const COUNTER_LIMIT: u64 = 1 << 62;

/// File types a node may have.
pub(crate) const KINDS: [u32; 7] = [
    libc::S_IFREG,
    libc::S_IFDIR,
    libc::S_IFLNK,
    libc::S_IFCHR,
    libc::S_IFBLK,
    libc::S_IFIFO,
    libc::S_IFSOCK,
];

impl From<InodeKey> for KeyV1 {
    fn from(k: InodeKey) -> Self {
        KeyV1 {
            dev: k.dev,
            ino: k.ino,
            mnt_id: k.mnt_id,
        }
    }
}

impl From<KeyV1> for InodeKey {
    fn from(k: KeyV1) -> Self {
        InodeKey {
            dev: k.dev,
            ino: k.ino,
            mnt_id: k.mnt_id,
        }
    }
}

fn hint_v1(h: Option<Hint>) -> Option<(u64, Vec<u8>)> {
    h.map(|h| (h.parent, h.name.into_vec()))
}

/// Snapshots the tables, lending every node's and handle's descriptor. Called with
/// every worker paused, so the two tables agree.
pub(crate) fn take(nodes: TableParts, handles: HandleParts) -> BackendState {
    let mut fds: Vec<StateFd> = Vec::with_capacity(nodes.live.len() + handles.live.len());
    let snap = build(nodes, handles, |fd| {
        fds.push(fd);
        ObjectV1::Lent((fds.len() - 1) as u32)
    });
    BackendState {
        bytes: encode(&PassthroughSnapshot::V1(snap)),
        fds,
    }
}

/// The tables as a snapshot without descriptors (for a crash-recovery checkpoint,
/// taken while serving with both tables held still): every live node is to be found
/// again by its path hint, every live handle to be opened again on its node.
pub(crate) fn take_portable(nodes: TableParts, handles: HandleParts) -> SnapshotV1 {
    let mut snap = build(nodes, handles, |_| ObjectV1::Absent);
    snap.nodes.sort_unstable_by_key(|n| n.id);
    snap.handles.sort_unstable_by_key(|h| h.fh);
    snap
}

/// The one walk over both tables that `take` and `take_portable` share; `object`
/// says what stands for each live node's or handle's descriptor.
fn build(
    nodes: TableParts,
    handles: HandleParts,
    mut object: impl FnMut(StateFd) -> ObjectV1,
) -> SnapshotV1 {
    let mut out = Vec::with_capacity(nodes.live.len() + nodes.stale.len());
    let mut seen: HashSet<u64> = HashSet::with_capacity(nodes.live.len());
    for l in nodes.live {
        seen.insert(l.node.id);
        out.push(NodeV1 {
            id: l.node.id,
            key: l.node.key.into(),
            kind: l.node.kind,
            lookups: l.lookups,
            setid: l.node.maybe_setid(),
            hint: hint_v1(l.hint),
            object: object(StateFd::Lent(l.node.clone())),
        });
    }
    for (id, s) in nodes.stale {
        seen.insert(id);
        out.push(NodeV1 {
            id,
            key: s.key.into(),
            kind: s.kind,
            lookups: s.lookups,
            setid: false,
            hint: hint_v1(s.hint),
            object: ObjectV1::Stale,
        });
    }
    let mut hout = Vec::with_capacity(handles.live.len() + handles.stale.len());
    for (fh, h) in handles.live {
        let node = h.owner().clone();
        if seen.insert(node.id) {
            // The kernel forgot the node while a handle still holds it: it travels
            // for the handle's sake only.
            out.push(NodeV1 {
                id: node.id,
                key: node.key.into(),
                kind: node.kind,
                lookups: 0,
                setid: node.maybe_setid(),
                hint: None,
                object: object(StateFd::Lent(node.clone())),
            });
        }
        hout.push(HandleV1 {
            fh,
            node: node.id,
            kind: h.kind_v1(),
            object: object(StateFd::Lent(h)),
        });
    }
    for fh in handles.stale {
        hout.push(HandleV1 {
            fh,
            node: 0,
            kind: HandleKindV1::Dir,
            object: ObjectV1::Stale,
        });
    }
    SnapshotV1 {
        next_node: nodes.next_id,
        next_fh: handles.next,
        nodes: out,
        handles: hout,
    }
}

/// The same snapshot without its descriptors, as a restore that cannot receive them
/// needs it (another host over shared storage): every node is found again by its
/// path hint, every handle opened again on its node.
pub fn portable(state: BackendState) -> Result<BackendState, StateError> {
    let PassthroughSnapshot::V1(mut s) = decode(&state.bytes)?;
    for n in &mut s.nodes {
        if let ObjectV1::Lent(_) = n.object {
            n.object = ObjectV1::Absent;
        }
    }
    for h in &mut s.handles {
        if let ObjectV1::Lent(_) = h.object {
            h.object = ObjectV1::Absent;
        }
    }
    Ok(BackendState {
        bytes: encode(&PassthroughSnapshot::V1(s)),
        fds: Vec::new(),
    })
}

pub fn encode(s: &PassthroughSnapshot) -> Vec<u8> {
    postcard::to_allocvec(s).expect("in-memory snapshot always encodes")
}

pub fn decode(bytes: &[u8]) -> Result<PassthroughSnapshot, StateError> {
    let (snap, rest) = postcard::take_from_bytes::<PassthroughSnapshot>(bytes)
        .map_err(|e| StateError::Corrupt(format!("passthrough snapshot: {e}")))?;
    if !rest.is_empty() {
        return Err(StateError::Corrupt(format!(
            "{} bytes after the end of the passthrough snapshot",
            rest.len()
        )));
    }
    Ok(snap)
}

/// Whether `name` is one plain directory entry name.
pub(crate) fn plain_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// Checks that `s` holds together, given `fd_count` descriptors beside it. Nothing in
/// it is trusted before this returns `Ok`.
pub(crate) fn check(s: &SnapshotV1, fd_count: usize) -> Result<(), StateError> {
    let bad = |why: String| Err(StateError::Backend(why));
    if !(ROOT_ID + 1..COUNTER_LIMIT).contains(&s.next_node)
        || !(1..COUNTER_LIMIT).contains(&s.next_fh)
    {
        return bad("node or handle counter out of range".into());
    }
    let mut used = vec![false; fd_count];
    let mut claim = |o: ObjectV1, what: &str| -> Result<(), StateError> {
        if let ObjectV1::Lent(i) = o {
            match used.get_mut(i as usize) {
                None => {
                    return Err(StateError::MissingDescriptor {
                        index: i,
                        count: fd_count,
                    })
                }
                Some(true) => {
                    return Err(StateError::Backend(format!(
                        "descriptor {i} is claimed twice (again by {what})"
                    )))
                }
                Some(u) => *u = true,
            }
        }
        Ok(())
    };
    let mut kinds: HashMap<u64, (u32, ObjectV1)> = HashMap::with_capacity(s.nodes.len());
    for n in &s.nodes {
        if n.id == 0 || n.id >= s.next_node {
            return bad(format!("node {} is beyond the counter", n.id));
        }
        if !KINDS.contains(&n.kind) {
            return bad(format!("node {} has no file type ({:#o})", n.id, n.kind));
        }
        if let Some((parent, name)) = &n.hint {
            if *parent == 0 || *parent >= s.next_node || *parent == n.id {
                return bad(format!("node {} has a hint to node {parent}", n.id));
            }
            if !plain_name(name) {
                return bad(format!("node {} has a hint that is no plain name", n.id));
            }
        }
        if kinds.insert(n.id, (n.kind, n.object)).is_some() {
            return bad(format!("node {} appears twice", n.id));
        }
        claim(n.object, &format!("node {}", n.id))?;
    }
    match s.nodes.iter().find(|n| n.id == ROOT_ID) {
        None => return bad("no root node".into()),
        Some(r) if r.kind != libc::S_IFDIR => return bad("the root is not a directory".into()),
        Some(r) if r.object == ObjectV1::Stale => return bad("the root is stale".into()),
        Some(r) if r.hint.is_some() => return bad("the root has a path hint".into()),
        Some(_) => {}
    }
    let mut fhs: HashSet<u64> = HashSet::with_capacity(s.handles.len());
    for h in &s.handles {
        if h.fh == 0 || h.fh >= s.next_fh {
            return bad(format!("handle {} is beyond the counter", h.fh));
        }
        if !fhs.insert(h.fh) {
            return bad(format!("handle {} appears twice", h.fh));
        }
        if h.object == ObjectV1::Stale {
            continue;
        }
        let Some(&(kind, _)) = kinds.get(&h.node) else {
            return bad(format!("handle {} refers to missing node {}", h.fh, h.node));
        };
        let fits = match h.kind {
            HandleKindV1::File { .. } => kind == libc::S_IFREG,
            HandleKindV1::Dir => kind == libc::S_IFDIR,
        };
        if !fits {
            return bad(format!(
                "handle {} ({:?}) is on node {} of type {kind:#o}",
                h.fh, h.kind, h.node
            ));
        }
        claim(h.object, &format!("handle {}", h.fh))?;
    }
    Ok(())
}

//! Rebuilding the node and handle tables from a checked snapshot: taking over the
//! descriptors that came with it, finding nodes whose descriptor did not come by
//! walking their path hints from the root, one `openat(O_PATH | O_NOFOLLOW)` per
//! component, and opening handles again on their nodes when their open file did not.
//!
//! An object found by its hint that is not the recorded (device, inode) and type is
//! never taken for it: that node (and every handle and node found through it) becomes
//! stale and answers ESTALE, while everything else carries on. Lent descriptors are
//! taken as their nodes' objects without a `statx` each (as mem takes its memfds):
//! that cost 9 ms per 8,800 descriptors of downtime, and a predecessor can only lend
//! what its own sandbox holds — a wrong one costs its own answers, which it could
//! falsify anyway. Only the root is checked: it must be this export's root.
//!
//! A crash recovery has no node descriptors, only the open files the supervisor kept
//! for their handles: those are checked against their nodes' recorded identity (one
//! `statx` each; one that does not match is not used), and a node its hint no longer
//! finds (an open file unlinked since) is found through one of its handles' files.
//! This module never writes to the export.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use fsva_appliance::state::{StateError, StateFd};
use fsva_protocol::abi::ROOT_ID;

use crate::handle::{Handle, HandleParts, HandleTable};
use crate::inode::{Hint, InodeKey, LiveNode, Node, NodeTable, StaleNode, TableParts};
use crate::snapshot::{HandleKindV1, NodeV1, ObjectV1, SnapshotV1};
use crate::sys;
use crate::{key_of, kind_of, STATX_MASK};

/// Flags a file handle is opened again with: how it reads and writes, never creation
/// or truncation (done once already).
const REOPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_NOATIME
    | libc::O_LARGEFILE;

/// What a restore rebuilt, and what it could not.
pub(crate) struct Restored {
    pub nodes: NodeTable,
    pub handles: HandleTable,
    pub stale_nodes: usize,
    pub stale_handles: usize,
    /// Nodes found under another name than their hint, with that name.
    pub renamed: Vec<(u64, (u64, Vec<u8>))>,
}

/// The export as the successor sees it.
pub(crate) struct Export<'a> {
    /// The export root this appliance opened itself.
    pub root: OwnedFd,
    pub root_key: InodeKey,
    /// To open a node again (its /proc/self/fd magic link).
    pub reopen: &'a dyn Fn(BorrowedFd<'_>, i32) -> std::io::Result<OwnedFd>,
    /// Check every lent handle descriptor against its node before using it (crash
    /// recovery: the descriptors were kept apart from the records naming them).
    pub verify_handles: bool,
    /// Other names a node may have now, tried when its hint does not find it (a
    /// rename whose appliance died before recording the new hint).
    pub alt_hints: &'a HashMap<u64, Vec<(u64, Vec<u8>)>>,
}

/// A node's fate.
enum Found {
    Live(Arc<Node>),
    Stale,
}

/// Rebuilds the tables from `s`, already [`crate::snapshot::check`]ed against `fds`.
pub(crate) fn rebuild(
    s: SnapshotV1,
    fds: Vec<StateFd>,
    export: Export<'_>,
) -> Result<Restored, StateError> {
    let mut slots: Vec<Option<StateFd>> = fds.into_iter().map(Some).collect();
    let count = slots.len();
    let mut take = |i: u32| -> Result<OwnedFd, StateError> {
        slots
            .get_mut(i as usize)
            .and_then(Option::take)
            .ok_or(StateError::MissingDescriptor { index: i, count })?
            .into_owned()
            .map_err(|e| StateError::Backend(format!("taking over descriptor {i}: {e}")))
    };
    let by_id: HashMap<u64, &NodeV1> = s.nodes.iter().map(|n| (n.id, n)).collect();
    let mut found: HashMap<u64, Found> = HashMap::with_capacity(s.nodes.len());

    // The root first: it must be the export root, whichever descriptor it comes with.
    let root = by_id[&ROOT_ID];
    let root_node = match root.object {
        ObjectV1::Lent(i) => {
            let fd = take(i)?;
            let stx = sys::statx_fd(fd.as_fd(), STATX_MASK, 0)
                .map_err(|e| StateError::Backend(format!("stat of the root: {e}")))?;
            // The predecessor's own descriptor of the root is kept (not this
            // appliance's): every lent node was found through it, so lookups from it
            // meet them under the same mount and the same keys.
            (kind_of(&stx) == libc::S_IFDIR && key_of(&stx).same_object(&export.root_key))
                .then(|| Node::new(ROOT_ID, fd, key_of(&stx), libc::S_IFDIR, false))
        }
        _ => Some(Node::new(
            ROOT_ID,
            export.root,
            export.root_key,
            libc::S_IFDIR,
            false,
        )),
    };
    let Some(root_node) = root_node else {
        return Err(StateError::Backend(
            "the snapshot's root is not this export's root directory".into(),
        ));
    };
    if !export.root_key.same_object(&root.key.into()) {
        return Err(StateError::Backend(format!(
            "the snapshot is of another export (root {}:{}, this export's {}:{})",
            root.key.dev, root.key.ino, export.root_key.dev, export.root_key.ino
        )));
    }
    found.insert(ROOT_ID, Found::Live(Arc::new(root_node)));

    // Nodes whose descriptor came.
    for n in &s.nodes {
        let fate = match n.object {
            _ if n.id == ROOT_ID => continue,
            ObjectV1::Stale => Found::Stale,
            ObjectV1::Absent => continue,
            ObjectV1::Lent(i) => Found::Live(Arc::new(Node::new(
                n.id,
                take(i)?,
                n.key.into(),
                n.kind,
                n.setid,
            ))),
        };
        found.insert(n.id, fate);
    }
    // Nodes to find again by their hints, parents before children.
    for n in &s.nodes {
        if !found.contains_key(&n.id) {
            refind(n.id, &by_id, &mut found);
        }
    }
    // Nodes their hint did not find, by the other names they may have now; a node
    // found so may be the parent others were not found under: until nothing changes.
    let mut renamed: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    if !export.alt_hints.is_empty() {
        retry_stale(&by_id, &mut found, export.alt_hints, &mut renamed);
    }
    // The open files that came for handles, checked if asked.
    let mut given: HashMap<u64, OwnedFd> = HashMap::new();
    for h in &s.handles {
        if let ObjectV1::Lent(i) = h.object {
            let fd = take(i)?;
            let fits = !export.verify_handles
                || by_id
                    .get(&h.node)
                    .is_some_and(|n| matches(n, fd.as_fd()).is_some());
            if fits {
                given.insert(h.fh, fd);
            } else {
                tracing::warn!(
                    handle = h.fh,
                    node = h.node,
                    "a kept open file is not its node's object; opening the node again"
                );
            }
        }
    }
    // A node its hint did not find may still be open: found through its handle.
    for h in &s.handles {
        let (Some(Found::Stale), Some(fd), Some(n)) =
            (found.get(&h.node), given.get(&h.fh), by_id.get(&h.node))
        else {
            continue;
        };
        if h.object == ObjectV1::Stale || n.object == ObjectV1::Stale {
            continue;
        }
        if let Ok(path) = (export.reopen)(fd.as_fd(), libc::O_PATH | libc::O_NOFOLLOW) {
            if let Found::Live(node) = verified(n, path) {
                tracing::info!(node = n.id, "a node was found again through its open file");
                found.insert(n.id, Found::Live(node));
            }
        }
    }

    let mut live = Vec::new();
    let mut stale = Vec::new();
    let mut held: HashMap<u64, Arc<Node>> = HashMap::new();
    for n in &s.nodes {
        let hint = renamed
            .get(&n.id)
            .or(n.hint.as_ref())
            .map(|(parent, name)| Hint {
                parent: *parent,
                name: name.clone().into_boxed_slice(),
            });
        match found.remove(&n.id) {
            Some(Found::Live(node)) => {
                held.insert(n.id, node.clone());
                if n.lookups > 0 || n.id == ROOT_ID {
                    live.push(LiveNode {
                        node,
                        lookups: n.lookups.max(1),
                        hint,
                    });
                }
            }
            _ if n.lookups == 0 => {}
            _ => stale.push((
                n.id,
                StaleNode {
                    key: n.key.into(),
                    kind: n.kind,
                    lookups: n.lookups,
                    hint,
                },
            )),
        }
    }

    let mut hlive = Vec::new();
    let mut hstale = Vec::new();
    for h in &s.handles {
        let node = match h.object {
            ObjectV1::Stale => None,
            _ => held.get(&h.node),
        };
        let given = given.remove(&h.fh);
        match node.and_then(|node| reopened(h.kind, node, given, export.reopen)) {
            Some(handle) => hlive.push((h.fh, Arc::new(handle))),
            None => hstale.push(h.fh),
        }
    }
    let (stale_nodes, stale_handles) = (stale.len(), hstale.len());
    Ok(Restored {
        nodes: NodeTable::from_parts(TableParts {
            next_id: s.next_node,
            live,
            stale,
        }),
        handles: HandleTable::from_parts(HandleParts {
            next: s.next_fh,
            live: hlive,
            stale: hstale,
        }),
        stale_nodes,
        stale_handles,
        renamed: renamed.into_iter().collect(),
    })
}

/// Whether `fd` is the object `n` records: same device, inode and type.
fn matches(n: &NodeV1, fd: BorrowedFd<'_>) -> Option<libc::statx> {
    let stx = sys::statx_fd(fd, STATX_MASK, 0).ok()?;
    (kind_of(&stx) == n.kind && key_of(&stx).same_object(&n.key.into())).then_some(stx)
}

/// A node for `fd`, found by `n`'s hint, if it is the object `n` records (its key then
/// names the mount it was found on).
fn verified(n: &NodeV1, fd: OwnedFd) -> Found {
    match matches(n, fd.as_fd()) {
        Some(stx) => Found::Live(Arc::new(Node::new(n.id, fd, key_of(&stx), n.kind, n.setid))),
        None => Found::Stale,
    }
}

/// Finds node `id` again by walking hints up to a node already settled, then down one
/// component at a time. Every node on the way is settled: found, or stale (no hint, a
/// parent not in the snapshot, a cycle, a name that is gone or now another object).
fn refind(id: u64, by_id: &HashMap<u64, &NodeV1>, found: &mut HashMap<u64, Found>) {
    let mut chain: Vec<u64> = Vec::new();
    let mut on_chain: HashSet<u64> = HashSet::new();
    let mut cur = id;
    // Up: collect unsettled nodes until one is settled (the root always is).
    let mut anchored = loop {
        if found.contains_key(&cur) {
            break true;
        }
        if !on_chain.insert(cur) {
            break false; // a cycle of hints
        }
        chain.push(cur);
        match by_id.get(&cur).and_then(|n| n.hint.as_ref()) {
            Some((parent, _)) if by_id.contains_key(parent) => cur = *parent,
            _ => break false,
        }
    };
    // Down: each from its parent, or stale with it.
    for &nid in chain.iter().rev() {
        let n = by_id[&nid];
        let fate = match (anchored, &n.hint) {
            (true, Some((parent, name))) => match found.get(parent) {
                Some(Found::Live(p)) => lookup(p, name)
                    .map(|fd| verified(n, fd))
                    .unwrap_or(Found::Stale),
                _ => Found::Stale,
            },
            _ => Found::Stale,
        };
        if let Found::Stale = fate {
            tracing::warn!(
                node = nid,
                "a node could not be found again by its path hint; it is stale"
            );
        }
        anchored = true;
        found.insert(nid, fate);
    }
}

/// Tries again every stale node (that was not lost already before the snapshot) by
/// its hint and its other names, as long as that finds any.
fn retry_stale(
    by_id: &HashMap<u64, &NodeV1>,
    found: &mut HashMap<u64, Found>,
    alt_hints: &HashMap<u64, Vec<(u64, Vec<u8>)>>,
    renamed: &mut HashMap<u64, (u64, Vec<u8>)>,
) {
    loop {
        let stale: Vec<u64> = found
            .iter()
            .filter(|(id, f)| {
                matches!(f, Found::Stale)
                    && by_id.get(id).is_some_and(|n| n.object != ObjectV1::Stale)
            })
            .map(|(&id, _)| id)
            .collect();
        let mut changed = false;
        for id in stale {
            let n = by_id[&id];
            let names = n
                .hint
                .iter()
                .chain(alt_hints.get(&id).into_iter().flatten());
            for (parent, name) in names {
                let Some(Found::Live(p)) = found.get(parent) else {
                    continue;
                };
                if let Some(Found::Live(node)) = lookup(p, name).map(|fd| verified(n, fd)) {
                    tracing::info!(node = id, "a node was found again under another name");
                    if n.hint.as_ref() != Some(&(*parent, name.clone())) {
                        renamed.insert(id, (*parent, name.clone()));
                    }
                    found.insert(id, Found::Live(node));
                    changed = true;
                    break;
                }
            }
        }
        if !changed {
            return;
        }
    }
}

/// `openat(parent, name, O_PATH | O_NOFOLLOW)`.
fn lookup(parent: &Node, name: &[u8]) -> Option<OwnedFd> {
    let c = std::ffi::CString::new(name).ok()?;
    sys::openat(parent.fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0).ok()
}

/// The handle of `kind` on `node`: the open file that came, or the node opened again.
fn reopened(
    kind: HandleKindV1,
    node: &Arc<Node>,
    given: Option<OwnedFd>,
    reopen: &dyn Fn(BorrowedFd<'_>, i32) -> std::io::Result<OwnedFd>,
) -> Option<Handle> {
    let fd = match given {
        Some(fd) => fd,
        None => {
            let flags = match kind {
                HandleKindV1::File { flags } => flags as i32 & REOPEN_FLAGS,
                HandleKindV1::Dir => libc::O_RDONLY | libc::O_DIRECTORY,
            };
            reopen(node.fd(), flags)
                .inspect_err(|e| tracing::warn!(node = node.id, error = %e, "a handle could not be opened again; it is stale"))
                .ok()?
        }
    };
    Some(match kind {
        HandleKindV1::File { flags } => Handle::file(fd, node.clone(), flags),
        HandleKindV1::Dir => Handle::dir(fd, node.clone()),
    })
}

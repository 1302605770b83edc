//! passthrough's records in the recovery journal, its crash-recovery checkpoint, and
//! replaying them.
//!
//! The export is durable: what the backend holds in memory is only the kernel's view of
//! it — node ids bound to objects (with their lookup counts and path hints) and open
//! handles. Every change to those tables is recorded where it happens, under the
//! table's own lock ([`Recorder::record`]), so that the journal's order is the order of
//! effects. A namespace change (create, mkdir, unlink, rename, link, xattr create or
//! remove, an O_APPEND write through the appliance) also records an *intent* with the
//! state before its system call and an *outcome* after it: an appliance killed between
//! the system call and the outcome leaves the intent, and its successor decides from
//! the intent and what the export holds now whether the request took effect
//! ([`decide`]), so that a request the kernel resends runs exactly once.
//!
//! A crash-recovery checkpoint ([`CheckpointV1`]) is the tables as a portable snapshot
//! (no descriptors: nodes are found again by their path hints and keys), the intents
//! still open, and the last records before it (a request recorded just before the
//! checkpoint may not have been answered yet when the appliance died).
//!
//! A successor replays the records after its checkpoint onto the snapshot
//! ([`Model`]), then restores it as a live restart would; each record is checked
//! before it is applied, because a compromised predecessor may have written them.
//! This module never takes the backend's table locks (its callers hold them) and never
//! touches the export.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use fsva_appliance::journal::{Journal, BACKEND};
use fsva_appliance::state::StateError;
use fsva_protocol::abi::ROOT_ID;
use serde::{Deserialize, Serialize};

use crate::inode::InodeKey;
use crate::snapshot::{
    plain_name, HandleKindV1, HandleV1, KeyV1, NodeV1, ObjectV1, SnapshotV1, COUNTER_LIMIT, KINDS,
};

/// Every version of a journal record this backend can replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PassthroughRecord {
    V1(RecordV1),
}

/// What one request (or a part of it) changed, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordV1 {
    /// The request behind it, without the kernel's resend bit; 0 for none.
    pub unique: u64,
    pub ops: Vec<OpV1>,
}

/// One change of the tables, or an intent or outcome of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpV1 {
    /// A new node with one lookup.
    NodeNew {
        id: u64,
        key: KeyV1,
        kind: u32,
        hint: Option<(u64, Vec<u8>)>,
    },
    /// One more lookup of a node; its hint when that changed.
    NodeRef {
        id: u64,
        hint: Option<(u64, Vec<u8>)>,
    },
    /// `n` lookups dropped (FORGET, or a lookup undone).
    Forget { id: u64, n: u64 },
    /// The node's path hint is now this (or none).
    Rehint {
        id: u64,
        hint: Option<(u64, Vec<u8>)>,
    },
    /// A handle opened on a node.
    Opened {
        fh: u64,
        node: u64,
        kind: HandleKindV1,
    },
    /// A handle closed.
    Closed { fh: u64 },
    /// The request is about to change the export.
    Intent(IntentV1),
    /// The request succeeded with this.
    Outcome(OutcomeV1),
    /// A successor could not find the node's object again: it answers ESTALE from now
    /// on, also for the successors after it (whatever its hint finds later).
    Lost { id: u64 },
}

/// What a name held before a request changed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeV1 {
    Absent,
    Present(KeyV1),
    /// It could not be told (the probe failed for another reason than ENOENT).
    Unknown,
}

impl ProbeV1 {
    /// Whether this names the object `key` (whatever mount it was reached through).
    pub fn is(&self, key: &KeyV1) -> bool {
        matches!(self, ProbeV1::Present(k) if (k.dev, k.ino) == (key.dev, key.ino))
    }
}

/// A namespace change about to be made, with the state before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntentV1 {
    /// CREATE, MKDIR, MKNOD, SYMLINK of `name` in `parent`; `open`: CREATE's open flags.
    Make {
        parent: u64,
        name: Vec<u8>,
        before: ProbeV1,
        open: Option<u32>,
    },
    /// UNLINK or RMDIR of `name` in `parent`.
    Remove {
        parent: u64,
        name: Vec<u8>,
        before: ProbeV1,
    },
    /// RENAME (with its flags) of `name` in `parent` to `newname` in `newparent`.
    Rename {
        parent: u64,
        name: Vec<u8>,
        newparent: u64,
        newname: Vec<u8>,
        flags: u32,
        src: ProbeV1,
        dst: ProbeV1,
    },
    /// LINK of node `node` (the object `key`) as `newname` in `newparent`.
    Link {
        node: u64,
        key: KeyV1,
        newparent: u64,
        newname: Vec<u8>,
        before: ProbeV1,
    },
    /// An O_APPEND write through handle `fh` to a file of `size` bytes.
    Append { fh: u64, size: u64 },
    /// SETXATTR with XATTR_CREATE (`remove` false) or REMOVEXATTR (`remove` true) of
    /// `name` on `node`, which had it before (`present`) or not.
    Xattr {
        node: u64,
        name: Vec<u8>,
        present: bool,
        remove: bool,
    },
}

/// What a request returned, enough to answer it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutcomeV1 {
    /// An empty reply (UNLINK, RENAME, RELEASE, ...).
    Done,
    /// An entry of this node (MKDIR, MKNOD, SYMLINK, LINK); its lookup is counted.
    Entry { node: u64 },
    /// OPEN, OPENDIR.
    Opened { fh: u64 },
    /// CREATE.
    Created { node: u64, fh: u64 },
    /// WRITE.
    Written(u32),
}

/// Every version of the crash-recovery checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PassthroughCheckpoint {
    V1(CheckpointV1),
}

/// The backend's part of a crash-recovery checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointV1 {
    /// The tables, every object `Absent` (found again by hint) or `Stale`.
    pub snapshot: SnapshotV1,
    /// Node ids and handles below this that the tables do not hold are stale (a state
    /// was lost before; see `PassthroughFs::after_loss`); 0 for none.
    pub stale_below: u64,
    /// The last records before the checkpoint (already in `snapshot`), to answer their
    /// requests if the kernel resends them.
    pub recent: Vec<RecordV1>,
    /// Intents whose outcome had not come when the checkpoint was taken.
    pub pending: Vec<(u64, IntentV1)>,
    /// What a recovery before left to answer and no resend has asked yet.
    pub carried: Vec<(u64, Trace)>,
}

/// First bytes of an encoded checkpoint (a live restart's snapshot has none).
const CHECKPOINT_MAGIC: &[u8; 8] = b"FSVAPTJ1";

/// Records kept for [`CheckpointV1::recent`].
const RECENT: usize = 1024;

/// Most requests a successor remembers to answer resends: only the last ones can still
/// be in flight when an appliance dies.
const TRACES_MAX: usize = 1 << 16;

pub fn encode_checkpoint(c: &PassthroughCheckpoint) -> Vec<u8> {
    postcard::to_extend(c, CHECKPOINT_MAGIC.to_vec())
        .expect("an in-memory checkpoint always encodes")
}

pub fn decode_checkpoint(bytes: &[u8]) -> Result<PassthroughCheckpoint, StateError> {
    let Some(body) = bytes.strip_prefix(CHECKPOINT_MAGIC) else {
        return Err(StateError::Corrupt(format!(
            "passthrough recovery checkpoint: {} bytes without its magic",
            bytes.len()
        )));
    };
    let (c, rest) = postcard::take_from_bytes::<PassthroughCheckpoint>(body)
        .map_err(|e| StateError::Corrupt(format!("passthrough recovery checkpoint: {e}")))?;
    if !rest.is_empty() {
        return Err(StateError::Corrupt(format!(
            "{} bytes after the end of the passthrough recovery checkpoint",
            rest.len()
        )));
    }
    Ok(c)
}

/// A record as the journal stores it (with the backend's tag byte).
pub fn encode_record(r: &RecordV1) -> Vec<u8> {
    postcard::to_extend(&PassthroughRecord::V1(r.clone()), vec![BACKEND])
        .expect("a journal record always encodes")
}

/// A record's payload (without the tag byte) decoded; `n` numbers it for errors.
pub fn decode_record(n: usize, payload: &[u8]) -> Result<RecordV1, StateError> {
    let (r, rest) = postcard::take_from_bytes::<PassthroughRecord>(payload)
        .map_err(|e| StateError::Corrupt(format!("passthrough journal record {n}: {e}")))?;
    if !rest.is_empty() {
        return Err(StateError::Corrupt(format!(
            "passthrough journal record {n}: {} bytes after its end",
            rest.len()
        )));
    }
    let PassthroughRecord::V1(r) = r;
    Ok(r)
}

/// What the recorder keeps for the next checkpoint.
#[derive(Default)]
pub(crate) struct RecorderState {
    pub recent: VecDeque<RecordV1>,
    pub pending: HashMap<u64, IntentV1>,
}

/// Appends the backend's records to the recovery journal. Callers hold the lock of
/// the table they change (so that the order of records is the order of changes); the
/// recorder's own lock, taken inside theirs, orders intents and outcomes and keeps
/// what the next checkpoint needs.
pub(crate) struct Recorder {
    journal: Arc<Journal>,
    state: Mutex<RecorderState>,
}

impl Recorder {
    pub fn new(journal: Arc<Journal>) -> Arc<Recorder> {
        Arc::new(Recorder {
            journal,
            state: Mutex::default(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, RecorderState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one record of `ops` on behalf of request `unique`.
    pub fn record(&self, unique: u64, ops: Vec<OpV1>) {
        let rec = RecordV1 { unique, ops };
        let bytes = encode_record(&rec);
        let mut st = self.lock();
        if let Err(e) = self.journal.append(&bytes) {
            tracing::error!(error = %e, "a change could not be journaled; a crash before the next checkpoint would lose it");
        }
        if unique == 0 {
            return;
        }
        for op in &rec.ops {
            match op {
                OpV1::Intent(i) => {
                    st.pending.insert(unique, i.clone());
                }
                OpV1::Outcome(_) => {
                    st.pending.remove(&unique);
                }
                _ => {}
            }
        }
        if st.recent.len() == RECENT {
            st.recent.pop_front();
        }
        st.recent.push_back(rec);
    }

    /// The request whose intent was recorded failed: nothing to decide about it.
    pub fn abandon(&self, unique: u64) {
        self.lock().pending.remove(&unique);
    }
}

/// The tables being rebuilt from a checkpoint's snapshot and the records after it.
pub(crate) struct Model {
    next_node: u64,
    next_fh: u64,
    nodes: BTreeMap<u64, NodeV1>,
    handles: BTreeMap<u64, HandleV1>,
}

fn hint_ok(id: u64, hint: &Option<(u64, Vec<u8>)>) -> Result<(), String> {
    match hint {
        Some((parent, _)) if *parent == 0 || *parent >= COUNTER_LIMIT || *parent == id => {
            Err(format!("node {id} gets a hint to node {parent}"))
        }
        Some((_, name)) if !plain_name(name) => {
            Err(format!("node {id} gets a hint that is no plain name"))
        }
        _ => Ok(()),
    }
}

impl Model {
    /// Starts from a checkpoint's snapshot (already checked).
    pub fn new(s: SnapshotV1) -> Model {
        Model {
            next_node: s.next_node,
            next_fh: s.next_fh,
            nodes: s.nodes.into_iter().map(|n| (n.id, n)).collect(),
            handles: s.handles.into_iter().map(|h| (h.fh, h)).collect(),
        }
    }

    /// The tables as a snapshot (to check and restore).
    pub fn into_snapshot(self) -> SnapshotV1 {
        SnapshotV1 {
            next_node: self.next_node,
            next_fh: self.next_fh,
            nodes: self.nodes.into_values().collect(),
            handles: self.handles.into_values().collect(),
        }
    }

    /// Drops node `id` if nothing holds it any more.
    fn collect(&mut self, id: u64) {
        let unused = self
            .nodes
            .get(&id)
            .is_some_and(|n| n.lookups == 0 && n.id != ROOT_ID);
        if unused && !self.handles.values().any(|h| h.node == id) {
            self.nodes.remove(&id);
        }
    }

    /// Applies record number `n`; refuses, with the reason, one that does not fit.
    pub fn apply(&mut self, n: usize, rec: &RecordV1) -> Result<(), StateError> {
        for op in &rec.ops {
            self.apply_op(op)
                .map_err(|why| StateError::Backend(format!("journal record {n}: {why}")))?;
        }
        Ok(())
    }

    fn apply_op(&mut self, op: &OpV1) -> Result<(), String> {
        match op {
            OpV1::NodeNew {
                id,
                key,
                kind,
                hint,
            } => {
                if *id <= ROOT_ID || *id >= COUNTER_LIMIT {
                    return Err(format!("new node {id} out of range"));
                }
                if !KINDS.contains(kind) {
                    return Err(format!("new node {id} has no file type ({kind:#o})"));
                }
                hint_ok(*id, hint)?;
                if self.nodes.contains_key(id) {
                    return Err(format!("node {id} is created twice"));
                }
                self.nodes.insert(
                    *id,
                    NodeV1 {
                        id: *id,
                        key: *key,
                        kind: *kind,
                        lookups: 1,
                        setid: false,
                        hint: hint.clone(),
                        object: ObjectV1::Absent,
                    },
                );
                self.next_node = self.next_node.max(id + 1);
            }
            OpV1::NodeRef { id, hint } => {
                hint_ok(*id, hint)?;
                let n = self
                    .nodes
                    .get_mut(id)
                    .filter(|n| n.object != ObjectV1::Stale && (n.lookups > 0 || n.id == ROOT_ID))
                    .ok_or_else(|| format!("a lookup of node {id}, which is not held"))?;
                n.lookups = n.lookups.saturating_add(1);
                if hint.is_some() && *id != ROOT_ID {
                    n.hint = hint.clone();
                }
            }
            OpV1::Forget { id, n } => {
                if *id == ROOT_ID {
                    return Ok(());
                }
                let node = self
                    .nodes
                    .get_mut(id)
                    .ok_or_else(|| format!("a forget of node {id}, which is not held"))?;
                node.lookups = node.lookups.saturating_sub(*n);
                self.collect(*id);
            }
            OpV1::Rehint { id, hint } => {
                hint_ok(*id, hint)?;
                if *id == ROOT_ID {
                    return Err("the root gets a hint".into());
                }
                let node = self
                    .nodes
                    .get_mut(id)
                    .ok_or_else(|| format!("a new hint for node {id}, which is not held"))?;
                node.hint = hint.clone();
            }
            OpV1::Opened { fh, node, kind } => {
                if *fh == 0 || *fh >= COUNTER_LIMIT {
                    return Err(format!("handle {fh} out of range"));
                }
                if self.handles.contains_key(fh) {
                    return Err(format!("handle {fh} is opened twice"));
                }
                let n = self
                    .nodes
                    .get(node)
                    .filter(|n| n.object != ObjectV1::Stale)
                    .ok_or_else(|| format!("handle {fh} is opened on node {node}, not held"))?;
                let fits = match kind {
                    HandleKindV1::File { .. } => n.kind == libc::S_IFREG,
                    HandleKindV1::Dir => n.kind == libc::S_IFDIR,
                };
                if !fits {
                    return Err(format!(
                        "handle {fh} ({kind:?}) is opened on node {node} of type {:#o}",
                        n.kind
                    ));
                }
                self.handles.insert(
                    *fh,
                    HandleV1 {
                        fh: *fh,
                        node: *node,
                        kind: *kind,
                        object: ObjectV1::Absent,
                    },
                );
                self.next_fh = self.next_fh.max(fh + 1);
            }
            OpV1::Closed { fh } => {
                let h = self
                    .handles
                    .remove(fh)
                    .ok_or_else(|| format!("handle {fh} is closed but was not open"))?;
                self.collect(h.node);
            }
            OpV1::Lost { id } => {
                let node = self
                    .nodes
                    .get_mut(id)
                    .filter(|n| n.id != ROOT_ID)
                    .ok_or_else(|| format!("node {id} is lost but was not held"))?;
                node.object = ObjectV1::Stale;
            }
            OpV1::Intent(_) | OpV1::Outcome(_) => {}
        }
        Ok(())
    }
}

/// What one request did before its appliance died, from the records that name it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub intent: Option<IntentV1>,
    pub outcome: Option<OutcomeV1>,
    /// Net lookups the request counted, per node.
    pub lookups: BTreeMap<u64, i64>,
    /// Handles it opened that are still open.
    pub opened: BTreeSet<u64>,
}

impl Trace {
    fn note(&mut self, op: &OpV1) {
        match op {
            OpV1::NodeNew { id, .. } | OpV1::NodeRef { id, .. } => {
                *self.lookups.entry(*id).or_default() += 1
            }
            OpV1::Forget { id, n } => {
                *self.lookups.entry(*id).or_default() -= i64::try_from(*n).unwrap_or(i64::MAX)
            }
            OpV1::Opened { fh, .. } => {
                self.opened.insert(*fh);
            }
            OpV1::Closed { fh } => {
                self.opened.remove(fh);
            }
            OpV1::Intent(i) => {
                // A request run again after an earlier recovery starts over.
                self.intent = Some(i.clone());
                self.outcome = None;
            }
            OpV1::Outcome(o) => self.outcome = Some(*o),
            OpV1::Rehint { .. } | OpV1::Lost { .. } => {}
        }
        self.lookups.retain(|_, d| *d != 0);
    }

    /// Lookups to give back if the request runs again.
    pub fn counted(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.lookups
            .iter()
            .filter(|(_, d)| **d > 0)
            .map(|(&id, &d)| (id, d as u64))
    }
}

/// The traces of the last requests, by unique.
#[derive(Default)]
pub(crate) struct Traces {
    map: HashMap<u64, Trace>,
    order: VecDeque<u64>,
}

impl Traces {
    pub fn note_intent(&mut self, unique: u64, intent: &IntentV1) {
        self.note(&RecordV1 {
            unique,
            ops: vec![OpV1::Intent(intent.clone())],
        });
    }

    pub fn note(&mut self, rec: &RecordV1) {
        if rec.unique == 0 {
            return;
        }
        let t = match self.map.get_mut(&rec.unique) {
            Some(t) => t,
            None => {
                if self.order.len() >= TRACES_MAX {
                    if let Some(old) = self.order.pop_front() {
                        self.map.remove(&old);
                    }
                }
                self.order.push_back(rec.unique);
                self.map.entry(rec.unique).or_default()
            }
        };
        for op in &rec.ops {
            t.note(op);
        }
    }

    /// Starts from a trace an earlier recovery carried.
    pub fn carry(&mut self, unique: u64, t: Trace) {
        if unique != 0 && !self.map.contains_key(&unique) {
            self.order.push_back(unique);
            self.map.insert(unique, t);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Traces whose request recorded no outcome.
    pub fn unsettled(&self) -> impl Iterator<Item = &Trace> {
        self.map.values().filter(|t| t.outcome.is_none())
    }

    /// The trace of `unique`, which is then forgotten.
    pub fn take(&mut self, unique: u64) -> Option<Trace> {
        self.map.remove(&unique)
    }

    /// The `n` newest traces still held, oldest first.
    pub fn latest(&self, n: usize) -> Vec<(u64, Trace)> {
        let mut out: Vec<(u64, Trace)> = self
            .order
            .iter()
            .rev()
            .filter_map(|u| self.map.get(u).map(|t| (*u, t.clone())))
            .take(n)
            .collect();
        out.reverse();
        out
    }
}

/// Whether a namespace change took effect before its appliance died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It did: answer with its success.
    Done,
    /// It did not (or cannot be told): run it again, which repeats a failure it had.
    Again,
}

/// What the export holds now, as [`decide`] asks.
pub trait Present {
    /// What `name` in node `parent` is.
    fn name(&self, parent: u64, name: &[u8]) -> ProbeV1;
    /// Whether node `node` has the extended attribute `name` (None: cannot tell).
    fn has_xattr(&self, node: u64, name: &[u8]) -> Option<bool>;
}

/// Decides from `intent` (the state before the request's system call) and the state
/// now whether the request took effect. Appends are decided by the write itself,
/// which has the bytes.
pub fn decide(intent: &IntentV1, now: &dyn Present) -> Verdict {
    use Verdict::{Again, Done};
    let done = |b: bool| if b { Done } else { Again };
    match intent {
        IntentV1::Make {
            parent,
            name,
            before,
            ..
        } => done(*before == ProbeV1::Absent && now.name(*parent, name) != ProbeV1::Absent),
        IntentV1::Remove {
            parent,
            name,
            before,
        } => match before {
            ProbeV1::Present(victim) => {
                let n = now.name(*parent, name);
                done(n != ProbeV1::Unknown && !n.is(victim))
            }
            _ => Again,
        },
        IntentV1::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
            src,
            dst,
        } => {
            let ProbeV1::Present(s) = src else {
                return Again;
            };
            let src_now = now.name(*parent, name);
            let dst_now = now.name(*newparent, newname);
            if flags & libc::RENAME_EXCHANGE != 0 {
                match dst {
                    ProbeV1::Present(d) => done(src_now.is(d) && dst_now.is(s) && !dst.is(s)),
                    _ => Again,
                }
            } else {
                done(dst_now.is(s) && !src_now.is(s) && src_now != ProbeV1::Unknown)
            }
        }
        IntentV1::Link {
            key,
            newparent,
            newname,
            before,
            ..
        } => done(*before == ProbeV1::Absent && now.name(*newparent, newname).is(key)),
        IntentV1::Xattr {
            node,
            name,
            present,
            remove,
        } => match (present, remove, now.has_xattr(*node, name)) {
            (false, false, Some(true)) | (true, true, Some(false)) => Done,
            _ => Again,
        },
        IntentV1::Append { .. } => Again,
    }
}

/// The key as the journal records it.
pub fn key_v1(k: &InodeKey) -> KeyV1 {
    (*k).into()
}

/// Everything a successor rebuilds from: the checked tables and the traces of the
/// requests the kernel may resend.
pub(crate) struct Replayed {
    pub snapshot: SnapshotV1,
    pub stale_below: u64,
    pub traces: Traces,
}

/// Decodes a recovery checkpoint and checks it whole (its tables hold together and
/// refer to no descriptor).
pub(crate) fn load_checkpoint(bytes: &[u8]) -> Result<CheckpointV1, StateError> {
    let PassthroughCheckpoint::V1(c) = decode_checkpoint(bytes)?;
    crate::snapshot::check(&c.snapshot, 0)?;
    if c.snapshot
        .nodes
        .iter()
        .any(|n| matches!(n.object, ObjectV1::Lent(_)))
        || c.snapshot
            .handles
            .iter()
            .any(|h| matches!(h.object, ObjectV1::Lent(_)))
    {
        return Err(StateError::Backend(
            "a recovery checkpoint refers to descriptors".into(),
        ));
    }
    if c.stale_below >= COUNTER_LIMIT {
        return Err(StateError::Backend("stale range out of bounds".into()));
    }
    Ok(c)
}

/// Replays `records` (payloads without their tag byte) onto `checkpoint` (loaded by
/// [`load_checkpoint`]; without one, onto a table holding only the root `root_key`).
/// Every record is checked as it is applied; the result is checked whole by
/// [`crate::snapshot::check`].
pub(crate) fn replay(
    checkpoint: Option<CheckpointV1>,
    records: &[Vec<u8>],
    root_key: KeyV1,
) -> Result<Replayed, StateError> {
    let mut traces = Traces::default();
    let (snapshot, stale_below) = match checkpoint {
        Some(c) => {
            for (unique, t) in c.carried {
                traces.carry(unique, t);
            }
            for (unique, intent) in &c.pending {
                traces.note_intent(*unique, intent);
            }
            for r in &c.recent {
                traces.note(r);
            }
            (c.snapshot, c.stale_below)
        }
        None => (
            SnapshotV1 {
                next_node: ROOT_ID + 1,
                next_fh: 1,
                nodes: vec![NodeV1 {
                    id: ROOT_ID,
                    key: root_key,
                    kind: libc::S_IFDIR,
                    lookups: 1,
                    setid: false,
                    hint: None,
                    object: ObjectV1::Absent,
                }],
                handles: Vec::new(),
            },
            0,
        ),
    };
    let mut model = Model::new(snapshot);
    for (n, payload) in records.iter().enumerate() {
        let rec = decode_record(n, payload)?;
        model.apply(n, &rec)?;
        traces.note(&rec);
    }
    let snapshot = model.into_snapshot();
    crate::snapshot::check(&snapshot, 0)?;
    Ok(Replayed {
        snapshot,
        stale_below,
        traces,
    })
}

//! mem's records in the recovery journal, and replaying them.
//!
//! Every change to mem's metadata happens under its write lock, inside a transaction
//! ([`crate::Txn`]); when the transaction ends, still under the lock, [`commit`] turns
//! what it changed into one record: the inodes it touched (their metadata in full, but
//! a directory's entries only as the inserts, renames and removals it made), the
//! handles it opened and closed, the inodes it freed, the kernel lookup counts it
//! moved, the request that caused it and what that request returned. Lookups counted
//! under the read lock are recorded under it too, so the journal's order is the order
//! in which the changes happened. File contents are not recorded: they live in memfds
//! the supervisor keeps.
//!
//! A successor applies the records after its checkpoint in order ([`replay`]), then
//! checks that the result holds together ([`check`]). This module never takes mem's
//! locks (its callers hold them) and never touches file data.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fsva_appliance::journal::{Journal, BACKEND};
use fsva_appliance::state::StateError;
use serde::{Deserialize, Serialize};

use crate::data::Space;
use crate::dir::{Dir, DirOp};
use crate::handle::Handle;
use crate::inode::{Inode, Kind};
use crate::snapshot::{DataSource, COUNTER_LIMIT};
use crate::xattr::Xattrs;
use crate::State;

#[derive(Debug, Serialize, Deserialize)]
enum MemRecord {
    V1(RecordV1),
}

/// What one transaction changed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RecordV1 {
    /// The request behind it (without the resend bit); 0 for none (FORGET).
    pub unique: u64,
    pub outcome: Option<Outcome>,
    pub next_ino: u64,
    pub next_fh: u64,
    pub inodes: Vec<InodeMetaV1>,
    pub dir_ops: Vec<(u64, Vec<DirOp>)>,
    pub opened: Vec<HandleV1>,
    pub closed: Vec<u64>,
    /// Net change of kernel lookup counts, per inode.
    pub lookups: Vec<(u64, i64)>,
    pub freed: Vec<u64>,
}

/// What the request returned, enough to answer it again if the kernel resends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// LOOKUP or READDIRPLUS: only lookup counts moved; a resend undoes them and runs
    /// again.
    Looked,
    Entry(u64),
    Attr(u64),
    Opened(u64),
    Created {
        ino: u64,
        fh: u64,
    },
    Written(u32),
    Copied(u64),
    Done,
    /// The lookups a resent LOOKUP or READDIRPLUS had counted were given back; it
    /// runs again when resent.
    Undone,
}

/// An inode's metadata; a directory's entries travel as [`DirOp`]s.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InodeMetaV1 {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    rdev: u32,
    times: [(i64, u32); 5],
    opens: u64,
    kind: KindMetaV1,
    /// All attributes, when they changed (or the inode is new).
    xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

#[derive(Debug, Serialize, Deserialize)]
enum KindMetaV1 {
    /// The memfd's id and what it charged.
    File(Option<(u64, u64)>),
    Dir {
        parent: u64,
    },
    Symlink(Vec<u8>),
    Special,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandleV1 {
    fh: u64,
    ino: u64,
    file: bool,
    flags: u32,
}

/// The metadata record of `inode`; its xattrs only if they changed since the last one
/// (a new inode's start empty, so unchanged ones need no record either).
fn meta(ino: u64, inode: &mut Inode) -> InodeMetaV1 {
    let kind = match &mut inode.kind {
        Kind::File(d) => KindMetaV1::File(d.as_ref().map(|d| (d.id(), d.charged()))),
        Kind::Dir(d) => KindMetaV1::Dir { parent: d.parent },
        Kind::Symlink(target) => KindMetaV1::Symlink(target.clone()),
        Kind::Special => KindMetaV1::Special,
    };
    let changed = inode.xattrs.take_changed();
    InodeMetaV1 {
        ino,
        mode: inode.mode,
        uid: inode.uid,
        gid: inode.gid,
        nlink: inode.nlink,
        rdev: inode.rdev,
        times: inode.saved_times(),
        opens: inode.opens,
        kind,
        xattrs: changed.then(|| {
            inode
                .xattrs
                .pairs()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
    }
}

/// Writes what the transaction on `st` changed as one record (under mem's lock).
pub(crate) fn commit(
    st: &mut State,
    journal: &Journal,
    unique: u64,
    outcome: Option<Outcome>,
    lookups: &mut Vec<(u64, i64)>,
) {
    let Some(changes) = st.inodes.take_changes() else {
        lookups.clear();
        return;
    };
    let (opened, closed) = st.handles.take_changes();
    let mut touched = changes.touched;
    touched.sort_unstable();
    touched.dedup();
    let mut rec = RecordV1 {
        unique,
        outcome,
        next_ino: st.inodes.next(),
        next_fh: st.handles.last(),
        closed,
        freed: changes.freed,
        ..Default::default()
    };
    for ino in touched {
        if let Some(inode) = st.inodes.get_untracked(ino) {
            if let Kind::Dir(d) = &mut inode.kind {
                let ops = d.take_log();
                if !ops.is_empty() {
                    rec.dir_ops.push((ino, ops));
                }
            }
            rec.inodes.push(meta(ino, inode));
        }
    }
    for fh in opened {
        if let Some(h) = st.handles.peek(fh) {
            rec.opened.push(HandleV1 {
                fh,
                ino: h.ino,
                file: h.data.is_some(),
                flags: h.flags,
            });
        }
    }
    if !lookups.is_empty() {
        let mut net: HashMap<u64, i64> = HashMap::new();
        for (ino, d) in lookups.drain(..) {
            *net.entry(ino).or_default() += d;
        }
        rec.lookups = net.into_iter().filter(|&(_, d)| d != 0).collect();
    }
    let empty = rec.inodes.is_empty()
        && rec.dir_ops.is_empty()
        && rec.opened.is_empty()
        && rec.closed.is_empty()
        && rec.lookups.is_empty()
        && rec.freed.is_empty();
    if empty {
        return;
    }
    let bytes = postcard::to_extend(&MemRecord::V1(rec), vec![BACKEND])
        .expect("a journal record always encodes");
    if let Err(e) = journal.append(&bytes) {
        tracing::error!(error = %e, "a change could not be journaled; a crash before the next checkpoint would lose it");
    }
}

/// Writes the lookup counts a read moved (under mem's read lock) as one record.
pub(crate) fn commit_lookups(journal: &Journal, unique: u64, lookups: &mut Vec<(u64, i64)>) {
    if lookups.is_empty() {
        return;
    }
    let mut net: HashMap<u64, i64> = HashMap::new();
    for (ino, d) in lookups.drain(..) {
        *net.entry(ino).or_default() += d;
    }
    let rec = RecordV1 {
        unique,
        outcome: Some(Outcome::Looked),
        lookups: net.into_iter().filter(|&(_, d)| d != 0).collect(),
        ..Default::default()
    };
    if rec.lookups.is_empty() {
        return;
    }
    let bytes = postcard::to_extend(&MemRecord::V1(rec), vec![BACKEND])
        .expect("a journal record always encodes");
    if let Err(e) = journal.append(&bytes) {
        tracing::error!(error = %e, "lookups could not be journaled; a crash before the next checkpoint would lose them");
    }
}

/// A record as the journal holds it (tag included), for tests that forge records.
#[cfg(test)]
pub(crate) fn encode_for_tests(rec: RecordV1) -> Vec<u8> {
    postcard::to_extend(&MemRecord::V1(rec), vec![BACKEND]).unwrap()
}

/// A record's payload (without the tag byte) decoded.
pub(crate) fn decode(payload: &[u8]) -> Result<RecordV1, StateError> {
    match postcard::from_bytes::<MemRecord>(payload) {
        Ok(MemRecord::V1(r)) => Ok(r),
        Err(e) => Err(StateError::Corrupt(format!("a mem journal record: {e}"))),
    }
}

/// The memfds a record (its payload without the tag byte) names: the files whose
/// metadata it holds, which every change of a file's contents records (writes,
/// truncation, fallocate, copies). What changed a memfd's contents after a given
/// record is thus found by reading the records after it, without reading a byte of
/// data (a migration sends these files again).
pub fn memfd_ids(payload: &[u8]) -> Result<Vec<u64>, StateError> {
    let rec = decode(payload)?;
    Ok(rec
        .inodes
        .iter()
        .filter_map(|m| match m.kind {
            KindMetaV1::File(Some((id, _))) => Some(id),
            _ => None,
        })
        .collect())
}

/// What a successor keeps of the records it replayed: per request, how to answer it
/// if the kernel resends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Recovered {
    Outcome(Outcome),
    /// Lookups that were counted: undo them, then run the request again.
    Undo(Vec<(u64, i64)>),
}

/// Most requests remembered for answering resends: only the last ones can still be
/// in flight when an appliance dies.
const RECOVERED_MAX: usize = 1 << 16;

/// Applies `records` in order to `st` (a checkpoint's tables); memfds come from
/// `data`. Returns what to answer resent requests with.
/// What a replay leaves: how to answer resends, the inodes it touched, and the inodes
/// its directory entries name.
pub(crate) struct Replayed {
    pub answers: HashMap<u64, Recovered>,
    pub touched: Touched,
}

/// What a replay changed, for [`check`].
#[derive(Default)]
pub(crate) struct Touched {
    pub inodes: std::collections::HashSet<u64>,
    /// Entries the replay added or repointed: (directory, name).
    pub entries: std::collections::HashSet<(u64, Vec<u8>)>,
}

pub(crate) fn replay(
    st: &mut State,
    records: Vec<RecordV1>,
    data: &mut DataSource,
    space: &Arc<Space>,
) -> Result<Replayed, StateError> {
    let mut answers: Vec<(u64, Recovered)> = Vec::new();
    let mut touched = Touched::default();
    for (n, rec) in records.into_iter().enumerate() {
        touched.inodes.extend(rec.inodes.iter().map(|m| m.ino));
        touched.inodes.extend(rec.freed.iter().copied());
        touched.inodes.extend(rec.lookups.iter().map(|(i, _)| *i));
        for (dir, ops) in &rec.dir_ops {
            touched.entries.extend(ops.iter().filter_map(|op| match op {
                DirOp::Insert(name, _) | DirOp::Set(name, _) => Some((*dir, name.clone())),
                DirOp::Remove(_) => None,
            }));
        }
        let bad = |why: String| StateError::Backend(format!("journal record {n}: {why}"));
        if rec.next_ino >= COUNTER_LIMIT || rec.next_fh >= COUNTER_LIMIT {
            return Err(bad("counter out of range".into()));
        }
        st.inodes.advance(rec.next_ino);
        for m in rec.inodes {
            apply_meta(st, m, data, space).map_err(|e| bad(e.to_string()))?;
        }
        for (dir, ops) in &rec.dir_ops {
            let Some(Kind::Dir(d)) = st.inodes.get_untracked(*dir).map(|i| &mut i.kind) else {
                return Err(bad(format!(
                    "entries changed in {dir}, which is no directory"
                )));
            };
            for op in ops {
                if !d.apply(op) {
                    return Err(bad(format!("{op:?} does not fit directory {dir}")));
                }
            }
        }
        for h in rec.opened {
            let Some(inode) = st.inodes.get_untracked(h.ino) else {
                return Err(bad(format!("handle {} on missing inode {}", h.fh, h.ino)));
            };
            let d = if h.file {
                Some(inode.data().cloned().ok_or_else(|| {
                    bad(format!(
                        "file handle {} on inode {} without data",
                        h.fh, h.ino
                    ))
                })?)
            } else {
                None
            };
            let handle = Handle {
                ino: h.ino,
                data: d,
                flags: h.flags,
            };
            if !st.handles.put(h.fh, handle) {
                return Err(bad(format!("handle {} opened twice", h.fh)));
            }
        }
        for fh in rec.closed {
            st.handles.drop_handle(fh);
        }
        for &(ino, d) in &rec.lookups {
            if let Some(i) = st.inodes.get_untracked(ino) {
                let now = i.lookups.load(Ordering::Relaxed);
                i.lookups
                    .store(now.saturating_add_signed(d), Ordering::Relaxed);
            }
        }
        for ino in rec.freed {
            st.inodes.remove(ino);
        }
        if rec.unique != 0 {
            match rec.outcome {
                Some(Outcome::Looked) => answers.push((rec.unique, Recovered::Undo(rec.lookups))),
                Some(o) => answers.push((rec.unique, Recovered::Outcome(o))),
                None => {}
            }
        }
    }
    let skip = answers.len().saturating_sub(RECOVERED_MAX);
    Ok(Replayed {
        answers: answers.into_iter().skip(skip).collect(),
        touched,
    })
}

/// Creates or updates the inode `m` describes.
fn apply_meta(
    st: &mut State,
    m: InodeMetaV1,
    data: &mut DataSource,
    space: &Arc<Space>,
) -> Result<(), StateError> {
    let bad = |why: String| StateError::Backend(why);
    let file = match m.kind {
        KindMetaV1::File(Some((id, charged))) => Some(Some((id, charged))),
        KindMetaV1::File(None) => Some(None),
        _ => None,
    };
    let fill = |inode: &mut Inode, m: &InodeMetaV1| {
        inode.mode = m.mode;
        inode.uid = m.uid;
        inode.gid = m.gid;
        inode.nlink = m.nlink;
        inode.rdev = m.rdev;
        inode.restore_times(m.times);
        inode.opens = m.opens;
    };
    let memfd = |data: &mut DataSource, f: Option<(u64, u64)>| {
        f.map(|(id, charged)| data.get(id, charged, space))
            .transpose()
    };
    match st.inodes.get_untracked(m.ino) {
        Some(inode) => {
            fill(inode, &m);
            match (&mut inode.kind, &m.kind) {
                (Kind::File(slot), KindMetaV1::File(f)) => {
                    let same = matches!((&*slot, f), (Some(d), Some((id, _))) if d.id() == *id);
                    if let (true, Some((_, charged)), Some(d)) = (same, f, slot.as_ref()) {
                        d.set_charged(*charged);
                    } else {
                        *slot = memfd(data, *f)?;
                    }
                }
                (Kind::Dir(d), KindMetaV1::Dir { parent }) => d.parent = *parent,
                (Kind::Symlink(t), KindMetaV1::Symlink(n)) => *t = n.clone(),
                (Kind::Special, KindMetaV1::Special) => {}
                _ => return Err(bad(format!("inode {} changed its kind", m.ino))),
            }
            if let Some(x) = m.xattrs {
                inode.xattrs = Xattrs::from_pairs(x);
            }
        }
        None => {
            let kind = match (file, &m.kind) {
                (Some(f), _) => Kind::File(memfd(data, f)?),
                (None, KindMetaV1::Dir { parent }) => Kind::Dir(Dir::new(*parent)),
                (None, KindMetaV1::Symlink(t)) => Kind::Symlink(t.clone()),
                _ => Kind::Special,
            };
            let mut inode = Inode::new(m.mode, m.uid, m.gid, kind);
            fill(&mut inode, &m);
            if let Some(x) = m.xattrs {
                inode.xattrs = Xattrs::from_pairs(x);
            }
            if !st.inodes.put(m.ino, inode) {
                return Err(bad(format!("inode {} beyond the counter", m.ino)));
            }
        }
    }
    Ok(())
}

/// Whether the parents of directory `ino` lead to the root (not into a cycle or a
/// missing inode).
fn leads_to_root(inodes: &crate::inode::InodeTable, mut ino: u64) -> bool {
    for _ in 0..=inodes.len() {
        if ino == crate::inode::ROOT {
            return true;
        }
        match inodes.get(ino).and_then(|i| i.dir().map(|d| d.parent)) {
            // An unlinked directory (its parent may be gone) leads nowhere, rightly.
            Ok(_) if inodes.get(ino).is_ok_and(|i| i.nlink == 0) => return true,
            Ok(p) => ino = p,
            Err(_) => return false,
        }
    }
    false
}

/// How much [`check`] looks at.
pub(crate) enum Checking<'a> {
    /// A preloaded checkpoint: every inode, but a file whose memfd is no longer kept
    /// is allowed (the journal's tail removes it, or the final check refuses it).
    Preloaded,
    /// After a replay: the inodes it touched and the entries it added (the rest was
    /// checked when preloaded), and every file whose memfd was not kept.
    Replayed(&'a Touched),
}

/// Checks that tables hold together: every directory entry and handle names an inode
/// that exists, every live file's memfd was kept, and no inode is left that nothing
/// refers to.
pub(crate) fn check(
    inodes: &mut crate::inode::InodeTable,
    handles: &crate::handle::HandleTable,
    data: &DataSource,
    how: Checking<'_>,
) -> Result<(), StateError> {
    let final_check = matches!(how, Checking::Replayed(_));
    if let Checking::Replayed(t) = &how {
        for (dir, name) in &t.entries {
            let target = inodes
                .get(*dir)
                .ok()
                .and_then(|d| d.dir().ok())
                .and_then(|d| d.get(std::ffi::OsStr::from_bytes(name)));
            if let Some(ino) = target.filter(|&ino| inodes.get(ino).is_err()) {
                return Err(StateError::Backend(format!(
                    "directory {dir} names {:?} -> missing inode {ino}",
                    String::from_utf8_lossy(name)
                )));
            }
        }
    }
    let inos: Vec<u64> = match how {
        Checking::Replayed(t) if !data.any_lost() => t.inodes.iter().copied().collect(),
        // Files whose memfd was not kept may be anywhere: look at every file.
        Checking::Replayed(t) => {
            let mut v: Vec<u64> = t.inodes.iter().copied().collect();
            v.extend(
                inodes
                    .parts()
                    .1
                    .filter(|(_, i)| i.data().is_some_and(|d| data.is_lost(d)))
                    .map(|(&ino, _)| ino),
            );
            v
        }
        Checking::Preloaded => inodes.parts().1.map(|(&ino, _)| ino).collect(),
    };
    let mut orphans = Vec::new();
    let mut missing = None;
    let checked = inos
        .iter()
        .filter_map(|&ino| inodes.get(ino).ok().map(|i| (ino, i)));
    for (ino, inode) in checked {
        if let Some(d) = inode.data() {
            if final_check && data.is_lost(d) && !inode.unused() {
                missing = Some(format!(
                    "the contents of inode {ino} (memfd {}) were not kept",
                    d.id()
                ));
                break;
            }
        }
        if inode.is_dir() && !leads_to_root(inodes, ino) {
            missing = Some(format!("directory {ino} does not lead up to the root"));
            break;
        }
        if let (Kind::Dir(d), false) = (&inode.kind, final_check) {
            if let Some((_, name, child)) = d.iter_from(0).find(|&(_, _, c)| inodes.get(c).is_err())
            {
                missing = Some(format!(
                    "directory {ino} names {name:?} -> missing inode {child}"
                ));
                break;
            }
        }
        if inode.unused() && ino != crate::inode::ROOT {
            orphans.push(ino);
        }
    }
    if let Some(m) = missing {
        return Err(StateError::Backend(m));
    }
    let (_, hs) = handles.parts();
    for (fh, h) in hs {
        if inodes.get(h.ino).is_err() {
            return Err(StateError::Backend(format!(
                "handle {fh} on missing inode {}",
                h.ino
            )));
        }
    }
    for ino in orphans {
        inodes.remove(ino);
    }
    Ok(())
}

/// The metadata record of directory `ino` with its parent replaced (tests forging a
/// hostile journal).
#[cfg(test)]
pub(crate) fn forge_parent(ino: u64, inode: &mut Inode, parent: u64) -> InodeMetaV1 {
    let mut m = meta(ino, inode);
    m.kind = KindMetaV1::Dir { parent };
    m
}
